package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// These tests drive the MCP tools with the real go-sdk client over the real
// HTTP server: Streamable HTTP (newest protocol and the 2025-06-18 one that
// Claude Code and the TypeScript SDK speak, at /mcp/ and /mcp) and SSE.

type mcpTTransport struct {
	name  string
	sse   bool
	path  string
	proto string // protocol version the client asks for; "" = the SDK's latest
}

var (
	mcpTStreamable = mcpTTransport{name: "streamable", path: "/mcp/"}
	mcpTStreamOld  = mcpTTransport{name: "streamable-2025-06-18", path: "/mcp/", proto: "2025-06-18"}
	mcpTNoSlash    = mcpTTransport{name: "streamable-no-slash", path: "/mcp"}
	mcpTSSE        = mcpTTransport{name: "sse", sse: true, path: "/mcp/sse"}
	// mcpTTransports is every way a client can reach the tools.
	mcpTTransports = []mcpTTransport{mcpTStreamable, mcpTStreamOld, mcpTNoSlash, mcpTSSE}
	// mcpTWaitTransports are the distinct wire behaviours of a long call.
	mcpTWaitTransports = []mcpTTransport{mcpTStreamable, mcpTStreamOld, mcpTSSE}
)

// mcpTDial is how a test client connects.
type mcpTDial struct {
	ua, clientType, host string
	progress             func(*mcp.ProgressNotificationClientRequest)
	conns                *mcpTConns // if set, records the client's TCP connections
}

// mcpTConns records TCP connections so a test can cut them (a disconnect).
type mcpTConns struct {
	mu    sync.Mutex
	conns []net.Conn
}

func (c *mcpTConns) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err == nil {
		c.mu.Lock()
		c.conns = append(c.conns, conn)
		c.mu.Unlock()
	}
	return conn, err
}

func (c *mcpTConns) closeAll() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, conn := range c.conns {
		conn.Close()
	}
}

// mcpTRT adds the bearer key and the dial's headers to every request.
type mcpTRT struct {
	key  string
	d    mcpTDial
	base http.RoundTripper
}

func (rt mcpTRT) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	if rt.key != "" {
		r.Header.Set("Authorization", "Bearer "+rt.key)
	}
	if rt.d.ua != "" {
		r.Header.Set("User-Agent", rt.d.ua)
	}
	if rt.d.clientType != "" {
		r.Header.Set("X-Client-Type", rt.d.clientType)
	}
	if rt.d.host != "" {
		r.Host = rt.d.host
	}
	return rt.base.RoundTrip(r)
}

// mcpTConnect connects a go-sdk client to e over tr with key.
func mcpTConnect(t testing.TB, e *testEnv, tr mcpTTransport, key string, d mcpTDial) *mcp.ClientSession {
	t.Helper()
	cs, err := mcpTTryConnect(e, tr, key, d)
	if err != nil {
		t.Fatalf("connect %s: %v", tr.name, err)
	}
	t.Cleanup(func() { cs.Close() })
	return cs
}

func mcpTTryConnect(e *testEnv, tr mcpTTransport, key string, d mcpTDial) (*mcp.ClientSession, error) {
	base := &http.Transport{}
	if d.conns != nil {
		base.DialContext = d.conns.dial
	}
	hc := &http.Client{Transport: mcpTRT{key: key, d: d, base: base}}
	var opts *mcp.ClientOptions
	if d.progress != nil {
		opts = &mcp.ClientOptions{ProgressNotificationHandler: func(_ context.Context, r *mcp.ProgressNotificationClientRequest) {
			d.progress(r)
		}}
	}
	c := mcp.NewClient(&mcp.Implementation{Name: "agentline-test", Version: "1"}, opts)
	var t mcp.Transport = &mcp.StreamableClientTransport{Endpoint: e.srv.URL + tr.path, HTTPClient: hc}
	if tr.sse {
		t = &mcp.SSEClientTransport{Endpoint: e.srv.URL + tr.path, HTTPClient: hc}
	}
	return c.Connect(context.Background(), t, &mcp.ClientSessionOptions{ProtocolVersion: tr.proto})
}

// mcpTCall calls a tool and fails the test on a protocol-level error.
func mcpTCall(t testing.TB, cs *mcp.ClientSession, name string, args map[string]any) *mcp.CallToolResult {
	t.Helper()
	res, err := cs.CallTool(context.Background(), &mcp.CallToolParams{Name: name, Arguments: args})
	if err != nil {
		t.Fatalf("%s(%v): %v", name, args, err)
	}
	return res
}

// mcpTText is the concatenated text content of res.
func mcpTText(res *mcp.CallToolResult) string {
	var b strings.Builder
	for _, c := range res.Content {
		if tc, ok := c.(*mcp.TextContent); ok {
			b.WriteString(tc.Text)
			b.WriteString("\n")
		}
	}
	return b.String()
}

// mcpTOut checks that res succeeded, that its first text content is the
// structured content as JSON, and returns that content.
func mcpTOut(t testing.TB, res *mcp.CallToolResult) map[string]any {
	t.Helper()
	if res.IsError {
		t.Fatalf("tool error: %s", mcpTText(res))
	}
	raw, err := json.Marshal(res.StructuredContent)
	if err != nil {
		t.Fatal(err)
	}
	structured := mustJSON(t, raw)
	if len(res.Content) == 0 {
		t.Fatal("no text content")
	}
	tc, ok := res.Content[0].(*mcp.TextContent)
	if !ok {
		t.Fatalf("first content is %T, want text", res.Content[0])
	}
	if text := mustJSON(t, []byte(tc.Text)); !reflect.DeepEqual(text, structured) {
		t.Fatalf("text content %v differs from structured content %v", text, structured)
	}
	return structured
}

// mcpTWantError checks that res is a tool error whose text contains want.
func mcpTWantError(t testing.TB, res *mcp.CallToolResult, want string) {
	t.Helper()
	if !res.IsError {
		t.Fatalf("want a tool error containing %q, got success: %s", want, mcpTText(res))
	}
	if !strings.Contains(strings.ToLower(mcpTText(res)), strings.ToLower(want)) {
		t.Fatalf("tool error %q does not contain %q", mcpTText(res), want)
	}
}

// mcpTEventually polls cond until it holds or 5 s pass.
func mcpTEventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// mcpTWaiters waits until the hub has exactly n waiters.
func mcpTWaiters(t testing.TB, e *testEnv, n int) {
	t.Helper()
	mcpTEventually(t, fmt.Sprintf("%d waiter(s) (have %d)", n, e.a.hub.waiters()), func() bool { return e.a.hub.waiters() == n })
}

