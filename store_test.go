package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The store's behaviour rules (SPEC.md, Behaviour), checked against a real
// PostgreSQL: one fresh database per test.

// storeFixture is a store over a fresh database, with helpers that fail the
// test on any error.
type storeFixture struct {
	t   testing.TB
	ctx context.Context
	s   *store
	db  *sql.DB
	dsn string
}

func storeNew(t testing.TB) *storeFixture {
	t.Helper()
	db, dsn := mustDB(t)
	return &storeFixture{t: t, ctx: context.Background(), s: &store{db: db}, db: db, dsn: dsn}
}

func (f *storeFixture) user(email string) string {
	f.t.Helper()
	id, err := f.s.ensureUser(f.ctx, email)
	if err != nil {
		f.t.Fatal(err)
	}
	return id
}

func (f *storeFixture) agent(userID string, in agentMessage) agentMessageResult {
	f.t.Helper()
	if in.AgentType == "" {
		in.AgentType = "claude-code"
	}
	r, err := f.s.addAgentMessage(f.ctx, userID, in)
	if err != nil {
		f.t.Fatalf("add agent message %q: %v", in.Content, err)
	}
	return r
}

// step logs a step in sessionID (creating it if new).
func (f *storeFixture) step(userID, sessionID, text string) agentMessageResult {
	f.t.Helper()
	return f.agent(userID, agentMessage{SessionID: sessionID, Content: text})
}

// newSession creates a session of userID with one step and returns its id.
func (f *storeFixture) newSession(userID string) string {
	f.t.Helper()
	id := newUUID()
	f.step(userID, id, "first step")
	return id
}

func (f *storeFixture) userMsg(userID, sessionID, text string, markAsRead bool) message {
	f.t.Helper()
	m, err := f.s.addUserMessage(f.ctx, userID, sessionID, text, markAsRead)
	if err != nil {
		f.t.Fatalf("add user message %q: %v", text, err)
	}
	return m
}

func (f *storeFixture) pending(userID, sessionID, lastReadID string) ([]message, bool) {
	f.t.Helper()
	msgs, stale, _, err := f.s.pending(f.ctx, userID, sessionID, lastReadID)
	if err != nil {
		f.t.Fatalf("pending: %v", err)
	}
	return msgs, stale
}

func (f *storeFixture) ask(userID, sessionID, text string) question {
	f.t.Helper()
	q, err := f.s.askQuestion(f.ctx, userID, sessionID, text, 24*time.Hour)
	if err != nil {
		f.t.Fatalf("ask question %q: %v", text, err)
	}
	return q
}

func (f *storeFixture) answer(userID, sessionID string, q question) (questionState, message) {
	f.t.Helper()
	o, err := f.s.questionOutcome(f.ctx, userID, sessionID, q, 24*time.Hour, false)
	if err != nil {
		f.t.Fatalf("answer: %v", err)
	}
	return o.State, o.Answer
}

// storeSessionRow is a session as stored.
type storeSessionRow struct {
	Status      string
	EndedAt     sql.NullTime
	ReadID      sql.NullString
	ReadSeq     int64
	Steps       int
	AnsweredSeq int64
	UserAgentID string
}

func (f *storeFixture) session(sessionID string) storeSessionRow {
	f.t.Helper()
	var r storeSessionRow
	err := f.db.QueryRowContext(f.ctx, `
		SELECT status, ended_at, last_read_message_id, last_read_seq, step_count, answered_question_seq, user_agent_id
		FROM agent_instances WHERE id = $1`, sessionID).
		Scan(&r.Status, &r.EndedAt, &r.ReadID, &r.ReadSeq, &r.Steps, &r.AnsweredSeq, &r.UserAgentID)
	if err != nil {
		f.t.Fatalf("read session %s: %v", sessionID, err)
	}
	return r
}

func (f *storeFixture) count(query string, args ...any) int {
	f.t.Helper()
	var n int
	if err := f.db.QueryRowContext(f.ctx, query, args...).Scan(&n); err != nil {
		f.t.Fatalf("count %q: %v", query, err)
	}
	return n
}

// snapshot returns every row of every table as text, to tell that a call
// changed nothing.
func (f *storeFixture) snapshot() string {
	f.t.Helper()
	var b strings.Builder
	for _, table := range []string{"users", "user_agents", "agent_instances", "messages", "api_keys"} {
		var rows string
		err := f.db.QueryRowContext(f.ctx, `SELECT coalesce(string_agg(t::text, E'\n' ORDER BY t::text), '') FROM `+table+` t`).Scan(&rows)
		if err != nil {
			f.t.Fatal(err)
		}
		fmt.Fprintf(&b, "%s:\n%s\n", table, rows)
	}
	return b.String()
}

func storeContents(msgs []message) []string {
	out := make([]string, len(msgs))
	for i, m := range msgs {
		out[i] = m.Content
	}
	return out
}

func storeWantContents(t testing.TB, what string, msgs []message, want ...string) {
	t.Helper()
	if got := storeContents(msgs); !slices.Equal(got, want) {
		t.Fatalf("%s = %q, want %q", what, got, want)
	}
}

// ---- feedback delivery ----

func TestStoreFeedbackDeliveredOnceInOrder(t *testing.T) {
	t.Parallel()
	f := storeNew(t)
	u := f.user("a@example.com")
	sid := newUUID()
	first := f.step(u, sid, "step 1")
	if len(first.Feedback) != 0 || first.Steps != 1 {
		t.Fatalf("first step: feedback %v, steps %d", first.Feedback, first.Steps)
	}
	f.userMsg(u, sid, "one", false)
	f.userMsg(u, sid, "two", false)
	f.userMsg(u, sid, "read already", true) // marked read: moves the pointer past one and two
	r := f.step(u, sid, "step 2")
	storeWantContents(t, "feedback after a marked-read message", r.Feedback)

	f.userMsg(u, sid, "three", false)
	f.userMsg(u, sid, "four", false)
	f.userMsg(u, sid, "five", false)
	r = f.step(u, sid, "step 3")
	storeWantContents(t, "feedback", r.Feedback, "three", "four", "five")
	for i, m := range r.Feedback {
		if m.SenderType != senderUser || m.SessionID != sid || m.ID == "" || m.CreatedAt.IsZero() {
			t.Errorf("feedback[%d] = %+v", i, m)
		}
		if i > 0 && m.Seq <= r.Feedback[i-1].Seq {
			t.Errorf("feedback seqs not increasing: %d after %d", m.Seq, r.Feedback[i-1].Seq)
		}
	}
	if got := f.session(sid); got.ReadID.String != r.Message.ID || got.ReadSeq != r.Message.Seq {
		t.Errorf("read pointer = %v/%d, want the new step %s/%d", got.ReadID, got.ReadSeq, r.Message.ID, r.Message.Seq)
	}
	r = f.step(u, sid, "step 4")
	storeWantContents(t, "feedback a second time", r.Feedback)
	msgs, _ := f.pending(u, sid, "")
	storeWantContents(t, "pending after delivery", msgs)
}

