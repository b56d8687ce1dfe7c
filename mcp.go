package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// mcpServer serves the three tools over Streamable HTTP (stateless: any
// replica answers any request) and over the legacy HTTP+SSE transport
// (a session per stream, so it needs sticky routing behind a balancer).
//
// Each HTTP request (each SSE stream) gets its own *mcp.Server whose tools
// close over the verified caller. Identity therefore never depends on what
// the SDK forwards to a handler (on SSE it forwards nothing).
type mcpServer struct {
	a          *app
	schemas    *mcp.SchemaCache
	streamable http.Handler
	sse        http.Handler

	mu          sync.Mutex
	sseHandlers map[string]*mcp.SSEHandler // per user: a POST can only reach its own user's streams
}

// progressEvery is how often a waiting ask_question reports progress; clients
// that reset their timeout on progress then keep waiting.
const progressEvery = 15 * time.Second

func newMCPServer(a *app) *mcpServer {
	m := &mcpServer{a: a, schemas: mcp.NewSchemaCache(), sseHandlers: map[string]*mcp.SSEHandler{}}
	m.streamable = mcp.NewStreamableHTTPHandler(m.serverFor, &mcp.StreamableHTTPOptions{
		Stateless:           true,
		MaxRequestBodyBytes: maxBody,
	})
	m.sse = http.HandlerFunc(m.serveSSE)
	return m
}

// serveSSE routes an SSE request to the caller's own SSEHandler, so a session
// id learnt by another user leads nowhere (404), and ends the stream when the
// server shuts down.
func (m *mcpServer) serveSSE(w http.ResponseWriter, r *http.Request) {
	c, _ := callerFrom(r.Context())
	m.mu.Lock()
	h := m.sseHandlers[c.UserID]
	if h == nil {
		h = mcp.NewSSEHandler(m.serverFor, &mcp.SSEOptions{MaxRequestBodyBytes: maxBody})
		m.sseHandlers[c.UserID] = h
	}
	m.mu.Unlock()
	if r.Method == http.MethodGet {
		ctx, cancel := context.WithCancel(r.Context())
		defer cancel()
		stop := context.AfterFunc(m.a.stopping, cancel)
		defer stop()
		r = r.WithContext(ctx)
	}
	h.ServeHTTP(w, r)
}

// mcpCaller is who the tools of one server act for.
type mcpCaller struct {
	userID    string
	agentType string
}