// mcpTPending is a tool call running in the background.
type mcpTPending struct {
	res  *mcp.CallToolResult
	err  error
	done chan struct{}
}

func mcpTGo(ctx context.Context, cs *mcp.ClientSession, name string, args map[string]any, progressToken any) *mcpTPending {
	p := &mcpTPending{done: make(chan struct{})}
	params := &mcp.CallToolParams{Name: name, Arguments: args}
	if progressToken != nil {
		params.SetProgressToken(progressToken)
	}
	go func() {
		defer close(p.done)
		p.res, p.err = cs.CallTool(ctx, params)
	}()
	return p
}

// wait returns the call's result, failing on a protocol error or after 10 s.
func (p *mcpTPending) wait(t testing.TB) *mcp.CallToolResult {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatal("tool call did not return")
	}
	if p.err != nil {
		t.Fatalf("tool call: %v", p.err)
	}
	return p.res
}

// mcpTNewSession starts a session with a log_step and returns its id.
func mcpTNewSession(t testing.TB, cs *mcp.ClientSession) string {
	t.Helper()
	out := mcpTOut(t, mcpTCall(t, cs, "log_step", map[string]any{"step_description": "started"}))
	id, _ := out["agent_instance_id"].(string)
	if _, ok := parseUUID(id); !ok {
		t.Fatalf("log_step returned agent_instance_id %q", id)
	}
	return id
}

// mcpTAnswer posts a person's message over REST.
func mcpTAnswer(t testing.TB, e *testEnv, key, sid, text string) {
	t.Helper()
	code, body := e.call(t, "POST", "/api/v1/messages/user", key, map[string]any{"agent_instance_id": sid, "content": text, "mark_as_read": false})
	if code != http.StatusOK {
		t.Fatalf("user message: %d %s", code, body)
	}
}

// mcpTCount runs a count query.
func mcpTCount(t testing.TB, e *testEnv, query string, args ...any) int {
	t.Helper()
	var n int
	if err := e.db.QueryRow(query, args...).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func mcpTQuestions(t testing.TB, e *testEnv, sid string) int {
	t.Helper()
	return mcpTCount(t, e, `SELECT count(*) FROM messages WHERE agent_instance_id = $1 AND requires_user_input`, sid)
}

func mcpTFeedback(t testing.TB, out map[string]any) []string {
	t.Helper()
	raw, ok := out["user_feedback"].([]any)
	if !ok {
		t.Fatalf("user_feedback is %T (%v), want an array", out["user_feedback"], out["user_feedback"])
	}
	var fb []string
	for _, v := range raw {
		fb = append(fb, v.(string))
	}
	return fb
}

// ---- tools and their schemas ----

func TestMCPListTools(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopeAgent)
	want := map[string]struct{ in, out []string }{
		"log_step":     {[]string{"step_description"}, []string{"agent_instance_id", "step_number", "success", "user_feedback"}},
		"ask_question": {[]string{"agent_instance_id", "question_text"}, []string{"answer", "question_id", "status"}},
		"end_session":  {[]string{"agent_instance_id"}, []string{"agent_instance_id", "final_status", "success"}},
	}
	for _, tr := range mcpTTransports {
		t.Run(tr.name, func(t *testing.T) {
			cs := mcpTConnect(t, e, tr, key, mcpTDial{})
			if name := cs.InitializeResult().ServerInfo.Name; name != "agentline" {
				t.Errorf("server name %q, want agentline", name)
			}
			res, err := cs.ListTools(context.Background(), nil)
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, tool := range res.Tools {
				names = append(names, tool.Name)
				w, ok := want[tool.Name]
				if !ok {
					continue
				}
				if len(tool.Description) < 100 {
					t.Errorf("%s: description too short for an agent: %q", tool.Name, tool.Description)
				}
				mcpTCheckSchema(t, tool.Name+" input", tool.InputSchema, w.in)
				mcpTCheckSchema(t, tool.Name+" output", tool.OutputSchema, w.out)
			}
			sort.Strings(names)
			if !slices.Equal(names, []string{"approve", "ask_question", "end_session", "log_step"}) { // approve: issue 12
				t.Fatalf("tools %v", names)
			}
		})
	}
}

// mcpTCheckSchema checks an object schema's required properties.
func mcpTCheckSchema(t *testing.T, what string, schema any, required []string) map[string]any {
	t.Helper()
	raw, err := json.Marshal(schema)
	if err != nil {
		t.Fatal(err)
	}
	s := mustJSON(t, raw)
	if s["type"] != "object" {
		t.Errorf("%s: type %v, want object", what, s["type"])
	}
	props, _ := s["properties"].(map[string]any)
	var got []string
	for _, r := range s["required"].([]any) {
		got = append(got, r.(string))
		if _, ok := props[r.(string)]; !ok {
			t.Errorf("%s: required %q is not a property", what, r)
		}
	}
	sort.Strings(got)
	if !slices.Equal(got, required) {
		t.Errorf("%s: required %v, want %v", what, got, required)
	}
	return s
}

func TestMCPToolDescriptions(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		tool  *mcp.Tool
		words []string
	}{
		{logStepTool, []string{"user_feedback", "act on", "agent_instance_id"}},
		{askQuestionTool, []string{"blocks", "pending", "same", "again"}},
		{endSessionTool, []string{"confirmed", "COMPLETED"}},
	} {
		for _, w := range c.words {
			if !strings.Contains(c.tool.Description, w) {
				t.Errorf("%s description does not mention %q", c.tool.Name, w)
			}
		}
	}
}

