package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"
)

// ---- helpers ----

// restKeys fails unless m has exactly the keys want.
func restKeys(t testing.TB, what string, m map[string]any, want ...string) {
	t.Helper()
	var got []string
	for k := range m {
		got = append(got, k)
	}
	sort.Strings(got)
	sort.Strings(want)
	if !slices.Equal(got, want) {
		t.Fatalf("%s: keys %v, want exactly %v", what, got, want)
	}
}

// restIsoformat is what Python's datetime.isoformat writes for an aware
// time with microseconds.
var restIsoformat = regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d$`)

// restMessages checks that v is a JSON list of Omnara Messages (exactly the
// five keys, created_at RFC 3339 with a zone) and returns them.
func restMessages(t testing.TB, what string, v any) []map[string]any {
	t.Helper()
	list, ok := v.([]any)
	if !ok {
		t.Fatalf("%s: %#v is not a JSON list", what, v)
	}
	var out []map[string]any
	for i, x := range list {
		m, ok := x.(map[string]any)
		if !ok {
			t.Fatalf("%s[%d]: %#v is not an object", what, i, x)
		}
		restKeys(t, fmt.Sprintf("%s[%d]", what, i), m, "id", "content", "sender_type", "created_at", "requires_user_input")
		if _, ok := m["id"].(string); !ok {
			t.Fatalf("%s[%d].id = %#v", what, i, m["id"])
		}
		if _, ok := m["content"].(string); !ok {
			t.Fatalf("%s[%d].content = %#v", what, i, m["content"])
		}
		if st := m["sender_type"]; st != senderUser && st != senderAgent {
			t.Fatalf("%s[%d].sender_type = %#v", what, i, st)
		}
		if _, ok := m["requires_user_input"].(bool); !ok {
			t.Fatalf("%s[%d].requires_user_input = %#v", what, i, m["requires_user_input"])
		}
		ts, _ := m["created_at"].(string)
		// time.RFC3339 requires a zone ("Z" or ±hh:mm): a naive timestamp
		// fails here.
		at, err := time.Parse(time.RFC3339Nano, ts)
		if err != nil {
			t.Fatalf("%s[%d].created_at = %q: %v", what, i, ts, err)
		}
		// And in the form Omnara sent, which Python's fromisoformat reads
		// before 3.11 too.
		if !restIsoformat.MatchString(ts) {
			t.Fatalf("%s[%d].created_at = %q is not Python isoformat", what, i, ts)
		}
		if d := time.Since(at); d < -time.Minute || d > time.Hour {
			t.Fatalf("%s[%d].created_at = %q is not about now", what, i, ts)
		}
		out = append(out, m)
	}
	return out
}

// restOK makes a call that must answer 200 with a JSON object.
func restOK(t testing.TB, e *testEnv, method, path, key string, body any) map[string]any {
	t.Helper()
	code, b := e.call(t, method, path, key, body)
	if code != http.StatusOK {
		t.Fatalf("%s %s: %d %s", method, path, code, b)
	}
	return mustJSON(t, b)
}

// restStep posts an agent message and returns its id.
func restStep(t testing.TB, e *testEnv, key, session, content string, asks bool) string {
	t.Helper()
	m := restOK(t, e, "POST", "/api/v1/messages/agent", key, map[string]any{
		"agent_instance_id": session, "agent_type": "Claude Code", "content": content, "requires_user_input": asks})
	id, _ := m["message_id"].(string)
	if _, ok := parseUUID(id); !ok {
		t.Fatalf("message_id %q", id)
	}
	return id
}

// restUserMsg posts a person's message and returns its id.
func restUserMsg(t testing.TB, e *testEnv, key, session, content string, markAsRead bool) string {
	t.Helper()
	m := restOK(t, e, "POST", "/api/v1/messages/user", key, map[string]any{
		"agent_instance_id": session, "content": content, "mark_as_read": markAsRead})
	id, _ := m["message_id"].(string)
	return id
}

// restStatus returns a session's stored status.
func restStatus(t testing.TB, e *testEnv, session string) string {
	t.Helper()
	var st string
	if err := e.db.QueryRow(`SELECT status FROM agent_instances WHERE id = $1`, session).Scan(&st); err != nil {
		t.Fatal(err)
	}
	return st
}

// restDetail checks an error answer: JSON with exactly "detail", a
// non-empty string, sent as application/json.
func restDetail(t testing.TB, what string, b []byte) string {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("%s: error body %q is not JSON: %v", what, b, err)
	}
	restKeys(t, what, m, "detail")
	d, _ := m["detail"].(string)
	if d == "" {
		t.Fatalf("%s: empty detail in %s", what, b)
	}
	return d
}

// restRaw sends a request with full control over headers and body; a nil
// length hint sends the body chunked (no Content-Length).
func restRaw(t testing.TB, e *testEnv, method, path, key string, body io.Reader, chunked bool) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, e.srv.URL+path, body)
	if err != nil {
		t.Fatal(err)
	}
	if chunked {
		req.ContentLength = -1
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

// restWaiters waits until the hub has n waiters, failing after a while.
func restWaiters(t testing.TB, e *testEnv, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for e.a.hub.waiters() != n {
		if time.Now().After(deadline) {
			t.Fatalf("hub waiters = %d, want %d", e.a.hub.waiters(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func restPendingPath(session, lastRead string, wait int) string {
	q := url.Values{"agent_instance_id": {session}}
	if lastRead != "" {
		q.Set("last_read_message_id", lastRead)
	}
	if wait > 0 {
		q.Set("wait", fmt.Sprint(wait))
	}
	return "/api/v1/messages/pending?" + q.Encode()
}

// ---- success shapes ----

func TestRESTSuccessShapes(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "shape@example.com", scopeAgent)
	sid := newUUID()

	// A new session: its first message names an unknown id and an agent type.
	m := restOK(t, e, "POST", "/api/v1/messages/agent", key, map[string]any{
		"agent_instance_id": sid, "agent_type": "Claude-Code", "content": "step 1"})
	restKeys(t, "agent message", m, "success", "agent_instance_id", "message_id", "queued_user_messages")
	if m["success"] != true || m["agent_instance_id"] != sid {
		t.Fatalf("agent message: %v", m)
	}
	if q := restMessages(t, "queued_user_messages", m["queued_user_messages"]); len(q) != 0 {
		t.Fatalf("queued on a new session: %v", q)
	}
	step1 := m["message_id"].(string)
	var agentName string
	if err := e.db.QueryRow(`SELECT ua.name FROM agent_instances a JOIN user_agents ua ON ua.id = a.user_agent_id WHERE a.id = $1`, sid).Scan(&agentName); err != nil || agentName != "claude-code" {
		t.Fatalf("agent type stored as %q (%v), want folded to claude-code", agentName, err)
	}

	// Feedback queued for the next step.
	m = restOK(t, e, "POST", "/api/v1/messages/user", key, map[string]any{"agent_instance_id": sid, "content": "feedback", "mark_as_read": false})
	restKeys(t, "user message", m, "success", "message_id", "marked_as_read")
	if m["success"] != true || m["marked_as_read"] != false {
		t.Fatalf("user message: %v", m)
	}
	feedbackID := m["message_id"].(string)

	m = restOK(t, e, "POST", "/api/v1/messages/agent", key, map[string]any{"agent_instance_id": sid, "content": "step 2"})
	q := restMessages(t, "queued_user_messages", m["queued_user_messages"])
	if len(q) != 1 || q[0]["id"] != feedbackID || q[0]["content"] != "feedback" || q[0]["sender_type"] != "USER" || q[0]["requires_user_input"] != false {
		t.Fatalf("step 2 queued: %v", q)
	}
	step2 := m["message_id"].(string)

	// pending: nothing yet, then one message after the pointer.
	m = restOK(t, e, "GET", restPendingPath(sid, step2, 0), key, nil)
	restKeys(t, "pending", m, "agent_instance_id", "messages", "session_status", "status")
	if m["agent_instance_id"] != sid || m["status"] != "ok" || len(restMessages(t, "messages", m["messages"])) != 0 {
		t.Fatalf("pending: %v", m)
	}
	restUserMsg(t, e, key, sid, "more", false)
	m = restOK(t, e, "GET", restPendingPath(sid, step2, 0), key, nil)
	if got := restMessages(t, "messages", m["messages"]); m["status"] != "ok" || len(got) != 1 || got[0]["content"] != "more" {
		t.Fatalf("pending: %v", m)
	}
	// The pointer moved: the same last_read is now stale.
	m = restOK(t, e, "GET", restPendingPath(sid, step2, 0), key, nil)
	if m["status"] != "stale" || len(restMessages(t, "messages", m["messages"])) != 0 {
		t.Fatalf("pending with an old pointer: %v", m)
	}

	// request-input on the latest step.
	step3 := restStep(t, e, key, sid, "step 3", false)
	m = restOK(t, e, "PATCH", "/api/v1/messages/"+step3+"/request-input", key, nil)
	restKeys(t, "request-input", m, "success", "message_id", "agent_instance_id", "messages", "status")
	if m["success"] != true || m["message_id"] != step3 || m["agent_instance_id"] != sid || m["status"] != "ok" || len(restMessages(t, "messages", m["messages"])) != 0 {
		t.Fatalf("request-input: %v", m)
	}
	if st := restStatus(t, e, sid); st != statusAwaitingInput {
		t.Fatalf("status after request-input = %s", st)
	}
	restUserMsg(t, e, key, sid, "answer", false)
	if st := restStatus(t, e, sid); st != statusActive {
		t.Fatalf("status after the answer = %s", st)
	}
	// A question sets AWAITING_INPUT too.
	restStep(t, e, key, sid, "question?", true)
	if st := restStatus(t, e, sid); st != statusAwaitingInput {
		t.Fatalf("status after a question = %s", st)
	}
	_ = step1

	// End, twice (idempotent; ended_at set once).
	for i := 0; i < 2; i++ {
		m = restOK(t, e, "POST", "/api/v1/sessions/end", key, map[string]any{"agent_instance_id": sid})
		restKeys(t, "end", m, "success", "agent_instance_id", "final_status")
		if m["success"] != true || m["agent_instance_id"] != sid || m["final_status"] != "COMPLETED" {
			t.Fatalf("end: %v", m)
		}
	}
	if st := restStatus(t, e, sid); st != statusCompleted {
		t.Fatalf("status after end = %s", st)
	}

	// /health: exactly {"status":"healthy"}, no key needed.
	resp, b := restRaw(t, e, "GET", "/health", "", nil, false)
	if resp.StatusCode != 200 || strings.TrimSpace(string(b)) != `{"status":"healthy"}` {
		t.Fatalf("health: %d %s", resp.StatusCode, b)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("health Content-Type %q", ct)
	}
}

// TestRESTUUIDForms: upper-case and bare-hex ids name the same session.
func TestRESTUUIDForms(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "forms@example.com", scopeAgent)
	sid := newUUID()
	restStep(t, e, key, strings.ToUpper(sid), "one", false)
	m := restOK(t, e, "POST", "/api/v1/messages/agent", key, map[string]any{"agent_instance_id": strings.ReplaceAll(sid, "-", ""), "content": "two"})
	if m["agent_instance_id"] != sid {
		t.Fatalf("agent_instance_id %v, want canonical %s", m["agent_instance_id"], sid)
	}
	var n int
	e.db.QueryRow(`SELECT count(*) FROM messages WHERE agent_instance_id = $1`, sid).Scan(&n)
	if n != 2 {
		t.Fatalf("%d messages in the session, want 2", n)
	}
}

// ---- errors ----

type restCase struct {
	name   string
	method string
	path   string
	noKey  bool
	body   any // nil: no body; string/[]byte: raw
	want   int
}

func TestRESTErrors(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "errors@example.com", scopeAgent)
	other := e.mustKey(t, "other@example.com", scopeAgent)
	sid := newUUID()
	step := restStep(t, e, key, sid, "a step", false)
	userMsg := restUserMsg(t, e, key, sid, "a user message", false)
	otherSid := newUUID()
	otherStep := restStep(t, e, other, otherSid, "their step", false)
	missing := newUUID()
	asked := restStep(t, e, key, sid, "asked", false)
	restOK(t, e, "PATCH", "/api/v1/messages/"+asked+"/request-input", key, nil)

	agent := func(fields string) string {
		return `{"agent_instance_id":"` + sid + `"` + fields + `}`
	}
	user := func(fields string) string {
		return `{"agent_instance_id":"` + sid + `"` + fields + `}`
	}
	const (
		agentPath = "/api/v1/messages/agent"
		userPath  = "/api/v1/messages/user"
		endPath   = "/api/v1/sessions/end"
	)
	cases := []restCase{
		// malformed bodies, on every endpoint that takes one
		{"agent malformed", "POST", agentPath, false, `{"content":`, 400},
		{"agent malformed token", "POST", agentPath, false, `{content: "x"}`, 400},
		{"agent empty body", "POST", agentPath, false, "", 400},
		{"agent blank body", "POST", agentPath, false, " \n\t ", 400},
		{"agent array body", "POST", agentPath, false, `[{"content":"x"}]`, 400},
		{"agent string body", "POST", agentPath, false, `"x"`, 400},
		{"agent null body", "POST", agentPath, false, `null`, 400},
		{"agent two values", "POST", agentPath, false, agent(`,"content":"x"`) + `{}`, 400},
		{"agent stray brace", "POST", agentPath, false, agent(`,"content":"x"`) + `}`, 400},
		{"user malformed", "POST", userPath, false, `{"agent_instance_id":`, 400},
		{"user empty body", "POST", userPath, false, "", 400},
		{"user array body", "POST", userPath, false, `[]`, 400},
		{"end malformed", "POST", endPath, false, `{`, 400},
		{"end empty body", "POST", endPath, false, "", 400},
		{"end array body", "POST", endPath, false, `["` + sid + `"]`, 400},
		// wrong types
		{"content number", "POST", agentPath, false, agent(`,"content":5`), 400},
		{"content object", "POST", agentPath, false, agent(`,"content":{}`), 400},
		{"requires_user_input string", "POST", agentPath, false, agent(`,"content":"x","requires_user_input":"yes"`), 400},
		{"requires_user_input number", "POST", agentPath, false, agent(`,"content":"x","requires_user_input":1`), 400},
		{"agent_type number", "POST", agentPath, false, agent(`,"content":"x","agent_type":7`), 400},
		{"git_diff bool", "POST", agentPath, false, agent(`,"content":"x","git_diff":true`), 400},
		{"send_email string", "POST", agentPath, false, agent(`,"content":"x","send_email":"no"`), 400},
		{"agent_instance_id number", "POST", agentPath, false, `{"agent_instance_id":123,"content":"x"}`, 400},
		{"user content number", "POST", userPath, false, user(`,"content":5`), 400},
		{"mark_as_read string", "POST", userPath, false, user(`,"content":"x","mark_as_read":"no"`), 400},
		{"end id array", "POST", endPath, false, `{"agent_instance_id":["` + sid + `"]}`, 400},
		// missing or empty fields
		{"agent no content", "POST", agentPath, false, agent(``), 400},
		{"agent empty content", "POST", agentPath, false, agent(`,"content":""`), 400},
		{"agent blank content", "POST", agentPath, false, agent(`,"content":"  \n"`), 400},
		{"agent NUL-only content", "POST", agentPath, false, agent(`,"content":"\u0000\u0000"`), 400},
		{"agent new session without agent_type", "POST", agentPath, false, `{"agent_instance_id":"` + missing + `","content":"x"}`, 400},
		{"agent no id and no agent_type", "POST", agentPath, false, `{"content":"x"}`, 400},
		{"agent_type too long", "POST", agentPath, false, `{"agent_instance_id":"` + missing + `","content":"x","agent_type":"` + strings.Repeat("a", 256) + `"}`, 400},
		{"user no id", "POST", userPath, false, `{"content":"x"}`, 400},
		{"user no content", "POST", userPath, false, user(``), 400},
		{"user empty content", "POST", userPath, false, user(`,"content":""`), 400},
		{"end no id", "POST", endPath, false, `{}`, 400},
		{"end empty id", "POST", endPath, false, `{"agent_instance_id":""}`, 400},
		{"pending no id", "GET", "/api/v1/messages/pending", false, nil, 400},
		// bad UUIDs: body, query, path
		{"agent bad uuid", "POST", agentPath, false, `{"agent_instance_id":"not-a-uuid","agent_type":"x","content":"x"}`, 400},
		{"agent short uuid", "POST", agentPath, false, `{"agent_instance_id":"` + sid[:35] + `","agent_type":"x","content":"x"}`, 400},
		{"agent uuid with a g", "POST", agentPath, false, `{"agent_instance_id":"g` + sid[1:] + `","agent_type":"x","content":"x"}`, 400},
		{"user bad uuid", "POST", userPath, false, `{"agent_instance_id":"1234","content":"x"}`, 400},
		{"end bad uuid", "POST", endPath, false, `{"agent_instance_id":"` + sid + `x"}`, 400},
		{"pending bad uuid", "GET", "/api/v1/messages/pending?agent_instance_id=nope", false, nil, 400},
		{"pending bad last_read", "GET", "/api/v1/messages/pending?agent_instance_id=" + sid + "&last_read_message_id=nope", false, nil, 400},
		{"request-input bad uuid", "PATCH", "/api/v1/messages/nope/request-input", false, nil, 400},
		// wait out of range / not a number
		{"wait negative", "GET", restPendingPath(sid, "", 0) + "&wait=-1", false, nil, 400},
		{"wait over 60", "GET", restPendingPath(sid, "", 0) + "&wait=61", false, nil, 400},
		{"wait word", "GET", restPendingPath(sid, "", 0) + "&wait=abc", false, nil, 400},
		{"wait fraction", "GET", restPendingPath(sid, "", 0) + "&wait=1.5", false, nil, 400},
		{"wait huge", "GET", restPendingPath(sid, "", 0) + "&wait=99999999999999999999", false, nil, 400},
		// not found: missing, or someone else's (same answer)
		{"user missing session", "POST", userPath, false, `{"agent_instance_id":"` + missing + `","content":"x"}`, 404},
		{"user other's session", "POST", userPath, false, `{"agent_instance_id":"` + otherSid + `","content":"x"}`, 404},
		{"agent other's session", "POST", agentPath, false, `{"agent_instance_id":"` + otherSid + `","agent_type":"x","content":"x"}`, 404},
		{"pending missing session", "GET", restPendingPath(missing, "", 0), false, nil, 404},
		{"pending other's session", "GET", restPendingPath(otherSid, "", 0), false, nil, 404},
		{"pending wait missing session", "GET", restPendingPath(missing, "", 5), false, nil, 404},
		{"request-input missing message", "PATCH", "/api/v1/messages/" + missing + "/request-input", false, nil, 404},
		{"request-input other's message", "PATCH", "/api/v1/messages/" + otherStep + "/request-input", false, nil, 404},
		{"request-input user message", "PATCH", "/api/v1/messages/" + userMsg + "/request-input", false, nil, 404},
		{"end missing session", "POST", endPath, false, `{"agent_instance_id":"` + missing + `"}`, 404},
		{"end other's session", "POST", endPath, false, `{"agent_instance_id":"` + otherSid + `"}`, 404},
		// conflict
		{"request-input twice", "PATCH", "/api/v1/messages/" + asked + "/request-input", false, nil, 409},
		// no key
		{"agent no key", "POST", agentPath, true, agent(`,"content":"x"`), 401},
		{"user no key", "POST", userPath, true, user(`,"content":"x"`), 401},
		{"pending no key", "GET", restPendingPath(sid, "", 0), true, nil, 401},
		{"request-input no key", "PATCH", "/api/v1/messages/" + step + "/request-input", true, nil, 401},
		{"end no key", "POST", endPath, true, `{"agent_instance_id":"` + sid + `"}`, 401},
		// wrong methods and paths
		{"GET agent", "GET", agentPath, false, nil, 404},
		{"PUT user", "PUT", userPath, false, `{}`, 404},
		{"POST pending", "POST", "/api/v1/messages/pending", false, `{}`, 404},
		{"GET request-input", "GET", "/api/v1/messages/" + step + "/request-input", false, nil, 404},
		{"DELETE end", "DELETE", endPath, false, nil, 404},
		{"unknown path", "GET", "/api/v1/nope", false, nil, 404},
		{"old steps path", "POST", "/api/v1/steps", false, `{}`, 404},
		{"v2", "POST", "/api/v2/messages/agent", false, `{}`, 404},
	}
	for _, c := range cases {
		k := key
		if c.noKey {
			k = ""
		}
		code, b := e.call(t, c.method, c.path, k, c.body)
		// A wrong method may also be a 405; everything else is exact.
		if code != c.want && !(c.want == 404 && code == 405) {
			t.Errorf("%s: %s %s = %d %s, want %d", c.name, c.method, c.path, code, b, c.want)
			continue
		}
		restDetail(t, c.name, b)
	}

	// The 404s for a missing session or message and for someone else's are
	// the same bytes: nothing tells them apart.
	for _, pair := range [][2]restCase{
		{cases[slices.IndexFunc(cases, func(c restCase) bool { return c.name == "user missing session" })], cases[slices.IndexFunc(cases, func(c restCase) bool { return c.name == "user other's session" })]},
		{cases[slices.IndexFunc(cases, func(c restCase) bool { return c.name == "pending missing session" })], cases[slices.IndexFunc(cases, func(c restCase) bool { return c.name == "pending other's session" })]},
		{cases[slices.IndexFunc(cases, func(c restCase) bool { return c.name == "request-input missing message" })], cases[slices.IndexFunc(cases, func(c restCase) bool { return c.name == "request-input other's message" })]},
		{cases[slices.IndexFunc(cases, func(c restCase) bool { return c.name == "end missing session" })], cases[slices.IndexFunc(cases, func(c restCase) bool { return c.name == "end other's session" })]},
	} {
		_, b1 := e.call(t, pair[0].method, pair[0].path, key, pair[0].body)
		_, b2 := e.call(t, pair[1].method, pair[1].path, key, pair[1].body)
		if !bytes.Equal(b1, b2) {
			t.Errorf("%s answers %s but %s answers %s", pair[0].name, b1, pair[1].name, b2)
		}
	}

	// 401 says how to authenticate, for a missing and for a bad key.
	for _, k := range []string{"", "not.a.jwt", other + "x"} {
		resp, b := restRaw(t, e, "POST", agentPath, k, strings.NewReader(agent(`,"content":"x"`)), false)
		if resp.StatusCode != 401 || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer") {
			t.Errorf("key %q: %d, WWW-Authenticate %q", k, resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}
		restDetail(t, "401", b)
	}

	// Nothing above changed the other user's session, and nothing answered 500.
	if st := restStatus(t, e, otherSid); st != statusActive {
		t.Errorf("other's session status %s", st)
	}
	if strings.Contains(e.logs.String(), "request failed") {
		t.Errorf("a request failed as a server error:\n%s", e.logs.String())
	}
}

// TestRESTBodyTooLarge: a body over 10 MiB is a 413, whether it declares
// its length or arrives chunked, and the server stays healthy.
func TestRESTBodyTooLarge(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "big@example.com", scopeAgent)
	sid := newUUID()
	restStep(t, e, key, sid, "small", false)
	big := func(n int) []byte {
		return []byte(`{"agent_instance_id":"` + sid + `","content":"` + strings.Repeat("x", n) + `"}`)
	}
	for _, chunked := range []bool{false, true} {
		for _, path := range []string{"/api/v1/messages/agent", "/api/v1/messages/user", "/api/v1/sessions/end"} {
			resp, b := restRaw(t, e, "POST", path, key, bytes.NewReader(big(maxBody)), chunked)
			if resp.StatusCode != http.StatusRequestEntityTooLarge {
				t.Fatalf("%s chunked=%v: %d %.200s", path, chunked, resp.StatusCode, b)
			}
			restDetail(t, "413", b)
		}
	}
	// Just under the limit is fine.
	n := maxBody - len(big(0))
	resp, b := restRaw(t, e, "POST", "/api/v1/messages/agent", key, bytes.NewReader(big(n)), true)
	if resp.StatusCode != 200 {
		t.Fatalf("a body of exactly the limit: %d %.200s", resp.StatusCode, b)
	}
	restStep(t, e, key, sid, "still fine", false)
}

// ---- hostile input: always 200 or a 4xx, never a 500 ----

func TestRESTHostileInput(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "hostile@example.com", scopeAgent)
	sid := newUUID()
	restStep(t, e, key, sid, "first", false)
	deep := strings.Repeat("[", 100000) + strings.Repeat("]", 100000)
	deepObj := strings.Repeat(`{"a":`, 20000) + "1" + strings.Repeat("}", 20000)
	withID := func(fields string) string { return `{"agent_instance_id":"` + sid + `"` + fields + `}` }
	type hostile struct {
		name, method, path, body string
		stored                   string // when 200 on a message: the content stored
	}
	cases := []hostile{
		{"NUL bytes in content", "POST", "/api/v1/messages/agent", withID(`,"content":"a\u0000b\u0000"`), "ab"},
		{"NUL bytes in user content", "POST", "/api/v1/messages/user", withID(`,"content":"\u0000x"`), "x"},
		{"invalid UTF-8 in content", "POST", "/api/v1/messages/agent", withID(`,"content":"ok` + "\xff\xfe\xc3" + `"`), "ok\uFFFD\uFFFD\uFFFD"},
		{"invalid UTF-8 outside strings", "POST", "/api/v1/messages/agent", withID(`,"content":"x"` + "\xff"), ""},
		{"unicode escapes", "POST", "/api/v1/messages/agent", withID(`,"content":"\u00e9\ud83d\ude00\u2028"`), "é😀\u2028"},
		{"lone surrogate", "POST", "/api/v1/messages/agent", withID(`,"content":"a\ud800b"`), "a\uFFFDb"},
		{"escaped quotes and HTML", "POST", "/api/v1/messages/agent", withID(`,"content":"<img src=x onerror=alert(1)>\"'"`), `<img src=x onerror=alert(1)>"'`},
		{"huge number as content", "POST", "/api/v1/messages/agent", withID(`,"content":1e999999`), ""},
		{"huge number as bool", "POST", "/api/v1/messages/agent", withID(`,"content":"x","requires_user_input":123456789012345678901234567890`), ""},
		{"huge number in unknown field", "POST", "/api/v1/messages/agent", withID(`,"content":"big","x":1e999999`), "big"},
		{"huge negative in unknown field", "POST", "/api/v1/messages/agent", withID(`,"content":"neg","x":-1e-999999`), "neg"},
		{"deeply nested unknown field", "POST", "/api/v1/messages/agent", withID(`,"content":"x","x":` + deep), ""},
		{"deeply nested objects", "POST", "/api/v1/messages/agent", withID(`,"content":"x","x":` + deepObj), ""},
		{"deeply nested content", "POST", "/api/v1/messages/agent", withID(`,"content":` + deep), ""},
		{"deeply nested body", "POST", "/api/v1/messages/agent", deep, ""},
		{"null agent_instance_id, new session", "POST", "/api/v1/messages/agent", `{"agent_instance_id":null,"agent_type":"script","content":"made"}`, "made"},
		{"null agent_instance_id, no type", "POST", "/api/v1/messages/agent", `{"agent_instance_id":null,"content":"x"}`, ""},
		{"null agent_instance_id, user", "POST", "/api/v1/messages/user", `{"agent_instance_id":null,"content":"x"}`, ""},
		{"null agent_instance_id, end", "POST", "/api/v1/sessions/end", `{"agent_instance_id":null}`, ""},
		{"null content", "POST", "/api/v1/messages/agent", withID(`,"content":null`), ""},
		{"null everything", "POST", "/api/v1/messages/agent", `{"agent_instance_id":null,"agent_type":null,"content":null,"requires_user_input":null,"git_diff":null,"send_email":null}`, ""},
		{"unknown fields ignored", "POST", "/api/v1/messages/agent", withID(`,"content":"extra","message_metadata":{"a":[1,2]},"step_description":"s"`), "extra"},
		{"duplicate keys", "POST", "/api/v1/messages/agent", withID(`,"content":"one","content":"two"`), "two"},
		{"NUL-only agent_type", "POST", "/api/v1/messages/agent", `{"agent_instance_id":"` + newUUID() + `","agent_type":"\u0000","content":"x"}`, ""},
		{"agent_type of 255 multibyte runes", "POST", "/api/v1/messages/agent", `{"agent_instance_id":"` + newUUID() + `","agent_type":"` + strings.Repeat("é", 255) + `","content":"x"}`, ""},
		{"garbage git_diff", "POST", "/api/v1/messages/agent", withID(`,"content":"diffy","git_diff":"\u0000\u0001 not a diff"`), "diffy"},
		{"base64 garbage git_diff", "POST", "/api/v1/messages/agent", withID(`,"content":"diffb","git_diff":"` + base64.StdEncoding.EncodeToString([]byte{0xff, 0, 1, 2}) + `"`), "diffb"},
		{"uuid in braces", "POST", "/api/v1/messages/agent", `{"agent_instance_id":"{` + sid + `}","content":"x"}`, ""},
		{"uuid with NUL", "POST", "/api/v1/messages/agent", `{"agent_instance_id":"` + sid[:35] + `\u0000","content":"x"}`, ""},
		{"very long id", "POST", "/api/v1/messages/user", `{"agent_instance_id":"` + strings.Repeat("a", 100000) + `","content":"x"}`, ""},
		{"NUL in query", "GET", "/api/v1/messages/pending?agent_instance_id=" + url.QueryEscape(sid[:35]+"\x00"), "", ""},
		{"NUL in last_read", "GET", "/api/v1/messages/pending?agent_instance_id=" + sid + "&last_read_message_id=%00", "", ""},
		{"NUL in wait", "GET", "/api/v1/messages/pending?agent_instance_id=" + sid + "&wait=%00", "", ""},
		{"bad escape in query", "GET", "/api/v1/messages/pending?agent_instance_id=%zz", "", ""},
		{"NUL in path", "PATCH", "/api/v1/messages/%00/request-input", "", ""},
		{"long path id", "PATCH", "/api/v1/messages/" + strings.Repeat("f", 5000) + "/request-input", "", ""},
	}
	for _, c := range cases {
		var body any
		if c.body != "" {
			body = c.body
		}
		code, b := e.call(t, c.method, c.path, key, body)
		switch {
		case code == 200:
			if c.stored != "" {
				var id string
				if m := mustJSON(t, b); true {
					id, _ = m["message_id"].(string)
				}
				var got string
				if err := e.db.QueryRow(`SELECT content FROM messages WHERE id = $1`, id).Scan(&got); err != nil {
					t.Errorf("%s: stored message: %v", c.name, err)
				} else if got != c.stored {
					t.Errorf("%s: stored %q, want %q", c.name, got, c.stored)
				}
			}
		case code >= 400 && code < 500:
			restDetail(t, c.name, b)
			if c.stored != "" {
				t.Errorf("%s: %d %s, want 200", c.name, code, b)
			}
		default:
			t.Errorf("%s: %d %.300s", c.name, code, b)
		}
	}
	if strings.Contains(e.logs.String(), "request failed") {
		t.Errorf("a request failed as a server error:\n%.2000s", e.logs.String())
	}
	// The git_diff garbage was ignored with a warning, not stored.
	if !strings.Contains(e.logs.String(), "git_diff ignored") {
		t.Errorf("no warning for an invalid git_diff")
	}
	var diff sql.NullString
	e.db.QueryRow(`SELECT git_diff FROM agent_instances WHERE id = $1`, sid).Scan(&diff)
	if diff.Valid {
		t.Errorf("garbage git_diff stored: %q", diff.String)
	}
}

// ---- tenant isolation ----

// TestRESTTenantIsolation: two users cannot see or touch each other's
// sessions through any endpoint.
func TestRESTTenantIsolation(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	keyA := e.mustKey(t, "alice@example.com", scopeAgent)
	keyB := e.mustKey(t, "bob@example.com", scopePerson) // even a person key
	sa, sb := newUUID(), newUUID()
	stepA := restStep(t, e, keyA, sa, "alice's step", false)
	restUserMsg(t, e, keyA, sa, "alice's feedback", false)
	stepB := restStep(t, e, keyB, sb, "bob's step", false)
	restUserMsg(t, e, keyB, sb, "bob's feedback", false)

	type snapshot struct {
		status   string
		pointer  sql.NullString
		ended    sql.NullTime
		messages int
	}
	snap := func(sid string) snapshot {
		var s snapshot
		if err := e.db.QueryRow(`SELECT status, last_read_message_id, ended_at, (SELECT count(*) FROM messages WHERE agent_instance_id = $1)
			FROM agent_instances WHERE id = $1`, sid).Scan(&s.status, &s.pointer, &s.ended, &s.messages); err != nil {
			t.Fatal(err)
		}
		return s
	}
	before := map[string]snapshot{sa: snap(sa), sb: snap(sb)}

	for _, dir := range []struct {
		key, theirSession, theirStep, ownSession string
	}{{keyB, sa, stepA, sb}, {keyA, sb, stepB, sa}} {
		fresh := newUUID()
		probes := []struct {
			name, method, path string
			body               any
		}{
			{"agent message", "POST", "/api/v1/messages/agent", map[string]any{"agent_instance_id": dir.theirSession, "agent_type": "x", "content": "intrude"}},
			{"question", "POST", "/api/v1/messages/agent", map[string]any{"agent_instance_id": dir.theirSession, "agent_type": "x", "content": "intrude?", "requires_user_input": true}},
			{"user message", "POST", "/api/v1/messages/user", map[string]any{"agent_instance_id": dir.theirSession, "content": "intrude"}},
			{"user message unread", "POST", "/api/v1/messages/user", map[string]any{"agent_instance_id": dir.theirSession, "content": "intrude", "mark_as_read": false}},
			{"pending", "GET", restPendingPath(dir.theirSession, "", 0), nil},
			{"pending with pointer", "GET", restPendingPath(dir.theirSession, dir.theirStep, 0), nil},
			{"pending wait", "GET", restPendingPath(dir.theirSession, "", 2), nil},
			{"request-input", "PATCH", "/api/v1/messages/" + dir.theirStep + "/request-input", nil},
			{"end", "POST", "/api/v1/sessions/end", map[string]any{"agent_instance_id": dir.theirSession}},
		}
		for _, p := range probes {
			start := time.Now()
			code, b := e.call(t, p.method, p.path, dir.key, p.body)
			if code != 404 {
				t.Errorf("%s on the other's session: %d %s, want 404", p.name, code, b)
				continue
			}
			if time.Since(start) > 1500*time.Millisecond {
				t.Errorf("%s on the other's session waited instead of answering 404", p.name)
			}
			if d := restDetail(t, p.name, b); strings.Contains(d, dir.theirSession) || strings.Contains(strings.ToLower(d), "another user") {
				t.Errorf("%s: detail %q says too much", p.name, d)
			}
		}
		// Without an agent type, naming their session answers exactly as
		// naming a fresh id does.
		_, b1 := e.call(t, "POST", "/api/v1/messages/agent", dir.key, map[string]any{"agent_instance_id": dir.theirSession, "content": "x"})
		_, b2 := e.call(t, "POST", "/api/v1/messages/agent", dir.key, map[string]any{"agent_instance_id": fresh, "content": "x"})
		if !bytes.Equal(b1, b2) {
			t.Errorf("their session without agent_type answers %s, a fresh id %s", b1, b2)
		}
		// Their own session still works and shows only their messages.
		m := restOK(t, e, "POST", "/api/v1/messages/agent", dir.key, map[string]any{"agent_instance_id": dir.ownSession, "content": "own"})
		for _, q := range restMessages(t, "queued", m["queued_user_messages"]) {
			if !strings.Contains(q["content"].(string), map[string]string{keyA: "alice", keyB: "bob"}[dir.key]) {
				t.Errorf("queued a message that is not theirs: %v", q)
			}
		}
	}
	// Each session is exactly as its owner left it, apart from the owner's
	// own last step.
	for sid, b := range before {
		a := snap(sid)
		if a.status != b.status || a.ended.Valid || a.messages != b.messages+1 {
			t.Errorf("session %s changed: before %+v after %+v", sid, b, a)
		}
	}
	var strays int
	e.db.QueryRow(`SELECT count(*) FROM messages WHERE content LIKE 'intrude%'`).Scan(&strays)
	if strays != 0 {
		t.Errorf("%d intruding messages stored", strays)
	}
}

// ---- the Omnara SDK, as omnara/sdk/client.py does it ----

// restSDK does what OmnaraClient does, request for request: same headers,
// same paths and fields, Message(**msg) strictness, the same polling.
type restSDK struct {
	base, key string
	poll      time.Duration
}

var errRESTSDKStale = errors.New("TimeoutError: Another process has read the messages")

// restSDKError is the SDK's APIError.
type restSDKError struct {
	code   int
	detail string
}

func (e *restSDKError) Error() string { return fmt.Sprintf("APIError %d: %s", e.code, e.detail) }

// restSDKMessage is the SDK's Message dataclass.
type restSDKMessage struct {
	ID                string `json:"id"`
	Content           string `json:"content"`
	SenderType        string `json:"sender_type"`
	CreatedAt         string `json:"created_at"`
	RequiresUserInput bool   `json:"requires_user_input"`
}

// newRESTMessage is Message(**msg): an unknown key or a missing one is a
// TypeError.
func newRESTMessage(raw json.RawMessage) (restSDKMessage, error) {
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(raw, &keys); err != nil {
		return restSDKMessage{}, err
	}
	for _, k := range []string{"id", "content", "sender_type", "created_at", "requires_user_input"} {
		if _, ok := keys[k]; !ok {
			return restSDKMessage{}, fmt.Errorf("TypeError: Message() missing argument %q", k)
		}
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	var m restSDKMessage
	if err := dec.Decode(&m); err != nil {
		return restSDKMessage{}, fmt.Errorf("TypeError: Message(): %w", err)
	}
	return m, nil
}

func (c *restSDK) request(method, path string, body any, params url.Values) (map[string]json.RawMessage, error) {
	var r io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		r = bytes.NewReader(b)
	}
	u := c.base + path
	if params != nil {
		u += "?" + params.Encode()
	}
	req, err := http.NewRequest(method, u, r)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+c.key)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "omnara-python-sdk")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode == 401 {
		return nil, errors.New("AuthenticationError")
	}
	if resp.StatusCode >= 400 {
		var d struct{ Detail string }
		json.Unmarshal(b, &d)
		return nil, &restSDKError{resp.StatusCode, d.Detail}
	}
	var out map[string]json.RawMessage
	return out, json.Unmarshal(b, &out)
}

