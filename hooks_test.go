package main

// Tests of issue 15: Claude Code's hooks at POST /api/v1/hooks/claude-code,
// the person's Away switch at /api/v1/presence, HOOK_WAIT, and the README's
// settings block. Payloads are the hook inputs as Claude Code's hooks
// reference documents them (code.claude.com/docs/en/hooks), one per event.

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"
)

const hookPath = "/api/v1/hooks/claude-code"

// hkPermission is a PermissionRequest input as the reference shows it.
func hkPermission(session, command string) map[string]any {
	return map[string]any{
		"session_id":      session,
		"transcript_path": "/home/me/.claude/projects/p/" + session + ".jsonl",
		"cwd":             "/home/me/project",
		"permission_mode": "default",
		"hook_event_name": "PermissionRequest",
		"tool_name":       "Bash",
		"tool_input":      map[string]any{"command": command, "description": "Run " + command},
		"permission_suggestions": []any{map[string]any{
			"type": "addRules", "rules": []any{map[string]any{"toolName": "Bash", "ruleContent": command}},
			"behavior": "allow", "destination": "localSettings"}},
	}
}

// hkEvent is any other event's input: the common fields plus extra.
func hkEvent(session, event string, extra map[string]any) map[string]any {
	m := map[string]any{
		"session_id":      session,
		"transcript_path": "/home/me/.claude/projects/p/" + session + ".jsonl",
		"cwd":             "/home/me/project",
		"hook_event_name": event,
	}
	for k, v := range extra {
		m[k] = v
	}
	return m
}

// hkEnv is a test env with an agent key and a person key of one user.
func hkEnv(t *testing.T, email string, opts ...envOption) (e *testEnv, agent, person string) {
	t.Helper()
	e = newTestEnv(t, opts...)
	return e, e.mustKey(t, email, scopeAgent), e.mustKey(t, email, scopePerson)
}

// hkQuiet checks, after a moment, that rc got exactly n requests.
func hkQuiet(t *testing.T, rc *receiver, n int, what string) {
	t.Helper()
	time.Sleep(300 * time.Millisecond)
	if got := rc.count(); got != n {
		t.Fatalf("%s: %d notifications, want %d", what, got, n)
	}
}

// hkResult is a hook call's answer.
type hkResult struct {
	code int
	body string
	err  error
}

// hkGo posts a hook input in the background (a PermissionRequest that
// waits); ctx cancelled is a client that hangs up.
func hkGo(ctx context.Context, e *testEnv, key string, body any) <-chan hkResult {
	out := make(chan hkResult, 1)
	b, _ := json.Marshal(body)
	go func() {
		req, _ := http.NewRequestWithContext(ctx, "POST", e.srv.URL+hookPath, bytes.NewReader(b))
		req.Header.Set("Authorization", "Bearer "+key)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			out <- hkResult{err: err}
			return
		}
		defer resp.Body.Close()
		rb, _ := io.ReadAll(resp.Body)
		out <- hkResult{code: resp.StatusCode, body: string(rb)}
	}()
	return out
}

func hkWait(t *testing.T, ch <-chan hkResult, limit time.Duration) hkResult {
	t.Helper()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatal(r.err)
		}
		return r
	case <-time.After(limit):
		t.Fatalf("no hook answer within %s", limit)
	}
	return hkResult{}
}

// hkOpen returns the id of the session's open approval, waiting for it.
func hkOpen(t *testing.T, e *testEnv, sid string) string {
	t.Helper()
	var id string
	mcpTEventually(t, "an open approval", func() bool {
		return e.db.QueryRow(`SELECT id FROM messages WHERE agent_instance_id = $1 AND kind = 'approval'
			AND decision IS NULL AND requires_user_input ORDER BY seq DESC LIMIT 1`, sid).Scan(&id) == nil
	})
	return id
}

func hkAway(t *testing.T, e *testEnv, person string, away bool) {
	t.Helper()
	if code, b := e.call(t, "PUT", "/api/v1/presence", person, map[string]any{"away": away}); code != 200 || string(b) != `{"away":`+map[bool]string{true: "true", false: "false"}[away]+"}\n" {
		t.Fatalf("presence: %d %s", code, b)
	}
}

// The exact answers Claude Code reads.
const (
	hkAllow   = `{"hookSpecificOutput":{"hookEventName":"PermissionRequest","decision":{"behavior":"allow"}}}` + "\n"
	hkNothing = "{}\n"
)

func hkDeny(msg string) string {
	b, _ := json.Marshal(msg)
	return `{"hookSpecificOutput":{"hookEventName":"PermissionRequest","decision":{"behavior":"deny","message":` + string(b) + `}}}` + "\n"
}

