package main

// notify.go sends notifications out (issue 11): the outbox worker that every
// replica runs, the two senders (ntfy and Standard Webhooks), and the HTTP
// client they share, which refuses private destinations at dial time. The
// outbox rows are written by the store in the transaction of the question or
// message they report (store.go, "notifications"); this file only claims,
// sends and records them, always outside any agent-facing transaction.

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"mime"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"
)

// Defaults of the delivery rules (the notifier's fields; tests shorten them).
const (
	notifyAttemptTimeout = 10 * time.Second
	notifyRetryMin       = 10 * time.Second
	notifyRetryMax       = time.Hour
	notifyGiveUp         = 24 * time.Hour
	// A claimed row is left to its worker this long: longer than an
	// attempt can last, so only a worker that died gives a row up.
	notifyLease       = notifyAttemptTimeout + 10*time.Second
	notifyWindow      = time.Minute
	notifyPerWindow   = 30
	notifyRecheck     = 60 * time.Second
	notifyMaxInFlight = 32
	// notifyTextBytes is where a notification's text is cut (ntfy's own
	// limit for a message body is 4,096 bytes).
	notifyTextBytes = 4000
)

// notifier is the outbox worker and the senders' configuration.
type notifier struct {
	store        *store
	hub          *hub
	log          *slog.Logger
	publicURL    string // no trailing slash
	allowPrivate bool   // NOTIFY_ALLOW_PRIVATE: private destinations allowed

	attemptTimeout time.Duration
	retryMin       time.Duration
	retryMax       time.Duration
	giveUp         time.Duration
	recheck        time.Duration
	maxInFlight    int
	limits         deliveryLimits

	client  *http.Client
	cancel  context.CancelFunc
	done    chan struct{}
	observe func(kind, result string) // counts each attempt's outcome (metrics); nil: none
}

// newNotifier returns a notifier with the default rules; start runs it.
func newNotifier(st *store, h *hub, log *slog.Logger, publicURL string, allowPrivate bool) *notifier {
	return &notifier{store: st, hub: h, log: log, publicURL: strings.TrimRight(publicURL, "/"), allowPrivate: allowPrivate,
		attemptTimeout: notifyAttemptTimeout, retryMin: notifyRetryMin, retryMax: notifyRetryMax, giveUp: notifyGiveUp,
		recheck: notifyRecheck, maxInFlight: notifyMaxInFlight,
		limits: deliveryLimits{lease: notifyLease, window: notifyWindow, perWindow: notifyPerWindow}}
}

// start builds the client from the current settings and runs the worker
// until stop.
func (n *notifier) start() {
	n.client = newNotifyClient(n.allowPrivate, n.attemptTimeout)
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel, n.done = cancel, make(chan struct{})
	go n.run(ctx)
}

// stop ends the worker. Attempts in flight are cancelled and not recorded:
// their rows stay leased and are sent again when the lease ends (by this
// process after a restart, or by another replica), so stopping delays a
// notification but never drops one.
func (n *notifier) stop() {
	if n.cancel == nil {
		return
	}
	n.cancel()
	<-n.done
}

// run is the worker loop: claim what is due while there is room, then sleep
// until a NOTIFY from a commit, the earliest due row, a finished send or the
// safety re-check.
func (n *notifier) run(ctx context.Context) {
	defer close(n.done)
	wake, unsubscribe := n.hub.subscribe(outboxTopic)
	defer unsubscribe()
	var wg sync.WaitGroup
	defer wg.Wait()
	slots := make(chan struct{}, n.maxInFlight)
	finished := make(chan struct{}, 1)
	for {
		for free := cap(slots) - len(slots); free > 0; free = cap(slots) - len(slots) {
			ds, err := n.store.claimDeliveries(ctx, free, n.limits)
			if err != nil {
				if ctx.Err() == nil {
					n.log.Warn("notifications: claim failed", "err", err)
				}
				break
			}
			for _, d := range ds {
				slots <- struct{}{}
				wg.Add(1)
				go func() {
					defer wg.Done()
					n.deliver(ctx, d)
					<-slots
					select {
					case finished <- struct{}{}:
					default:
					}
				}()
			}
			if len(ds) < free {
				break
			}
		}
		sleep := n.recheck
		if due, ok, err := n.store.nextDelivery(ctx); err != nil {
			sleep = min(sleep, 5*time.Second) // the database is away: try again soon
		} else if ok {
			// A floor, so rows another replica is claiming right now
			// (skipped here) do not make this loop spin.
			sleep = max(min(sleep, due), 5*time.Millisecond)
		}
		timer := time.NewTimer(sleep)
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-wake:
		case <-timer.C:
		case <-finished:
			// A slot is free, or a retry was recorded whose time comes
			// before the lease the timer was set from.
		}
		timer.Stop()
	}
}