func restStr(raw json.RawMessage) string {
	var s string
	json.Unmarshal(raw, &s)
	return s
}

// contents reads msg["content"] of each message, as the SDK does for
// queued_user_messages and request-input's messages.
func restContents(raw json.RawMessage) ([]string, error) {
	var list []map[string]any
	if err := json.Unmarshal(raw, &list); err != nil {
		return nil, err
	}
	out := []string{}
	for _, m := range list {
		out = append(out, m["content"].(string))
	}
	return out, nil
}

// sendMessage is OmnaraClient.send_message; gitDiff is sent base64-encoded,
// as the SDK's build_message_request_data does.
func (c *restSDK) sendMessage(content, agentType, session string, asks bool, gitDiff *string) (sid, messageID string, queued []string, err error) {
	if session == "" {
		if agentType == "" {
			return "", "", nil, errors.New("ValueError: agent_type is required when creating a new instance")
		}
		session = newUUID()
	}
	data := map[string]any{"content": content, "requires_user_input": asks, "agent_instance_id": session}
	if agentType != "" {
		data["agent_type"] = agentType
	}
	if gitDiff != nil {
		data["git_diff"] = base64.StdEncoding.EncodeToString([]byte(*gitDiff))
	}
	resp, err := c.request("POST", "/api/v1/messages/agent", data, nil)
	if err != nil {
		return "", "", nil, err
	}
	sid, messageID = restStr(resp["agent_instance_id"]), restStr(resp["message_id"])
	if string(resp["success"]) != "true" {
		return "", "", nil, fmt.Errorf("success = %s", resp["success"])
	}
	if queued, err = restContents(resp["queued_user_messages"]); err != nil || !asks {
		return sid, messageID, queued, err
	}
	got, err := c.pollPending(session, messageID)
	return sid, messageID, got, err
}

