package main

// Tests of outgoing notifications (issue 11): real receivers on loopback,
// the real outbox worker, the real database.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"
)

// notifyReq is one request a receiver got.
type notifyReq struct {
	header http.Header
	body   []byte
	at     time.Time
	status int // what the receiver answered (0 while it has not)
}

// receiver is an HTTP receiver on loopback that records every request.
// respond decides the answer to the i-th request (from 0); nil answers 200.
type receiver struct {
	*httptest.Server
	mu      sync.Mutex
	reqs    []notifyReq
	respond func(i int, r *http.Request) (int, http.Header)
}

func newReceiver(t testing.TB, respond func(i int, r *http.Request) (int, http.Header)) *receiver {
	t.Helper()
	rc := &receiver{respond: respond}
	rc.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		rc.mu.Lock()
		i := len(rc.reqs)
		rc.reqs = append(rc.reqs, notifyReq{header: r.Header.Clone(), body: body, at: time.Now()})
		rc.mu.Unlock()
		status, hdr := http.StatusOK, http.Header(nil)
		if rc.respond != nil {
			status, hdr = rc.respond(i, r)
		}
		for k, v := range hdr {
			w.Header()[k] = v
		}
		w.WriteHeader(status)
		io.WriteString(w, "a body agentline must never keep")
		rc.mu.Lock()
		rc.reqs[i].status = status
		rc.mu.Unlock()
	}))
	t.Cleanup(rc.Close)
	return rc
}

func (rc *receiver) requests() []notifyReq {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return append([]notifyReq(nil), rc.reqs...)
}

func (rc *receiver) count() int {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return len(rc.reqs)
}

// notifyWaitFor polls cond until it holds or limit passes.
func notifyWaitFor(t testing.TB, what string, limit time.Duration, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(limit); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", limit, what)
		}
	}
}

// withNotifier adjusts the test app's notifier before it starts.
func withNotifier(f func(n *notifier)) envOption {
	return func(a *app) { f(a.notify) }
}

// fastRetries makes retries come within milliseconds.
func fastRetries(n *notifier) {
	n.retryMin, n.retryMax = 20*time.Millisecond, 100*time.Millisecond
}

// mustChannel makes a channel through the API and returns its id and (for a
// webhook) its secret.
func mustChannel(t testing.TB, e *testEnv, key string, body map[string]any) (id, secret string) {
	t.Helper()
	code, b := e.call(t, "POST", "/api/v1/notification-channels", key, body)
	if code != http.StatusCreated {
		t.Fatalf("create channel: %d %s", code, b)
	}
	m := mustJSON(t, b)
	id, _ = m["id"].(string)
	secret, _ = m["secret"].(string)
	return id, secret
}

// mustAsk posts a question over REST and returns its message id.
func mustAsk(t testing.TB, e *testEnv, key, session, text string) string {
	t.Helper()
	code, b := e.call(t, "POST", "/api/v1/messages/agent", key, map[string]any{
		"agent_instance_id": session, "agent_type": "claude-code", "content": text, "requires_user_input": true})
	if code != http.StatusOK {
		t.Fatalf("ask: %d %s\nlog:\n%s", code, b, e.logs.String())
	}
	return mustJSON(t, b)["message_id"].(string)
}

// deliveryRow is a delivery's state in the database.
func deliveryRow(t testing.TB, e *testEnv, channelID string) (status string, attempts int, lastErr string) {
	t.Helper()
	var le *string
	err := e.db.QueryRow(`SELECT status, attempts, last_error FROM notification_deliveries
		WHERE channel_id = $1 ORDER BY created_at DESC LIMIT 1`, channelID).Scan(&status, &attempts, &le)
	if err != nil {
		t.Fatal(err)
	}
	if le != nil {
		lastErr = *le
	}
	return status, attempts, lastErr
}

// TestNotifyNtfy: a question reaches an ntfy receiver with ntfy's headers,
// the access token, a deep link to the question and the text cut at 4,000
// bytes; a plain step notifies nobody.
func TestNotifyNtfy(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	person, agent := e.mustKey(t, "n@example.com", scopePerson), e.mustKey(t, "n@example.com", scopeAgent)
	rc := newReceiver(t, nil)
	mustChannel(t, e, person, map[string]any{"kind": "ntfy", "url": rc.URL + "/agentline-topic", "token": "tk_secret123"})
	session := newUUID()
	if code, b := e.call(t, "POST", "/api/v1/messages/agent", agent, map[string]any{
		"agent_instance_id": session, "agent_type": "Claude-Code", "content": "a plain step"}); code != 200 {
		t.Fatalf("step: %d %s", code, b)
	}
	qid := mustAsk(t, e, agent, session, "Deploy to production now?")
	notifyWaitFor(t, "the ntfy request", 10*time.Second, func() bool { return rc.count() >= 1 })
	r := rc.requests()[0]
	want := map[string]string{
		"Title": "claude-code asks", "Priority": "high", "Tags": "question",
		"Click": "http://inbox.test/#/questions/" + qid, "Authorization": "Bearer tk_secret123",
	}
	for k, v := range want {
		if got := r.header.Get(k); got != v {
			t.Errorf("header %s = %q, want %q", k, got, v)
		}
	}
	if string(r.body) != "Deploy to production now?" {
		t.Errorf("body %q", r.body)
	}
	// The deep link's id is the read API's open_question.id.
	_, b := e.call(t, "GET", "/api/v1/sessions", person, nil)
	if !strings.Contains(string(b), `"open_question":{"id":"`+qid+`"`) {
		t.Errorf("open_question.id is not %s: %s", qid, b)
	}

	long := strings.Repeat("é", 3000) // 6,000 bytes
	mustAsk(t, e, agent, session, long)
	notifyWaitFor(t, "the second request", 10*time.Second, func() bool { return rc.count() >= 2 })
	body := rc.requests()[1].body
	if len(body) != 4000 || string(body) != long[:4000] {
		t.Errorf("long text: %d bytes, want the first 4,000", len(body))
	}
	time.Sleep(200 * time.Millisecond)
	if n := rc.count(); n != 2 {
		t.Errorf("%d requests, want 2 (the step must not notify)", n)
	}
}