// attempt is what one request to a receiver came to.
type attempt struct {
	status     int           // the HTTP status, 0 if there was no answer
	retryAfter time.Duration // the receiver's Retry-After, 0 if none
	err        error         // no answer: why
}

// deliver sends a claimed delivery and records the outcome.
func (n *notifier) deliver(ctx context.Context, d delivery) {
	at := n.send(ctx, d.Channel, n.render(d), d.ID)
	if ctx.Err() != nil {
		return // stopping: the lease brings the row back
	}
	outcome, delay, why := n.judge(at, d.Attempts)
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	status, err := n.store.recordDelivery(rctx, d.ID, outcome, why, delay, n.giveUp)
	if err != nil {
		// The row keeps its lease and is tried again when it ends.
		n.log.Warn("notifications: record failed", "delivery", d.ID, "err", err)
		return
	}
	if n.observe != nil {
		result := status // sent or failed; pending again means a retry is due
		if status == "pending" {
			result = "retry"
		}
		n.observe(d.Channel.Kind, result)
	}
	// Never the URL (an ntfy topic is a secret of its own) nor the body.
	n.log.Debug("notification attempt", "delivery", d.ID, "channel", d.ChannelID, "event", d.EventKind,
		"attempt", d.Attempts, "http_status", at.status, "status", status, "error", why)
}

// judge turns an attempt into an outcome: sent; retry after a delay on a
// network error, 408, 429 or 5xx; failed for any other answer and for a
// destination refused at dial time. why is a short line for people, never
// the receiver's body.
func (n *notifier) judge(at attempt, attempts int) (outcome string, delay time.Duration, why string) {
	var refused *refusedError
	switch {
	case at.err != nil && errors.As(at.err, &refused):
		return outcomeFail, 0, refused.Error()
	case at.err != nil:
		return outcomeRetry, n.backoff(attempts), shortNetError(at.err, n.attemptTimeout)
	case at.status >= 200 && at.status < 300:
		return outcomeSent, 0, ""
	case at.status == http.StatusRequestTimeout || at.status == http.StatusTooManyRequests || at.status >= 500:
		delay = n.backoff(attempts)
		if at.retryAfter > 0 {
			// Honoured, though never beyond an hour: a receiver cannot
			// park a notification for days.
			delay = min(at.retryAfter, notifyRetryMax)
		}
		return outcomeRetry, delay, fmt.Sprintf("HTTP %d", at.status)
	case at.status >= 300 && at.status < 400:
		return outcomeFail, 0, fmt.Sprintf("HTTP %d (redirects are not followed)", at.status)
	default:
		return outcomeFail, 0, fmt.Sprintf("HTTP %d", at.status)
	}
}

// backoff is the wait before the next attempt after attempts failed ones:
// retryMin doubled each time, plus up to a quarter more of jitter (so
// receivers coming back are not hit by every sender at once), at most
// retryMax.
func (n *notifier) backoff(attempts int) time.Duration {
	d := n.retryMin
	for i := 1; i < attempts && d < n.retryMax; i++ {
		d *= 2
	}
	if q := int64(d / 4); q > 0 {
		j, _ := rand.Int(rand.Reader, big.NewInt(q))
		d += time.Duration(j.Int64())
	}
	return min(d, n.retryMax)
}