// At the desk (the default) a PermissionRequest is answered {} at once and
// is in the timeline; nobody is notified.
func TestHookPermissionAtDesk(t *testing.T) {
	t.Parallel()
	e, agent, person := hkEnv(t, "d@example.com")
	rc := newReceiver(t, nil)
	mustChannel(t, e, person, map[string]any{"kind": "webhook", "url": rc.URL, "events": []string{"question.asked", "agent.waiting", "agent.idle"}})
	sid := newUUID()
	start := time.Now()
	code, b := e.call(t, "POST", hookPath, agent, hkPermission(sid, "rm -rf node_modules"))
	if code != 200 || string(b) != hkNothing {
		t.Fatalf("at the desk: %d %q", code, b)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("at the desk took %s", d)
	}
	code, b = e.call(t, "GET", "/api/v1/sessions/"+sid+"/messages", person, nil)
	if code != 200 || !strings.Contains(string(b), `"kind":"approval"`) || !strings.Contains(string(b), `"tool_name":"Bash"`) ||
		!strings.Contains(string(b), "rm -rf node_modules") || !strings.Contains(string(b), `"agent_type":"claude-code"`) {
		t.Fatalf("timeline: %d %s", code, b)
	}
	var title, status string
	e.db.QueryRow(`SELECT COALESCE(title, ''), status FROM agent_instances WHERE id = $1`, sid).Scan(&title, &status)
	if title != "/home/me/project" || status != statusActive {
		t.Fatalf("session title %q status %s", title, status)
	}
	// Nothing open, nothing to answer, nothing sent.
	if n := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE agent_instance_id = $1 AND requires_user_input`, sid); n != 0 {
		t.Fatalf("%d open questions at the desk", n)
	}
	hkQuiet(t, rc, 0, "at the desk")
}

// Away: the PermissionRequest is an approval like approve's: same card and
// notification with lock-screen actions; the answer endpoint's allow and
// deny become Claude Code's decision byte for byte; an agent key cannot
// answer.
func TestHookPermissionAway(t *testing.T) {
	t.Parallel()
	e, agent, person := hkEnv(t, "a@example.com")
	rc := newReceiver(t, nil)
	mustChannel(t, e, person, map[string]any{"kind": "webhook", "url": rc.URL})
	hkAway(t, e, person, true)
	sid := newUUID()
	for i, c := range []struct {
		answer map[string]any
		want   string
	}{
		{map[string]any{"decision": "allow"}, hkAllow},
		{map[string]any{"decision": "deny", "message": "not on <Fridays> & never \"prod\""}, hkDeny("not on <Fridays> & never \"prod\"")},
		{map[string]any{"decision": "deny"}, hkDeny(deniedByPerson)},
	} {
		cmd := []string{"git push", "terraform apply", "rm -rf /"}[i]
		res := hkGo(context.Background(), e, agent, hkPermission(sid, cmd))
		qid := hkOpen(t, e, sid)
		code, b := e.call(t, "GET", "/api/v1/sessions", person, nil)
		if code != 200 || !strings.Contains(string(b), `"open_question":{"id":"`+qid+`"`) || !strings.Contains(string(b), `"kind":"approval"`) {
			t.Fatalf("card: %s", b)
		}
		if i == 0 {
			// The approval's notification, with Allow and Deny buttons.
			notifyWaitFor(t, "the approval's notification", 10*time.Second, func() bool { return rc.count() >= 1 })
			body := string(rc.requests()[0].body)
			if !strings.Contains(body, `"type":"question.asked"`) || !strings.Contains(body, `"question_id":"`+qid+`"`) || !strings.Contains(body, `"action":"allow"`) {
				t.Fatalf("notification: %s", body)
			}
			if code, _ := apAnswer(t, e, agent, qid, c.answer); code != http.StatusForbidden {
				t.Fatalf("an agent key answered: %d", code)
			}
		}
		if code, out := apAnswer(t, e, person, qid, c.answer); code != 200 {
			t.Fatalf("answer: %d %v", code, out)
		}
		if r := hkWait(t, res, 10*time.Second); r.code != 200 || r.body != c.want {
			t.Fatalf("hook answer %d %q, want %q", r.code, r.body, c.want)
		}
	}
}

// HOOK_WAIT passing: {} (Claude Code shows its own prompt) and the approval
// is closed as answered at the terminal or timed out; it can no longer be
// answered, and the session no longer waits.
func TestHookWaitPasses(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, func(a *app) { a.cfg.hookWait = 300 * time.Millisecond })
	agent, person := e.mustKey(t, "w@example.com", scopeAgent), e.mustKey(t, "w@example.com", scopePerson)
	hkAway(t, e, person, true)
	sid := newUUID()
	start := time.Now()
	code, b := e.call(t, "POST", hookPath, agent, hkPermission(sid, "make deploy"))
	if code != 200 || string(b) != hkNothing || time.Since(start) < 300*time.Millisecond {
		t.Fatalf("after HOOK_WAIT: %d %q in %s", code, b, time.Since(start))
	}
	var qid, note, status string
	var asks bool
	e.db.QueryRow(`SELECT m.id, m.requires_user_input, COALESCE(m.decision_message, ''), a.status FROM messages m
		JOIN agent_instances a ON a.id = m.agent_instance_id WHERE m.agent_instance_id = $1 AND m.kind = 'approval'`, sid).Scan(&qid, &asks, &note, &status)
	if asks || note != hookClosedNote || status != statusActive {
		t.Fatalf("not closed: asks %v note %q status %s", asks, note, status)
	}
	if code, out := apAnswer(t, e, person, qid, map[string]any{"decision": "allow"}); code != http.StatusConflict || !strings.Contains(out["detail"].(string), hookClosedNote) {
		t.Fatalf("answering a closed approval: %d %v", code, out)
	}
	// The same call again is a new approval, not the closed one.
	res := hkGo(context.Background(), e, agent, hkPermission(sid, "make deploy"))
	qid2 := hkOpen(t, e, sid)
	if qid2 == qid {
		t.Fatal("a closed approval was resumed")
	}
	apAnswer(t, e, person, qid2, map[string]any{"decision": "allow"})
	if r := hkWait(t, res, 10*time.Second); r.body != hkAllow {
		t.Fatalf("second: %q", r.body)
	}
}

// Allow for this session: a matching second request is allowed at once.
func TestHookAllowForSession(t *testing.T) {
	t.Parallel()
	e, agent, person := hkEnv(t, "s@example.com")
	hkAway(t, e, person, true)
	sid := newUUID()
	res := hkGo(context.Background(), e, agent, hkPermission(sid, "npm test"))
	qid := hkOpen(t, e, sid)
	if code, out := apAnswer(t, e, person, qid, map[string]any{"decision": "allow_session"}); code != 200 || out["rule"] != "Bash(npm)" {
		t.Fatalf("allow_session: %d %v", code, out)
	}
	if r := hkWait(t, res, 10*time.Second); r.body != hkAllow {
		t.Fatalf("first: %q", r.body)
	}
	start := time.Now()
	code, b := e.call(t, "POST", hookPath, agent, hkPermission(sid, "npm run build"))
	if code != 200 || string(b) != hkAllow || time.Since(start) > 2*time.Second {
		t.Fatalf("rule-allowed: %d %q", code, b)
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE agent_instance_id = $1 AND decided_by_rule = 'Bash(npm)'`, sid); n != 1 {
		t.Fatalf("rule-allowed call not in the timeline (%d)", n)
	}
}

