package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"database/sql"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// The edges: a person's words survive cut calls, vanished clients, revoked
// keys, upgrades, shutdowns and ended sessions.

// withCallLimit sets ASK_QUESTION_CALL_LIMIT.
func withCallLimit(d time.Duration) envOption { return func(a *app) { a.cfg.callLimit = d } }

// withKeyRecheck sets KEY_RECHECK.
func withKeyRecheck(d time.Duration) envOption { return func(a *app) { a.cfg.keyRecheck = d } }

// Feedback queued before a question is handed over only by a call that
// returns it: a call cut while waiting loses nothing.
func TestAskFeedbackSurvivesCutCall(t *testing.T) {
	t.Parallel()
	for _, then := range []string{"reask", "log_step"} {
		t.Run(then, func(t *testing.T) {
			t.Parallel()
			e := newTestEnv(t)
			key := e.mustKey(t, "a@example.com", scopeAgent)
			conns := &mcpTConns{}
			cs := mcpTConnect(t, e, mcpTStreamable, key, mcpTDial{conns: conns})
			sid := mcpTNewSession(t, cs)
			mcpTAnswer(t, e, key, sid, "use the staging db")
			args := map[string]any{"agent_instance_id": sid, "question_text": "Which db?"}
			p := mcpTGo(context.Background(), cs, "ask_question", args, nil)
			mcpTWaiters(t, e, 1)
			conns.closeAll() // the client cuts the call
			mcpTWaiters(t, e, 0)
			<-p.done

			cs2 := mcpTConnect(t, e, mcpTStreamable, key, mcpTDial{})
			var fb []string
			if then == "reask" {
				p := mcpTGo(context.Background(), cs2, "ask_question", args, nil)
				mcpTWaiters(t, e, 1)
				mcpTAnswer(t, e, key, sid, "staging")
				out := mcpTOut(t, p.wait(t))
				if out["answer"] != "staging" {
					t.Fatalf("re-ask: %v", out)
				}
				fb = mcpTFeedback(t, out)
			} else {
				fb = mcpTFeedback(t, mcpTOut(t, mcpTCall(t, cs2, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "went on"})))
			}
			if !slices.Equal(fb, []string{"use the staging db"}) {
				t.Fatalf("feedback after the cut call = %q, want it once", fb)
			}
			again := mcpTFeedback(t, mcpTOut(t, mcpTCall(t, cs2, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "next"})))
			if len(again) != 0 {
				t.Fatalf("feedback delivered twice: %q", again)
			}
		})
	}
}

// edgeDropConns drops a client's connection the moment a tool result
// arrives: the server wrote the answer, the client never reads it.
type edgeDropConns struct {
	mu      sync.Mutex
	dropped bool
}

type edgeDropConn struct {
	net.Conn
	d *edgeDropConns
}

func (c *edgeDropConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if bytes.Contains(p[:n], []byte(`answer`)) {
		c.d.mu.Lock()
		c.d.dropped = true
		c.d.mu.Unlock()
		c.Conn.Close()
		return 0, io.ErrUnexpectedEOF
	}
	return n, err
}

func (d *edgeDropConns) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &edgeDropConn{Conn: conn, d: d}, nil
}

// An answer taken by a call whose client vanished is returned again to the
// same question asked again; after a new step it is a new question.
func TestAskAnswerSurvivesVanishedClient(t *testing.T) {
	t.Parallel()
	for _, tr := range []mcpTTransport{mcpTStreamable, mcpTStreamOld} {
		t.Run(tr.name, func(t *testing.T) {
			t.Parallel()
			e := newTestEnv(t, withCallLimit(time.Second))
			key := e.mustKey(t, "a@example.com", scopeAgent)
			cs := mcpTConnect(t, e, tr, key, mcpTDial{})
			sid := mcpTNewSession(t, cs)
			args := map[string]any{"agent_instance_id": sid, "question_text": "Ship it?"}

			drop := &edgeDropConns{}
			hc := &http.Client{Transport: mcpTRT{key: key, base: &http.Transport{DialContext: drop.dial}}}
			c := mcp.NewClient(&mcp.Implementation{Name: "vanishing", Version: "1"}, nil)
			vcs, err := c.Connect(context.Background(), &mcp.StreamableClientTransport{Endpoint: e.srv.URL + tr.path, HTTPClient: hc},
				&mcp.ClientSessionOptions{ProtocolVersion: tr.proto})
			if err != nil {
				t.Fatal(err)
			}
			defer vcs.Close()
			p := mcpTGo(context.Background(), vcs, "ask_question", args, nil)
			mcpTWaiters(t, e, 1)
			mcpTAnswer(t, e, key, sid, "yes, ship it")
			<-p.done
			drop.mu.Lock()
			dropped := drop.dropped
			drop.mu.Unlock()
			if !dropped || p.err == nil {
				t.Fatalf("the client saw the result (dropped=%v err=%v)", dropped, p.err)
			}

			for i := 0; i < 2; i++ { // however often it is asked again
				out := mcpTOut(t, mcpTCall(t, cs, "ask_question", args))
				if out["status"] != "answered" || out["answer"] != "yes, ship it" {
					t.Fatalf("re-ask %d after the vanished call: %v", i, out)
				}
			}
			if n := mcpTQuestions(t, e, sid); n != 1 {
				t.Fatalf("%d questions stored, want 1", n)
			}
			// A step in between: the same text is a real second question.
			mcpTOut(t, mcpTCall(t, cs, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "shipped"}))
			out := mcpTOut(t, mcpTCall(t, cs, "ask_question", args))
			if out["status"] != "pending" || out["answer"] != nil {
				t.Fatalf("second question: %v", out)
			}
			if n := mcpTQuestions(t, e, sid); n != 2 {
				t.Fatalf("%d questions stored, want 2", n)
			}
		})
	}
}