func TestStorePending(t *testing.T) {
	t.Parallel()
	f := storeNew(t)
	u := f.user("a@example.com")

	t.Run("returns and advances", func(t *testing.T) {
		sid := newUUID()
		step := f.step(u, sid, "step")
		u1 := f.userMsg(u, sid, "u1", false)
		u2 := f.userMsg(u, sid, "u2", false)
		msgs, stale := f.pending(u, sid, step.Message.ID)
		if stale {
			t.Fatal("stale with the current pointer")
		}
		storeWantContents(t, "pending", msgs, "u1", "u2")
		if msgs[0].ID != u1.ID || msgs[1].ID != u2.ID {
			t.Errorf("ids = %s %s, want %s %s", msgs[0].ID, msgs[1].ID, u1.ID, u2.ID)
		}
		if got := f.session(sid); got.ReadID.String != u2.ID || got.ReadSeq != u2.Seq {
			t.Errorf("pointer = %v, want %s", got.ReadID, u2.ID)
		}
		// Asking again from the new pointer: nothing new, not stale.
		msgs, stale = f.pending(u, sid, u2.ID)
		if stale || len(msgs) != 0 {
			t.Errorf("second pending = %q stale=%v, want none", storeContents(msgs), stale)
		}
	})

	t.Run("stale when the pointer moved", func(t *testing.T) {
		sid := newUUID()
		step := f.step(u, sid, "step")
		f.userMsg(u, sid, "u1", false)
		if msgs, _ := f.pending(u, sid, step.Message.ID); len(msgs) != 1 {
			t.Fatalf("first reader got %d", len(msgs))
		}
		u2 := f.userMsg(u, sid, "u2", false)
		before := f.session(sid)
		msgs, stale := f.pending(u, sid, step.Message.ID) // a reader still at the old pointer
		if !stale || len(msgs) != 0 {
			t.Fatalf("pending from an old pointer = %q stale=%v, want stale and nothing", storeContents(msgs), stale)
		}
		if after := f.session(sid); after != before {
			t.Errorf("a stale pending moved the pointer: %+v -> %+v", before, after)
		}
		// An id that was never a pointer is stale too.
		if _, stale := f.pending(u, sid, newUUID()); !stale {
			t.Error("unknown last_read_message_id not stale")
		}
		// u2 is still there for a reader at the current pointer.
		msgs, stale = f.pending(u, sid, before.ReadID.String)
		if stale || len(msgs) != 1 || msgs[0].ID != u2.ID {
			t.Errorf("pending from the current pointer = %q stale=%v", storeContents(msgs), stale)
		}
	})

	t.Run("empty last_read_message_id", func(t *testing.T) {
		sid := newUUID()
		f.step(u, sid, "step")
		f.userMsg(u, sid, "u1", false)
		f.userMsg(u, sid, "u2", false)
		msgs, stale := f.pending(u, sid, "")
		if stale {
			t.Fatal("stale without a last_read_message_id")
		}
		storeWantContents(t, "pending", msgs, "u1", "u2")
		msgs, stale = f.pending(u, sid, "")
		if stale || len(msgs) != 0 {
			t.Errorf("second pending = %q stale=%v", storeContents(msgs), stale)
		}
	})

	t.Run("only user messages", func(t *testing.T) {
		sid := newUUID()
		step := f.step(u, sid, "step")
		f.userMsg(u, sid, "read", true)
		msgs, stale := f.pending(u, sid, "")
		if stale || len(msgs) != 0 {
			t.Errorf("pending after a marked-read message = %q stale=%v", storeContents(msgs), stale)
		}
		// The pointer now is the marked-read message, not the step.
		if _, stale := f.pending(u, sid, step.Message.ID); !stale {
			t.Error("the step is no longer the pointer, want stale")
		}
	})

	t.Run("unknown session", func(t *testing.T) {
		if _, _, _, err := f.s.pending(f.ctx, u, newUUID(), ""); !errors.Is(err, errNotFound) {
			t.Errorf("err = %v, want errNotFound", err)
		}
	})
}

// TestStorePendingExactlyOnce races 20 pollers on one session while user
// messages are being added: every message must reach exactly one of them.
func TestStorePendingExactlyOnce(t *testing.T) {
	for _, tc := range []struct {
		name      string
		pointers  bool // pollers name the pointer they believe in (many go stale)
		logSteps  int  // goroutines also taking feedback through agent messages
		pollers   int
		writers   int
		perWriter int
	}{
		{"pending only", false, 0, 20, 2, 30},
		{"pending with pointers", true, 0, 20, 2, 30},
		{"pending and log steps", false, 4, 20, 2, 30},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := storeNew(t)
			u := f.user("a@example.com")
			sid := f.newSession(u)

			var (
				mu      sync.Mutex
				got     = map[string]int{}
				written = map[string]bool{}
				errs    = make(chan error, 100)
				start   = make(chan struct{})
				done    = make(chan struct{}) // closed when every writer is done
				wg, wwg sync.WaitGroup
			)
			// take records one batch; a taker's batches come in seq order.
			take := func(lastSeq *int64, msgs []message) {
				mu.Lock()
				defer mu.Unlock()
				for _, m := range msgs {
					got[m.ID]++
					if m.Seq <= *lastSeq {
						errs <- fmt.Errorf("seq %d delivered after %d to the same taker", m.Seq, *lastSeq)
					}
					*lastSeq = m.Seq
				}
			}
			for w := range tc.writers {
				wwg.Add(1)
				go func() {
					defer wwg.Done()
					<-start
					for i := range tc.perWriter {
						m, err := f.s.addUserMessage(f.ctx, u, sid, fmt.Sprintf("w%d-%d", w, i), false)
						if err != nil {
							errs <- err
							return
						}
						mu.Lock()
						written[m.ID] = true
						mu.Unlock()
					}
				}()
			}
			go func() { wwg.Wait(); close(done) }()
			var polls atomic.Int64
			for range tc.pollers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					var last int64
					var pointer string // "" unless tc.pointers
					lookUp := func() error {
						return f.db.QueryRowContext(f.ctx, `SELECT last_read_message_id FROM agent_instances WHERE id = $1`, sid).Scan(&pointer)
					}
					if tc.pointers {
						if err := lookUp(); err != nil {
							errs <- err
							return
						}
					}
					stales := 0 // in a row
					for {
						// Read done before polling, so the last poll of each
						// poller sees every message.
						finished := storeClosed(done)
						msgs, stale, _, err := f.s.pending(f.ctx, u, sid, pointer)
						polls.Add(1)
						if err != nil {
							errs <- fmt.Errorf("pending: %v", err)
							return
						}
						if stale && !tc.pointers {
							errs <- errors.New("stale without a pointer")
							return
						}
						if stale {
							if len(msgs) != 0 {
								errs <- fmt.Errorf("stale pending returned %d messages", len(msgs))
							}
							// Someone else moved the pointer: look it up (it
							// may move again before the next poll).
							if err := lookUp(); err != nil {
								errs <- err
								return
							}
							if stales++; stales < 1000 {
								continue // a stale poll must not end the last round
							}
							errs <- errors.New("stale 1000 times in a row")
							return
						}
						stales = 0
						take(&last, msgs)
						if tc.pointers && len(msgs) > 0 {
							pointer = msgs[len(msgs)-1].ID
						}
						if finished {
							return
						}
					}
				}()
			}
			for i := range tc.logSteps {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					var last int64
					for n := 0; ; n++ {
						finished := storeClosed(done)
						r, err := f.s.addAgentMessage(f.ctx, u, agentMessage{SessionID: sid, Content: fmt.Sprintf("step %d-%d", i, n)})
						if err != nil {
							errs <- err
							return
						}
						take(&last, r.Feedback)
						if finished {
							return
						}
					}
				}()
			}
			close(start)
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			if t.Failed() {
				return
			}
			want := tc.writers * tc.perWriter
			if len(written) != want {
				t.Fatalf("written %d messages, want %d", len(written), want)
			}
			delivered := 0
			for id, n := range got {
				if !written[id] {
					t.Errorf("delivered %s, which no writer wrote", id)
				}
				if n != 1 {
					t.Errorf("message %s delivered %d times", id, n)
				}
				delivered += n
			}
			for id := range written {
				if got[id] == 0 {
					t.Errorf("message %s never delivered", id)
				}
			}
			t.Logf("%d messages, %d deliveries, %d polls", want, delivered, polls.Load())
			if msgs, _ := f.pending(u, sid, ""); len(msgs) != 0 {
				t.Errorf("left over: %q", storeContents(msgs))
			}
		})
	}
}

func storeClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// ---- order ----

