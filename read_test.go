package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"
)

// Tests of the person's read API and event stream (ui.go), through the real
// router, a real database and real signed keys.

// uiAgentMsg posts an agent message (a question when asks) and returns its id.
func uiAgentMsg(t testing.TB, e *testEnv, key, sid, content string, asks bool) string {
	t.Helper()
	code, body := e.call(t, "POST", "/api/v1/messages/agent", key, map[string]any{
		"agent_instance_id": sid, "agent_type": "Claude-Code", "content": content, "requires_user_input": asks})
	if code != 200 {
		t.Fatalf("agent message: %d %s", code, body)
	}
	return mustJSON(t, body)["message_id"].(string)
}

// uiUserMsg posts a person's message (not marked as read) and returns its id.
func uiUserMsg(t testing.TB, e *testEnv, key, sid, content string) string {
	t.Helper()
	code, body := e.call(t, "POST", "/api/v1/messages/user", key, map[string]any{
		"agent_instance_id": sid, "content": content, "mark_as_read": false})
	if code != 200 {
		t.Fatalf("user message: %d %s", code, body)
	}
	return mustJSON(t, body)["message_id"].(string)
}

// uiPost posts body as JSON with key; safe to use outside the test's goroutine.
func uiPost(e *testEnv, key, path string, body any) (int, error) {
	b, _ := json.Marshal(body)
	req, err := http.NewRequest("POST", e.srv.URL+path, strings.NewReader(string(b)))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

type uiSessionItem struct {
	ID             string  `json:"id"`
	AgentType      string  `json:"agent_type"`
	Status         string  `json:"status"`
	StartedAt      string  `json:"started_at"`
	EndedAt        *string `json:"ended_at"`
	LastActivityAt string  `json:"last_activity_at"`
	LastMessage    *string `json:"last_message"`
	OpenQuestion   *struct {
		ID      string `json:"id"`
		Content string `json:"content"`
	} `json:"open_question"`
}

type uiSessionsPage struct {
	Sessions   []uiSessionItem `json:"sessions"`
	NextBefore *string         `json:"next_before"`
}

// uiList gets GET /api/v1/sessions?query and decodes it, failing on non-200.
func uiList(t testing.TB, e *testEnv, key, query string) uiSessionsPage {
	t.Helper()
	code, body := e.call(t, "GET", "/api/v1/sessions?"+query, key, nil)
	if code != 200 {
		t.Fatalf("list sessions ?%s: %d %s", query, code, body)
	}
	var p uiSessionsPage
	if err := json.Unmarshal(body, &p); err != nil {
		t.Fatalf("list sessions: %v in %s", err, body)
	}
	// Exactly these keys: open_question and next_before are null, never absent.
	raw := mustJSON(t, body)
	if _, ok := raw["next_before"]; !ok {
		t.Fatalf("next_before missing: %s", body)
	}
	for _, s := range raw["sessions"].([]any) {
		for _, k := range []string{"id", "agent_type", "status", "started_at", "ended_at", "last_activity_at", "last_message", "open_question"} {
			if _, ok := s.(map[string]any)[k]; !ok {
				t.Fatalf("session item without %q: %s", k, body)
			}
		}
	}
	return p
}

type uiTimeline struct {
	SessionID string  `json:"session_id"`
	AgentType string  `json:"agent_type"`
	Status    string  `json:"status"`
	GitDiff   *string `json:"git_diff"`
	NextAfter *int64  `json:"next_after"`
	Messages  []struct {
		ID                string `json:"id"`
		Seq               int64  `json:"seq"`
		Content           string `json:"content"`
		SenderType        string `json:"sender_type"`
		CreatedAt         string `json:"created_at"`
		RequiresUserInput bool   `json:"requires_user_input"`
	} `json:"messages"`
}

func uiMessages(t testing.TB, e *testEnv, key, sid, query string) uiTimeline {
	t.Helper()
	code, body := e.call(t, "GET", "/api/v1/sessions/"+sid+"/messages?"+query, key, nil)
	if code != 200 {
		t.Fatalf("messages: %d %s", code, body)
	}
	var tl uiTimeline
	if err := json.Unmarshal(body, &tl); err != nil {
		t.Fatalf("messages: %v in %s", err, body)
	}
	return tl
}

func TestReadScopes(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	agent := e.mustKey(t, "a@example.com", scopeAgent)
	person := e.mustKey(t, "a@example.com", scopePerson)
	sid := newUUID()
	uiAgentMsg(t, e, agent, sid, "step", false)

	paths := []string{"/api/v1/sessions", "/api/v1/sessions/" + sid + "/messages", "/api/v1/events"}
	for _, p := range paths {
		t.Run(p, func(t *testing.T) {
			code, body := e.call(t, "GET", p, agent, nil)
			if code != http.StatusForbidden || mustJSON(t, body)["detail"] == "" {
				t.Fatalf("agent key: %d %s, want 403 with detail", code, body)
			}
			if code, _ := e.call(t, "GET", p, "", nil); code != http.StatusUnauthorized {
				t.Fatalf("no key: %d, want 401", code)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, "GET", e.srv.URL+p, nil)
			req.Header.Set("Authorization", "Bearer "+person)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Fatalf("person key: %d, want 200", resp.StatusCode)
			}
		})
	}
	// A person key may still write (it can do everything an agent key can).
	uiAgentMsg(t, e, person, sid, "step by a person key", false)
}