// pollPending is the SDK's wait for an answer: poll until messages come,
// failing on "stale".
func (c *restSDK) pollPending(session, lastRead string) ([]string, error) {
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		msgs, status, err := c.getPending(session, lastRead)
		if err != nil {
			return nil, err
		}
		if status == "stale" {
			return nil, errRESTSDKStale
		}
		if len(msgs) > 0 {
			var out []string
			for _, m := range msgs {
				out = append(out, m.Content)
			}
			return out, nil
		}
		time.Sleep(c.poll)
	}
	return nil, errors.New("TimeoutError")
}

// getPending is OmnaraClient.get_pending_messages.
func (c *restSDK) getPending(session, lastRead string) ([]restSDKMessage, string, error) {
	params := url.Values{"agent_instance_id": {session}}
	if lastRead != "" {
		params.Set("last_read_message_id", lastRead)
	}
	resp, err := c.request("GET", "/api/v1/messages/pending", nil, params)
	if err != nil {
		return nil, "", err
	}
	var raws []json.RawMessage
	if err := json.Unmarshal(resp["messages"], &raws); err != nil {
		return nil, "", err
	}
	var msgs []restSDKMessage
	for _, r := range raws {
		m, err := newRESTMessage(r)
		if err != nil {
			return nil, "", err
		}
		msgs = append(msgs, m)
	}
	if restStr(resp["agent_instance_id"]) == "" {
		return nil, "", errors.New("KeyError: agent_instance_id")
	}
	return msgs, restStr(resp["status"]), nil
}