// TestNotifyWebhook: question.asked, message.flagged and session.ended
// reach a webhook receiver, signed so that the Standard Webhooks library
// verifies them; the body has the documented fields; ending a session twice
// notifies once.
func TestNotifyWebhook(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	person, agent := e.mustKey(t, "w@example.com", scopePerson), e.mustKey(t, "w@example.com", scopeAgent)
	rc := newReceiver(t, nil)
	_, secret := mustChannel(t, e, person, map[string]any{"kind": "webhook", "url": rc.URL + "/hook",
		"events": []string{"question.asked", "session.ended", "message.flagged"}})
	if !strings.HasPrefix(secret, "whsec_") || len(secret) < len("whsec_")+32 {
		t.Fatalf("secret %q", secret)
	}
	wh, err := standardwebhooks.NewWebhook(secret)
	if err != nil {
		t.Fatal(err)
	}
	session := newUUID()
	qid := mustAsk(t, e, agent, session, "Which branch?")
	code, b := e.call(t, "POST", "/api/v1/messages/agent", agent, map[string]any{
		"agent_instance_id": session, "content": "Tests are red", "send_push": true})
	if code != 200 {
		t.Fatalf("flagged: %d %s", code, b)
	}
	mid := mustJSON(t, b)["message_id"].(string)
	for range 2 {
		if code, b := e.call(t, "POST", "/api/v1/sessions/end", agent, map[string]any{"agent_instance_id": session}); code != 200 {
			t.Fatalf("end: %d %s", code, b)
		}
	}
	notifyWaitFor(t, "three webhooks", 10*time.Second, func() bool { return rc.count() >= 3 })
	time.Sleep(300 * time.Millisecond)
	reqs := rc.requests()
	if len(reqs) != 3 {
		t.Fatalf("%d requests, want 3", len(reqs))
	}
	byType := map[string]map[string]any{}
	for _, r := range reqs {
		if err := wh.Verify(r.body, r.header); err != nil {
			t.Errorf("signature: %v", err)
		}
		if ct := r.header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("content type %q", ct)
		}
		var ev struct {
			Type      string         `json:"type"`
			Timestamp string         `json:"timestamp"`
			Data      map[string]any `json:"data"`
		}
		if err := json.Unmarshal(r.body, &ev); err != nil {
			t.Fatal(err)
		}
		if _, err := time.Parse(time.RFC3339Nano, ev.Timestamp); err != nil {
			t.Errorf("timestamp %q", ev.Timestamp)
		}
		byType[ev.Type] = ev.Data
	}
	q := byType["question.asked"]
	if q == nil || q["question_id"] != qid || q["session_id"] != session || q["agent_type"] != "claude-code" ||
		q["text"] != "Which branch?" || q["inbox_url"] != "http://inbox.test/#/questions/"+qid {
		t.Errorf("question.asked data: %v", q)
	}
	if f := byType["message.flagged"]; f == nil || f["message_id"] != mid || f["text"] != "Tests are red" {
		t.Errorf("message.flagged data: %v", f)
	}
	if s := byType["session.ended"]; s == nil || s["session_id"] != session {
		t.Errorf("session.ended data: %v", s)
	}
	// A tampered body fails the library's check: the check is real.
	if err := wh.Verify(append(reqs[0].body, ' '), reqs[0].header); err == nil {
		t.Error("a tampered body verified")
	}
}

// TestNotifyRetryThenSuccess: two 500s, then a 200: three attempts with the
// same webhook-id, then sent; the channel shows the delivery.
func TestNotifyRetryThenSuccess(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, withNotifier(fastRetries))
	person, agent := e.mustKey(t, "r@example.com", scopePerson), e.mustKey(t, "r@example.com", scopeAgent)
	rc := newReceiver(t, func(i int, r *http.Request) (int, http.Header) {
		if i < 2 {
			return http.StatusInternalServerError, nil
		}
		return http.StatusOK, nil
	})
	ch, _ := mustChannel(t, e, person, map[string]any{"kind": "webhook", "url": rc.URL})
	mustAsk(t, e, agent, newUUID(), "retry me")
	notifyWaitFor(t, "the delivery to be sent", 10*time.Second, func() bool {
		st, _, _ := deliveryRow(t, e, ch)
		return st == "sent"
	})
	reqs := rc.requests()
	if len(reqs) != 3 {
		t.Fatalf("%d requests, want 3", len(reqs))
	}
	for _, r := range reqs[1:] {
		if r.header.Get("webhook-id") != reqs[0].header.Get("webhook-id") {
			t.Errorf("webhook-id changed on retry: %q then %q", reqs[0].header.Get("webhook-id"), r.header.Get("webhook-id"))
		}
	}
	if _, attempts, _ := deliveryRow(t, e, ch); attempts != 3 {
		t.Errorf("attempts %d, want 3", attempts)
	}
	_, b := e.call(t, "GET", "/api/v1/notification-channels", person, nil)
	c := mustJSON(t, b)["channels"].([]any)[0].(map[string]any)
	if c["last_delivery_at"] == nil || c["last_error"] != nil || c["failures"] != 0.0 {
		t.Errorf("channel after success: %v", c)
	}
}