func TestReadSessionsPagination(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopePerson)
	want := map[string]bool{}
	for i := 0; i < 11; i++ {
		sid := newUUID()
		uiAgentMsg(t, e, key, sid, fmt.Sprintf("step %d", i), false)
		want[sid] = true
	}
	// Ties on last_activity_at must be broken by id, across page borders.
	if _, err := e.db.Exec(`UPDATE agent_instances SET last_activity_at = '2030-01-01T00:00:00Z'
		WHERE id IN (SELECT id FROM agent_instances ORDER BY id LIMIT 5)`); err != nil {
		t.Fatal(err)
	}
	for _, limit := range []int{1, 3, 4, 11, 200} {
		var got []uiSessionItem
		seen := map[string]bool{}
		query := fmt.Sprintf("limit=%d", limit)
		for pages := 0; ; pages++ {
			if pages > 20 {
				t.Fatal("pagination does not end")
			}
			p := uiList(t, e, key, query)
			if len(p.Sessions) > limit {
				t.Fatalf("limit %d: page of %d", limit, len(p.Sessions))
			}
			for _, s := range p.Sessions {
				if seen[s.ID] {
					t.Fatalf("limit %d: %s twice", limit, s.ID)
				}
				seen[s.ID] = true
				got = append(got, s)
			}
			if p.NextBefore == nil {
				break
			}
			query = fmt.Sprintf("limit=%d&before=%s", limit, url.QueryEscape(*p.NextBefore))
		}
		if len(got) != len(want) {
			t.Fatalf("limit %d: got %d sessions, want %d", limit, len(got), len(want))
		}
		for i := 1; i < len(got); i++ {
			a, b := got[i-1], got[i]
			if a.LastActivityAt < b.LastActivityAt || a.LastActivityAt == b.LastActivityAt && a.ID < b.ID {
				t.Fatalf("limit %d: not newest first at %d: %+v then %+v", limit, i, a, b)
			}
		}
	}

	bad := []string{"limit=0", "limit=201", "limit=x", "limit=-1", "before=nope", "before=" + url.QueryEscape("MjAzMF9ub3RhdXVpZA"), "status=RUNNING", "status=%27%3B"}
	for _, q := range bad {
		code, body := e.call(t, "GET", "/api/v1/sessions?"+q, key, nil)
		if code != 400 || mustJSON(t, body)["detail"] == "" {
			t.Errorf("?%s: %d %s, want 400", q, code, body)
		}
	}
}

