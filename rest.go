package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// maxBody is the largest request body accepted: a step with a large diff
// fits, a memory-exhaustion attempt does not.
const maxBody = 10 << 20

// errorBody is every error answer: {"detail": "…"}, as Omnara's FastAPI sent.
type errorBody struct {
	Detail string `json:"detail"`
}

// badRequest is a client mistake whose text is safe to send back.
type badRequest struct{ msg string }

func (e *badRequest) Error() string { return e.msg }

func badRequestf(format string, args ...any) error {
	return &badRequest{fmt.Sprintf(format, args...)}
}

// errShuttingDown ends waits when the server stops.
var errShuttingDown = errors.New("server is shutting down")

// writeJSON sends v with status code.
func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

// writeError answers err with its status. Known errors carry their own
// message; anything else is logged and answered with a generic one, so driver
// and SQL text never reach a client.
func writeError(w http.ResponseWriter, r *http.Request, log *slog.Logger, err error) {
	var br *badRequest
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &br):
		writeJSON(w, http.StatusBadRequest, errorBody{br.msg})
	case errors.As(err, &mbe):
		writeJSON(w, http.StatusRequestEntityTooLarge, errorBody{fmt.Sprintf("request body over %d bytes", maxBody)})
	case errors.Is(err, errNeedAgentType):
		writeJSON(w, http.StatusBadRequest, errorBody{"agent_type is required when creating a new session"})
	case errors.Is(err, errNotFound):
		writeJSON(w, http.StatusNotFound, errorBody{"not found"})
	case errors.Is(err, errConflict):
		writeJSON(w, http.StatusConflict, errorBody{"the message already requires user input"})
	case errors.Is(err, errShuttingDown):
		writeJSON(w, http.StatusServiceUnavailable, errorBody{"server is shutting down; retry"})
	case r.Context().Err() != nil:
		// The client is gone; nobody reads an answer.
	case isUnavailable(err):
		log.Warn("database unavailable", "method", r.Method, "path", r.URL.Path, "err", err)
		writeJSON(w, http.StatusServiceUnavailable, errorBody{"database unavailable; retry"})
	default:
		log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		writeJSON(w, http.StatusInternalServerError, errorBody{"internal error"})
	}
}

// decodeJSON reads r's body, at most maxBody bytes, into v. Unknown fields
// are ignored (Omnara clients send more than we need).
func decodeJSON(w http.ResponseWriter, r *http.Request, v any) error {
	rc := http.NewResponseController(w)
	// A body trickled in slowly must not hold a connection for ever; the
	// deadline is cleared again so long-polls are not cut.
	rc.SetReadDeadline(time.Now().Add(60 * time.Second))
	defer rc.SetReadDeadline(time.Time{})
	if r.ContentLength > maxBody {
		// Refused before reading: a declared 1 GiB body costs us nothing.
		return &http.MaxBytesError{Limit: maxBody}
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return err
		}
		return badRequestf("could not read the request body")
	}
	return parseJSON(body, v)
}

