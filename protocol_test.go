package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// These tests prove both protocol revisions our clients speak (issue 14):
// 2026-07-28 (no sessions; Claude Code 2.1.332, the go-sdk's default) and
// 2025-11-25 (initialize; the TypeScript SDK 1.32.2), each through the three
// tools, progress during a wait, and cancellation.

// TestMCPRevisions runs the go-sdk client at each revision.
func TestMCPRevisions(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, func(a *app) { a.progressEvery = 50 * time.Millisecond })
	key := e.mustKey(t, "rev@example.com", scopeAgent)
	for _, want := range []string{"2026-07-28", "2025-11-25"} {
		t.Run(want, func(t *testing.T) {
			var progress atomic.Int64
			tr := mcpTTransport{name: want, path: "/mcp/", proto: want}
			cs := mcpTConnect(t, e, tr, key, mcpTDial{progress: func(*mcp.ProgressNotificationClientRequest) { progress.Add(1) }})
			if got := cs.InitializeResult().ProtocolVersion; got != want {
				t.Fatalf("negotiated %q, want %q", got, want)
			}
			t.Logf("go-sdk client negotiated MCP %s", want)
			sid := mcpTNewSession(t, cs)

			// A wait with progress, answered.
			p := mcpTGo(context.Background(), cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Ship it?"}, "tok")
			mcpTEventually(t, "2 progress notifications", func() bool { return progress.Load() >= 2 })
			mcpTAnswer(t, e, key, sid, "ship it")
			if out := mcpTOut(t, p.wait(t)); out["answer"] != "ship it" {
				t.Fatalf("ask_question: %v", out)
			}

			// A cancelled wait ends on the server at once.
			ctx, cancel := context.WithCancel(context.Background())
			p = mcpTGo(ctx, cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Still there?"}, "tok")
			mcpTWaiters(t, e, 1)
			cancel()
			mcpTWaiters(t, e, 0)
			<-p.done
			if p.err == nil {
				t.Fatalf("the cancelled call returned %s", mcpTText(p.res))
			}

			out := mcpTOut(t, mcpTCall(t, cs, "end_session", map[string]any{"agent_instance_id": sid}))
			if out["final_status"] != "COMPLETED" {
				t.Fatalf("end_session: %v", out)
			}
		})
	}
}

// rawMCP is a 2025-11-25 client written out by hand, so a test controls
// exactly what goes on the wire: it never drops a waiting call's connection,
// it cancels only with notifications/cancelled on a request of its own (as
// the TypeScript SDK does), and it picks its own request ids.
type rawMCP struct {
	t   *testing.T
	url string
	key string
	sid string // Mcp-Session-Id from initialize, if the server gave one
}

func newRawMCP(t *testing.T, e *testEnv, key string) *rawMCP {
	c := &rawMCP{t: t, url: e.srv.URL + "/mcp/", key: key}
	res := c.post(`{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}`)
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	c.sid = res.Header.Get("Mcp-Session-Id")
	c.notify(`{"jsonrpc":"2.0","method":"notifications/initialized"}`)
	return c
}

func (c *rawMCP) post(body string) *http.Response {
	c.t.Helper()
	res, err := c.try(body)
	if err != nil {
		c.t.Fatal(err)
	}
	return res
}

func (c *rawMCP) try(body string) (*http.Response, error) {
	req, _ := http.NewRequest("POST", c.url, strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+c.key)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	req.Header.Set("Mcp-Protocol-Version", "2025-11-25")
	if c.sid != "" {
		req.Header.Set("Mcp-Session-Id", c.sid)
	}
	return http.DefaultClient.Do(req)
}

func (c *rawMCP) notify(body string) {
	c.t.Helper()
	res := c.post(body)
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusAccepted {
		c.t.Fatalf("notification: %d", res.StatusCode)
	}
}

// call starts a tools/call with id and returns a channel that receives the
// response stream's text once it ends.
func (c *rawMCP) call(id int, tool, args string) <-chan string {
	body := fmt.Sprintf(`{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":%q,"arguments":%s}}`, id, tool, args)
	done := make(chan string, 1)
	go func() {
		res, err := c.try(body) // the headers come with the first event
		if err != nil {
			done <- err.Error()
			return
		}
		defer res.Body.Close()
		var b strings.Builder
		sc := bufio.NewScanner(res.Body)
		for sc.Scan() {
			b.WriteString(sc.Text() + "\n")
		}
		done <- b.String()
	}()
	return done
}

// TestMCPCancelNotification: on 2025-11-25 a client may cancel a waiting
// call with notifications/cancelled on a POST of its own, keeping the
// call's connection open. The cancellation reaches that call, and only it,
// through another replica too: another client of the same key using the
// same request id cancels nothing.
func TestMCPCancelNotification(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "cancel@example.com", scopeAgent)
	a, b := newRawMCP(t, e, key), newRawMCP(t, e, key)
	if a.sid == "" || a.sid == b.sid {
		t.Fatalf("initialize gave session ids %q and %q: want one of its own per client", a.sid, b.sid)
	}
	sid := mcpTNewSession(t, mcpTConnect(t, e, mcpTStreamable, key, mcpTDial{}))
	done := a.call(7, "ask_question", fmt.Sprintf(`{"agent_instance_id":%q,"question_text":"Wait?"}`, sid))
	mcpTWaiters(t, e, 1)

	// Another client's cancellation of its own request 7 is not this one's.
	b.notify(`{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":7,"reason":"user"}}`)
	time.Sleep(300 * time.Millisecond)
	if n := e.a.hub.waiters(); n != 1 {
		t.Fatalf("another client's cancellation ended the call: %d waiters", n)
	}
	// The cancellation may reach another replica than the call's.
	other := newTestEnvOn(t, e.dsn, e.signer)
	a.url = other.srv.URL + "/mcp/"
	a.notify(`{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":7,"reason":"user"}}`)
	mcpTWaiters(t, e, 0)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the cancelled call's response never ended")
	}
	// The question stays open: an answer now is the session's next feedback.
	mcpTAnswer(t, e, key, sid, "late answer")
	cs := mcpTConnect(t, e, mcpTStreamable, key, mcpTDial{})
	out := mcpTOut(t, mcpTCall(t, cs, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "back"}))
	if fb := mcpTFeedback(t, out); len(fb) != 1 || fb[0] != "late answer" {
		t.Fatalf("feedback %q", fb)
	}
}