// A client that hangs up leaves the approval open and answerable; the same
// request again (same tool_use_id) resumes it.
func TestHookDisconnectResumes(t *testing.T) {
	t.Parallel()
	e, agent, person := hkEnv(t, "r@example.com")
	hkAway(t, e, person, true)
	sid := newUUID()
	in := hkPermission(sid, "docker system prune")
	in["tool_use_id"] = "toolu_01ABC123"
	ctx, cancel := context.WithCancel(context.Background())
	res := hkGo(ctx, e, agent, in)
	qid := hkOpen(t, e, sid)
	cancel()
	if r := <-res; r.err == nil {
		t.Fatalf("the cancelled call answered %d %q", r.code, r.body)
	}
	time.Sleep(200 * time.Millisecond)
	if n := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE id = $1 AND requires_user_input AND decision IS NULL`, qid); n != 1 {
		t.Fatal("the approval closed when the client hung up")
	}
	res = hkGo(context.Background(), e, agent, in)
	mcpTWaiters(t, e, 1)
	apAnswer(t, e, person, qid, map[string]any{"decision": "allow"})
	if r := hkWait(t, res, 10*time.Second); r.body != hkAllow {
		t.Fatalf("resumed: %q", r.body)
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE agent_instance_id = $1 AND kind = 'approval'`, sid); n != 1 {
		t.Fatalf("%d approvals, want 1", n)
	}
}