// serverFor builds the MCP server for one request, bound to its caller.
func (m *mcpServer) serverFor(r *http.Request) *mcp.Server {
	c, ok := callerFrom(r.Context())
	if !ok {
		return nil // unreachable behind requireKey; the SDK answers 400
	}
	who := mcpCaller{userID: c.UserID, agentType: agentTypeOf(r)}
	s := mcp.NewServer(&mcp.Implementation{Name: "agentline", Version: version}, &mcp.ServerOptions{
		SchemaCache: m.schemas,
		Instructions: "agentline connects you with the person you work for. Call log_step after each " +
			"meaningful step and act on any user_feedback it returns; call ask_question when you need " +
			"a decision; call end_session once the person has confirmed the work is finished.",
	})
	mcp.AddTool(s, logStepTool, guard(m.a, "log_step", func(ctx context.Context, req *mcp.CallToolRequest, in logStepIn) (*mcp.CallToolResult, logStepOut, error) {
		return m.logStep(ctx, who, in)
	}))
	mcp.AddTool(s, askQuestionTool, guard(m.a, "ask_question", func(ctx context.Context, req *mcp.CallToolRequest, in askQuestionIn) (*mcp.CallToolResult, askQuestionOut, error) {
		return m.askQuestion(ctx, who, req, in)
	}))
	mcp.AddTool(s, endSessionTool, guard(m.a, "end_session", func(ctx context.Context, req *mcp.CallToolRequest, in endSessionIn) (*mcp.CallToolResult, endSessionOut, error) {
		return m.endSession(ctx, who, in)
	}))
	return s
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

// toolError is a failed call, reported to the agent as isError with msg.
func toolError(format string, args ...any) error {
	return fmt.Errorf(format, args...)
}

// storeToolError turns a store error into a message fit for an agent.
func (m *mcpServer) storeToolError(tool string, err error) error {
	switch {
	case errors.Is(err, errNotFound):
		return toolError("session not found: agent_instance_id is unknown or not yours")
	case errors.Is(err, errShuttingDown):
		return toolError("the server is shutting down; call %s again in a moment", tool)
	case errors.Is(err, context.Canceled):
		return err
	case isUnavailable(err):
		m.a.log.Warn("database unavailable", "tool", tool, "err", err)
		return toolError("the database is unavailable; call %s again in a moment", tool)
	default:
		m.a.log.Error("tool failed", "tool", tool, "err", err)
		return toolError("internal error in %s", tool)
	}
}

// optionalSession validates an optional agent_instance_id; empty makes a new one.
func optionalSession(v string) (string, error) {
	if v == "" {
		return newUUID(), nil
	}
	return requiredSession(v)
}

func requiredSession(v string) (string, error) {
	if v == "" {
		return "", toolError("agent_instance_id is required")
	}
	id, ok := parseUUID(v)
	if !ok {
		return "", toolError("agent_instance_id must be a UUID, got %q", truncate(v, 64))
	}
	return id, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "…"
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

func (m *mcpServer) logStep(ctx context.Context, who mcpCaller, in logStepIn) (*mcp.CallToolResult, logStepOut, error) {
	id, err := optionalSession(in.AgentInstanceID)
	if err != nil {
		return nil, logStepOut{}, err
	}
	if strings.TrimSpace(in.StepDescription) == "" {
		return nil, logStepOut{}, toolError("step_description must not be empty")
	}
	res, err := m.a.store.addAgentMessage(ctx, who.userID, agentMessage{SessionID: id, AgentType: who.agentType, Content: in.StepDescription})
	if err != nil {
		return nil, logStepOut{}, m.storeToolError("log_step", err)
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

Returns {answer, question_id, status}. status "answered": answer holds their reply; act on it. status "pending": nobody answered within this call's time limit (answer is null); the question stays open, so call ask_question again with the same agent_instance_id and exactly the same question_text to keep waiting on it: this does not ask twice, and an answer given in between is returned at once. Asking a different question replaces the open one; so does logging a new step.`,
}

type askQuestionIn struct {
	AgentInstanceID string `json:"agent_instance_id" jsonschema:"the session's id (a UUID), from log_step"`
	QuestionText    string `json:"question_text" jsonschema:"the question, with the context needed to answer it"`
}

type askQuestionOut struct {
	Answer       *string  `json:"answer"`
	QuestionID   string   `json:"question_id"`
	Status       string   `json:"status" jsonschema:"answered or pending"`
	UserFeedback []string `json:"user_feedback,omitempty" jsonschema:"messages the person sent before the question was asked, if any"`
}

func (m *mcpServer) askQuestion(ctx context.Context, who mcpCaller, req *mcp.CallToolRequest, in askQuestionIn) (*mcp.CallToolResult, askQuestionOut, error) {
	id, err := requiredSession(in.AgentInstanceID)
	if err != nil {
		return nil, askQuestionOut{}, err
	}
	if strings.TrimSpace(in.QuestionText) == "" {
		return nil, askQuestionOut{}, toolError("question_text must not be empty")
	}
	q, err := m.a.store.askQuestion(ctx, who.userID, id, in.QuestionText)
	if err != nil {
		return nil, askQuestionOut{}, m.storeToolError("ask_question", err)
	}
	out := askQuestionOut{QuestionID: q.ID, UserFeedback: contents(q.Feedback)}
	if len(out.UserFeedback) == 0 {
		out.UserFeedback = nil
	}

	// How long this call waits: its own limit, but never past the question's.
	questionLeft := time.Until(q.CreatedAt.Add(m.a.cfg.questionTimeout))
	limit := m.a.cfg.callLimit
	if limit == 0 || limit > questionLeft {
		limit = questionLeft
	}
	if token := req.Params.GetProgressToken(); token != nil {
		stopProgress := m.reportProgress(ctx, req, token)
		defer stopProgress()
	}

	var state questionState
	var ans message
	done, err := m.a.wait(ctx, "s:"+id, max(limit, 0), func() (bool, error) {
		var err error
		state, ans, err = m.a.store.answer(ctx, who.userID, id, q)
		return err != nil || state != questionOpen, err
	})
	if err != nil {
		return nil, askQuestionOut{}, m.storeToolError("ask_question", err)
	}
	switch {
	case done && state == questionAnswered:
		out.Answer, out.Status = &ans.Content, "answered"
		return nil, out, nil
	case done && state == questionSuperseded:
		return nil, askQuestionOut{}, toolError("question superseded: a newer message was logged in this session before anyone answered")
	case done && state == questionEnded:
		return nil, askQuestionOut{}, toolError("the session ended before the question was answered")
	case time.Until(q.CreatedAt.Add(m.a.cfg.questionTimeout)) <= 0:
		return nil, askQuestionOut{}, toolError("question timed out: no answer within %s", m.a.cfg.questionTimeout)
	}
	out.Status = "pending"
	body, _ := json.Marshal(out)
	res := &mcp.CallToolResult{Content: []mcp.Content{
		&mcp.TextContent{Text: string(body)},
		&mcp.TextContent{Text: "No answer yet. The question is still open: call ask_question again with the same agent_instance_id and exactly the same question_text to keep waiting for the answer."},
	}}
	return res, out, nil
}

// reportProgress sends a progress notification every progressEvery until
// the returned stop is called.
func (m *mcpServer) reportProgress(ctx context.Context, req *mcp.CallToolRequest, token any) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	every := m.a.progressEvery
	if every <= 0 {
		every = progressEvery
	}
	go func() {
		defer close(done)
		t := time.NewTicker(every)
		defer t.Stop()
		start := time.Now()
		for n := 1; ; n++ {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				err := req.Session.NotifyProgress(ctx, &mcp.ProgressNotificationParams{
					ProgressToken: token,
					Progress:      float64(n),
					Message:       fmt.Sprintf("waiting for the person's answer (%s)", time.Since(start).Round(time.Second)),
				})
				if err != nil && ctx.Err() == nil {
					m.a.log.Debug("progress notification failed", "err", err)
				}
			}
		}
	}()
	return func() { cancel(); <-done }
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

func (m *mcpServer) endSession(ctx context.Context, who mcpCaller, in endSessionIn) (*mcp.CallToolResult, endSessionOut, error) {
	id, err := requiredSession(in.AgentInstanceID)
	if err != nil {
		return nil, endSessionOut{}, err
	}
	if err := m.a.store.endSession(ctx, who.userID, id); err != nil {
		return nil, endSessionOut{}, m.storeToolError("end_session", err)
	}
	return nil, endSessionOut{Success: true, AgentInstanceID: id, FinalStatus: statusCompleted}, nil
}
