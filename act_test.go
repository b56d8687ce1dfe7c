package main

// Tests of the lock-screen actions (issue 12): ntfy Actions and webhook
// action URLs, and POST /api/v1/act/<capability>: single use, bound to one
// question, 410 after use, after a timeout, after another device answered.

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"
)

// actURLs parses an ntfy Actions header into its URLs, by label.
func actURLs(t *testing.T, header string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, part := range strings.Split(header, ";") {
		f := strings.Split(part, ",")
		if len(f) != 5 || strings.TrimSpace(f[0]) != "http" || strings.TrimSpace(f[3]) != "method=POST" {
			t.Fatalf("bad action %q in %q", part, header)
		}
		out[strings.TrimSpace(f[1])] = strings.TrimSpace(f[2])
	}
	return out
}

// actPost posts to an action URL (made for http://inbox.test) on e.
func actPost(t *testing.T, e *testEnv, url string) (int, map[string]any) {
	t.Helper()
	path := strings.TrimPrefix(url, "http://inbox.test")
	code, b := e.call(t, "POST", path, "", nil)
	return code, mustJSON(t, b)
}

func TestActApproval(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	person, agent := e.mustKey(t, "n@example.com", scopePerson), e.mustKey(t, "n@example.com", scopeAgent)
	rc := newReceiver(t, nil)
	mustChannel(t, e, person, map[string]any{"kind": "ntfy", "url": rc.URL + "/topic"})
	hook := newReceiver(t, nil)
	mustChannel(t, e, person, map[string]any{"kind": "webhook", "url": hook.URL + "/hook"})
	cs := mcpTConnect(t, e, mcpTStreamable, agent, mcpTDial{})
	sid := mcpTNewSession(t, cs)

	p := mcpTGo(context.Background(), cs, "approve", map[string]any{"tool_name": "Bash", "input": map[string]any{"command": "make deploy"}, "agent_instance_id": sid}, nil)
	qid := apOpen(t, e, sid)
	notifyWaitFor(t, "the ntfy request", 10*time.Second, func() bool { return rc.count() >= 1 && hook.count() >= 1 })
	urls := actURLs(t, rc.requests()[0].header.Get("Actions"))
	if len(urls) != 2 || urls["Allow"] == "" || urls["Deny"] == "" {
		t.Fatalf("ntfy actions %v", urls)
	}
	for _, u := range urls {
		capability := strings.TrimPrefix(u, "http://inbox.test/api/v1/act/")
		if raw := len(capability) * 6; raw < 128 || strings.Contains(capability, "/") {
			t.Fatalf("capability %q carries %d bits", capability, raw)
		}
		// Stored only as its hash.
		if n := mcpTCount(t, e, `SELECT count(*) FROM action_capabilities WHERE hash = $1`, capability); n != 0 {
			t.Fatal("a capability is stored in the clear")
		}
		if n := mcpTCount(t, e, `SELECT count(*) FROM action_capabilities WHERE hash = $1`, capabilityHash(capability)); n != 1 {
			t.Fatal("the capability's hash is not stored")
		}
	}
	// The webhook carries its own action URLs.
	var ev struct {
		Data struct {
			Actions []actionLink `json:"actions"`
		} `json:"data"`
	}
	if err := json.Unmarshal(hook.requests()[0].body, &ev); err != nil || len(ev.Data.Actions) != 2 || ev.Data.Actions[0].Method != "POST" ||
		ev.Data.Actions[0].Action != "allow" || !strings.HasPrefix(ev.Data.Actions[0].URL, "http://inbox.test/api/v1/act/") {
		t.Fatalf("webhook actions: %s", hook.requests()[0].body)
	}
	// Unknown, malformed: 410, nothing changes.
	for _, u := range []string{"http://inbox.test/api/v1/act/" + strings.Repeat("A", 43), "http://inbox.test/api/v1/act/x"} {
		if code, out := actPost(t, e, u); code != http.StatusGone {
			t.Fatalf("unknown capability: %d %v", code, out)
		}
	}
	// Deny from the lock screen: the agent gets the deny.
	if code, out := actPost(t, e, urls["Deny"]); code != 200 || out["decision"] != "deny" || out["id"] != qid {
		t.Fatalf("deny: %d %v", code, out)
	}
	apTextOnly(t, p.wait(t), `{"behavior":"deny","message":"Denied by the person."}`)
	// Replay, and the other button of the same question: 410, no change.
	for _, u := range []string{urls["Deny"], urls["Allow"], ev.Data.Actions[0].URL} {
		if code, out := actPost(t, e, u); code != http.StatusGone {
			t.Fatalf("after use: %d %v", code, out)
		}
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE id = $1 AND decision = 'deny'`, qid); n != 1 {
		t.Fatal("the decision changed")
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM action_capabilities WHERE message_id = $1`, qid); n != 0 {
		t.Fatalf("%d capabilities outlive the answer", n)
	}
	// The capability never reaches the log.
	for _, u := range urls {
		if strings.Contains(e.logs.String(), strings.TrimPrefix(u, "http://inbox.test/api/v1/act/")) {
			t.Fatal("a capability was logged")
		}
	}
}