// shortNetError names a network failure in a few words.
func shortNetError(err error, timeout time.Duration) string {
	var dnsErr *net.DNSError
	var opErr *net.OpError
	switch {
	case errors.Is(err, context.DeadlineExceeded) || os.IsTimeout(err):
		return fmt.Sprintf("no answer within %s", timeout)
	case errors.As(err, &dnsErr):
		return "DNS: " + dnsErr.Err
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return "connection closed by the receiver"
	case errors.As(err, &opErr):
		return "network error: " + opErr.Op
	default:
		return "network error"
	}
}

// notification is an event as the senders put it.
type notification struct {
	Type      string // question.asked, …, summary, test
	Title     string
	Priority  string // ntfy's: high or default
	Tags      string
	Text      string // cut at notifyTextBytes
	InboxURL  string
	EventAt   time.Time
	SessionID string
	AgentType string
	IDField   string // "question_id" or "message_id" ("" for none)
	ID        string
	Count     int          // summary: how many notifications it stands for
	Actions   []actionLink // lock-screen buttons (issue 12)
}

// render builds the notification for a claimed delivery.
func (n *notifier) render(d delivery) notification {
	agent := d.AgentType
	if agent == "" {
		agent = "agent"
	}
	nt := notification{Type: d.EventKind, Priority: "default", EventAt: d.EventAt, SessionID: d.SessionID,
		AgentType: d.AgentType, Text: cutBytes(d.Text, notifyTextBytes), InboxURL: n.publicURL + "/"}
	switch d.EventKind {
	case eventQuestionAsked:
		nt.Title, nt.Priority, nt.Tags = agent+" asks", "high", "question"
		nt.IDField, nt.ID = "question_id", d.MessageID
		nt.InboxURL = n.publicURL + "/#/questions/" + d.MessageID
		nt.Actions = actionLinks(n.publicURL, d.Actions) // lock-screen actions (issue 12)
	case eventMessageFlagged:
		nt.Title, nt.Tags = agent+" says", "speech_balloon"
		nt.IDField, nt.ID = "message_id", d.MessageID
		nt.InboxURL = n.publicURL + "/#/sessions/" + d.SessionID
	case eventSessionEnded:
		nt.Title, nt.Tags = agent+" session ended", "checkered_flag"
		nt.Text = agent + " ended its session " + d.SessionID
		nt.InboxURL = n.publicURL + "/#/sessions/" + d.SessionID
	case eventAgentWaiting, eventAgentIdle: // issue 15: Claude Code's hooks
		nt.Title, nt.Priority, nt.Tags = agent+" is waiting for you", "high", "bell"
		if d.EventKind == eventAgentIdle {
			nt.Title, nt.Priority, nt.Tags = agent+" finished its turn", "default", "zzz"
		}
		nt.IDField, nt.ID = "message_id", d.MessageID
		nt.InboxURL = n.publicURL + "/#/sessions/" + d.SessionID
	case eventSummary:
		nt.Count = d.Folded
		nt.Title, nt.Priority, nt.Tags = fmt.Sprintf("%d more waiting", d.Folded), "high", "bell"
		nt.Text = fmt.Sprintf("%d more notifications are waiting in the inbox (more than %d a minute were held back).",
			d.Folded, n.limits.perWindow)
	}
	return nt
}

// testNotification is what a channel test sends.
func (n *notifier) testNotification() notification {
	return notification{Type: eventTest, Title: "agentline test", Priority: "default", Tags: "white_check_mark",
		Text: "This channel works: agentline can reach it.", InboxURL: n.publicURL + "/", EventAt: time.Now()}
}

// cutBytes returns s cut to at most n bytes, on a character boundary.
func cutBytes(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// headerText makes s safe as a header value: control characters become
// spaces, and non-ASCII text is RFC 2047 encoded (which ntfy decodes).
func headerText(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, cutBytes(s, 200))
	return mime.BEncoding.Encode("UTF-8", s)
}

