package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/google/jsonschema-go/jsonschema"
	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// mcpServer serves the three tools over Streamable HTTP (stateless: any
// replica answers any request) and over the legacy HTTP+SSE transport
// (a session per stream, so it needs sticky routing behind a balancer).
//
// Identity never depends on what the SDK forwards to a tool handler (on SSE
// it forwards no headers at all). Streamable HTTP uses one *mcp.Server:
// serveStreamable puts the verified caller of each POST in its context, and
// a tool refuses to run without it. SSE builds a server per stream whose
// tools close over the caller who opened the stream.
type mcpServer struct {
	a          *app
	schemas    *mcp.SchemaCache
	tools      mcpTools
	shared     *mcp.Server  // Streamable HTTP: the caller comes with each request
	sdk        http.Handler // answers with an event stream
	sdkJSON    http.Handler // answers with one JSON body (see quick)
	streamable http.Handler
	sse        http.Handler

	mu          sync.Mutex
	sseHandlers map[string]*mcp.SSEHandler // per user: a POST can only reach its own user's streams
}

// progressEvery is how often a waiting ask_question reports progress; clients
// that reset their timeout on progress then keep waiting.
const progressEvery = 15 * time.Second

func newMCPServer(a *app) *mcpServer {
	m := &mcpServer{a: a, schemas: mcp.NewSchemaCache(), tools: newMCPTools(), sseHandlers: map[string]*mcp.SSEHandler{}}
	m.shared = m.newServer(func(ctx context.Context) (mcpCaller, bool) {
		who, ok := ctx.Value(mcpCallerKey{}).(mcpCaller)
		return who, ok
	})
	opts := mcp.StreamableHTTPOptions{
		Stateless:           true,
		MaxRequestBodyBytes: maxBody,
		// The SDK's DNS-rebinding guard refuses a loopback connection with a
		// non-loopback Host, which is every reverse proxy on the same
		// machine. It protects servers without authentication; here every
		// request needs a bearer key, which a rebinding page cannot read.
		DisableLocalhostProtection: true,
		// From 2026-07-28 the POST is the whole call: a client that closes it
		// has cancelled it (before that revision, see legacyCancel).
		PropagateRequestCancellation: true,
	}
	shared := func(*http.Request) *mcp.Server { return m.shared }
	m.sdk = mcp.NewStreamableHTTPHandler(shared, &opts)
	opts.JSONResponse = true
	m.sdkJSON = mcp.NewStreamableHTTPHandler(shared, &opts)
	m.streamable = http.HandlerFunc(m.serveStreamable)
	m.sse = http.HandlerFunc(m.serveSSE)
	return m
}

// mcpCaller is who a tool call acts for, and the request that carries it.
type mcpCaller struct {
	caller
	agentType string
	// carrier ends when the HTTP request carrying the call (a stateless
	// POST, or an SSE stream) does. The SDK does not cancel a running
	// handler then (closing its session waits for the handler instead), so
	// a tool call ends its own wait when carrier is done.
	carrier context.Context
	// sessionHeader is the X-Agentline-Session header: the session an
	// approve call without agent_instance_id goes to (issue 12).
	sessionHeader string
}

type mcpCallerKey struct{}

// callerOf is the verified caller of r, from requireKey.
func callerOf(r *http.Request) (mcpCaller, bool) {
	c, ok := callerFrom(r.Context())
	if !ok {
		return mcpCaller{}, false
	}
	return mcpCaller{caller: c, agentType: agentTypeOf(r), carrier: r.Context(), sessionHeader: r.Header.Get("X-Agentline-Session")}, true
}

// serveStreamable hands a Streamable HTTP request to the SDK with its
// caller in the context, where the shared server's tools find it.
func (m *mcpServer) serveStreamable(w http.ResponseWriter, r *http.Request) {
	r, done := m.holdRequest(r)
	defer done()
	if r.Method == http.MethodPost && r.Header.Get("Mcp-Method") == "" { // before 2026-07-28
		var release func()
		r, release = m.legacyCancel(w, r)
		defer release()
	}
	who, ok := callerOf(r)
	if !ok {
		writeUnauthorized(w, errNoKey)
		return
	}
	h := m.sdk
	if quick(r) {
		h = m.sdkJSON
	}
	h.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), mcpCallerKey{}, who)))
}

