package main

// fault_test.go: agentline keeps its promises when things go wrong — the
// database restarted or down while questions wait, SIGTERM under load, a
// client that hangs up mid-wait.

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"database/sql"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// faultTempDir is a temp dir the postgres OS user can traverse (the tests
// may run as root, and PostgreSQL then runs as postgres).
func faultTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "agentline-fault-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// faultCluster is a PostgreSQL of the test's own, which it may stop and
// start again; it is stopped at cleanup.
type faultCluster struct {
	dir string
	mu  sync.Mutex
	pg  *localPG
}

func faultNewCluster(t testing.TB) (*faultCluster, string) {
	t.Helper()
	c := &faultCluster{dir: filepath.Join(faultTempDir(t), "pg")}
	c.start(t)
	t.Cleanup(func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		c.pg.stop()
	})
	ctx := context.Background()
	if err := createDatabase(ctx, c.pg.dsn("postgres"), "agentline"); err != nil {
		t.Fatal(err)
	}
	dsn := c.pg.dsn("agentline")
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	return c, dsn
}

// admin opens a connection to the cluster's postgres database, for
// watching the agentline database without touching it.
func (c *faultCluster) admin(t testing.TB) *sql.DB {
	t.Helper()
	c.mu.Lock()
	dsn := c.pg.dsn("postgres")
	c.mu.Unlock()
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(1)
	t.Cleanup(func() { db.Close() })
	return db
}

func (c *faultCluster) start(t testing.TB) {
	t.Helper()
	pg, err := openLocalPG(context.Background(), c.dir, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	c.pg = pg
	c.mu.Unlock()
}

func (c *faultCluster) stop(t testing.TB) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.pg.stop(); err != nil {
		t.Fatal(err)
	}
}

// faultEnv is an app over a cluster of the test's own.
func faultEnv(t *testing.T) (*testEnv, *faultCluster) {
	t.Helper()
	c, dsn := faultNewCluster(t)
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return newTestEnvOn(t, dsn, priv), c
}

// faultWaiter is one REST long-poll or MCP ask_question in flight.
type faultWaiter struct {
	kind    string // "rest" or "mcp"
	session string
	done    chan string // the answer, or "error: …"
	start   func()      // (re)starts the wait: a REST re-poll, an MCP re-ask (which resumes the question)
	since   time.Time   // when it last started
}

// faultStartWaiters starts n REST long-polls (wait=60) and n MCP
// ask_questions against e, each in a session of its own, and returns once
// all of them wait in the hub.
func faultStartWaiters(t *testing.T, e *testEnv, key string, n int) []*faultWaiter {
	t.Helper()
	ctx := context.Background()
	var ws []*faultWaiter
	c := perfClient()
	for i := 0; i < 2*n; i++ {
		w := &faultWaiter{kind: "rest", session: newUUID(), done: make(chan string, 1)}
		if i >= n {
			w.kind = "mcp"
		}
		if code, body := e.call(t, "POST", "/api/v1/messages/agent", key, map[string]any{
			"agent_instance_id": w.session, "agent_type": "fault", "content": "working"}); code != 200 {
			t.Fatalf("create session: %d %s", code, body)
		}
		if w.kind == "rest" {
			w.start = func() {
				w.since = time.Now()
				go func() {
					code, body, err := perfDo(ctx, c, "GET", e.srv.URL+"/api/v1/messages/pending?wait=60&agent_instance_id="+w.session, key, nil)
					msgs, _ := body["messages"].([]any)
					switch {
					case err != nil:
						w.done <- "error: " + err.Error()
					case code != 200 || len(msgs) != 1:
						w.done <- fmt.Sprintf("error: %d %v", code, body)
					default:
						w.done <- msgs[0].(map[string]any)["content"].(string)
					}
				}()
			}
		} else {
			cs, err := perfMCPConnect(ctx, e.srv.URL, key, http.DefaultTransport)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cs.Close() })
			w.start = func() {
				w.since = time.Now()
				go func() {
					res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: "ask_question",
						Arguments: map[string]any{"agent_instance_id": w.session, "question_text": "Go on?"}})
					switch {
					case err != nil:
						w.done <- "error: " + err.Error()
					case res.IsError:
						w.done <- fmt.Sprintf("error: tool error %v", mcpTextOf(res))
					default:
						a, _ := res.StructuredContent.(map[string]any)["answer"].(string)
						w.done <- a
					}
				}()
			}
		}
		ws = append(ws, w)
	}
	base := e.a.hub.waiters()
	for _, w := range ws {
		w.start()
	}
	replicaWaitFor(t, "every waiter to wait", func() bool { return e.a.hub.waiters() == base+2*n })
	return ws
}

