package main

// Chromium checks of issue 12: an approval card (hostile input stays
// text), Allow returning to the agent, an options question answered by its
// button, the page fixes (Answer box in the session, "You" in the list, a
// refused key kept in the field), and the screenshots in docs/.

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/modelcontextprotocol/go-sdk/mcp"
)

func TestBrowserApprovals(t *testing.T) {
	chrome := uiChromium(t)
	e := newTestEnv(t)
	person := e.mustKey(t, "me@example.com", scopePerson)
	agent := e.mustKey(t, "me@example.com", scopeAgent)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cs := uiMCP(t, ctx, e, agent)
	var st uiStepResult
	if err := uiTool(ctx, cs, "log_step", map[string]any{"step_description": "Built the release"}, &st); err != nil {
		t.Fatal(err)
	}
	sid := st.AgentInstanceID

	b := uiStartBrowser(t, ctx, chrome)
	// A refused key stays in the field, so it can be corrected.
	b.signIn(t, "a refused key", e.srv.URL, "not-a-key")
	b.waitJS(t, "the refusal", `document.getElementById('signin-error').textContent.includes('refused')`)
	if got := uiEval[string](t, b, `document.getElementById('key').value`); got != "not-a-key" {
		t.Fatalf("the key field holds %q after a refusal", got)
	}
	b.mu.Lock()
	b.problems = nil // the 401 it just got
	b.mu.Unlock()
	b.do(t, "sign in",
		chromedp.Evaluate[chromedp.Void](`document.getElementById('key').value = ''`),
		chromedp.SendKeys(chromedp.CSS("#key"), person),
		chromedp.Click(chromedp.CSS("#signin-form button[type=submit]")),
		chromedp.WaitVisible(chromedp.CSS(`#sessions .session-button[data-session="`+sid+`"]`)),
	)
	b.waitJS(t, "the event stream", `document.getElementById('conn').textContent === 'live'`)

	// An approval with hostile input: a card with the tool and the input as text.
	const hostile = `<img src=x onerror=alert(1)></pre><script>alert(2)</script>`
	input := map[string]any{"command": "rm -rf build && echo " + hostile, "description": hostile}
	type result struct {
		res *mcp.CallToolResult
		err error
	}
	done := make(chan result, 1)
	go func() {
		res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: "approve", Arguments: map[string]any{"tool_name": "Bash", "input": input, "tool_use_id": "toolu_b1", "agent_instance_id": sid}})
		done <- result{res, err}
	}()
	b.do(t, "the approval card", chromedp.WaitVisible(chromedp.CSS("#questions .question.approval .tool-input")))
	var buf strings.Builder
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	enc.Encode(input)
	want := strings.TrimSuffix(buf.String(), "\n")
	if got := uiEval[string](t, b, `document.querySelector('#questions .approval .tool-input').textContent`); got != want {
		t.Fatalf("input shown as %q, want %q", got, want)
	}
	if got := uiEval[string](t, b, `document.querySelector('#questions .approval .tool').textContent`); got != "Bash" {
		t.Fatalf("tool shown as %q", got)
	}
	if n := uiEval[int](t, b, `document.querySelectorAll('body img, #questions script, #timeline script').length`); n != 0 {
		t.Fatalf("hostile input became %d elements", n)
	}
	// The session view offers the same decision right there.
	b.do(t, "open the session",
		chromedp.Click(chromedp.CSS(`#sessions .session-button[data-session="`+sid+`"]`)),
		chromedp.WaitVisible(chromedp.CSS("#detail-question button[data-decision=allow]")),
	)
	if os.Getenv("UPDATE_SCREENSHOTS") == "1" {
		uiShot(t, b, filepath.Join("docs", "approval-desktop.png"))
	}
	b.do(t, "Allow", chromedp.Click(chromedp.CSS("#questions .approval button[data-decision=allow]")))
	select {
	case r := <-done:
		if r.err != nil || len(r.res.Content) != 1 {
			t.Fatalf("approve: %v %+v", r.err, r.res)
		}
		inJSON, _ := json.Marshal(input)
		if got := r.res.Content[0].(*mcp.TextContent).Text; got != `{"behavior":"allow","updatedInput":`+string(inJSON)+`}` {
			t.Fatalf("approve returned %s", got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("approve did not return after Allow")
	}
	b.do(t, "the card leaves", chromedp.WaitNotPresent(chromedp.CSS("#questions .approval")))
	b.waitJS(t, "the decision in the timeline", `Array.from(document.querySelectorAll('#timeline .decision')).some(d => d.textContent === 'Allowed')`)
	b.waitJS(t, "the session's answer box gone", `document.getElementById('detail-question').hidden`)

	// A question with options: answered by its button.
	asked := make(chan askOut, 1)
	go func() {
		var o askOut
		o.err = uiTool(ctx, cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Which region?", "options": []string{"eu-west-1", hostile}, "allow_text": false}, &o.out)
		asked <- o
	}()
	b.do(t, "option buttons", chromedp.WaitVisible(chromedp.CSS(`#questions .question button.option`)))
	if n := uiEval[int](t, b, `document.querySelectorAll('#questions .question textarea').length`); n != 0 {
		t.Fatal("allow_text false still shows a text box")
	}
	if got := uiEval[[]string](t, b, `Array.from(document.querySelectorAll('#questions .question button.option')).map(b => b.textContent)`); len(got) != 2 || got[1] != hostile {
		t.Fatalf("options %q", got)
	}
	if os.Getenv("UPDATE_SCREENSHOTS") == "1" {
		b.do(t, "phone", chromedp.EmulateViewport(375, 812, chromedp.EmulateMobile), chromedp.Click(chromedp.CSS("#back")))
		uiShot(t, b, filepath.Join("docs", "options-phone.png"))
		if h := uiEval[float64](t, b, `document.querySelector('header.top').getBoundingClientRect().height`); h > 60 {
			t.Errorf("phone header is %.0f px high: more than one row", h)
		}
		if w := uiEval[float64](t, b, `document.querySelector('header.top').scrollWidth - document.documentElement.clientWidth`); w > 0 {
			t.Errorf("phone header overflows the screen by %.0f px", w)
		}
	}
	b.do(t, "choose", chromedp.Click(chromedp.CSS(`#questions .question button.option[data-option="eu-west-1"]`)))
	select {
	case o := <-asked:
		if o.err != nil || o.out.Answer == nil || *o.out.Answer != "eu-west-1" {
			t.Fatalf("ask_question: %+v %v", o.out, o.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ask_question did not return the chosen option")
	}
	// The person's own last message is marked "You" in the list.
	b.waitJS(t, "You in the list", `document.querySelector('#sessions .session-button[data-session="`+sid+`"] .you') !== null`)
	if n := b.dialogs.Load(); n != 0 {
		t.Fatalf("%d JavaScript dialogs opened: agent text ran as code", n)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.problems) > 0 {
		t.Fatalf("the page reported problems:\n%v", b.problems)
	}
}

type askOut struct {
	out struct {
		Answer *string `json:"answer"`
		Status string  `json:"status"`
	}
	err error
}
