package main

import (
	"context"
	"net/http"

	"github.com/modelcontextprotocol/go-sdk/mcp"
	"testing"
)

func TestSmokeRESTFlow(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopeAgent)
	sid := newUUID()
	code, body := e.call(t, "POST", "/api/v1/messages/agent", key, map[string]any{"agent_instance_id": sid, "agent_type": "Claude-Code", "content": "step 1"})
	if code != 200 {
		t.Fatalf("agent message: %d %s\n%s", code, body, e.logs.String())
	}
	code, body = e.call(t, "POST", "/api/v1/messages/user", key, map[string]any{"agent_instance_id": sid, "content": "feedback", "mark_as_read": false})
	if code != 200 {
		t.Fatalf("user message: %d %s", code, body)
	}
	code, body = e.call(t, "POST", "/api/v1/messages/agent", key, map[string]any{"agent_instance_id": sid, "content": "step 2"})
	m := mustJSON(t, body)
	if code != 200 || len(m["queued_user_messages"].([]any)) != 1 {
		t.Fatalf("step 2: %d %s", code, body)
	}
	t.Logf("%s", body)
}

func TestMain_logs(t *testing.T) {}

type bearerRT struct {
	key string
	ua  string
}

func (b bearerRT) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+b.key)
	if b.ua != "" {
		r.Header.Set("User-Agent", b.ua)
	}
	return http.DefaultTransport.RoundTrip(r)
}

func TestSmokeMCP(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopeAgent)
	for _, sse := range []bool{false, true} {
		ctx := context.Background()
		c := mcp.NewClient(&mcp.Implementation{Name: "test", Version: "1"}, nil)
		hc := &http.Client{Transport: bearerRT{key: key, ua: "claude-code/1.0"}}
		var tr mcp.Transport = &mcp.StreamableClientTransport{Endpoint: e.srv.URL + "/mcp/", HTTPClient: hc}
		if sse {
			tr = &mcp.SSEClientTransport{Endpoint: e.srv.URL + "/mcp/sse", HTTPClient: hc}
		}
		s, err := c.Connect(ctx, tr, nil)
		if err != nil {
			t.Fatal(err)
		}
		res, err := s.CallTool(ctx, &mcp.CallToolParams{Name: "log_step", Arguments: map[string]any{"step_description": "hello"}})
		if err != nil || res.IsError {
			t.Fatalf("log_step: %v %+v", err, res)
		}
		t.Logf("sse=%v %s", sse, res.StructuredContent)
		s.Close()
	}
}

func TestHubWaiterCount(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	_, cancel := e.a.hub.subscribe("s:" + e.mustUserID(t, "x@example.com"))
	if n := e.a.hub.waiters(); n != 1 {
		t.Fatalf("waiters = %d, want 1", n)
	}
	cancel()
	cancel()
	if n := e.a.hub.waiters(); n != 0 {
		t.Fatalf("waiters after cancel = %d, want 0", n)
	}
}