func TestReadSessionsStatusAndQuestion(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopePerson)
	active, asking, answered, superseded, ended := newUUID(), newUUID(), newUUID(), newUUID(), newUUID()
	uiAgentMsg(t, e, key, active, "working", false)
	qid := uiAgentMsg(t, e, key, asking, "Which database?\nPostgres or SQLite?", true)
	uiAgentMsg(t, e, key, answered, "Ship it?", true)
	uiUserMsg(t, e, key, answered, "yes")
	uiAgentMsg(t, e, key, superseded, "Shall I?", true)
	uiAgentMsg(t, e, key, superseded, "did it anyway", false)
	uiAgentMsg(t, e, key, ended, "Still there?", true)
	if code, body := e.call(t, "POST", "/api/v1/sessions/end", key, map[string]any{"agent_instance_id": ended}); code != 200 {
		t.Fatalf("end: %d %s", code, body)
	}

	all := map[string]uiSessionItem{}
	for _, s := range uiList(t, e, key, "").Sessions {
		all[s.ID] = s
	}
	if len(all) != 5 {
		t.Fatalf("got %d sessions, want 5", len(all))
	}
	for id, s := range all {
		if (s.OpenQuestion != nil) != (id == asking) {
			t.Errorf("session %s (%s): open_question = %+v", id, s.Status, s.OpenQuestion)
		}
		if s.AgentType != "claude-code" {
			t.Errorf("agent_type = %q", s.AgentType)
		}
	}
	if q := all[asking].OpenQuestion; q.ID != qid || q.Content != "Which database?\nPostgres or SQLite?" {
		t.Errorf("open question = %+v", q)
	}
	if s := all[answered]; s.Status != "ACTIVE" || *s.LastMessage != "yes" {
		t.Errorf("answered session: %+v", s)
	}
	if s := all[ended]; s.Status != "COMPLETED" || s.EndedAt == nil {
		t.Errorf("ended session: %+v", s)
	}

	for status, wantID := range map[string]string{"AWAITING_INPUT": asking, "COMPLETED": ended, "completed": ended} {
		p := uiList(t, e, key, "status="+status)
		if len(p.Sessions) != 1 || p.Sessions[0].ID != wantID {
			t.Errorf("status=%s: %+v", status, p.Sessions)
		}
	}
	if p := uiList(t, e, key, "status=ACTIVE"); len(p.Sessions) != 3 {
		t.Errorf("status=ACTIVE: %d sessions, want 3", len(p.Sessions))
	}
	if p := uiList(t, e, key, "status=FAILED"); len(p.Sessions) != 0 || p.NextBefore != nil {
		t.Errorf("status=FAILED: %+v", p)
	}
}

func TestReadLastMessageCut(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopePerson)
	long := strings.Repeat("é🙂語", 100) // 300 characters, 900 bytes
	sid := newUUID()
	uiAgentMsg(t, e, key, sid, long, true)
	s := uiList(t, e, key, "").Sessions[0]
	got := *s.LastMessage
	if n := utf8.RuneCountInString(got); n != 200 || !utf8.ValidString(got) || !strings.HasPrefix(long, got) {
		t.Fatalf("last_message has %d characters (valid %v): %q", n, utf8.ValidString(got), got)
	}
	if s.OpenQuestion == nil || s.OpenQuestion.Content != long {
		t.Fatalf("the open question must be whole: %+v", s.OpenQuestion)
	}
	short := "short\nand sweet"
	uiAgentMsg(t, e, key, sid, short, false)
	if got := *uiList(t, e, key, "").Sessions[0].LastMessage; got != short {
		t.Fatalf("last_message = %q, want %q", got, short)
	}
}