// edgeListenRT adds the key and reports when a subscriptions/listen stream
// ends.
type edgeListenRT struct {
	key   string
	ended chan struct{}
	once  sync.Once
}

type edgeNotifyBody struct {
	io.ReadCloser
	done func()
}

func (b *edgeNotifyBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil {
		b.done()
	}
	return n, err
}

func (rt *edgeListenRT) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+rt.key)
	resp, err := http.DefaultTransport.RoundTrip(r)
	if err == nil && r.Header.Get("Mcp-Method") == "subscriptions/listen" {
		resp.Body = &edgeNotifyBody{resp.Body, func() { rt.once.Do(func() { close(rt.ended) }) }}
	}
	return resp, err
}

// edgeListen connects a 2026-07-28 client that holds a subscriptions/listen
// stream open, as Claude Code does, and returns a channel closed when that
// stream ends.
func edgeListen(t *testing.T, e *testEnv, key string) <-chan struct{} {
	t.Helper()
	rt := &edgeListenRT{key: key, ended: make(chan struct{})}
	c := mcp.NewClient(&mcp.Implementation{Name: "listener", Version: "1"},
		&mcp.ClientOptions{ToolListChangedHandler: func(context.Context, *mcp.ToolListChangedRequest) {}})
	cs, err := c.Connect(context.Background(), &mcp.StreamableClientTransport{Endpoint: e.srv.URL + "/mcp", HTTPClient: &http.Client{Transport: rt}},
		&mcp.ClientSessionOptions{ProtocolVersion: "2026-07-28"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { go cs.Close() })
	return rt.ended
}

func edgeWithin(t *testing.T, what string, d time.Duration, ch <-chan struct{}) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(d):
		t.Fatalf("%s: still open after %s", what, d)
	}
}