func TestMCPAnswerSchemaAllowsNull(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	cs := mcpTConnect(t, e, mcpTStreamable, e.mustKey(t, "a@example.com", scopeAgent), mcpTDial{})
	res, err := cs.ListTools(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tool := range res.Tools {
		if tool.Name != "ask_question" {
			continue
		}
		raw, _ := json.Marshal(tool.OutputSchema)
		answer := mustJSON(t, raw)["properties"].(map[string]any)["answer"].(map[string]any)
		types, _ := json.Marshal(answer["type"])
		if !strings.Contains(string(types), "null") || !strings.Contains(string(types), "string") {
			t.Fatalf("answer type %s: want string or null", types)
		}
	}
}

// ---- each tool's success result ----

func TestMCPToolResults(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopeAgent)
	for _, tr := range mcpTTransports {
		t.Run(tr.name, func(t *testing.T) {
			cs := mcpTConnect(t, e, tr, key, mcpTDial{})
			out := mcpTOut(t, mcpTCall(t, cs, "log_step", map[string]any{"step_description": "read main.go"}))
			sid := out["agent_instance_id"].(string)
			if out["success"] != true || out["step_number"] != float64(1) || len(mcpTFeedback(t, out)) != 0 {
				t.Fatalf("first log_step: %v", out)
			}
			// A client-chosen new id creates a session with that id.
			mine := newUUID()
			out = mcpTOut(t, mcpTCall(t, cs, "log_step", map[string]any{"agent_instance_id": strings.ToUpper(mine), "step_description": "x"}))
			if out["agent_instance_id"] != mine || out["step_number"] != float64(1) {
				t.Fatalf("log_step with a new id: %v", out)
			}
			out = mcpTOut(t, mcpTCall(t, cs, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "ran tests"}))
			if out["agent_instance_id"] != sid || out["step_number"] != float64(2) {
				t.Fatalf("second log_step: %v", out)
			}

			p := mcpTGo(context.Background(), cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Deploy now?"}, nil)
			mcpTWaiters(t, e, 1)
			var status string
			e.db.QueryRow(`SELECT status FROM agent_instances WHERE id = $1`, sid).Scan(&status)
			if status != statusAwaitingInput {
				t.Errorf("status while asking = %s", status)
			}
			mcpTAnswer(t, e, key, sid, "yes, deploy")
			out = mcpTOut(t, p.wait(t))
			var qid string
			e.db.QueryRow(`SELECT id FROM messages WHERE agent_instance_id = $1 AND requires_user_input`, sid).Scan(&qid)
			if out["answer"] != "yes, deploy" || out["status"] != "answered" || out["question_id"] != qid {
				t.Fatalf("ask_question: %v (question %s)", out, qid)
			}
			if _, extra := out["user_feedback"]; extra {
				t.Errorf("user_feedback present with no feedback: %v", out)
			}
			// The answer was handed to the call: not again as feedback.
			out = mcpTOut(t, mcpTCall(t, cs, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "deployed"}))
			if fb := mcpTFeedback(t, out); len(fb) != 0 || out["step_number"] != float64(3) {
				t.Fatalf("log_step after the answer: %v", out)
			}

			out = mcpTOut(t, mcpTCall(t, cs, "end_session", map[string]any{"agent_instance_id": sid}))
			want := map[string]any{"success": true, "agent_instance_id": sid, "final_status": "COMPLETED"}
			if !reflect.DeepEqual(out, want) {
				t.Fatalf("end_session: %v", out)
			}
			// Twice is fine.
			if out := mcpTOut(t, mcpTCall(t, cs, "end_session", map[string]any{"agent_instance_id": sid})); !reflect.DeepEqual(out, want) {
				t.Fatalf("second end_session: %v", out)
			}
			e.db.QueryRow(`SELECT status FROM agent_instances WHERE id = $1`, sid).Scan(&status)
			if status != statusCompleted {
				t.Fatalf("status after end_session = %s", status)
			}
		})
	}
}

// Feedback queued before a question is asked is handed to that call, not lost.
func TestMCPAskReturnsQueuedFeedback(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopeAgent)
	cs := mcpTConnect(t, e, mcpTStreamable, key, mcpTDial{})
	sid := mcpTNewSession(t, cs)
	mcpTAnswer(t, e, key, sid, "use the staging db")
	p := mcpTGo(context.Background(), cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Which db?"}, nil)
	mcpTWaiters(t, e, 1)
	mcpTAnswer(t, e, key, sid, "staging")
	out := mcpTOut(t, p.wait(t))
	if out["answer"] != "staging" || !slices.Equal(mcpTFeedback(t, out), []string{"use the staging db"}) {
		t.Fatalf("ask_question: %v", out)
	}
}

// ---- agent type ----

func TestMCPAgentType(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopeAgent)
	for _, c := range []struct {
		name string
		d    mcpTDial
		want string
	}{
		{"x-client-type", mcpTDial{clientType: "My-Agent", ua: "claude-code/1.0"}, "my-agent"},
		{"claude-code ua", mcpTDial{ua: "claude-code/1.0.61 (external, cli)"}, "claude-code"},
		{"cursor ua", mcpTDial{ua: "Cursor/1.2.4"}, "cursor"},
		{"cline ua", mcpTDial{ua: "Cline/3.1"}, "cline"},
		{"windsurf ua", mcpTDial{ua: "windsurf-mcp/0.3"}, "windsurf"},
		{"unknown ua", mcpTDial{ua: "Go-http-client/1.1"}, "unknown"},
		{"blank x-client-type", mcpTDial{clientType: "   ", ua: "Cursor/1"}, "cursor"},
		{"non-ascii x-client-type", mcpTDial{clientType: "Ägent Ünï"}, "ägent ünï"},
	} {
		for _, tr := range []mcpTTransport{mcpTStreamable, mcpTSSE} {
			t.Run(c.name+"/"+tr.name, func(t *testing.T) {
				cs := mcpTConnect(t, e, tr, key, c.d)
				sid := mcpTNewSession(t, cs)
				var name string
				err := e.db.QueryRow(`
					SELECT ua.name FROM agent_instances a JOIN user_agents ua ON ua.id = a.user_agent_id
					WHERE a.id = $1`, sid).Scan(&name)
				if err != nil || name != c.want {
					t.Fatalf("agent type %q (%v), want %q", name, err, c.want)
				}
			})
		}
	}
	// One user_agents row per user and name, however many sessions.
	if n := mcpTCount(t, e, `SELECT count(*) FROM user_agents WHERE name = 'cursor'`); n != 1 {
		t.Fatalf("%d cursor rows", n)
	}
}

// ---- feedback ----

func TestMCPFeedback(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopeAgent)
	for _, tr := range []mcpTTransport{mcpTStreamable, mcpTSSE} {
		t.Run(tr.name, func(t *testing.T) {
			cs := mcpTConnect(t, e, tr, key, mcpTDial{})
			sid := mcpTNewSession(t, cs)
			mcpTAnswer(t, e, key, sid, "first: look at the tests")
			mcpTAnswer(t, e, key, sid, "second: <b>and</b> \"quotes\"\nnew line")
			out := mcpTOut(t, mcpTCall(t, cs, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "next"}))
			want := []string{"first: look at the tests", "second: <b>and</b> \"quotes\"\nnew line"}
			if fb := mcpTFeedback(t, out); !slices.Equal(fb, want) {
				t.Fatalf("feedback %q, want %q", fb, want)
			}
			out = mcpTOut(t, mcpTCall(t, cs, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "again"}))
			if fb := mcpTFeedback(t, out); len(fb) != 0 {
				t.Fatalf("feedback delivered twice: %q", fb)
			}
			// mark_as_read true (the default) is not feedback.
			code, body := e.call(t, "POST", "/api/v1/messages/user", key, map[string]any{"agent_instance_id": sid, "content": "read"})
			if code != 200 {
				t.Fatalf("%d %s", code, body)
			}
			out = mcpTOut(t, mcpTCall(t, cs, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "more"}))
			if fb := mcpTFeedback(t, out); len(fb) != 0 {
				t.Fatalf("read message delivered as feedback: %q", fb)
			}
		})
	}
}