func TestReadSessionMessages(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopePerson)
	sid := newUUID()
	var ids []string
	ids = append(ids, uiAgentMsg(t, e, key, sid, "step 1", false))
	ids = append(ids, uiAgentMsg(t, e, key, sid, "Proceed?", true))
	ids = append(ids, uiUserMsg(t, e, key, sid, "go"))
	ids = append(ids, uiAgentMsg(t, e, key, sid, "step 2", false))
	uiAgentMsg(t, e, key, newUUID(), "another session", false)

	tl := uiMessages(t, e, key, sid, "")
	if tl.SessionID != sid || tl.Status != "ACTIVE" || tl.AgentType != "claude-code" || tl.GitDiff != nil || tl.NextAfter != nil {
		t.Fatalf("timeline head: %+v", tl)
	}
	if len(tl.Messages) != 4 {
		t.Fatalf("%d messages, want 4", len(tl.Messages))
	}
	for i, m := range tl.Messages {
		if m.ID != ids[i] || i > 0 && m.Seq <= tl.Messages[i-1].Seq {
			t.Fatalf("message %d: %+v (want id %s, rising seq)", i, m, ids[i])
		}
		if _, err := time.Parse(time.RFC3339Nano, m.CreatedAt); err != nil {
			t.Fatalf("created_at %q: %v", m.CreatedAt, err)
		}
	}
	if m := tl.Messages[1]; !m.RequiresUserInput || m.SenderType != "AGENT" || m.Content != "Proceed?" {
		t.Fatalf("question: %+v", m)
	}
	if m := tl.Messages[2]; m.SenderType != "USER" || m.Content != "go" {
		t.Fatalf("answer: %+v", m)
	}

	// Paging with after and limit.
	p1 := uiMessages(t, e, key, sid, "limit=2")
	if len(p1.Messages) != 2 || p1.NextAfter == nil || *p1.NextAfter != p1.Messages[1].Seq {
		t.Fatalf("page 1: %+v", p1)
	}
	p2 := uiMessages(t, e, key, sid, fmt.Sprintf("after=%d&limit=2", *p1.NextAfter))
	if len(p2.Messages) != 2 || p2.Messages[0].ID != ids[2] || p2.Messages[1].ID != ids[3] {
		t.Fatalf("page 2: %+v", p2)
	}
	p3 := uiMessages(t, e, key, sid, fmt.Sprintf("after=%d&limit=2", *p2.NextAfter))
	if len(p3.Messages) != 0 || p3.NextAfter != nil {
		t.Fatalf("page 3: %+v", p3)
	}

	// The git diff comes with the session.
	diff := "diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n"
	code, body := e.call(t, "POST", "/api/v1/messages/agent", key, map[string]any{"agent_instance_id": sid, "content": "changed x", "git_diff": diff})
	if code != 200 {
		t.Fatalf("diff: %d %s", code, body)
	}
	if tl := uiMessages(t, e, key, sid, "after=999999999"); tl.GitDiff == nil || !strings.Contains(*tl.GitDiff, "+++ b/x") || len(tl.Messages) != 0 {
		t.Fatalf("git_diff: %+v", tl)
	}

	for _, q := range []string{"after=-1", "after=x", "limit=0", "limit=1001", "limit=1.5"} {
		if code, body := e.call(t, "GET", "/api/v1/sessions/"+sid+"/messages?"+q, key, nil); code != 400 {
			t.Errorf("?%s: %d %s, want 400", q, code, body)
		}
	}
	if code, _ := e.call(t, "GET", "/api/v1/sessions/not-a-uuid/messages", key, nil); code != 400 {
		t.Errorf("bad id: %d, want 400", code)
	}
}