// TestNotifyRetryAfter: a 429 with Retry-After: 1 delays the next attempt
// by a second, though the backoff alone would retry within milliseconds.
func TestNotifyRetryAfter(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, withNotifier(fastRetries))
	person, agent := e.mustKey(t, "ra@example.com", scopePerson), e.mustKey(t, "ra@example.com", scopeAgent)
	rc := newReceiver(t, func(i int, r *http.Request) (int, http.Header) {
		if i == 0 {
			return http.StatusTooManyRequests, http.Header{"Retry-After": {"1"}}
		}
		return http.StatusOK, nil
	})
	ch, _ := mustChannel(t, e, person, map[string]any{"kind": "ntfy", "url": rc.URL + "/t"})
	mustAsk(t, e, agent, newUUID(), "slow down")
	notifyWaitFor(t, "the delivery to be sent", 10*time.Second, func() bool {
		st, _, _ := deliveryRow(t, e, ch)
		return st == "sent"
	})
	reqs := rc.requests()
	if len(reqs) != 2 {
		t.Fatalf("%d requests, want 2", len(reqs))
	}
	if gap := reqs[1].at.Sub(reqs[0].at); gap < 950*time.Millisecond {
		t.Errorf("retried after %v, before Retry-After's second", gap)
	}
}

// TestNotifyPermanentFailure: a 410 is not retried; the delivery and the
// channel show the short error, never the receiver's body.
func TestNotifyPermanentFailure(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, withNotifier(fastRetries))
	person, agent := e.mustKey(t, "p@example.com", scopePerson), e.mustKey(t, "p@example.com", scopeAgent)
	rc := newReceiver(t, func(int, *http.Request) (int, http.Header) { return http.StatusGone, nil })
	ch, _ := mustChannel(t, e, person, map[string]any{"kind": "webhook", "url": rc.URL})
	mustAsk(t, e, agent, newUUID(), "gone?")
	notifyWaitFor(t, "the delivery to fail", 10*time.Second, func() bool {
		st, _, _ := deliveryRow(t, e, ch)
		return st == "failed"
	})
	time.Sleep(300 * time.Millisecond) // retries would come within milliseconds
	if n := rc.count(); n != 1 {
		t.Errorf("%d requests, want 1", n)
	}
	if _, _, le := deliveryRow(t, e, ch); le != "HTTP 410" {
		t.Errorf("last_error %q", le)
	}
	_, b := e.call(t, "GET", "/api/v1/notification-channels", person, nil)
	if !strings.Contains(string(b), `"last_error":"HTTP 410"`) || strings.Contains(string(b), "never keep") {
		t.Errorf("channel list: %s", b)
	}
}

// TestNotifyGiveUp: a receiver that always answers 503 is retried until
// the give-up limit, then the delivery fails and attempts stop.
func TestNotifyGiveUp(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, withNotifier(func(n *notifier) {
		fastRetries(n)
		n.giveUp = time.Second
	}))
	person, agent := e.mustKey(t, "g@example.com", scopePerson), e.mustKey(t, "g@example.com", scopeAgent)
	rc := newReceiver(t, func(int, *http.Request) (int, http.Header) { return http.StatusServiceUnavailable, nil })
	ch, _ := mustChannel(t, e, person, map[string]any{"kind": "webhook", "url": rc.URL})
	mustAsk(t, e, agent, newUUID(), "anyone?")
	notifyWaitFor(t, "the delivery to be given up", 10*time.Second, func() bool {
		st, _, _ := deliveryRow(t, e, ch)
		return st == "failed"
	})
	n := rc.count()
	if n < 2 {
		t.Errorf("only %d attempt before giving up: no retry", n)
	}
	if _, _, le := deliveryRow(t, e, ch); le != "gave up: HTTP 503" {
		t.Errorf("last_error %q", le)
	}
	time.Sleep(300 * time.Millisecond)
	if rc.count() != n {
		t.Errorf("attempts went on after giving up")
	}
}