// Keys, other users, malformed bodies, other events.
func TestHookAccessAndBadInput(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	agent := e.mustKey(t, "x@example.com", scopeAgent)
	bob := e.mustKey(t, "bob@example.com", scopeAgent)
	sid := newUUID()
	if code, b := e.call(t, "POST", hookPath, bob, hkEvent(sid, "Notification", map[string]any{"message": "hi", "notification_type": "idle_prompt"})); code != 200 {
		t.Fatalf("bob: %d %s", code, b)
	}
	for _, in := range []map[string]any{
		hkPermission(sid, "ls"),
		hkEvent(sid, "Notification", map[string]any{"message": "x", "notification_type": "idle_prompt"}),
		hkEvent(sid, "Stop", nil),
		hkEvent(sid, "SessionEnd", map[string]any{"reason": "other"}),
	} {
		if code, b := e.call(t, "POST", hookPath, agent, in); code != http.StatusNotFound {
			t.Fatalf("another user's session, %s: %d %s", in["hook_event_name"], code, b)
		}
	}
	if code, _ := e.call(t, "POST", hookPath, "", hkEvent(newUUID(), "Stop", nil)); code != http.StatusUnauthorized {
		t.Fatalf("no key: %d", code)
	}
	noTool := hkPermission(newUUID(), "ls")
	delete(noTool, "tool_name")
	strInput, arrInput, noInput := hkPermission(newUUID(), "ls"), hkPermission(newUUID(), "ls"), hkPermission(newUUID(), "ls")
	strInput["tool_input"], arrInput["tool_input"] = "ls", []any{"ls"}
	delete(noInput, "tool_input")
	for name, body := range map[string]any{
		"not JSON":          "session_id=1",
		"empty":             "",
		"an array":          `[{"hook_event_name":"Stop"}]`,
		"session_id":        hkEvent("abc123", "Stop", nil),
		"no session_id":     map[string]any{"hook_event_name": "Stop"},
		"number session_id": map[string]any{"hook_event_name": "Stop", "session_id": 7},
		"no event":          map[string]any{"session_id": newUUID()},
		"no tool_name":      noTool,
		"string tool_input": strInput,
		"array tool_input":  arrInput,
		"no tool_input":     noInput,
	} {
		code, b := e.call(t, "POST", hookPath, agent, body)
		if code != http.StatusBadRequest || mustJSON(t, b)["detail"] == "" {
			t.Errorf("%s: %d %s", name, code, b)
		}
	}
	// Any other event: {} and nothing stored, not even the session.
	other := newUUID()
	for _, ev := range []string{"PreToolUse", "PostToolUse", "UserPromptSubmit", "SessionStart", "SomethingNew"} {
		code, b := e.call(t, "POST", hookPath, agent, hkEvent(other, ev, map[string]any{"tool_name": "Bash", "tool_input": map[string]any{"command": "ls"}}))
		if code != 200 || string(b) != hkNothing {
			t.Fatalf("%s: %d %q", ev, code, b)
		}
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM agent_instances WHERE id = $1`, other); n != 0 {
		t.Fatal("another event stored a session")
	}
	// A cwd is kept as the title, bounded.
	long := hkEvent(newUUID(), "Stop", nil)
	long["cwd"] = "/" + strings.Repeat("d", 5000)
	if code, b := e.call(t, "POST", hookPath, agent, long); code != 200 {
		t.Fatalf("long cwd: %d %s", code, b)
	}
	if n := mcpTCount(t, e, `SELECT length(title) FROM agent_instances WHERE id = $1`, long["session_id"]); n != maxTitleChars {
		t.Fatalf("title of %d characters, want %d", n, maxTitleChars)
	}
}

// A Notification is in the timeline and reaches the person's channels once,
// as agent.waiting with priority high; a permission_prompt for a session
// whose approval is open sends nothing more.
func TestHookNotification(t *testing.T) {
	t.Parallel()
	e, agent, person := hkEnv(t, "n@example.com")
	rc := newReceiver(t, nil)
	mustChannel(t, e, person, map[string]any{"kind": "ntfy", "url": rc.URL + "/topic"}) // default events
	sid := newUUID()
	code, b := e.call(t, "POST", hookPath, agent, hkEvent(sid, "Notification", map[string]any{
		"message": "Claude is waiting for your input", "title": "Waiting", "notification_type": "idle_prompt"}))
	if code != 200 || string(b) != hkNothing {
		t.Fatalf("notification: %d %q", code, b)
	}
	notifyWaitFor(t, "agent.waiting", 10*time.Second, func() bool { return rc.count() >= 1 })
	r := rc.requests()[0]
	if r.header.Get("Priority") != "high" || string(r.body) != "Claude is waiting for your input" || !strings.Contains(r.header.Get("Title"), "waiting") {
		t.Fatalf("agent.waiting: %v %q", r.header, r.body)
	}
	code, b = e.call(t, "GET", "/api/v1/sessions/"+sid+"/messages", person, nil)
	if code != 200 || !strings.Contains(string(b), "Claude is waiting for your input") {
		t.Fatalf("timeline: %s", b)
	}
	// An open approval: its own notification, and no second push.
	hkAway(t, e, person, true)
	res := hkGo(context.Background(), e, agent, hkPermission(sid, "git push --force"))
	qid := hkOpen(t, e, sid)
	notifyWaitFor(t, "the approval", 10*time.Second, func() bool { return rc.count() >= 2 })
	code, b = e.call(t, "POST", hookPath, agent, hkEvent(sid, "Notification", map[string]any{
		"message": "Claude needs your permission to use Bash", "title": "Permission needed", "notification_type": "permission_prompt"}))
	if code != 200 || string(b) != hkNothing {
		t.Fatalf("permission_prompt: %d %q", code, b)
	}
	hkQuiet(t, rc, 2, "no double push")
	apAnswer(t, e, person, qid, map[string]any{"decision": "deny"})
	hkWait(t, res, 10*time.Second)
	if n := mcpTCount(t, e, `SELECT count(*) FROM notification_events WHERE kind = 'agent.waiting'`); n != 1 {
		t.Fatalf("%d agent.waiting events, want 1", n)
	}
}

// Stop: the session waits for the person, and channels that asked for
// agent.idle hear of it (only they). SessionEnd: COMPLETED.
func TestHookStopAndSessionEnd(t *testing.T) {
	t.Parallel()
	e, agent, person := hkEnv(t, "t@example.com")
	idle, plain := newReceiver(t, nil), newReceiver(t, nil)
	mustChannel(t, e, person, map[string]any{"kind": "webhook", "url": idle.URL, "events": []string{"agent.idle"}})
	mustChannel(t, e, person, map[string]any{"kind": "webhook", "url": plain.URL})
	sid := newUUID()
	code, b := e.call(t, "POST", hookPath, agent, hkEvent(sid, "Stop", map[string]any{"permission_mode": "default", "stop_reason": "end_turn", "stop_hook_active": false}))
	if code != 200 || string(b) != hkNothing {
		t.Fatalf("stop: %d %q", code, b)
	}
	code, b = e.call(t, "GET", "/api/v1/sessions", person, nil)
	if code != 200 || !strings.Contains(string(b), `"status":"AWAITING_INPUT"`) {
		t.Fatalf("after Stop: %s", b)
	}
	notifyWaitFor(t, "agent.idle", 10*time.Second, func() bool { return idle.count() >= 1 })
	if body := string(idle.requests()[0].body); !strings.Contains(body, `"type":"agent.idle"`) || !strings.Contains(body, `"session_id":"`+sid+`"`) {
		t.Fatalf("agent.idle: %s", body)
	}
	code, b = e.call(t, "POST", hookPath, agent, hkEvent(sid, "SessionEnd", map[string]any{"reason": "prompt_input_exit"}))
	if code != 200 || string(b) != hkNothing {
		t.Fatalf("session end: %d %q", code, b)
	}
	var status string
	e.db.QueryRow(`SELECT status FROM agent_instances WHERE id = $1`, sid).Scan(&status)
	if status != statusCompleted {
		t.Fatalf("after SessionEnd: %s", status)
	}
	hkQuiet(t, plain, 0, "a channel that did not ask for agent.idle")
}

// The Away switch: person keys only, off by default.
func TestPresence(t *testing.T) {
	t.Parallel()
	e, agent, person := hkEnv(t, "p@example.com")
	other := e.mustKey(t, "q@example.com", scopePerson)
	if code, b := e.call(t, "GET", "/api/v1/presence", person, nil); code != 200 || string(b) != `{"away":false}`+"\n" {
		t.Fatalf("default: %d %s", code, b)
	}
	hkAway(t, e, person, true)
	if code, b := e.call(t, "GET", "/api/v1/presence", person, nil); code != 200 || string(b) != `{"away":true}`+"\n" {
		t.Fatalf("after PUT: %d %s", code, b)
	}
	if code, b := e.call(t, "GET", "/api/v1/presence", other, nil); code != 200 || string(b) != `{"away":false}`+"\n" {
		t.Fatalf("another user: %d %s", code, b)
	}
	for _, m := range []string{"GET", "PUT"} {
		if code, _ := e.call(t, m, "/api/v1/presence", agent, map[string]any{"away": false}); code != http.StatusForbidden {
			t.Fatalf("agent key %s: %d", m, code)
		}
	}
	for _, body := range []any{map[string]any{}, map[string]any{"away": "yes"}, "{", map[string]any{"away": nil}} {
		if code, b := e.call(t, "PUT", "/api/v1/presence", person, body); code != 400 {
			t.Fatalf("%v: %d %s", body, code, b)
		}
	}
	hkAway(t, e, person, false)
}

func TestHookWaitConfig(t *testing.T) {
	env := func(v string) func(string) string {
		return func(k string) string {
			if k == "HOOK_WAIT" {
				return v
			}
			return ""
		}
	}
	for v, want := range map[string]time.Duration{"": 280 * time.Second, "90": 90 * time.Second, "2m": 2 * time.Minute} {
		c, err := loadConfig(env(v))
		if err != nil || c.hookWait != want {
			t.Errorf("HOOK_WAIT=%q: %v %v", v, c.hookWait, err)
		}
	}
	// At or near the PermissionRequest hook's 300 s timeout Claude Code
	// would give up first (review, minor): over 290 s is refused.
	if c, err := loadConfig(env("290s")); err != nil || c.hookWait != 290*time.Second {
		t.Errorf("HOOK_WAIT=290s: %v %v", c.hookWait, err)
	}
	for _, v := range []string{"soon", "0", "-5", "291s", "300", "5m"} {
		if _, err := loadConfig(env(v)); err == nil || !strings.Contains(err.Error(), "HOOK_WAIT") {
			t.Errorf("HOOK_WAIT=%q: %v", v, err)
		}
	}
}

// TestHookReadmeSettings: the README's settings block is valid JSON, holds
// the four events, each an http hook at the endpoint with the documented
// keys; PermissionRequest's timeout is above HOOK_WAIT's default, the
// others' short (review item 4).
func TestHookReadmeSettings(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(readme), "## Claude Code in a terminal: approve from your phone")
	if !ok {
		t.Fatal("README has no section \"Claude Code in a terminal: approve from your phone\"")
	}
	block := regexp.MustCompile("(?s)```json\n(.*?)```").FindStringSubmatch(section)
	if block == nil {
		t.Fatal("no json block in the section")
	}
	var settings struct {
		Hooks map[string][]struct {
			Matcher *string `json:"matcher"`
			Hooks   []struct {
				Type           string            `json:"type"`
				URL            string            `json:"url"`
				Timeout        int               `json:"timeout"`
				Headers        map[string]string `json:"headers"`
				AllowedEnvVars []string          `json:"allowedEnvVars"`
			} `json:"hooks"`
		} `json:"hooks"`
	}
	dec := json.NewDecoder(strings.NewReader(block[1]))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&settings); err != nil {
		t.Fatalf("settings block: %v", err)
	}
	for _, ev := range []string{"PermissionRequest", "Notification", "Stop", "SessionEnd"} {
		groups := settings.Hooks[ev]
		if len(groups) != 1 || len(groups[0].Hooks) != 1 {
			t.Fatalf("%s: %d groups", ev, len(groups))
		}
		if ev == "Stop" && groups[0].Matcher != nil {
			t.Errorf("Stop takes no matcher")
		}
		h := groups[0].Hooks[0]
		if h.Type != "http" || !strings.HasSuffix(h.URL, hookPath) ||
			h.Headers["Authorization"] != "Bearer $AGENTLINE_KEY" || len(h.AllowedEnvVars) != 1 || h.AllowedEnvVars[0] != "AGENTLINE_KEY" {
			t.Errorf("%s: %+v", ev, h)
		}
		// Only a PermissionRequest waits for the person, so only it may take
		// long: Claude Code waits for the others (a Stop hook at every turn's
		// end), and a slow server must not stall it for minutes.
		if ev == "PermissionRequest" {
			if h.Timeout != 300 || time.Duration(h.Timeout)*time.Second <= 280*time.Second {
				t.Errorf("%s: timeout %d, want 300 (above HOOK_WAIT)", ev, h.Timeout)
			}
		} else if h.Timeout < 1 || h.Timeout > 30 {
			t.Errorf("%s: timeout %d, want at most 30 s", ev, h.Timeout)
		}
	}
	if len(settings.Hooks) != 4 {
		t.Errorf("%d events, want 4", len(settings.Hooks))
	}
}

// The inbox page carries the Away toggle, wired to /api/v1/presence.
func TestHookInboxAwayToggle(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	for path, want := range map[string]string{
		"/":       `<input id="away" type="checkbox"> <span>Away<span class="long"> — send approvals to my phone</span>`,
		"/app.js": `api('PUT', '/api/v1/presence', { away: want })`,
	} {
		resp, err := http.Get(e.srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(b), want) {
			t.Errorf("%s lacks %s", path, want)
		}
	}
}

// Review item 1: Claude Code's PermissionRequest has no tool_use_id, and
// the hook never sees tool calls that need no permission, so an allow or a
// deny once is never the answer to the same request again: it asks again.
func TestHookDecisionNotReused(t *testing.T) {
	t.Parallel()
	e, agent, person := hkEnv(t, "once@example.com")
	hkAway(t, e, person, true)
	sid := newUUID()
	var ids []string
	for i, c := range []struct {
		answer string
		want   string
	}{{"allow", hkAllow}, {"deny", hkDeny(deniedByPerson)}, {"allow", hkAllow}} {
		res := hkGo(context.Background(), e, agent, hkPermission(sid, "npm test"))
		select {
		case r := <-res:
			t.Fatalf("request %d was answered at once without asking: %d %q", i, r.code, r.body)
		case <-time.After(500 * time.Millisecond):
		}
		qid := hkOpen(t, e, sid)
		for _, old := range ids {
			if qid == old {
				t.Fatalf("request %d resumed approval %s", i, old)
			}
		}
		ids = append(ids, qid)
		if code, out := apAnswer(t, e, person, qid, map[string]any{"decision": c.answer}); code != 200 {
			t.Fatalf("answer %d: %d %v", i, code, out)
		}
		if r := hkWait(t, res, 10*time.Second); r.code != 200 || r.body != c.want {
			t.Fatalf("request %d: %d %q, want %q", i, r.code, r.body, c.want)
		}
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE agent_instance_id = $1 AND kind = 'approval'`, sid); n != 3 {
		t.Fatalf("%d approvals, want 3", n)
	}
}