func TestReadTenantIsolation(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	keyA := e.mustKey(t, "a@example.com", scopePerson)
	keyB := e.mustKey(t, "b@example.com", scopePerson)
	sidA, sidB := newUUID(), newUUID()
	uiAgentMsg(t, e, keyA, sidA, "secret of A", true)
	uiAgentMsg(t, e, keyB, sidB, "B's step", false)

	for _, p := range []uiSessionsPage{uiList(t, e, keyB, ""), uiList(t, e, keyB, "status=AWAITING_INPUT")} {
		for _, s := range p.Sessions {
			if s.ID != sidB {
				t.Fatalf("B sees session %s", s.ID)
			}
		}
	}
	codeOther, bodyOther := e.call(t, "GET", "/api/v1/sessions/"+sidA+"/messages", keyB, nil)
	codeMissing, bodyMissing := e.call(t, "GET", "/api/v1/sessions/"+newUUID()+"/messages", keyB, nil)
	if codeOther != 404 || codeMissing != 404 || string(bodyOther) != string(bodyMissing) {
		t.Fatalf("another user's session: %d %s; a missing one: %d %s", codeOther, bodyOther, codeMissing, bodyMissing)
	}

	// B's stream: A's activity never shows; B's own does.
	sb := uiOpenStream(t, e, keyB, "")
	defer sb.close()
	sa := uiOpenStream(t, e, keyA, "")
	defer sa.close()
	uiAgentMsg(t, e, keyA, sidA, "more of A", false)
	uiUserMsg(t, e, keyA, sidA, "A answers")
	if code, _ := e.call(t, "POST", "/api/v1/sessions/end", keyA, map[string]any{"agent_instance_id": sidA}); code != 200 {
		t.Fatal("end A")
	}
	// A's own stream gets them: the events were sent.
	for got := 0; got < 2; {
		if ev := sa.next(t, 5*time.Second); ev.Name == "message" {
			got++
		}
	}
	mine := uiAgentMsg(t, e, keyB, sidB, "B again", false)
	for {
		ev := sb.next(t, 5*time.Second)
		if strings.Contains(ev.Data, sidA) || strings.Contains(ev.Data, "of A") || strings.Contains(ev.Data, "A answers") {
			t.Fatalf("B received A's event: %+v", ev)
		}
		if ev.Name == "message" {
			if !strings.Contains(ev.Data, mine) {
				t.Fatalf("B's first message event is not B's message: %+v", ev)
			}
			break
		}
	}
}

// ---- the event stream ----

type uiEvent struct {
	Name, ID, Data string
	Comment        string // a comment line, e.g. "keepalive"
}

// uiStream is an open GET /api/v1/events, parsed in a goroutine.
type uiStream struct {
	resp   *http.Response
	events chan uiEvent
	cancel context.CancelFunc
	done   chan struct{}
}

// uiOpenStream opens the event stream with key (and Last-Event-ID, if
// given) and waits for its headers.
func uiOpenStream(t testing.TB, e *testEnv, key, lastID string) *uiStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", e.srv.URL+"/api/v1/events", nil)
	req.Header.Set("Authorization", "Bearer "+key)
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		cancel()
		resp.Body.Close()
		t.Fatalf("events: %d", resp.StatusCode)
	}
	s := &uiStream{resp: resp, events: make(chan uiEvent, 1000), cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		defer close(s.events)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 64<<10), 16<<20)
		var ev uiEvent
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == "":
				if ev != (uiEvent{}) {
					s.events <- ev
				}
				ev = uiEvent{}
			case strings.HasPrefix(line, ":"):
				ev.Comment = strings.TrimSpace(line[1:])
			case strings.HasPrefix(line, "event: "):
				ev.Name = line[len("event: "):]
			case strings.HasPrefix(line, "id: "):
				ev.ID = line[len("id: "):]
			case strings.HasPrefix(line, "data: "):
				ev.Data = line[len("data: "):]
			}
		}
	}()
	return s
}

// next returns the next event or comment, failing after wait.
func (s *uiStream) next(t testing.TB, wait time.Duration) uiEvent {
	t.Helper()
	select {
	case ev, ok := <-s.events:
		if !ok {
			t.Fatal("event stream ended")
		}
		return ev
	case <-time.After(wait):
		t.Fatalf("no event within %s", wait)
		return uiEvent{}
	}
}

func (s *uiStream) close() {
	s.cancel()
	s.resp.Body.Close()
	<-s.done
}

type uiMessageEvent struct {
	SessionID         string `json:"session_id"`
	ID                string `json:"id"`
	Seq               int64  `json:"seq"`
	Content           string `json:"content"`
	SenderType        string `json:"sender_type"`
	CreatedAt         string `json:"created_at"`
	RequiresUserInput bool   `json:"requires_user_input"`
}

