package main

// ui.go is the person's side: the read API (the sessions list, a session's
// messages), the live event stream, and the inbox page embedded in the
// binary. Every handler here sits behind requireKey and requirePerson, except
// the page's static files, which hold no data.

import (
	"cmp"
	"context"
	"embed"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Limits of the read API. A limit over the maximum is a 400, not clamped,
// so a client never mistakes a short page for the end.
const (
	defaultSessionsLimit = 50
	maxSessionsLimit     = 200
	defaultMessagesLimit = 200
	maxMessagesLimit     = 1000
	lastMessageChars     = 200
)

// sessionStatuses are the statuses the schema allows (its CHECK list).
var sessionStatuses = []string{"ACTIVE", "AWAITING_INPUT", "PAUSED", "STALE", "COMPLETED", "FAILED", "KILLED", "DISCONNECTED"}

func timeJSON(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

// ---- GET /api/v1/sessions ----

type questionJSON struct {
	ID      string `json:"id"`
	Content string `json:"content"`
	questionJSONFields
}

// sessionJSON is a session in a "session" event.
type sessionJSON struct {
	ID             string  `json:"id"`
	AgentType      string  `json:"agent_type"`
	Status         string  `json:"status"`
	StartedAt      string  `json:"started_at"`
	EndedAt        *string `json:"ended_at"`
	LastActivityAt string  `json:"last_activity_at"`
	Title          *string `json:"title"` // Claude Code's working directory (hooks, issue 15); null when none
}

func toSessionJSON(s sessionSummary) sessionJSON {
	j := sessionJSON{ID: s.ID, AgentType: s.AgentType, Status: s.Status,
		StartedAt: timeJSON(s.StartedAt), LastActivityAt: timeJSON(s.LastActivityAt)}
	if s.EndedAt.Valid {
		t := timeJSON(s.EndedAt.Time)
		j.EndedAt = &t
	}
	if s.Title.Valid {
		j.Title = &s.Title.String
	}
	return j
}

// sessionItemJSON is a session in the list: also its latest message's text
// and its open question (null when none).
type sessionItemJSON struct {
	sessionJSON
	LastMessage  *string       `json:"last_message"`
	OpenQuestion *questionJSON `json:"open_question"`
	LastSender   string        `json:"last_sender,omitempty"` // AGENT or USER (issue 12: "You" in the list)
}

func toSessionItemJSON(s sessionSummary) sessionItemJSON {
	j := sessionItemJSON{sessionJSON: toSessionJSON(s)}
	if s.LastMessage.Valid {
		m := cutChars(s.LastMessage.String, lastMessageChars)
		j.LastMessage = &m
	}
	if s.QuestionID.Valid {
		j.OpenQuestion = &questionJSON{ID: s.QuestionID.String, Content: s.Question.String}
	}
	return j
}

type sessionsPage struct {
	Sessions   []sessionItemJSON `json:"sessions"`
	NextBefore *string           `json:"next_before"` // null on the last page
}

// encodeCursor makes the opaque `before` of the next page.
func encodeCursor(c sessionCursor) string {
	return base64.RawURLEncoding.EncodeToString([]byte(timeJSON(c.LastActivityAt) + "_" + c.ID))
}

// decodeCursor reads a `before` made by encodeCursor.
func decodeCursor(v string) (*sessionCursor, error) {
	bad := badRequestf("before must be the next_before of a previous page")
	raw, err := base64.RawURLEncoding.DecodeString(v)
	if err != nil {
		return nil, bad
	}
	ts, idText, ok := strings.Cut(string(raw), "_")
	if !ok {
		return nil, bad
	}
	at, err := time.Parse(time.RFC3339Nano, ts)
	// Out of PostgreSQL's range once in UTC (year 0 or 10000): a 400, not a 500.
	if err != nil || at.UTC().Year() < 1 || at.UTC().Year() > 9999 {
		return nil, bad
	}
	id, ok := parseUUID(idText)
	if !ok {
		return nil, bad
	}
	return &sessionCursor{LastActivityAt: at, ID: id}, nil
}

func (a *app) handleSessions() http.HandlerFunc {
	return handleJSON(a, func(r *http.Request, c caller, _ noBody) (any, error) {
		q := r.URL.Query()
		status := strings.ToUpper(q.Get("status"))
		if status != "" && !slices.Contains(sessionStatuses, status) {
			return nil, badRequestf("status must be one of %s", strings.Join(sessionStatuses, ", "))
		}
		limit, err := queryInt(r, "limit", defaultSessionsLimit, 1, maxSessionsLimit)
		if err != nil {
			return nil, err
		}
		var cursor *sessionCursor
		if v := q.Get("before"); v != "" {
			if cursor, err = decodeCursor(v); err != nil {
				return nil, err
			}
		}
		list, err := a.store.listSessions(r.Context(), c.UserID, status, cursor, int(limit))
		if err != nil {
			return nil, err
		}
		page := sessionsPage{Sessions: make([]sessionItemJSON, 0, len(list))}
		for _, s := range list {
			page.Sessions = append(page.Sessions, toSessionItemJSON(s))
		}
		if err := a.withOpenQuestions(r.Context(), c.UserID, &page); err != nil { // approvals and choices (issue 12)
			return nil, err
		}
		if len(list) == int(limit) {
			last := list[len(list)-1]
			next := encodeCursor(sessionCursor{last.LastActivityAt, last.ID})
			page.NextBefore = &next
		}
		return page, nil
	})
}

// ---- GET /api/v1/sessions/{id}/messages ----

// timelineMessageJSON is a message as the person's side shows it: Omnara's
// five fields plus seq, the position to resume from (and session_id in an
// event).
type timelineMessageJSON struct {
	SessionID         string `json:"session_id,omitempty"`
	ID                string `json:"id"`
	Seq               int64  `json:"seq"`
	Content           string `json:"content"`
	SenderType        string `json:"sender_type"`
	CreatedAt         string `json:"created_at"`
	RequiresUserInput bool   `json:"requires_user_input"`
	questionJSONFields
}

func toTimelineJSON(m message, withSession bool) timelineMessageJSON {
	j := timelineMessageJSON{ID: m.ID, Seq: m.Seq, Content: m.Content, SenderType: m.SenderType,
		CreatedAt: timeJSON(m.CreatedAt), RequiresUserInput: m.RequiresUserInput}
	j.questionJSONFields = toQuestionJSONFields(m.RequiresUserInput, m.Q) // approvals and choices (issue 12)
	if withSession {
		j.SessionID = m.SessionID
	}
	return j
}

type timelineJSON struct {
	SessionID string                `json:"session_id"`
	AgentType string                `json:"agent_type"`
	Status    string                `json:"status"`
	GitDiff   *string               `json:"git_diff"`
	Messages  []timelineMessageJSON `json:"messages"`
	NextAfter *int64                `json:"next_after"` // set when the page is full: more may follow
}

func (a *app) handleSessionMessages() http.HandlerFunc {
	return handleJSON(a, func(r *http.Request, c caller, _ noBody) (any, error) {
		id, err := uuidField("id", r.PathValue("id"))
		if err != nil {
			return nil, err
		}
		after, err := queryInt(r, "after", 0, 0, 1<<62)
		if err != nil {
			return nil, err
		}
		limit, err := queryInt(r, "limit", defaultMessagesLimit, 1, maxMessagesLimit)
		if err != nil {
			return nil, err
		}
		tl, err := a.store.sessionMessages(r.Context(), c.UserID, id, after, int(limit))
		if err != nil {
			return nil, err
		}
		out := timelineJSON{SessionID: tl.ID, AgentType: tl.AgentType, Status: tl.Status,
			Messages: make([]timelineMessageJSON, 0, len(tl.Messages))}
		if tl.GitDiff.Valid && tl.GitDiff.String != "" {
			out.GitDiff = &tl.GitDiff.String
		}
		for _, m := range tl.Messages {
			out.Messages = append(out.Messages, toTimelineJSON(m, false))
		}
		if len(tl.Messages) == int(limit) {
			next := tl.Messages[len(tl.Messages)-1].Seq
			out.NextAfter = &next
		}
		return out, nil
	})
}

// ---- GET /api/v1/events ----

// eventsKeepalive is how often an idle event stream sends a comment line,
// so proxies that close quiet connections leave it open.
const eventsKeepalive = 15 * time.Second

// sessionWindow is how far back (by the database's clock) a stream looks for
// session changes on each wake-up. A change moves last_activity_at to the
// start of its transaction, so it is seen unless that transaction ran for
// longer than this.
const sessionWindow = 5 * time.Minute

// eventBatch is how many missed messages one query reads while catching up.
const eventBatch = 500

// eventStream is one client's stream: what it has sent so far.
type eventStream struct {
	a      *app
	w      http.ResponseWriter
	rc     *http.ResponseController
	userID string
	cursor int64 // seq of the last message sent (or the starting point)
	// sessions is the state last sent (or known at start) of each session
	// active within sessionWindow; a session event goes out when it changes.
	sessions map[string]sessionSummary
	started  bool // the response headers went out
}

// handleEvents streams the caller's new messages (event "message", id = seq)
// and session changes (event "session", no id) as Server-Sent Events.
//
// Messages: with Last-Event-ID the stream first replays every message with a
// larger seq from the database, then follows; without it, it starts after the
// newest message. The first event, "ready", carries the starting cursor as its
// id, so a client can always resume. A wake-up from the hub (or the 30 s
// safety re-check) reads seq > cursor: for one user seq order is commit order,
// so nothing is skipped and nothing is sent twice.
//
// Sessions: an event is sent when a recently active session's status or last
// activity changes after the stream started. They are not replayed: a client
// re-reads GET /api/v1/sessions after (re)connecting, once the response
// headers have arrived.
//
// While idle the stream holds no database connection; it ends when the client
// goes away or the server shuts down.
func (a *app) handleEvents() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		c, ok := callerFrom(r.Context())
		if !ok {
			writeUnauthorized(w, errNoKey)
			return
		}
		ctx, release := a.keys.hold(r.Context(), c, 0)
		defer release()
		s := &eventStream{a: a, w: w, rc: http.NewResponseController(w), userID: c.UserID, cursor: -1,
			sessions: map[string]sessionSummary{}}
		if v := r.Header.Get("Last-Event-ID"); v != "" {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil || n < 0 {
				writeError(w, r, a.log, badRequestf("Last-Event-ID must be the id of an event of this stream"))
				return
			}
			s.cursor = n
		}
		// The first catch-up runs inside the wait, after it subscribed: a
		// change committed before the headers went out wakes it, not lost.
		check := func() (bool, error) {
			if !s.started {
				if err := s.start(ctx); err != nil {
					return false, err
				}
			}
			return false, s.catchUp(ctx)
		}
		every := cmp.Or(a.eventsKeepalive, eventsKeepalive)
		keepalive := func() error { return s.write([]byte(": keepalive\n\n")) }
		_, err := a.wait(ctx, "u:"+c.UserID, 0, check, every, keepalive)
		switch {
		case !s.started:
			writeError(w, r, a.log, err)
		case errors.Is(err, errKeyRevoked):
			detail, _ := json.Marshal(errorBody{errKeyRevoked.msg})
			s.send("error", "", detail)
		case ctx.Err() == nil && !errors.Is(err, errShuttingDown) && !isWriteError(err):
			a.log.Warn("event stream ended", "err", err)
		}
	}
}