// ---- questions: superseded, ended, bad input ----

func TestMCPSuperseded(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopeAgent)
	for _, tr := range mcpTWaitTransports {
		t.Run(tr.name, func(t *testing.T) {
			cs := mcpTConnect(t, e, tr, key, mcpTDial{})
			other := mcpTConnect(t, e, tr, key, mcpTDial{})
			sid := mcpTNewSession(t, cs)
			p := mcpTGo(context.Background(), cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "A or B?"}, nil)
			mcpTWaiters(t, e, 1)
			mcpTOut(t, mcpTCall(t, other, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "went ahead with A"}))
			mcpTWantError(t, p.wait(t), "question superseded")
			mcpTWaiters(t, e, 0)
			// A different question supersedes too.
			p = mcpTGo(context.Background(), cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "C or D?"}, nil)
			mcpTWaiters(t, e, 1)
			p2 := mcpTGo(context.Background(), other, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "E or F?"}, nil)
			mcpTWantError(t, p.wait(t), "question superseded")
			mcpTWaiters(t, e, 1)
			mcpTAnswer(t, e, key, sid, "F")
			if out := mcpTOut(t, p2.wait(t)); out["answer"] != "F" {
				t.Fatalf("newer question: %v", out)
			}
		})
	}
}

func TestMCPEndWhileAsking(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopeAgent)
	for _, tr := range mcpTWaitTransports {
		t.Run(tr.name, func(t *testing.T) {
			cs := mcpTConnect(t, e, tr, key, mcpTDial{})
			sid := mcpTNewSession(t, cs)
			mcpTAnswer(t, e, key, sid, "queued feedback")
			p := mcpTGo(context.Background(), cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Shall I go on?"}, nil)
			mcpTWaiters(t, e, 1)
			mcpTOut(t, mcpTCall(t, cs, "end_session", map[string]any{"agent_instance_id": sid}))
			res := p.wait(t)
			mcpTWantError(t, res, "session ended")
			// Feedback queued before the question is not lost with the
			// error: the next step gets it.
			out := mcpTOut(t, mcpTCall(t, cs, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "after the end"}))
			if fb := mcpTFeedback(t, out); !slices.Equal(fb, []string{"queued feedback"}) {
				t.Errorf("feedback after the error: %q", fb)
			}
			mcpTOut(t, mcpTCall(t, cs, "end_session", map[string]any{"agent_instance_id": sid}))
			// Asking in an ended session ends at once with the same error.
			mcpTWantError(t, mcpTCall(t, cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "still there?"}), "session ended")
			mcpTWaiters(t, e, 0)
		})
	}
}

func TestMCPBadArguments(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopeAgent)
	for _, tr := range []mcpTTransport{mcpTStreamable, mcpTSSE} {
		t.Run(tr.name, func(t *testing.T) {
			cs := mcpTConnect(t, e, tr, key, mcpTDial{})
			sid := mcpTNewSession(t, cs)
			unknown := newUUID()
			for _, c := range []struct {
				tool string
				args map[string]any
				want string
			}{
				{"log_step", map[string]any{"agent_instance_id": "not-a-uuid", "step_description": "x"}, "UUID"},
				{"log_step", map[string]any{"agent_instance_id": sid, "step_description": ""}, "step_description"},
				{"log_step", map[string]any{"agent_instance_id": sid, "step_description": " \n\t"}, "step_description"},
				{"log_step", map[string]any{"agent_instance_id": sid}, "step_description"},
				{"log_step", map[string]any{}, "step_description"},
				{"log_step", nil, "step_description"},
				{"log_step", map[string]any{"step_description": 42}, "step_description"},
				{"log_step", map[string]any{"agent_instance_id": 7, "step_description": "x"}, "agent_instance_id"},
				{"ask_question", map[string]any{"agent_instance_id": sid}, "question_text"},
				{"ask_question", map[string]any{"question_text": "q?"}, "agent_instance_id"},
				{"ask_question", map[string]any{"agent_instance_id": "", "question_text": "q?"}, "agent_instance_id"},
				{"ask_question", map[string]any{"agent_instance_id": "123", "question_text": "q?"}, "UUID"},
				{"ask_question", map[string]any{"agent_instance_id": sid, "question_text": "  "}, "question_text"},
				{"ask_question", map[string]any{"agent_instance_id": unknown, "question_text": "q?"}, "not found"},
				{"end_session", map[string]any{}, "agent_instance_id"},
				{"end_session", map[string]any{"agent_instance_id": "zzz"}, "UUID"},
				{"end_session", map[string]any{"agent_instance_id": unknown}, "not found"},
			} {
				mcpTWantError(t, mcpTCall(t, cs, c.tool, c.args), c.want)
			}
			// The connection survived all of that, and nothing was created.
			mcpTOut(t, mcpTCall(t, cs, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "still here"}))
			if n := mcpTCount(t, e, `SELECT count(*) FROM agent_instances WHERE id = $1`, unknown); n != 0 {
				t.Fatalf("unknown session created")
			}
			if n := mcpTQuestions(t, e, sid); n != 0 {
				t.Fatalf("%d questions stored by bad calls", n)
			}
		})
	}
}