// quick reports whether an MCP 2026-07-28 request can have no message but
// its response: log_step, end_session, tools/list, server/discover. It gets
// one JSON body instead of an event stream (JSONResponse), less for both
// sides to write and parse. A call that waits sends progress, and
// subscriptions/listen is a stream by nature; a request before 2026-07-28
// names no method in its headers. (A header that lies about the body is
// refused by the SDK.)
func quick(r *http.Request) bool {
	switch r.Header.Get("Mcp-Method") {
	case "tools/call":
		name := r.Header.Get("Mcp-Name")
		return name == "log_step" || name == "end_session"
	case "tools/list", "server/discover":
		return true
	}
	return false
}

// legacyCancel routes a cancellation before MCP 2026-07-28, where a client
// (the TypeScript SDK, say) cancels a call by POSTing notifications/cancelled
// and keeps the call's own connection open. In stateless mode the SDK hands
// that notification to a throwaway session, so the call would wait out its
// limit. Instead: initialize gets an Mcp-Session-Id of ours (random; the SDK
// ignores it, the client sends it back on every request); a tools/call is
// held in the hub under its caller, that id and its request id; the
// cancellation, from the same caller and session id, ends it through a
// NOTIFY, on whichever replica holds it. Request ids repeat across clients
// (each counts from 0), so without the same session id nothing is
// cancelled. From 2026-07-28 a client cancels by closing the request
// (PropagateRequestCancellation, and carrier in mcpCaller).
func (m *mcpServer) legacyCancel(w http.ResponseWriter, r *http.Request) (*http.Request, func()) {
	c, ok := callerFrom(r.Context())
	if !ok {
		return r, func() {}
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	r.Body = io.NopCloser(io.MultiReader(bytes.NewReader(body), r.Body)) // the SDK reads it all, and enforces the limit
	var msg struct {
		Method string          `json:"method"`
		ID     json.RawMessage `json:"id"`
		Params struct {
			RequestID json.RawMessage `json:"requestId"`
		} `json:"params"`
	}
	if err != nil || json.Unmarshal(body, &msg) != nil {
		return r, func() {} // a batch, or not JSON: the SDK answers it
	}
	sid := r.Header.Get("Mcp-Session-Id")
	switch {
	case msg.Method == "initialize":
		w.Header().Set("Mcp-Session-Id", newUUID())
	case sid == "":
	case msg.Method == "notifications/cancelled" && len(msg.Params.RequestID) > 0:
		payload := fmt.Sprintf("c %s %s 0", c.UserID, callKey(sid, msg.Params.RequestID))
		if err := m.a.store.pgNotify(r.Context(), notifyChannel, payload); err != nil {
			m.a.log.Warn("cancellation not sent", "err", err)
		}
	case msg.Method == "tools/call" && len(msg.ID) > 0:
		ctx, cancel := context.WithCancel(r.Context())
		release := m.a.hub.holdCall(c.UserID+" "+callKey(sid, msg.ID), cancel)
		return r.WithContext(ctx), func() { release(); cancel() }
	}
	return r, func() {}
}

// callKey names a client's request: its session id and request id, hashed
// to a fixed-size token fit for a NOTIFY payload.
func callKey(sessionID string, requestID json.RawMessage) string {
	sum := sha256.Sum256([]byte(sessionID + "\n" + string(bytes.TrimSpace(requestID))))
	return hex.EncodeToString(sum[:16])
}

// serveSSE routes an SSE request to the caller's own SSEHandler, so a session
// id learnt by another user leads nowhere (404).
func (m *mcpServer) serveSSE(w http.ResponseWriter, r *http.Request) {
	r, done := m.holdRequest(r)
	defer done()
	c, ok := callerFrom(r.Context())
	if !ok {
		writeUnauthorized(w, errNoKey)
		return
	}
	m.mu.Lock()
	h := m.sseHandlers[c.UserID]
	if h == nil {
		// DisableLocalhostProtection: see newMCPServer.
		h = mcp.NewSSEHandler(m.streamServer, &mcp.SSEOptions{MaxRequestBodyBytes: maxBody, DisableLocalhostProtection: true})
		m.sseHandlers[c.UserID] = h
	}
	m.mu.Unlock()
	h.ServeHTTP(w, r)
}

// holdRequest ends a long-lived MCP request (an SSE stream, a
// subscriptions/listen stream) when the server shuts down or its key is
// revoked. Waits on it end first, with a tool error; the request itself ends
// sseCloseGrace later, so those errors reach the client before it closes.
func (m *mcpServer) holdRequest(r *http.Request) (*http.Request, func()) {
	c, ok := callerFrom(r.Context())
	if !ok || r.Method == http.MethodPost && r.Header.Get("Mcp-Method") != "subscriptions/listen" {
		return r, func() {}
	}
	ctx, release := m.a.keys.hold(r.Context(), c, sseCloseGrace)
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(m.a.stopping, func() { time.AfterFunc(sseCloseGrace, cancel) })
	return r.WithContext(ctx), func() { stop(); cancel(); release() }
}

// sseCloseGrace is how long an SSE stream outlives the start of shutdown.
const sseCloseGrace = 250 * time.Millisecond

// streamServer builds the server of one SSE stream, bound to the caller who
// opened it (r is the stream's GET).
func (m *mcpServer) streamServer(r *http.Request) *mcp.Server {
	who, ok := callerOf(r)
	if !ok {
		return nil // unreachable behind requireKey; the SDK answers 400
	}
	return m.newServer(func(context.Context) (mcpCaller, bool) { return who, true })
}

// newServer builds an MCP server with the three tools; bind says who a call
// acts for.
func (m *mcpServer) newServer(bind func(context.Context) (mcpCaller, bool)) *mcp.Server {
	s := mcp.NewServer(&mcp.Implementation{Name: "agentline", Version: version}, &mcp.ServerOptions{
		SchemaCache: m.schemas,
		Instructions: "agentline connects you with the person you work for. Call log_step after each " +
			"meaningful step and act on any user_feedback it returns; call ask_question when you need " +
			"a decision; call end_session once the person has confirmed the work is finished.",
	})
	mcp.AddTool(s, m.tools.logStep, guard(m.a, "log_step", boundTool(bind, m.logStep)))
	mcp.AddTool(s, m.tools.askQuestion, guard(m.a, "ask_question", boundTool(bind, m.askQuestion)))
	mcp.AddTool(s, m.tools.endSession, guard(m.a, "end_session", boundTool(bind, m.endSession)))
	mcp.AddTool(s, m.tools.approve, guard(m.a, "approve", boundTool(bind, m.approve))) // approvals (issue 12)
	return s
}

// mcpTools are the four tools with their input schemas serialized once.
type mcpTools struct{ logStep, askQuestion, endSession, approve *mcp.Tool }

func newMCPTools() mcpTools {
	return mcpTools{rawInput[logStepIn](logStepTool), rawInput[askQuestionIn](askQuestionTool),
		rawInput[endSessionIn](endSessionTool), rawInput[approveIn](approveTool)}
}

// rawInput returns a copy of t whose input schema (t's own, or else the one
// inferred from In, as mcp.AddTool infers it) is serialized JSON. On every
// MCP 2026-07-28 tools/call the SDK serializes the tool's input schema again
// (validateParamHeaders, looking for x-mcp-header annotations): from raw
// JSON that is a copy, from a *jsonschema.Schema a reflective walk that
// took ~4% of log_step's CPU in the profile.
func rawInput[In any](t *mcp.Tool) *mcp.Tool {
	schema := t.InputSchema
	if schema == nil {
		s, err := jsonschema.For[In](nil)
		if err != nil {
			panic(fmt.Sprintf("input schema of %s: %v", t.Name, err)) // a programming error, caught by every test
		}
		schema = s
	}
	b, err := json.Marshal(schema)
	if err != nil {
		panic(fmt.Sprintf("input schema of %s: %v", t.Name, err))
	}
	tt := *t
	tt.InputSchema = json.RawMessage(b)
	return &tt
}

const version = "1.0.0"

// guard runs a tool handler so that a panic becomes a logged tool error
// instead of taking the whole process down.
func guard[In, Out any](a *app, name string, h mcp.ToolHandlerFor[In, Out]) mcp.ToolHandlerFor[In, Out] {
	return func(ctx context.Context, req *mcp.CallToolRequest, in In) (res *mcp.CallToolResult, out Out, err error) {
		defer func() {
			if p := recover(); p != nil {
				a.log.Error("tool panicked", "tool", name, "panic", p, "stack", string(debug.Stack()))
				var zero Out
				res, out, err = nil, zero, errors.New("internal error in "+name)
			}
		}()
		return h(ctx, req, in)
	}
}

// mcpTool is a tool's implementation, given who it acts for.
type mcpTool[In, Out any] func(ctx context.Context, who mcpCaller, req *mcp.CallToolRequest, in In) (*mcp.CallToolResult, Out, error)

// boundTool runs h for the caller bind finds, refusing to run without one,
// with a context that also ends when the request carrying the call does: a
// client that cancels or disconnects frees its wait at once.
func boundTool[In, Out any](bind func(context.Context) (mcpCaller, bool), h mcpTool[In, Out]) mcp.ToolHandlerFor[In, Out] {
	return func(ctx context.Context, req *mcp.CallToolRequest, in In) (*mcp.CallToolResult, Out, error) {
		who, ok := bind(ctx)
		if !ok || who.UserID == "" || who.carrier == nil {
			// Fail closed: a call that cannot say whose it is does nothing.
			var zero Out
			return nil, zero, errors.New("unauthenticated call: send Authorization: Bearer <key>")
		}
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		stop := context.AfterFunc(who.carrier, cancel)
		defer stop()
		return h(ctx, who, req, in)
	}
}

// knownAgents maps User-Agent fragments to agent types, most specific first.
var knownAgents = []struct{ fragment, agentType string }{
	{"claude-code", "claude-code"}, {"claude code", "claude-code"}, {"claude", "claude-code"},
	{"cursor", "cursor"}, {"roo-cline", "roo-cline"}, {"cline", "cline"}, {"windsurf", "windsurf"},
	{"witsy", "witsy"}, {"enconvo", "enconvo"}, {"vscode", "vscode"}, {"postman", "postman"},
}

// agentTypeOf names the agent behind a request: X-Client-Type if sent, else
// a known name in the User-Agent, else "unknown".
func agentTypeOf(r *http.Request) string {
	if t := strings.ToLower(strings.TrimSpace(cleanText(r.Header.Get("X-Client-Type")))); t != "" {
		if len(t) > 64 {
			t = t[:64]
		}
		return strings.ToValidUTF8(t, "")
	}
	ua := strings.ToLower(r.Header.Get("User-Agent"))
	for _, k := range knownAgents {
		if strings.Contains(ua, k.fragment) {
			return k.agentType
		}
	}
	return "unknown"
}

// storeToolError turns a store error into a message fit for an agent.
func (m *mcpServer) storeToolError(ctx context.Context, tool string, err error) error {
	var br *badRequest
	switch {
	case errors.As(err, &br):
		return err
	case errors.Is(err, errNotFound):
		// Someone else's session is "not found" too: never say which.
		return errors.New("session not found: agent_instance_id is unknown or not yours")
	case errors.Is(err, errShuttingDown):
		return fmt.Errorf("the server is shutting down; call %s again in a moment", tool)
	case errors.Is(err, errKeyRevoked):
		return errors.New("the API key of this call was revoked or expired: use a valid key")
	case ctx.Err() != nil:
		// The client cancelled or hung up (a query cut short then fails
		// with the driver's own error): nobody reads this, nothing failed.
		return ctx.Err()
	case isUnavailable(err):
		m.a.log.Warn("database unavailable", "tool", tool, "err", err)
		return fmt.Errorf("the database is unavailable; call %s again in a moment", tool)
	default:
		m.a.log.Error("tool failed", "tool", tool, "err", err)
		return fmt.Errorf("internal error in %s", tool)
	}
}

// optionalSession validates an optional agent_instance_id; empty makes a new one.
func optionalSession(v string) (string, error) {
	if v == "" {
		return newUUID(), nil
	}
	return uuidField("agent_instance_id", v)
}

// ---- log_step ----

var logStepTool = &mcp.Tool{
	Name: "log_step",
	Description: `Record a step you just took, so the person supervising you can follow along.

Call it after every meaningful action (read a file, ran the tests, changed code, finished a sub-task), with a short description of what you did and why. The first call may leave agent_instance_id empty: a new session is created, and you must pass the returned agent_instance_id on every later call of this session.

Returns step_number and user_feedback: messages the person sent since your last step, oldest first. Each is delivered once. If user_feedback is not empty, read it and act on it before continuing: it can change what you should do next.`,
}

type logStepIn struct {
	AgentInstanceID string `json:"agent_instance_id,omitempty" jsonschema:"the session's id (a UUID); leave empty on the first call to start a session"`
	StepDescription string `json:"step_description" jsonschema:"what you just did, in a sentence or two"`
}

type logStepOut struct {
	Success         bool     `json:"success"`
	AgentInstanceID string   `json:"agent_instance_id"`
	StepNumber      int      `json:"step_number"`
	UserFeedback    []string `json:"user_feedback"`
}

func (m *mcpServer) logStep(ctx context.Context, who mcpCaller, _ *mcp.CallToolRequest, in logStepIn) (*mcp.CallToolResult, logStepOut, error) {
	id, err := optionalSession(in.AgentInstanceID)
	if err != nil {
		return nil, logStepOut{}, err
	}
	if strings.TrimSpace(cleanText(in.StepDescription)) == "" {
		return nil, logStepOut{}, errors.New("step_description must not be empty")
	}
	res, err := m.a.store.addAgentMessage(ctx, who.UserID, agentMessage{SessionID: id, AgentType: who.agentType, Content: in.StepDescription})
	if err != nil {
		return nil, logStepOut{}, m.storeToolError(ctx, "log_step", err)
	}
	out := logStepOut{Success: true, AgentInstanceID: id, StepNumber: res.Steps, UserFeedback: contents(res.Feedback)}
	return nil, out, nil
}

func contents(ms []message) []string {
	out := make([]string, 0, len(ms))
	for _, m := range ms {
		out = append(out, m.Content)
	}
	return out
}

// ---- ask_question ----

var askQuestionTool = &mcp.Tool{
	Name: "ask_question",
	Description: `Ask the person you work for a question and wait for the answer.

Use it when you need a decision, an approval or information only they have. Give enough context that the question can be answered without looking anything up. The call blocks until the person answers.

Returns {answer, question_id, status}. status "answered": answer holds their reply; act on it. status "pending": nobody answered within this call's time limit (answer is null); the question stays open, so call ask_question again with the same agent_instance_id and exactly the same question_text to keep waiting on it: this does not ask twice, and an answer given in between is returned at once. Asking a different question replaces the open one; so does logging a new step.

It fails (isError) if the question is replaced before anyone answers ("question superseded"), if the session ends, or if nobody answers within the server's question timeout. If the result has user_feedback (messages the person sent before you asked), act on it as you would for log_step.`,
}

type askQuestionIn struct {
	AgentInstanceID string `json:"agent_instance_id" jsonschema:"the session's id (a UUID), from log_step"`
	QuestionText    string `json:"question_text" jsonschema:"the question, with the context needed to answer it"`
	// choices (issue 12)
	Options   []string `json:"options,omitempty" jsonschema:"optional: 1 to 10 distinct answers (each 1 to 200 characters) the person can pick with one tap"`
	AllowText *bool    `json:"allow_text,omitempty" jsonschema:"with options: whether the person may also answer in their own words (default true)"`
}

type askQuestionOut struct {
	Answer       *string  `json:"answer"`
	QuestionID   string   `json:"question_id"`
	Status       string   `json:"status" jsonschema:"answered or pending"`
	UserFeedback []string `json:"user_feedback,omitempty" jsonschema:"messages the person sent before the question was asked, if any"`
}

func (m *mcpServer) askQuestion(ctx context.Context, who mcpCaller, req *mcp.CallToolRequest, in askQuestionIn) (*mcp.CallToolResult, askQuestionOut, error) {
	id, err := uuidField("agent_instance_id", in.AgentInstanceID)
	if err != nil {
		return nil, askQuestionOut{}, err
	}
	if strings.TrimSpace(cleanText(in.QuestionText)) == "" {
		return nil, askQuestionOut{}, errors.New("question_text must not be empty")
	}
	options, allowText, err := checkOptions(in.Options, in.AllowText) // choices (issue 12)
	if err != nil {
		return nil, askQuestionOut{}, err
	}
	timeout := m.a.cfg.questionTimeout
	q, err := m.a.store.askQuestion(ctx, who.UserID, id, in.QuestionText, timeout, questionOptions{options, allowText}) // choices (issue 12)
	if err != nil {
		return nil, askQuestionOut{}, m.storeToolError(ctx, "ask_question", err)
	}
	// Wait for the call's limit or what is left of the question's time,
	// whichever is first; the key is re-checked while it waits.
	every, report := m.progress(ctx, req)
	var o outcome
	defer m.a.ops.metrics.answerWait()(&o.State, &o.Answer)
	err = m.a.waitAnswer(ctx, who.caller, id, q.Left, m.a.cfg.callLimit, every, report, func() (bool, error) {
		var err error
		o, err = m.a.store.questionOutcome(ctx, who.UserID, id, q, timeout, false)
		return err != nil || o.State != questionOpen, err
	})
	if err == nil && o.State == questionOpen {
		// The call returns now: it hands over the feedback queued before the
		// question, and says whether the question timed out meanwhile.
		o, err = m.a.store.questionOutcome(ctx, who.UserID, id, q, timeout, true)
	}
	if err != nil {
		return nil, askQuestionOut{}, m.storeToolError(ctx, "ask_question", err)
	}
	out := askQuestionOut{QuestionID: q.ID, UserFeedback: contents(o.Feedback)}
	switch o.State {
	case questionAnswered:
		out.Answer, out.Status = &o.Answer.Content, "answered"
		return nil, out, nil
	case questionSuperseded:
		return nil, askQuestionOut{}, errors.New("question superseded: a newer message was logged in this session before anyone answered")
	case questionEnded:
		return nil, askQuestionOut{}, errors.New("the session ended before the question was answered")
	case questionExpired:
		return nil, askQuestionOut{}, fmt.Errorf("question timed out: no answer within %s", timeout)
	}
	out.Status = "pending"
	body, _ := json.Marshal(out)
	res := &mcp.CallToolResult{Content: []mcp.Content{
		&mcp.TextContent{Text: string(body)},
		&mcp.TextContent{Text: "No answer yet. The question is still open: call ask_question again with the same agent_instance_id and exactly the same question_text to keep waiting for the answer."},
	}}
	return res, out, nil
}

// progress is how a waiting call reports progress: the wait loop runs
// report every `every` while nothing else happens (no goroutine of its own
// per waiting call). Without a progress token it reports nothing.
func (m *mcpServer) progress(ctx context.Context, req *mcp.CallToolRequest) (every time.Duration, report func() error) {
	token := req.Params.GetProgressToken()
	if token == nil {
		return 0, nil
	}
	every = cmp.Or(m.a.progressEvery, progressEvery)
	start, n := time.Now(), 0
	return every, func() error {
		n++
		err := req.Session.NotifyProgress(ctx, &mcp.ProgressNotificationParams{
			ProgressToken: token,
			Progress:      float64(n),
			Message:       fmt.Sprintf("waiting for the person's answer (%s)", time.Since(start).Round(time.Second)),
		})
		if err != nil && ctx.Err() == nil {
			m.a.log.Debug("progress notification failed", "err", err)
		}
		return nil // a lost progress notification does not end the wait
	}
}

// ---- end_session ----

var endSessionTool = &mcp.Tool{
	Name: "end_session",
	Description: `End this session: it is marked COMPLETED and the person sees that you are done.

Call it only when the work is finished and the person has confirmed that (ask with ask_question first if unsure). Ending twice is harmless. A question still waiting in this session is ended with an error.`,
}

type endSessionIn struct {
	AgentInstanceID string `json:"agent_instance_id" jsonschema:"the session's id (a UUID)"`
}

type endSessionOut struct {
	Success         bool   `json:"success"`
	AgentInstanceID string `json:"agent_instance_id"`
	FinalStatus     string `json:"final_status"`
}

func (m *mcpServer) endSession(ctx context.Context, who mcpCaller, _ *mcp.CallToolRequest, in endSessionIn) (*mcp.CallToolResult, endSessionOut, error) {
	id, err := uuidField("agent_instance_id", in.AgentInstanceID)
	if err != nil {
		return nil, endSessionOut{}, err
	}
	if err := m.a.store.endSession(ctx, who.UserID, id); err != nil {
		return nil, endSessionOut{}, m.storeToolError(ctx, "end_session", err)
	}
	return nil, endSessionOut{Success: true, AgentInstanceID: id, FinalStatus: statusCompleted}, nil
}
