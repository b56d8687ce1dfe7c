package main

// hub.go is how a waiting call learns that something changed: one LISTEN
// connection per process, and the one wait loop every long wait runs
// (ask_question, pending?wait=, the event stream).

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lib/pq"
)

// hub wakes waiters when the database says something changed. One
// pq.Listener connection per process LISTENs on notifyChannel; the store
// NOTIFYs inside the transaction that adds a message or changes a session,
// so a wake-up is delivered at commit, to every replica. A waiter holds no
// database connection: it is a channel in a map until it is woken, then it
// re-reads the database itself.
type hub struct {
	listener *pq.Listener
	log      *slog.Logger
	pinging  atomic.Bool
	// reconnects counts re-established LISTEN connections (metrics).
	reconnects atomic.Int64
	// id names this hub's self-check tokens; heard is the latest token the
	// listener received, missed counts self-checks that never came back
	// (watch).
	id     string
	heard  atomic.Pointer[string]
	missed atomic.Int64

	mu     sync.Mutex
	topics map[string]map[chan struct{}]struct{} // "s:"+session or "u:"+user
	calls  map[string]*heldCall                  // cancellable calls: "USER CALLKEY" (holdCall)
	count  int
	done   chan struct{}
}

// newHub connects the listener to dsn and starts dispatching. It returns once
// LISTEN is in effect, so no notification committed after it is missed, or
// when ctx ends (the database may be unreachable: the listener retries for
// ever, so start-up must be able to give up).
func newHub(ctx context.Context, dsn string, log *slog.Logger) (*hub, error) {
	h := &hub{log: log, topics: map[string]map[chan struct{}]struct{}{}, done: make(chan struct{}), id: newUUID(),
		calls: map[string]*heldCall{}}
	h.listener = pq.NewListener(dsn, 100*time.Millisecond, 5*time.Second, func(ev pq.ListenerEventType, err error) {
		switch ev {
		case pq.ListenerEventDisconnected:
			log.Warn("wait hub: listener disconnected", "err", err)
		case pq.ListenerEventReconnected:
			log.Info("wait hub: listener reconnected")
			h.reconnects.Add(1)
		}
	})
	listening := make(chan error, 1)
	go func() { listening <- h.listener.Listen(notifyChannel) }()
	select {
	case err := <-listening:
		if err != nil {
			h.listener.Close()
			return nil, fmt.Errorf("wait hub: listen: %w", err)
		}
	case <-ctx.Done():
		h.listener.Close() // Listen returns once the listener is closed
		return nil, fmt.Errorf("wait hub: listen: %w", ctx.Err())
	}
	go h.run()
	return h, nil
}

func (h *hub) run() {
	defer close(h.done)
	ping := time.NewTicker(10 * time.Second)
	defer ping.Stop()
	for {
		select {
		case n, ok := <-h.listener.NotificationChannel():
			if !ok {
				return
			}
			if n == nil {
				// The connection was lost and is back: notifications sent in
				// between are gone, so everyone re-checks.
				h.wakeAll()
				continue
			}
			h.dispatch(n.Extra)
		case <-ping.C:
			// A dead connection is noticed here at the latest; the listener
			// then reconnects and the nil notification above wakes everyone.
			// One ping at a time: a ping hung on a dead connection must not
			// pile up a goroutine every tick.
			if h.pinging.CompareAndSwap(false, true) {
				go func() {
					defer h.pinging.Store(false)
					h.listener.Ping()
				}()
			}
		}
	}
}

// dispatch acts on one notification. The payload is "KIND USER SESSION
// SEQ"; kind "o": the notification outbox has new rows; "p": a replica's
// self-check (watch), its token in place of the user; "c": a cancellation
// (holdCall), its call key in place of the session; any other: a message
// or a session changed.
func (h *hub) dispatch(payload string) {
	f := strings.Fields(payload)
	if len(f) != 4 {
		return
	}
	switch f[0] {
	case "o":
		h.wake(outboxTopic)
	case "p":
		h.heard.Store(&f[1])
	case "c":
		h.cancelCall(f[1] + " " + f[2])
	default:
		h.wake("u:" + f[1])
		h.wake("s:" + f[2])
	}
}

// wake wakes the waiters of topic.
func (h *hub) wake(topic string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	wakeSet(h.topics[topic])
}

// wakeAll wakes every waiter.
func (h *hub) wakeAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, set := range h.topics {
		wakeSet(set)
	}
}

func wakeSet(set map[chan struct{}]struct{}) {
	for ch := range set {
		select {
		case ch <- struct{}{}:
		default: // already has a wake-up pending
		}
	}
}

// subscribe registers a waiter on topic ("s:"+session or "u:"+user). The
// returned channel receives a value after every change to it (changes close
// together may be folded into one). Subscribe before reading the database,
// then wait: a change committed in between is not missed. cancel must be
// called when done.
func (h *hub) subscribe(topic string) (wake <-chan struct{}, cancel func()) {
	ch := make(chan struct{}, 1)
	h.mu.Lock()
	set := h.topics[topic]
	if set == nil {
		set = map[chan struct{}]struct{}{}
		h.topics[topic] = set
	}
	set[ch] = struct{}{}
	h.count++
	h.mu.Unlock()
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			h.mu.Lock()
			delete(set, ch)
			if len(set) == 0 && len(h.topics[topic]) == 0 {
				delete(h.topics, topic)
			}
			h.count--
			h.mu.Unlock()
		})
	}
}