// send makes one request for nt to channel c; id is the webhook-id.
func (n *notifier) send(ctx context.Context, c channel, nt notification, id string) attempt {
	ctx, cancel := context.WithTimeout(ctx, n.attemptTimeout)
	defer cancel()
	var req *http.Request
	var err error
	switch c.Kind {
	case "ntfy":
		req, err = ntfyRequest(ctx, c, nt)
	case "webhook":
		req, err = webhookRequest(ctx, c, nt, id, time.Now())
	default:
		err = fmt.Errorf("unknown channel kind %q", c.Kind)
	}
	if err != nil {
		return attempt{err: &refusedError{reason: "cannot build the request"}}
	}
	req.Header.Set("User-Agent", "agentline")
	resp, err := n.client.Do(req)
	if err != nil {
		return attempt{err: err}
	}
	defer resp.Body.Close()
	// Read a little, so the connection can be reused; never kept.
	io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10))
	return attempt{status: resp.StatusCode, retryAfter: parseRetryAfter(resp.Header.Get("Retry-After"), time.Now())}
}

// ntfyRequest is a publish per ntfy's docs: POST to the topic URL, the text
// as body, the rest in headers.
func ntfyRequest(ctx context.Context, c channel, nt notification) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.URL, strings.NewReader(nt.Text))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "text/plain; charset=utf-8")
	req.Header.Set("Title", headerText(nt.Title))
	req.Header.Set("Priority", nt.Priority)
	if nt.Tags != "" {
		req.Header.Set("Tags", nt.Tags)
	}
	req.Header.Set("Click", nt.InboxURL)
	if len(nt.Actions) > 0 { // lock-screen actions (issue 12)
		req.Header.Set("Actions", ntfyActions(nt.Actions))
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	return req, nil
}

// webhookEvent is a webhook's JSON body.
type webhookEvent struct {
	Type      string         `json:"type"`
	Timestamp string         `json:"timestamp"`
	Data      map[string]any `json:"data"`
}

// webhookRequest is a POST of the event signed per Standard Webhooks:
// webhook-id (the delivery's id: the same on every retry, so receivers
// dedupe), webhook-timestamp and webhook-signature "v1,<base64 HMAC-SHA256
// of id.timestamp.body>" keyed with the secret after "whsec_".
func webhookRequest(ctx context.Context, c channel, nt notification, id string, now time.Time) (*http.Request, error) {
	data := map[string]any{"text": nt.Text, "inbox_url": nt.InboxURL}
	if nt.SessionID != "" {
		data["session_id"] = nt.SessionID
		data["agent_type"] = nt.AgentType
	}
	if nt.IDField != "" {
		data[nt.IDField] = nt.ID
	}
	if nt.Type == eventSummary {
		data["count"] = nt.Count
	}
	if len(nt.Actions) > 0 { // lock-screen actions (issue 12)
		data["actions"] = nt.Actions
	}
	body, err := json.Marshal(webhookEvent{Type: nt.Type, Timestamp: nt.EventAt.UTC().Format(time.RFC3339Nano), Data: data})
	if err != nil {
		return nil, err
	}
	key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(c.Secret, "whsec_"))
	if err != nil || len(key) == 0 {
		return nil, errors.New("bad webhook secret")
	}
	ts := strconv.FormatInt(now.Unix(), 10)
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(id + "." + ts + "."))
	mac.Write(body)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.URL, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("webhook-id", id)
	req.Header.Set("webhook-timestamp", ts)
	req.Header.Set("webhook-signature", "v1,"+base64.StdEncoding.EncodeToString(mac.Sum(nil)))
	return req, nil
}

// newWebhookSecret returns a fresh signing secret: "whsec_" and the base64
// of 32 random bytes.
func newWebhookSecret() string {
	b := make([]byte, 32)
	rand.Read(b)
	return "whsec_" + base64.StdEncoding.EncodeToString(b)
}

// parseRetryAfter reads a Retry-After header: seconds or an HTTP date. It
// returns 0 when absent or unreadable.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if secs, err := strconv.ParseInt(v, 10, 64); err == nil {
		if secs <= 0 {
			return 0
		}
		return time.Duration(min(secs, 1<<31)) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// ---- where the server may send ----