// start reads where the stream begins and sends the response headers and
// the "ready" event.
func (s *eventStream) start(ctx context.Context) error {
	if s.cursor < 0 {
		seq, err := s.a.store.latestSeq(ctx, s.userID)
		if err != nil {
			return err
		}
		s.cursor = seq
	}
	recent, err := s.a.store.recentSessions(ctx, s.userID, sessionWindow)
	if err != nil {
		return err
	}
	for _, ss := range recent {
		s.sessions[ss.ID] = ss
	}
	h := s.w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Accel-Buffering", "no") // nginx: pass each event on at once
	s.w.WriteHeader(http.StatusOK)
	s.started = true
	ready, _ := json.Marshal(map[string]int64{"cursor": s.cursor})
	return s.send("ready", strconv.FormatInt(s.cursor, 10), ready)
}

// writeFailed marks an error writing to the client (it went away or stalled).
type writeFailed struct{ err error }

func (e *writeFailed) Error() string { return "write event: " + e.err.Error() }

func isWriteError(err error) bool {
	var wf *writeFailed
	return errors.As(err, &wf)
}

// write sends b and flushes it. A client that does not read for 30 s is
// dropped rather than holding the stream's buffers for ever.
func (s *eventStream) write(b []byte) error {
	s.rc.SetWriteDeadline(time.Now().Add(30 * time.Second))
	if _, err := s.w.Write(b); err != nil {
		return &writeFailed{err}
	}
	if err := s.rc.Flush(); err != nil {
		return &writeFailed{err}
	}
	return nil
}