// Review item 2: `claude --resume` keeps the session id, so any event after
// SessionEnd but a SessionEnd reopens the session: Stop marks it waiting
// again, and an away PermissionRequest is an approval the person can
// answer, not one that ended at once.
func TestHookResumedSession(t *testing.T) {
	t.Parallel()
	e, agent, person := hkEnv(t, "resume@example.com")
	sid := newUUID()
	status := func() (s string, ended bool) {
		t.Helper()
		if err := e.db.QueryRow(`SELECT status, ended_at IS NOT NULL FROM agent_instances WHERE id = $1`, sid).Scan(&s, &ended); err != nil {
			t.Fatal(err)
		}
		return s, ended
	}
	for _, in := range []map[string]any{hkEvent(sid, "Stop", nil), hkEvent(sid, "SessionEnd", map[string]any{"reason": "prompt_input_exit"})} {
		if code, b := e.call(t, "POST", hookPath, agent, in); code != 200 || string(b) != hkNothing {
			t.Fatalf("%s: %d %q", in["hook_event_name"], code, b)
		}
	}
	if s, ended := status(); s != statusCompleted || !ended {
		t.Fatalf("after SessionEnd: %s ended %v", s, ended)
	}
	// A SessionEnd again keeps it ended.
	if code, b := e.call(t, "POST", hookPath, agent, hkEvent(sid, "SessionEnd", map[string]any{"reason": "other"})); code != 200 || string(b) != hkNothing {
		t.Fatalf("SessionEnd again: %d %q", code, b)
	}
	if s, _ := status(); s != statusCompleted {
		t.Fatalf("after a second SessionEnd: %s", s)
	}
	// Resumed: Stop shows it waiting for the person.
	if code, b := e.call(t, "POST", hookPath, agent, hkEvent(sid, "Stop", nil)); code != 200 || string(b) != hkNothing {
		t.Fatalf("Stop after resume: %d %q", code, b)
	}
	if s, ended := status(); s != statusAwaitingInput || ended {
		t.Fatalf("Stop after resume: %s ended %v", s, ended)
	}
	// Ended again, then resumed by a PermissionRequest while away.
	e.call(t, "POST", hookPath, agent, hkEvent(sid, "SessionEnd", map[string]any{"reason": "other"}))
	hkAway(t, e, person, true)
	res := hkGo(context.Background(), e, agent, hkPermission(sid, "ls -la"))
	qid := hkOpen(t, e, sid)
	if code, out := apAnswer(t, e, person, qid, map[string]any{"decision": "allow"}); code != 200 {
		t.Fatalf("answer: %d %v", code, out)
	}
	if r := hkWait(t, res, 10*time.Second); r.code != 200 || r.body != hkAllow {
		t.Fatalf("resumed session's approval: %d %q", r.code, r.body)
	}
	if s, ended := status(); s != statusActive || ended {
		t.Fatalf("after the approval: %s ended %v", s, ended)
	}
}