// TestMCPQuickCallsAnswerJSON: on 2026-07-28 a call that cannot wait is
// answered with one JSON body, a call that may wait with an event stream;
// a Mcp-Name header that lies about the body is refused.
func TestMCPQuickCallsAnswerJSON(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "quick@example.com", scopeAgent)
	post := func(name, args string, header string) (int, string, string) {
		t.Helper()
		req := mcpTRequest(context.Background(), e.srv.URL, key, "tools/call", header, fmt.Sprintf(`{"name":%q,"arguments":%s}`, name, args))
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, res.Header.Get("Content-Type"), string(b)
	}
	code, ctype, body := post("log_step", `{"step_description":"quick"}`, "log_step")
	if code != 200 || ctype != "application/json" || !strings.Contains(body, `"step_number":1`) {
		t.Fatalf("log_step: %d %q %s", code, ctype, body)
	}
	code, ctype, body = post("ask_question", `{"agent_instance_id":"not-a-uuid","question_text":"?"}`, "ask_question")
	if code != 200 || ctype != "text/event-stream" {
		t.Fatalf("ask_question: %d %q %s", code, ctype, body)
	}
	if code, _, body = post("ask_question", `{"agent_instance_id":"not-a-uuid","question_text":"?"}`, "log_step"); code < 400 || code > 499 {
		t.Fatalf("a lying Mcp-Name header: %d %s", code, body)
	}
}

// mcpTRequest is one MCP 2026-07-28 request as Claude Code sends it: no
// session, the method (and a tool call's name) in headers too; params get
// the client's _meta. name is the Mcp-Name header ("" for none).
func mcpTRequest(ctx context.Context, url, key, method, name, params string) *http.Request {
	meta := `"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"claude-code","version":"2.1.332"},"io.modelcontextprotocol/clientCapabilities":{}}`
	if params == "" {
		params = "{" + meta + "}"
	} else {
		params = strings.TrimSuffix(params, "}") + "," + meta + "}"
	}
	body := fmt.Sprintf(`{"jsonrpc":"2.0","id":1,"method":%q,"params":%s}`, method, params)
	req, _ := http.NewRequestWithContext(ctx, "POST", url+"/mcp/", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	req.Header.Set("User-Agent", "claude-code/2.1.332 (sdk-cli)")
	req.Header.Set("Mcp-Protocol-Version", "2026-07-28")
	req.Header.Set("Mcp-Method", method)
	if name != "" {
		req.Header.Set("Mcp-Name", name)
	}
	return req
}
