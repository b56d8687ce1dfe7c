package main

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"database/sql"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// pgbouncerBin is Debian's pgbouncer (.ci/run installs it).
func pgbouncerBin() string {
	for _, p := range []string{"/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if p, err := exec.LookPath("pgbouncer"); err == nil {
		return p
	}
	return ""
}

// dsnParts returns host, port, user and password of a key=value or URL DSN.
func dsnParts(dsn string) (host, port, usr, password string) {
	host, port, usr = "localhost", "5432", "postgres"
	if u, err := url.Parse(dsn); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		if u.Hostname() != "" {
			host = u.Hostname()
		}
		if u.Port() != "" {
			port = u.Port()
		}
		if u.User != nil {
			usr = u.User.Username()
			password, _ = u.User.Password()
		}
		if h := u.Query().Get("host"); h != "" {
			host = h
		}
		return
	}
	for _, f := range strings.Fields(dsn) {
		k, v, _ := strings.Cut(f, "=")
		v = strings.Trim(v, "'")
		switch k {
		case "host":
			host = v
		case "port":
			port = v
		case "user":
			usr = v
		case "password":
			password = v
		}
	}
	return
}

// startPgBouncer runs a real PgBouncer in pool_mode=transaction in front of
// the test PostgreSQL and returns the DSN of database name through it. As
// root it runs as the postgres OS user (PgBouncer refuses root).
func startPgBouncer(t *testing.T, name string) string {
	t.Helper()
	bin := pgbouncerBin()
	if bin == "" {
		t.Skip("PgBouncer test skipped: pgbouncer is not installed (apt-get install pgbouncer; .ci/run installs it)")
	}
	host, port, usr, password := dsnParts(testAdminDSN)
	dir, err := os.MkdirTemp("", "agentline-pgbouncer-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	listenPort := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	target := fmt.Sprintf("host=%s port=%s user=%s", host, port, usr)
	if password != "" {
		target += " password=" + password
	}
	ini := fmt.Sprintf(`[databases]
* = %s

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = any
pool_mode = transaction
max_client_conn = 400
default_pool_size = 20
ignore_startup_parameters = extra_float_digits
logfile = %s
pidfile = %s
`, target, listenPort, filepath.Join(dir, "pgbouncer.log"), filepath.Join(dir, "pgbouncer.pid"))
	iniPath := filepath.Join(dir, "pgbouncer.ini")
	if err := os.WriteFile(iniPath, []byte(ini), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, iniPath)
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Skipf("PgBouncer test skipped: running as root and there is no postgres OS user to run pgbouncer as: %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		os.Chown(dir, uid, gid)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	}
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start pgbouncer: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	// binary_parameters=yes, as agentline sets it for a pooled DATABASE_URL.
	dsn := fmt.Sprintf("host=127.0.0.1 port=%d user=%s dbname=%s sslmode=disable binary_parameters=yes", listenPort, usr, name)
	if password != "" {
		dsn += " password=" + password
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		db, _ := sql.Open("postgres", dsn)
		err := db.Ping()
		db.Close()
		if err == nil {
			return dsn
		}
		select {
		case <-exited:
			log, _ := os.ReadFile(filepath.Join(dir, "pgbouncer.log"))
			t.Fatalf("pgbouncer exited: %s\n%s", out.String(), log)
		default:
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "pgbouncer.log"))
			t.Fatalf("pgbouncer does not answer: %v\n%s\n%s", err, out.String(), log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// dbNameOf returns the dbname of a test DSN.
func dbNameOf(t *testing.T, dsn string) string {
	t.Helper()
	if u, err := url.Parse(dsn); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		return strings.TrimPrefix(u.Path, "/")
	}
	i := strings.LastIndex(dsn, "dbname=")
	if i < 0 {
		t.Fatalf("no dbname in %q", dsn)
	}
	return strings.Fields(dsn[i+len("dbname="):])[0]
}

// withPool makes an app query through dsn (its hub still LISTENs on the
// env's direct DSN, as DATABASE_LISTEN_URL would have it).
func withPool(t *testing.T, dsn string) envOption {
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return func(a *app) { a.store.db = db }
}

// TestPgBouncerProbe: LISTEN through PgBouncer in transaction mode does not
// get its notifications, and the start-up check says so; with a direct
// listener URL the check passes; serve refuses a pooled DATABASE_URL
// without DATABASE_LISTEN_URL, naming the variable to set.
func TestPgBouncerProbe(t *testing.T) {
	t.Parallel()
	_, direct := mustDB(t)
	pooled := startPgBouncer(t, dbNameOf(t, direct))
	ctx := context.Background()
	db, err := sql.Open("postgres", pooled)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	st := &store{db: db}
	if err := probeListen(ctx, st, direct, true); err != nil {
		t.Fatalf("direct listener: %v", err)
	}
	err = probeListen(ctx, st, pooled, false)
	if err == nil || !strings.Contains(err.Error(), "DATABASE_LISTEN_URL") {
		t.Fatalf("listener through the pooler: %v; want the LISTEN check to fail and name DATABASE_LISTEN_URL", err)
	}
	t.Logf("refusal: %v", err)
	if err := probeListen(ctx, st, pooled, true); err == nil || !strings.HasPrefix(err.Error(), "DATABASE_LISTEN_URL") {
		t.Errorf("DATABASE_LISTEN_URL through the pooler: %v", err)
	}
	// Another database behind DATABASE_LISTEN_URL: refused too.
	_, otherDB := mustDB(t)
	if err := probeListen(ctx, st, otherDB, true); err == nil {
		t.Errorf("a listener on another database passed the check")
	}

	keys := t.TempDir()
	if err := keygen(keys); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"DATABASE_URL": pooled, "JWT_PUBLIC_KEY": filepath.Join(keys, "jwt-public.pem"), "MCP_SERVER_PORT": "0"}
	_, _, err = authRun([]string{"serve"}, env)
	if err == nil || !strings.Contains(err.Error(), "DATABASE_LISTEN_URL") {
		t.Fatalf("serve with a pooled DATABASE_URL: %v", err)
	}
}

// TestPgBouncerFlows: two replicas whose every query goes through PgBouncer
// in transaction mode (LISTEN direct, as DATABASE_LISTEN_URL sets it): the
// REST and MCP flows work, a long-poll and an MCP question waiting on one
// replica are answered through the other, the read API, the event stream,
// request-input and end work, keys are listed and revoked, and the schema
// migrates through the pooler: every statement of the store runs there.
func TestPgBouncerFlows(t *testing.T) {
	t.Parallel()
	_, direct := mustDB(t)
	pooled := startPgBouncer(t, dbNameOf(t, direct))
	poolDB, err := sql.Open("postgres", pooled)
	if err != nil {
		t.Fatal(err)
	}
	defer poolDB.Close()
	if err := migrate(context.Background(), poolDB); err != nil {
		t.Fatalf("migrate through the pooler: %v", err)
	}
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	a := newTestEnvOn(t, direct, priv, withPool(t, pooled))
	b := newTestEnvOn(t, direct, priv, withPool(t, pooled))
	agent := a.mustKey(t, "pool@example.com", scopeAgent)
	person := a.mustKey(t, "pool@example.com", scopePerson)

	// REST, replica A and B alike.
	sid := newUUID()
	for i, e := range []*testEnv{a, b, a} {
		if code, body := e.call(t, "POST", "/api/v1/messages/agent", agent, map[string]any{
			"agent_instance_id": sid, "agent_type": "claude-code", "content": fmt.Sprint("step ", i)}); code != 200 {
			t.Fatalf("agent message %d: %d %s", i, code, body)
		}
	}
	if code, body := b.call(t, "GET", "/api/v1/sessions/"+sid+"/messages", person, nil); code != 200 || len(mustJSON(t, body)["messages"].([]any)) != 3 {
		t.Fatalf("timeline: %d %s", code, body)
	}

	// A long-poll on A, answered through B.
	polled := make(chan []byte, 1)
	go func() {
		_, body := a.call(t, "GET", "/api/v1/messages/pending?wait=30&agent_instance_id="+sid, agent, nil)
		polled <- body
	}()
	waitFor(t, "the long-poll to wait", func() bool { return a.a.hub.waiters() > 0 })
	sent := time.Now()
	if code, body := b.call(t, "POST", "/api/v1/messages/user", person, map[string]any{"agent_instance_id": sid, "content": "from B", "mark_as_read": false}); code != 200 {
		t.Fatalf("user message: %d %s", code, body)
	}
	select {
	case body := <-polled:
		if !strings.Contains(string(body), "from B") {
			t.Fatalf("long-poll: %s", body)
		}
		t.Logf("long-poll on A answered through B after %s", time.Since(sent).Round(time.Millisecond))
	case <-time.After(10 * time.Second):
		t.Fatal("the long-poll on A never saw B's message")
	}

	// MCP on A: log_step, then ask_question answered through B.
	s, err := authMCP(t, a, agent, false)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := s.CallTool(ctx, &mcp.CallToolParams{Name: "log_step", Arguments: map[string]any{"agent_instance_id": sid, "step_description": "mcp step"}})
	if err != nil || res.IsError {
		t.Fatalf("log_step: %v %+v", err, res)
	}
	answered := make(chan string, 1)
	go func() {
		res, err := s.CallTool(ctx, &mcp.CallToolParams{Name: "ask_question", Arguments: map[string]any{"agent_instance_id": sid, "question_text": "through the pooler?"}})
		if err != nil {
			answered <- "error: " + err.Error()
			return
		}
		b, _ := json.Marshal(res.StructuredContent)
		answered <- string(b)
	}()
	waitFor(t, "the question to wait", func() bool { return a.a.ops.metrics.questionsWaited.Load() > 0 })
	if code, body := b.call(t, "POST", "/api/v1/messages/user", person, map[string]any{"agent_instance_id": sid, "content": "yes, via B", "mark_as_read": false}); code != 200 {
		t.Fatalf("answer: %d %s", code, body)
	}
	select {
	case got := <-answered:
		if !strings.Contains(got, `"answer":"yes, via B"`) {
			t.Fatalf("ask_question: %s", got)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("ask_question on A never got B's answer")
	}

	// Keys through the pooler.
	code, body := b.call(t, "GET", "/api/v1/keys", person, nil)
	if code != 200 || len(mustJSON(t, body)["keys"].([]any)) != 2 {
		t.Fatalf("keys: %d %s", code, body)
	}
	// The read API, the event stream, request-input and end: the rest of
	// the statements, through the pooler.
	if code, body := a.call(t, "GET", "/api/v1/sessions?status=ACTIVE", person, nil); code != 200 || len(mustJSON(t, body)["sessions"].([]any)) != 1 {
		t.Fatalf("sessions: %d %s", code, body)
	}
	streamCtx, stopStream := context.WithTimeout(context.Background(), 15*time.Second)
	defer stopStream()
	req, _ := http.NewRequestWithContext(streamCtx, "GET", b.srv.URL+"/api/v1/events", nil)
	req.Header.Set("Authorization", "Bearer "+person)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("events: %v %v", err, resp)
	}
	defer resp.Body.Close()
	lines := bufio.NewScanner(resp.Body)
	next := func(prefix string) string {
		t.Helper()
		for lines.Scan() {
			if strings.HasPrefix(lines.Text(), prefix) {
				return lines.Text()
			}
		}
		t.Fatalf("event stream ended before %q: %v", prefix, lines.Err())
		return ""
	}
	next("event: ready")
	code, step := a.call(t, "POST", "/api/v1/messages/agent", agent, map[string]any{"agent_instance_id": sid, "content": "streamed step"})
	if code != 200 {
		t.Fatalf("agent message: %d %s", code, step)
	}
	next("event: message")
	if data := next("data: "); !strings.Contains(data, "streamed step") {
		t.Fatalf("event data %s", data)
	}
	if code, body := a.call(t, "PATCH", "/api/v1/messages/"+mustJSON(t, step)["message_id"].(string)+"/request-input", agent, nil); code != 200 {
		t.Fatalf("request-input: %d %s", code, body)
	}
	if code, body := b.call(t, "POST", "/api/v1/sessions/end", agent, map[string]any{"agent_instance_id": sid}); code != 200 {
		t.Fatalf("end: %d %s", code, body)
	}

	// Revoking through the pooler cuts the key off on both replicas.
	var agentKeyID string
	for _, k := range mustJSON(t, body)["keys"].([]any) {
		if k.(map[string]any)["scope"] == scopeAgent {
			agentKeyID = k.(map[string]any)["id"].(string)
		}
	}
	if code, body := a.call(t, "DELETE", "/api/v1/keys/"+agentKeyID, person, nil); code != 200 {
		t.Fatalf("revoke: %d %s", code, body)
	}
	if code := authAgentMessage(t, b, agent); code != 401 {
		t.Errorf("revoked key on the other replica: %d", code)
	}
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestListenURLConfig: DATABASE_LISTEN_URL is used for LISTEN when set, and
// refused without DATABASE_URL (the embedded database needs none).
func TestListenURLConfig(t *testing.T) {
	t.Parallel()
	env := map[string]string{"DATABASE_LISTEN_URL": "host=/tmp dbname=x"}
	if _, err := loadConfig(func(k string) string { return env[k] }); err == nil || !strings.Contains(err.Error(), "DATABASE_LISTEN_URL") {
		t.Errorf("DATABASE_LISTEN_URL without DATABASE_URL: %v", err)
	}
	env["DATABASE_URL"] = "host=pooler dbname=x"
	c, err := loadConfig(func(k string) string { return env[k] })
	if err != nil || c.listenDSN("host=pooler dbname=x") != "host=/tmp dbname=x" {
		t.Errorf("listen DSN %q, %v", c.listenDSN("host=pooler dbname=x"), err)
	}
	delete(env, "DATABASE_LISTEN_URL")
	if c, _ := loadConfig(func(k string) string { return env[k] }); c.listenDSN("host=pooler dbname=x") != "host=pooler dbname=x" {
		t.Errorf("without DATABASE_LISTEN_URL the listener uses %q", c.listenDSN("host=pooler dbname=x"))
	}
}