// Review item 3: a tool_input that is valid JSON is never a 500: a NUL in a
// string or a key (PostgreSQL's jsonb has none) is stored as U+FFFD, and a
// number beyond float64's range (PostgreSQL's numeric rejects it) is a 400,
// at the desk and away.
func TestHookOddToolInput(t *testing.T) {
	t.Parallel()
	e, agent, person := hkEnv(t, "odd@example.com", func(a *app) { a.cfg.hookWait = 300 * time.Millisecond })
	for _, away := range []bool{false, true} {
		hkAway(t, e, person, away)
		sid := newUUID()
		nul := hkPermission(sid, "ls")
		nul["tool_input"] = map[string]any{"content": "a\x00b", "k\x00": []any{"\x00"}}
		if code, b := e.call(t, "POST", hookPath, agent, nul); code != 200 || string(b) != hkNothing {
			t.Fatalf("away %v, NUL: %d %s", away, code, b)
		}
		var stored string
		e.db.QueryRow(`SELECT tool_input::text FROM messages WHERE agent_instance_id = $1 AND kind = 'approval'`, sid).Scan(&stored)
		if stored != `{"k`+"\uFFFD"+`": ["`+"\uFFFD"+`"], "content": "a`+"\uFFFD"+`b"}` { // jsonb orders keys by length
			t.Fatalf("away %v, NUL stored as %q", away, stored)
		}
		for _, n := range []string{"1e999999", "-1e400", `[1, {"x": 2e308}]`, "1e-2000", "1." + strings.Repeat("0", 20000)} {
			body := `{"session_id":"` + newUUID() + `","hook_event_name":"PermissionRequest","tool_name":"Bash","tool_input":{"n":` + n + `}}`
			code, b := e.call(t, "POST", hookPath, agent, body)
			if code != http.StatusBadRequest || !strings.Contains(mustJSON(t, b)["detail"].(string), "tool_input") {
				t.Fatalf("away %v, %s: %d %s", away, n, code, b)
			}
		}
		// A number PostgreSQL can hold is kept as written.
		body := `{"session_id":"` + sid + `","hook_event_name":"PermissionRequest","tool_name":"Bash","tool_input":{"n":1e300,"m":0.000000000000000000001}}`
		if code, b := e.call(t, "POST", hookPath, agent, body); code != 200 || string(b) != hkNothing {
			t.Fatalf("away %v, big number: %d %s", away, code, b)
		}
	}
}