// TestNotifyOncePerQuestion: a resumed re-ask (ask_question called again
// with the same text) stores no message and notifies nobody again.
func TestNotifyOncePerQuestion(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	person, agent := e.mustKey(t, "o@example.com", scopePerson), e.mustKey(t, "o@example.com", scopeAgent)
	rc := newReceiver(t, nil)
	ch, _ := mustChannel(t, e, person, map[string]any{"kind": "webhook", "url": rc.URL})
	session := newUUID()
	if code, b := e.call(t, "POST", "/api/v1/messages/agent", agent, map[string]any{
		"agent_instance_id": session, "agent_type": "codex", "content": "start"}); code != 200 {
		t.Fatalf("step: %d %s", code, b)
	}
	userID := e.mustUserID(t, "o@example.com")
	ctx := context.Background()
	q1, err := e.a.store.askQuestion(ctx, userID, session, "Merge it?", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	notifyWaitFor(t, "the notification", 10*time.Second, func() bool { return rc.count() >= 1 })
	q2, err := e.a.store.askQuestion(ctx, userID, session, "Merge it?", time.Hour)
	if err != nil || !q2.Resumed || q2.ID != q1.ID {
		t.Fatalf("second ask: %+v %v, want a resume of %s", q2, err, q1.ID)
	}
	time.Sleep(300 * time.Millisecond)
	if n := rc.count(); n != 1 {
		t.Errorf("%d notifications, want 1", n)
	}
	var rows int
	e.db.QueryRow(`SELECT count(*) FROM notification_deliveries WHERE channel_id = $1`, ch).Scan(&rows)
	if rows != 1 {
		t.Errorf("%d delivery rows, want 1", rows)
	}
	// The same event written twice (a retried transaction) is still one row.
	tx, _ := e.db.Begin()
	if err := enqueueNotification(ctx, tx, userID, session, eventQuestionAsked, q1.ID); err != nil {
		t.Fatal(err)
	}
	tx.Commit()
	e.db.QueryRow(`SELECT count(*) FROM notification_deliveries WHERE channel_id = $1`, ch).Scan(&rows)
	if rows != 1 {
		t.Errorf("%d delivery rows after a second enqueue, want 1", rows)
	}
}

// TestNotifyRolledBack: a question whose transaction rolls back leaves no
// notification.
func TestNotifyRolledBack(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	person, agent := e.mustKey(t, "rb@example.com", scopePerson), e.mustKey(t, "rb@example.com", scopeAgent)
	rc := newReceiver(t, nil)
	mustChannel(t, e, person, map[string]any{"kind": "webhook", "url": rc.URL})
	session := newUUID()
	if code, b := e.call(t, "POST", "/api/v1/messages/agent", agent, map[string]any{
		"agent_instance_id": session, "agent_type": "codex", "content": "start"}); code != 200 {
		t.Fatalf("step: %d %s", code, b)
	}
	userID := e.mustUserID(t, "rb@example.com")
	tx, err := e.db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := insertAgentMessage(context.Background(), tx, userID, agentMessage{SessionID: session, Content: "never", RequiresUserInput: true}, false); err != nil {
		t.Fatal(err)
	}
	tx.Rollback()
	time.Sleep(300 * time.Millisecond)
	var n int
	e.db.QueryRow(`SELECT count(*) FROM notification_events`).Scan(&n)
	if n != 0 || rc.count() != 0 {
		t.Errorf("%d events, %d requests after a rollback", n, rc.count())
	}
}

// TestNotifyBurstFolded: 100 questions committed at once reach a channel as
// 30 notifications and one "70 more waiting" summary at the window's end.
func TestNotifyBurstFolded(t *testing.T) {
	t.Parallel()
	const window = 4 * time.Second
	e := newTestEnv(t, withNotifier(func(n *notifier) { n.limits.window = window }))
	person, agent := e.mustKey(t, "b@example.com", scopePerson), e.mustKey(t, "b@example.com", scopeAgent)
	rc := newReceiver(t, nil)
	_, secret := mustChannel(t, e, person, map[string]any{"kind": "webhook", "url": rc.URL})
	wh, _ := standardwebhooks.NewWebhook(secret)
	session := newUUID()
	if code, b := e.call(t, "POST", "/api/v1/messages/agent", agent, map[string]any{
		"agent_instance_id": session, "agent_type": "codex", "content": "start"}); code != 200 {
		t.Fatalf("step: %d %s", code, b)
	}
	// The burst: 100 questions committed at once, in one transaction.
	userID := e.mustUserID(t, "b@example.com")
	tx, err := e.db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	for i := range 100 {
		if _, _, err := insertAgentMessage(context.Background(), tx, userID, agentMessage{
			SessionID: session, Content: fmt.Sprintf("question %d", i), RequiresUserInput: true}, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	notifyWaitFor(t, "the summary", 3*window, func() bool { return rc.count() >= 31 })
	time.Sleep(500 * time.Millisecond)
	reqs := rc.requests()
	var questions, summaries int
	for _, r := range reqs {
		if err := wh.Verify(r.body, r.header); err != nil {
			t.Errorf("signature: %v", err)
		}
		var ev struct {
			Type string         `json:"type"`
			Data map[string]any `json:"data"`
		}
		json.Unmarshal(r.body, &ev)
		switch ev.Type {
		case "question.asked":
			questions++
			if r.at.Sub(reqs[0].at) >= window {
				t.Errorf("a question notification %v after the first: past the window", r.at.Sub(reqs[0].at))
			}
		case "summary":
			summaries++
			if d := r.at.Sub(reqs[0].at); d < window-200*time.Millisecond {
				t.Errorf("the summary came %v after the first notification, before the window's end", d)
			}
			if ev.Data["count"] != 70.0 || !strings.Contains(fmt.Sprint(ev.Data["text"]), "70 more") {
				t.Errorf("summary data: %v", ev.Data)
			}
		}
	}
	if questions != 30 || summaries != 1 || len(reqs) != 31 {
		t.Errorf("%d requests: %d questions and %d summaries, want 30 and 1", len(reqs), questions, summaries)
	}
	var folded int
	e.db.QueryRow(`SELECT count(*) FROM notification_deliveries WHERE status = 'folded'`).Scan(&folded)
	if folded != 70 {
		t.Errorf("%d folded rows, want 70", folded)
	}
}

// TestNotifyBlockedAddr: the address rules, one case each.
func TestNotifyBlockedAddr(t *testing.T) {
	for addr, want := range map[string]string{
		"127.0.0.1": "loopback", "::1": "loopback", "::ffff:127.0.0.1": "loopback",
		"10.0.0.1": "private", "172.16.5.4": "private", "192.168.1.1": "private", "fd00::1": "private", "100.64.0.1": "private",
		"169.254.169.254": "link-local", "fe80::1": "link-local",
		"0.0.0.0": "unspecified", "::": "unspecified", "0.1.2.3": "unspecified",
		"224.0.0.1": "multicast", "ff02::1": "multicast", "255.255.255.255": "multicast",
		"64:ff9b::a00:1": "private",
		"1.1.1.1":        "", "2606:4700::1111": "", "93.184.216.34": "",
	} {
		if got := blockedAddr(netip.MustParseAddr(addr)); got != want {
			t.Errorf("%s: %q, want %q", addr, got, want)
		}
	}
}

// TestNotifySSRF: without NOTIFY_ALLOW_PRIVATE, literal private addresses
// are refused when the channel is made, and every dial to one is refused,
// whatever the URL named: a name resolving to loopback ("localhost") and
// rows that bypassed the creation check. 10.0.0.1 and 169.254.169.254 are
// refused in the dialer's Control hook, before any packet leaves.
func TestNotifySSRF(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, withNotifier(func(n *notifier) { n.allowPrivate = false }))
	person, agent := e.mustKey(t, "s@example.com", scopePerson), e.mustKey(t, "s@example.com", scopeAgent)
	for _, u := range []string{
		"http://127.0.0.1:9/x", "http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data/",
		"http://[::1]:9/", "http://[::ffff:127.0.0.1]/", "https://192.168.0.10/", "http://0.0.0.0:80/",
	} {
		code, b := e.call(t, "POST", "/api/v1/notification-channels", person, map[string]any{"kind": "webhook", "url": u})
		if code != http.StatusBadRequest || !strings.Contains(string(b), "NOTIFY_ALLOW_PRIVATE") {
			t.Errorf("%s: %d %s, want a 400 naming NOTIFY_ALLOW_PRIVATE", u, code, b)
		}
	}
	rc := newReceiver(t, nil)
	port := rc.URL[strings.LastIndex(rc.URL, ":")+1:]
	local, _ := mustChannel(t, e, person, map[string]any{"kind": "ntfy", "url": "http://localhost:" + port + "/topic"})
	// Rows that skipped the creation check, as a URL whose name later
	// resolves to these addresses would.
	userID := e.mustUserID(t, "s@example.com")
	var private, metadata string
	for _, c := range []struct {
		url string
		id  *string
	}{{"http://10.0.0.1:9/hook", &private}, {"http://169.254.169.254/latest/meta-data/", &metadata}} {
		if err := e.db.QueryRow(`INSERT INTO notification_channels (user_id, kind, url, secret, events)
			VALUES ($1, 'webhook', $2, $3, '{question.asked}') RETURNING id`, userID, c.url, newWebhookSecret()).Scan(c.id); err != nil {
			t.Fatal(err)
		}
	}
	mustAsk(t, e, agent, newUUID(), "reach inside?")
	for id, want := range map[string]string{
		local:    "refused: 127.0.0.1 is a loopback address",
		private:  "refused: 10.0.0.1 is a private address",
		metadata: "refused: 169.254.169.254 is a link-local address",
	} {
		notifyWaitFor(t, "the delivery to fail", 10*time.Second, func() bool {
			st, _, _ := deliveryRow(t, e, id)
			return st == "failed"
		})
		if _, attempts, le := deliveryRow(t, e, id); !strings.HasPrefix(le, want) || attempts != 1 {
			t.Errorf("delivery: %d attempts, last_error %q, want one attempt and %q", attempts, le, want)
		}
	}
	code, b := e.call(t, "POST", "/api/v1/notification-channels/"+local+"/test", person, nil)
	if code != 200 || !strings.Contains(string(b), `"delivered":false`) || !strings.Contains(string(b), "loopback") {
		t.Errorf("test of the localhost channel: %d %s", code, b)
	}
	if n := rc.count(); n != 0 {
		t.Errorf("the loopback receiver got %d requests", n)
	}
}

// TestNotifyChannelsAPI: the person API's rules: agent keys 403, another
// user's channel 404, bad input 400, the secret shown once.
func TestNotifyChannelsAPI(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	alice, bob := e.mustKey(t, "alice@example.com", scopePerson), e.mustKey(t, "bob@example.com", scopePerson)
	agent := e.mustKey(t, "alice@example.com", scopeAgent)
	rc := newReceiver(t, nil)
	id, secret := mustChannel(t, e, alice, map[string]any{"kind": "webhook", "url": rc.URL + "/h", "events": []string{"session.ended", "question.asked", "question.asked"}})
	ntfyID, noSecret := mustChannel(t, e, alice, map[string]any{"kind": "ntfy", "url": rc.URL + "/t", "token": "tk_abc"})
	if secret == "" || noSecret != "" {
		t.Fatalf("secrets: webhook %q, ntfy %q", secret, noSecret)
	}
	code, b := e.call(t, "GET", "/api/v1/notification-channels", alice, nil)
	if code != 200 || strings.Contains(string(b), "whsec_") || strings.Contains(string(b), "tk_abc") {
		t.Fatalf("list: %d %s", code, b)
	}
	chans := mustJSON(t, b)["channels"].([]any)
	if len(chans) != 2 || fmt.Sprint(chans[0].(map[string]any)["events"]) != "[session.ended question.asked]" {
		t.Errorf("channels: %v", chans)
	}
	if _, b := e.call(t, "GET", "/api/v1/notification-channels", bob, nil); string(b) != "{\"channels\":[]}\n" {
		t.Errorf("bob sees %s", b)
	}
	for _, c := range []struct{ method, path string }{
		{"GET", "/api/v1/notification-channels"}, {"POST", "/api/v1/notification-channels"},
		{"DELETE", "/api/v1/notification-channels/" + id}, {"POST", "/api/v1/notification-channels/" + id + "/test"},
	} {
		if code, b := e.call(t, c.method, c.path, agent, map[string]any{"kind": "ntfy", "url": rc.URL}); code != http.StatusForbidden {
			t.Errorf("agent key %s %s: %d %s", c.method, c.path, code, b)
		}
		if code, _ := e.call(t, c.method, c.path, "", nil); code != http.StatusUnauthorized {
			t.Errorf("no key %s %s: %d", c.method, c.path, code)
		}
	}
	for _, path := range []string{"/api/v1/notification-channels/" + id, "/api/v1/notification-channels/not-a-uuid", "/api/v1/notification-channels/" + newUUID()} {
		if code, _ := e.call(t, "DELETE", path, bob, nil); code != http.StatusNotFound {
			t.Errorf("bob DELETE %s: %d", path, code)
		}
		if code, _ := e.call(t, "POST", path+"/test", bob, nil); code != http.StatusNotFound {
			t.Errorf("bob test %s: %d", path, code)
		}
	}
	for name, body := range map[string]any{
		"not JSON":        "{",
		"empty":           "",
		"array":           "[]",
		"no kind":         map[string]any{"url": rc.URL},
		"bad kind":        map[string]any{"kind": "email", "url": rc.URL},
		"kind not string": map[string]any{"kind": 7, "url": rc.URL},
		"no url":          map[string]any{"kind": "ntfy"},
		"ftp":             map[string]any{"kind": "ntfy", "url": "ftp://example.com/t"},
		"file":            map[string]any{"kind": "ntfy", "url": "file:///etc/passwd"},
		"no host":         map[string]any{"kind": "ntfy", "url": "http:///t"},
		"credentials":     map[string]any{"kind": "ntfy", "url": "http://u:p@example.com/t"},
		"long url":        map[string]any{"kind": "ntfy", "url": "http://example.com/" + strings.Repeat("a", 3000)},
		"unknown event":   map[string]any{"kind": "ntfy", "url": rc.URL, "events": []string{"everything"}},
		"no events":       map[string]any{"kind": "ntfy", "url": rc.URL, "events": []string{}},
		"events string":   map[string]any{"kind": "ntfy", "url": rc.URL, "events": "question.asked"},
		"webhook token":   map[string]any{"kind": "webhook", "url": rc.URL, "token": "x"},
		"token newline":   map[string]any{"kind": "ntfy", "url": rc.URL, "token": "a\r\nX-Evil: 1"},
	} {
		if code, b := e.call(t, "POST", "/api/v1/notification-channels", alice, body); code != http.StatusBadRequest || !strings.Contains(string(b), "detail") {
			t.Errorf("%s: %d %s, want 400", name, code, b)
		}
	}
	// The test endpoint sends now and reports the receiver's status.
	code, b = e.call(t, "POST", "/api/v1/notification-channels/"+ntfyID+"/test", alice, nil)
	if code != 200 || string(b) != "{\"delivered\":true,\"status\":200}\n" {
		t.Errorf("test: %d %s", code, b)
	}
	if r := rc.requests(); len(r) != 1 || r[0].header.Get("Title") != "agentline test" || r[0].header.Get("Authorization") != "Bearer tk_abc" {
		t.Errorf("test request: %v", r)
	}
	// At most maxChannelsPerUser.
	for i := 2; i < maxChannelsPerUser; i++ {
		mustChannel(t, e, bob, map[string]any{"kind": "ntfy", "url": rc.URL})
	}
	mustChannel(t, e, bob, map[string]any{"kind": "ntfy", "url": rc.URL})
	mustChannel(t, e, bob, map[string]any{"kind": "ntfy", "url": rc.URL})
	if code, _ := e.call(t, "POST", "/api/v1/notification-channels", bob, map[string]any{"kind": "ntfy", "url": rc.URL}); code != http.StatusBadRequest {
		t.Errorf("channel %d: %d, want 400", maxChannelsPerUser+1, code)
	}
	if code, b := e.call(t, "DELETE", "/api/v1/notification-channels/"+id, alice, nil); code != 200 {
		t.Errorf("delete: %d %s", code, b)
	}
	if code, _ := e.call(t, "DELETE", "/api/v1/notification-channels/"+id, alice, nil); code != http.StatusNotFound {
		t.Errorf("second delete: %d", code)
	}
}

// TestNotifyReplicas: two apps on one database, questions asked through
// both, two channels: every event reaches every channel exactly once, by
// the receivers' webhook-id counts.
func TestNotifyReplicas(t *testing.T) {
	t.Parallel()
	wide := withNotifier(func(n *notifier) { n.limits.perWindow = 10000 })
	a := newTestEnv(t, wide)
	b := newTestEnvOn(t, a.dsn, a.signer, wide)
	person, agent := a.mustKey(t, "rep@example.com", scopePerson), a.mustKey(t, "rep@example.com", scopeAgent)
	rc1, rc2 := newReceiver(t, nil), newReceiver(t, nil)
	mustChannel(t, a, person, map[string]any{"kind": "webhook", "url": rc1.URL})
	mustChannel(t, b, person, map[string]any{"kind": "webhook", "url": rc2.URL})
	const n = 60
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			session := newUUID()
			for i := range n / 4 {
				e := a
				if i%2 == 1 {
					e = b
				}
				mustAsk(t, e, agent, session, fmt.Sprintf("q %d %d", w, i))
			}
		}()
	}
	wg.Wait()
	for _, rc := range []*receiver{rc1, rc2} {
		notifyWaitFor(t, "every notification", 15*time.Second, func() bool { return rc.count() >= n })
	}
	time.Sleep(300 * time.Millisecond)
	for i, rc := range []*receiver{rc1, rc2} {
		ids := map[string]int{}
		for _, r := range rc.requests() {
			ids[r.header.Get("webhook-id")]++
		}
		if len(ids) != n || rc.count() != n {
			t.Errorf("receiver %d: %d requests, %d webhook-ids, want %d of each", i+1, rc.count(), len(ids), n)
		}
	}
}