func TestEventsStream(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopePerson)
	sid := newUUID()
	uiAgentMsg(t, e, key, sid, "before the stream", false)

	s := uiOpenStream(t, e, key, "")
	defer s.close()
	if ct := s.resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Errorf("Content-Type %q", ct)
	}
	if s.resp.Header.Get("Cache-Control") != "no-store" || s.resp.Header.Get("X-Accel-Buffering") != "no" {
		t.Errorf("headers: %v", s.resp.Header)
	}
	ready := s.next(t, 5*time.Second)
	if ready.Name != "ready" || ready.ID == "" {
		t.Fatalf("first event: %+v", ready)
	}

	// Idle: no database connection held, one hub waiter.
	time.Sleep(50 * time.Millisecond)
	if n := e.db.Stats().InUse; n != 0 {
		t.Errorf("idle stream holds %d database connections", n)
	}
	if n := e.a.hub.waiters(); n != 1 {
		t.Errorf("hub waiters = %d, want 1", n)
	}

	// Only new events: the message from before the stream is not sent.
	qid := uiAgentMsg(t, e, key, sid, "<b>Question?</b>\nline 2", true)
	var msg uiMessageEvent
	var sawAwaiting bool
	for msg.ID == "" {
		ev := s.next(t, 5*time.Second)
		switch ev.Name {
		case "message":
			if err := json.Unmarshal([]byte(ev.Data), &msg); err != nil {
				t.Fatal(err)
			}
			if ev.ID != fmt.Sprint(msg.Seq) {
				t.Fatalf("event id %q, seq %d", ev.ID, msg.Seq)
			}
		case "session":
			sawAwaiting = sawAwaiting || strings.Contains(ev.Data, `"status":"AWAITING_INPUT"`)
		}
	}
	if msg.ID != qid || msg.SessionID != sid || msg.Content != "<b>Question?</b>\nline 2" || !msg.RequiresUserInput || msg.SenderType != "AGENT" {
		t.Fatalf("message event: %+v", msg)
	}
	if !sawAwaiting {
		t.Errorf("no session event with status AWAITING_INPUT before the question")
	}

	// Ending the session (no message) is a session event.
	if code, _ := e.call(t, "POST", "/api/v1/sessions/end", key, map[string]any{"agent_instance_id": sid}); code != 200 {
		t.Fatal("end")
	}
	for {
		ev := s.next(t, 5*time.Second)
		if ev.Name == "session" {
			var got map[string]any
			json.Unmarshal([]byte(ev.Data), &got)
			if got["id"] != sid || got["status"] != "COMPLETED" || got["ended_at"] == nil || ev.ID != "" {
				t.Fatalf("session event: %+v", ev)
			}
			break
		}
	}
	// A new session shows up as a session event too.
	other := newUUID()
	uiAgentMsg(t, e, key, other, "new session", false)
	for {
		ev := s.next(t, 5*time.Second)
		if ev.Name == "session" && strings.Contains(ev.Data, other) {
			break
		}
	}
}

func TestEventsBadLastEventID(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopePerson)
	for _, id := range []string{"x", "-1", "1.5", "99999999999999999999"} {
		req, _ := http.NewRequest("GET", e.srv.URL+"/api/v1/events", nil)
		req.Header.Set("Authorization", "Bearer "+key)
		req.Header.Set("Last-Event-ID", id)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Errorf("Last-Event-ID %q: %d, want 400", id, resp.StatusCode)
		}
	}
}

