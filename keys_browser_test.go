package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// TestBrowserKeys: the inbox's Keys panel lists the user's keys, shows a
// hostile key name as text, and its Revoke button cuts an agent key off.
func TestBrowserKeys(t *testing.T) {
	chrome := uiChromium(t)
	e := newTestEnv(t)
	person := e.mustKey(t, "me@example.com", scopePerson)
	const hostile = `<img src=x onerror=alert(1)>`
	agent, err := issueKey(context.Background(), e.a.store, e.signer, "me@example.com", hostile, scopeAgent, 0)
	if err != nil {
		t.Fatal(err)
	}
	if code := authAgentMessage(t, e, agent); code != 200 {
		t.Fatalf("agent key: %d", code)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	b := uiStartBrowser(t, ctx, chrome)
	b.signIn(t, "sign in", e.srv.URL, person,
		chromedp.WaitVisible(chromedp.CSS("#keys-box summary")),
		chromedp.Click(chromedp.CSS("#keys-box summary")),
	)
	b.waitJS(t, "two keys listed", `document.querySelectorAll('#keys .key').length === 2`)
	names := `Array.from(document.querySelectorAll('#keys .key .agent')).map(e => e.textContent)`
	if got := uiEval[[]string](t, b, names); !strings.Contains(strings.Join(got, "|"), hostile) {
		t.Fatalf("key names shown as %q", got)
	}
	if n := uiEval[int](t, b, `document.querySelectorAll('#keys img').length`); n != 0 {
		t.Fatalf("a key name became markup")
	}
	var agentID string
	if err := e.db.QueryRow(`SELECT id FROM api_keys WHERE api_key_hash = $1`, hashToken(agent)).Scan(&agentID); err != nil {
		t.Fatal(err)
	}
	uiEval[chromedp.Void](t, b, `window.confirm = () => true`) // the test's "OK"
	b.do(t, "revoke the agent key", chromedp.Click(chromedp.CSS(`#keys .key[data-key="`+agentID+`"] button.danger`)))
	b.waitJS(t, "the key shown revoked", `document.querySelector('#keys .key[data-key="`+agentID+`"]').classList.contains('revoked')`)
	if code := authAgentMessage(t, e, agent); code != 401 {
		t.Fatalf("the revoked agent key still works: %d", code)
	}
	if n := b.dialogs.Load(); n != 0 {
		t.Fatalf("%d JavaScript dialogs opened", n)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.problems) > 0 {
		t.Fatalf("the page reported problems:\n%s", strings.Join(b.problems, "\n"))
	}
}