// sendUserMessage is OmnaraClient.send_user_message; markAsRead nil leaves
// the field out (the server's default, true).
func (c *restSDK) sendUserMessage(session, content string, markAsRead *bool) (string, error) {
	data := map[string]any{"agent_instance_id": session, "content": content}
	if markAsRead != nil {
		data["mark_as_read"] = *markAsRead
	}
	resp, err := c.request("POST", "/api/v1/messages/user", data, nil)
	if err != nil {
		return "", err
	}
	return restStr(resp["message_id"]), nil
}

// requestUserInput is OmnaraClient.request_user_input: a PATCH with no body.
func (c *restSDK) requestUserInput(messageID string) ([]string, error) {
	resp, err := c.request("PATCH", "/api/v1/messages/"+messageID+"/request-input", nil, nil)
	if err != nil {
		return nil, err
	}
	session := restStr(resp["agent_instance_id"])
	msgs, err := restContents(resp["messages"])
	if err != nil || len(msgs) > 0 {
		return msgs, err
	}
	return c.pollPending(session, messageID)
}

// endSession is OmnaraClient.end_session.
func (c *restSDK) endSession(session string) (string, error) {
	resp, err := c.request("POST", "/api/v1/sessions/end", map[string]any{"agent_instance_id": session}, nil)
	if err != nil {
		return "", err
	}
	if restStr(resp["agent_instance_id"]) != session {
		return "", errors.New("wrong agent_instance_id")
	}
	return restStr(resp["final_status"]), nil
}

