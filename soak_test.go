package main

// soak_test.go: minutes of mixed traffic against the real binary, then a
// consistency check over the database.
//
//	AGENTLINE_SOAK=1 AGENTLINE_SOAK_DURATION=10m go test -run TestSoak -v -timeout 30m .

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// soakUser is one of the two users of the soak: its key and its live
// sessions (which the other user's workers probe).
type soakUser struct {
	name, id, key string

	mu   sync.Mutex
	live map[string]bool
}

func (u *soakUser) setLive(session string, live bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if live {
		u.live[session] = true
	} else {
		delete(u.live, session)
	}
}

func (u *soakUser) anyLive() (string, bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for s := range u.live {
		return s, true
	}
	return "", false
}

// soakSession is what the clients did in one session: the agent messages
// they stored, the user messages the person sent (in send order, which is
// commit order: one goroutine sends them all) and what the agent was handed.
type soakSession struct {
	id, user string
	mcp      bool

	mu        sync.Mutex
	agent     []string
	sent      []string
	delivered []string
}

func (s *soakSession) add(list *[]string, items ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	*list = append(*list, items...)
}

// soakStats counts what the soak did.
type soakStats struct {
	steps, questions, feedback, ended, probes, mcpCalls, restCalls atomic.Int64
}

// soakRun is the shared state of one soak.
type soakRun struct {
	t     *testing.T
	url   string
	http  *http.Client
	users [2]*soakUser
	stats soakStats
	until time.Time

	mu       sync.Mutex
	sessions []*soakSession
	failures atomic.Int64
}

func (r *soakRun) fail(format string, args ...any) {
	if r.failures.Add(1) <= 20 {
		r.t.Errorf(format, args...)
	}
}

// rest makes a REST call with u's key and checks the status.
func (r *soakRun) rest(ctx context.Context, u *soakUser, method, path string, body any, want int) map[string]any {
	r.stats.restCalls.Add(1)
	code, out, err := perfDo(ctx, r.http, method, r.url+path, u.key, body)
	if err != nil || code != want {
		r.fail("%s %s as %s: %d %v %v, want %d", method, path, u.name, code, out, err, want)
		return nil
	}
	return out
}

// mcpCall calls a tool and returns its structured result (nil after
// reporting a failure).
func (r *soakRun) mcpCall(ctx context.Context, cs *mcp.ClientSession, name string, args map[string]any) map[string]any {
	r.stats.mcpCalls.Add(1)
	res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: name, Arguments: args})
	if err != nil || res.IsError {
		r.fail("%s %v: %v %v", name, args, err, res)
		return nil
	}
	out, _ := res.StructuredContent.(map[string]any)
	return out
}

func soakContents(v any) []string {
	var out []string
	list, _ := v.([]any)
	for _, x := range list {
		switch m := x.(type) {
		case string:
			out = append(out, m)
		case map[string]any:
			c, _ := m["content"].(string)
			out = append(out, c)
		}
	}
	return out
}

