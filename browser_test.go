package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// The inbox page in a real browser: headless Chromium driven over the
// DevTools protocol by chromedp (a test-only dependency), against the real
// server, database and MCP tools.

// uiFindChromium returns the path of a Chromium or Chrome binary, or "".
func uiFindChromium() string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "headless-shell"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// uiChromium returns the path of Chromium, or skips t when there is none.
func uiChromium(t *testing.T) string {
	t.Helper()
	chrome := uiFindChromium()
	if chrome == "" {
		t.Skip("browser test skipped: no Chromium found on PATH (apt-get install chromium; .ci/run installs it)")
	}
	return chrome
}

// signIn opens the page at base and signs in with key, then runs then; what
// names the step in a failure.
func (b *uiBrowser) signIn(t *testing.T, what, base, key string, then ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	b.do(t, what, append([]chromedp.Action[chromedp.Void]{
		chromedp.Navigate(base + "/"),
		chromedp.WaitVisible(chromedp.CSS("#key")),
		chromedp.SendKeys(chromedp.CSS("#key"), key),
		chromedp.Click(chromedp.CSS("#signin-form button[type=submit]")),
	}, then...)...)
}

// uiBrowser starts a headless Chromium with a fresh profile and returns a
// tab's context. Dialogs are counted (and dismissed); uncaught exceptions and
// console errors are collected.
type uiBrowser struct {
	ctx      context.Context
	dialogs  atomic.Int32
	mu       sync.Mutex
	problems []string
	requests []uiRequest
}

// uiRequest is a request the page made.
type uiRequest struct {
	url     string
	headers map[string]string
}