// Every long-lived connection ends soon after its key is revoked, expires or
// loses its user.
func TestKeyRevocationEndsLongConnections(t *testing.T) {
	t.Parallel()
	for _, how := range []string{"revoked", "expired", "user removed"} {
		t.Run(how, func(t *testing.T) {
			t.Parallel()
			e := newTestEnv(t, withKeyRecheck(200*time.Millisecond))
			ctx := context.Background()
			uid := e.mustUserID(t, "p@example.com")
			var ttl time.Duration
			if how == "expired" {
				ttl = 4 * time.Second
			}
			key, err := issueKey(ctx, e.a.store, e.signer, "p@example.com", "k", scopePerson, ttl)
			if err != nil {
				t.Fatal(err)
			}
			cs := mcpTConnect(t, e, mcpTStreamable, key, mcpTDial{})
			sid := mcpTNewSession(t, cs)
			sse := mcpTConnect(t, e, mcpTSSE, key, mcpTDial{})

			stream := uiOpenStream(t, e, key, "")
			if ev := stream.next(t, 5*time.Second); ev.Name != "ready" {
				t.Fatalf("first event %q", ev.Name)
			}
			poll := restLongPoll(t, e, ctx, key, restPendingPath(sid, "", 60))
			ask := mcpTGo(ctx, cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Still there?"}, nil)
			sseAsk := mcpTGo(ctx, sse, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Still there?"}, nil)
			listen := edgeListen(t, e, key)
			mcpTWaiters(t, e, 4) // the stream, the poll, two asks

			switch how {
			case "revoked":
				if err := e.a.store.revokeAPIKey(ctx, hashToken(key)); err != nil {
					t.Fatal(err)
				}
			case "user removed":
				if _, err := e.db.Exec(`DELETE FROM users WHERE id = $1`, uid); err != nil {
					t.Fatal(err)
				}
			}
			within := 3 * time.Second
			if how == "expired" {
				within = 8 * time.Second
			}
			deadline := time.Now().Add(within)
			ev := stream.next(t, time.Until(deadline))
			for ev.Name == "session" || ev.Name == "message" || ev.Comment != "" {
				ev = stream.next(t, time.Until(deadline))
			}
			if ev.Name != "error" || !strings.Contains(ev.Data, "key revoked") {
				t.Fatalf("event stream: got %q %q, want an error event", ev.Name, ev.Data)
			}
			select {
			case r := <-poll:
				if r.code != http.StatusUnauthorized {
					t.Fatalf("long-poll: %d %s, want 401", r.code, r.raw)
				}
			case <-time.After(time.Until(deadline)):
				t.Fatal("long-poll still waiting")
			}
			for name, p := range map[string]*mcpTPending{"streamable": ask, "sse": sseAsk} {
				select {
				case <-p.done:
				case <-time.After(time.Until(deadline)):
					t.Fatalf("%s ask_question still waiting", name)
				}
				if p.err == nil && !p.res.IsError {
					t.Fatalf("%s ask_question: %s, want a tool error", name, mcpTText(p.res))
				}
			}
			edgeWithin(t, "subscriptions/listen stream", time.Until(deadline)+time.Second, listen)
		})
	}
}

// A database made by the first release keeps exactly-once delivery after
// the upgrade: a message pending delivered there is not handed out again.
func TestUpgradeFromFirstReleaseKeepsExactlyOnce(t *testing.T) {
	t.Parallel()
	v1, err := os.ReadFile("testdata/schema-v1.sql")
	if err != nil {
		t.Fatal(err)
	}
	dsn := mustCreateDB(t, "v1", "template0")
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()
	if _, err := db.ExecContext(ctx, string(v1)); err != nil {
		t.Fatalf("first release's schema: %v", err)
	}
	// What the first release wrote: a question, its answer taken by a
	// pending poll (the read pointer moved past it), and a plain session
	// whose feedback was read.
	var uid, sid, qid, aid string
	err = db.QueryRowContext(ctx, `
		WITH u AS (INSERT INTO users (email) VALUES ('a@example.com') RETURNING id),
		ua AS (INSERT INTO user_agents (user_id, name) SELECT id, 'claude-code' FROM u RETURNING id, user_id),
		s AS (INSERT INTO agent_instances (id, user_agent_id, user_id) SELECT gen_random_uuid(), id, user_id FROM ua RETURNING id, user_id)
		SELECT s.user_id, s.id FROM s`).Scan(&uid, &sid)
	if err != nil {
		t.Fatal(err)
	}
	add := func(sender, content string, asks bool) (id string, seq int64) {
		t.Helper()
		err := db.QueryRowContext(ctx, `
			INSERT INTO messages (agent_instance_id, user_id, sender_type, content, requires_user_input)
			VALUES ($1, $2, $3, $4, $5) RETURNING id, seq`, sid, uid, sender, content, asks).Scan(&id, &seq)
		if err != nil {
			t.Fatal(err)
		}
		return id, seq
	}
	qid, _ = add("AGENT", "Ship it?", true)
	aid, aseq := add("USER", "yes", false)
	if _, err := db.ExecContext(ctx, `UPDATE agent_instances SET last_read_message_id = $2, last_read_seq = $3 WHERE id = $1`, sid, aid, aseq); err != nil {
		t.Fatal(err)
	}
	_ = qid
	if err := migrate(ctx, db); err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	e := newTestEnvOn(t, dsn, priv, withCallLimit(time.Second))
	key := e.mustKey(t, "a@example.com", scopeAgent)
	cs := mcpTConnect(t, e, mcpTStreamable, key, mcpTDial{})
	out := mcpTOut(t, mcpTCall(t, cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Ship it?"}))
	if out["answer"] != nil {
		t.Fatalf("the answer pending delivered before the upgrade was handed out again: %v", out)
	}
	if code, body := e.call(t, "GET", restPendingPath(sid, "", 0), key, nil); code != 200 || strings.Contains(string(body), `"yes"`) {
		t.Fatalf("pending after upgrade: %d %s", code, body)
	}
}

// Start-up gives up when its context ends, even with the database gone.
func TestHubStartHonoursContext(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		h, err := newHub(ctx, "host="+dir+" port=1 sslmode=disable connect_timeout=1", testLogger(t))
		if err == nil {
			h.close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("newHub succeeded without a database")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("newHub ignored its context")
	}
}

func testLogger(t *testing.T) *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// Shutdown ends subscriptions/listen streams at once.
func TestShutdownEndsListenStreams(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopeAgent)
	listen := edgeListen(t, e, key)
	time.Sleep(100 * time.Millisecond)
	e.stop()
	edgeWithin(t, "subscriptions/listen stream after shutdown began", 2*time.Second, listen)
}

// A handler reached without a verified caller refuses with 401, never 500.
func TestHandlersWithoutCallerRefuse(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	sid := newUUID()
	for _, c := range []struct {
		method, path, body string
		h                  http.Handler
	}{
		{"POST", "/api/v1/messages/agent", `{"agent_instance_id":"` + sid + `","agent_type":"x","content":"hi"}`, e.a.handleAgentMessage()},
		{"POST", "/api/v1/messages/user", `{"agent_instance_id":"` + sid + `","content":"hi"}`, e.a.handleUserMessage()},
		{"GET", restPendingPath(sid, "", 0), "", e.a.handlePending()},
		{"POST", "/api/v1/sessions/end", `{"agent_instance_id":"` + sid + `"}`, e.a.handleEndSession()},
		{"GET", "/api/v1/sessions", "", e.a.handleSessions()},
		{"GET", "/api/v1/events", "", e.a.handleEvents()},
	} {
		rec := httptest.NewRecorder()
		c.h.ServeHTTP(rec, httptest.NewRequest(c.method, c.path, strings.NewReader(c.body)))
		if rec.Code != http.StatusUnauthorized {
			t.Errorf("%s %s without a caller: %d %s", c.method, c.path, rec.Code, rec.Body)
		}
	}
}

// Question timeouts are judged by the database's clock: an app server whose
// clock is hours ahead of the database's does not time questions out early.
func TestQuestionTimeoutUsesDatabaseClock(t *testing.T) {
	t.Parallel()
	db, dsn := mustDB(t)
	// The database's clock runs two hours behind this process's: now() and
	// every default that reads it.
	for _, q := range []string{
		`CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql STABLE AS $$ SELECT pg_catalog.now() - interval '2 hours' $$`,
		`ALTER TABLE messages ALTER COLUMN created_at SET DEFAULT public.now()`,
		`ALTER TABLE agent_instances ALTER COLUMN last_activity_at SET DEFAULT public.now()`,
		`ALTER DATABASE ` + dbNameOf(t, dsn) + ` SET search_path = public, pg_catalog`,
	} {
		if _, err := db.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	e := newTestEnvOn(t, dsn, priv, withCallLimit(time.Second), func(a *app) { a.cfg.questionTimeout = time.Hour })
	key := e.mustKey(t, "a@example.com", scopeAgent)
	cs := mcpTConnect(t, e, mcpTStreamable, key, mcpTDial{})
	sid := mcpTNewSession(t, cs)
	res := mcpTCall(t, cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Fresh?"})
	if out := mcpTOut(t, res); out["status"] != "pending" {
		t.Fatalf("a question asked a second ago: %v", out)
	}
}

// Ending a session ends every long-poll on it at once, and pending says
// where the session stands.
func TestPendingReturnsWhenSessionEnds(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopeAgent)
	sid := newUUID()
	restStep(t, e, key, sid, "working", false)
	if out := restOK(t, e, "GET", restPendingPath(sid, "", 0), key, nil); out["session_status"] != "ACTIVE" {
		t.Fatalf("pending: %v, want session_status ACTIVE", out)
	}
	poll := restLongPoll(t, e, context.Background(), key, restPendingPath(sid, "", 30))
	restWaiters(t, e, 1)
	restOK(t, e, "POST", "/api/v1/sessions/end", key, map[string]any{"agent_instance_id": sid})
	select {
	case r := <-poll:
		if r.code != 200 || r.body["session_status"] != "COMPLETED" {
			t.Fatalf("long-poll on an ended session: %d %s", r.code, r.raw)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the long-poll kept waiting on an ended session")
	}
}

// The embedded PostgreSQL's socket is its owner's alone.
func TestLocalPGSocketMode(t *testing.T) {
	p := openPG(t, pgTestDir(t))
	fi, err := os.Stat(p.sockDir + "/.s.PGSQL.5432")
	if err != nil {
		t.Fatal(err)
	}
	if mode := fi.Mode().Perm(); mode != 0o700 {
		t.Fatalf("socket mode %o, want 700", mode)
	}
}