// restAwait runs f in a goroutine; the returned function waits for it.
func restAwait[T any](f func() (T, error)) func(testing.TB) (T, error) {
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		v, err := f()
		ch <- result{v, err}
	}()
	return func(t testing.TB) (T, error) {
		t.Helper()
		select {
		case r := <-ch:
			return r.v, r.err
		case <-time.After(30 * time.Second):
			t.Fatal("the SDK call never returned")
			panic("unreachable")
		}
	}
}

// restAwaitStatus waits until the session has the status.
func restAwaitStatus(t testing.TB, e *testEnv, sid, status string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for restStatus(t, e, sid) != status {
		if time.Now().After(deadline) {
			t.Fatalf("session never reached %s (is %s)", status, restStatus(t, e, sid))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestRESTSDKFlows(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	sdk := &restSDK{base: e.srv.URL, key: e.mustKey(t, "sdk@example.com", scopeAgent), poll: 20 * time.Millisecond}
	person := &restSDK{base: e.srv.URL, key: e.mustKey(t, "sdk@example.com", scopePerson)}
	no := false

	// A step on a new session (client-made id), then queued feedback picked
	// up by the next step.
	sid, _, queued, err := sdk.sendMessage("Reading the code", "Claude Code", "", false, nil)
	if err != nil || len(queued) != 0 {
		t.Fatalf("first step: %v %v", err, queued)
	}
	if _, err := person.sendUserMessage(sid, "also check the tests", &no); err != nil {
		t.Fatal(err)
	}
	if _, err := person.sendUserMessage(sid, "and the docs", &no); err != nil {
		t.Fatal(err)
	}
	_, _, queued, err = sdk.sendMessage("Fixing the bug", "", sid, false, nil)
	if err != nil || !slices.Equal(queued, []string{"also check the tests", "and the docs"}) {
		t.Fatalf("second step: %v %v", err, queued)
	}
	// Delivered once: the next step gets nothing.
	if _, _, queued, err = sdk.sendMessage("Still fixing", "", sid, false, nil); err != nil || len(queued) != 0 {
		t.Fatalf("third step: %v %v", err, queued)
	}

	// A question answered through polling pending with last_read_message_id.
	ask := restAwait(func() ([]string, error) {
		_, _, got, err := sdk.sendMessage("Use PostgreSQL 16?", "", sid, true, nil)
		return got, err
	})
	restAwaitStatus(t, e, sid, statusAwaitingInput)
	time.Sleep(3 * sdk.poll) // let it poll a few times with nothing
	if _, err := person.sendUserMessage(sid, "yes, 16", &no); err != nil {
		t.Fatal(err)
	}
	if got, err := ask(t); err != nil || !slices.Equal(got, []string{"yes, 16"}) {
		t.Fatalf("question: %v %v", err, got)
	}
	if st := restStatus(t, e, sid); st != statusActive {
		t.Fatalf("status after the answer: %s", st)
	}
	// The answer is not handed out again as feedback.
	if _, _, queued, err = sdk.sendMessage("Upgrading", "", sid, false, nil); err != nil || len(queued) != 0 {
		t.Fatalf("after the answer: %v %v", err, queued)
	}

	// request_user_input on an earlier step, then answered.
	_, step, _, err := sdk.sendMessage("Wrote the migration", "", sid, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	req := restAwait(func() ([]string, error) { return sdk.requestUserInput(step) })
	restAwaitStatus(t, e, sid, statusAwaitingInput)
	if _, err := person.sendUserMessage(sid, "looks good", &no); err != nil {
		t.Fatal(err)
	}
	if got, err := req(t); err != nil || !slices.Equal(got, []string{"looks good"}) {
		t.Fatalf("request_user_input: %v %v", err, got)
	}
	// request_user_input with feedback already queued returns it at once.
	_, step, _, _ = sdk.sendMessage("Ran the tests", "", sid, false, nil)
	person.sendUserMessage(sid, "queued before", &no)
	if got, err := sdk.requestUserInput(step); err != nil || !slices.Equal(got, []string{"queued before"}) {
		t.Fatalf("request_user_input with queued feedback: %v %v", err, got)
	}
	// Twice on the same message: the SDK gets an APIError (409).
	var apiErr *restSDKError
	if _, err := sdk.requestUserInput(step); !errors.As(err, &apiErr) || apiErr.code != 409 {
		t.Fatalf("request_user_input twice: %v", err)
	}
	// On a step that is no longer the latest: stale, as in Omnara.
	_, older, _, _ := sdk.sendMessage("Step A", "", sid, false, nil)
	sdk.sendMessage("Step B", "", sid, false, nil)
	if _, err := sdk.requestUserInput(older); !errors.Is(err, errRESTSDKStale) {
		t.Fatalf("request_user_input on an older step: %v, want stale", err)
	}
	person.sendUserMessage(sid, "unblock", &no)
	sdk.sendMessage("Moving on", "", sid, false, nil)

	// mark_as_read left at its default (true): the person's answer is
	// marked read, so the SDK's poll sees "stale", exactly as with Omnara.
	staleAsk := restAwait(func() ([]string, error) {
		_, _, got, err := sdk.sendMessage("Deploy now?", "", sid, true, nil)
		return got, err
	})
	restAwaitStatus(t, e, sid, statusAwaitingInput)
	if _, err := person.sendUserMessage(sid, "yes", nil); err != nil {
		t.Fatal(err)
	}
	if got, err := staleAsk(t); !errors.Is(err, errRESTSDKStale) {
		t.Fatalf("question answered with mark_as_read default: %v %v, want stale", got, err)
	}

	// git_diff, base64-encoded by the SDK, is stored decoded.
	diff := "diff --git a/x.go b/x.go\n--- a/x.go\n+++ b/x.go\n@@ -1 +1 @@\n-old\n+new\n"
	if _, _, _, err := sdk.sendMessage("Changed x.go", "", sid, false, &diff); err != nil {
		t.Fatal(err)
	}
	var stored sql.NullString
	e.db.QueryRow(`SELECT git_diff FROM agent_instances WHERE id = $1`, sid).Scan(&stored)
	if stored.String != strings.TrimSpace(diff) {
		t.Fatalf("git_diff stored as %q", stored.String)
	}
	// A plain (not encoded) diff works too.
	plain := strings.ReplaceAll(diff, "new", "newer")
	restOK(t, e, "POST", "/api/v1/messages/agent", sdk.key, map[string]any{"agent_instance_id": sid, "content": "plain", "git_diff": plain})
	e.db.QueryRow(`SELECT git_diff FROM agent_instances WHERE id = $1`, sid).Scan(&stored)
	if stored.String != strings.TrimSpace(plain) {
		t.Fatalf("plain git_diff stored as %q", stored.String)
	}

	// end_session, then a message to the ended session is still accepted
	// and the status stays COMPLETED.
	if st, err := sdk.endSession(sid); err != nil || st != "COMPLETED" {
		t.Fatalf("end_session: %q %v", st, err)
	}
	if _, _, _, err := sdk.sendMessage("one more thing", "", sid, false, nil); err != nil {
		t.Fatal(err)
	}
	if st := restStatus(t, e, sid); st != statusCompleted {
		t.Fatalf("status after a message to an ended session: %s", st)
	}
	if _, err := (&restSDK{base: e.srv.URL, key: "bad"}).endSession(sid); err == nil || err.Error() != "AuthenticationError" {
		t.Fatalf("a bad key: %v", err)
	}
}

// ---- long-poll ----

// restPendingResult is one long-poll's answer.
type restPendingResult struct {
	code    int
	body    map[string]any
	raw     []byte
	elapsed time.Duration
}

// restLongPoll starts GET pending in a goroutine.
func restLongPoll(t testing.TB, e *testEnv, ctx context.Context, key, path string) <-chan restPendingResult {
	ch := make(chan restPendingResult, 1)
	go func() {
		start := time.Now()
		req, _ := http.NewRequestWithContext(ctx, "GET", e.srv.URL+path, nil)
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			ch <- restPendingResult{code: -1, raw: []byte(err.Error()), elapsed: time.Since(start)}
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		var m map[string]any
		json.Unmarshal(b, &m)
		ch <- restPendingResult{code: resp.StatusCode, body: m, raw: b, elapsed: time.Since(start)}
	}()
	return ch
}

func TestRESTLongPollAnswered(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "poll@example.com", scopeAgent)
	sid := newUUID()
	q := restStep(t, e, key, sid, "question?", true)

	const wait = 5
	res := restLongPoll(t, e, context.Background(), key, restPendingPath(sid, q, wait))
	restWaiters(t, e, 1)
	time.Sleep(200 * time.Millisecond)
	answer := restUserMsg(t, e, key, sid, "the answer", false)
	r := <-res
	if r.code != 200 || r.body["status"] != "ok" {
		t.Fatalf("long-poll: %d %s", r.code, r.raw)
	}
	msgs := restMessages(t, "messages", r.body["messages"])
	if len(msgs) != 1 || msgs[0]["id"] != answer || msgs[0]["content"] != "the answer" {
		t.Fatalf("long-poll messages: %v", msgs)
	}
	// It returned because of the answer, not because the wait ran out.
	if r.elapsed >= wait*time.Second {
		t.Fatalf("long-poll took %v: it ran to its deadline", r.elapsed)
	}
	restWaiters(t, e, 0)
}

func TestRESTLongPollTimesOut(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "timeout@example.com", scopeAgent)
	sid := newUUID()
	q := restStep(t, e, key, sid, "anyone?", true)
	r := <-restLongPoll(t, e, context.Background(), key, restPendingPath(sid, q, 1))
	if r.code != 200 || r.body["status"] != "ok" {
		t.Fatalf("long-poll: %d %s", r.code, r.raw)
	}
	if msgs := restMessages(t, "messages", r.body["messages"]); len(msgs) != 0 {
		t.Fatalf("messages %v", msgs)
	}
	if r.elapsed < 900*time.Millisecond {
		t.Fatalf("wait=1 answered after %v: it did not wait", r.elapsed)
	}
	restWaiters(t, e, 0)
	// A stale pointer answers at once, whatever the wait.
	restStep(t, e, key, sid, "moved on", false)
	r = <-restLongPoll(t, e, context.Background(), key, restPendingPath(sid, q, 30))
	if r.code != 200 || r.body["status"] != "stale" || r.elapsed > 10*time.Second {
		t.Fatalf("stale long-poll: %d %s after %v", r.code, r.raw, r.elapsed)
	}
	// Feedback already queued answers at once too.
	restUserMsg(t, e, key, sid, "queued", false)
	r = <-restLongPoll(t, e, context.Background(), key, restPendingPath(sid, "", 30))
	if msgs := restMessages(t, "messages", r.body["messages"]); r.code != 200 || len(msgs) != 1 || r.elapsed > 10*time.Second {
		t.Fatalf("long-poll with queued feedback: %d %s after %v", r.code, r.raw, r.elapsed)
	}
}

// TestRESTLongPollMany: 200 long-polls on 200 sessions, each released by
// its own answer and only by it.
func TestRESTLongPollMany(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	e.db.SetMaxOpenConns(40) // as openDatabase sets it in production
	key := e.mustKey(t, "many@example.com", scopeAgent)
	const n = 200
	sids := make([]string, n)
	questions := make([]string, n)
	for i := range sids {
		sids[i] = newUUID()
		questions[i] = restStep(t, e, key, sids[i], fmt.Sprintf("question %d?", i), true)
	}
	tr := &http.Transport{MaxIdleConnsPerHost: n}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	results := make([]restPendingResult, n)
	var wg sync.WaitGroup
	for i := range sids {
		wg.Go(func() {
			req, _ := http.NewRequest("GET", e.srv.URL+restPendingPath(sids[i], questions[i], 30), nil)
			req.Header.Set("Authorization", "Bearer "+key)
			start := time.Now()
			resp, err := client.Do(req)
			if err != nil {
				results[i] = restPendingResult{code: -1, raw: []byte(err.Error())}
				return
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			var m map[string]any
			json.Unmarshal(b, &m)
			results[i] = restPendingResult{code: resp.StatusCode, body: m, raw: b, elapsed: time.Since(start)}
		})
	}
	restWaiters(t, e, n)
	// Answer in reverse order, through the store as the inbox would.
	uid := e.mustUserID(t, "many@example.com")
	for i := n - 1; i >= 0; i-- {
		if _, err := e.a.store.addUserMessage(context.Background(), uid, sids[i], fmt.Sprintf("answer %d", i), false); err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
	for i, r := range results {
		if r.code != 200 || r.body["status"] != "ok" {
			t.Fatalf("poll %d: %d %s", i, r.code, r.raw)
		}
		msgs := restMessages(t, "messages", r.body["messages"])
		if len(msgs) != 1 || msgs[0]["content"] != fmt.Sprintf("answer %d", i) {
			t.Fatalf("poll %d got %v", i, msgs)
		}
		if r.elapsed >= 30*time.Second {
			t.Fatalf("poll %d ran to its deadline", i)
		}
	}
	restWaiters(t, e, 0)
}

// TestRESTLongPollClientGone: a long-poll whose client disconnects leaves no
// waiter behind.
func TestRESTLongPollClientGone(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "gone@example.com", scopeAgent)
	sid := newUUID()
	q := restStep(t, e, key, sid, "hello?", true)
	ctx, cancel := context.WithCancel(context.Background())
	res := restLongPoll(t, e, ctx, key, restPendingPath(sid, q, 60))
	restWaiters(t, e, 1)
	cancel()
	if r := <-res; r.code != -1 {
		t.Fatalf("cancelled request answered %d %s", r.code, r.raw)
	}
	restWaiters(t, e, 0)
	// The answer is still delivered to the next poll: nothing was consumed.
	restUserMsg(t, e, key, sid, "late answer", false)
	m := restOK(t, e, "GET", restPendingPath(sid, q, 0), key, nil)
	if msgs := restMessages(t, "messages", m["messages"]); len(msgs) != 1 || msgs[0]["content"] != "late answer" {
		t.Fatalf("after a cancelled poll: %v", m)
	}
}

// TestRESTLongPollShutdown: a long-poll ended by server shutdown answers 503
// with a detail, at once.
func TestRESTLongPollShutdown(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "shutdown@example.com", scopeAgent)
	sid := newUUID()
	q := restStep(t, e, key, sid, "hello?", true)
	res := restLongPoll(t, e, context.Background(), key, restPendingPath(sid, q, 60))
	restWaiters(t, e, 1)
	e.stop() // the app's stopping context: what serve cancels first
	r := <-res
	if r.code != http.StatusServiceUnavailable || r.elapsed > 30*time.Second {
		t.Fatalf("long-poll at shutdown: %d %s after %v", r.code, r.raw, r.elapsed)
	}
	restDetail(t, "shutdown", r.raw)
	restWaiters(t, e, 0)
	// A long-poll started after shutdown began does not wait either.
	r = <-restLongPoll(t, e, context.Background(), key, restPendingPath(sid, q, 60))
	if r.code != http.StatusServiceUnavailable {
		t.Fatalf("long-poll during shutdown: %d %s", r.code, r.raw)
	}
}

// ---- /health and a dead database ----

func TestRESTHealthDatabaseDown(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "health@example.com", scopeAgent)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))

	closed, _ := mustDB(t)
	closed.Close()
	dead, err := sql.Open("postgres", "host=/nonexistent-agentline-socket-dir port=5432 dbname=x sslmode=disable connect_timeout=2")
	if err != nil {
		t.Fatal(err)
	}
	defer dead.Close()
	for name, db := range map[string]*sql.DB{"closed pool": closed, "dead socket": dead} {
		a, stop := newApp(&store{db: db}, e.a.hub, e.a.verifier.keys, e.a.cfg, log)
		defer stop()
		srv := httptest.NewServer(a.routes())
		resp, err := http.Get(srv.URL + "/health")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable {
			t.Errorf("%s: health %d %s", name, resp.StatusCode, b)
		}
		var m map[string]any
		if json.Unmarshal(b, &m) != nil || m["status"] == "healthy" {
			t.Errorf("%s: health body %s", name, b)
		}
		if name == "dead socket" {
			// An API call needs the database for its key: 503, not 500.
			req, _ := http.NewRequest("POST", srv.URL+"/api/v1/messages/agent", strings.NewReader(`{"agent_type":"x","content":"x"}`))
			req.Header.Set("Authorization", "Bearer "+key)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusServiceUnavailable {
				t.Errorf("API call with the database down: %d %s", resp.StatusCode, b)
			}
			restDetail(t, "database down", b)
		}
		srv.Close()
	}
}

