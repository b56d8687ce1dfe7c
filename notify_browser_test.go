package main

// The Notifications panel of the inbox page in headless Chromium (see
// browser_test.go for the harness): add an ntfy channel pointing at a real
// receiver, send a test, see its status; add a webhook and see its secret
// once; follow a notification's deep link; remove a channel.

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

func TestBrowserNotifications(t *testing.T) {
	chrome := uiChromium(t)
	e := newTestEnv(t)
	person := e.mustKey(t, "panel@example.com", scopePerson)
	agent := e.mustKey(t, "panel@example.com", scopeAgent)
	rc := newReceiver(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	b := uiStartBrowser(t, ctx, chrome)
	b.signIn(t, "sign in", e.srv.URL, person,
		chromedp.WaitVisible(chromedp.CSS("#channels-toggle")),
		chromedp.Click(chromedp.CSS("#channels-toggle")),
		chromedp.WaitVisible(chromedp.CSS("#channel-form")),
	)
	b.waitJS(t, "the empty list", `!document.getElementById('no-channels').hidden`)

	// An ntfy topic with a token.
	b.do(t, "add an ntfy channel",
		chromedp.SendKeys(chromedp.CSS("#channel-url"), rc.URL+"/phone-topic"),
		chromedp.SendKeys(chromedp.CSS("#channel-token"), "tk_paneltoken"),
		chromedp.Click(chromedp.CSS("#channel-form button[type=submit]")),
		chromedp.WaitVisible(chromedp.CSS("#channel-list .channel")),
	)
	if got := uiEval[string](t, b, `document.querySelector('#channel-list .channel .url').textContent`); got != rc.URL+"/phone-topic" {
		t.Fatalf("channel shown with URL %q", got)
	}
	if !uiEval[bool](t, b, `document.getElementById('channel-secret-box').hidden`) {
		t.Error("an ntfy channel showed a secret")
	}
	b.do(t, "send a test", chromedp.Click(chromedp.CSS("#channel-list .channel button.quiet")))
	b.waitJS(t, "the test result", `document.querySelector('#channel-list .channel .test-result').textContent === 'Delivered (HTTP 200)'`)
	b.waitJS(t, "the status line", `document.querySelector('#channel-list .channel .status-line').textContent.startsWith('last delivered')`)
	if r := rc.requests(); len(r) != 1 || r[0].header.Get("Title") != "agentline test" || r[0].header.Get("Authorization") != "Bearer tk_paneltoken" {
		t.Fatalf("the receiver got %d requests: %+v", len(r), r)
	}

	// A webhook: its secret is shown once.
	b.do(t, "add a webhook",
		chromedp.Click(chromedp.CSS(`input[name="channel-kind"][value="webhook"]`)),
		chromedp.Click(chromedp.CSS(`input[name="channel-event"][value="session.ended"]`)),
		chromedp.SendKeys(chromedp.CSS("#channel-url"), rc.URL+"/hook"),
		chromedp.Click(chromedp.CSS("#channel-form button[type=submit]")),
		chromedp.WaitVisible(chromedp.CSS("#channel-secret-box")),
	)
	if s := uiEval[string](t, b, `document.getElementById('channel-secret').textContent`); !strings.HasPrefix(s, "whsec_") {
		t.Fatalf("secret shown as %q", s)
	}
	b.waitJS(t, "two channels", `document.querySelectorAll('#channel-list .channel').length === 2`)
	if got := uiEval[string](t, b, `document.querySelectorAll('#channel-list .channel')[1].textContent`); !strings.Contains(got, "questions, ended sessions") {
		t.Errorf("webhook channel shows %q", got)
	}
	if uiEval[bool](t, b, `document.body.textContent.includes('tk_paneltoken')`) {
		t.Error("the token is on the page")
	}
	if dir := os.Getenv("UPDATE_SCREENSHOTS"); dir != "" {
		uiShot(t, b, filepath.Join("docs", "notifications.png"))
	}

	// A notification's link opens its question's session.
	session := newUUID()
	qid := mustAsk(t, e, agent, session, "Ship the release?")
	b.do(t, "the question appears", chromedp.WaitVisible(chromedp.CSS("#questions .question")))
	uiEval[chromedp.Void](t, b, `location.hash = '#/questions/`+qid+`'`) // as a click on the notification would
	b.waitJS(t, "the session open", `!document.getElementById('detail-body').hidden && document.getElementById('detail-title').textContent.endsWith(`+uiJS(session[:8])+`)`)
	b.waitJS(t, "the link consumed", `location.hash === ''`)

	// Remove the ntfy channel.
	b.do(t, "remove", chromedp.Click(chromedp.CSS("#channel-list .channel button.danger")))
	b.waitJS(t, "one channel left", `document.querySelectorAll('#channel-list .channel').length === 1`)
	code, body := e.call(t, "GET", "/api/v1/notification-channels", person, nil)
	if code != http.StatusOK || strings.Contains(string(body), "phone-topic") {
		t.Errorf("after remove: %d %s", code, body)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.problems) > 0 || b.dialogs.Load() > 0 {
		t.Errorf("page problems: %v, dialogs: %d", b.problems, b.dialogs.Load())
	}
}