// TestNotifyIdle: with nothing due, the worker makes no queries beyond its
// safety re-check, however many questions wait for answers.
func TestNotifyIdle(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, withNotifier(func(n *notifier) { n.limits.perWindow = 10000 }))
	person := e.mustKey(t, "idle@example.com", scopePerson)
	rc := newReceiver(t, nil)
	mustChannel(t, e, person, map[string]any{"kind": "ntfy", "url": rc.URL})
	userID := e.mustUserID(t, "idle@example.com")
	for range 1000 {
		// Each question in a session of its own: 1,000 questions waiting.
		session := newUUID()
		if _, err := e.a.store.addAgentMessage(context.Background(), userID, agentMessage{
			SessionID: session, AgentType: "codex", Content: "waiting?", RequiresUserInput: true}); err != nil {
			t.Fatal(err)
		}
	}
	notifyWaitFor(t, "1,000 notifications", 60*time.Second, func() bool { return rc.count() >= 1000 })
	// No backend of the database (but the listener) runs anything for 5 s:
	// the worker sleeps until a NOTIFY or its 60 s safety re-check.
	probe := perfProbe(t)
	perfWaitQuiet(t, probe, perfDBName(t, e.db), 5*time.Second, 20*time.Second)
}

// TestNotifyCLI: agentline notify add, list, test and remove, as an
// operator runs them.
func TestNotifyCLI(t *testing.T) {
	t.Parallel()
	_, dsn := mustDB(t)
	rc := newReceiver(t, nil)
	cli := func(allowPrivate bool, args ...string) (string, error) {
		env := map[string]string{"DATABASE_URL": dsn, "PUBLIC_URL": "https://inbox.example.com"}
		if allowPrivate {
			env["NOTIFY_ALLOW_PRIVATE"] = "1"
		}
		var out, errw strings.Builder
		err := run(context.Background(), append([]string{"agentline", "notify"}, args...), func(k string) string { return env[k] }, &out, &errw)
		return out.String(), err
	}
	out, err := cli(true, "add", "-user", "cli@example.com", "-kind", "webhook", "-url", rc.URL+"/h", "-events", "question.asked,session.ended")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if err != nil || len(lines) != 2 || !strings.HasPrefix(lines[0], "id=") || !strings.HasPrefix(lines[1], "secret=whsec_") {
		t.Fatalf("add: %q %v", out, err)
	}
	id := strings.TrimPrefix(lines[0], "id=")
	secret := strings.TrimPrefix(lines[1], "secret=")
	out, err = cli(true, "list", "-user", "cli@example.com")
	if err != nil || !strings.Contains(out, id) || !strings.Contains(out, "question.asked,session.ended") || strings.Contains(out, "whsec_") {
		t.Errorf("list: %q %v", out, err)
	}
	out, err = cli(true, "test", id)
	if err != nil || strings.TrimSpace(out) != "delivered: HTTP 200" {
		t.Errorf("test: %q %v", out, err)
	}
	if r := rc.requests(); len(r) != 1 {
		t.Fatalf("%d test requests", len(r))
	} else if wh, _ := standardwebhooks.NewWebhook(secret); wh.Verify(r[0].body, r[0].header) != nil ||
		!strings.Contains(string(r[0].body), `"type":"test"`) || !strings.Contains(string(r[0].body), "https://inbox.example.com/") {
		t.Errorf("test request %s", r[0].body)
	}
	if _, err := cli(false, "test", id); err == nil || !strings.Contains(err.Error(), "loopback") {
		t.Errorf("test without NOTIFY_ALLOW_PRIVATE: %v", err)
	}
	if _, err := cli(false, "add", "-user", "cli@example.com", "-kind", "ntfy", "-url", "http://127.0.0.1/t"); err == nil || !strings.Contains(err.Error(), "NOTIFY_ALLOW_PRIVATE") {
		t.Errorf("add a loopback URL: %v", err)
	}
	if out, err := cli(true, "remove", id); err != nil || strings.TrimSpace(out) != "removed" {
		t.Errorf("remove: %q %v", out, err)
	}
	if _, err := cli(true, "remove", id); err == nil {
		t.Error("second remove succeeded")
	}
	out, _ = cli(true, "list", "-user", "cli@example.com")
	if strings.Contains(out, id) {
		t.Errorf("list after remove: %q", out)
	}
}