// mcpTextOf is the text content of a tool result.
func mcpTextOf(res *mcp.CallToolResult) string {
	var b strings.Builder
	for _, c := range res.Content {
		if tc, ok := c.(*mcp.TextContent); ok {
			b.WriteString(tc.Text)
		}
	}
	return b.String()
}

// faultPostRetry posts a user message, retrying while the answer is 503
// (the database is coming back); it returns how many 503s it saw.
func faultPostRetry(t *testing.T, e *testEnv, key, session, content string) int {
	t.Helper()
	for n := 0; ; n++ {
		code, body := e.call(t, "POST", "/api/v1/messages/user", key,
			map[string]any{"agent_instance_id": session, "content": content, "mark_as_read": false})
		if code == 200 {
			return n
		}
		if code != http.StatusServiceUnavailable || n > 100 {
			t.Fatalf("answer: %d %s", code, body)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestFaultDatabaseRestart: questions wait while the database is stopped
// and started again. The listener reconnects, every waiter re-checks, and
// answers committed after the restart — even before the listener is back,
// when their NOTIFY reaches nobody — all arrive; nothing is lost.
func TestFaultDatabaseRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a PostgreSQL of its own")
	}
	t.Parallel()
	e, c := faultEnv(t)
	key := e.mustKey(t, "restart@example.com", scopeAgent)
	ws := faultStartWaiters(t, e, key, 3)
	// Registered waiters make their first check right after subscribing:
	// let those finish before the database goes.
	perfWaitQuiet(t, c.admin(t), "agentline", 500*time.Millisecond, 10*time.Second)

	stopAt := time.Now()
	c.stop(t)
	stopTook := time.Since(stopAt)
	replicaWaitFor(t, "the listener to notice", func() bool {
		return strings.Contains(e.logs.String(), "listener disconnected")
	})
	time.Sleep(time.Second) // down for a while: the listener backs off
	// A waiter ends during the outage only if it reads the database then:
	// its 30 s safety re-check falls inside the outage (a slow machine), or
	// it had subscribed but not yet made its first check. It then ends with
	// a clean "database unavailable" error, and its client retries once the
	// database is back (an MCP re-ask resumes the same question).
	var restart []*faultWaiter
	for _, w := range ws {
		select {
		case m := <-w.done:
			if !strings.Contains(m, "database unavailable") && !strings.Contains(m, "database is unavailable") {
				t.Fatalf("%s waiter ended while the database was down (%v after it started, stop took %v): %q", w.kind, time.Since(w.since), stopTook, m)
			}
			restart = append(restart, w)
		default:
		}
	}
	downFor := time.Since(stopAt)
	c.start(t)
	t.Logf("database down for %v, back after %v; %d waiters read it during the outage, ended with database unavailable and were retried", downFor.Round(time.Millisecond),
		time.Since(stopAt).Round(time.Millisecond), len(restart))
	for _, w := range restart {
		w.start()
	}

	// Answer at once: the pool reconnects on demand, the listener only on
	// its next retry, so these NOTIFYs are likely lost and the waiters
	// must be woken by the reconnect.
	retries := 0
	for i, w := range ws {
		retries += faultPostRetry(t, e, key, w.session, fmt.Sprintf("answer %d", i))
	}
	beforeListener := !strings.Contains(e.logs.String(), "listener reconnected")
	for i, w := range ws {
		select {
		case m := <-w.done:
			if m != fmt.Sprintf("answer %d", i) {
				t.Errorf("%s waiter %d got %q", w.kind, i, m)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("%s waiter %d never got its answer after the restart; logs:\n%s", w.kind, i, e.logs.String())
		}
	}
	t.Logf("all %d answers arrived; %d answer posts got 503 first; answers committed before the listener reconnected: %v",
		len(ws), retries, beforeListener)
	replicaWaitFor(t, "the waiters to go", func() bool { return e.a.hub.waiters() == 0 })

	// Nothing lost or doubled: each session holds its step, (a question,)
	// its answer, and nothing is left pending.
	for i, w := range ws {
		var answers int
		if err := e.db.QueryRow(`SELECT count(*) FROM messages WHERE agent_instance_id = $1 AND sender_type = 'USER' AND content = $2`,
			w.session, fmt.Sprintf("answer %d", i)).Scan(&answers); err != nil {
			t.Fatal(err)
		}
		if answers != 1 {
			t.Errorf("session %d holds its answer %d times", i, answers)
		}
		code, body := e.call(t, "GET", "/api/v1/messages/pending?agent_instance_id="+w.session, key, nil)
		if msgs, _ := mustJSON(t, body)["messages"].([]any); code != 200 || len(msgs) != 0 {
			t.Errorf("session %d: pending after delivery = %d %s (delivered twice?)", i, code, body)
		}
	}
	// And the hub works as before: a new wait is woken by NOTIFY.
	replicaWaitFor(t, "the listener to reconnect", func() bool { return strings.Contains(e.logs.String(), "listener reconnected") })
	again := faultStartWaiters(t, e, key, 1)
	for i, w := range again {
		faultPostRetry(t, e, key, w.session, fmt.Sprintf("again %d", i))
		select {
		case m := <-w.done:
			if m != fmt.Sprintf("again %d", i) {
				t.Errorf("after restart: %s waiter got %q", w.kind, m)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("after restart: %s waiter never woke", w.kind)
		}
	}
}

// TestFaultDatabaseDown: with the database stopped, requests answer 503 with
// a detail, /health answers 503, MCP tools report a tool error, and the
// server stays up; once the database is back it serves again by itself.
func TestFaultDatabaseDown(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a PostgreSQL of its own")
	}
	t.Parallel()
	e, c := faultEnv(t)
	key := e.mustKey(t, "down@example.com", scopeAgent)
	session := newUUID()
	if code, body := e.call(t, "POST", "/api/v1/messages/agent", key, map[string]any{
		"agent_instance_id": session, "agent_type": "fault", "content": "before"}); code != 200 {
		t.Fatalf("before: %d %s", code, body)
	}
	ctx := context.Background()
	cs, err := perfMCPConnect(ctx, e.srv.URL, key, http.DefaultTransport)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()

	c.stop(t)
	for _, r := range []struct {
		method, path string
		body         any
	}{
		{"POST", "/api/v1/messages/agent", map[string]any{"agent_instance_id": session, "content": "during"}},
		{"POST", "/api/v1/messages/user", map[string]any{"agent_instance_id": session, "content": "during"}},
		{"GET", "/api/v1/messages/pending?agent_instance_id=" + session, nil},
		{"GET", "/api/v1/messages/pending?wait=5&agent_instance_id=" + session, nil},
		{"POST", "/api/v1/sessions/end", map[string]any{"agent_instance_id": session}},
	} {
		// Twice: the first may meet a pooled connection the server closed.
		for try := 0; try < 2; try++ {
			code, body := e.call(t, r.method, r.path, key, r.body)
			if code != http.StatusServiceUnavailable {
				t.Fatalf("%s %s with the database down: %d %s, want 503", r.method, r.path, code, body)
			}
			if d, _ := mustJSON(t, body)["detail"].(string); !strings.Contains(d, "database") {
				t.Errorf("%s %s: detail %q does not say what is wrong", r.method, r.path, d)
			}
		}
	}
	code, body := e.call(t, "GET", "/health", "", nil)
	if code != http.StatusServiceUnavailable {
		t.Fatalf("/health with the database down: %d %s", code, body)
	}
	// MCP: the key check needs the database too, so the HTTP request is
	// answered 503 before MCP sees it, and the client reports that. (A
	// request that got past the key check before the database went away
	// gets a tool error saying the database is unavailable instead.)
	res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: "log_step", Arguments: map[string]any{"agent_instance_id": session, "step_description": "during"}})
	switch {
	case err != nil && strings.Contains(err.Error(), "Service Unavailable"):
	case err == nil && res.IsError && strings.Contains(mcpTextOf(res), "database"):
	default:
		t.Fatalf("log_step with the database down: %v %+v, want HTTP 503 or a tool error naming the database", err, res)
	}

	c.start(t)
	start := time.Now()
	replicaWaitFor(t, "/health to recover", func() bool {
		code, _ := e.call(t, "GET", "/health", "", nil)
		return code == 200
	})
	t.Logf("/health healthy again %v after the database was", time.Since(start).Round(time.Millisecond))
	if code, body := e.call(t, "POST", "/api/v1/messages/agent", key, map[string]any{"agent_instance_id": session, "content": "after"}); code != 200 {
		t.Fatalf("after recovery: %d %s", code, body)
	}
	res, err = cs.CallTool(ctx, &mcp.CallToolParams{Name: "log_step", Arguments: map[string]any{"agent_instance_id": session, "step_description": "after"}})
	if err != nil || res.IsError {
		t.Fatalf("log_step after recovery: %v %q", err, mcpTextOf(res))
	}
	var during int
	if err := e.db.QueryRow(`SELECT count(*) FROM messages WHERE agent_instance_id = $1 AND content = 'during'`, session).Scan(&during); err != nil {
		t.Fatal(err)
	}
	if during != 0 {
		t.Fatalf("%d messages stored from requests that answered 503", during)
	}
}

