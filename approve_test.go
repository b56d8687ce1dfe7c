package main

// Tests of issue 12: the approve tool's contract, session rules, the answer
// endpoint, options on ask_question.

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// apTextOnly checks the permission-prompt contract's shape: exactly one
// text block, its text equal to want byte for byte, and the same object as
// structured content.
func apTextOnly(t *testing.T, res *mcp.CallToolResult, want string) {
	t.Helper()
	if res.IsError {
		t.Fatalf("tool error: %s", mcpTText(res))
	}
	if len(res.Content) != 1 {
		t.Fatalf("%d content blocks, want 1", len(res.Content))
	}
	tc, ok := res.Content[0].(*mcp.TextContent)
	if !ok {
		t.Fatalf("content is %T", res.Content[0])
	}
	if tc.Text != want {
		t.Fatalf("text\n %s\nwant\n %s", tc.Text, want)
	}
	sc, _ := json.Marshal(res.StructuredContent)
	var a, b any
	json.Unmarshal(sc, &a)
	json.Unmarshal([]byte(want), &b)
	if ja, _ := json.Marshal(a); string(ja) != mustCanon(t, want) {
		t.Fatalf("structured content %s, want %s", sc, want)
	}
}

func mustCanon(t *testing.T, s string) string {
	var v any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(v)
	return string(b)
}

// apOpen returns the id of the session's open approval, waiting for it.
func apOpen(t *testing.T, e *testEnv, sid string) string {
	t.Helper()
	var id string
	mcpTEventually(t, "an open approval", func() bool {
		return e.db.QueryRow(`SELECT id FROM messages WHERE agent_instance_id = $1 AND kind = 'approval' AND decision IS NULL ORDER BY seq DESC LIMIT 1`, sid).Scan(&id) == nil
	})
	return id
}

func apAnswer(t *testing.T, e *testEnv, key, qid string, body any) (int, map[string]any) {
	t.Helper()
	code, b := e.call(t, "POST", "/api/v1/questions/"+qid+"/answer", key, body)
	return code, mustJSON(t, b)
}

func TestApproveContract(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	agent := e.mustKey(t, "a@example.com", scopeAgent)
	person := e.mustKey(t, "a@example.com", scopePerson)
	for _, tr := range mcpTWaitTransports {
		t.Run(tr.name, func(t *testing.T) {
			cs := mcpTConnect(t, e, tr, agent, mcpTDial{})
			sid := mcpTNewSession(t, cs)
			input := map[string]any{"command": "rm -rf build", "timeout": 120000, "description": "<b>clean</b> & \"go\""}
			p := mcpTGo(context.Background(), cs, "approve", map[string]any{"tool_name": "Bash", "input": input, "tool_use_id": "toolu_1", "agent_instance_id": sid}, nil)
			qid := apOpen(t, e, sid)
			var status string
			e.db.QueryRow(`SELECT status FROM agent_instances WHERE id = $1`, sid).Scan(&status)
			if status != statusAwaitingInput {
				t.Errorf("status while approving = %s", status)
			}
			// The open approval is the session's open_question.
			code, b := e.call(t, "GET", "/api/v1/sessions", person, nil)
			if code != 200 || !strings.Contains(string(b), `"open_question":{"id":"`+qid+`"`) || !strings.Contains(string(b), `"kind":"approval"`) || !strings.Contains(string(b), `"tool_name":"Bash"`) {
				t.Fatalf("sessions: %d %s", code, b)
			}
			if code, out := apAnswer(t, e, person, qid, map[string]any{"decision": "allow"}); code != 200 || out["decision"] != "allow" || out["kind"] != "approval" {
				t.Fatalf("answer: %d %v", code, out)
			}
			inJSON, _ := json.Marshal(input)
			apTextOnly(t, p.wait(t), `{"behavior":"allow","updatedInput":`+string(inJSON)+`}`)

			// Deny with the person's words, and without.
			for _, msg := range []string{"not on Fridays", ""} {
				p = mcpTGo(context.Background(), cs, "approve", map[string]any{"tool_name": "Write", "input": map[string]any{"file_path": "/etc/passwd", "why": msg}, "agent_instance_id": sid}, nil)
				qid = apOpen(t, e, sid)
				body := map[string]any{"decision": "deny"}
				if msg != "" {
					body["message"] = msg
				}
				if code, out := apAnswer(t, e, person, qid, body); code != 200 {
					t.Fatalf("deny: %d %v", code, out)
				}
				want := msg
				if want == "" {
					want = deniedByPerson
				}
				wb, _ := json.Marshal(permissionDeny{"deny", want})
				apTextOnly(t, p.wait(t), string(wb))
				// A second answer is a 409 naming the decision.
				if code, out := apAnswer(t, e, person, qid, map[string]any{"decision": "allow"}); code != 409 || out["detail"] != "already answered: deny" {
					t.Fatalf("second answer: %d %v", code, out)
				}
				// The timeline carries the decision.
				code, b := e.call(t, "GET", "/api/v1/sessions/"+sid+"/messages", person, nil)
				if code != 200 || !strings.Contains(string(b), `"decision":"deny"`) {
					t.Fatalf("timeline: %s", b)
				}
			}
		})
	}
}