// TestNotifyKillBeforeDelivery: the real binary is killed with SIGKILL
// while its first attempt at a question's notification hangs at the
// receiver; restarted, it delivers the notification, once: one webhook-id,
// one successful request.
func TestNotifyKillBeforeDelivery(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	t.Parallel()
	db, dsn := mustDB(t)
	pub, signer := perfKeys(t)
	bin := perfBuildBinary(t)
	release := make(chan struct{})
	rc := newReceiver(t, func(i int, r *http.Request) (int, http.Header) {
		if i == 0 { // hangs until its sender dies
			select {
			case <-r.Context().Done():
			case <-release:
			}
			return http.StatusServiceUnavailable, nil
		}
		return http.StatusOK, nil
	})
	t.Cleanup(func() { close(release) }) // before the receiver closes
	ctx := context.Background()
	st := &store{db: db}
	key, err := issueKey(ctx, st, signer, "kill@example.com", "kill", scopeAgent, 0)
	if err != nil {
		t.Fatal(err)
	}
	userID := mustUserIDOf(t, st, "kill@example.com")
	ch, err := checkChannel(channelRequest{Kind: ptr("webhook"), URL: ptr(rc.URL + "/hook")}, true)
	if err != nil {
		t.Fatal(err)
	}
	if ch, err = st.createChannel(ctx, userID, ch); err != nil {
		t.Fatal(err)
	}
	env := []string{"DATABASE_URL=" + dsn, "JWT_PUBLIC_KEY=" + pub, "NOTIFY_ALLOW_PRIVATE=1"}
	p1 := perfStartServer(t, bin, env...)
	code, body, err := perfDo(ctx, perfClient(), "POST", p1.url+"/api/v1/messages/agent", key, map[string]any{
		"agent_instance_id": newUUID(), "agent_type": "claude-code", "content": "Still there?", "requires_user_input": true})
	if err != nil || code != 200 {
		t.Fatalf("ask: %d %v %v", code, body, err)
	}
	notifyWaitFor(t, "the first attempt", 10*time.Second, func() bool { return rc.count() >= 1 })
	p1.cmd.Process.Kill() // SIGKILL: no shutdown code runs
	<-p1.done
	killed := time.Now()
	perfStartServer(t, bin, env...)
	notifyWaitFor(t, "the notification after the restart", 60*time.Second, func() bool {
		for _, r := range rc.requests() {
			if r.status == http.StatusOK {
				return true
			}
		}
		return false
	})
	t.Logf("delivered %v after the kill (the killed attempt's lease is %v)", time.Since(killed).Round(time.Millisecond), notifyLease)
	time.Sleep(500 * time.Millisecond)
	ids, ok := map[string]bool{}, 0
	for _, r := range rc.requests() {
		ids[r.header.Get("webhook-id")] = true
		if r.status == http.StatusOK {
			ok++
		}
	}
	if len(ids) != 1 || ok != 1 {
		t.Errorf("%d requests, %d webhook-ids, %d answered 200; want one id, delivered once", rc.count(), len(ids), ok)
	}
	var status string
	db.QueryRow(`SELECT status FROM notification_deliveries WHERE channel_id = $1`, ch.ID).Scan(&status)
	if status != "sent" {
		t.Errorf("delivery status %q", status)
	}
}

