package main

import (
	"bytes"
	"context"
	"crypto/rand"
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
	var ae *authError
	var aa *alreadyAnswered // approvals and choices (issue 12)
	switch {
	case errors.As(err, &br):
		writeJSON(w, http.StatusBadRequest, errorBody{br.msg})
	case errors.As(err, &mbe):
		writeJSON(w, http.StatusRequestEntityTooLarge, errorBody{fmt.Sprintf("request body over %d bytes", maxBody)})
	case errors.Is(err, errNeedAgentType):
		writeJSON(w, http.StatusBadRequest, errorBody{"agent_type is required when creating a new session"})
	case errors.Is(err, errNotFound):
		writeJSON(w, http.StatusNotFound, errorBody{"not found"})
	case errors.As(err, &aa): // approvals and choices (issue 12)
		writeJSON(w, http.StatusConflict, errorBody{aa.detail})
	case errors.Is(err, errConflict):
		writeJSON(w, http.StatusConflict, errorBody{"the message already requires user input"})
	case errors.As(err, &ae):
		writeUnauthorized(w, ae)
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

// parseUUID returns s in canonical lower-case 8-4-4-4-12 form, accepting the
// canonical form and 32 bare hex digits; ok is false for anything else.
func parseUUID(s string) (id string, ok bool) {
	var hex string
	switch len(s) {
	case 36:
		if s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-' {
			return "", false
		}
		hex = s[:8] + s[9:13] + s[14:18] + s[19:23] + s[24:]
	case 32:
		hex = s
	default:
		return "", false
	}
	for i := 0; i < len(hex); i++ {
		c := hex[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return "", false
		}
	}
	hex = strings.ToLower(hex)
	return hex[:8] + "-" + hex[8:12] + "-" + hex[12:16] + "-" + hex[16:20] + "-" + hex[20:], true
}

// newUUID returns a random (version 4) UUID.
func newUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// uuidField is the one UUID validator of REST and MCP: a required field
// named field, in canonical form.
func uuidField(field, v string) (string, error) {
	if v == "" {
		return "", badRequestf("field %q is required", field)
	}
	id, ok := parseUUID(v)
	if !ok {
		return "", badRequestf("field %q must be a UUID", field)
	}
	return id, nil
}

// cutChars returns s cut to at most n characters (not bytes).
func cutChars(s string, n int) string {
	i := 0
	for pos := range s {
		if i == n {
			return s[:pos]
		}
		i++
	}
	return s
}

// noBody is the input of a JSON handler that reads no request body.
type noBody struct{}

// created is a JSON handler's answer that made something: 201, not 200.
type created struct{ v any }

// handleJSON is the shape of every JSON handler: the verified caller (a
// request without one is refused: 401, never a 500), the decoded body (unless
// In is noBody), fn, and one exit that writes fn's answer with 200 (201 for
// created) or its error with its status.
func handleJSON[In any](a *app, fn func(r *http.Request, c caller, in In) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		c, ok := callerFrom(r.Context())
		if !ok {
			writeUnauthorized(w, errNoKey)
			return
		}
		var in In
		if _, none := any(in).(noBody); !none {
			if err := decodeJSON(w, r, &in); err != nil {
				writeError(w, r, a.log, err)
				return
			}
		}
		out, err := fn(r, c, in)
		if err != nil {
			writeError(w, r, a.log, err)
			return
		}
		if c, ok := out.(created); ok {
			writeJSON(w, http.StatusCreated, c.v)
			return
		}
		writeJSON(w, http.StatusOK, out)
	}
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
	return handleJSON(a, func(r *http.Request, c caller, req agentMessageRequest) (any, error) {
		in, err := a.agentMessageInput(req)
		if err != nil {
			return nil, err
		}
		res, err := a.store.addAgentMessage(r.Context(), c.UserID, in)
		if err != nil {
			return nil, err
		}
		return agentMessageResponse{true, in.SessionID, res.Message.ID, toMessageJSON(res.Feedback)}, nil
	})
}