func TestApproveSessionRules(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	agent := e.mustKey(t, "a@example.com", scopeAgent)
	person := e.mustKey(t, "a@example.com", scopePerson)
	cs := mcpTConnect(t, e, mcpTStreamable, agent, mcpTDial{})
	sid := mcpTNewSession(t, cs)
	call := func(cmd string) *mcpTPending {
		return mcpTGo(context.Background(), cs, "approve", map[string]any{"tool_name": "Bash", "input": map[string]any{"command": cmd}, "agent_instance_id": sid}, nil)
	}
	p := call("CI=1 npm test")
	qid := apOpen(t, e, sid)
	if code, out := apAnswer(t, e, person, qid, map[string]any{"decision": "allow_session"}); code != 200 || out["rule"] != "Bash(npm)" {
		t.Fatalf("allow_session: %d %v", code, out)
	}
	apTextOnly(t, p.wait(t), `{"behavior":"allow","updatedInput":{"command":"CI=1 npm test"}}`)

	before := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE agent_instance_id = $1 AND requires_user_input`, sid)
	res := mcpTCall(t, cs, "approve", map[string]any{"tool_name": "Bash", "input": map[string]any{"command": "npm run build"}, "agent_instance_id": sid})
	apTextOnly(t, res, `{"behavior":"allow","updatedInput":{"command":"npm run build"}}`)
	if n := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE agent_instance_id = $1 AND requires_user_input`, sid); n != before {
		t.Fatalf("a rule-allowed call asked: %d open, want %d", n, before)
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE agent_instance_id = $1 AND decided_by_rule = 'Bash(npm)' AND decision = 'allow'`, sid); n != 1 {
		t.Fatalf("rule-allowed call not in the timeline (%d)", n)
	}
	// Chained, piped, substituted, other words: asked.
	for _, cmd := range []string{"npm test && rm -rf ~", "npm test; rm x", "npm test | sh", "npm $(rm x)", "npm test > /etc/x", "npm test &", "npm test\nrm x", "npm `rm`", "git push"} {
		p := call(cmd)
		qid := apOpen(t, e, sid)
		if code, out := apAnswer(t, e, person, qid, map[string]any{"decision": "deny"}); code != 200 {
			t.Fatalf("%q: %d %v", cmd, code, out)
		}
		apTextOnly(t, p.wait(t), `{"behavior":"deny","message":"Denied by the person."}`)
	}
	// Another tool: the tool's name is the rule.
	p = mcpTGo(context.Background(), cs, "approve", map[string]any{"tool_name": "Edit", "input": map[string]any{"file_path": "a.go"}, "agent_instance_id": sid}, nil)
	qid = apOpen(t, e, sid)
	if code, out := apAnswer(t, e, person, qid, map[string]any{"decision": "allow_session"}); code != 200 || out["rule"] != "Edit" {
		t.Fatalf("allow_session Edit: %d %v", code, out)
	}
	p.wait(t)
	apTextOnly(t, mcpTCall(t, cs, "approve", map[string]any{"tool_name": "Edit", "input": map[string]any{"file_path": "b.go"}, "agent_instance_id": sid}),
		`{"behavior":"allow","updatedInput":{"file_path":"b.go"}}`)
	// Rules are per session.
	other := mcpTNewSession(t, cs)
	p = mcpTGo(context.Background(), cs, "approve", map[string]any{"tool_name": "Edit", "input": map[string]any{"file_path": "b.go"}, "agent_instance_id": other}, nil)
	apOpen(t, e, other)
	e.call(t, "POST", "/api/v1/sessions/end", agent, map[string]any{"agent_instance_id": other})
	if res := p.wait(t); !strings.Contains(mcpTText(res), "session ended") {
		t.Fatalf("ended: %s", mcpTText(res))
	}
}

func TestRuleFor(t *testing.T) {
	cases := map[string]string{
		"npm test": "Bash(npm)", "  FOO=1 BAR=x git status": "Bash(git)", "ls": "Bash(ls)",
		"npm test && rm -rf ~": "", "a || b": "", "a | b": "", "a & b": "", "a\nb": "", "echo `x`": "",
		"echo $(x)": "", "cat < x": "", "echo > x": "", "X=$(rm) ls": "", `A="x y" ls`: "", "": "", "FOO=1": "",
	}
	for cmd, want := range cases {
		in, _ := json.Marshal(map[string]string{"command": cmd})
		r := ruleFor("Bash", in)
		got := ""
		if r.ok {
			got = r.String()
		}
		if got != want {
			t.Errorf("ruleFor(%q) = %q, want %q", cmd, got, want)
		}
	}
	if r := ruleFor("Read", []byte(`{}`)); !r.ok || r.String() != "Read" {
		t.Errorf("Read: %v", r)
	}
}

func TestApproveAccess(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	agent := e.mustKey(t, "a@example.com", scopeAgent)
	person := e.mustKey(t, "a@example.com", scopePerson)
	bob := e.mustKey(t, "bob@example.com", scopePerson)
	cs := mcpTConnect(t, e, mcpTStreamable, agent, mcpTDial{})
	sid := mcpTNewSession(t, cs)
	p := mcpTGo(context.Background(), cs, "approve", map[string]any{"tool_name": "Bash", "input": map[string]any{"command": "make"}, "agent_instance_id": sid}, nil)
	qid := apOpen(t, e, sid)
	// An agent can never approve its own request.
	if code, _ := apAnswer(t, e, agent, qid, map[string]any{"decision": "allow"}); code != http.StatusForbidden {
		t.Fatalf("agent key: %d, want 403", code)
	}
	// messages/user with "allow" is feedback, not a decision.
	mcpTAnswer(t, e, agent, sid, "allow")
	mcpTAnswer(t, e, person, sid, "allow")
	time.Sleep(100 * time.Millisecond)
	if n := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE id = $1 AND decision IS NULL`, qid); n != 1 {
		t.Fatal("messages/user resolved an approval")
	}
	code, b := e.call(t, "GET", "/api/v1/sessions", person, nil)
	if code != 200 || !strings.Contains(string(b), `"open_question":{"id":"`+qid+`"`) {
		t.Fatalf("after feedback the approval is not open: %s", b)
	}
	// Another user's question is a 404.
	if code, _ := apAnswer(t, e, bob, qid, map[string]any{"decision": "allow"}); code != http.StatusNotFound {
		t.Fatalf("another user's: %d", code)
	}
	// Bad bodies are 400s.
	for _, body := range []any{map[string]any{"decision": "yes"}, map[string]any{"text": "ok"}, map[string]any{}, "[1]", "{", map[string]any{"decision": "allow", "message": "hi"}} {
		if code, out := apAnswer(t, e, person, qid, body); code != 400 {
			t.Fatalf("%v: %d %v", body, code, out)
		}
	}
	if code, _ := apAnswer(t, e, person, "not-a-uuid", map[string]any{"decision": "allow"}); code != 400 {
		t.Fatalf("bad id: %d", code)
	}
	if code, _ := apAnswer(t, e, person, newUUID(), map[string]any{"decision": "allow"}); code != 404 {
		t.Fatalf("unknown id: %d", code)
	}
	apAnswer(t, e, person, qid, map[string]any{"decision": "allow"})
	apTextOnly(t, p.wait(t), `{"behavior":"allow","updatedInput":{"command":"make"}}`)
	// The feedback reaches the next step.
	out := mcpTOut(t, mcpTCall(t, cs, "log_step", map[string]any{"agent_instance_id": sid, "step_description": "made"}))
	if fb := mcpTFeedback(t, out); len(fb) != 2 {
		t.Fatalf("feedback %v", fb)
	}
}