func ptr[T any](v T) *T { return &v }

func mustUserIDOf(t testing.TB, st *store, email string) string {
	t.Helper()
	id, err := st.ensureUser(context.Background(), email)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// BenchmarkNotifyLatency: from a question's commit to the receiver having
// the webhook request, on loopback. Run with -benchtime 300x for the
// README's numbers.
func BenchmarkNotifyLatency(b *testing.B) {
	e := newTestEnv(b, withNotifier(func(n *notifier) { n.limits.perWindow = 1 << 30 }))
	person := e.mustKey(b, "bench@example.com", scopePerson)
	got := make(chan time.Time, 1)
	rc := newReceiver(b, func(int, *http.Request) (int, http.Header) {
		got <- time.Now()
		return http.StatusOK, nil
	})
	mustChannel(b, e, person, map[string]any{"kind": "webhook", "url": rc.URL})
	userID := e.mustUserID(b, "bench@example.com")
	session := newUUID()
	ctx := context.Background()
	if _, err := e.a.store.addAgentMessage(ctx, userID, agentMessage{SessionID: session, AgentType: "bench", Content: "start"}); err != nil {
		b.Fatal(err)
	}
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := e.a.store.addAgentMessage(ctx, userID, agentMessage{SessionID: session, Content: fmt.Sprintf("q%d", i), RequiresUserInput: true}); err != nil {
			b.Fatal(err)
		}
		committed := time.Now()
		select {
		case at := <-got:
			lat = append(lat, at.Sub(committed))
		case <-time.After(10 * time.Second):
			b.Fatal("no notification within 10 s")
		}
	}
	b.StopTimer()
	slices.Sort(lat)
	pct := func(p float64) float64 {
		return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))].Microseconds()) / 1000
	}
	b.ReportMetric(pct(0.50), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
	b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1000, "max-ms")
}