// worker runs sessions for user u, one after another, until the soak ends.
func (r *soakRun) worker(ctx context.Context, u, other *soakUser, w int) {
	rng := rand.New(rand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
	cs, err := perfMCPConnect(ctx, r.url, u.key, r.http.Transport)
	if err != nil {
		r.fail("connect: %v", err)
		return
	}
	defer cs.Close()
	for n := 0; time.Now().Before(r.until); n++ {
		r.session(ctx, rng, cs, u, other, fmt.Sprintf("%s w%d s%d", u.name, w, n), n%2 == 1)
	}
}

// session runs one session: steps and questions from the agent, feedback
// and answers from a person goroutine, a final drain, the end.
func (r *soakRun) session(ctx context.Context, rng *rand.Rand, cs *mcp.ClientSession, u, other *soakUser, tag string, useMCP bool) {
	s := &soakSession{id: newUUID(), user: u.id, mcp: useMCP}
	r.mu.Lock()
	r.sessions = append(r.sessions, s)
	r.mu.Unlock()

	step := func(text string, asks bool) (id string) {
		s.add(&s.agent, text)
		r.stats.steps.Add(1)
		if useMCP && !asks {
			out := r.mcpCall(ctx, cs, "log_step", map[string]any{"agent_instance_id": s.id, "step_description": text})
			if out != nil {
				s.add(&s.delivered, soakContents(out["user_feedback"])...)
			}
			return ""
		}
		out := r.rest(ctx, u, "POST", "/api/v1/messages/agent", map[string]any{
			"agent_instance_id": s.id, "agent_type": "soak", "content": text, "requires_user_input": asks}, 200)
		if out == nil {
			return ""
		}
		s.add(&s.delivered, soakContents(out["queued_user_messages"])...)
		id, _ = out["message_id"].(string)
		return id
	}
	step(tag+" start", false)
	u.setLive(s.id, true)

	// The person: feedback now and then, an answer soon after a question.
	stop, stopped := make(chan struct{}), make(chan struct{})
	asked := make(chan struct{}, 1)
	go func() {
		defer close(stopped)
		prng := rand.New(rand.NewPCG(rng.Uint64(), 1))
		for k := 0; ; k++ {
			kind := "fb"
			select {
			case <-stop:
				return
			case <-asked:
				kind = "ans"
				time.Sleep(time.Duration(prng.IntN(30)) * time.Millisecond)
			case <-time.After(time.Duration(20+prng.IntN(100)) * time.Millisecond):
			}
			text := fmt.Sprintf("%s %s %d", tag, kind, k)
			if r.rest(ctx, u, "POST", "/api/v1/messages/user", map[string]any{
				"agent_instance_id": s.id, "content": text, "mark_as_read": false}, 200) != nil {
				s.add(&s.sent, text)
				r.stats.feedback.Add(1)
			}
		}
	}()

	steps := 5 + rng.IntN(20)
	for i := 1; i <= steps; i++ {
		time.Sleep(time.Duration(rng.IntN(40)) * time.Millisecond)
		if rng.IntN(6) == 0 {
			r.stats.questions.Add(1)
			q := fmt.Sprintf("%s question %d", tag, i)
			if useMCP {
				s.add(&s.agent, q)
				asked <- struct{}{}
				out := r.mcpCall(ctx, cs, "ask_question", map[string]any{"agent_instance_id": s.id, "question_text": q})
				if out != nil {
					s.add(&s.delivered, soakContents(out["user_feedback"])...)
					if a, ok := out["answer"].(string); ok {
						s.add(&s.delivered, a)
					} else {
						r.fail("%s: ask_question without an answer: %v", q, out)
					}
				}
			} else {
				id := step(q, true)
				asked <- struct{}{}
				if id != "" {
					out := r.rest(ctx, u, "GET", "/api/v1/messages/pending?wait=30&agent_instance_id="+s.id+"&last_read_message_id="+id, nil, 200)
					if out != nil {
						if out["status"] != "ok" || len(soakContents(out["messages"])) == 0 {
							r.fail("%s: long-poll %v", q, out)
						}
						s.add(&s.delivered, soakContents(out["messages"])...)
					}
				}
			}
			continue
		}
		step(fmt.Sprintf("%s step %d", tag, i), false)
		if rng.IntN(10) == 0 {
			r.probe(ctx, u, other)
		}
	}

	// Done: the person stops, the agent picks up what is left, the session ends.
	close(stop)
	<-stopped
	step(tag+" done", false)
	if useMCP {
		r.mcpCall(ctx, cs, "end_session", map[string]any{"agent_instance_id": s.id})
	} else {
		r.rest(ctx, u, "POST", "/api/v1/sessions/end", map[string]any{"agent_instance_id": s.id}, 200)
	}
	u.setLive(s.id, false)
	r.stats.ended.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	if !slices.Equal(s.sent, s.delivered) {
		r.fail("%s: delivered %q, want exactly what was sent, in order: %q", tag, s.delivered, s.sent)
	}
}

// probe tries the other user's live session with u's key: not found, and
// nothing changes.
func (r *soakRun) probe(ctx context.Context, u, other *soakUser) {
	s, ok := other.anyLive()
	if !ok {
		return
	}
	r.stats.probes.Add(1)
	r.rest(ctx, u, "POST", "/api/v1/messages/agent", map[string]any{"agent_instance_id": s, "agent_type": "intruder", "content": "intruder " + u.name}, 404)
	r.rest(ctx, u, "POST", "/api/v1/messages/user", map[string]any{"agent_instance_id": s, "content": "intruder " + u.name}, 404)
	r.rest(ctx, u, "GET", "/api/v1/messages/pending?agent_instance_id="+s, nil, 404)
}

// TestSoak runs AGENTLINE_SOAK_DURATION (default 10m) of mixed traffic —
// steps over REST and MCP, feedback, questions answered while they wait,
// sessions ended, cross-user probes — from AGENTLINE_SOAK_WORKERS (default
// 6) concurrent sessions per user and two users, against the real binary;
// then checks the database: every user message delivered exactly once and in
// order, every message stored once in order, no session touched by the other
// user, the server's memory flat.
func TestSoak(t *testing.T) {
	if os.Getenv("AGENTLINE_SOAK") != "1" {
		t.Skip("set AGENTLINE_SOAK=1 (and AGENTLINE_SOAK_DURATION, default 10m) to soak")
	}
	duration := 10 * time.Minute
	if v := os.Getenv("AGENTLINE_SOAK_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			t.Fatalf("AGENTLINE_SOAK_DURATION=%q: want a duration like 10m", v)
		}
		duration = d
	}
	workers := 6
	if v := os.Getenv("AGENTLINE_SOAK_WORKERS"); v != "" {
		var err error
		if workers, err = strconv.Atoi(v); err != nil || workers < 1 {
			t.Fatalf("AGENTLINE_SOAK_WORKERS=%q", v)
		}
	}
	ctx := context.Background()
	db, dsn := mustDB(t)
	pub, signer := perfKeys(t)
	srv := perfStartServer(t, perfBuildBinary(t), "DATABASE_URL="+dsn, "JWT_PUBLIC_KEY="+pub, "GODEBUG=gctrace=1")
	st := &store{db: db}
	r := &soakRun{t: t, url: srv.url, http: perfClient(), until: time.Now().Add(duration)}
	for i, name := range []string{"ua", "ub"} {
		email := name + "@example.com"
		key, err := issueKey(ctx, st, signer, email, "soak", scopeAgent, 0)
		if err != nil {
			t.Fatal(err)
		}
		id, err := st.ensureUser(ctx, email)
		if err != nil {
			t.Fatal(err)
		}
		r.users[i] = &soakUser{name: name, id: id, key: key, live: map[string]bool{}}
	}

	// Memory, every 10 s: RSS, and the live heap of the latest collection.
	type sample struct {
		at        time.Duration
		rss, live int64
	}
	var samples []sample
	start := time.Now()
	sampleDone := make(chan struct{})
	go func() {
		defer close(sampleDone)
		for time.Now().Before(r.until) {
			time.Sleep(10 * time.Second)
			live, _ := srv.liveHeap()
			samples = append(samples, sample{time.Since(start).Round(time.Second), srv.rss(t), live})
		}
	}()

	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		for i := range r.users {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r.worker(ctx, r.users[i], r.users[1-i], 2*w+i)
			}()
		}
	}
	wg.Wait()
	<-sampleDone
	elapsed := time.Since(start)
	t.Logf("SOAK %v: %d sessions ended, %d steps, %d questions answered, %d person messages, %d cross-user probes; %d REST and %d MCP calls (%.0f/s)",
		elapsed.Round(time.Second), r.stats.ended.Load(), r.stats.steps.Load(), r.stats.questions.Load(), r.stats.feedback.Load(),
		r.stats.probes.Load(), r.stats.restCalls.Load(), r.stats.mcpCalls.Load(),
		float64(r.stats.restCalls.Load()+r.stats.mcpCalls.Load())/elapsed.Seconds())

	// The database agrees with the clients.
	type row struct{ sender, content, user string }
	stored := map[string][]row{}
	rows, err := db.Query(`SELECT m.agent_instance_id, m.sender_type, m.content, m.user_id, a.user_id
		FROM messages m JOIN agent_instances a ON a.id = m.agent_instance_id ORDER BY m.seq`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var sid, sender, content, muser, auser string
		if err := rows.Scan(&sid, &sender, &content, &muser, &auser); err != nil {
			t.Fatal(err)
		}
		if muser != auser {
			t.Errorf("message %q of user %s stored in a session of user %s", content, muser, auser)
		}
		stored[sid] = append(stored[sid], row{sender, content, muser})
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	rows.Close()
	if len(stored) != len(r.sessions) {
		t.Errorf("%d sessions stored, the clients made %d", len(stored), len(r.sessions))
	}
	for _, s := range r.sessions {
		var agent, user []string
		for _, m := range stored[s.id] {
			if m.user != s.user {
				t.Errorf("session %s holds a message of another user: %q", s.id, m.content)
			}
			if m.sender == senderAgent {
				agent = append(agent, m.content)
			} else {
				user = append(user, m.content)
			}
		}
		if !slices.Equal(agent, s.agent) {
			t.Errorf("session %s: agent messages stored %q, sent %q", s.id, agent, s.agent)
		}
		if !slices.Equal(user, s.sent) {
			t.Errorf("session %s: user messages stored %q, sent %q", s.id, user, s.sent)
		}
	}
	var open, intruders int
	db.QueryRow(`SELECT count(*) FROM agent_instances WHERE status <> 'COMPLETED' OR ended_at IS NULL`).Scan(&open)
	db.QueryRow(`SELECT count(*) FROM messages WHERE content LIKE 'intruder%'`).Scan(&intruders)
	if open != 0 || intruders != 0 {
		t.Errorf("%d sessions not ended, %d intruder messages stored", open, intruders)
	}

	// Memory stays flat: the last quarter of the run is no higher than the
	// second quarter (the first is warm-up) plus some slack.
	var b strings.Builder
	for _, s := range samples {
		fmt.Fprintf(&b, " %v:%.1f/%.0f", s.at, float64(s.rss)/(1<<20), float64(s.live)/(1<<20))
	}
	t.Logf("SOAK memory (time:RSS MiB/live heap+stacks MiB):%s", b.String())
	if q := len(samples) / 4; q >= 1 {
		mean := func(ss []sample) (rss, live float64) {
			for _, s := range ss {
				rss += float64(s.rss)
				live += float64(s.live)
			}
			return rss / float64(len(ss)), live / float64(len(ss))
		}
		rss2, live2 := mean(samples[q : 2*q])
		rss4, live4 := mean(samples[len(samples)-q:])
		t.Logf("SOAK memory: second quarter RSS %.1f MiB, live %.1f MiB; last quarter RSS %.1f MiB, live %.1f MiB",
			rss2/(1<<20), live2/(1<<20), rss4/(1<<20), live4/(1<<20))
		if rss4 > rss2*1.25+8<<20 || live4 > live2*1.5+4<<20 {
			t.Errorf("server memory grew: second quarter RSS %.1f MiB live %.1f MiB, last quarter RSS %.1f MiB live %.1f MiB",
				rss2/(1<<20), live2/(1<<20), rss4/(1<<20), live4/(1<<20))
		}
	}
	if err := srv.stop(t); err != nil {
		t.Errorf("exit: %v", err)
	}
}