func TestApproveCallLimitResume(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, func(a *app) { a.cfg.callLimit = 300 * time.Millisecond })
	agent := e.mustKey(t, "a@example.com", scopeAgent)
	person := e.mustKey(t, "a@example.com", scopePerson)
	uid := e.mustUserID(t, "a@example.com")
	// A webhook channel, so the outbox gets one event per approval.
	if _, err := e.a.store.createChannel(context.Background(), uid, channel{Kind: "webhook", URL: "http://127.0.0.1:9/", Secret: "s", Events: []string{eventQuestionAsked}}); err != nil {
		t.Fatal(err)
	}
	cs := mcpTConnect(t, e, mcpTStreamable, agent, mcpTDial{ua: "claude-code/2.1.332"})
	args := map[string]any{"tool_name": "Bash", "input": map[string]any{"command": "terraform apply"}, "tool_use_id": "toolu_9"}
	res := mcpTCall(t, cs, "approve", args)
	text := mcpTText(res)
	var qid, sid string
	e.db.QueryRow(`SELECT id, agent_instance_id FROM messages WHERE tool_use_id = 'toolu_9'`).Scan(&qid, &sid)
	var deny map[string]any
	if err := json.Unmarshal([]byte(res.Content[0].(*mcp.TextContent).Text), &deny); err != nil || len(deny) != 2 || deny["behavior"] != "deny" ||
		!strings.Contains(deny["message"].(string), qid) || !strings.Contains(deny["message"].(string), "still open") {
		t.Fatalf("call limit: %s", text)
	}
	// No agent_instance_id: the key's latest active claude-code session (a new one here).
	if n := mcpTCount(t, e, `SELECT count(*) FROM agent_instances a JOIN user_agents ua ON ua.id = a.user_agent_id WHERE a.id = $1 AND ua.name = 'claude-code'`, sid); n != 1 {
		t.Fatal("session not created for the agent type")
	}
	// Re-call: same approval, still open.
	res = mcpTCall(t, cs, "approve", args)
	if !strings.Contains(mcpTText(res), qid) {
		t.Fatalf("re-call: %s", mcpTText(res))
	}
	// Decided between calls: returned at once.
	apAnswer(t, e, person, qid, map[string]any{"decision": "allow"})
	start := time.Now()
	apTextOnly(t, mcpTCall(t, cs, "approve", args), `{"behavior":"allow","updatedInput":{"command":"terraform apply"}}`)
	if time.Since(start) > 250*time.Millisecond {
		t.Fatal("a decided approval was not returned at once")
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE kind = 'approval' AND agent_instance_id = $1`, sid); n != 1 {
		t.Fatalf("%d approvals stored, want 1", n)
	}
	if n := mcpTCount(t, e, `SELECT count(*) FROM notification_events WHERE message_id = $1`, qid); n != 1 {
		t.Fatalf("%d notification events, want 1", n)
	}
	// Without a tool_use_id: the same tool and input resume too; the X-Agentline-Session header picks the session.
	hdr := newUUID()
	cs2 := mcpTConnect(t, e, mcpTStreamable, agent, mcpTDial{})
	_ = cs2
	args2 := map[string]any{"tool_name": "Read", "input": map[string]any{"file_path": "x"}, "agent_instance_id": hdr}
	if res := mcpTCall(t, cs, "approve", args2); !res.IsError {
		t.Fatalf("unknown agent_instance_id: %s", mcpTText(res))
	}
	args2 = map[string]any{"tool_name": "Read", "input": map[string]any{"file_path": "x"}}
	mcpTCall(t, cs, "approve", args2)
	mcpTCall(t, cs, "approve", args2)
	if n := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE kind = 'approval' AND tool_name = 'Read'`); n != 1 {
		t.Fatalf("%d Read approvals, want 1", n)
	}
}