// TestFaultClientDisconnect: a client that hangs up mid-wait frees its
// waiter at once — REST long-poll (connection closed, or request
// cancelled), MCP ask_question over Streamable HTTP (call cancelled) and
// over SSE (session closed).
func TestFaultClientDisconnect(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "gone@example.com", scopeAgent)
	ctx := context.Background()
	newSession := func() string {
		s := newUUID()
		if code, body := e.call(t, "POST", "/api/v1/messages/agent", key, map[string]any{
			"agent_instance_id": s, "agent_type": "fault", "content": "working"}); code != 200 {
			t.Fatalf("create: %d %s", code, body)
		}
		return s
	}
	for _, c := range []struct {
		name  string
		start func(session string) (hangUp func())
	}{
		{"REST connection closed", func(session string) func() {
			u, _ := url.Parse(e.srv.URL)
			conn, err := net.Dial("tcp", u.Host)
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(conn, "GET /api/v1/messages/pending?wait=60&agent_instance_id=%s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n\r\n", session, u.Host, key)
			return func() { conn.Close() }
		}},
		{"REST request cancelled", func(session string) func() {
			ctx, cancel := context.WithCancel(ctx)
			go perfDo(ctx, http.DefaultClient, "GET", e.srv.URL+"/api/v1/messages/pending?wait=60&agent_instance_id="+session, key, nil)
			return cancel
		}},
		{"MCP streamable call cancelled", func(session string) func() {
			cs, err := perfMCPConnect(ctx, e.srv.URL, key, http.DefaultTransport)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cs.Close() })
			ctx, cancel := context.WithCancel(ctx)
			go cs.CallTool(ctx, &mcp.CallToolParams{Name: "ask_question", Arguments: map[string]any{"agent_instance_id": session, "question_text": "?"}})
			return cancel
		}},
		{"MCP SSE call cancelled", func(session string) func() {
			cs := faultSSEConnect(t, e, key, nil)
			ctx, cancel := context.WithCancel(ctx)
			go cs.CallTool(ctx, &mcp.CallToolParams{Name: "ask_question", Arguments: map[string]any{"agent_instance_id": session, "question_text": "?"}})
			return cancel
		}},
		{"MCP SSE connection dropped", func(session string) func() {
			conns := &faultConns{}
			cs := faultSSEConnect(t, e, key, conns)
			go cs.CallTool(ctx, &mcp.CallToolParams{Name: "ask_question", Arguments: map[string]any{"agent_instance_id": session, "question_text": "?"}})
			return conns.closeAll
		}},
	} {
		session := newSession()
		hangUp := c.start(session)
		replicaWaitFor(t, c.name+": the wait to start", func() bool { return e.a.hub.waiters() == 1 })
		at := time.Now()
		hangUp()
		for e.a.hub.waiters() != 0 {
			if time.Since(at) > 2*time.Second {
				t.Fatalf("%s: the waiter is still there %v after the client hung up", c.name, time.Since(at))
			}
			time.Sleep(time.Millisecond)
		}
		t.Logf("%s: waiter gone %v after the hang-up", c.name, time.Since(at).Round(time.Microsecond))
	}
}