// send writes one event. data is JSON, which never holds a raw line break.
func (s *eventStream) send(event, id string, data []byte) error {
	var b strings.Builder
	b.WriteString("event: " + event + "\n")
	if id != "" {
		b.WriteString("id: " + id + "\n")
	}
	b.WriteString("data: ")
	b.Write(data)
	b.WriteString("\n\n")
	return s.write([]byte(b.String()))
}

// catchUp sends the session changes and the messages committed since the
// last call.
func (s *eventStream) catchUp(ctx context.Context) error {
	recent, err := s.a.store.recentSessions(ctx, s.userID, sessionWindow)
	if err != nil {
		return err
	}
	seen := make(map[string]sessionSummary, len(recent))
	for _, ss := range recent {
		seen[ss.ID] = ss
		old, ok := s.sessions[ss.ID]
		if ok && old.Status == ss.Status && old.LastActivityAt.Equal(ss.LastActivityAt) {
			continue
		}
		data, _ := json.Marshal(toSessionJSON(ss))
		if err := s.send("session", "", data); err != nil {
			return err
		}
		if err := s.sendDecisions(ctx, ss); err != nil { // approvals and choices (issue 12)
			return err
		}
	}
	// A session that left the window comes back (as a change) only when its
	// last activity moves again.
	s.sessions = seen

	for {
		msgs, err := s.a.store.messagesAfter(ctx, s.userID, s.cursor, eventBatch)
		if err != nil {
			return err
		}
		for _, m := range msgs {
			data, _ := json.Marshal(toTimelineJSON(m, true))
			if err := s.send("message", strconv.FormatInt(m.Seq, 10), data); err != nil {
				return err
			}
			s.cursor = m.Seq
		}
		if len(msgs) < eventBatch {
			return nil
		}
	}
}

// ---- the inbox page ----

//go:embed ui
var uiFiles embed.FS

// pageCSP allows the page only its own files: no inline script or style, no
// other host, no framing. Agent text that slipped into the DOM as markup
// would still run nothing.
const pageCSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
	"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"

// handlePage serves the embedded inbox (index.html, app.js, app.css). It
// needs no key: the page holds no data until a person pastes one.
func (a *app) handlePage() http.Handler {
	sub, err := fs.Sub(uiFiles, "ui")
	if err != nil {
		panic(fmt.Sprintf("embedded ui: %v", err)) // unreachable: the folder is embedded
	}
	files := http.FileServerFS(sub)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", pageCSP)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("X-Frame-Options", "DENY") // for browsers without frame-ancestors
		h.Set("Cache-Control", "no-cache")
		files.ServeHTTP(w, r)
	})
}