// parseJSON decodes one JSON object from body into v, turning each kind of
// failure into a badRequest that says what is wrong.
func parseJSON(body []byte, v any) error {
	if len(bytes.TrimSpace(body)) == 0 {
		return badRequestf("empty request body: send a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	err := dec.Decode(v)
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case err == nil:
	case errors.As(err, &se):
		return badRequestf("malformed JSON at byte %d", se.Offset)
	case errors.As(err, &te):
		if te.Field == "" {
			return badRequestf("the body must be a JSON object")
		}
		return badRequestf("field %q must be a %s", te.Field, jsonKind(te.Type.Kind().String()))
	case errors.Is(err, io.ErrUnexpectedEOF):
		return badRequestf("malformed JSON: unexpected end")
	default:
		return badRequestf("malformed JSON")
	}
	// Anything but white space after the object is an error: dec.More alone
	// would let a stray "}" through.
	if _, err := dec.Token(); err != io.EOF {
		return badRequestf("malformed JSON: more than one value")
	}
	return nil
}

func jsonKind(goKind string) string {
	switch goKind {
	case "string":
		return "string"
	case "bool":
		return "boolean"
	case "int", "int64", "float64":
		return "number"
	default:
		return "JSON " + goKind
	}
}

// requireUUID checks a required UUID field.
func requireUUID(field string, v *string) (string, error) {
	if v == nil || *v == "" {
		return "", badRequestf("field %q is required", field)
	}
	id, ok := parseUUID(*v)
	if !ok {
		return "", badRequestf("field %q must be a UUID", field)
	}
	return id, nil
}

// requireText checks a required, non-empty text field. Emptiness is judged
// on the text as it will be stored (NUL bytes dropped), so a content of NULs
// alone is refused rather than stored as "".
func requireText(field string, v *string) (string, error) {
	if v == nil || strings.TrimSpace(cleanText(*v)) == "" {
		return "", badRequestf("field %q is required and must not be empty", field)
	}
	return *v, nil
}

// queryInt parses the query parameter name: def when absent, else a whole
// number from lo to hi.
func queryInt(r *http.Request, name string, def, lo, hi int64) (int64, error) {
	v := r.URL.Query().Get(name)
	if v == "" {
		return def, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < lo || n > hi {
		return 0, badRequestf("%s must be a whole number from %d to %d", name, lo, hi)
	}
	return n, nil
}

// messageJSON is Omnara's Message: exactly these five keys, since the SDK
// builds it with Message(**msg) and fails on any other.
type messageJSON struct {
	ID                string `json:"id"`
	Content           string `json:"content"`
	SenderType        string `json:"sender_type"`
	CreatedAt         string `json:"created_at"`
	RequiresUserInput bool   `json:"requires_user_input"`
}

// createdAtLayout is RFC 3339 with a zone, written as Omnara's server wrote
// it (Python's isoformat of a UTC time: six fraction digits, "+00:00"), which
// every Python 3 datetime.fromisoformat reads; before 3.11 it refuses "Z"
// and fractions of other lengths.
const createdAtLayout = "2006-01-02T15:04:05.000000-07:00"

func toMessageJSON(ms []message) []messageJSON {
	out := make([]messageJSON, 0, len(ms))
	for _, m := range ms {
		out = append(out, messageJSON{m.ID, m.Content, m.SenderType, m.CreatedAt.UTC().Format(createdAtLayout), m.RequiresUserInput})
	}
	return out
}

// ---- POST /api/v1/messages/agent ----

type agentMessageRequest struct {
	AgentInstanceID   *string `json:"agent_instance_id"`
	AgentType         *string `json:"agent_type"`
	Content           *string `json:"content"`
	RequiresUserInput *bool   `json:"requires_user_input"`
	GitDiff           *string `json:"git_diff"`
	SendEmail         *bool   `json:"send_email"`
	SendSMS           *bool   `json:"send_sms"`
	SendPush          *bool   `json:"send_push"`
}

type agentMessageResponse struct {
	Success            bool          `json:"success"`
	AgentInstanceID    string        `json:"agent_instance_id"`
	MessageID          string        `json:"message_id"`
	QueuedUserMessages []messageJSON `json:"queued_user_messages"`
}

func (a *app) handleAgentMessage() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req agentMessageRequest
		if err := decodeJSON(w, r, &req); err != nil {
			writeError(w, r, a.log, err)
			return
		}
		in, err := a.agentMessageInput(req)
		if err != nil {
			writeError(w, r, a.log, err)
			return
		}
		c, _ := callerFrom(r.Context())
		res, err := a.store.addAgentMessage(r.Context(), c.UserID, in)
		if err != nil {
			writeError(w, r, a.log, err)
			return
		}
		writeJSON(w, http.StatusOK, agentMessageResponse{true, in.SessionID, res.Message.ID, toMessageJSON(res.Feedback)})
	}
}

// agentMessageInput validates a REST agent message.
func (a *app) agentMessageInput(req agentMessageRequest) (agentMessage, error) {
	var in agentMessage
	var err error
	if req.AgentInstanceID == nil || *req.AgentInstanceID == "" {
		in.SessionID = newUUID()
	} else if in.SessionID, err = requireUUID("agent_instance_id", req.AgentInstanceID); err != nil {
		return in, err
	}
	if in.Content, err = requireText("content", req.Content); err != nil {
		return in, err
	}
	if req.AgentType != nil {
		in.AgentType = strings.TrimSpace(cleanText(*req.AgentType))
		if len(in.AgentType) > 255 {
			return in, badRequestf("field %q is longer than 255 characters", "agent_type")
		}
	}
	in.RequiresUserInput = req.RequiresUserInput != nil && *req.RequiresUserInput
	in.SendEmail, in.SendSMS, in.SendPush = req.SendEmail, req.SendSMS, req.SendPush
	if req.GitDiff != nil {
		in.GitDiff = a.gitDiff(*req.GitDiff)
	}
	return in, nil
}

var diffLine = regexp.MustCompile(`(?m)^(diff --git |--- |\+\+\+ |@@ )`)

// gitDiff returns the diff to store, or nil to keep the session's current
// one. Newer Omnara SDKs send the diff base64-encoded; a text that is not a
// unified diff is ignored with a warning.
func (a *app) gitDiff(s string) *string {
	if b, err := base64.StdEncoding.Strict().DecodeString(strings.TrimSpace(s)); err == nil && utf8.Valid(b) {
		s = string(b)
	}
	s = cleanText(strings.TrimSpace(s))
	if s == "" {
		return &s // an empty diff clears it
	}
	if len(diffLine.FindAllString(s, 4)) < 3 {
		a.log.Warn("git_diff ignored: not a unified diff", "bytes", len(s))
		return nil
	}
	return &s
}

// ---- POST /api/v1/messages/user ----

type userMessageRequest struct {
	AgentInstanceID *string `json:"agent_instance_id"`
	Content         *string `json:"content"`
	MarkAsRead      *bool   `json:"mark_as_read"`
}

type userMessageResponse struct {
	Success      bool   `json:"success"`
	MessageID    string `json:"message_id"`
	MarkedAsRead bool   `json:"marked_as_read"`
}