// faultConns dials TCP and remembers the connections, so a test can drop
// them all at once as a dying client or a broken network would.
type faultConns struct {
	mu    sync.Mutex
	conns []net.Conn
}

func (f *faultConns) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err == nil {
		f.mu.Lock()
		f.conns = append(f.conns, c)
		f.mu.Unlock()
	}
	return c, err
}

func (f *faultConns) closeAll() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.conns {
		c.Close()
	}
}

// faultSSEConnect connects the go-sdk client over the legacy SSE transport,
// dialling through conns if it is not nil.
func faultSSEConnect(t *testing.T, e *testEnv, key string, conns *faultConns) *mcp.ClientSession {
	t.Helper()
	tr := &http.Transport{}
	if conns != nil {
		tr.DialContext = conns.dial
	}
	cl := mcp.NewClient(&mcp.Implementation{Name: "sse", Version: "1"}, nil)
	cs, err := cl.Connect(context.Background(), &mcp.SSEClientTransport{Endpoint: e.srv.URL + "/mcp/sse",
		HTTPClient: &http.Client{Transport: perfBearer{key: key, base: tr}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cs.Close() })
	return cs
}

// ---- SIGTERM ----

var faultAgentKeyLine = regexp.MustCompile(`Agent key for [^\n]*:\n\s+(\S+)`)

// TestFaultSIGTERM runs the real binary in embedded mode, drives agent
// messages from 16 clients with REST long-polls and MCP questions waiting,
// and sends SIGTERM: in-flight requests finish, the waits end with a clean
// error (REST 503, MCP tool error), the process exits 0, its PostgreSQL
// stops (no process left for the folder), and every message a client saw
// a 200 for is stored exactly once.
func TestFaultSIGTERM(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and runs an embedded PostgreSQL")
	}
	t.Parallel()
	bin := perfBuildBinary(t)
	data := filepath.Join(faultTempDir(t), "data")
	srv := perfStartServer(t, bin, "AGENTLINE_DATA="+data)
	m := faultAgentKeyLine.FindStringSubmatch(srv.stdout.String())
	if m == nil {
		t.Fatalf("no agent key in the first-run output:\n%s", srv.stdout.String())
	}
	key := m[1]
	ctx := context.Background()
	c := perfClient()

	// Waiters: REST long-polls and MCP questions, each in its own session.
	newSession := func() string {
		s := newUUID()
		code, body, err := perfDo(ctx, c, "POST", srv.url+"/api/v1/messages/agent", key,
			map[string]any{"agent_instance_id": s, "agent_type": "sigterm", "content": "start"})
		if err != nil || code != 200 {
			t.Fatalf("create session: %d %v %v", code, body, err)
		}
		return s
	}
	type ended struct {
		kind, how string
	}
	waits := make(chan ended, 6)
	for i := 0; i < 3; i++ {
		s := newSession()
		go func() {
			code, body, err := perfDo(ctx, c, "GET", srv.url+"/api/v1/messages/pending?wait=60&agent_instance_id="+s, key, nil)
			waits <- ended{"rest", fmt.Sprintf("%d %v %v", code, body["detail"], err)}
		}()
		s2 := newSession()
		go func() {
			cs, err := perfMCPConnect(ctx, srv.url, key, http.DefaultTransport)
			if err != nil {
				waits <- ended{"mcp", "connect: " + err.Error()}
				return
			}
			defer cs.Close()
			res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: "ask_question",
				Arguments: map[string]any{"agent_instance_id": s2, "question_text": "Still there?"}})
			if err != nil {
				waits <- ended{"mcp", "transport error: " + err.Error()}
				return
			}
			waits <- ended{"mcp", fmt.Sprintf("isError=%v %s", res.IsError, mcpTextOf(res))}
		}()
	}

	// Load: 16 clients, each its own session, posting steps until the
	// server goes away. Every 200 is recorded.
	type sent struct {
		content, id string
		ok          bool // the client saw 200
	}
	var mu sync.Mutex
	var log []sent
	var wg sync.WaitGroup
	stopLoad := make(chan struct{})
	statuses := map[int]int{}
	for w := 0; w < 16; w++ {
		s := newSession()
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stopLoad:
					return
				default:
				}
				content := fmt.Sprintf("load %d-%d", w, i)
				code, body, err := perfDo(ctx, c, "POST", srv.url+"/api/v1/messages/agent", key,
					map[string]any{"agent_instance_id": s, "content": content})
				id, _ := body["message_id"].(string)
				mu.Lock()
				log = append(log, sent{content, id, err == nil && code == 200})
				if err == nil {
					statuses[code]++
				}
				mu.Unlock()
				if err != nil {
					return // the server is gone
				}
			}
		}()
	}
	time.Sleep(1500 * time.Millisecond)
	if err := srv.stop(t); err != nil {
		t.Errorf("exit after SIGTERM: %v, want 0\n%s", err, srv.stderr.String())
	}
	close(stopLoad)
	wg.Wait()

	for i := 0; i < 6; i++ {
		select {
		case w := <-waits:
			want := "503 " // REST: 503 with a detail
			if w.kind == "mcp" {
				want = "isError=true" // MCP: a tool error
			}
			if !strings.HasPrefix(w.how, want) || !strings.Contains(w.how, "shutting down") {
				t.Errorf("%s wait ended by SIGTERM: %s, want a clean error saying the server shuts down", w.kind, w.how)
			}
			t.Logf("%s wait ended: %s", w.kind, w.how)
		case <-time.After(10 * time.Second):
			t.Fatal("a wait did not end with the server")
		}
	}
	for code, n := range statuses {
		if code != 200 {
			t.Errorf("%d load requests answered %d during shutdown, want every answered request to succeed", n, code)
		}
	}

	// The embedded PostgreSQL is gone.
	pgDir := filepath.Join(data, "pg")
	if _, err := os.Stat(filepath.Join(pgDir, "postmaster.pid")); err == nil {
		t.Errorf("postmaster.pid still in %s after the server exited", pgDir)
	}
	if pids := faultPostgresFor(pgDir); len(pids) > 0 {
		t.Errorf("postgres processes left for %s: %v", pgDir, pids)
	}

	// Every 200 is stored exactly once; nothing is stored twice.
	pg, err := openLocalPG(ctx, pgDir, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	defer pg.stop()
	db, err := sql.Open("postgres", pg.dsn("agentline"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	stored := map[string]int{}
	ids := map[string]string{}
	rows, err := db.Query(`SELECT id, content FROM messages WHERE content LIKE 'load %'`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id, content string
		if err := rows.Scan(&id, &content); err != nil {
			t.Fatal(err)
		}
		stored[content]++
		ids[content] = id
	}
	rows.Close()
	oks := 0
	for _, s := range log {
		switch {
		case s.ok && stored[s.content] != 1:
			t.Errorf("%q: the client saw 200, stored %d times", s.content, stored[s.content])
		case s.ok && ids[s.content] != s.id:
			t.Errorf("%q: the client saw message %s, stored as %s", s.content, s.id, ids[s.content])
		case stored[s.content] > 1:
			t.Errorf("%q stored %d times", s.content, stored[s.content])
		}
		if s.ok {
			oks++
		}
	}
	t.Logf("%d steps acknowledged before and during shutdown, all stored once; %d requests cut off by the shutdown (%d of those stored); exit clean",
		oks, len(log)-oks, len(stored)-oks)
}

// faultPostgresFor lists postgres processes whose command line names dir.
func faultPostgresFor(dir string) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		cmd := strings.ReplaceAll(string(b), "\x00", " ")
		if strings.Contains(cmd, "postgres") && strings.Contains(cmd, dir) {
			pids = append(pids, pid)
		}
	}
	return pids
}