// ---- fuzzing the JSON decoding ----

// FuzzRESTDecode: parseJSON and agentMessageInput never panic, fail only
// with a client error, and what they accept is valid JSON that yields a
// canonical session id and storable, non-empty content.
func FuzzRESTDecode(f *testing.F) {
	for _, s := range []string{
		`{"agent_instance_id":"6f1c2a4e-1b7d-4c3e-9a5f-0e2d4b6c8a10","agent_type":"claude code","content":"step","requires_user_input":true}`,
		`{"agent_type":"x","content":"a\u0000b","git_diff":"ZGlmZiAtLWdpdCBhL3ggYi94Ci0tLSBhL3gKKysrIGIveApAQCAtMSArMSBAQAo="}`,
		`{"content":5}`, `{"requires_user_input":"yes"}`, `[]`, `null`, `""`, ``, ` `, `{`, `{}}`, `{} {}`,
		`{"agent_instance_id":null,"content":"x"}`, `{"content":"\ud800"}`, "{\"content\":\"\xff\"}",
		`{"content":1e999999}`, `{"x":[[[[[[[[[[]]]]]]]]]]}`, `{"agent_type":"` + strings.Repeat("a", 300) + `","content":"x"}`,
		`{"agent_instance_id":"6F1C2A4E1B7D4C3E9A5F0E2D4B6C8A10","content":"x","send_email":false,"send_sms":null}`,
	} {
		f.Add([]byte(s))
	}
	a := &app{log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	f.Fuzz(func(t *testing.T, body []byte) {
		var req agentMessageRequest
		err := parseJSON(body, &req)
		var br *badRequest
		if err != nil {
			if !errors.As(err, &br) || br.msg == "" {
				t.Fatalf("parseJSON(%q) = %v: not a client error", body, err)
			}
			return
		}
		if !json.Valid(body) {
			t.Fatalf("parseJSON accepted invalid JSON %q", body)
		}
		in, err := a.agentMessageInput(req)
		if err != nil {
			if !errors.As(err, &br) || br.msg == "" {
				t.Fatalf("agentMessageInput(%q) = %v: not a client error", body, err)
			}
			return
		}
		if id, ok := parseUUID(in.SessionID); !ok || id != in.SessionID {
			t.Fatalf("session id %q is not canonical", in.SessionID)
		}
		if c := cleanText(in.Content); strings.TrimSpace(c) == "" || !utf8.ValidString(c) || strings.ContainsRune(c, 0) {
			t.Fatalf("content %q accepted", in.Content)
		}
		if len(in.AgentType) > 255 || !utf8.ValidString(in.AgentType) || strings.ContainsRune(in.AgentType, 0) {
			t.Fatalf("agent type %q accepted", in.AgentType)
		}
		if in.GitDiff != nil && (!utf8.ValidString(*in.GitDiff) || strings.ContainsRune(*in.GitDiff, 0)) {
			t.Fatalf("git diff %q accepted", *in.GitDiff)
		}
	})
}