// holdCall registers a call that a cancellation (kind "c", sent by any
// replica) ends: key is "USER CALLKEY". A second call under the same key
// replaces the first, whose cancellation then goes nowhere. release must be
// called when the call ends.
func (h *hub) holdCall(key string, cancel context.CancelFunc) (release func()) {
	c := &heldCall{cancel}
	h.mu.Lock()
	h.calls[key] = c
	h.mu.Unlock()
	return func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		if h.calls[key] == c {
			delete(h.calls, key)
		}
	}
}

type heldCall struct{ cancel context.CancelFunc }

// cancelCall ends the call held under key, if this replica holds it.
func (h *hub) cancelCall(key string) {
	h.mu.Lock()
	c := h.calls[key]
	h.mu.Unlock()
	if c != nil {
		c.cancel()
	}
}

// outboxTopic wakes the notification worker when the outbox has new rows.
const outboxTopic = "outbox"

// waiters returns the number of calls waiting (the notification worker's
// subscription is not one).
func (h *hub) waiters() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.count - len(h.topics[outboxTopic])
}

// close stops the listener and wakes every waiter so it can notice shutdown.
func (h *hub) close() {
	h.listener.Close()
	<-h.done
	h.wakeAll()
}

// watch checks, every `every`, that the listener still hears what is
// committed: it sends a NOTIFY of its own through the pool (send) and
// expects it back by the next check. A waiter does no database work while
// it waits, so this one check per replica replaces the per-waiter re-reads
// of earlier releases: NOTIFY is reliable while the LISTEN connection is
// up, a lost connection wakes every waiter when it is back (run), and a
// self-check that never came back wakes them too. A check that could not be
// sent (the database is down) proves nothing: the reconnect will wake them.
func (h *hub) watch(ctx context.Context, every time.Duration, send func(ctx context.Context, payload string) error) {
	t := time.NewTicker(every)
	defer t.Stop()
	var sent string
	for n := 1; ; n++ {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if heard := h.heard.Load(); sent != "" && (heard == nil || *heard != sent) {
			h.log.Warn("wait hub: the listener missed its own self-check; every waiter re-checks")
			h.missed.Add(1)
			h.wakeAll()
		}
		sent = fmt.Sprintf("%s-%d", h.id, n)
		sctx, cancel := context.WithTimeout(ctx, every/2)
		if err := send(sctx, "p "+sent+" - 0"); err != nil {
			h.log.Debug("wait hub: self-check not sent", "err", err)
			sent = ""
		}
		cancel()
	}
}

// hubCheckEvery is how often each replica's hub checks itself (watch).
const hubCheckEvery = time.Minute

// waitAnswer is how a call waits for the person (ask_question, approve, a
// PermissionRequest hook): on session sid until check reports done, for at
// most limit or, when limit is 0 or longer, what is left of the question's
// time (left); holding c's key, so a revoked key ends the wait (its cause,
// errKeyRevoked); running report every `every` meanwhile (MCP progress; nil
// for none).
func (a *app) waitAnswer(ctx context.Context, c caller, sid string, left, limit, every time.Duration, report func() error, check func() (bool, error)) error {
	if limit <= 0 || limit > left {
		limit = left
	}
	wctx, release := a.keys.hold(ctx, c, 0)
	defer release()
	_, err := a.wait(wctx, "s:"+sid, max(limit, time.Millisecond), check, every, report)
	return err
}

// errShuttingDown ends waits when the server stops.
var errShuttingDown = errors.New("server is shutting down")

// wait is the one wait loop of agentline. It blocks until check reports
// done, limit passes (not done, no error; limit <= 0 means no limit), ctx
// ends (its cause: errKeyRevoked when the caller's key was revoked) or the
// server shuts down (errShuttingDown). check runs at once and after every
// wake-up of topic (see watch); idle, if not nil, runs every
// idleEvery while nothing else happens, and its error ends the wait. While
// it waits, wait holds no database connection.
func (a *app) wait(ctx context.Context, topic string, limit time.Duration, check func() (bool, error), idleEvery time.Duration, idle func() error) (bool, error) {
	wake, cancel := a.hub.subscribe(topic)
	defer cancel()
	var deadline <-chan time.Time
	if limit > 0 {
		t := time.NewTimer(limit)
		defer t.Stop()
		deadline = t.C
	}
	var idleTick <-chan time.Time
	if idle != nil {
		t := time.NewTicker(idleEvery)
		defer t.Stop()
		idleTick = t.C
	}
	for {
		done, err := check()
		if err != nil && ctx.Err() != nil {
			// The check failed because the wait was ended (a revoked key,
			// say): report why it ended.
			return false, context.Cause(ctx)
		}
		if done || err != nil {
			return done, err
		}
	waiting:
		for {
			select {
			case <-wake:
				break waiting
			case <-idleTick:
				if err := idle(); err != nil {
					return false, err
				}
			case <-deadline:
				return false, nil
			case <-ctx.Done():
				return false, context.Cause(ctx)
			case <-a.stopping.Done():
				return false, errShuttingDown
			}
		}
	}
}