func uiStartBrowser(t *testing.T, ctx context.Context, chrome string) *uiBrowser {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chrome),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 900),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(ctx, opts...)
	tabCtx, cancelTab := chromedp.NewContext(allocCtx)
	t.Cleanup(func() { cancelTab(); cancelAlloc() })
	if err := chromedp.Do(tabCtx); err != nil {
		t.Fatalf("start %s: %v", chrome, err)
	}
	b := &uiBrowser{ctx: tabCtx}
	err := chromedp.Listen(tabCtx, func(ev any) {
		switch ev := ev.(type) {
		case *page.EventJavascriptDialogOpening:
			b.dialogs.Add(1)
			go chromedp.Call(tabCtx, page.HandleJavaScriptDialog, page.HandleJavaScriptDialogParams{Accept: false})
		case *runtime.EventExceptionThrown:
			d := ev.ExceptionDetails
			msg := d.Text
			if d.Exception != nil {
				msg += " " + d.Exception.Description
			}
			b.problem(fmt.Sprintf("exception at %s:%d: %s", d.URL, d.LineNumber+1, msg))
		case *log.EventEntryAdded:
			// The test drops the event stream on purpose once.
			dropped := ev.Entry.Source == log.EntrySourceNetwork && strings.HasSuffix(ev.Entry.URL, "/api/v1/events")
			if ev.Entry.Level == log.EntryLevelError && !dropped {
				b.problem(fmt.Sprintf("console %s: %s (%s)", ev.Entry.Source, ev.Entry.Text, ev.Entry.URL))
			}
		case *network.EventRequestWillBeSent:
			r := uiRequest{url: ev.Request.URL, headers: map[string]string{}}
			for k, v := range ev.Request.Headers {
				r.headers[strings.ToLower(k)] = fmt.Sprint(v)
			}
			b.mu.Lock()
			b.requests = append(b.requests, r)
			b.mu.Unlock()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (b *uiBrowser) problem(s string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.problems = append(b.problems, s)
}

// do runs steps, failing the test with what for context.
func (b *uiBrowser) do(t *testing.T, what string, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	if err := chromedp.Do(b.ctx, steps...); err != nil {
		t.Fatalf("%s: %v (page problems: %v)", what, err, b.problems)
	}
}

// waitJS waits until the JavaScript expression is true.
func (b *uiBrowser) waitJS(t *testing.T, what, expr string) {
	t.Helper()
	_, err := chromedp.Run(b.ctx, chromedp.Poll[chromedp.Void](expr, chromedp.WithPollingTimeout(10*time.Second)))
	if err != nil {
		t.Fatalf("waiting for %s: %v (page problems: %v)", what, err, b.problems)
	}
}

func uiEval[T any](t *testing.T, b *uiBrowser, expr string) T {
	t.Helper()
	v, err := chromedp.Run(b.ctx, chromedp.Evaluate[T](expr))
	if err != nil {
		t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

// uiMCP connects the go-sdk MCP client with key, as an agent would.
func uiMCP(t *testing.T, ctx context.Context, e *testEnv, key string) *mcp.ClientSession {
	t.Helper()
	c := mcp.NewClient(&mcp.Implementation{Name: "browser-test-agent", Version: "1"}, nil)
	hc := &http.Client{Transport: bearerRT{key: key, ua: "claude-code/1.0"}}
	cs, err := c.Connect(ctx, &mcp.StreamableClientTransport{Endpoint: e.srv.URL + "/mcp/", HTTPClient: hc}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cs.Close() })
	return cs
}

// uiTool calls an MCP tool and decodes its structured result into out.
func uiTool(ctx context.Context, cs *mcp.ClientSession, name string, args map[string]any, out any) error {
	res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: name, Arguments: args})
	if err != nil {
		return err
	}
	if res.IsError {
		b, _ := json.Marshal(res.Content)
		return fmt.Errorf("%s: tool error %s", name, b)
	}
	b, err := json.Marshal(res.StructuredContent)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, out)
}

type uiStepResult struct {
	AgentInstanceID string   `json:"agent_instance_id"`
	UserFeedback    []string `json:"user_feedback"`
}

func TestBrowserInbox(t *testing.T) {
	chrome := uiChromium(t)
	e := newTestEnv(t)
	person := e.mustKey(t, "me@example.com", scopePerson)
	agent := e.mustKey(t, "me@example.com", scopeAgent)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	cs := uiMCP(t, ctx, e, agent)
	step := func(sid, text string) uiStepResult {
		t.Helper()
		var out uiStepResult
		if err := uiTool(ctx, cs, "log_step", map[string]any{"agent_instance_id": sid, "step_description": text}, &out); err != nil {
			t.Fatal(err)
		}
		return out
	}
	const imgXSS = `<img src=x onerror=alert(1)>`
	const scriptXSS = `</script><script>alert(2)</script>`
	sid := step("", "Read the repository layout\nand the README").AgentInstanceID
	step(sid, imgXSS)

	b := uiStartBrowser(t, ctx, chrome)
	// An agent key may not read: the page says so and stays signed out.
	b.signIn(t, "sign in with an agent key", e.srv.URL, agent)
	b.waitJS(t, "the agent key refused", `document.getElementById('signin-error').textContent.includes('agent key')`)
	if uiEval[bool](t, b, `localStorage.getItem('agentline.key') !== null || !document.getElementById('inbox').hidden`) {
		t.Fatal("signed in with an agent key")
	}
	b.mu.Lock()
	b.problems = nil // the browser logs the 403 it just got, as it should
	b.mu.Unlock()

	b.do(t, "sign in",
		chromedp.Evaluate[chromedp.Void](`document.getElementById('key').value = ''`),
		chromedp.SendKeys(chromedp.CSS("#key"), person),
		chromedp.Click(chromedp.CSS("#signin-form button[type=submit]")),
		chromedp.WaitVisible(chromedp.CSS(`#sessions .session-button[data-session="`+sid+`"]`)),
	)
	b.waitJS(t, "the event stream", `document.getElementById('conn').textContent === 'live'`)
	if got := uiEval[string](t, b, `localStorage.getItem('agentline.key')`); got != person {
		t.Fatalf("the key is not remembered")
	}
	// A marker that a reload would wipe.
	uiEval[chromedp.Void](t, b, `window.uiNoReload = 1`)

	// A question asked over MCP shows up without a reload…
	type askResult struct {
		out struct {
			Answer *string `json:"answer"`
			Status string  `json:"status"`
		}
		err error
	}
	asked := make(chan askResult, 1)
	go func() {
		var r askResult
		r.err = uiTool(ctx, cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Deploy to production now?\nAll tests pass."}, &r.out)
		asked <- r
	}()
	b.do(t, "the question appears", chromedp.WaitVisible(chromedp.CSS("#questions .question textarea")))
	if got := uiEval[string](t, b, `document.querySelector('#questions .question .text').textContent`); got != "Deploy to production now?\nAll tests pass." {
		t.Fatalf("question shown as %q", got)
	}
	if uiEval[int](t, b, `window.uiNoReload || 0`) != 1 {
		t.Fatal("the page reloaded")
	}

	// …is answered through the page, and the waiting tool call returns it.
	answerBox := `#questions .question textarea`
	if label := uiEval[string](t, b, `document.querySelector('label[for="'+document.querySelector('`+answerBox+`').id+'"]').textContent`); label != "Answer" {
		t.Fatalf("answer box labelled %q", label)
	}
	sent := time.Now()
	b.do(t, "answer",
		chromedp.SendKeys(chromedp.CSS(answerBox), "Yes, deploy it"),
		chromedp.Click(chromedp.CSS("#questions .question button[type=submit]")),
	)
	select {
	case r := <-asked:
		if r.err != nil || r.out.Answer == nil || *r.out.Answer != "Yes, deploy it" || r.out.Status != "answered" {
			t.Fatalf("ask_question returned %+v, %v", r.out, r.err)
		}
		t.Logf("answer reached the agent %s after the click", time.Since(sent).Round(time.Millisecond))
	case <-time.After(10 * time.Second):
		t.Fatal("ask_question did not return the answer typed in the page")
	}
	b.do(t, "the question leaves the list", chromedp.WaitNotPresent(chromedp.CSS("#questions .question")))

	// The session's timeline: agent text is shown as text, including a step
	// that arrives while it is open.
	b.do(t, "open the session",
		chromedp.Click(chromedp.CSS(`#sessions .session-button[data-session="`+sid+`"]`)),
		chromedp.WaitVisible(chromedp.CSS("#timeline .entry")),
	)
	step(sid, scriptXSS)
	texts := `Array.from(document.querySelectorAll('#timeline .entry .text')).map(e => e.textContent)`
	b.waitJS(t, "both hostile steps as text", texts+`.includes(`+uiJS(imgXSS)+`) && `+texts+`.includes(`+uiJS(scriptXSS)+`)`)
	if n := uiEval[int](t, b, `document.querySelectorAll('#timeline img, #timeline script, body img').length`); n != 0 {
		t.Fatalf("agent text became %d elements", n)
	}
	if got := uiEval[[]string](t, b, texts); len(got) < 4 || got[0] != "Read the repository layout\nand the README" {
		t.Fatalf("timeline %q", got)
	}

	// A dropped stream reconnects with Last-Event-ID: a step logged while it
	// was down shows up once.
	e.srv.CloseClientConnections()
	b.waitJS(t, "the page to notice the drop", `document.getElementById('conn').textContent !== 'live'`)
	step(sid, "Step logged while the stream was down")
	b.waitJS(t, "the step from the drop", texts+`.filter(t => t === 'Step logged while the stream was down').length === 1`)
	b.waitJS(t, "the stream back", `document.getElementById('conn').textContent === 'live'`)
	b.mu.Lock()
	var streams []uiRequest
	for _, r := range b.requests {
		if strings.HasSuffix(r.url, "/api/v1/events") {
			streams = append(streams, r)
		}
	}
	b.mu.Unlock()
	if len(streams) < 2 || streams[0].headers["last-event-id"] != "" || streams[len(streams)-1].headers["last-event-id"] == "" {
		t.Fatalf("event stream requests: %+v; want a first one without Last-Event-ID and a reconnect with it", streams)
	}
	time.Sleep(200 * time.Millisecond)
	if n := uiEval[int](t, b, texts+`.filter(t => t === 'Step logged while the stream was down').length`); n != 1 {
		t.Fatalf("the step from the drop is shown %d times", n)
	}

	// Feedback through the page reaches the agent's next log_step.
	b.do(t, "send feedback",
		chromedp.SendKeys(chromedp.CSS("#feedback"), "Please add a test for the rollback"),
		chromedp.Click(chromedp.CSS("#feedback-form button[type=submit]")),
	)
	b.waitJS(t, "feedback sent", `document.getElementById('feedback-state').textContent.startsWith('Sent')`)
	if got := step(sid, "Added the rollback test").UserFeedback; len(got) != 1 || got[0] != "Please add a test for the rollback" {
		t.Fatalf("log_step feedback = %q", got)
	}
	b.waitJS(t, "the feedback in the timeline", texts+`.includes('Please add a test for the rollback')`)

	// End the session through the page.
	// It asks first (issue 12): Cancel keeps it running, Yes ends it.
	b.do(t, "end the session", chromedp.Click(chromedp.CSS("#end")), chromedp.WaitVisible(chromedp.CSS("#end-confirm")),
		chromedp.Click(chromedp.CSS("#end-cancel")))
	if uiEval[bool](t, b, `!document.getElementById('end-confirm').hidden`) {
		t.Fatal("Cancel did not close the confirmation")
	}
	b.do(t, "end the session", chromedp.Click(chromedp.CSS("#end")), chromedp.WaitVisible(chromedp.CSS("#end-confirm")),
		chromedp.Click(chromedp.CSS("#end-yes")))
	b.waitJS(t, "the session ended", `document.getElementById('end-state').textContent === 'Session ended.'`)
	b.waitJS(t, "the list shows it ended", `document.querySelector('#sessions .session-button[data-session="`+sid+`"] .status').textContent === 'ended'`)
	var status string
	if err := e.db.QueryRow(`SELECT status FROM agent_instances WHERE id = $1`, sid).Scan(&status); err != nil || status != statusCompleted {
		t.Fatalf("status %q, %v", status, err)
	}
	// An ended session offers no Feedback and no End (issue 12).
	if uiEval[bool](t, b, `!document.getElementById('feedback-form').hidden || !document.getElementById('end-box').hidden`) {
		t.Fatal("an ended session still shows Feedback or End session")
	}

	// Signing out forgets the key.
	b.do(t, "sign out", chromedp.Click(chromedp.CSS("#signout")), chromedp.WaitVisible(chromedp.CSS("#key")))
	if uiEval[bool](t, b, `localStorage.getItem('agentline.key') !== null`) {
		t.Fatal("the key is still stored after Sign out")
	}

	// The key only ever travels in a header, and nothing comes from another host.
	for _, r := range b.requests {
		if strings.Contains(r.url, person) || strings.Contains(r.url, agent) || !strings.HasPrefix(r.url, e.srv.URL+"/") && !strings.HasPrefix(r.url, "data:") {
			t.Errorf("request to %s", r.url)
		}
		if auth := r.headers["authorization"]; strings.Contains(r.url, "/api/") && auth != "Bearer "+person && auth != "Bearer "+agent {
			t.Errorf("API request without the key in its header: %s", r.url)
		}
	}
	if n := b.dialogs.Load(); n != 0 {
		t.Fatalf("%d JavaScript dialogs opened: agent text ran as code", n)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.problems) > 0 {
		t.Fatalf("the page reported problems:\n%s", strings.Join(b.problems, "\n"))
	}
}

// uiJS quotes s as a JavaScript string literal.
func uiJS(s string) string {
	q, _ := json.Marshal(s)
	return string(q)
}

// TestBrowserScreenshots writes docs/inbox-desktop.png (1280 wide) and
// docs/inbox-phone.png (375 wide) for the README. It runs only with
// UPDATE_SCREENSHOTS=1, so a normal test run never changes the tree.
func TestBrowserScreenshots(t *testing.T) {
	if os.Getenv("UPDATE_SCREENSHOTS") != "1" {
		t.Skip("set UPDATE_SCREENSHOTS=1 to rewrite the screenshots in docs/")
	}
	chrome := uiChromium(t)
	e := newTestEnv(t)
	person := e.mustKey(t, "me@example.com", scopePerson)
	agent := e.mustKey(t, "me@example.com", scopeAgent)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	msg := func(sid, agentType, content string, asks bool) {
		t.Helper()
		code, body := e.call(t, "POST", "/api/v1/messages/agent", agent, map[string]any{
			"agent_instance_id": sid, "agent_type": agentType, "content": content, "requires_user_input": asks})
		if code != 200 {
			t.Fatalf("%d %s", code, body)
		}
	}
	// An older, finished session.
	done := newUUID()
	msg(done, "cursor", "Updated the changelog for v2.3.0", false)
	msg(done, "cursor", "Tagged v2.3.0 and pushed the tag", false)
	e.call(t, "POST", "/api/v1/sessions/end", agent, map[string]any{"agent_instance_id": done})
	// A running one.
	flaky := newUUID()
	msg(flaky, "cursor", "Reproduced the flaky TestLogin: it fails when two logins share a millisecond", false)
	msg(flaky, "cursor", "Replaced the timestamp with a sequence number; running the suite 50 times", false)
	// One that waits for an answer.
	pay := newUUID()
	msg(pay, "claude-code", "Read payments/service.go and its tests (42 tests, all passing)", false)
	msg(pay, "claude-code", "Split charge() into authorize() and capture(), so a failed capture can be retried", false)
	e.call(t, "POST", "/api/v1/messages/user", agent, map[string]any{"agent_instance_id": pay, "content": "Keep the public API unchanged, please.", "mark_as_read": false})
	msg(pay, "claude-code", "Kept charge() as a wrapper over the two new functions; ran the tests: 47 passed", false)
	msg(pay, "claude-code", "charge() is also called by the billing cron job. Should I move the cron job to authorize()/capture() now,\nor leave it on charge() until the next release?", true)
	// Spread the times out a little, as a real day would.
	for sid, ago := range map[string]string{done: "3 hours", flaky: "12 minutes", pay: "1 minute"} {
		if _, err := e.db.Exec(`UPDATE agent_instances SET last_activity_at = now() - $2::interval, started_at = now() - $2::interval - interval '20 minutes' WHERE id = $1`, sid, ago); err != nil {
			t.Fatal(err)
		}
		if _, err := e.db.Exec(`UPDATE messages SET created_at = now() - $2::interval - (interval '1 minute' * (100 - seq % 100)) / 10 WHERE agent_instance_id = $1`, sid, ago); err != nil {
			t.Fatal(err)
		}
	}

	b := uiStartBrowser(t, ctx, chrome)
	b.do(t, "sign in",
		chromedp.EmulateViewport(1280, 900),
		chromedp.Navigate(e.srv.URL+"/"),
		chromedp.WaitVisible(chromedp.CSS("#key")),
		chromedp.SendKeys(chromedp.CSS("#key"), person),
		chromedp.Click(chromedp.CSS("#signin-form button[type=submit]")),
		chromedp.WaitVisible(chromedp.CSS("#questions .question")),
		chromedp.Click(chromedp.CSS(`#sessions .session-button[data-session="`+pay+`"]`)),
		chromedp.WaitVisible(chromedp.CSS("#timeline .entry")),
	)
	b.waitJS(t, "the stream", `document.getElementById('conn').textContent === 'live'`)
	uiShot(t, b, filepath.Join("docs", "inbox-desktop.png"))

	b.do(t, "phone", chromedp.EmulateViewport(375, 812, chromedp.EmulateMobile), chromedp.Click(chromedp.CSS("#back")),
		chromedp.WaitVisible(chromedp.CSS("#sessions .session-button")))
	uiShot(t, b, filepath.Join("docs", "inbox-phone.png"))
}

func uiShot(t *testing.T, b *uiBrowser, path string) {
	t.Helper()
	time.Sleep(300 * time.Millisecond) // let layout settle after the last event
	png, err := chromedp.Run(b.ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %s (%d bytes)", path, len(png))
}