func TestApproveSessionHeader(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, func(a *app) { a.cfg.callLimit = 100 * time.Millisecond })
	agent := e.mustKey(t, "a@example.com", scopeAgent)
	sid := newUUID()
	hc := &http.Client{Transport: mcpTRT{key: agent, base: http.DefaultTransport, d: mcpTDial{}}}
	hc.Transport = headerRT{base: hc.Transport, k: "X-Agentline-Session", v: sid}
	c := mcp.NewClient(&mcp.Implementation{Name: "t", Version: "1"}, nil)
	cs, err := c.Connect(context.Background(), &mcp.StreamableClientTransport{Endpoint: e.srv.URL + "/mcp/", HTTPClient: hc}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	mcpTCall(t, cs, "approve", map[string]any{"tool_name": "Bash", "input": map[string]any{"command": "ls"}})
	if n := mcpTCount(t, e, `SELECT count(*) FROM messages WHERE agent_instance_id = $1 AND kind = 'approval'`, sid); n != 1 {
		t.Fatalf("header session: %d approvals", n)
	}
}

type headerRT struct {
	base http.RoundTripper
	k, v string
}

func (h headerRT) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set(h.k, h.v)
	return h.base.RoundTrip(r)
}

func TestApproveBadInput(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	agent := e.mustKey(t, "a@example.com", scopeAgent)
	cs := mcpTConnect(t, e, mcpTStreamable, agent, mcpTDial{})
	for _, args := range []map[string]any{
		{"tool_name": "", "input": map[string]any{}},
		{"tool_name": "Bash"},
		{"tool_name": "Bash", "input": "rm"},
		{"tool_name": "Bash", "input": map[string]any{}, "agent_instance_id": "nope"},
	} {
		if res := mcpTCall(t, cs, "approve", args); !res.IsError {
			t.Fatalf("%v: %s", args, mcpTText(res))
		}
	}
}