// Review item 7: an event agentline ignores is answered {} whatever its
// fields hold, and a field of another event is never read.
func TestHookIgnoredFields(t *testing.T) {
	t.Parallel()
	e, agent, _ := hkEnv(t, "ign@example.com")
	sid := newUUID()
	for name, body := range map[string]any{
		"SessionStart, id not a UUID":   map[string]any{"hook_event_name": "SessionStart", "session_id": "x", "source": "startup"},
		"PreToolUse, no session_id":     map[string]any{"hook_event_name": "PreToolUse", "tool_use_id": 5, "tool_input": "ls"},
		"PostToolUse, odd types":        hkEvent(newUUID(), "PostToolUse", map[string]any{"tool_use_id": 7, "message": []any{1}, "title": false, "cwd": 3}),
		"UserPromptSubmit, number id":   map[string]any{"hook_event_name": "UserPromptSubmit", "session_id": 12, "prompt": "hi"},
		"Stop, another event's fields":  hkEvent(sid, "Stop", map[string]any{"tool_use_id": 9, "message": 1, "title": []any{}, "notification_type": 3, "tool_name": 4}),
		"Notification, others' fields":  hkEvent(sid, "Notification", map[string]any{"message": "hi", "tool_use_id": 9, "tool_input": "x", "last_assistant_message": 2}),
		"SessionEnd, others' fields":    hkEvent(sid, "SessionEnd", map[string]any{"reason": "other", "message": 1, "tool_use_id": false}),
		"PermissionRequest, odd others": func() map[string]any { m := hkPermission(sid, "ls"); m["message"], m["title"] = 1, 2; return m }(),
	} {
		if code, b := e.call(t, "POST", hookPath, agent, body); code != 200 || string(b) != hkNothing {
			t.Errorf("%s: %d %s", name, code, b)
		}
	}
}

// Review, minor: only the notification types that wait for the person
// (permission_prompt, idle_prompt, elicitation_dialog, or none given, as
// older Claude Code sends) are agent.waiting; others, auth_success among
// them, are a timeline step only: no push, the session not waiting.
func TestHookNotificationTypes(t *testing.T) {
	t.Parallel()
	e, agent, person := hkEnv(t, "types@example.com")
	rc := newReceiver(t, nil)
	mustChannel(t, e, person, map[string]any{"kind": "webhook", "url": rc.URL, "events": []string{"agent.waiting"}})
	sid := newUUID()
	for _, c := range []struct {
		typ     string
		waiting bool
	}{{"auth_success", false}, {"something_new", false}, {"elicitation_dialog", true}, {"", true}} {
		extra := map[string]any{"message": "note " + c.typ}
		if c.typ != "" {
			extra["notification_type"] = c.typ
		}
		before := mcpTCount(t, e, `SELECT count(*) FROM notification_events WHERE kind = 'agent.waiting'`)
		if code, b := e.call(t, "POST", hookPath, agent, hkEvent(sid, "Notification", extra)); code != 200 || string(b) != hkNothing {
			t.Fatalf("%q: %d %s", c.typ, code, b)
		}
		code, b := e.call(t, "GET", "/api/v1/sessions/"+sid+"/messages", person, nil)
		if code != 200 || !strings.Contains(string(b), "note "+c.typ) {
			t.Fatalf("%q not in the timeline: %s", c.typ, b)
		}
		sent := mcpTCount(t, e, `SELECT count(*) FROM notification_events WHERE kind = 'agent.waiting'`) - before
		var status string
		e.db.QueryRow(`SELECT status FROM agent_instances WHERE id = $1`, sid).Scan(&status)
		if (sent == 1) != c.waiting || sent > 1 || (status == statusAwaitingInput) != c.waiting {
			t.Fatalf("%q: %d agent.waiting, status %s; want waiting %v", c.typ, sent, status, c.waiting)
		}
		// The person answers: the session no longer waits.
		if c.waiting {
			mcpTAnswer(t, e, person, sid, "ok")
		}
	}
}