// NUL bytes and invalid UTF-8 are cleaned, not a crash.
func TestMCPOddText(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopeAgent)
	cs := mcpTConnect(t, e, mcpTStreamable, key, mcpTDial{})
	out := mcpTOut(t, mcpTCall(t, cs, "log_step", map[string]any{"step_description": "a\x00b <script>"}))
	var content string
	e.db.QueryRow(`SELECT content FROM messages WHERE agent_instance_id = $1`, out["agent_instance_id"]).Scan(&content)
	if content != "ab <script>" {
		t.Fatalf("stored %q", content)
	}
	// Text that is empty once cleaned is refused, not stored empty.
	sid := out["agent_instance_id"].(string)
	mcpTWantError(t, mcpTCall(t, cs, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "\x00\x00"}), "empty")
	mcpTWantError(t, mcpTCall(t, cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": " \x00 "}), "empty")
	if n := mcpTQuestions(t, e, sid); n != 0 {
		t.Fatalf("%d questions stored from NUL-only text", n)
	}
}

// ---- progress ----

func TestMCPProgress(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, func(a *app) { a.progressEvery = 100 * time.Millisecond })
	key := e.mustKey(t, "a@example.com", scopeAgent)
	for _, tr := range mcpTWaitTransports {
		t.Run(tr.name, func(t *testing.T) {
			var got atomic.Int64
			var badToken atomic.Value
			cs := mcpTConnect(t, e, tr, key, mcpTDial{progress: func(r *mcp.ProgressNotificationClientRequest) {
				if tok := fmt.Sprint(r.Params.ProgressToken); tok != "tok-"+tr.name {
					badToken.Store(tok)
				}
				got.Add(1)
			}})
			sid := mcpTNewSession(t, cs)
			p := mcpTGo(context.Background(), cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Progress?"}, "tok-"+tr.name)
			mcpTEventually(t, "3 progress notifications", func() bool { return got.Load() >= 3 })
			mcpTAnswer(t, e, key, sid, "done")
			if out := mcpTOut(t, p.wait(t)); out["answer"] != "done" {
				t.Fatalf("ask_question: %v", out)
			}
			if v := badToken.Load(); v != nil {
				t.Fatalf("progress with token %v", v)
			}
			// No progress without a token.
			got.Store(0)
			p = mcpTGo(context.Background(), cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Quiet?"}, nil)
			mcpTWaiters(t, e, 1)
			time.Sleep(350 * time.Millisecond)
			mcpTAnswer(t, e, key, sid, "yes")
			p.wait(t)
			if n := got.Load(); n != 0 {
				t.Fatalf("%d progress notifications without a token", n)
			}
		})
	}
}

// ---- the per-call limit and resuming ----

func TestMCPCallLimit(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, func(a *app) { a.cfg.callLimit = 300 * time.Millisecond })
	key := e.mustKey(t, "a@example.com", scopeAgent)
	for _, tr := range mcpTWaitTransports {
		t.Run(tr.name, func(t *testing.T) {
			cs := mcpTConnect(t, e, tr, key, mcpTDial{})
			sid := mcpTNewSession(t, cs)
			ask := map[string]any{"agent_instance_id": sid, "question_text": "Which port?"}

			res := mcpTCall(t, cs, "ask_question", ask)
			out := mcpTOut(t, res)
			qid, _ := out["question_id"].(string)
			if v, ok := out["answer"]; !ok || v != nil || out["status"] != "pending" || qid == "" {
				t.Fatalf("after the call limit: %v", out)
			}
			if !strings.Contains(mcpTText(res), "call ask_question again") {
				t.Fatalf("pending result does not say to call again: %s", mcpTText(res))
			}
			mcpTWaiters(t, e, 0)

			// Same text again: the same question, still one stored.
			out = mcpTOut(t, mcpTCall(t, cs, "ask_question", ask))
			if out["status"] != "pending" || out["question_id"] != qid {
				t.Fatalf("re-ask: %v, want pending %s", out, qid)
			}
			if n := mcpTQuestions(t, e, sid); n != 1 {
				t.Fatalf("%d questions stored, want 1", n)
			}

			// Answered while no call waits: the re-ask returns it.
			mcpTAnswer(t, e, key, sid, "8080")
			out = mcpTOut(t, mcpTCall(t, cs, "ask_question", ask))
			if out["status"] != "answered" || out["answer"] != "8080" || out["question_id"] != qid {
				t.Fatalf("re-ask after the answer: %v", out)
			}
			// Asked again with no step in between (a client that lost the
			// result): the same answer again, no new question.
			out = mcpTOut(t, mcpTCall(t, cs, "ask_question", ask))
			if out["status"] != "answered" || out["answer"] != "8080" || out["question_id"] != qid {
				t.Fatalf("re-ask after the answer was returned: %v", out)
			}
			// After a step the same text is a new question.
			mcpTOut(t, mcpTCall(t, cs, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "set the port"}))
			ask2 := map[string]any{"agent_instance_id": sid, "question_text": "Which port?"}
			out = mcpTOut(t, mcpTCall(t, cs, "ask_question", ask2))
			q2, _ := out["question_id"].(string)
			if out["status"] != "pending" || q2 == qid {
				t.Fatalf("asking again after an answer: %v", out)
			}
			// Answered while the re-ask waits.
			p := mcpTGo(context.Background(), cs, "ask_question", ask2, nil)
			mcpTWaiters(t, e, 1)
			mcpTAnswer(t, e, key, sid, "9090")
			out = mcpTOut(t, p.wait(t))
			if out["status"] != "answered" || out["answer"] != "9090" || out["question_id"] != q2 {
				t.Fatalf("answered during the re-ask: %v", out)
			}
			if n := mcpTQuestions(t, e, sid); n != 2 {
				t.Fatalf("%d questions stored, want 2", n)
			}
		})
	}
}

// A pending question nobody picks up reaches the next log_step as feedback.
func TestMCPPendingAnswerBecomesFeedback(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, func(a *app) { a.cfg.callLimit = 200 * time.Millisecond })
	key := e.mustKey(t, "a@example.com", scopeAgent)
	cs := mcpTConnect(t, e, mcpTStreamable, key, mcpTDial{})
	sid := mcpTNewSession(t, cs)
	if out := mcpTOut(t, mcpTCall(t, cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Q?"})); out["status"] != "pending" {
		t.Fatalf("%v", out)
	}
	mcpTAnswer(t, e, key, sid, "late answer")
	out := mcpTOut(t, mcpTCall(t, cs, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "moved on"}))
	if fb := mcpTFeedback(t, out); !slices.Equal(fb, []string{"late answer"}) {
		t.Fatalf("feedback %q", fb)
	}
}