// TestStoreOrderSameTransactionAndMillisecond: messages whose timestamps are
// equal, or run backwards (skewed clocks), keep the order they were stored in.
func TestStoreOrderSameTransactionAndMillisecond(t *testing.T) {
	t.Parallel()
	f := storeNew(t)
	u := f.user("a@example.com")

	t.Run("same transaction", func(t *testing.T) {
		sid := f.newSession(u)
		tx, err := f.db.BeginTx(f.ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback()
		if _, _, _, err := lockSession(f.ctx, tx, u, sid); err != nil {
			t.Fatal(err)
		}
		var ms []message
		for i := range 3 {
			m, _, err := insertAgentMessage(f.ctx, tx, u, agentMessage{SessionID: sid, Content: fmt.Sprint("a", i)}, true)
			if err != nil {
				t.Fatal(err)
			}
			ms = append(ms, m)
		}
		// Three user messages in one statement of the same transaction.
		if _, err := tx.ExecContext(f.ctx, `
			INSERT INTO messages (agent_instance_id, user_id, sender_type, content)
			VALUES ($1, $2, 'USER', 'u0'), ($1, $2, 'USER', 'u1'), ($1, $2, 'USER', 'u2')`, sid, u); err != nil {
			t.Fatal(err)
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		for i := 1; i < len(ms); i++ {
			if !ms[i].CreatedAt.Equal(ms[0].CreatedAt) {
				t.Errorf("created_at differs inside one transaction: %v vs %v", ms[i].CreatedAt, ms[0].CreatedAt)
			}
			if ms[i].Seq <= ms[i-1].Seq {
				t.Errorf("seq %d after %d", ms[i].Seq, ms[i-1].Seq)
			}
		}
		if got := f.session(sid); got.ReadID.String != ms[2].ID {
			t.Errorf("pointer = %v, want the last agent message %s", got.ReadID, ms[2].ID)
		}
		r := f.step(u, sid, "next")
		storeWantContents(t, "feedback", r.Feedback, "u0", "u1", "u2")
	})

	t.Run("equal and backwards timestamps", func(t *testing.T) {
		sid := f.newSession(u)
		var want []string
		for i := range 40 {
			want = append(want, fmt.Sprint("m", i))
			f.userMsg(u, sid, want[i], false)
		}
		// Every message in the same instant: order can only come from seq.
		if _, err := f.db.ExecContext(f.ctx, `UPDATE messages SET created_at = '2030-01-01T00:00:00Z' WHERE agent_instance_id = $1`, sid); err != nil {
			t.Fatal(err)
		}
		tx, err := f.db.BeginTx(f.ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		readSeq, _, _, err := lockSession(f.ctx, tx, u, sid)
		if err != nil {
			t.Fatal(err)
		}
		fb, err := feedbackAfter(f.ctx, tx, u, sid, readSeq)
		tx.Rollback()
		if err != nil {
			t.Fatal(err)
		}
		storeWantContents(t, "feedback with equal timestamps", fb, want...)

		// Clocks running backwards (a replica behind): still stored order.
		if _, err := f.db.ExecContext(f.ctx, `
			UPDATE messages SET created_at = '2030-01-01T00:00:00Z'::timestamptz - seq * interval '1 second'
			WHERE agent_instance_id = $1`, sid); err != nil {
			t.Fatal(err)
		}
		msgs, _ := f.pending(u, sid, "")
		storeWantContents(t, "pending with backwards timestamps", msgs, want...)
	})
}

// TestStoreOrderLaterCommitLargerSeq: while one transaction that added a
// message to a user's session is open, a message to another session of the
// same user waits for it, so the one that commits later has the larger seq.
func TestStoreOrderLaterCommitLargerSeq(t *testing.T) {
	t.Parallel()
	f := storeNew(t)
	u := f.user("a@example.com")
	other := f.user("b@example.com")
	otherSession := f.newSession(other)
	for _, tc := range []struct {
		name string
		add  func(sid string) (message, error)
	}{
		{"user message", func(sid string) (message, error) {
			return f.s.addUserMessage(f.ctx, u, sid, "later", false)
		}},
		{"agent message", func(sid string) (message, error) {
			r, err := f.s.addAgentMessage(f.ctx, u, agentMessage{SessionID: sid, Content: "later"})
			return r.Message, err
		}},
		{"question", func(sid string) (message, error) {
			q, err := f.s.askQuestion(f.ctx, u, sid, "later?", time.Hour)
			return message{ID: q.ID, Seq: q.Seq}, err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s1, s2 := f.newSession(u), f.newSession(u)
			// Transaction B takes its seq first and stays open.
			tx, err := f.db.BeginTx(f.ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer tx.Rollback()
			if _, _, _, err := lockSession(f.ctx, tx, u, s2); err != nil {
				t.Fatal(err)
			}
			b, _, err := insertAgentMessage(f.ctx, tx, u, agentMessage{SessionID: s2, Content: "first"}, true)
			if err != nil {
				t.Fatal(err)
			}
			type result struct {
				m   message
				err error
			}
			aDone := make(chan result, 1)
			go func() {
				m, err := tc.add(s1)
				aDone <- result{m, err}
			}()
			// Another user is not held up.
			if _, err := f.s.addAgentMessage(f.ctx, other, agentMessage{SessionID: otherSession, Content: "x"}); err != nil {
				t.Fatal(err)
			}
			// A must be waiting on a lock while B is open; had it committed
			// now, it would have a larger seq yet be visible before B.
			deadline := time.Now().Add(10 * time.Second)
			for {
				select {
				case r := <-aDone:
					t.Fatalf("A committed (seq %d, err %v) while B (seq %d) was still open", r.m.Seq, r.err, b.Seq)
				default:
				}
				if f.count(`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`) > 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("A neither finished nor waited on a lock")
				}
				time.Sleep(5 * time.Millisecond)
			}
			if err := tx.Commit(); err != nil {
				t.Fatal(err)
			}
			r := <-aDone
			if r.err != nil {
				t.Fatal(r.err)
			}
			if r.m.Seq <= b.Seq {
				t.Errorf("A committed after B but seq %d <= %d", r.m.Seq, b.Seq)
			}
		})
	}
}

// TestStoreOrderConcurrentCommits has writers race on two sessions of one
// user, some holding their transaction open a little after taking a seq,
// while an observer checks that a user's messages become visible in seq
// order: no message ever appears with a seq below one already seen (which is
// what resuming the event stream by seq relies on).
func TestStoreOrderConcurrentCommits(t *testing.T) {
	f := storeNew(t)
	u := f.user("a@example.com")
	sessions := []string{f.newSession(u), f.newSession(u)}
	const writers, perWriter = 6, 25
	var wg sync.WaitGroup
	errs := make(chan error, writers+1)
	start := make(chan struct{})
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for i := range perWriter {
				sid := sessions[(w+i)%2]
				var err error
				switch w % 3 {
				case 0:
					_, err = f.s.addUserMessage(f.ctx, u, sid, "u", false)
				case 1:
					_, err = f.s.addAgentMessage(f.ctx, u, agentMessage{SessionID: sid, Content: "a"})
				default:
					// Take a seq, then hold the transaction open for a while.
					err = f.s.inTx(f.ctx, func(tx *sql.Tx) error {
						if _, _, _, err := lockSession(f.ctx, tx, u, sid); err != nil {
							return err
						}
						if _, _, err := insertAgentMessage(f.ctx, tx, u, agentMessage{SessionID: sid, Content: "slow"}, true); err != nil {
							return err
						}
						_, err := tx.ExecContext(f.ctx, `SELECT pg_sleep($1)`, rand.Float64()*0.003)
						return err
					})
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	writing := make(chan struct{})
	go func() { wg.Wait(); close(writing) }()

	seen := map[int64]bool{}
	var maxSeen int64
	observe := func() {
		rows, err := f.db.QueryContext(f.ctx, `SELECT seq FROM messages WHERE user_id = $1 ORDER BY seq`, u)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		var top int64
		for rows.Next() {
			var seq int64
			if err := rows.Scan(&seq); err != nil {
				t.Fatal(err)
			}
			if !seen[seq] && seq < maxSeen {
				t.Errorf("seq %d became visible after seq %d", seq, maxSeen)
			}
			seen[seq] = true
			top = max(top, seq)
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		maxSeen = max(maxSeen, top)
	}
	close(start)
	observations := 0
	for !storeClosed(writing) {
		observe()
		observations++
	}
	observe()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if want := 2 + writers*perWriter; len(seen) != want {
		t.Errorf("saw %d messages, want %d", len(seen), want)
	}
	t.Logf("%d observations", observations)
}

// ---- status ----

func TestStoreStatusTransitions(t *testing.T) {
	t.Parallel()
	f := storeNew(t)
	u := f.user("a@example.com")
	sid := newUUID()
	want := func(status string) {
		t.Helper()
		if got := f.session(sid).Status; got != status {
			t.Fatalf("status = %s, want %s", got, status)
		}
	}
	step := f.step(u, sid, "step")
	want(statusActive)
	f.agent(u, agentMessage{SessionID: sid, Content: "a question?", RequiresUserInput: true})
	want(statusAwaitingInput)
	f.userMsg(u, sid, "an answer", false)
	want(statusActive)

	step = f.step(u, sid, "another step")
	if _, _, _, err := f.s.requestInput(f.ctx, u, step.Message.ID); err != nil {
		t.Fatal(err)
	}
	want(statusAwaitingInput)
	f.userMsg(u, sid, "answer", true)
	want(statusActive)

	f.ask(u, sid, "asked?")
	want(statusAwaitingInput)
	f.step(u, sid, "moved on") // supersedes the question
	want(statusActive)

	if err := f.s.endSession(f.ctx, u, sid); err != nil {
		t.Fatal(err)
	}
	want(statusCompleted)
	ended := f.session(sid).EndedAt
	if !ended.Valid {
		t.Fatal("ended_at not set")
	}
	step = f.step(u, sid, "after the end")
	want(statusCompleted)
	f.agent(u, agentMessage{SessionID: sid, Content: "question after the end", RequiresUserInput: true})
	want(statusCompleted)
	f.userMsg(u, sid, "user after the end", false)
	want(statusCompleted)
	f.ask(u, sid, "ask after the end?")
	want(statusCompleted)
	step = f.step(u, sid, "one more")
	if _, _, _, err := f.s.requestInput(f.ctx, u, step.Message.ID); err != nil {
		t.Fatal(err)
	}
	want(statusCompleted)
	if err := f.s.endSession(f.ctx, u, sid); err != nil {
		t.Fatalf("second end: %v", err)
	}
	want(statusCompleted)
	if again := f.session(sid).EndedAt; !again.Time.Equal(ended.Time) {
		t.Errorf("ended_at moved from %v to %v", ended.Time, again.Time)
	}
	if err := f.s.endSession(f.ctx, u, newUUID()); !errors.Is(err, errNotFound) {
		t.Errorf("end unknown session: %v, want errNotFound", err)
	}
}

// ---- request input ----

func TestStoreRequestInput(t *testing.T) {
	t.Parallel()
	f := storeNew(t)
	u := f.user("a@example.com")

	t.Run("a user message is not found", func(t *testing.T) {
		sid := f.newSession(u)
		um := f.userMsg(u, sid, "mine", false)
		before := f.snapshot()
		if _, _, _, err := f.s.requestInput(f.ctx, u, um.ID); !errors.Is(err, errNotFound) {
			t.Fatalf("err = %v, want errNotFound", err)
		}
		if _, _, _, err := f.s.requestInput(f.ctx, u, newUUID()); !errors.Is(err, errNotFound) {
			t.Fatalf("unknown id: err = %v, want errNotFound", err)
		}
		if f.snapshot() != before {
			t.Error("a refused request-input changed rows")
		}
	})

	t.Run("not twice", func(t *testing.T) {
		sid := newUUID()
		step := f.step(u, sid, "step")
		gotSession, msgs, stale, err := f.s.requestInput(f.ctx, u, step.Message.ID)
		if err != nil || gotSession != sid || stale || len(msgs) != 0 {
			t.Fatalf("request input = %s %q %v %v", gotSession, storeContents(msgs), stale, err)
		}
		if st := f.session(sid).Status; st != statusAwaitingInput {
			t.Errorf("status = %s, want AWAITING_INPUT", st)
		}
		if f.count(`SELECT count(*) FROM messages WHERE id = $1 AND requires_user_input`, step.Message.ID) != 1 {
			t.Error("message not marked as asking")
		}
		if _, _, _, err := f.s.requestInput(f.ctx, u, step.Message.ID); !errors.Is(err, errConflict) {
			t.Errorf("second request input: %v, want errConflict", err)
		}
		q := f.agent(u, agentMessage{SessionID: sid, Content: "already asks", RequiresUserInput: true})
		if _, _, _, err := f.s.requestInput(f.ctx, u, q.Message.ID); !errors.Is(err, errConflict) {
			t.Errorf("request input on a question: %v, want errConflict", err)
		}
	})

	t.Run("stale when not the read pointer", func(t *testing.T) {
		sid := newUUID()
		old := f.step(u, sid, "old")
		f.step(u, sid, "newer")
		_, msgs, stale, err := f.s.requestInput(f.ctx, u, old.Message.ID)
		if err != nil || !stale || len(msgs) != 0 {
			t.Fatalf("request input on an old message = %q stale=%v err=%v, want stale", storeContents(msgs), stale, err)
		}
	})

	t.Run("returns queued messages", func(t *testing.T) {
		sid := newUUID()
		step := f.step(u, sid, "step")
		f.userMsg(u, sid, "q1", false)
		u2 := f.userMsg(u, sid, "q2", false)
		_, msgs, stale, err := f.s.requestInput(f.ctx, u, step.Message.ID)
		if err != nil || stale {
			t.Fatalf("request input: stale=%v err=%v", stale, err)
		}
		storeWantContents(t, "queued", msgs, "q1", "q2")
		got := f.session(sid)
		if got.ReadID.String != u2.ID {
			t.Errorf("pointer = %v, want %s", got.ReadID, u2.ID)
		}
		if got.Status != statusActive {
			t.Errorf("status = %s, want ACTIVE (the input is already there)", got.Status)
		}
		if msgs, _ := f.pending(u, sid, ""); len(msgs) != 0 {
			t.Errorf("delivered again: %q", storeContents(msgs))
		}
	})
}

// ---- sessions and agent types ----

func TestStoreAgentTypes(t *testing.T) {
	t.Parallel()
	f := storeNew(t)
	u := f.user("a@example.com")
	other := f.user("b@example.com")
	s1, s2, s3 := newUUID(), newUUID(), newUUID()
	f.agent(u, agentMessage{SessionID: s1, AgentType: "Claude-Code", Content: "x"})
	f.agent(u, agentMessage{SessionID: s2, AgentType: "claude-code", Content: "x"})
	f.agent(other, agentMessage{SessionID: s3, AgentType: "CLAUDE-CODE", Content: "x"})
	if n := f.count(`SELECT count(*) FROM user_agents WHERE user_id = $1`, u); n != 1 {
		t.Errorf("user_agents rows = %d, want 1", n)
	}
	if n := f.count(`SELECT count(*) FROM user_agents WHERE user_id = $1 AND name = 'claude-code'`, other); n != 1 {
		t.Errorf("other user's rows = %d, want 1 of their own", n)
	}
	a1, a2, a3 := f.session(s1).UserAgentID, f.session(s2).UserAgentID, f.session(s3).UserAgentID
	if a1 != a2 {
		t.Errorf("sessions of one agent type have user agents %s and %s", a1, a2)
	}
	if a3 == a1 {
		t.Error("two users share a user_agents row")
	}

	// An existing session needs no type, and a different one changes nothing.
	f.agent(u, agentMessage{SessionID: s1, AgentType: "Cursor", Content: "y"})
	if _, err := f.s.addAgentMessage(f.ctx, u, agentMessage{SessionID: s1, Content: "z"}); err != nil {
		t.Errorf("existing session without a type: %v", err)
	}
	if f.session(s1).UserAgentID != a1 {
		t.Error("a later agent type moved the session")
	}
	if n := f.count(`SELECT count(*) FROM user_agents WHERE user_id = $1`, u); n != 1 {
		t.Errorf("user_agents rows = %d after messages to an existing session, want 1", n)
	}

	// A new session without a type is refused and creates nothing.
	before := f.snapshot()
	if _, err := f.s.addAgentMessage(f.ctx, u, agentMessage{SessionID: newUUID(), Content: "x"}); !errors.Is(err, errNeedAgentType) {
		t.Errorf("new session without a type: %v, want errNeedAgentType", err)
	}
	if f.snapshot() != before {
		t.Error("a refused create changed rows")
	}
	// Another type makes a second row, once.
	f.agent(u, agentMessage{SessionID: newUUID(), AgentType: "Cursor", Content: "x"})
	f.agent(u, agentMessage{SessionID: newUUID(), AgentType: "cursor", Content: "x"})
	if n := f.count(`SELECT count(*) FROM user_agents WHERE user_id = $1`, u); n != 2 {
		t.Errorf("user_agents rows = %d, want 2", n)
	}
}

// TestStoreConcurrentCreate: many first messages naming one new id at once
// make one session, and each message is stored once.
func TestStoreConcurrentCreate(t *testing.T) {
	t.Parallel()
	f := storeNew(t)
	u := f.user("a@example.com")
	sid := newUUID()
	const n = 8
	var wg sync.WaitGroup
	errs := make(chan error, n)
	start := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			_, err := f.s.addAgentMessage(f.ctx, u, agentMessage{SessionID: sid, AgentType: []string{"Claude-Code", "claude-code"}[i%2], Content: "x"})
			errs <- err
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if got := f.session(sid).Steps; got != n {
		t.Errorf("step_count = %d, want %d", got, n)
	}
	if c := f.count(`SELECT count(*) FROM user_agents WHERE user_id = $1`, u); c != 1 {
		t.Errorf("user_agents rows = %d, want 1", c)
	}
}

func TestStoreStepCount(t *testing.T) {
	t.Parallel()
	f := storeNew(t)
	u := f.user("a@example.com")
	sid := newUUID()
	for i, tc := range []struct {
		asks bool
		want int
	}{{false, 1}, {false, 2}, {true, 2}, {false, 3}, {true, 3}} {
		r := f.agent(u, agentMessage{SessionID: sid, Content: fmt.Sprint("m", i), RequiresUserInput: tc.asks})
		if r.Steps != tc.want {
			t.Errorf("message %d (asks=%v): steps = %d, want %d", i, tc.asks, r.Steps, tc.want)
		}
	}
	f.ask(u, sid, "via ask_question?")
	f.userMsg(u, sid, "user", false)
	if got := f.session(sid).Steps; got != 3 {
		t.Errorf("step_count = %d, want 3", got)
	}
	if r := f.step(u, sid, "last"); r.Steps != 4 {
		t.Errorf("steps = %d, want 4", r.Steps)
	}
}

// ---- questions ----

func TestStoreQuestions(t *testing.T) {
	t.Parallel()
	f := storeNew(t)
	u := f.user("a@example.com")
	msgCount := func(sid string) int {
		return f.count(`SELECT count(*) FROM messages WHERE agent_instance_id = $1`, sid)
	}

	t.Run("answered", func(t *testing.T) {
		sid := f.newSession(u)
		q := f.ask(u, sid, "which one?")
		if q.Resumed || q.ID == "" {
			t.Fatalf("question = %+v", q)
		}
		if st, _ := f.answer(u, sid, q); st != questionOpen {
			t.Fatalf("state = %v, want open", st)
		}
		a1 := f.userMsg(u, sid, "the first", false)
		f.userMsg(u, sid, "and more", false)
		st, ans := f.answer(u, sid, q)
		if st != questionAnswered || ans.ID != a1.ID || ans.Content != "the first" {
			t.Fatalf("state = %v answer = %+v, want answered by %s", st, ans, a1.ID)
		}
		got := f.session(sid)
		if got.ReadID.String != a1.ID || got.AnsweredSeq != q.Seq {
			t.Errorf("pointer = %v answered seq = %d, want %s and %d", got.ReadID, got.AnsweredSeq, a1.ID, q.Seq)
		}
		if got.Status != statusActive {
			t.Errorf("status = %s, want ACTIVE", got.Status)
		}
		// The answer is not feedback again; what came after it is.
		r := f.step(u, sid, "next")
		storeWantContents(t, "feedback after the answer", r.Feedback, "and more")
	})

	// An answer a pending poll already took is not handed out again as
	// the question's answer: each user message reaches exactly one caller.
	t.Run("answer taken by pending is not delivered twice", func(t *testing.T) {
		sid := f.newSession(u)
		q := f.ask(u, sid, "which one?")
		f.userMsg(u, sid, "taken by a poller", false)
		msgs, stale, _, err := f.s.pending(f.ctx, u, sid, "")
		if err != nil || stale {
			t.Fatal(err, stale)
		}
		storeWantContents(t, "pending", msgs, "taken by a poller")
		if st, ans := f.answer(u, sid, q); st != questionOpen {
			t.Fatalf("state = %v answer = %q, want still open", st, ans.Content)
		}
		f.userMsg(u, sid, "for the question", false)
		if st, ans := f.answer(u, sid, q); st != questionAnswered || ans.Content != "for the question" {
			t.Fatalf("state = %v answer = %q, want answered by the next message", st, ans.Content)
		}
	})

	// mark_as_read moves the read pointer but hands nothing to the agent:
	// such a message still answers a waiting question.
	t.Run("answer marked as read still answers", func(t *testing.T) {
		sid := f.newSession(u)
		q := f.ask(u, sid, "which one?")
		f.userMsg(u, sid, "marked read", true)
		if st, ans := f.answer(u, sid, q); st != questionAnswered || ans.Content != "marked read" {
			t.Fatalf("state = %v answer = %q, want answered", st, ans.Content)
		}
	})

	t.Run("superseded", func(t *testing.T) {
		sid := f.newSession(u)
		q := f.ask(u, sid, "which one?")
		f.step(u, sid, "moved on")
		f.userMsg(u, sid, "too late", false)
		if st, _ := f.answer(u, sid, q); st != questionSuperseded {
			t.Errorf("state = %v, want superseded", st)
		}
	})

	t.Run("ended", func(t *testing.T) {
		sid := f.newSession(u)
		q := f.ask(u, sid, "which one?")
		if err := f.s.endSession(f.ctx, u, sid); err != nil {
			t.Fatal(err)
		}
		if st, _ := f.answer(u, sid, q); st != questionEnded {
			t.Errorf("state = %v, want ended", st)
		}
	})

	t.Run("resume while open", func(t *testing.T) {
		sid := f.newSession(u)
		q := f.ask(u, sid, "same?")
		n := msgCount(sid)
		again := f.ask(u, sid, "same?")
		if !again.Resumed || again.ID != q.ID || again.Seq != q.Seq {
			t.Fatalf("second ask = %+v, want resumed %s", again, q.ID)
		}
		if msgCount(sid) != n {
			t.Error("resuming stored a message")
		}
		// Answered while no call waited: the resumed call gets it at once.
		f.userMsg(u, sid, "yes", false)
		again = f.ask(u, sid, "same?")
		if !again.Resumed || again.ID != q.ID {
			t.Fatalf("ask after an unpicked answer = %+v, want resumed", again)
		}
		if st, ans := f.answer(u, sid, again); st != questionAnswered || ans.Content != "yes" {
			t.Fatalf("state = %v answer %q", st, ans.Content)
		}
		// Its answer returned, asking the same again (a client that never
		// saw the result) returns the same answer again.
		again = f.ask(u, sid, "same?")
		if !again.Resumed || again.ID != q.ID {
			t.Fatalf("ask after the answer was returned = %+v, want resumed", again)
		}
		if st, ans := f.answer(u, sid, again); st != questionAnswered || ans.Content != "yes" {
			t.Fatalf("state = %v answer %q, want the same answer again", st, ans.Content)
		}
		// After a step, the same text is a new question.
		f.step(u, sid, "a step")
		fresh := f.ask(u, sid, "same?")
		if fresh.Resumed || fresh.ID == q.ID || fresh.Seq <= q.Seq {
			t.Errorf("ask after a step = %+v, want a new question", fresh)
		}
		if st, _ := f.answer(u, sid, fresh); st != questionOpen {
			t.Errorf("new question state = %v, want open (the old answer is not its answer)", st)
		}
	})

	t.Run("different text", func(t *testing.T) {
		sid := f.newSession(u)
		q := f.ask(u, sid, "first?")
		other := f.ask(u, sid, "second?")
		if other.Resumed || other.ID == q.ID {
			t.Fatalf("different text = %+v, want a new question", other)
		}
		if st, _ := f.answer(u, sid, q); st != questionSuperseded {
			t.Errorf("old question state = %v, want superseded", st)
		}
		// Same text but not the latest agent message: a new question.
		f.step(u, sid, "a step")
		third := f.ask(u, sid, "second?")
		if third.Resumed || third.ID == other.ID {
			t.Errorf("same text after a step = %+v, want a new question", third)
		}
	})

	t.Run("queued feedback", func(t *testing.T) {
		sid := f.newSession(u)
		f.userMsg(u, sid, "fb1", false)
		f.userMsg(u, sid, "fb2", false)
		q := f.ask(u, sid, "well?")
		if st, _ := f.answer(u, sid, q); st != questionOpen {
			t.Errorf("state = %v: feedback before the question is not its answer", st)
		}
		if f.session(sid).ReadID.String == q.ID {
			t.Error("asking moved the pointer past feedback nobody was handed")
		}
		// The call that returns hands the feedback over, once.
		o, err := f.s.questionOutcome(f.ctx, u, sid, q, time.Hour, true)
		if err != nil || o.State != questionOpen {
			t.Fatal(o.State, err)
		}
		storeWantContents(t, "question feedback", o.Feedback, "fb1", "fb2")
		if msgs, _ := f.pending(u, sid, ""); len(msgs) != 0 {
			t.Errorf("feedback delivered again: %q", storeContents(msgs))
		}
	})

	t.Run("unknown session", func(t *testing.T) {
		if _, err := f.s.askQuestion(f.ctx, u, newUUID(), "x?", time.Hour); !errors.Is(err, errNotFound) {
			t.Errorf("err = %v, want errNotFound", err)
		}
	})
}

// TestStoreConcurrentAsk: several calls asking the same question at once
// store it once; the others resume it.
func TestStoreConcurrentAsk(t *testing.T) {
	t.Parallel()
	f := storeNew(t)
	u := f.user("a@example.com")
	sid := f.newSession(u)
	const n = 8
	qs := make([]question, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			qs[i], errs[i] = f.s.askQuestion(f.ctx, u, sid, "same?", time.Hour)
		}()
	}
	close(start)
	wg.Wait()
	fresh := 0
	for i, q := range qs {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if !q.Resumed {
			fresh++
		}
		if q.ID != qs[0].ID {
			t.Errorf("call %d got question %s, call 0 got %s", i, q.ID, qs[0].ID)
		}
	}
	if fresh != 1 {
		t.Errorf("%d calls stored the question, want 1", fresh)
	}
	if c := f.count(`SELECT count(*) FROM messages WHERE agent_instance_id = $1 AND content = 'same?'`, sid); c != 1 {
		t.Errorf("%d questions stored, want 1", c)
	}
}

// ---- tenant isolation ----

// TestStoreOtherUser calls every session method with another user's id: each
// must answer errNotFound (or, for a create without a type, the same error a
// missing session gives) and change nothing.
func TestStoreOtherUser(t *testing.T) {
	t.Parallel()
	f := storeNew(t)
	alice := f.user("alice@example.com")
	bob := f.user("bob@example.com")
	sid := newUUID()
	step := f.step(alice, sid, "alice's step")
	um := f.userMsg(alice, sid, "alice's feedback", false)
	q := f.ask(alice, sid, "alice's question?")
	f.userMsg(alice, sid, "alice's answer", false)

	for _, tc := range []struct {
		name string
		call func() error
		want error
	}{
		{"addAgentMessage", func() error {
			_, err := f.s.addAgentMessage(f.ctx, bob, agentMessage{SessionID: sid, AgentType: "claude-code", Content: "bob"})
			return err
		}, errNotFound},
		{"addAgentMessage asking", func() error {
			_, err := f.s.addAgentMessage(f.ctx, bob, agentMessage{SessionID: sid, AgentType: "cursor", Content: "bob", RequiresUserInput: true, GitDiff: new(string)})
			return err
		}, errNotFound},
		{"addAgentMessage without type", func() error {
			_, err := f.s.addAgentMessage(f.ctx, bob, agentMessage{SessionID: sid, Content: "bob"})
			return err
		}, errNeedAgentType},
		{"addUserMessage", func() error {
			_, err := f.s.addUserMessage(f.ctx, bob, sid, "bob", false)
			return err
		}, errNotFound},
		{"addUserMessage marked read", func() error {
			_, err := f.s.addUserMessage(f.ctx, bob, sid, "bob", true)
			return err
		}, errNotFound},
		{"pending", func() error {
			_, _, _, err := f.s.pending(f.ctx, bob, sid, "")
			return err
		}, errNotFound},
		{"pending with pointer", func() error {
			_, _, _, err := f.s.pending(f.ctx, bob, sid, step.Message.ID)
			return err
		}, errNotFound},
		{"requestInput", func() error {
			_, _, _, err := f.s.requestInput(f.ctx, bob, step.Message.ID)
			return err
		}, errNotFound},
		{"requestInput on a user message", func() error {
			_, _, _, err := f.s.requestInput(f.ctx, bob, um.ID)
			return err
		}, errNotFound},
		{"endSession", func() error { return f.s.endSession(f.ctx, bob, sid) }, errNotFound},
		{"askQuestion", func() error {
			_, err := f.s.askQuestion(f.ctx, bob, sid, "alice's question?", time.Hour)
			return err
		}, errNotFound},
		{"answer", func() error {
			_, err := f.s.questionOutcome(f.ctx, bob, sid, q, time.Hour, true)
			return err
		}, errNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := f.snapshot()
			if err := tc.call(); !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if after := f.snapshot(); after != before {
				t.Errorf("rows changed:\nbefore:\n%s\nafter:\n%s", before, after)
			}
		})
	}
	if n := f.count(`SELECT count(*) FROM user_agents WHERE user_id = $1`, bob); n != 0 {
		t.Errorf("bob has %d user_agents rows", n)
	}

	// The read side shows bob none of alice's rows.
	t.Run("reads", func(t *testing.T) {
		if list, err := f.s.listSessions(f.ctx, bob, "", nil, 200); err != nil || len(list) != 0 {
			t.Errorf("listSessions = %d sessions, %v", len(list), err)
		}
		if _, err := f.s.sessionMessages(f.ctx, bob, sid, 0, 200); !errors.Is(err, errNotFound) {
			t.Errorf("sessionMessages: %v, want errNotFound", err)
		}
		if seq, err := f.s.latestSeq(f.ctx, bob); err != nil || seq != 0 {
			t.Errorf("latestSeq = %d, %v", seq, err)
		}
		if msgs, err := f.s.messagesAfter(f.ctx, bob, 0, 200); err != nil || len(msgs) != 0 {
			t.Errorf("messagesAfter = %d messages, %v", len(msgs), err)
		}
		if list, err := f.s.recentSessions(f.ctx, bob, time.Hour); err != nil || len(list) != 0 {
			t.Errorf("recentSessions = %d sessions, %v", len(list), err)
		}
		// And alice sees hers, so the calls above could have found something.
		if list, err := f.s.listSessions(f.ctx, alice, "", nil, 200); err != nil || len(list) != 1 {
			t.Errorf("alice's listSessions = %d sessions, %v", len(list), err)
		}
		if msgs, err := f.s.messagesAfter(f.ctx, alice, 0, 200); err != nil || len(msgs) != 4 {
			t.Errorf("alice's messagesAfter = %d messages, %v", len(msgs), err)
		}
	})
	// Alice's state is intact: her answer is still hers.
	if st, ans := f.answer(alice, sid, q); st != questionAnswered || ans.Content != "alice's answer" {
		t.Errorf("alice's question: %v %q", st, ans.Content)
	}
}

// ---- text ----

func TestStoreCleanText(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ in, want string }{
		{"plain", "plain"},
		{"a\x00b", "ab"},
		{"\x00\x00", ""},
		{"a\xffb", "a\uFFFDb"},
		{"a\xff\xfeb", "a\uFFFDb"},
		{"\xc3", "\uFFFD"},
		{"x\x00\xff\x00y", "x\uFFFDy"},
		{"héllo ✓ 🙂", "héllo ✓ 🙂"},
		{"line\r\nbreak\ttab", "line\r\nbreak\ttab"},
	} {
		if got := cleanText(tc.in); got != tc.want {
			t.Errorf("cleanText(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}

	f := storeNew(t)
	u := f.user("a@example.com")
	sid := newUUID()
	stored := func(id string) string {
		t.Helper()
		var s string
		if err := f.db.QueryRowContext(f.ctx, `SELECT content FROM messages WHERE id = $1`, id).Scan(&s); err != nil {
			t.Fatal(err)
		}
		return s
	}
	r := f.step(u, sid, "step\x00 with \xff bytes")
	if got := stored(r.Message.ID); got != "step with \uFFFD bytes" || r.Message.Content != got {
		t.Errorf("agent message stored %q, returned %q", got, r.Message.Content)
	}
	m := f.userMsg(u, sid, "\x00user\xc3", false)
	if got := stored(m.ID); got != "user\uFFFD" || m.Content != got {
		t.Errorf("user message stored %q, returned %q", got, m.Content)
	}
	r = f.step(u, sid, "next")
	storeWantContents(t, "feedback", r.Feedback, "user\uFFFD")
	q := f.ask(u, sid, "why\x00?")
	if got := stored(q.ID); got != "why?" {
		t.Errorf("question stored %q", got)
	}
	if again := f.ask(u, sid, "why?"); !again.Resumed || again.ID != q.ID {
		t.Error("the same question after cleaning did not resume")
	}
}

// ---- migrate ----

func TestStoreMigrate(t *testing.T) {
	t.Parallel()
	t.Run("again and concurrently on a migrated database", func(t *testing.T) {
		f := storeNew(t)
		u := f.user("a@example.com")
		sid := f.newSession(u)
		for range 2 {
			if err := migrate(f.ctx, f.db); err != nil {
				t.Fatal(err)
			}
		}
		storeConcurrentMigrate(t, f.dsn, 4)
		if f.session(sid).Status != statusActive {
			t.Error("data lost")
		}
	})

	t.Run("concurrently on a fresh database", func(t *testing.T) {
		dsn := storeBareDB(t)
		storeConcurrentMigrate(t, dsn, 4)
		storeConcurrentMigrate(t, dsn, 2)
		db, err := sql.Open("postgres", dsn)
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		f := &storeFixture{t: t, ctx: context.Background(), s: &store{db: db}, db: db, dsn: dsn}
		if n := f.count(`SELECT count(*) FROM pg_tables WHERE schemaname = 'public'
			AND tablename IN ('users', 'user_agents', 'agent_instances', 'messages', 'api_keys')`); n != 5 {
			t.Errorf("%d tables, want 5", n)
		}
		if n := f.count(`SELECT count(*) FROM pg_constraint WHERE conname = 'api_keys_scope_check'`); n != 1 {
			t.Errorf("%d scope constraints, want 1", n)
		}
		// The schema works.
		u := f.user("a@example.com")
		sid := f.newSession(u)
		f.userMsg(u, sid, "hi", false)
		if msgs, _ := f.pending(u, sid, ""); len(msgs) != 1 {
			t.Errorf("pending = %d messages", len(msgs))
		}
	})
}

// storeConcurrentMigrate runs migrate from n connection pools at once, as n
// processes starting together would.
func storeConcurrentMigrate(t *testing.T, dsn string, n int) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	start := make(chan struct{})
	for range n {
		db, err := sql.Open("postgres", dsn)
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			errs <- migrate(context.Background(), db)
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("concurrent migrate: %v", err)
		}
	}
}

// storeBareDB creates an empty (unmigrated) database and returns its DSN.
func storeBareDB(t *testing.T) string {
	t.Helper()
	return mustCreateDB(t, "store_bare", "template0")
}

// ---- users and API keys ----

func TestStoreAPIKeys(t *testing.T) {
	t.Parallel()
	f := storeNew(t)
	u := f.user("a@example.com")
	if again := f.user("a@example.com"); again != u {
		t.Fatalf("ensureUser twice: %s then %s", u, again)
	}
	if other := f.user("b@example.com"); other == u {
		t.Fatal("two emails, one user")
	}
	exp := time.Now().Add(time.Hour).Truncate(time.Microsecond)
	id, err := f.s.addAPIKey(f.ctx, u, "laptop", "hash-1", "person", &exp)
	if err != nil {
		t.Fatal(err)
	}
	k, err := f.s.apiKeyByHash(f.ctx, "hash-1")
	if err != nil {
		t.Fatal(err)
	}
	if k.ID != id || k.UserID != u || k.Scope != "person" || !k.Active || !k.ExpiresAt.Valid || !k.ExpiresAt.Time.Equal(exp) || k.LastUsedAt.Valid {
		t.Errorf("key = %+v", k)
	}
	if _, err := f.s.apiKeyByHash(f.ctx, "no-such-hash"); !errors.Is(err, errNotFound) {
		t.Errorf("unknown hash: %v, want errNotFound", err)
	}
	if _, err := f.s.addAPIKey(f.ctx, u, "dup", "hash-1", "agent", nil); err == nil {
		t.Error("a second key with the same hash was accepted")
	}
	if _, err := f.s.addAPIKey(f.ctx, u, "bad", "hash-bad", "admin", nil); err == nil {
		t.Error("an unknown scope was accepted")
	}

	t.Run("touch once a minute", func(t *testing.T) {
		lastUsed := func() time.Time {
			t.Helper()
			k, err := f.s.apiKeyByHash(f.ctx, "hash-1")
			if err != nil || !k.LastUsedAt.Valid {
				t.Fatalf("key %+v err %v: last_used_at not set", k, err)
			}
			return k.LastUsedAt.Time
		}
		if err := f.s.touchAPIKey(f.ctx, id); err != nil {
			t.Fatal(err)
		}
		first := lastUsed()
		if err := f.s.touchAPIKey(f.ctx, id); err != nil {
			t.Fatal(err)
		}
		if again := lastUsed(); !again.Equal(first) {
			t.Errorf("touched twice within a minute: %v then %v", first, again)
		}
		if _, err := f.db.ExecContext(f.ctx, `UPDATE api_keys SET last_used_at = now() - interval '61 seconds' WHERE id = $1`, id); err != nil {
			t.Fatal(err)
		}
		old := lastUsed()
		if err := f.s.touchAPIKey(f.ctx, id); err != nil {
			t.Fatal(err)
		}
		if now := lastUsed(); !now.After(old) {
			t.Errorf("a minute later last_used_at stayed %v", now)
		}
	})

	t.Run("revoke", func(t *testing.T) {
		id2, err := f.s.addAPIKey(f.ctx, u, "ci", "hash-2", "agent", nil)
		if err != nil {
			t.Fatal(err)
		}
		id3, err := f.s.addAPIKey(f.ctx, u, "ci", "hash-3", "agent", nil)
		if err != nil {
			t.Fatal(err)
		}
		active := func(hash string) bool {
			t.Helper()
			k, err := f.s.apiKeyByHash(f.ctx, hash)
			if err != nil {
				t.Fatal(err)
			}
			return k.Active
		}
		if k, _ := f.s.apiKeyByHash(f.ctx, "hash-2"); k.Scope != "agent" || k.ExpiresAt.Valid {
			t.Errorf("key without expiry = %+v", k)
		}
		if err := f.s.revokeAPIKey(f.ctx, strings.ToUpper(id2)); err != nil {
			t.Fatalf("revoke by id: %v", err)
		}
		if active("hash-2") || !active("hash-3") || !active("hash-1") {
			t.Error("revoke by id hit the wrong keys")
		}
		if err := f.s.revokeAPIKey(f.ctx, "hash-3"); err != nil {
			t.Fatalf("revoke by hash: %v", err)
		}
		if active("hash-3") || !active("hash-1") {
			t.Error("revoke by hash hit the wrong keys")
		}
		if err := f.s.revokeAPIKey(f.ctx, id3); err != nil {
			t.Errorf("revoking twice: %v", err)
		}
		for _, missing := range []string{newUUID(), "no-such-hash"} {
			if err := f.s.revokeAPIKey(f.ctx, missing); !errors.Is(err, errNotFound) {
				t.Errorf("revoke %q: %v, want errNotFound", missing, err)
			}
		}
	})
}

// ---- the wait hub ----

func storeNewHub(t *testing.T, dsn string) *hub {
	t.Helper()
	h, err := newHub(context.Background(), dsn, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.close)
	return h
}

func storeWantWake(t *testing.T, what string, ch <-chan struct{}) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: no wake-up", what)
	}
}

func storeWantNoWake(t *testing.T, what string, ch <-chan struct{}, d time.Duration) {
	t.Helper()
	select {
	case <-ch:
		t.Fatalf("%s: woken", what)
	case <-time.After(d):
	}
}

func TestStoreHubWakesOnCommit(t *testing.T) {
	t.Parallel()
	f := storeNew(t)
	u := f.user("a@example.com")
	sid, otherSid := f.newSession(u), f.newSession(u)
	// The hub starts listening after the sessions' own notifications.
	h := storeNewHub(t, f.dsn)
	wakeS, cancelS := h.subscribe("s:" + sid)
	defer cancelS()
	wakeU, cancelU := h.subscribe("u:" + u)
	defer cancelU()
	wakeO, cancelO := h.subscribe("s:" + otherSid)
	defer cancelO()

	// Nothing is sent before commit, nor for a rolled-back change.
	tx, err := f.db.BeginTx(f.ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := lockSession(f.ctx, tx, u, sid); err != nil {
		t.Fatal(err)
	}
	if _, _, err := insertAgentMessage(f.ctx, tx, u, agentMessage{SessionID: sid, Content: "x"}, true); err != nil {
		t.Fatal(err)
	}
	storeWantNoWake(t, "uncommitted", wakeS, 100*time.Millisecond)
	tx.Rollback()
	storeWantNoWake(t, "rolled back", wakeS, 100*time.Millisecond)

	f.userMsg(u, sid, "hello", false)
	storeWantWake(t, "session topic", wakeS)
	storeWantWake(t, "user topic", wakeU)
	select {
	case <-wakeO:
		t.Error("another session's topic was woken")
	default:
	}

	for _, tc := range []struct {
		name string
		do   func()
	}{
		{"agent message", func() { f.step(u, sid, "step") }},
		{"marked-read user message", func() { f.userMsg(u, sid, "read", true) }},
		{"question", func() { f.ask(u, sid, "q?") }},
		{"request input", func() {
			m := f.step(u, sid, "step")
			storeWantWake(t, "its step", wakeS)
			storeWantWake(t, "its step (user)", wakeU)
			if _, _, _, err := f.s.requestInput(f.ctx, u, m.Message.ID); err != nil {
				t.Fatal(err)
			}
		}},
		{"end", func() {
			if err := f.s.endSession(f.ctx, u, sid); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		tc.do()
		storeWantWake(t, tc.name, wakeS)
		storeWantWake(t, tc.name+" (user)", wakeU)
	}
}

// storeWaitFor polls cond until it holds or 10 s pass.
func storeWaitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// storeWaiters starts n waits on topic with check, and returns a channel
// that receives each one's result.
func storeWaiters(h *hub, topic string, n int, check func() (bool, error)) <-chan error {
	out := make(chan error, n)
	a := &app{hub: h, stopping: context.Background()}
	for range n {
		go func() {
			done, err := a.wait(context.Background(), topic, 20*time.Second, check, 0, nil)
			if err == nil && !done {
				err = errors.New("wait ended without its condition")
			}
			out <- err
		}()
	}
	return out
}

func storeCollect(t *testing.T, results <-chan error, n int) {
	t.Helper()
	timeout := time.After(15 * time.Second)
	for i := range n {
		select {
		case err := <-results:
			if err != nil {
				t.Error(err)
			}
		case <-timeout:
			t.Fatalf("only %d of %d waiters returned", i, n)
		}
	}
}

// TestStoreHubWaitHoldsNoConnection: 50 waiters hold no database connection
// and run no queries while idle, and one commit wakes them all.
func TestStoreHubWaitHoldsNoConnection(t *testing.T) {
	t.Parallel()
	f := storeNew(t)
	u := f.user("a@example.com")
	sid := f.newSession(u)
	h := storeNewHub(t, f.dsn)
	const n = 50
	var checks atomic.Int64
	check := func() (bool, error) {
		var c int
		err := f.db.QueryRow(`SELECT count(*) FROM messages WHERE agent_instance_id = $1 AND sender_type = 'USER'`, sid).Scan(&c)
		checks.Add(1) // after the query: its connection is back in the pool
		return c > 0, err
	}
	results := storeWaiters(h, "s:"+sid, n, check)
	storeWaitFor(t, "all waiters to check once", func() bool { return h.waiters() == n && checks.Load() == n })
	if inUse := f.db.Stats().InUse; inUse != 0 {
		t.Errorf("%d connections in use while %d waiters wait", inUse, n)
	}
	before := checks.Load()
	time.Sleep(200 * time.Millisecond)
	if after := checks.Load(); after != before {
		t.Errorf("%d checks while idle", after-before)
	}
	if inUse := f.db.Stats().InUse; inUse != 0 {
		t.Errorf("%d connections in use while %d waiters wait", inUse, n)
	}
	f.userMsg(u, sid, "go", false)
	storeCollect(t, results, n)
	storeWaitFor(t, "waiters to unsubscribe", func() bool { return h.waiters() == 0 })
}

// TestStoreHubListenerLoss: a change that sent no notification (as one sent
// while the listener is disconnected) is found after the listener
// reconnects, because every waiter re-checks; later notifications arrive.
func TestStoreHubListenerLoss(t *testing.T) {
	t.Parallel()
	f := storeNew(t)
	u := f.user("a@example.com")
	sid, otherSid := f.newSession(u), f.newSession(u)
	h := storeNewHub(t, f.dsn)
	var checks atomic.Int64
	flagged := func(sid string) func() (bool, error) {
		return func() (bool, error) {
			var c int
			err := f.db.QueryRow(`SELECT count(*) FROM messages WHERE agent_instance_id = $1 AND content = 'flag'`, sid).Scan(&c)
			checks.Add(1) // after the query, so a count of 2n means every first check is done
			return c > 0, err
		}
	}
	const n = 10
	results := storeWaiters(h, "s:"+sid, n, flagged(sid))
	others := storeWaiters(h, "s:"+otherSid, n, flagged(otherSid))
	storeWaitFor(t, "all waiters to check once", func() bool { return h.waiters() == 2*n && checks.Load() == 2*n })

	// Both flags written without a notification: only a re-check finds them.
	for _, s := range []string{sid, otherSid} {
		if _, err := f.db.ExecContext(f.ctx, `
			INSERT INTO messages (agent_instance_id, user_id, sender_type, content) VALUES ($1, $2, 'USER', 'flag')`, s, u); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(100 * time.Millisecond)
	if c := checks.Load(); c != 2*n {
		t.Fatalf("%d checks before the listener was cut, want %d", c, 2*n)
	}
	// The listener's last statement is its LISTEN, or the empty query of
	// its keep-alive ping; the pool's connections ran the checks.
	if killed := f.count(`SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE datname = current_database() AND pid <> pg_backend_pid() AND (query LIKE 'LISTEN%' OR query = '')`); killed != 1 {
		t.Fatalf("terminated %d listener backends, want 1", killed)
	}
	storeCollect(t, results, n)
	storeCollect(t, others, n)

	// Notifications after the reconnect arrive.
	wake, cancel := h.subscribe("s:" + sid)
	defer cancel()
	f.userMsg(u, sid, "after", false)
	storeWantWake(t, "after reconnect", wake)
	later := storeWaiters(h, "s:"+sid, 5, func() (bool, error) {
		var c int
		err := f.db.QueryRow(`SELECT count(*) FROM messages WHERE agent_instance_id = $1 AND content = 'later'`, sid).Scan(&c)
		return c > 0, err
	})
	storeWaitFor(t, "new waiters", func() bool { return h.waiters() == 6 })
	f.userMsg(u, sid, "later", false)
	storeCollect(t, later, 5)
}