// TestEventsResume disconnects a reader again and again while two writers
// keep adding messages, and reconnects it with Last-Event-ID each time: what
// it received must be exactly the committed messages, in commit order.
func TestEventsResume(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopePerson)
	userID := e.mustUserID(t, "a@example.com")
	sids := []string{newUUID(), newUUID()}
	for _, sid := range sids {
		uiAgentMsg(t, e, key, sid, "start", false)
	}

	s := uiOpenStream(t, e, key, "")
	ready := s.next(t, 5*time.Second)
	if ready.Name != "ready" {
		t.Fatalf("first event %+v", ready)
	}
	start := ready.ID

	const perWriter = 60
	var wg sync.WaitGroup
	for w, sid := range sids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < perWriter; i++ {
				path, body := "/api/v1/messages/agent", map[string]any{"agent_instance_id": sid, "content": fmt.Sprintf("w%d step %d", w, i), "requires_user_input": i%5 == 0}
				if i%3 == 2 {
					path, body = "/api/v1/messages/user", map[string]any{"agent_instance_id": sid, "content": fmt.Sprintf("w%d user %d", w, i), "mark_as_read": false}
				}
				if code, err := uiPost(e, key, path, body); code != 200 {
					t.Errorf("writer %d: %s: %d %v", w, path, code, err)
					return
				}
			}
		}()
	}
	writersDone := make(chan struct{})
	go func() { wg.Wait(); close(writersDone) }()

	var got []string
	last := start
	reconnects := 0
	for len(got) < 2*perWriter {
		// Read a few messages, then drop the connection mid-stream.
		for n := 0; n < 17 && len(got) < 2*perWriter; {
			ev := s.next(t, 10*time.Second)
			if ev.Name != "message" {
				continue
			}
			var m uiMessageEvent
			if err := json.Unmarshal([]byte(ev.Data), &m); err != nil {
				t.Fatal(err)
			}
			got = append(got, m.ID)
			last = ev.ID
			n++
		}
		s.close()
		reconnects++
		s = uiOpenStream(t, e, key, last)
		if ev := s.next(t, 5*time.Second); ev.Name != "ready" || ev.ID != last {
			t.Fatalf("after reconnect: %+v, want ready with id %s", ev, last)
		}
	}
	<-writersDone
	// Nothing more may come: a duplicate would show here.
	uiAgentMsg(t, e, key, sids[0], "sentinel", false)
	for {
		ev := s.next(t, 5*time.Second)
		if ev.Name == "message" {
			if !strings.Contains(ev.Data, "sentinel") {
				t.Fatalf("extra message after all were received: %s", ev.Data)
			}
			break
		}
	}
	s.close()

	rows, err := e.db.Query(`SELECT id FROM messages WHERE user_id = $1 AND seq > $2 AND content <> 'sentinel' ORDER BY seq`, userID, start)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var want []string
	for rows.Next() {
		var id string
		rows.Scan(&id)
		want = append(want, id)
	}
	if len(want) != 2*perWriter || strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("received %d messages, committed %d; equal in order: %v", len(got), len(want), strings.Join(got, ",") == strings.Join(want, ","))
	}
	if reconnects < 3 {
		t.Fatalf("only %d reconnects", reconnects)
	}
}

func TestEventsKeepaliveAndShutdown(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, func(a *app) { a.eventsKeepalive = 40 * time.Millisecond })
	key := e.mustKey(t, "a@example.com", scopePerson)
	s := uiOpenStream(t, e, key, "")
	defer s.close()
	comments := 0
	for comments < 2 {
		if ev := s.next(t, 5*time.Second); ev.Comment == "keepalive" {
			comments++
		}
	}
	e.stop() // the server begins to shut down: the stream ends
	deadline := time.After(5 * time.Second)
	for {
		select {
		case _, ok := <-s.events:
			if !ok {
				if n := e.a.hub.waiters(); n != 0 {
					t.Fatalf("hub waiters after the stream ended: %d", n)
				}
				return
			}
		case <-deadline:
			t.Fatal("the stream did not end at shutdown")
		}
	}
}

func TestEventsClientGone(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopePerson)
	s := uiOpenStream(t, e, key, "")
	s.next(t, 5*time.Second)
	s.close()
	for i := 0; e.a.hub.waiters() != 0; i++ {
		if i > 100 {
			t.Fatal("the stream's hub waiter outlived its client")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A `before` cursor with an extreme but well-formed time is a 200 or a 400,
// never a 500.
func TestReadSessionsCursorExtremes(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "p@example.com", scopePerson)
	for _, ts := range []string{
		"0000-01-01T00:00:00Z", "9999-12-31T23:59:59.999999999-23:59", "0000-01-01T00:00:00+23:59",
		"2024-01-01T00:00:00.123456789Z",
	} {
		c := base64.RawURLEncoding.EncodeToString([]byte(ts + "_" + newUUID()))
		code, body := e.call(t, "GET", "/api/v1/sessions?before="+c, key, nil)
		if code != http.StatusOK && code != http.StatusBadRequest {
			t.Errorf("before=%s: %d %s", ts, code, body)
		}
	}
}
