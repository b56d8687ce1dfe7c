package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// fakeClock is a clock tests move by hand.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)} }

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// withRateLimit turns the limit on with spec, on clock (nil: real time).
func withRateLimit(t testing.TB, spec string, clock *fakeClock) envOption {
	l, err := parseRateLimit(spec)
	if err != nil {
		t.Fatal(err)
	}
	return func(a *app) {
		a.cfg.rateLimit = l
		if clock != nil {
			a.ops.limits.testClock = clock.now
		}
	}
}

// callH is e.call that also returns the response headers.
func callH(t testing.TB, e *testEnv, method, path, key string) (int, http.Header, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, e.srv.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := resp.Body.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			break
		}
	}
	return resp.StatusCode, resp.Header, []byte(b.String())
}

func TestRateLimitParse(t *testing.T) {
	t.Parallel()
	good := map[string]rateLimit{
		"20/s,burst=100":   {20, 100},
		" 20/s , burst=5 ": {20, 5},
		"20/s":             {20, 20},
		"600/m":            {10, 600},
		"30/min,burst=2":   {0.5, 2},
		"3600/h":           {1, 3600},
		"0.5/s":            {0.5, 1},
		"0":                {},
		"off":              {},
	}
	for in, want := range good {
		got, err := parseRateLimit(in)
		if err != nil || got != want {
			t.Errorf("parseRateLimit(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "20", "20/d", "-1/s", "x/s", "20/s,burst=0", "20/s,burst=x", "20/s,bust=5", "NaN/s", "Inf/s", "20/s,burst=5,x", "1e9/s"} {
		if _, err := parseRateLimit(in); err == nil || !strings.Contains(err.Error(), "RATE_LIMIT") {
			t.Errorf("parseRateLimit(%q) = %v; want an error naming RATE_LIMIT", in, err)
		}
	}
	// Unset: the default. A bad value stops start-up, naming the variable.
	c, err := loadConfig(func(string) string { return "" })
	if err != nil || c.rateLimit != (rateLimit{20, 100}) {
		t.Errorf("default RATE_LIMIT: %+v, %v", c.rateLimit, err)
	}
	_, _, err = authRun([]string{"serve"}, map[string]string{"RATE_LIMIT": "lots", "DATABASE_URL": "postgres://127.0.0.1:1/x"})
	if err == nil || !strings.Contains(err.Error(), "RATE_LIMIT") {
		t.Errorf("start-up with RATE_LIMIT=lots: %v", err)
	}
}

// TestRateLimitREST: a burst over the limit gets 429 with {"detail"} and a
// Retry-After that is exactly right (one second sooner is still refused, at
// that second it passes); another key, /health and the page's files are not
// affected.
func TestRateLimitREST(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	e := newTestEnv(t, withRateLimit(t, "20/m,burst=2", clock)) // a token every 3 s
	a := e.mustKey(t, "rl@example.com", scopePerson)
	b := e.mustKey(t, "rl@example.com", scopePerson)
	for i := 0; i < 2; i++ {
		if code, _, body := callH(t, e, "GET", "/api/v1/sessions", a); code != 200 {
			t.Fatalf("request %d within the burst: %d %s", i, code, body)
		}
	}
	code, h, body := callH(t, e, "GET", "/api/v1/sessions", a)
	if code != 429 || h.Get("Retry-After") != "3" || !strings.Contains(mustJSON(t, body)["detail"].(string), "rate limit") {
		t.Fatalf("over the limit: %d Retry-After=%q %s", code, h.Get("Retry-After"), body)
	}
	if code, _, _ := callH(t, e, "GET", "/api/v1/sessions", b); code != 200 {
		t.Errorf("another key of the same user was limited: %d", code)
	}
	for i := 0; i < 20; i++ {
		if code, _, _ := callH(t, e, "GET", "/health", ""); code != 200 {
			t.Fatalf("/health limited: %d", code)
		}
		for _, p := range []string{"/", "/app.js", "/app.css"} {
			if code, _, _ := callH(t, e, "GET", p, ""); code != 200 {
				t.Fatalf("%s limited: %d", p, code)
			}
		}
	}
	clock.advance(2 * time.Second)
	if code, h, _ := callH(t, e, "GET", "/api/v1/sessions", a); code != 429 || h.Get("Retry-After") != "1" {
		t.Fatalf("2 s later: %d Retry-After=%q, want 429 and 1", code, h.Get("Retry-After"))
	}
	clock.advance(time.Second)
	if code, _, body := callH(t, e, "GET", "/api/v1/sessions", a); code != 200 {
		t.Fatalf("after Retry-After: %d %s", code, body)
	}
	// A refused request costs nothing: refusals in a row keep the same wait.
	for i := 0; i < 5; i++ {
		if _, h, _ := callH(t, e, "GET", "/api/v1/keys", a); h.Get("Retry-After") != "3" {
			t.Fatalf("refusal %d: Retry-After=%q", i, h.Get("Retry-After"))
		}
	}
	// Missing or bad keys are 401 as before, not 429.
	if code, _, _ := callH(t, e, "GET", "/api/v1/sessions", ""); code != 401 {
		t.Errorf("no key: %d", code)
	}
	if e.a.ops.metrics.rateLimited.Load() < 7 {
		t.Errorf("rate-limited counter %d", e.a.ops.metrics.rateLimited.Load())
	}
}

// TestRateLimitWaitNotCut: a long-poll that is waiting when its key runs out
// of tokens still gets its answer: a wait costs one token, when it starts.
func TestRateLimitWaitNotCut(t *testing.T) {
	t.Parallel()
	clock := newFakeClock() // never moves: no token comes back
	e := newTestEnv(t, withRateLimit(t, "1/m,burst=3", clock))
	agent := e.mustKey(t, "wait@example.com", scopeAgent)
	person := e.mustKey(t, "wait@example.com", scopePerson)
	sid := newUUID()
	if code, body := e.call(t, "POST", "/api/v1/messages/agent", agent, map[string]any{
		"agent_instance_id": sid, "agent_type": "claude-code", "content": "working"}); code != 200 {
		t.Fatalf("agent message: %d %s", code, body)
	}
	type result struct {
		code int
		body []byte
	}
	got := make(chan result, 1)
	go func() {
		code, _, body := callH(t, e, "GET", "/api/v1/messages/pending?wait=30&agent_instance_id="+sid, agent)
		got <- result{code, body}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for e.a.hub.waiters() == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	// The agent key spends its last token and is refused from then on.
	for i := 0; ; i++ {
		code, _, _ := callH(t, e, "GET", "/api/v1/messages/pending?agent_instance_id="+sid, agent)
		if code == 429 {
			break
		}
		if i > 5 {
			t.Fatal("never limited")
		}
	}
	if code, body := e.call(t, "POST", "/api/v1/messages/user", person, map[string]any{
		"agent_instance_id": sid, "content": "the answer", "mark_as_read": false}); code != 200 {
		t.Fatalf("user message: %d %s", code, body)
	}
	select {
	case r := <-got:
		if r.code != 200 || !strings.Contains(string(r.body), "the answer") {
			t.Fatalf("the waiting long-poll: %d %s", r.code, r.body)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the waiting long-poll did not return")
	}
}

// TestRateLimitMCP: over the limit, a tools/call over MCP gets a tool error
// saying so (the session survives it and works once tokens are back), and
// other MCP requests get 429, which the go-sdk client reports as an error.
func TestRateLimitMCP(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	e := newTestEnv(t, withRateLimit(t, "60/m,burst=6", clock))
	key := e.mustKey(t, "mcp-rl@example.com", scopeAgent)
	s, err := authMCP(t, e, key, false)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var limited *mcp.CallToolResult
	for i := 0; i < 10 && limited == nil; i++ {
		res, err := s.CallTool(ctx, &mcp.CallToolParams{Name: "log_step", Arguments: map[string]any{"step_description": fmt.Sprint("step ", i)}})
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		if res.IsError {
			limited = res
		}
	}
	if limited == nil {
		t.Fatal("never limited")
	}
	text, _ := json.Marshal(limited.Content)
	if !strings.Contains(string(text), "rate limit exceeded") || !strings.Contains(string(text), "retry in 1 s") {
		t.Fatalf("tool error %s", text)
	}
	if _, err := s.ListTools(ctx, nil); err == nil || !strings.Contains(err.Error(), "Too Many Requests") {
		t.Errorf("tools/list over the limit: %v", err)
	}
	clock.advance(2 * time.Second)
	if err := authLogStep(s); err != nil {
		t.Fatalf("after the wait the session is broken: %v", err)
	}
}

// TestRateLimitBuckets: idle buckets are dropped, the number of buckets is
// capped, and the per-address hook limits by client address.
func TestRateLimitBuckets(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	l := newLimiter(rateLimit{perSec: 1, burst: 2}, clock.now)
	for i := 0; i < 1000; i++ {
		l.allow(fmt.Sprint("key", i))
	}
	if l.size() != 1000 {
		t.Fatalf("size %d", l.size())
	}
	clock.advance(sweepEvery) // every bucket is full again long before
	l.allow("one more")
	if l.size() != 1 {
		t.Fatalf("idle buckets kept: %d", l.size())
	}
	for i := 0; i < maxBuckets+10; i++ {
		l.allow(fmt.Sprint("flood", i))
	}
	if l.size() > maxBuckets {
		t.Fatalf("%d buckets, over the cap of %d", l.size(), maxBuckets)
	}
}

// BenchmarkRateLimiterAllow: the cost the limit adds to every request.
func BenchmarkRateLimiterAllow(b *testing.B) {
	l := newLimiter(rateLimit{perSec: 1e6, burst: 1e6}, nil)
	keys := make([]string, 64)
	for i := range keys {
		keys[i] = newUUID()
	}
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			l.allow(keys[i%len(keys)])
			i++
		}
	})
}