func TestAskOptions(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	agent := e.mustKey(t, "a@example.com", scopeAgent)
	person := e.mustKey(t, "a@example.com", scopePerson)
	cs := mcpTConnect(t, e, mcpTStreamable, agent, mcpTDial{})
	sid := mcpTNewSession(t, cs)
	eleven := make([]any, 11)
	for i := range eleven {
		eleven[i] = string(rune('a' + i))
	}
	for _, c := range []struct {
		args map[string]any
		want string
	}{
		{map[string]any{"options": eleven}, "1 to 10"},
		{map[string]any{"options": []any{}}, "1 to 10"},
		{map[string]any{"options": []any{"a", "a"}}, "distinct"},
		{map[string]any{"options": []any{"a", ""}}, "options[1] must be 1 to 200"},
		{map[string]any{"options": []any{strings.Repeat("x", 201)}}, "1 to 200"},
		{map[string]any{"allow_text": false}, "only with options"},
	} {
		c.args["agent_instance_id"], c.args["question_text"] = sid, "Pick"
		mcpTWantError(t, mcpTCall(t, cs, "ask_question", c.args), c.want)
	}
	ask := map[string]any{"agent_instance_id": sid, "question_text": "Which DB?", "options": []any{"postgres", "sqlite"}, "allow_text": false}
	p := mcpTGo(context.Background(), cs, "ask_question", ask, nil)
	mcpTWaiters(t, e, 1)
	var qid string
	e.db.QueryRow(`SELECT id FROM messages WHERE agent_instance_id = $1 AND requires_user_input ORDER BY seq DESC LIMIT 1`, sid).Scan(&qid)
	code, b := e.call(t, "GET", "/api/v1/sessions", person, nil)
	if code != 200 || !strings.Contains(string(b), `"options":["postgres","sqlite"],"allow_text":false`) {
		t.Fatalf("sessions: %s", b)
	}
	if code, out := apAnswer(t, e, person, qid, map[string]any{"text": "mysql"}); code != 400 {
		t.Fatalf("free text with allow_text false: %d %v", code, out)
	}
	if code, out := apAnswer(t, e, person, qid, map[string]any{"option": "mysql"}); code != 400 {
		t.Fatalf("unknown option: %d %v", code, out)
	}
	if code, out := apAnswer(t, e, person, qid, map[string]any{"decision": "allow"}); code != 400 {
		t.Fatalf("decision on a question: %d %v", code, out)
	}
	if code, out := apAnswer(t, e, person, qid, map[string]any{"text": "sqlite"}); code != 200 || out["answer"] != "sqlite" {
		t.Fatalf("text equal to an option: %d %v", code, out)
	}
	out := mcpTOut(t, p.wait(t))
	if out["answer"] != "sqlite" {
		t.Fatalf("ask_question: %v", out)
	}
	if code, out := apAnswer(t, e, person, qid, map[string]any{"option": "postgres"}); code != 409 || out["detail"] != "already answered: sqlite" {
		t.Fatalf("second: %d %v", code, out)
	}
	// allow_text true (default): free text answers; option chosen by button.
	ask = map[string]any{"agent_instance_id": sid, "question_text": "Name?", "options": []any{"Ada"}}
	p = mcpTGo(context.Background(), cs, "ask_question", ask, nil)
	mcpTWaiters(t, e, 1)
	e.db.QueryRow(`SELECT id FROM messages WHERE agent_instance_id = $1 AND requires_user_input ORDER BY seq DESC LIMIT 1`, sid).Scan(&qid)
	if code, out := apAnswer(t, e, person, qid, map[string]any{"option": "Ada"}); code != 200 {
		t.Fatalf("option: %d %v", code, out)
	}
	if out := mcpTOut(t, p.wait(t)); out["answer"] != "Ada" {
		t.Fatalf("%v", out)
	}
}

