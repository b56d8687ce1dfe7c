package main

// replica_test.go: two agentline replicas sharing one database. A wait on
// one is woken by a write through the other (the NOTIFY reaches every
// replica's hub), and MCP Streamable HTTP needs no sticky sessions.

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// replicaPair is two apps, each with its own pool and hub, over one database.
func replicaPair(t *testing.T) (a, b *testEnv) {
	t.Helper()
	a = newTestEnv(t)
	b = newTestEnvOn(t, a.dsn, a.signer)
	return a, b
}

// replicaWaitFor polls cond every few milliseconds for up to 10 s.
func replicaWaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// TestReplicaAskAnsweredThroughOther: an MCP ask_question waiting on replica
// A is answered by a REST user message sent to replica B.
func TestReplicaAskAnsweredThroughOther(t *testing.T) {
	t.Parallel()
	a, b := replicaPair(t)
	key := a.mustKey(t, "rep@example.com", scopeAgent)
	ctx := context.Background()
	cs, err := perfMCPConnect(ctx, a.srv.URL, key, http.DefaultTransport)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: "log_step", Arguments: map[string]any{"step_description": "started"}})
	if err != nil || res.IsError {
		t.Fatalf("log_step: %v %+v", err, res)
	}
	session := res.StructuredContent.(map[string]any)["agent_instance_id"].(string)

	type answer struct {
		res *mcp.CallToolResult
		err error
		at  time.Time
	}
	done := make(chan answer, 1)
	go func() {
		res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: "ask_question",
			Arguments: map[string]any{"agent_instance_id": session, "question_text": "Deploy now?"}})
		done <- answer{res, err, time.Now()}
	}()
	replicaWaitFor(t, "the question to wait on A", func() bool { return a.a.hub.waiters() == 1 })
	if n := b.a.hub.waiters(); n != 0 {
		t.Fatalf("B has %d waiters, want 0", n)
	}
	code, body := b.call(t, "POST", "/api/v1/messages/user", key, map[string]any{"agent_instance_id": session, "content": "yes, deploy"})
	if code != 200 {
		t.Fatalf("answer through B: %d %s", code, body)
	}
	sent := time.Now()
	select {
	case r := <-done:
		if r.err != nil || r.res.IsError {
			t.Fatalf("ask_question: %v %+v", r.err, r.res)
		}
		out := r.res.StructuredContent.(map[string]any)
		if out["answer"] != "yes, deploy" || out["status"] != "answered" {
			t.Fatalf("ask_question on A = %v, want B's answer", out)
		}
		t.Logf("answer through B reached A's ask_question %v after B answered", r.at.Sub(sent).Round(time.Microsecond))
	case <-time.After(10 * time.Second):
		t.Fatal("ask_question on A never got the answer sent through B")
	}
	replicaWaitFor(t, "A's waiter to go", func() bool { return a.a.hub.waiters() == 0 })
}

// TestReplicaLongPollAnsweredThroughOther: a REST long-poll on B returns the
// user message posted to A; then the other way round.
func TestReplicaLongPollAnsweredThroughOther(t *testing.T) {
	t.Parallel()
	a, b := replicaPair(t)
	key := a.mustKey(t, "poll@example.com", scopeAgent)
	for _, dir := range []struct {
		name         string
		waiter, post *testEnv
	}{{"wait on B, post to A", b, a}, {"wait on A, post to B", a, b}} {
		session := newUUID()
		code, body := dir.waiter.call(t, "POST", "/api/v1/messages/agent", key,
			map[string]any{"agent_instance_id": session, "agent_type": "replica", "content": "waiting for feedback"})
		if code != 200 {
			t.Fatalf("%s: create: %d %s", dir.name, code, body)
		}
		type poll struct {
			code int
			body []byte
			at   time.Time
		}
		done := make(chan poll, 1)
		go func() {
			code, body := dir.waiter.call(t, "GET", "/api/v1/messages/pending?wait=30&agent_instance_id="+session, key, nil)
			done <- poll{code, body, time.Now()}
		}()
		replicaWaitFor(t, dir.name+": the long-poll to wait", func() bool { return dir.waiter.a.hub.waiters() == 1 })
		code, body = dir.post.call(t, "POST", "/api/v1/messages/user", key,
			map[string]any{"agent_instance_id": session, "content": "feedback via the other replica", "mark_as_read": false})
		if code != 200 {
			t.Fatalf("%s: post: %d %s", dir.name, code, body)
		}
		sent := time.Now()
		select {
		case p := <-done:
			m := mustJSON(t, p.body)
			msgs, _ := m["messages"].([]any)
			if p.code != 200 || len(msgs) != 1 || msgs[0].(map[string]any)["content"] != "feedback via the other replica" {
				t.Fatalf("%s: long-poll = %d %s", dir.name, p.code, p.body)
			}
			t.Logf("%s: delivered %v after the post returned", dir.name, p.at.Sub(sent).Round(time.Microsecond))
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: the long-poll never returned", dir.name)
		}
	}
}

