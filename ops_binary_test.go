package main

import (
	"context"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// freeAddr returns a loopback address nothing listens on (yet).
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestOpsBinary: the real binary, configured only by its environment:
// RATE_LIMIT refuses a burst with 429 and Retry-After, METRICS_ADDR serves
// the metrics on their own listener (and the public port does not), and
// they count what happened.
func TestOpsBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	t.Parallel()
	db, dsn := mustDB(t)
	pub, signer := perfKeys(t)
	bin := perfBuildBinary(t)
	metricsAddr := freeAddr(t)
	srv := perfStartServer(t, bin, "DATABASE_URL="+dsn, "JWT_PUBLIC_KEY="+pub,
		"RATE_LIMIT=1/m,burst=3", "METRICS_ADDR="+metricsAddr)
	ctx := context.Background()
	key, err := issueKey(ctx, &store{db: db}, signer, "bin@example.com", "bin", scopeAgent, 0)
	if err != nil {
		t.Fatal(err)
	}
	c := perfClient()
	var codes []int
	for i := 0; i < 4; i++ {
		code, body, err := perfDo(ctx, c, "POST", srv.url+"/api/v1/messages/agent", key,
			map[string]any{"agent_type": "bin", "content": "step"})
		if err != nil {
			t.Fatal(err)
		}
		codes = append(codes, code)
		if code == 429 && !strings.Contains(body["detail"].(string), "retry in 60 s") {
			t.Errorf("429 detail %v", body)
		}
	}
	if codes[2] != 200 || codes[3] != 429 {
		t.Fatalf("statuses %v, want 3 × 200 then 429", codes)
	}
	resp, err := c.Get(srv.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Errorf("public port /metrics: %d", resp.StatusCode)
	}
	fams := scrapeMetrics(t, "http://"+metricsAddr+"/metrics")
	if v := metricValue(fams, "agentline_rate_limited_total", nil); v != 1 {
		t.Errorf("rate limited %v", v)
	}
	if v := metricValue(fams, "agentline_http_requests_total", map[string]string{"route": "POST /api/v1/messages/agent", "status": "200"}); v != 3 {
		t.Errorf("requests %v", v)
	}
	if v := metricValue(fams, "agentline_db_connections", map[string]string{"state": "idle"}); v < 1 {
		t.Errorf("idle connections %v", v)
	}
}

// TestPgBouncerBinary: the real binary with DATABASE_URL through PgBouncer
// in transaction mode and DATABASE_LISTEN_URL direct starts (the LISTEN
// check passes) and a long-poll is woken by a message.
func TestPgBouncerBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	t.Parallel()
	db, direct := mustDB(t)
	pooled := startPgBouncer(t, dbNameOf(t, direct))
	pub, signer := perfKeys(t)
	bin := perfBuildBinary(t)
	srv := perfStartServer(t, bin, "DATABASE_URL="+pooled, "DATABASE_LISTEN_URL="+direct, "JWT_PUBLIC_KEY="+pub)
	ctx := context.Background()
	key, err := issueKey(ctx, &store{db: db}, signer, "binpool@example.com", "bin", scopePerson, 0)
	if err != nil {
		t.Fatal(err)
	}
	c := perfClient()
	sid := newUUID()
	if code, body, err := perfDo(ctx, c, "POST", srv.url+"/api/v1/messages/agent", key,
		map[string]any{"agent_instance_id": sid, "agent_type": "bin", "content": "step"}); err != nil || code != 200 {
		t.Fatalf("agent message: %d %v %v", code, body, err)
	}
	got := make(chan string, 1)
	go func() {
		code, body, err := perfDo(ctx, c, "GET", srv.url+"/api/v1/messages/pending?wait=30&agent_instance_id="+sid, key, nil)
		if err != nil {
			got <- err.Error()
			return
		}
		got <- strings.TrimSpace(strings.Join([]string{http.StatusText(code), func() string {
			if msgs, ok := body["messages"].([]any); ok && len(msgs) == 1 {
				return msgs[0].(map[string]any)["content"].(string)
			}
			return ""
		}()}, " "))
	}()
	time.Sleep(300 * time.Millisecond) // the long-poll is waiting
	if code, body, err := perfDo(ctx, c, "POST", srv.url+"/api/v1/messages/user", key,
		map[string]any{"agent_instance_id": sid, "content": "woken", "mark_as_read": false}); err != nil || code != 200 {
		t.Fatalf("user message: %d %v %v", code, body, err)
	}
	select {
	case s := <-got:
		if s != "OK woken" {
			t.Fatalf("long-poll: %q", s)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the long-poll was not woken")
	}
}