func TestActOtherDeviceAndWrongQuestion(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	person, agent := e.mustKey(t, "n@example.com", scopePerson), e.mustKey(t, "n@example.com", scopeAgent)
	rc := newReceiver(t, nil)
	mustChannel(t, e, person, map[string]any{"kind": "ntfy", "url": rc.URL + "/topic"})
	cs := mcpTConnect(t, e, mcpTStreamable, agent, mcpTDial{})
	sid := mcpTNewSession(t, cs)
	// A question with two options: one button each.
	p := mcpTGo(context.Background(), cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Ship?", "options": []any{"yes, ship", "no; wait"}, "allow_text": false}, nil)
	notifyWaitFor(t, "the question's notification", 10*time.Second, func() bool { return rc.count() >= 1 })
	q1 := actURLs(t, rc.requests()[0].header.Get("Actions"))
	if len(q1) != 2 || q1["yes  ship"] == "" && q1["yes ship"] == "" {
		t.Fatalf("option actions %v (%q)", q1, rc.requests()[0].header.Get("Actions"))
	}
	var qid string
	e.db.QueryRow(`SELECT id FROM messages WHERE agent_instance_id = $1 AND requires_user_input ORDER BY seq DESC LIMIT 1`, sid).Scan(&qid)
	// Another device answers first: every button is dead.
	if code, out := apAnswer(t, e, person, qid, map[string]any{"option": "no; wait"}); code != 200 {
		t.Fatalf("answer: %d %v", code, out)
	}
	if out := mcpTOut(t, p.wait(t)); out["answer"] != "no; wait" {
		t.Fatalf("%v", out)
	}
	for _, u := range q1 {
		if code, out := actPost(t, e, u); code != http.StatusGone {
			t.Fatalf("after another device answered: %d %v", code, out)
		}
	}
	// A capability is bound to its question: a new question's buttons do
	// not answer the old one, and the old ones do not answer the new one.
	p = mcpTGo(context.Background(), cs, "approve", map[string]any{"tool_name": "Edit", "input": map[string]any{"file_path": "x"}, "agent_instance_id": sid}, nil)
	aid := apOpen(t, e, sid)
	notifyWaitFor(t, "the approval's notification", 10*time.Second, func() bool { return rc.count() >= 2 })
	for _, u := range q1 {
		actPost(t, e, u)
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE id = $1 AND decision IS NULL`, aid); n != 1 {
		t.Fatal("an old question's button decided a new approval")
	}
	a2 := actURLs(t, rc.requests()[1].header.Get("Actions"))
	if code, out := actPost(t, e, a2["Allow"]); code != 200 || out["id"] != aid {
		t.Fatalf("allow: %d %v", code, out)
	}
	apTextOnly(t, p.wait(t), `{"behavior":"allow","updatedInput":{"file_path":"x"}}`)
	if n := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE id = $1 AND sender_type = 'USER'`, qid); n != 0 {
		t.Fatal("?")
	}
}

func TestActAfterTimeout(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, func(a *app) {
		a.cfg.questionTimeout = 700 * time.Millisecond
		a.cfg.callLimit = 100 * time.Millisecond
	})
	person, agent := e.mustKey(t, "n@example.com", scopePerson), e.mustKey(t, "n@example.com", scopeAgent)
	rc := newReceiver(t, nil)
	mustChannel(t, e, person, map[string]any{"kind": "ntfy", "url": rc.URL + "/topic"})
	cs := mcpTConnect(t, e, mcpTStreamable, agent, mcpTDial{})
	sid := mcpTNewSession(t, cs)
	mcpTCall(t, cs, "approve", map[string]any{"tool_name": "Bash", "input": map[string]any{"command": "ls"}, "agent_instance_id": sid})
	notifyWaitFor(t, "the notification", 10*time.Second, func() bool { return rc.count() >= 1 })
	urls := actURLs(t, rc.requests()[0].header.Get("Actions"))
	time.Sleep(800 * time.Millisecond)
	if code, out := actPost(t, e, urls["Allow"]); code != http.StatusGone || !strings.Contains(out["detail"].(string), "timed out") {
		t.Fatalf("after the timeout: %d %v", code, out)
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE agent_instance_id = $1 AND decision IS NOT NULL`, sid); n != 0 {
		t.Fatal("a timed-out approval was decided")
	}
	// The answer endpoint says the same, as a 409.
	var qid string
	e.db.QueryRow(`SELECT id FROM messages WHERE agent_instance_id = $1 AND kind = 'approval'`, sid).Scan(&qid)
	if code, out := apAnswer(t, e, person, qid, map[string]any{"decision": "allow"}); code != 409 {
		t.Fatalf("answer after timeout: %d %v", code, out)
	}
}

func TestActRateLimit(t *testing.T) {
	t.Parallel()
	now := time.Unix(1000, 0)
	l := newLimiter(rateLimit{perSec: 1, burst: 3}, func() time.Time { return now })
	allow := func(addr string) bool { ok, _ := l.allow(addr); return ok }
	for i := 0; i < 3; i++ {
		if !allow("a") {
			t.Fatalf("request %d refused", i)
		}
	}
	if allow("a") {
		t.Fatal("burst not limited")
	}
	if !allow("b") {
		t.Fatal("another address limited")
	}
	now = now.Add(time.Second)
	if !allow("a") || allow("a") {
		t.Fatal("refill wrong")
	}
	// Over HTTP: a 429 with Retry-After after the burst.
	e := newTestEnv(t)
	var last int
	for i := 0; i < 25; i++ {
		last, _ = e.call(t, "POST", "/api/v1/act/"+strings.Repeat("B", 43), "", nil)
	}
	if last != http.StatusTooManyRequests {
		t.Fatalf("status %d after 25 quick requests, want 429", last)
	}
	// The act endpoint is limited whatever RATE_LIMIT says: one token every
	// 3 s, so the wait it names is at most 3 s.
	resp, err := http.Post(e.srv.URL+"/api/v1/act/"+strings.Repeat("B", 43), "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if ra := resp.Header.Get("Retry-After"); resp.StatusCode != 429 || ra < "1" || ra > "3" || len(ra) != 1 {
		t.Fatalf("over the limit: %d, Retry-After %q", resp.StatusCode, ra)
	}
}

func TestNtfyActionsHeader(t *testing.T) {
	h := ntfyActions([]actionLink{{Label: "a, b; \"c\" é\n", URL: "https://x/api/v1/act/T1"}, {Label: "", URL: "https://x/2"}, {Label: "3", URL: "u3"}, {Label: "4", URL: "u4"}})
	want := "http, a b c, https://x/api/v1/act/T1, method=POST, clear=true; http, Option 2, https://x/2, method=POST, clear=true; http, 3, u3, method=POST, clear=true"
	if h != want {
		t.Fatalf("got  %q\nwant %q", h, want)
	}
}