// replicaAlternate sends each request to the next of its hosts in turn and
// records what it saw: requests per host and any Mcp-Session-Id header.
type replicaAlternate struct {
	hosts []string // host:port
	key   string
	n     atomic.Int64

	mu         sync.Mutex
	perHost    map[string]int
	sessionIDs []string
}

func (r *replicaAlternate) RoundTrip(req *http.Request) (*http.Response, error) {
	host := r.hosts[int(r.n.Add(1)-1)%len(r.hosts)]
	req = req.Clone(req.Context())
	req.URL.Host, req.Host = host, host
	req.Header.Set("Authorization", "Bearer "+r.key)
	resp, err := http.DefaultTransport.RoundTrip(req)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.perHost[host]++
	if err == nil {
		if id := resp.Header.Get("Mcp-Session-Id"); id != "" {
			r.sessionIDs = append(r.sessionIDs, id)
		}
	}
	return resp, err
}

// TestReplicaStatelessAlternating: one MCP client whose consecutive HTTP
// requests alternate between two replicas, with no session id, runs a whole
// session: initialize, list tools, log steps (step numbers continue across
// replicas), ask a question answered while it waits, end the session.
func TestReplicaStatelessAlternating(t *testing.T) {
	t.Parallel()
	a, b := replicaPair(t)
	key := a.mustKey(t, "alt@example.com", scopeAgent)
	ua, _ := url.Parse(a.srv.URL)
	ub, _ := url.Parse(b.srv.URL)
	rt := &replicaAlternate{hosts: []string{ua.Host, ub.Host}, key: key, perHost: map[string]int{}}
	ctx := context.Background()
	c := mcp.NewClient(&mcp.Implementation{Name: "alternating", Version: "1"}, nil)
	cs, err := c.Connect(ctx, &mcp.StreamableClientTransport{Endpoint: a.srv.URL + "/mcp/", HTTPClient: &http.Client{Transport: rt}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	tools, err := cs.ListTools(ctx, nil)
	if err != nil || len(tools.Tools) != 4 { // 4: approve (issue 12)
		t.Fatalf("list tools: %v %+v", err, tools)
	}
	call := func(name string, args map[string]any) map[string]any {
		t.Helper()
		res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: name, Arguments: args})
		if err != nil || res.IsError {
			t.Fatalf("%s: %v %+v", name, err, res)
		}
		return res.StructuredContent.(map[string]any)
	}
	session := call("log_step", map[string]any{"step_description": "step 1"})["agent_instance_id"].(string)
	for i := 2; i <= 5; i++ {
		out := call("log_step", map[string]any{"agent_instance_id": session, "step_description": fmt.Sprintf("step %d", i)})
		if out["step_number"] != float64(i) {
			t.Fatalf("step %d: step_number = %v", i, out["step_number"])
		}
	}
	// The question waits on whichever replica the call reached; the answer
	// goes to A. Either way it arrives.
	got := make(chan map[string]any, 1)
	go func() {
		got <- call("ask_question", map[string]any{"agent_instance_id": session, "question_text": "Ship it?"})
	}()
	replicaWaitFor(t, "the question to wait", func() bool { return a.a.hub.waiters()+b.a.hub.waiters() == 1 })
	if code, body := a.call(t, "POST", "/api/v1/messages/user", key, map[string]any{"agent_instance_id": session, "content": "ship"}); code != 200 {
		t.Fatalf("answer: %d %s", code, body)
	}
	select {
	case out := <-got:
		if out["answer"] != "ship" {
			t.Fatalf("ask_question = %v", out)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the answer never arrived")
	}
	if out := call("end_session", map[string]any{"agent_instance_id": session}); out["final_status"] != statusCompleted {
		t.Fatalf("end_session = %v", out)
	}
	rt.mu.Lock()
	defer rt.mu.Unlock()
	if len(rt.sessionIDs) != 0 {
		t.Errorf("a replica answered with Mcp-Session-Id %q: Streamable HTTP must be stateless", rt.sessionIDs)
	}
	for _, h := range rt.hosts {
		if rt.perHost[h] < 4 {
			t.Errorf("replica %s served %d requests; the client should have alternated (%v)", h, rt.perHost[h], rt.perHost)
		}
	}
	t.Logf("requests per replica: %v", rt.perHost)
}

// TestReplicaProcesses runs two real `agentline serve` processes on
// different ports over one database: a question asked over MCP on the first
// is answered through the second's REST, and a long-poll on the second
// returns a message posted to the first.
func TestReplicaProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	t.Parallel()
	db, dsn := mustDB(t)
	pub, signer := perfKeys(t)
	bin := perfBuildBinary(t)
	env := []string{"DATABASE_URL=" + dsn, "JWT_PUBLIC_KEY=" + pub}
	p1, p2 := perfStartServer(t, bin, env...), perfStartServer(t, bin, env...)
	if p1.url == p2.url {
		t.Fatalf("both replicas on %s", p1.url)
	}
	ctx := context.Background()
	key, err := issueKey(ctx, &store{db: db}, signer, "proc@example.com", "replica", scopeAgent, 0)
	if err != nil {
		t.Fatal(err)
	}
	c := perfClient()
	session := newUUID()
	if code, body, err := perfDo(ctx, c, "POST", p1.url+"/api/v1/messages/agent", key,
		map[string]any{"agent_instance_id": session, "agent_type": "replica", "content": "step"}); err != nil || code != 200 {
		t.Fatalf("create: %d %v %v", code, body, err)
	}

	// ask_question on process 1, answered through process 2.
	cs, err := perfMCPConnect(ctx, p1.url, key, http.DefaultTransport)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	type result struct {
		out map[string]any
		err error
		at  time.Time
	}
	asked := make(chan result, 1)
	go func() {
		res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: "ask_question",
			Arguments: map[string]any{"agent_instance_id": session, "question_text": "Which port?"}})
		if err == nil && res.IsError {
			err = fmt.Errorf("tool error: %v", res.Content)
		}
		var out map[string]any
		if err == nil {
			out, _ = res.StructuredContent.(map[string]any)
		}
		asked <- result{out, err, time.Now()}
	}()
	// The question is stored (and waiting) once the session awaits input.
	replicaWaitFor(t, "the question to be asked", func() bool {
		var status string
		db.QueryRow(`SELECT status FROM agent_instances WHERE id = $1`, session).Scan(&status)
		return status == statusAwaitingInput
	})
	time.Sleep(50 * time.Millisecond) // from the commit to the wait: microseconds, but not zero
	if code, body, err := perfDo(ctx, c, "POST", p2.url+"/api/v1/messages/user", key,
		map[string]any{"agent_instance_id": session, "content": "the second"}); err != nil || code != 200 {
		t.Fatalf("answer through process 2: %d %v %v", code, body, err)
	}
	sent := time.Now()
	select {
	case r := <-asked:
		if r.err != nil || r.out["answer"] != "the second" {
			t.Fatalf("ask_question on process 1: %v %v", r.out, r.err)
		}
		t.Logf("process 2's answer reached process 1's ask_question %v after it was committed", r.at.Sub(sent).Round(time.Microsecond))
	case <-time.After(10 * time.Second):
		t.Fatal("ask_question on process 1 never got process 2's answer")
	}

	// A long-poll on process 2, fed through process 1.
	polled := make(chan result, 1)
	go func() {
		code, body, err := perfDo(ctx, c, "GET", p2.url+"/api/v1/messages/pending?wait=30&agent_instance_id="+session, key, nil)
		if err == nil && code != 200 {
			err = fmt.Errorf("status %d: %v", code, body)
		}
		polled <- result{body, err, time.Now()}
	}()
	time.Sleep(300 * time.Millisecond) // let the poll reach its wait; a late start still finds the message
	if code, body, err := perfDo(ctx, c, "POST", p1.url+"/api/v1/messages/user", key,
		map[string]any{"agent_instance_id": session, "content": "from the first", "mark_as_read": false}); err != nil || code != 200 {
		t.Fatalf("post to process 1: %d %v %v", code, body, err)
	}
	sent = time.Now()
	select {
	case r := <-polled:
		msgs, _ := r.out["messages"].([]any)
		if r.err != nil || len(msgs) != 1 || !strings.Contains(fmt.Sprint(msgs[0]), "from the first") {
			t.Fatalf("long-poll on process 2: %v %v", r.out, r.err)
		}
		t.Logf("process 1's message reached process 2's long-poll %v after it was committed", r.at.Sub(sent).Round(time.Microsecond))
	case <-time.After(10 * time.Second):
		t.Fatal("the long-poll on process 2 never returned")
	}
	for _, p := range []*perfServer{p1, p2} {
		if err := p.stop(t); err != nil {
			t.Errorf("replica exit: %v\n%s", err, p.stderr.String())
		}
	}
}