// refusedError: the destination is not one agentline sends to.
type refusedError struct {
	addr   string
	reason string
}

func (e *refusedError) Error() string {
	if e.addr == "" {
		return "refused: " + e.reason
	}
	return fmt.Sprintf("refused: %s is a %s address (set NOTIFY_ALLOW_PRIVATE=1 to allow)", e.addr, e.reason)
}

var (
	cgnat  = netip.MustParsePrefix("100.64.0.0/10")
	thisV4 = netip.MustParsePrefix("0.0.0.0/8")
	nat64  = netip.MustParsePrefix("64:ff9b::/96")
)

// blockedAddr names the kind of ip if a user's channel may not reach it
// ("" if it may). A channel URL is a request the server makes on a user's
// behalf: without this, any user could make it reach the cloud metadata
// service, the database or anything else on the server's network.
func blockedAddr(ip netip.Addr) string {
	ip = ip.Unmap()
	if nat64.Contains(ip) { // the IPv4 address inside a NAT64 one
		b := ip.As16()
		ip = netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]})
	}
	switch {
	case ip.IsLoopback():
		return "loopback"
	case ip.IsPrivate() || cgnat.Contains(ip):
		return "private"
	case ip.IsLinkLocalUnicast():
		return "link-local"
	case ip.IsUnspecified() || thisV4.Contains(ip):
		return "unspecified"
	case ip.IsMulticast() || ip == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return "multicast"
	}
	return ""
}

// newNotifyClient is the client every notification goes out through. The
// destination is checked in the dialer's Control hook, on the address
// actually being connected to, so a name that resolves to a public address
// when checked and a private one when used (DNS rebinding) cannot slip past.
// No proxy (the check must see the real destination) and no redirects (a
// public receiver must not bounce us inwards).
func newNotifyClient(allowPrivate bool, timeout time.Duration) *http.Client {
	dialer := &net.Dialer{Timeout: timeout, Control: func(network, address string, _ syscall.RawConn) error {
		if allowPrivate {
			return nil
		}
		host, _, err := net.SplitHostPort(address)
		if err != nil {
			return &refusedError{reason: "unreadable address"}
		}
		ip, err := netip.ParseAddr(host)
		if err != nil {
			return &refusedError{reason: "unreadable address"}
		}
		if kind := blockedAddr(ip); kind != "" {
			return &refusedError{addr: ip.WithZone("").String(), reason: kind}
		}
		return nil
	}}
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			Proxy:                 nil,
			DialContext:           dialer.DialContext,
			ForceAttemptHTTP2:     true,
			TLSHandshakeTimeout:   timeout,
			ResponseHeaderTimeout: timeout,
			MaxIdleConnsPerHost:   8,
			IdleConnTimeout:       60 * time.Second,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// checkChannelURL checks a channel URL as it is made: http or https, a host,
// no credentials in it, and (unless allowPrivate) not a literal private,
// loopback or link-local address. Names are checked again at every dial.
func checkChannelURL(raw string, allowPrivate bool) (string, error) {
	raw = strings.TrimSpace(raw)
	if raw == "" {
		return "", badRequestf("field %q is required", "url")
	}
	if len(raw) > 2048 {
		return "", badRequestf("field %q is longer than 2048 bytes", "url")
	}
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Hostname() == "" {
		return "", badRequestf("field %q must be an http or https URL", "url")
	}
	if u.User != nil {
		return "", badRequestf("field %q must not hold credentials; give an ntfy access token as %q", "url", "token")
	}
	if allowPrivate {
		return u.String(), nil
	}
	if ip, err := netip.ParseAddr(u.Hostname()); err == nil {
		if kind := blockedAddr(ip); kind != "" {
			return "", badRequestf("url names a %s address (%s): notifications to loopback, private and link-local addresses are refused unless the server sets NOTIFY_ALLOW_PRIVATE=1", kind, ip.WithZone(""))
		}
	}
	return u.String(), nil
}