func TestMCPQuestionTimeout(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, func(a *app) {
		a.cfg.callLimit = 300 * time.Millisecond
		a.cfg.questionTimeout = 500 * time.Millisecond
	})
	key := e.mustKey(t, "a@example.com", scopeAgent)
	for _, tr := range mcpTWaitTransports {
		t.Run(tr.name, func(t *testing.T) {
			cs := mcpTConnect(t, e, tr, key, mcpTDial{})
			sid := mcpTNewSession(t, cs)
			ask := map[string]any{"agent_instance_id": sid, "question_text": "Anyone?"}
			out := mcpTOut(t, mcpTCall(t, cs, "ask_question", ask))
			qid := out["question_id"]
			if out["status"] != "pending" {
				t.Fatalf("first call: %v", out)
			}
			// The re-ask waits only for what is left of the question's time.
			mcpTWantError(t, mcpTCall(t, cs, "ask_question", ask), "timed out")
			mcpTWaiters(t, e, 0)
			// A late answer is still returned to a re-ask.
			mcpTAnswer(t, e, key, sid, "late")
			out = mcpTOut(t, mcpTCall(t, cs, "ask_question", ask))
			if out["answer"] != "late" || out["question_id"] != qid {
				t.Fatalf("re-ask after a late answer: %v (question %v)", out, qid)
			}

			// With no answer at all, asking again after the timeout is a
			// new question, not an immediate timeout for ever.
			ask = map[string]any{"agent_instance_id": sid, "question_text": "Anyone else?"}
			out = mcpTOut(t, mcpTCall(t, cs, "ask_question", ask))
			qid = out["question_id"]
			mcpTWantError(t, mcpTCall(t, cs, "ask_question", ask), "timed out")
			p := mcpTGo(context.Background(), cs, "ask_question", ask, nil)
			// The call first checks the old question once, then asks anew.
			mcpTEventually(t, "the new question", func() bool { return mcpTQuestions(t, e, sid) == 3 })
			mcpTWaiters(t, e, 1)
			mcpTAnswer(t, e, key, sid, "me")
			out = mcpTOut(t, p.wait(t))
			if out["answer"] != "me" || out["question_id"] == qid || out["question_id"] == "" {
				t.Fatalf("asking after a timeout: %v (old question %v)", out, qid)
			}
		})
	}
	t.Run("no call limit", func(t *testing.T) {
		e := newTestEnv(t, func(a *app) {
			a.cfg.callLimit = 0
			a.cfg.questionTimeout = 300 * time.Millisecond
		})
		cs := mcpTConnect(t, e, mcpTStreamable, e.mustKey(t, "b@example.com", scopeAgent), mcpTDial{})
		sid := mcpTNewSession(t, cs)
		mcpTWantError(t, mcpTCall(t, cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "?"}), "timed out")
	})
}

// ---- cancellation and disconnection ----

func TestMCPCancel(t *testing.T) {
	t.Parallel()
	for _, tr := range mcpTWaitTransports {
		for _, how := range []string{"cancel", "close", "disconnect"} {
			t.Run(tr.name+"/"+how, func(t *testing.T) {
				e := newTestEnv(t) // its own, so a leftover waiter fails only this case
				key := e.mustKey(t, "a@example.com", scopeAgent)
				conns := &mcpTConns{}
				cs := mcpTConnect(t, e, tr, key, mcpTDial{conns: conns})
				sid := mcpTNewSession(t, cs)
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				p := mcpTGo(ctx, cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Wait for me?"}, "tok")
				mcpTWaiters(t, e, 1)
				switch how {
				case "cancel":
					cancel()
				case "close":
					// The go-sdk client's Close waits for calls in flight, so
					// a client shutting down cancels them, then closes.
					cancel()
					closed := make(chan struct{})
					go func() { cs.Close(); close(closed) }()
					select {
					case <-closed:
					case <-time.After(5 * time.Second):
						t.Fatal("closing the client session hung")
					}
				case "disconnect":
					// The client process dies: its connections drop.
					conns.closeAll()
				}
				mcpTWaiters(t, e, 0)
				select {
				case <-p.done:
				case <-time.After(5 * time.Second):
					t.Fatal("the cancelled call did not return")
				}
				if p.err == nil && !p.res.IsError {
					t.Fatalf("cancelled call succeeded: %s", mcpTText(p.res))
				}
				// The session stays usable, and a later answer is feedback.
				cs2 := mcpTConnect(t, e, tr, key, mcpTDial{})
				mcpTOut(t, mcpTCall(t, cs2, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "back"}))
				mcpTAnswer(t, e, key, sid, "answer after the cancel")
				out := mcpTOut(t, mcpTCall(t, cs2, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "again"}))
				if fb := mcpTFeedback(t, out); !slices.Equal(fb, []string{"answer after the cancel"}) {
					t.Fatalf("feedback %q", fb)
				}
			})
		}
	}
}

// ---- tenant isolation ----

func TestMCPTenantIsolation(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	keyA := e.mustKey(t, "a@example.com", scopeAgent)
	keyB := e.mustKey(t, "b@example.com", scopeAgent)
	for _, tr := range []mcpTTransport{mcpTStreamable, mcpTSSE} {
		t.Run(tr.name, func(t *testing.T) {
			a := mcpTConnect(t, e, tr, keyA, mcpTDial{})
			b := mcpTConnect(t, e, tr, keyB, mcpTDial{})
			sid := mcpTNewSession(t, a)
			mcpTAnswer(t, e, keyA, sid, "for A only")
			p := mcpTGo(context.Background(), a, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "A's question"}, nil)
			mcpTWaiters(t, e, 1)
			before := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE agent_instance_id = $1`, sid)
			for _, c := range []struct {
				tool string
				args map[string]any
			}{
				{"log_step", map[string]any{"agent_instance_id": sid, "step_description": "B was here"}},
				{"ask_question", map[string]any{"agent_instance_id": sid, "question_text": "B's question"}},
				{"end_session", map[string]any{"agent_instance_id": sid}},
			} {
				mcpTWantError(t, mcpTCall(t, b, c.tool, c.args), "not found")
			}
			if after := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE agent_instance_id = $1`, sid); after != before {
				t.Fatalf("B changed A's session: %d → %d messages", before, after)
			}
			if code, _ := e.call(t, "POST", "/api/v1/messages/user", keyB, map[string]any{"agent_instance_id": sid, "content": "B answers"}); code != http.StatusNotFound {
				t.Fatalf("B answering A's question: %d", code)
			}
			// A's question still waits and gets A's answer.
			mcpTAnswer(t, e, keyA, sid, "A answers")
			out := mcpTOut(t, p.wait(t))
			if out["answer"] != "A answers" || !slices.Equal(mcpTFeedback(t, out), []string{"for A only"}) {
				t.Fatalf("A's question: %v", out)
			}
			var status string
			e.db.QueryRow(`SELECT status FROM agent_instances WHERE id = $1`, sid).Scan(&status)
			if status != statusActive {
				t.Fatalf("A's session status %s", status)
			}
		})
	}
}

// mcpTSSEStream is a raw SSE stream: its events, one per channel value.
type mcpTSSEStream struct {
	events chan [2]string // event name, data
	resp   *http.Response
}