// TestNotifyDeleteWhileSending: removing a channel while its notifications
// are being claimed, sent and recorded, and questions keep coming, is a 200
// for the person and never an error for the agent.
func TestNotifyDeleteWhileSending(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, withNotifier(func(n *notifier) { fastRetries(n); n.limits.perWindow = 10000 }))
	person, agent := e.mustKey(t, "del@example.com", scopePerson), e.mustKey(t, "del@example.com", scopeAgent)
	rc := newReceiver(t, func(i int, r *http.Request) (int, http.Header) {
		time.Sleep(20 * time.Millisecond)
		if i%3 == 0 {
			return http.StatusServiceUnavailable, nil
		}
		return http.StatusOK, nil
	})
	for round := range 3 {
		var ids []string
		for range 3 {
			id, _ := mustChannel(t, e, person, map[string]any{"kind": "webhook", "url": rc.URL})
			ids = append(ids, id)
		}
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			session := newUUID()
			for i := range 20 {
				mustAsk(t, e, agent, session, fmt.Sprintf("r%d q%d", round, i))
			}
		}()
		time.Sleep(100 * time.Millisecond)
		for _, id := range ids {
			if code, b := e.call(t, "DELETE", "/api/v1/notification-channels/"+id, person, nil); code != 200 {
				t.Errorf("delete: %d %s\nlog:\n%s", code, b, e.logs.String())
			}
		}
		wg.Wait()
	}
	if strings.Contains(e.logs.String(), "level=ERROR") {
		t.Errorf("errors logged:\n%s", e.logs.String())
	}
}