func (a *app) handleUserMessage() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req userMessageRequest
		if err := decodeJSON(w, r, &req); err != nil {
			writeError(w, r, a.log, err)
			return
		}
		id, err := requireUUID("agent_instance_id", req.AgentInstanceID)
		if err != nil {
			writeError(w, r, a.log, err)
			return
		}
		content, err := requireText("content", req.Content)
		if err != nil {
			writeError(w, r, a.log, err)
			return
		}
		markAsRead := req.MarkAsRead == nil || *req.MarkAsRead
		c, _ := callerFrom(r.Context())
		m, err := a.store.addUserMessage(r.Context(), c.UserID, id, content, markAsRead)
		if err != nil {
			writeError(w, r, a.log, err)
			return
		}
		writeJSON(w, http.StatusOK, userMessageResponse{true, m.ID, markAsRead})
	}
}

// ---- GET /api/v1/messages/pending ----

type pendingResponse struct {
	AgentInstanceID string        `json:"agent_instance_id"`
	Messages        []messageJSON `json:"messages"`
	Status          string        `json:"status"`
}

func pendingStatus(stale bool) string {
	if stale {
		return "stale"
	}
	return "ok"
}

// maxPendingWait bounds a long-poll; clients loop for longer waits.
const maxPendingWait = 60

func (a *app) handlePending() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		rawID := q.Get("agent_instance_id")
		id, err := requireUUID("agent_instance_id", &rawID)
		if err != nil {
			writeError(w, r, a.log, err)
			return
		}
		var lastRead string
		if v := q.Get("last_read_message_id"); v != "" {
			var ok bool
			if lastRead, ok = parseUUID(v); !ok {
				writeError(w, r, a.log, badRequestf("field %q must be a UUID", "last_read_message_id"))
				return
			}
		}
		wait, err := queryInt(r, "wait", 0, 0, maxPendingWait)
		if err != nil {
			writeError(w, r, a.log, err)
			return
		}
		c, _ := callerFrom(r.Context())
		var msgs []message
		defer a.ops.metrics.pendingWait()(&msgs) // issue 13: metrics
		var stale bool
		check := func() (bool, error) {
			msgs, stale, err = a.store.pending(r.Context(), c.UserID, id, lastRead)
			return err != nil || stale || len(msgs) > 0, err
		}
		if wait == 0 {
			_, err = check()
		} else {
			_, err = a.wait(r.Context(), "s:"+id, time.Duration(wait)*time.Second, check)
		}
		if err != nil {
			writeError(w, r, a.log, err)
			return
		}
		writeJSON(w, http.StatusOK, pendingResponse{id, toMessageJSON(msgs), pendingStatus(stale)})
	}
}

// wait is hub.wait that also ends when the server shuts down.
func (a *app) wait(ctx context.Context, topic string, limit time.Duration, check func() (bool, error)) (bool, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stop := context.AfterFunc(a.stopping, func() { cancel(errShuttingDown) })
	defer stop()
	done, err := a.hub.wait(ctx, topic, limit, check)
	if err != nil && context.Cause(ctx) == errShuttingDown {
		return done, errShuttingDown
	}
	return done, err
}

// ---- PATCH /api/v1/messages/{message_id}/request-input ----

type requestInputResponse struct {
	Success         bool          `json:"success"`
	MessageID       string        `json:"message_id"`
	AgentInstanceID string        `json:"agent_instance_id"`
	Messages        []messageJSON `json:"messages"`
	Status          string        `json:"status"`
}

func (a *app) handleRequestInput() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id, ok := parseUUID(r.PathValue("message_id"))
		if !ok {
			writeError(w, r, a.log, badRequestf("message_id must be a UUID"))
			return
		}
		c, _ := callerFrom(r.Context())
		sessionID, msgs, stale, err := a.store.requestInput(r.Context(), c.UserID, id)
		if err != nil {
			writeError(w, r, a.log, err)
			return
		}
		writeJSON(w, http.StatusOK, requestInputResponse{true, id, sessionID, toMessageJSON(msgs), pendingStatus(stale)})
	}
}

// ---- POST /api/v1/sessions/end ----

type endSessionRequest struct {
	AgentInstanceID *string `json:"agent_instance_id"`
}

type endSessionResponse struct {
	Success         bool   `json:"success"`
	AgentInstanceID string `json:"agent_instance_id"`
	FinalStatus     string `json:"final_status"`
}

func (a *app) handleEndSession() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req endSessionRequest
		if err := decodeJSON(w, r, &req); err != nil {
			writeError(w, r, a.log, err)
			return
		}
		id, err := requireUUID("agent_instance_id", req.AgentInstanceID)
		if err != nil {
			writeError(w, r, a.log, err)
			return
		}
		c, _ := callerFrom(r.Context())
		if err := a.store.endSession(r.Context(), c.UserID, id); err != nil {
			writeError(w, r, a.log, err)
			return
		}
		writeJSON(w, http.StatusOK, endSessionResponse{true, id, statusCompleted})
	}
}

// ---- GET /health ----

func (a *app) handleHealth() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := a.store.ping(ctx); err != nil {
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "unhealthy", "detail": "database unavailable"})
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "healthy"})
	}
}