// Review, minor: a SessionEnd for a session agentline never saw creates
// nothing and sends nothing; another user's session is still a 404.
func TestHookSessionEndUnseen(t *testing.T) {
	t.Parallel()
	e, agent, person := hkEnv(t, "unseen@example.com")
	rc := newReceiver(t, nil)
	mustChannel(t, e, person, map[string]any{"kind": "webhook", "url": rc.URL, "events": []string{"session.ended"}})
	sid := newUUID()
	if code, b := e.call(t, "POST", hookPath, agent, hkEvent(sid, "SessionEnd", map[string]any{"reason": "clear"})); code != 200 || string(b) != hkNothing {
		t.Fatalf("unseen SessionEnd: %d %s", code, b)
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM agent_instances WHERE id = $1`, sid); n != 0 {
		t.Fatal("SessionEnd created the session")
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM notification_events`); n != 0 {
		t.Fatalf("%d notification events", n)
	}
	hkQuiet(t, rc, 0, "an unseen session's end")
	bob := e.mustKey(t, "bob@example.com", scopeAgent)
	if code, b := e.call(t, "POST", hookPath, bob, hkEvent(sid, "Stop", nil)); code != 200 {
		t.Fatalf("bob: %d %s", code, b)
	}
	if code, b := e.call(t, "POST", hookPath, agent, hkEvent(sid, "SessionEnd", map[string]any{"reason": "clear"})); code != http.StatusNotFound {
		t.Fatalf("another user's session: %d %s", code, b)
	}
}

// Review item 5: turning Away off releases the hooks that wait: each
// answers {} at once (Claude Code shows its own prompt to the person now at
// the keyboard) and its approval is closed; an approve tool's approval of
// the same person stays open.
func TestHookAwayOffReleases(t *testing.T) {
	t.Parallel()
	e, agent, person := hkEnv(t, "back@example.com")
	uid := e.mustUserID(t, "back@example.com")
	tool, err := e.a.store.askApproval(context.Background(), uid, approvalRequest{SessionID: newUUID(), AgentType: "claude-code", Create: true,
		ToolName: "Bash", Input: []byte(`{"command":"make"}`), Content: "Approve Bash: make"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	hkAway(t, e, person, true)
	sid := newUUID()
	res := hkGo(context.Background(), e, agent, hkPermission(sid, "git push"))
	qid := hkOpen(t, e, sid)
	mcpTWaiters(t, e, 1)
	start := time.Now()
	hkAway(t, e, person, false)
	if r := hkWait(t, res, 5*time.Second); r.code != 200 || r.body != hkNothing || time.Since(start) > 2*time.Second {
		t.Fatalf("after Away off: %d %q in %s", r.code, r.body, time.Since(start))
	}
	var asks bool
	var note string
	e.db.QueryRow(`SELECT requires_user_input, COALESCE(decision_message, '') FROM messages WHERE id = $1`, qid).Scan(&asks, &note)
	if asks || note != hookClosedNote {
		t.Fatalf("the hook's approval: asks %v note %q", asks, note)
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE id = $1 AND requires_user_input AND decision IS NULL`, tool.ID); n != 1 {
		t.Fatal("the approve tool's approval was closed")
	}
}

// Review item 6: an approval left open by a hook that hung up asks nobody
// once HOOK_WAIT has passed (Claude Code shows its own prompt), so a
// permission_prompt then is pushed as agent.waiting.
func TestHookPromptAfterLeftover(t *testing.T) {
	t.Parallel()
	e, agent, person := hkEnv(t, "left@example.com", func(a *app) { a.cfg.hookWait = time.Second })
	rc := newReceiver(t, nil)
	mustChannel(t, e, person, map[string]any{"kind": "webhook", "url": rc.URL, "events": []string{"agent.waiting"}})
	hkAway(t, e, person, true)
	sid := newUUID()
	ctx, cancel := context.WithCancel(context.Background())
	res := hkGo(ctx, e, agent, hkPermission(sid, "git push"))
	hkOpen(t, e, sid)
	cancel()
	<-res
	prompt := hkEvent(sid, "Notification", map[string]any{"message": "Claude needs your permission to use Bash", "notification_type": "permission_prompt"})
	// Within HOOK_WAIT the approval may still have its hook: quiet.
	if code, b := e.call(t, "POST", hookPath, agent, prompt); code != 200 || string(b) != hkNothing {
		t.Fatalf("prompt: %d %s", code, b)
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM notification_events WHERE kind = 'agent.waiting'`); n != 0 {
		t.Fatalf("%d agent.waiting within HOOK_WAIT", n)
	}
	time.Sleep(1200 * time.Millisecond)
	if code, b := e.call(t, "POST", hookPath, agent, prompt); code != 200 || string(b) != hkNothing {
		t.Fatalf("prompt: %d %s", code, b)
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM notification_events WHERE kind = 'agent.waiting'`); n != 1 {
		t.Fatalf("%d agent.waiting after HOOK_WAIT, want 1", n)
	}
}

// The cwd Claude Code reports is the session's title in the person's
// sessions list; other sessions have none (null).
func TestHookTitleInSessions(t *testing.T) {
	t.Parallel()
	e, agent, person := hkEnv(t, "title@example.com")
	sid := newUUID()
	if code, b := e.call(t, "POST", hookPath, agent, hkEvent(sid, "Stop", nil)); code != 200 {
		t.Fatalf("Stop: %d %s", code, b)
	}
	plain := mcpTNewSession(t, mcpTConnect(t, e, mcpTStreamable, agent, mcpTDial{}))
	code, b := e.call(t, "GET", "/api/v1/sessions", person, nil)
	if code != 200 {
		t.Fatalf("sessions: %d %s", code, b)
	}
	var page struct {
		Sessions []struct {
			ID    string  `json:"id"`
			Title *string `json:"title"`
		} `json:"sessions"`
	}
	if err := json.Unmarshal(b, &page); err != nil {
		t.Fatal(err)
	}
	titles := map[string]*string{}
	for _, s := range page.Sessions {
		titles[s.ID] = s.Title
	}
	if got := titles[sid]; got == nil || *got != "/home/me/project" {
		t.Fatalf("the hook session's title: %v", got)
	}
	if got, ok := titles[plain]; !ok || got != nil {
		t.Fatalf("a session without hooks: title %v (listed %v)", got, ok)
	}
}