// agentMessageInput validates a REST agent message.
func (a *app) agentMessageInput(req agentMessageRequest) (agentMessage, error) {
	var in agentMessage
	var err error
	if in.SessionID = newUUID(); req.AgentInstanceID != nil && *req.AgentInstanceID != "" {
		if in.SessionID, err = uuidField("agent_instance_id", *req.AgentInstanceID); err != nil {
			return in, err
		}
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
	return handleJSON(a, func(r *http.Request, c caller, req userMessageRequest) (any, error) {
		id, err := uuidField("agent_instance_id", deref(req.AgentInstanceID))
		if err != nil {
			return nil, err
		}
		content, err := requireText("content", req.Content)
		if err != nil {
			return nil, err
		}
		markAsRead := req.MarkAsRead == nil || *req.MarkAsRead
		m, err := a.store.addUserMessage(r.Context(), c.UserID, id, content, markAsRead)
		if err != nil {
			return nil, err
		}
		return userMessageResponse{true, m.ID, markAsRead}, nil
	})
}

func deref(v *string) string {
	if v == nil {
		return ""
	}
	return *v
}

// ---- GET /api/v1/messages/pending ----

// pendingResponse is Omnara's, plus session_status (an addition the Omnara
// SDK ignores): a poller learns at once that the person ended the session.
type pendingResponse struct {
	AgentInstanceID string        `json:"agent_instance_id"`
	Messages        []messageJSON `json:"messages"`
	Status          string        `json:"status"`
	SessionStatus   string        `json:"session_status"`
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
	return handleJSON(a, func(r *http.Request, c caller, _ noBody) (any, error) {
		q := r.URL.Query()
		id, err := uuidField("agent_instance_id", q.Get("agent_instance_id"))
		if err != nil {
			return nil, err
		}
		var lastRead string
		if v := q.Get("last_read_message_id"); v != "" {
			if lastRead, err = uuidField("last_read_message_id", v); err != nil {
				return nil, err
			}
		}
		wait, err := queryInt(r, "wait", 0, 0, maxPendingWait)
		if err != nil {
			return nil, err
		}
		var msgs []message
		defer a.ops.metrics.pendingWait()(&msgs) // issue 13: metrics
		var stale bool
		var status string
		check := func() (bool, error) {
			msgs, stale, status, err = a.store.pending(r.Context(), c.UserID, id, lastRead)
			return err != nil || stale || len(msgs) > 0 || status == statusCompleted, err
		}
		if wait == 0 {
			_, err = check()
		} else {
			ctx, release := a.keys.hold(r.Context(), c, 0)
			defer release()
			_, err = a.wait(ctx, "s:"+id, time.Duration(wait)*time.Second, check, 0, nil)
			if errors.Is(err, errNotFound) && !a.keys.valid(r.Context(), c) {
				err = errKeyRevoked // the session went with its user
			}
		}
		if err != nil {
			return nil, err
		}
		return pendingResponse{id, toMessageJSON(msgs), pendingStatus(stale), status}, nil
	})
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
	return handleJSON(a, func(r *http.Request, c caller, _ noBody) (any, error) {
		id, err := uuidField("message_id", r.PathValue("message_id"))
		if err != nil {
			return nil, err
		}
		sessionID, msgs, stale, err := a.store.requestInput(r.Context(), c.UserID, id)
		if err != nil {
			return nil, err
		}
		return requestInputResponse{true, id, sessionID, toMessageJSON(msgs), pendingStatus(stale)}, nil
	})
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
	return handleJSON(a, func(r *http.Request, c caller, req endSessionRequest) (any, error) {
		id, err := uuidField("agent_instance_id", deref(req.AgentInstanceID))
		if err != nil {
			return nil, err
		}
		if err := a.store.endSession(r.Context(), c.UserID, id); err != nil {
			return nil, err
		}
		return endSessionResponse{true, id, statusCompleted}, nil
	})
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