func mcpTOpenSSE(t *testing.T, e *testEnv, key string) *mcpTSSEStream {
	t.Helper()
	req, _ := http.NewRequest("GET", e.srv.URL+"/mcp/sse", nil)
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		t.Fatalf("open SSE: %d", resp.StatusCode)
	}
	s := &mcpTSSEStream{events: make(chan [2]string, 16), resp: resp}
	t.Cleanup(func() { resp.Body.Close() })
	go func() {
		defer close(s.events)
		sc := bufio.NewScanner(resp.Body)
		var name, data string
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "event:"):
				name = strings.TrimSpace(strings.TrimPrefix(line, "event:"))
			case strings.HasPrefix(line, "data:"):
				data += strings.TrimSpace(strings.TrimPrefix(line, "data:"))
			case line == "":
				if name != "" || data != "" {
					s.events <- [2]string{name, data}
				}
				name, data = "", ""
			}
		}
	}()
	return s
}

func (s *mcpTSSEStream) next(t *testing.T, within time.Duration) ([2]string, bool) {
	t.Helper()
	select {
	case ev, ok := <-s.events:
		return ev, ok
	case <-time.After(within):
		return [2]string{}, false
	}
}

func mcpTPostRPC(t *testing.T, e *testEnv, endpoint, key, body string) int {
	t.Helper()
	req, _ := http.NewRequest("POST", e.srv.URL+endpoint, strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// User B cannot post into user A's SSE session, even knowing its id.
func TestMCPSSESessionIsolation(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	keyA := e.mustKey(t, "a@example.com", scopeAgent)
	keyB := e.mustKey(t, "b@example.com", scopeAgent)
	s := mcpTOpenSSE(t, e, keyA)
	ev, ok := s.next(t, 5*time.Second)
	if !ok || ev[0] != "endpoint" || !strings.Contains(ev[1], "sessionid=") {
		t.Fatalf("first event %v", ev)
	}
	endpoint := ev[1]

	initialize := `{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}`
	call := `{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"log_step","arguments":{"step_description":"injected by B"}}}`

	// B, with a valid key of its own, cannot reach A's stream.
	if code := mcpTPostRPC(t, e, endpoint, keyB, initialize); code != http.StatusNotFound {
		t.Fatalf("B's initialize into A's SSE session: %d, want 404", code)
	}
	if code := mcpTPostRPC(t, e, endpoint, keyB, call); code != http.StatusNotFound {
		t.Fatalf("B's tools/call into A's SSE session: %d, want 404", code)
	}
	if ev, ok := s.next(t, 300*time.Millisecond); ok {
		t.Fatalf("A's stream got %v after B's posts", ev)
	}
	// A can: the endpoint is real, so the 404s above meant something.
	if code := mcpTPostRPC(t, e, endpoint, keyA, initialize); code != http.StatusAccepted {
		t.Fatalf("A's initialize: %d", code)
	}
	if ev, ok := s.next(t, 5*time.Second); !ok || ev[0] != "message" || !strings.Contains(ev[1], `"id":1`) {
		t.Fatalf("A's initialize answer: %v", ev)
	}
	mcpTPostRPC(t, e, endpoint, keyA, `{"jsonrpc":"2.0","method":"notifications/initialized","params":{}}`)
	if code := mcpTPostRPC(t, e, endpoint, keyB, call); code != http.StatusNotFound {
		t.Fatalf("B's tools/call into A's initialized SSE session: %d", code)
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM messages`); n != 0 {
		t.Fatalf("%d messages stored", n)
	}
	// Without a key: 401 before any lookup.
	req, _ := http.NewRequest("POST", e.srv.URL+endpoint, strings.NewReader(call))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("keyless post: %d", resp.StatusCode)
	}
}

// ---- authentication ----

func TestMCPUnauthorized(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	for _, c := range []struct{ method, path, key string }{
		{"POST", "/mcp/", ""},
		{"POST", "/mcp", ""},
		{"GET", "/mcp/", ""},
		{"GET", "/mcp/sse", ""},
		{"POST", "/mcp/sse?sessionid=x", ""},
		{"POST", "/mcp/", "not.a.key"},
		{"GET", "/mcp/sse", "not.a.key"},
	} {
		req, _ := http.NewRequest(c.method, e.srv.URL+c.path, strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"tools/list"}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Accept", "application/json, text/event-stream")
		if c.key != "" {
			req.Header.Set("Authorization", "Bearer "+c.key)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer") {
			t.Errorf("%s %s key=%q: %d, WWW-Authenticate %q", c.method, c.path, c.key, resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}
	}
	for _, tr := range []mcpTTransport{mcpTStreamable, mcpTSSE} {
		if cs, err := mcpTTryConnect(e, tr, "", mcpTDial{}); err == nil {
			cs.Close()
			t.Errorf("%s: connected without a key", tr.name)
		}
	}
}

// A reverse proxy on the same host sends its public Host header: the bearer
// key, not the Host, is what protects MCP.
func TestMCPBehindProxyHost(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopeAgent)
	for _, tr := range []mcpTTransport{mcpTStreamable, mcpTSSE} {
		cs := mcpTConnect(t, e, tr, key, mcpTDial{host: "agentline.example.com"})
		mcpTNewSession(t, cs)
	}
}

// ---- panics and shutdown ----

func TestMCPGuardPanic(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	var calls atomic.Int64
	s := mcp.NewServer(&mcp.Implementation{Name: "boom", Version: "1"}, nil)
	mcp.AddTool(s, &mcp.Tool{Name: "boom"}, guard(e.a, "boom", func(ctx context.Context, req *mcp.CallToolRequest, in struct{}) (*mcp.CallToolResult, struct{}, error) {
		if calls.Add(1) == 1 {
			panic("a bug in a tool")
		}
		return nil, struct{}{}, nil
	}))
	h := mcp.NewStreamableHTTPHandler(func(*http.Request) *mcp.Server { return s }, &mcp.StreamableHTTPOptions{Stateless: true})
	srv := &http.Server{Handler: h}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	c := mcp.NewClient(&mcp.Implementation{Name: "t", Version: "1"}, nil)
	cs, err := c.Connect(context.Background(), &mcp.StreamableClientTransport{Endpoint: "http://" + ln.Addr().String()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	mcpTWantError(t, mcpTCall(t, cs, "boom", nil), "internal error in boom")
	if strings.Contains(mcpTText(mcpTCall(t, cs, "boom", nil)), "internal") {
		t.Fatal("second call failed: the server did not keep serving")
	}
	if !strings.Contains(e.logs.String(), "tool panicked") {
		t.Fatalf("panic not logged:\n%s", e.logs.String())
	}
}

func TestMCPShutdownEndsWait(t *testing.T) {
	t.Parallel()
	for _, tr := range mcpTWaitTransports {
		t.Run(tr.name, func(t *testing.T) {
			e := newTestEnv(t)
			key := e.mustKey(t, "a@example.com", scopeAgent)
			cs := mcpTConnect(t, e, tr, key, mcpTDial{})
			sid := mcpTNewSession(t, cs)
			p := mcpTGo(context.Background(), cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Before you go?"}, nil)
			mcpTWaiters(t, e, 1)
			e.stop()
			select {
			case <-p.done:
			case <-time.After(5 * time.Second):
				t.Fatal("shutdown did not end the wait")
			}
			mcpTWaiters(t, e, 0)
			if p.err != nil {
				t.Fatalf("protocol error instead of a tool error: %v", p.err)
			}
			mcpTWantError(t, p.res, "shutting down")
			if tr.sse {
				// Then the stream closes, so the server can stop.
				mcpTEventually(t, "the SSE stream to close", func() bool {
					_, err := cs.CallTool(context.Background(), &mcp.CallToolParams{Name: "log_step", Arguments: map[string]any{"step_description": "x"}})
					return err != nil
				})
			}
		})
	}
}

// ---- identity on the shared Streamable HTTP server ----

// A tool that cannot tell whose call it is refuses to run.
func TestMCPBoundToolFailsClosed(t *testing.T) {
	t.Parallel()
	ran := false
	h := func(ctx context.Context, who mcpCaller, req *mcp.CallToolRequest, in struct{}) (*mcp.CallToolResult, struct{}, error) {
		ran = true
		return nil, struct{}{}, nil
	}
	for name, bind := range map[string]func(context.Context) (mcpCaller, bool){
		"no caller":  func(context.Context) (mcpCaller, bool) { return mcpCaller{}, false },
		"no user":    func(context.Context) (mcpCaller, bool) { return mcpCaller{carrier: context.Background()}, true },
		"no carrier": func(context.Context) (mcpCaller, bool) { return mcpCaller{caller: caller{UserID: newUUID()}}, true },
	} {
		if _, _, err := boundTool(bind, h)(context.Background(), nil, struct{}{}); err == nil || ran {
			t.Errorf("%s: ran=%v err=%v", name, ran, err)
		}
	}
	ok := func(context.Context) (mcpCaller, bool) {
		return mcpCaller{caller: caller{UserID: newUUID()}, carrier: context.Background()}, true
	}
	if _, _, err := boundTool(ok, h)(context.Background(), nil, struct{}{}); err != nil || !ran {
		t.Fatalf("with a caller: ran=%v err=%v", ran, err)
	}
}

// Many users calling at once through the one shared server: every step
// lands in its own caller's session, never another's.
func TestMCPConcurrentUsers(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	const users, clientsPerUser, steps = 3, 3, 8
	type client struct {
		userID string
		cs     *mcp.ClientSession
		sid    string
	}
	var clients []client
	for u := range users {
		email := fmt.Sprintf("u%d@example.com", u)
		key := e.mustKey(t, email, scopeAgent)
		for range clientsPerUser {
			clients = append(clients, client{userID: e.mustUserID(t, email), cs: mcpTConnect(t, e, mcpTStreamable, key, mcpTDial{})})
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(clients))
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &clients[i]
			for s := range steps {
				args := map[string]any{"step_description": fmt.Sprintf("step %d", s)}
				if c.sid != "" {
					args["agent_instance_id"] = c.sid
				}
				res, err := c.cs.CallTool(context.Background(), &mcp.CallToolParams{Name: "log_step", Arguments: args})
				if err != nil || res.IsError {
					errs <- fmt.Errorf("client %d: %v %v", i, err, res)
					return
				}
				raw, _ := json.Marshal(res.StructuredContent)
				var out logStepOut
				json.Unmarshal(raw, &out)
				if c.sid == "" {
					c.sid = out.AgentInstanceID
				}
				if out.AgentInstanceID != c.sid || out.StepNumber != s+1 {
					errs <- fmt.Errorf("client %d step %d: %+v", i, s, out)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for _, c := range clients {
		var owner string
		var n int
		err := e.db.QueryRow(`
			SELECT a.user_id, (SELECT count(*) FROM messages m WHERE m.agent_instance_id = a.id AND m.user_id = a.user_id)
			FROM agent_instances a WHERE a.id = $1`, c.sid).Scan(&owner, &n)
		if err != nil || owner != c.userID || n != steps {
			t.Fatalf("session %s: owner %s (want %s), %d messages (want %d), %v", c.sid, owner, c.userID, n, steps, err)
		}
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM agent_instances`); n != len(clients) {
		t.Fatalf("%d sessions, want %d", n, len(clients))
	}
}

// Waiting questions hold no database connection: many wait at once with
// the pool idle, and all are answered.
func TestMCPManyWaitersHoldNoConnections(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopeAgent)
	cs := mcpTConnect(t, e, mcpTStreamable, key, mcpTDial{})
	const n = 100
	sids := make([]string, n)
	calls := make([]*mcpTPending, n)
	for i := range n {
		sids[i] = mcpTNewSession(t, cs)
		calls[i] = mcpTGo(context.Background(), cs, "ask_question", map[string]any{"agent_instance_id": sids[i], "question_text": "ok?"}, nil)
	}
	mcpTWaiters(t, e, n)
	mcpTEventually(t, "an idle pool", func() bool { return e.db.Stats().InUse == 0 })
	for i := range n {
		mcpTAnswer(t, e, key, sids[i], fmt.Sprintf("answer %d", i))
	}
	for i, p := range calls {
		if out := mcpTOut(t, p.wait(t)); out["answer"] != fmt.Sprintf("answer %d", i) {
			t.Fatalf("call %d: %v", i, out)
		}
	}
	mcpTWaiters(t, e, 0)
}

// A wait ended by shutdown hands nothing over: the feedback queued before
// the question is still there for the agent's next call.
func TestMCPShutdownKeepsQueuedFeedback(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopeAgent)
	cs := mcpTConnect(t, e, mcpTStreamable, key, mcpTDial{})
	sid := mcpTNewSession(t, cs)
	mcpTAnswer(t, e, key, sid, "use the staging db")
	p := mcpTGo(context.Background(), cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Which db?"}, nil)
	mcpTWaiters(t, e, 1)
	e.stop()
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		t.Fatal("shutdown did not end the wait")
	}
	if p.err != nil {
		t.Fatalf("protocol error: %v", p.err)
	}
	mcpTWantError(t, p.res, "shutting down")
	if code, body := e.call(t, "GET", restPendingPath(sid, "", 0), key, nil); code != 200 || !strings.Contains(string(body), "use the staging db") {
		t.Fatalf("queued feedback after the shutdown error: %d %s", code, body)
	}
}