func TestApproveEvents(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	agent := e.mustKey(t, "a@example.com", scopeAgent)
	person := e.mustKey(t, "a@example.com", scopePerson)
	cs := mcpTConnect(t, e, mcpTStreamable, agent, mcpTDial{})
	sid := mcpTNewSession(t, cs)
	s := uiOpenStream(t, e, person, "")
	defer s.close()
	if ev := s.next(t, 5*time.Second); ev.Name != "ready" {
		t.Fatalf("first event %+v", ev)
	}
	p := mcpTGo(context.Background(), cs, "approve", map[string]any{"tool_name": "Bash", "input": map[string]any{"command": "<img src=x onerror=alert(1)>"}, "agent_instance_id": sid}, nil)
	var qid string
	for qid == "" {
		ev := s.next(t, 5*time.Second)
		if ev.Name != "message" {
			continue
		}
		var m map[string]any
		json.Unmarshal([]byte(ev.Data), &m)
		in, _ := m["tool_input"].(map[string]any)
		if m["kind"] != "approval" || m["tool_name"] != "Bash" || in["command"] != "<img src=x onerror=alert(1)>" || m["requires_user_input"] != true {
			t.Fatalf("approval event: %s", ev.Data)
		}
		qid = m["id"].(string)
	}
	apAnswer(t, e, person, qid, map[string]any{"decision": "deny", "message": "no"})
	for {
		ev := s.next(t, 5*time.Second)
		if ev.Name == "decision" {
			want := `{"session_id":"` + sid + `","id":"` + qid + `","kind":"approval","decision":"deny","decision_message":"no"}`
			if ev.Data != want {
				t.Fatalf("decision event %s, want %s", ev.Data, want)
			}
			break
		}
	}
	apTextOnly(t, p.wait(t), `{"behavior":"deny","message":"no"}`)
}

// request-input cannot reopen a decided approval.
func TestApproveNotReopened(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	agent := e.mustKey(t, "a@example.com", scopeAgent)
	person := e.mustKey(t, "a@example.com", scopePerson)
	cs := mcpTConnect(t, e, mcpTStreamable, agent, mcpTDial{})
	sid := mcpTNewSession(t, cs)
	p := mcpTGo(context.Background(), cs, "approve", map[string]any{"tool_name": "Read", "input": map[string]any{"file_path": "a"}, "agent_instance_id": sid}, nil)
	qid := apOpen(t, e, sid)
	apAnswer(t, e, person, qid, map[string]any{"decision": "allow"})
	p.wait(t)
	if code, b := e.call(t, "PATCH", "/api/v1/messages/"+qid+"/request-input", agent, nil); code != http.StatusConflict {
		t.Fatalf("request-input on a decided approval: %d %s", code, b)
	}
}

// Review item 3, the approve tool's share: a NUL in the input is stored as
// U+FFFD, and a number beyond float64's range is a tool error that says so,
// never "internal error".
func TestApproveOddInput(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, func(a *app) { a.cfg.callLimit = 200 * time.Millisecond })
	agent := e.mustKey(t, "odd@example.com", scopeAgent)
	cs := mcpTConnect(t, e, mcpTStreamable, agent, mcpTDial{})
	res := mcpTCall(t, cs, "approve", map[string]any{"tool_name": "Write", "input": map[string]any{"content": "a\x00b"}, "tool_use_id": "toolu_nul"})
	if res.IsError || !strings.Contains(mcpTText(res), "still open") {
		t.Fatalf("NUL: %s", mcpTText(res))
	}
	var stored string
	e.db.QueryRow(`SELECT tool_input::text FROM messages WHERE tool_use_id = 'toolu_nul'`).Scan(&stored)
	if stored != `{"content": "a`+"\uFFFD"+`b"}` {
		t.Fatalf("NUL stored as %q", stored)
	}
	// A number beyond a float64: the server's MCP SDK decodes the arguments
	// into float64s first, so 1e999999 is its tool error and 1e-2000 is 0
	// (jsonb takes both then); never an internal error. The go-sdk client
	// cannot send them: a client written out by hand.
	raw := newRawMCP(t, e, agent)
	for i, n := range []string{"1e999999", "1e-2000"} {
		select {
		case out := <-raw.call(2+i, "approve", `{"tool_name":"Bash","input":{"n":`+n+`},"tool_use_id":"toolu_`+n+`"}`):
			if strings.Contains(out, "internal error") || !strings.Contains(out, `"result"`) {
				t.Fatalf("%s: %s", n, out)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: no answer", n)
		}
	}
}
