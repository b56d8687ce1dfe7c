package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"time"

	"github.com/lib/pq"
)

// This file holds every SQL statement of agentline. Every statement that
// touches a session names the caller's user id in its WHERE clause, so tenant
// isolation can be checked by reading this file alone.

//go:embed schema.sql
var schemaSQL string

var (
	// errNotFound: the row is missing or belongs to another user; callers
	// never learn which.
	errNotFound = errors.New("not found")
	// errConflict: the row's state forbids the call.
	errConflict = errors.New("conflict")
	// errNeedAgentType: a new session was named without an agent type.
	errNeedAgentType = errors.New("agent_type is required to create a session")
)

// Session statuses and sender types, as stored.
const (
	statusActive        = "ACTIVE"
	statusAwaitingInput = "AWAITING_INPUT"
	statusCompleted     = "COMPLETED"
	senderAgent         = "AGENT"
	senderUser          = "USER"
)

type store struct {
	db *sql.DB
}

// message is one stored message.
type message struct {
	ID                string
	Seq               int64
	SessionID         string
	SenderType        string
	Content           string
	RequiresUserInput bool
	CreatedAt         time.Time
	Q                 questionFields // approvals and choices (issue 12)
}

// messageColumns are the columns scanMessage reads, in its order.
const messageColumns = `id, seq, agent_instance_id, sender_type, content, requires_user_input, created_at, ` + questionColumns

func scanMessage(m *message) []any {
	return append([]any{&m.ID, &m.Seq, &m.SessionID, &m.SenderType, &m.Content, &m.RequiresUserInput, &m.CreatedAt}, m.Q.scan()...)
}

// querier is a *sql.DB or a *sql.Tx.
type querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

// queryAll runs query and returns every row, each scanned into the fields
// that fields names.
func queryAll[T any](ctx context.Context, q querier, fields func(*T) []any, query string, args ...any) ([]T, error) {
	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []T
	for rows.Next() {
		var v T
		if err := rows.Scan(fields(&v)...); err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// migrate applies schema.sql under an advisory lock, so two processes starting
// at once do not race on CREATE … IF NOT EXISTS. The lock is transaction-level,
// so it also works through a transaction pooler.
func migrate(ctx context.Context, db *sql.DB) error {
	err := (&store{db: db}).inTx(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(7260151201)`); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, schemaSQL)
		return err
	})
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	return nil
}

// inTx runs fn in a transaction and commits it if fn returns nil.
func (s *store) inTx(ctx context.Context, fn func(tx *sql.Tx) error) error {
	return s.inTxWith(ctx, nil, fn)
}

func (s *store) inTxWith(ctx context.Context, opts *sql.TxOptions, fn func(tx *sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, opts)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := fn(tx); err != nil {
		return err
	}
	return tx.Commit()
}

// ping reports whether the database answers within ctx.
func (s *store) ping(ctx context.Context) error {
	var one int
	return s.db.QueryRowContext(ctx, `SELECT 1`).Scan(&one)
}

// cleanText returns s as PostgreSQL can store it: NUL bytes dropped, invalid
// UTF-8 replaced by U+FFFD.
func cleanText(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	if strings.IndexByte(s, 0) >= 0 {
		s = strings.ReplaceAll(s, "\x00", "")
	}
	return s
}

// ---- users and API keys ----

// ensureUser returns the id of the user with this email, creating the user
// if there is none.
func (s *store) ensureUser(ctx context.Context, email string) (string, error) {
	var id string
	err := s.db.QueryRowContext(ctx, `
		INSERT INTO users (email) VALUES ($1)
		ON CONFLICT (email) DO UPDATE SET updated_at = users.updated_at
		RETURNING id`, email).Scan(&id)
	if err != nil {
		return "", fmt.Errorf("ensure user: %w", err)
	}
	return id, nil
}

// apiKey is a registered key, found by the SHA-256 of its token.
type apiKey struct {
	ID         string
	UserID     string
	Scope      string
	Active     bool
	ExpiresAt  sql.NullTime
	LastUsedAt sql.NullTime
}

// addAPIKey registers a key for userID and returns its id.
func (s *store) addAPIKey(ctx context.Context, userID, name, tokenHash, scope string, expiresAt *time.Time) (string, error) {
	var id string
	err := s.db.QueryRowContext(ctx, `
		INSERT INTO api_keys (user_id, name, api_key_hash, scope, expires_at)
		VALUES ($1, $2, $3, $4, $5)
		RETURNING id`, userID, name, tokenHash, scope, expiresAt).Scan(&id)
	if err != nil {
		return "", fmt.Errorf("add api key: %w", err)
	}
	return id, nil
}

// sqlAPIKeyByHash runs once per authenticated request; a constant because
// perf_test.go's pgbench script runs it too.
const sqlAPIKeyByHash = `
		SELECT id, user_id, scope, is_active, expires_at, last_used_at
		FROM api_keys WHERE api_key_hash = $1`

// apiKeyByHash returns the key whose token hashes to tokenHash, or errNotFound.
func (s *store) apiKeyByHash(ctx context.Context, tokenHash string) (apiKey, error) {
	var k apiKey
	err := s.db.QueryRowContext(ctx, sqlAPIKeyByHash, tokenHash).
		Scan(&k.ID, &k.UserID, &k.Scope, &k.Active, &k.ExpiresAt, &k.LastUsedAt)
	if errors.Is(err, sql.ErrNoRows) {
		return apiKey{}, errNotFound
	}
	if err != nil {
		return apiKey{}, fmt.Errorf("api key by hash: %w", err)
	}
	return k, nil
}

// validKeys returns which of the key ids are still good: registered, active,
// unexpired by the database's clock, their user still there (deleting a
// user deletes its keys). One indexed query for every key held open.
func (s *store) validKeys(ctx context.Context, ids []string) (map[string]bool, error) {
	valid, err := queryAll(ctx, s.db, func(id *string) []any { return []any{id} }, `
		SELECT id FROM api_keys
		WHERE id = ANY($1::uuid[]) AND is_active AND (expires_at IS NULL OR expires_at > now())`, pq.Array(ids))
	if err != nil {
		return nil, fmt.Errorf("valid keys: %w", err)
	}
	out := make(map[string]bool, len(valid))
	for _, id := range valid {
		out[id] = true
	}
	return out, nil
}

// touchAPIKey sets last_used_at to now unless it was set less than a minute
// ago, so a busy key costs one write a minute, not one a request.
func (s *store) touchAPIKey(ctx context.Context, keyID string) error {
	_, err := s.db.ExecContext(ctx, `
		UPDATE api_keys SET last_used_at = now()
		WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')`, keyID)
	if err != nil {
		return fmt.Errorf("touch api key: %w", err)
	}
	return nil
}

// revokeAPIKey deactivates the key with this id or token hash. It returns
// errNotFound if no key matches.
func (s *store) revokeAPIKey(ctx context.Context, idOrHash string) error {
	column := "api_key_hash"
	if id, ok := parseUUID(idOrHash); ok {
		column, idOrHash = "id", id
	}
	res, err := s.db.ExecContext(ctx, `
		UPDATE api_keys SET is_active = false, revoked_at = COALESCE(revoked_at, now())
		WHERE `+column+` = $1`, idOrHash)
	if err != nil {
		return fmt.Errorf("revoke api key: %w", err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return errNotFound
	}
	return nil
}

// ---- sessions and messages ----

// notifyChannel is the one LISTEN/NOTIFY channel of agentline, passed to
// every pg_notify as a parameter. A payload is "KIND USER SESSION SEQ": ids
// only, never text (payloads are capped at 8000 bytes, and text does not
// belong in a broadcast).
const notifyChannel = "agentline"

// The three statements of the hot path (an agent message in an existing
// session: lockSession, feedbackAfter, insertAgentMessage) are constants
// rather than literals at their call sites because perf_test.go builds its
// pgbench script from these very strings, so the throughput baseline can
// never drift from the SQL the server runs. $1 is the session, $2 the user.
const (
	sqlLockSession = `
		SELECT last_read_seq, last_read_message_id, status FROM agent_instances
		WHERE id = $1 AND user_id = $2
		FOR UPDATE`
	// $3: the read pointer's seq.
	sqlFeedbackAfter = `
		SELECT ` + messageColumns + ` FROM messages
		WHERE agent_instance_id = $1 AND user_id = $2 AND sender_type = 'USER' AND seq > $3
		ORDER BY seq`
	// $3 content, $4 requires_user_input, $5-$7 send_email/sms/push, $8
	// git_diff, $9 whether the agent has now read everything before it (a
	// question has not: its feedback goes with its answer), $10 the channel.
	sqlInsertAgentMessage = `
		WITH lk AS (SELECT pg_advisory_xact_lock(hashtextextended($2::uuid::text, 0))),
		ins AS (
			INSERT INTO messages (agent_instance_id, user_id, sender_type, content, requires_user_input, send_email, send_sms, send_push)
			SELECT $1::uuid, $2::uuid, 'AGENT', $3::text, $4::boolean, $5::boolean, $6::boolean, $7::boolean FROM lk
			RETURNING id, seq, created_at
		),
		upd AS (
			UPDATE agent_instances AS a SET
				last_read_message_id = CASE WHEN $9::boolean THEN ins.id ELSE a.last_read_message_id END,
				last_read_seq = CASE WHEN $9 THEN ins.seq ELSE a.last_read_seq END,
				delivered_seq = CASE WHEN $9 THEN ins.seq ELSE a.delivered_seq END,
				step_count = a.step_count + (NOT $4)::int,
				last_activity_at = GREATEST(a.last_activity_at, ins.created_at),
				status = CASE WHEN a.status = 'COMPLETED' THEN a.status WHEN $4 THEN 'AWAITING_INPUT' ELSE 'ACTIVE' END,
				git_diff = COALESCE($8::text, a.git_diff)
			FROM ins WHERE a.id = $1 AND a.user_id = $2
			RETURNING a.step_count
		)
		SELECT ins.id, ins.seq, ins.created_at, upd.step_count,
			pg_notify($10, 'm ' || $2::uuid::text || ' ' || $1::uuid::text || ' ' || ins.seq)
		FROM ins, upd`
)

// lockSession takes the session's row lock for the rest of tx and returns its
// read pointer's seq and status. It returns errNotFound if the session is
// missing or not userID's. Every change to a session's messages or pointer
// happens under this lock, which is what makes delivery exactly-once.
func lockSession(ctx context.Context, tx *sql.Tx, userID, sessionID string) (readSeq int64, readID sql.NullString, status string, err error) {
	err = tx.QueryRowContext(ctx, sqlLockSession, sessionID, userID).Scan(&readSeq, &readID, &status)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, readID, "", errNotFound
	}
	if err != nil {
		return 0, readID, "", fmt.Errorf("lock session: %w", err)
	}
	return readSeq, readID, status, nil
}

// lockOrCreateSession locks the session, creating it first when it does not
// exist and agentType is given. It returns errNeedAgentType for a new id
// without an agent type and errNotFound for another user's id.
func lockOrCreateSession(ctx context.Context, tx *sql.Tx, userID, sessionID, agentType string) (readSeq int64, err error) {
	readSeq, _, _, err = lockSession(ctx, tx, userID, sessionID)
	if !errors.Is(err, errNotFound) {
		return readSeq, err
	}
	if agentType == "" {
		return 0, errNeedAgentType
	}
	// A concurrent create by the same user makes this insert wait, then do
	// nothing (another user's id: nothing either); the second lockSession
	// then finds the row, or says not found.
	_, err = tx.ExecContext(ctx, `
		WITH ua AS (
			INSERT INTO user_agents (user_id, name) VALUES ($2, lower($3))
			ON CONFLICT (user_id, name) DO UPDATE SET updated_at = user_agents.updated_at
			RETURNING id
		)
		INSERT INTO agent_instances (id, user_agent_id, user_id)
		SELECT $1::uuid, ua.id, $2::uuid FROM ua
		ON CONFLICT (id) DO NOTHING`, sessionID, userID, strings.ToLower(agentType))
	if err != nil {
		return 0, fmt.Errorf("create session: %w", err)
	}
	readSeq, _, _, err = lockSession(ctx, tx, userID, sessionID)
	return readSeq, err
}

// feedbackAfter returns the user messages of the session after seq, oldest
// first.
func feedbackAfter(ctx context.Context, tx *sql.Tx, userID, sessionID string, seq int64) ([]message, error) {
	msgs, err := queryAll(ctx, tx, scanMessage, sqlFeedbackAfter, sessionID, userID, seq)
	if err != nil {
		return nil, fmt.Errorf("feedback: %w", err)
	}
	return msgs, nil
}

// agentMessage is what an agent sends: a step, or a question when
// RequiresUserInput is set.
type agentMessage struct {
	SessionID         string // canonical UUID; a new one creates the session
	AgentType         string // needed only to create
	Content           string
	RequiresUserInput bool
	GitDiff           *string // nil: leave the session's diff as it is
	SendEmail         *bool
	SendSMS           *bool
	SendPush          *bool
}

// agentMessageResult is the stored message, the feedback it picked up and the
// session's step count after it.
type agentMessageResult struct {
	Message  message
	Feedback []message
	Steps    int
}

// insertAgentMessage stores an agent message in a locked session and
// notifies the hub, all in tx; with reads, the read pointer moves to it. The
// user lock makes seq order commit order across all of a user's sessions
// (the event stream resumes by seq, so a smaller seq must never commit after
// a larger one is visible).
func insertAgentMessage(ctx context.Context, tx *sql.Tx, userID string, in agentMessage, reads bool) (message, int, error) {
	m := message{SessionID: in.SessionID, SenderType: senderAgent, Content: cleanText(in.Content), RequiresUserInput: in.RequiresUserInput}
	var steps int
	err := tx.QueryRowContext(ctx, sqlInsertAgentMessage,
		in.SessionID, userID, m.Content, in.RequiresUserInput, in.SendEmail, in.SendSMS, in.SendPush, in.GitDiff, reads, notifyChannel,
	).Scan(&m.ID, &m.Seq, &m.CreatedAt, &steps, new(string))
	if err != nil {
		return message{}, 0, fmt.Errorf("insert agent message: %w", err)
	}
	if err := enqueueNotificationForAgentMessage(ctx, tx, userID, in, m.ID); err != nil { // notifications (issue 11)
		return message{}, 0, err
	}
	return m, steps, nil
}

// addAgentMessage stores an agent message, creating the session if needed,
// and returns the user messages queued since the agent last read (oldest
// first), moving the read pointer to the new message. It returns errNotFound
// for another user's session and errNeedAgentType for a new session without
// an agent type.
func (s *store) addAgentMessage(ctx context.Context, userID string, in agentMessage) (agentMessageResult, error) {
	var r agentMessageResult
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		readSeq, err := lockOrCreateSession(ctx, tx, userID, in.SessionID, in.AgentType)
		if err != nil {
			return err
		}
		if r.Feedback, err = feedbackAfter(ctx, tx, userID, in.SessionID, readSeq); err != nil {
			return err
		}
		r.Message, r.Steps, err = insertAgentMessage(ctx, tx, userID, in, true)
		return err
	})
	if err != nil {
		return agentMessageResult{}, fmt.Errorf("add agent message: %w", err)
	}
	return r, nil
}

// addUserMessage stores a person's message in the session. The first user
// message after an open question answers it: the session goes back to
// ACTIVE (a COMPLETED session stays COMPLETED). With markAsRead the read
// pointer moves to the new message, so the agent is not handed it as feedback.
// It returns errNotFound if the session is missing or not userID's.
func (s *store) addUserMessage(ctx context.Context, userID, sessionID, content string, markAsRead bool) (message, error) {
	m := message{SessionID: sessionID, SenderType: senderUser, Content: cleanText(content)}
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		if _, _, _, err := lockSession(ctx, tx, userID, sessionID); err != nil {
			return err
		}
		return tx.QueryRowContext(ctx, `
			WITH lk AS (SELECT pg_advisory_xact_lock(hashtextextended($2::uuid::text, 0))),
			ins AS (
				INSERT INTO messages (agent_instance_id, user_id, sender_type, content)
				SELECT $1::uuid, $2::uuid, 'USER', $3::text FROM lk
				RETURNING id, seq, created_at
			),
			upd AS (
				UPDATE agent_instances AS a SET
					last_read_message_id = CASE WHEN $4::boolean THEN ins.id ELSE a.last_read_message_id END,
					last_read_seq = CASE WHEN $4 THEN ins.seq ELSE a.last_read_seq END,
					last_activity_at = GREATEST(a.last_activity_at, ins.created_at),
					status = CASE WHEN a.status = 'AWAITING_INPUT' THEN 'ACTIVE' ELSE a.status END
				FROM ins WHERE a.id = $1 AND a.user_id = $2
				RETURNING a.id
			)
			SELECT ins.id, ins.seq, ins.created_at,
				pg_notify($5, 'm ' || $2::uuid::text || ' ' || $1::uuid::text || ' ' || ins.seq)
			FROM ins, upd`,
			sessionID, userID, m.Content, markAsRead, notifyChannel,
		).Scan(&m.ID, &m.Seq, &m.CreatedAt, new(string))
	})
	if err != nil {
		return message{}, fmt.Errorf("add user message: %w", err)
	}
	return m, nil
}

// pending returns the user messages after the session's read pointer, moving
// the pointer past them, and the session's status. If lastReadID is not
// empty and is not the current pointer, another reader moved it: pending
// reports stale and returns no messages. It returns errNotFound if the
// session is missing or not userID's.
func (s *store) pending(ctx context.Context, userID, sessionID, lastReadID string) (msgs []message, stale bool, status string, err error) {
	err = s.inTx(ctx, func(tx *sql.Tx) error {
		readSeq, readID, st, err := lockSession(ctx, tx, userID, sessionID)
		if err != nil {
			return err
		}
		status = st
		if lastReadID != "" && (!readID.Valid || readID.String != lastReadID) {
			stale = true
			return nil
		}
		if msgs, err = feedbackAfter(ctx, tx, userID, sessionID, readSeq); err != nil || len(msgs) == 0 {
			return err
		}
		return deliver(ctx, tx, userID, sessionID, msgs[len(msgs)-1], 0, 0)
	})
	if err != nil {
		return nil, false, "", fmt.Errorf("pending: %w", err)
	}
	return msgs, stale, status, nil
}

// deliver records that every user message up to m was handed to the agent:
// the read pointer moves to m unless already past it, and delivered_seq
// covers it. answerSeq > 0 records m as the answer to question questionSeq,
// so asking that question again returns it again.
func deliver(ctx context.Context, tx *sql.Tx, userID, sessionID string, m message, answerSeq, questionSeq int64) error {
	_, err := tx.ExecContext(ctx, `
		UPDATE agent_instances SET
			last_read_message_id = CASE WHEN last_read_seq < $4 THEN $3::uuid ELSE last_read_message_id END,
			last_read_seq = GREATEST(last_read_seq, $4),
			delivered_seq = GREATEST(delivered_seq, $4),
			answer_seq = GREATEST(answer_seq, $5),
			answered_question_seq = CASE WHEN $5 > 0 THEN GREATEST(answered_question_seq, $6) ELSE answered_question_seq END
		WHERE id = $1 AND user_id = $2`, sessionID, userID, m.ID, m.Seq, answerSeq, questionSeq)
	if err != nil {
		return fmt.Errorf("deliver: %w", err)
	}
	return nil
}

// requestInput turns an earlier agent message into a question. Queued user
// messages after it (when it is the read pointer) are returned and the
// pointer moves past them, as pending does; if there are none the session
// waits for input. It returns errNotFound if the message is missing, not an
// agent message or not userID's, and errConflict if it already asks.
func (s *store) requestInput(ctx context.Context, userID, messageID string) (sessionID string, msgs []message, stale bool, err error) {
	err = s.inTx(ctx, func(tx *sql.Tx) error {
		var asks bool
		err := tx.QueryRowContext(ctx, `
			SELECT agent_instance_id, requires_user_input FROM messages
			WHERE id = $1 AND user_id = $2 AND sender_type = 'AGENT'`, messageID, userID).Scan(&sessionID, &asks)
		if errors.Is(err, sql.ErrNoRows) {
			return errNotFound
		}
		if err != nil {
			return err
		}
		readSeq, readID, _, err := lockSession(ctx, tx, userID, sessionID)
		if err != nil {
			return err
		}
		res, err := tx.ExecContext(ctx, `
			UPDATE messages SET requires_user_input = true
			WHERE id = $1 AND user_id = $2 AND NOT requires_user_input
				AND kind IS NULL`, messageID, userID) // kind IS NULL: an approval is decided once (issue 12)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return errConflict
		}
		if err := enqueueNotification(ctx, tx, userID, sessionID, eventQuestionAsked, messageID); err != nil { // notifications (issue 11)
			return err
		}
		if !readID.Valid || readID.String != messageID {
			stale = true
		} else if msgs, err = feedbackAfter(ctx, tx, userID, sessionID, readSeq); err != nil {
			return err
		}
		if len(msgs) > 0 {
			return deliver(ctx, tx, userID, sessionID, msgs[len(msgs)-1], 0, 0)
		}
		_, err = tx.ExecContext(ctx, `
			UPDATE agent_instances SET status = 'AWAITING_INPUT', last_activity_at = now()
			WHERE id = $1 AND user_id = $2 AND status <> 'COMPLETED'`, sessionID, userID)
		if err != nil {
			return err
		}
		return notifySession(ctx, tx, userID, sessionID)
	})
	if err != nil {
		return "", nil, false, fmt.Errorf("request input: %w", err)
	}
	return sessionID, msgs, stale, nil
}

// notifySession tells the hub that the session's status changed.
func notifySession(ctx context.Context, tx *sql.Tx, userID, sessionID string) error {
	_, err := tx.ExecContext(ctx, `SELECT pg_notify($3, 's ' || $1::uuid::text || ' ' || $2::uuid::text || ' 0')`, userID, sessionID, notifyChannel)
	return err
}

// endSession marks the session COMPLETED; ended_at is set the first time
// only, so ending twice is harmless. It returns errNotFound if the session is
// missing or not userID's.
func (s *store) endSession(ctx context.Context, userID, sessionID string) error {
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `
			UPDATE agent_instances SET status = 'COMPLETED', ended_at = COALESCE(ended_at, now()),
				last_activity_at = CASE WHEN ended_at IS NULL THEN now() ELSE last_activity_at END
			WHERE id = $1 AND user_id = $2`, sessionID, userID)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return errNotFound
		}
		if err := enqueueNotification(ctx, tx, userID, sessionID, eventSessionEnded, ""); err != nil { // notifications (issue 11)
			return err
		}
		return notifySession(ctx, tx, userID, sessionID)
	})
	if err != nil {
		return fmt.Errorf("end session: %w", err)
	}
	return nil
}

// ---- read API (person keys) ----

// sessionSummary is one session as the person's sessions list shows it.
type sessionSummary struct {
	ID             string
	AgentType      string
	Status         string
	StartedAt      time.Time
	EndedAt        sql.NullTime
	LastActivityAt time.Time
	Title          sql.NullString // Claude Code's cwd, from its hooks (issue 15)
	LastMessage    sql.NullString // the latest message's first characters (see listSessions)
	QuestionID     sql.NullString // the open question, if any
	Question       sql.NullString
}

// sessionCursor is a position in the sessions list, newest activity first:
// a page starts strictly after it.
type sessionCursor struct {
	LastActivityAt time.Time
	ID             string
}

// listSessions returns up to limit of userID's sessions, newest activity
// first, starting after cursor (nil: from the newest), optionally only those
// with status. LastMessage holds at least the first 200 characters of the
// latest message (the caller cuts it). The open question is the latest
// message when it is an agent question of a session that has not ended: a
// user message after it answers it, an agent message after it supersedes it.
func (s *store) listSessions(ctx context.Context, userID, status string, cursor *sessionCursor, limit int) ([]sessionSummary, error) {
	// No cursor: a position before every row, so the query has one shape and
	// the row comparison is always an index condition.
	at, id := time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC), "ffffffff-ffff-ffff-ffff-ffffffffffff"
	if cursor != nil {
		at, id = cursor.LastActivityAt, cursor.ID
	}
	// left(…, 800): 200 characters are at most 800 bytes, whatever the
	// database's encoding; the handler cuts to 200 characters.
	out, err := queryAll(ctx, s.db, func(ss *sessionSummary) []any {
		return []any{&ss.ID, &ss.AgentType, &ss.Status, &ss.StartedAt, &ss.EndedAt, &ss.LastActivityAt, &ss.Title,
			&ss.LastMessage, &ss.QuestionID, &ss.Question}
	}, `
		SELECT a.id, ua.name, a.status, a.started_at, a.ended_at, a.last_activity_at, a.title,
			left(lm.content, 800),
			CASE WHEN lm.asks THEN lm.id END,
			CASE WHEN lm.asks THEN lm.content END
		FROM agent_instances a
		JOIN user_agents ua ON ua.id = a.user_agent_id AND ua.user_id = $1
		LEFT JOIN LATERAL (
			SELECT m.id, m.content,
				m.sender_type = 'AGENT' AND m.requires_user_input AND a.status <> 'COMPLETED' AS asks
			FROM messages m
			WHERE m.agent_instance_id = a.id AND m.user_id = $1
			ORDER BY m.seq DESC LIMIT 1
		) lm ON true
		WHERE a.user_id = $1
			AND ($2 = '' OR a.status = $2)
			AND (a.last_activity_at, a.id) < ($3::timestamptz, $4::uuid)
		ORDER BY a.last_activity_at DESC, a.id DESC
		LIMIT $5`, userID, status, at, id, limit)
	if err != nil {
		return nil, fmt.Errorf("list sessions: %w", err)
	}
	return out, nil
}

// sessionTimeline is a session with a page of its messages.
type sessionTimeline struct {
	ID        string
	AgentType string
	Status    string
	GitDiff   sql.NullString
	Messages  []message
}

// sessionMessages returns the session and up to limit of its messages with
// seq > after, in commit order, read from one snapshot. It returns
// errNotFound if the session is missing or not userID's.
func (s *store) sessionMessages(ctx context.Context, userID, sessionID string, after int64, limit int) (sessionTimeline, error) {
	tl := sessionTimeline{ID: sessionID}
	err := s.inTxWith(ctx, &sql.TxOptions{Isolation: sql.LevelRepeatableRead, ReadOnly: true}, func(tx *sql.Tx) error {
		err := tx.QueryRowContext(ctx, `
			SELECT ua.name, a.status, a.git_diff
			FROM agent_instances a JOIN user_agents ua ON ua.id = a.user_agent_id AND ua.user_id = $2
			WHERE a.id = $1 AND a.user_id = $2`, sessionID, userID).Scan(&tl.AgentType, &tl.Status, &tl.GitDiff)
		if errors.Is(err, sql.ErrNoRows) {
			return errNotFound
		}
		if err != nil {
			return err
		}
		tl.Messages, err = queryAll(ctx, tx, scanMessage, `
			SELECT `+messageColumns+` FROM messages
			WHERE agent_instance_id = $1 AND user_id = $2 AND seq > $3
			ORDER BY seq LIMIT $4`, sessionID, userID, after, limit)
		return err
	})
	if err != nil {
		return tl, fmt.Errorf("session messages: %w", err)
	}
	return tl, nil
}

// latestSeq returns the seq of userID's newest message, 0 if there is none.
func (s *store) latestSeq(ctx context.Context, userID string) (int64, error) {
	var seq int64
	err := s.db.QueryRowContext(ctx, `
		SELECT COALESCE(max(seq), 0) FROM messages WHERE user_id = $1`, userID).Scan(&seq)
	if err != nil {
		return 0, fmt.Errorf("latest seq: %w", err)
	}
	return seq, nil
}

// messagesAfter returns up to limit of userID's messages, in all sessions,
// with seq > after, in seq order. For one user seq order is commit order (a
// message takes its seq under the user's advisory lock, held to commit), so
// a reader that advances its cursor to the last seq it got never skips a
// message committed later.
func (s *store) messagesAfter(ctx context.Context, userID string, after int64, limit int) ([]message, error) {
	out, err := queryAll(ctx, s.db, scanMessage, `
		SELECT `+messageColumns+` FROM messages
		WHERE user_id = $1 AND seq > $2
		ORDER BY seq LIMIT $3`, userID, after, limit)
	if err != nil {
		return nil, fmt.Errorf("messages after: %w", err)
	}
	return out, nil
}

// recentSessions returns userID's sessions whose last activity is within
// window of the database's clock, newest first, at most 500. Every change of
// a session's status also moves its last activity, so a reader comparing two
// calls sees every change made in between.
func (s *store) recentSessions(ctx context.Context, userID string, window time.Duration) ([]sessionSummary, error) {
	out, err := queryAll(ctx, s.db, func(ss *sessionSummary) []any {
		return []any{&ss.ID, &ss.AgentType, &ss.Status, &ss.StartedAt, &ss.EndedAt, &ss.LastActivityAt, &ss.Title}
	}, `
		SELECT a.id, ua.name, a.status, a.started_at, a.ended_at, a.last_activity_at, a.title
		FROM agent_instances a JOIN user_agents ua ON ua.id = a.user_agent_id AND ua.user_id = $1
		WHERE a.user_id = $1 AND a.last_activity_at > now() - make_interval(secs => $2)
		ORDER BY a.last_activity_at DESC, a.id DESC
		LIMIT 500`, userID, window.Seconds())
	if err != nil {
		return nil, fmt.Errorf("recent sessions: %w", err)
	}
	return out, nil
}

// ---- questions ----

// question is an agent message that waits for a person's answer.
type question struct {
	ID      string
	Seq     int64
	Resumed bool          // an earlier call asked it; no new message was stored
	Left    time.Duration // until the question timeout passes, by the database's clock
}

// questionState is where a question stands.
type questionState int

const (
	questionOpen       questionState = iota
	questionAnswered                 // a user message came after it
	questionSuperseded               // a newer agent message came first
	questionEnded                    // the session ended first
	questionExpired                  // the question timeout passed first
	questionClosed                   // an approval closed without a decision (issue 15)
)

// outcome is where a question stands, its answer, and the feedback the
// person sent before it was asked (handed over with the answer).
type outcome struct {
	State    questionState
	Answer   message
	Feedback []message
}

// askQuestion stores a question in an existing session, or resumes the
// session's latest agent message when it asks the same text and can still be
// answered: it has not timed out (by the database's clock), or it was
// answered (that answer is returned again: a client that vanished after an
// answer was taken still gets it), or an answer arrived late. A question
// does not move the read pointer: the feedback queued before it is handed
// over by the call that returns (questionOutcome), never lost with a cut
// call. It returns errNotFound if the session is missing or not userID's.
func (s *store) askQuestion(ctx context.Context, userID, sessionID, text string, timeout time.Duration, opts ...questionOptions) (question, error) {
	text = cleanText(text)
	q := question{Left: timeout}
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		if _, _, _, err := lockSession(ctx, tx, userID, sessionID); err != nil {
			return err
		}
		var left float64
		err := tx.QueryRowContext(ctx, `
			SELECT q.id, q.seq, extract(epoch FROM q.created_at + make_interval(secs => $4) - now())
			FROM agent_instances a
			CROSS JOIN LATERAL (
				SELECT id, seq, content, requires_user_input, created_at FROM messages
				WHERE agent_instance_id = a.id AND user_id = $2 AND sender_type = 'AGENT'
				ORDER BY seq DESC LIMIT 1
			) q
			WHERE a.id = $1 AND a.user_id = $2 AND q.requires_user_input AND q.content = $3
				AND (q.created_at + make_interval(secs => $4) > now() OR a.answer_seq > q.seq
					OR EXISTS (SELECT 1 FROM messages u
						WHERE u.agent_instance_id = $1 AND u.user_id = $2 AND u.sender_type = 'USER'
							AND u.seq > q.seq AND u.seq > a.delivered_seq))`,
			sessionID, userID, text, timeout.Seconds()).Scan(&q.ID, &q.Seq, &left)
		if err == nil {
			q.Resumed, q.Left = true, time.Duration(left*float64(time.Second))
			return nil
		}
		if !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		m, _, err := insertAgentMessage(ctx, tx, userID, agentMessage{SessionID: sessionID, Content: text, RequiresUserInput: true}, false)
		q.ID, q.Seq = m.ID, m.Seq
		if err == nil && len(opts) > 0 { // choices (issue 12): with the question, before its notification is sent
			err = setQuestionOptions(ctx, tx, userID, m.ID, opts[0])
		}
		return err
	})
	if err != nil {
		return question{}, fmt.Errorf("ask question: %w", err)
	}
	return q, nil
}

// questionOutcome reports where question q stands. The answer is the first
// user message after q that no other call was handed first, or the one an
// earlier call of this question was handed. When q is answered, or when
// final (the call returns now, answered or not), the feedback queued before
// q is returned and marked delivered in the same transaction, with the
// answer. It returns errNotFound if the session is missing or not userID's.
func (s *store) questionOutcome(ctx context.Context, userID, sessionID string, q question, timeout time.Duration, final bool) (outcome, error) {
	var out outcome
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		var status string
		var readSeq int64
		var expired bool
		var ansID sql.NullString
		var ansSeq, nextAgent sql.NullInt64
		var ansContent sql.NullString
		var ansAt sql.NullTime
		err := tx.QueryRowContext(ctx, `
			SELECT a.status, a.last_read_seq, q.created_at + make_interval(secs => $4) <= now(),
				ans.id, ans.seq, ans.content, ans.created_at,
				(SELECT min(seq) FROM messages
				 WHERE agent_instance_id = $1 AND user_id = $2 AND sender_type = 'AGENT' AND seq > $3)
			FROM agent_instances a
			JOIN messages q ON q.agent_instance_id = a.id AND q.user_id = $2 AND q.seq = $3
			LEFT JOIN LATERAL (
				SELECT id, seq, content, created_at FROM messages
				WHERE agent_instance_id = $1 AND user_id = $2 AND sender_type = 'USER' AND seq > $3
					AND CASE WHEN a.answer_seq > $3 THEN seq = a.answer_seq ELSE seq > a.delivered_seq END
				ORDER BY seq LIMIT 1
			) ans ON true
			WHERE a.id = $1 AND a.user_id = $2
			FOR UPDATE OF a`, sessionID, userID, q.Seq, timeout.Seconds(),
		).Scan(&status, &readSeq, &expired, &ansID, &ansSeq, &ansContent, &ansAt, &nextAgent)
		if errors.Is(err, sql.ErrNoRows) {
			return errNotFound
		}
		if err != nil {
			return err
		}
		switch {
		case ansSeq.Valid && (!nextAgent.Valid || ansSeq.Int64 < nextAgent.Int64):
			out.State = questionAnswered
			out.Answer = message{ID: ansID.String, Seq: ansSeq.Int64, SessionID: sessionID, SenderType: senderUser,
				Content: ansContent.String, CreatedAt: ansAt.Time}
		case nextAgent.Valid:
			out.State = questionSuperseded
		case status == statusCompleted:
			out.State = questionEnded
		case expired:
			out.State = questionExpired
		}
		if out.State != questionAnswered && !(final && out.State == questionOpen) {
			return nil
		}
		out.Feedback, err = queryAll(ctx, tx, scanMessage, `
			SELECT `+messageColumns+` FROM messages
			WHERE agent_instance_id = $1 AND user_id = $2 AND sender_type = 'USER' AND seq > $3 AND seq < $4
			ORDER BY seq`, sessionID, userID, readSeq, q.Seq)
		if err != nil {
			return err
		}
		last := out.Answer
		if out.State != questionAnswered {
			if len(out.Feedback) == 0 {
				return nil
			}
			last = out.Feedback[len(out.Feedback)-1]
		}
		return deliver(ctx, tx, userID, sessionID, last, out.Answer.Seq, q.Seq)
	})
	if err != nil {
		return outcome{}, fmt.Errorf("question outcome: %w", err)
	}
	return out, nil
}

// isUnavailable reports whether err means the database could not be reached
// or is going away, as opposed to a statement it refused.
func isUnavailable(err error) bool {
	var pqErr *pq.Error
	if errors.As(err, &pqErr) {
		// Class 08: connection exception; class 53: out of resources (too
		// many connections); 57P01-57P03: shutting down or starting.
		return pqErr.Code.Class() == "08" || pqErr.Code.Class() == "53" ||
			pqErr.Code == "57P01" || pqErr.Code == "57P02" || pqErr.Code == "57P03"
	}
	var netErr net.Error
	return errors.As(err, &netErr) || errors.Is(err, driver.ErrBadConn) || errors.Is(err, io.EOF) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, sql.ErrConnDone)
}

// ---- notifications (issue 11) ----

// Notification event kinds. eventSummary is the "N more waiting" a
// flooded channel gets instead of the events over its limit.
const (
	eventQuestionAsked  = "question.asked"
	eventSessionEnded   = "session.ended"
	eventMessageFlagged = "message.flagged"
	eventSummary        = "summary"
	// issue 15: Claude Code waits for the person (a Notification hook;
	// sent, like question.asked, to channels that ask for question.asked),
	// and Claude finished its turn (Stop; opt-in).
	eventAgentWaiting = "agent.waiting"
	eventAgentIdle    = "agent.idle"
	eventTest         = "test"
)

// maxChannelsPerUser bounds the fan-out of one event (and the work one user
// can make the workers do).
const maxChannelsPerUser = 20

// errTooManyChannels: the user has maxChannelsPerUser channels already.
var errTooManyChannels = errors.New("too many notification channels")

// enqueueNotificationForAgentMessage is insertAgentMessage's hook: a
// question becomes question.asked, any other message with send_email,
// send_sms or send_push set becomes message.flagged (what the flags meant in
// Omnara).
func enqueueNotificationForAgentMessage(ctx context.Context, tx *sql.Tx, userID string, in agentMessage, messageID string) error {
	flagged := func(b *bool) bool { return b != nil && *b }
	switch {
	case in.RequiresUserInput:
		return enqueueNotification(ctx, tx, userID, in.SessionID, eventQuestionAsked, messageID)
	case flagged(in.SendEmail) || flagged(in.SendSMS) || flagged(in.SendPush):
		return enqueueNotification(ctx, tx, userID, in.SessionID, eventMessageFlagged, messageID)
	}
	return nil
}

// enqueueNotification writes, in tx, the event and one delivery row for each
// of userID's channels that wants kind, and NOTIFYs the workers, who wake at
// commit: a committed question always gets its notification and a rolled
// back one never does. A user without such a channel costs one statement
// and no rows. An event that exists already (the same question or message
// and kind; a session's end) is not written again. session.ended is
// written only by the transaction that set ended_at (ended_at = now(), the
// transaction's start time), so ending a session twice notifies once.
func enqueueNotification(ctx context.Context, tx *sql.Tx, userID, sessionID, kind, messageID string) error {
	// ch locks the channels FOR KEY SHARE: a channel being removed right
	// now is waited for and then left out, never a foreign-key error that
	// would fail the agent's call; one removed later waits for this commit.
	_, err := tx.ExecContext(ctx, `
		WITH ch AS (
			SELECT id FROM notification_channels
			WHERE user_id = $1 AND ($3 = ANY (events)
				OR ($3 = 'agent.waiting' AND 'question.asked' = ANY (events)))
			FOR KEY SHARE
		),
		ev AS (
			INSERT INTO notification_events (user_id, session_id, kind, message_id)
			SELECT $1::uuid, $2::uuid, $3::text, NULLIF($4::text, '')::uuid
			WHERE EXISTS (SELECT 1 FROM ch)
				AND ($3 <> 'session.ended' OR EXISTS (
					SELECT 1 FROM agent_instances WHERE id = $2 AND user_id = $1 AND ended_at = now()))
			ON CONFLICT DO NOTHING
			RETURNING id
		),
		d AS (
			INSERT INTO notification_deliveries (event_id, channel_id, user_id)
			SELECT ev.id, ch.id, $1::uuid FROM ev, ch
			RETURNING id
		)
		SELECT pg_notify($5, 'o ' || $1::uuid::text || ' ' || $2::uuid::text || ' 0')
		FROM (SELECT count(*) AS n FROM d) x WHERE x.n > 0`, userID, sessionID, kind, messageID, notifyChannel)
	if err != nil {
		return fmt.Errorf("enqueue notification: %w", err)
	}
	return nil
}

// channel is a notification channel. Token and Secret are filled only where
// a sender needs them.
type channel struct {
	ID             string
	UserID         string
	Kind           string
	URL            string
	Token          string
	Secret         string
	Events         []string
	CreatedAt      time.Time
	LastDeliveryAt sql.NullTime
	LastError      sql.NullString
	Failures       int
}

// createChannel stores a channel for userID. It returns errTooManyChannels
// if the user has maxChannelsPerUser already.
func (s *store) createChannel(ctx context.Context, userID string, c channel) (channel, error) {
	c.UserID = userID
	err := s.db.QueryRowContext(ctx, `
		INSERT INTO notification_channels (user_id, kind, url, token, secret, events)
		SELECT $1, $2, $3, NULLIF($4, ''), NULLIF($5, ''), $6
		WHERE (SELECT count(*) FROM notification_channels WHERE user_id = $1) < $7
		RETURNING id, created_at`, userID, c.Kind, c.URL, c.Token, c.Secret, pq.Array(c.Events), maxChannelsPerUser,
	).Scan(&c.ID, &c.CreatedAt)
	if errors.Is(err, sql.ErrNoRows) {
		return channel{}, errTooManyChannels
	}
	if err != nil {
		return channel{}, fmt.Errorf("create channel: %w", err)
	}
	return c, nil
}

// listChannels returns userID's channels, oldest first, without their token
// and secret.
func (s *store) listChannels(ctx context.Context, userID string) ([]channel, error) {
	rows, err := s.db.QueryContext(ctx, `
		SELECT id, kind, url, events, created_at, last_delivery_at, last_error, failures
		FROM notification_channels WHERE user_id = $1
		ORDER BY created_at, id`, userID)
	if err != nil {
		return nil, fmt.Errorf("list channels: %w", err)
	}
	defer rows.Close()
	var out []channel
	for rows.Next() {
		c := channel{UserID: userID}
		if err := rows.Scan(&c.ID, &c.Kind, &c.URL, pq.Array(&c.Events), &c.CreatedAt, &c.LastDeliveryAt, &c.LastError, &c.Failures); err != nil {
			return nil, fmt.Errorf("list channels: %w", err)
		}
		out = append(out, c)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list channels: %w", err)
	}
	return out, nil
}

// channelForSend returns userID's channel id with its token and secret. It
// returns errNotFound if the channel is missing or not userID's.
func (s *store) channelForSend(ctx context.Context, userID, id string) (channel, error) {
	c := channel{ID: id, UserID: userID}
	var token, secret sql.NullString
	err := s.db.QueryRowContext(ctx, `
		SELECT kind, url, token, secret, events, created_at, last_delivery_at, last_error, failures
		FROM notification_channels WHERE id = $1 AND user_id = $2`, id, userID,
	).Scan(&c.Kind, &c.URL, &token, &secret, pq.Array(&c.Events), &c.CreatedAt, &c.LastDeliveryAt, &c.LastError, &c.Failures)
	if errors.Is(err, sql.ErrNoRows) {
		return channel{}, errNotFound
	}
	if err != nil {
		return channel{}, fmt.Errorf("channel: %w", err)
	}
	c.Token, c.Secret = token.String, secret.String
	return c, nil
}

// deleteChannel removes userID's channel id and its deliveries. It returns
// errNotFound if the channel is missing or not userID's.
func (s *store) deleteChannel(ctx context.Context, userID, id string) error {
	var err error
	for try := 0; try < 3; try++ {
		if err = s.deleteChannelOnce(ctx, userID, id); !isDeadlock(err) {
			break
		}
	}
	return err
}

// isDeadlock reports whether PostgreSQL ended the transaction to break a
// deadlock (it is safe to run again).
func isDeadlock(err error) bool {
	var pqErr *pq.Error
	return errors.As(err, &pqErr) && pqErr.Code == "40P01"
}

// deleteChannelOnce is one try of deleteChannel. A delivery row committed
// between its two statements can still make it meet a worker in a deadlock,
// which PostgreSQL breaks by ending one side: deleteChannel then tries again.
func (s *store) deleteChannelOnce(ctx context.Context, userID, id string) error {
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		// The channel's pending rows first, in the order a worker locks
		// them (deliveries, then the channel): deleting the channel first
		// would lock it before the rows its cascade needs, and a worker
		// holding those rows and waiting for the channel would deadlock.
		if _, err := tx.ExecContext(ctx, `
			SELECT id FROM notification_deliveries
			WHERE channel_id = $1 AND user_id = $2 AND status = 'pending'
			FOR UPDATE`, id, userID); err != nil {
			return err
		}
		res, err := tx.ExecContext(ctx, `DELETE FROM notification_channels WHERE id = $1 AND user_id = $2`, id, userID)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return errNotFound
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("delete channel: %w", err)
	}
	return nil
}

// channelOwner returns the user id of channel id, for the operator's CLI,
// which names a channel without a user. It returns errNotFound if there is
// no such channel.
func (s *store) channelOwner(ctx context.Context, id string) (string, error) {
	var userID string
	err := s.db.QueryRowContext(ctx, `SELECT user_id FROM notification_channels WHERE id = $1`, id).Scan(&userID)
	if errors.Is(err, sql.ErrNoRows) {
		return "", errNotFound
	}
	if err != nil {
		return "", fmt.Errorf("channel owner: %w", err)
	}
	return userID, nil
}

// userByEmail returns the id of the user with this email, or errNotFound.
func (s *store) userByEmail(ctx context.Context, email string) (string, error) {
	var id string
	err := s.db.QueryRowContext(ctx, `SELECT id FROM users WHERE email = $1`, email).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return "", errNotFound
	}
	if err != nil {
		return "", fmt.Errorf("user by email: %w", err)
	}
	return id, nil
}

// recordChannelTest keeps the outcome of a test send on userID's channel.
func (s *store) recordChannelTest(ctx context.Context, userID, id string, ok bool, lastError string) error {
	_, err := s.db.ExecContext(ctx, `
		UPDATE notification_channels SET
			last_delivery_at = CASE WHEN $3 THEN now() ELSE last_delivery_at END,
			last_error = CASE WHEN $3 THEN NULL ELSE $4 END,
			failures = CASE WHEN $3 THEN 0 ELSE failures + 1 END
		WHERE id = $1 AND user_id = $2`, id, userID, ok, lastError)
	if err != nil {
		return fmt.Errorf("record channel test: %w", err)
	}
	return nil
}

// delivery is a claimed delivery row with everything needed to send it.
// The worker's statements below run for all users: each joins its rows on
// user_id, so a delivery only ever carries its own user's channel and text.
type delivery struct {
	ID        string // also the webhook-id
	UserID    string
	ChannelID string
	Attempts  int // including the one just claimed
	Channel   channel
	EventKind string
	SessionID string
	MessageID string
	EventAt   time.Time
	AgentType string
	Text      string
	Folded    int            // for a summary: how many events it stands for
	Actions   []notifyAction // lock-screen actions (issue 12)
}

// deliveryLimits are the worker's flood limit and lease.
type deliveryLimits struct {
	lease     time.Duration // how long a claimed row is left to its worker
	window    time.Duration // the flood window
	perWindow int           // requests per channel per window (a summary not counted)
}

// claimDeliveries claims up to limit due deliveries in one short
// transaction: FOR UPDATE SKIP LOCKED, so workers of other replicas pass
// rows being claimed here, and a claimed row's next_attempt_at moves to the
// end of its lease, so no worker takes it again while it is being sent.
// A row over its channel's flood limit is folded into the channel's pending
// summary (made if there is none, due at the window's end); a retry over the
// limit waits for the window's end instead.
func (s *store) claimDeliveries(ctx context.Context, limit int, lim deliveryLimits) ([]delivery, error) {
	var out []delivery
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		// A claim lost in a database crash only means the row is sent
		// again (same webhook-id), so it need not wait for a WAL flush:
		// that wait is most of a notification's latency.
		if _, err := tx.ExecContext(ctx, `SET LOCAL synchronous_commit = off`); err != nil {
			return err
		}
		cands, err := queryAll(ctx, tx, func(c *dueDelivery) []any {
			return []any{&c.id, &c.channelID, &c.userID, &c.kind, &c.attempts}
		}, `
			SELECT d.id, d.channel_id, d.user_id, e.kind, d.attempts
			FROM notification_deliveries d
			JOIN notification_events e ON e.id = d.event_id AND e.user_id = d.user_id
			WHERE d.status = 'pending' AND d.next_attempt_at <= now()
			ORDER BY d.next_attempt_at, d.id
			LIMIT $1
			FOR UPDATE OF d SKIP LOCKED`, limit)
		if err != nil || len(cands) == 0 {
			return err
		}
		claimed, err := floodLimit(ctx, tx, cands, lim)
		if err != nil || len(claimed) == 0 {
			return err
		}
		// A summary counts what was folded into it when it is first claimed;
		// a retry sends the same number.
		out, err = queryAll(ctx, tx, func(d *delivery) []any {
			return []any{&d.ID, &d.UserID, &d.ChannelID, &d.Attempts, &d.Folded,
				&d.Channel.Kind, &d.Channel.URL, &d.Channel.Token, &d.Channel.Secret,
				&d.EventKind, &d.SessionID, &d.MessageID, &d.EventAt, &d.AgentType, &d.Text}
		}, `
			WITH c AS (
				UPDATE notification_deliveries d SET
					attempts = d.attempts + 1,
					next_attempt_at = now() + make_interval(secs => $2),
					folded_count = CASE WHEN d.attempts = 0 THEN
						(SELECT count(*) FROM notification_deliveries f WHERE f.summary_id = d.id AND f.user_id = d.user_id)
						ELSE d.folded_count END
				WHERE d.id = ANY ($1::uuid[]) AND d.status = 'pending'
				RETURNING d.id, d.user_id, d.channel_id, d.event_id, d.attempts, d.folded_count
			)
			SELECT c.id, c.user_id, c.channel_id, c.attempts, c.folded_count,
				ch.kind, ch.url, COALESCE(ch.token, ''), COALESCE(ch.secret, ''),
				e.kind, COALESCE(e.session_id::text, ''), COALESCE(e.message_id::text, ''), e.created_at,
				COALESCE(ua.name, ''), COALESCE(m.content, '')
			FROM c
			JOIN notification_channels ch ON ch.id = c.channel_id AND ch.user_id = c.user_id
			JOIN notification_events e ON e.id = c.event_id AND e.user_id = c.user_id
			LEFT JOIN agent_instances a ON a.id = e.session_id AND a.user_id = c.user_id
			LEFT JOIN user_agents ua ON ua.id = a.user_agent_id AND ua.user_id = c.user_id
			LEFT JOIN messages m ON m.id = e.message_id AND m.user_id = c.user_id`,
			pq.Array(claimed), lim.lease.Seconds())
		for i := range out {
			out[i].Channel.ID, out[i].Channel.UserID = out[i].ChannelID, out[i].UserID
		}
		if err != nil {
			return err
		}
		return addActions(ctx, tx, out) // lock-screen actions
	})
	if err != nil {
		return nil, fmt.Errorf("claim deliveries: %w", err)
	}
	return out, nil
}

// dueDelivery is a delivery row locked for claiming.
type dueDelivery struct {
	id, channelID, userID, kind string
	attempts                    int
}

// floodWindow is a channel's flood counter: sent requests since start.
type floodWindow struct {
	id    string
	start sql.NullTime
	sent  int
	now   time.Time
	dirty bool
}

// floodLimit applies the channels' flood limits to the due rows in tx and
// returns the ids to send now. A first attempt over the limit is folded into
// the channel's pending summary; a retry over it waits for the window's end.
func floodLimit(ctx context.Context, tx *sql.Tx, due []dueDelivery, lim deliveryLimits) ([]string, error) {
	var chanIDs []string
	for _, d := range due {
		chanIDs = append(chanIDs, d.channelID)
	}
	// Locked in id order (so two workers never wait on each other in a
	// cycle). FOR NO KEY UPDATE, not FOR UPDATE: it must not conflict with
	// the KEY SHARE locks that agents' transactions take on a channel (the
	// foreign key of the delivery rows they write), or the two deadlock.
	list, err := queryAll(ctx, tx, func(w *floodWindow) []any { return []any{&w.id, &w.start, &w.sent, &w.now} }, `
		SELECT id, window_start, window_sent, now() FROM notification_channels
		WHERE id = ANY ($1::uuid[])
		ORDER BY id
		FOR NO KEY UPDATE`, pq.Array(chanIDs))
	if err != nil {
		return nil, err
	}
	wins := map[string]*floodWindow{}
	for i := range list {
		w := &list[i]
		if !w.start.Valid || !w.now.Before(w.start.Time.Add(lim.window)) {
			w.start, w.sent, w.dirty = sql.NullTime{Time: w.now, Valid: true}, 0, true
		}
		wins[w.id] = w
	}
	summaries := map[string]string{} // channel -> its pending summary row
	var claimed []string
	for _, d := range due {
		w := wins[d.channelID]
		if w == nil {
			continue // the channel was deleted meanwhile; the row goes with it
		}
		windowEnd := w.start.Time.Add(lim.window)
		switch {
		case d.kind == eventSummary:
			claimed = append(claimed, d.id)
		case w.sent < lim.perWindow:
			w.sent++
			w.dirty = true
			claimed = append(claimed, d.id)
		case d.attempts > 0:
			_, err = tx.ExecContext(ctx, `UPDATE notification_deliveries SET next_attempt_at = $2 WHERE id = $1`, d.id, windowEnd)
		default:
			err = foldDelivery(ctx, tx, d, windowEnd, summaries)
		}
		if err != nil {
			return nil, err
		}
	}
	for _, w := range list {
		if w.dirty {
			_, err := tx.ExecContext(ctx, `
				UPDATE notification_channels SET window_start = $2, window_sent = $3 WHERE id = $1`, w.id, w.start, w.sent)
			if err != nil {
				return nil, err
			}
		}
	}
	return claimed, nil
}

// foldDelivery folds d into its channel's pending summary, making one (due
// at windowEnd) if there is none; summaries caches them by channel.
func foldDelivery(ctx context.Context, tx *sql.Tx, d dueDelivery, windowEnd time.Time, summaries map[string]string) error {
	sum, ok := summaries[d.channelID]
	if !ok {
		err := tx.QueryRowContext(ctx, `
			SELECT d.id FROM notification_deliveries d
			JOIN notification_events e ON e.id = d.event_id AND e.user_id = d.user_id
			WHERE d.channel_id = $1 AND d.user_id = $2 AND e.kind = 'summary'
				AND d.status = 'pending' AND d.attempts = 0
			LIMIT 1`, d.channelID, d.userID).Scan(&sum)
		if errors.Is(err, sql.ErrNoRows) {
			err = tx.QueryRowContext(ctx, `
				WITH ev AS (
					INSERT INTO notification_events (user_id, kind) VALUES ($1, 'summary')
					RETURNING id
				)
				INSERT INTO notification_deliveries (event_id, channel_id, user_id, next_attempt_at)
				SELECT ev.id, $2, $1, $3 FROM ev
				RETURNING id`, d.userID, d.channelID, windowEnd).Scan(&sum)
		}
		if err != nil {
			return err
		}
		summaries[d.channelID] = sum
	}
	_, err := tx.ExecContext(ctx, `
		UPDATE notification_deliveries SET status = 'folded', summary_id = $2 WHERE id = $1`, d.id, sum)
	return err
}

// Delivery outcomes, as recordDelivery takes them.
const (
	outcomeSent  = "sent"
	outcomeRetry = "retry"
	outcomeFail  = "failed"
)

// recordDelivery stores the outcome of an attempt at delivery id: sent;
// failed for good; or retry after delay, which becomes failed when the next
// attempt would come giveUp or more after the row was made. The channel
// keeps the latest outcome. It returns the row's status after the update
// ("" if the row was no longer pending: its channel was removed).
func (s *store) recordDelivery(ctx context.Context, id, outcome, lastError string, delay, giveUp time.Duration) (string, error) {
	var status string
	err := s.db.QueryRowContext(ctx, `
		WITH d AS (
			UPDATE notification_deliveries SET
				status = CASE
					WHEN $2 = 'sent' THEN 'sent'
					WHEN $2 = 'failed' OR created_at + make_interval(secs => $5) <= now() + make_interval(secs => $4) THEN 'failed'
					ELSE 'pending' END,
				sent_at = CASE WHEN $2 = 'sent' THEN now() END,
				last_error = CASE
					WHEN $2 = 'sent' THEN NULL
					WHEN $2 = 'retry' AND created_at + make_interval(secs => $5) <= now() + make_interval(secs => $4)
						THEN 'gave up: ' || $3
					ELSE $3 END,
				next_attempt_at = now() + make_interval(secs => $4)
			WHERE id = $1 AND status = 'pending'
			RETURNING channel_id, user_id, status, last_error
		),
		c AS (
			UPDATE notification_channels ch SET
				last_delivery_at = CASE WHEN d.status = 'sent' THEN now() ELSE ch.last_delivery_at END,
				last_error = d.last_error,
				failures = CASE WHEN d.status = 'sent' THEN 0 ELSE ch.failures + 1 END
			FROM d WHERE ch.id = d.channel_id AND ch.user_id = d.user_id
		)
		SELECT status FROM d`, id, outcome, lastError, delay.Seconds(), giveUp.Seconds()).Scan(&status)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("record delivery: %w", err)
	}
	return status, nil
}

// nextDelivery returns how long until the earliest pending delivery is due
// (zero or less: now); ok is false when none is pending.
func (s *store) nextDelivery(ctx context.Context) (time.Duration, bool, error) {
	var secs sql.NullFloat64
	err := s.db.QueryRowContext(ctx, `
		SELECT EXTRACT(EPOCH FROM min(next_attempt_at) - now())::float8
		FROM notification_deliveries WHERE status = 'pending'`).Scan(&secs)
	if err != nil {
		return 0, false, fmt.Errorf("next delivery: %w", err)
	}
	if !secs.Valid {
		return 0, false, nil
	}
	return time.Duration(secs.Float64 * float64(time.Second)), true, nil
}

// outboxBacklog counts the deliveries waiting to be sent, for every user (an
// operator's metric: no user's data leaves it).
func (s *store) outboxBacklog(ctx context.Context) (int64, error) {
	var n int64
	err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM notification_deliveries WHERE status = 'pending'`).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("outbox backlog: %w", err)
	}
	return n, nil
}

// ---- key listing ----

// keyInfo is what a person or an operator may see of a key: never the token
// or its hash.
type keyInfo struct {
	ID         string
	Name       string
	Scope      string
	Active     bool
	CreatedAt  time.Time
	LastUsedAt sql.NullTime
	ExpiresAt  sql.NullTime
	RevokedAt  sql.NullTime
}

func scanKeyInfo(k *keyInfo) []any {
	return []any{&k.ID, &k.Name, &k.Scope, &k.Active, &k.CreatedAt, &k.LastUsedAt, &k.ExpiresAt, &k.RevokedAt}
}

// listAPIKeys returns userID's keys, newest first.
func (s *store) listAPIKeys(ctx context.Context, userID string) ([]keyInfo, error) {
	keys, err := queryAll(ctx, s.db, scanKeyInfo, `
		SELECT id, name, scope, is_active, created_at, last_used_at, expires_at, revoked_at
		FROM api_keys WHERE user_id = $1
		ORDER BY created_at DESC, id DESC`, userID)
	if err != nil {
		return nil, fmt.Errorf("list api keys: %w", err)
	}
	if keys == nil {
		keys = []keyInfo{}
	}
	return keys, nil
}

// revokeUserAPIKey revokes userID's key keyID (again: a no-op that keeps the
// first revoked_at) and returns it; errNotFound when userID has no such key.
func (s *store) revokeUserAPIKey(ctx context.Context, userID, keyID string) (keyInfo, error) {
	var k keyInfo
	err := s.db.QueryRowContext(ctx, `
		UPDATE api_keys SET is_active = false, revoked_at = COALESCE(revoked_at, now())
		WHERE id = $1 AND user_id = $2
		RETURNING id, name, scope, is_active, created_at, last_used_at, expires_at, revoked_at`, keyID, userID).
		Scan(scanKeyInfo(&k)...)
	if errors.Is(err, sql.ErrNoRows) {
		return keyInfo{}, errNotFound
	}
	if err != nil {
		return keyInfo{}, fmt.Errorf("revoke user api key: %w", err)
	}
	return k, nil
}

// ---- PostgreSQL behind a pooler ----

// pgNotify sends payload on channel: the start-up LISTEN check's
// notification, the wait hub's self-check (hub.watch), a client's
// cancellation of a waiting call (mcpServer.legacyCancel).
func (s *store) pgNotify(ctx context.Context, channel, payload string) error {
	_, err := s.db.ExecContext(ctx, `SELECT pg_notify($1, $2)`, channel, payload)
	return err
}

// ---- approvals and choices (issue 12) ----

// questionColumns are the question and approval columns of a message, as
// questionFields.scan reads them.
const questionColumns = `kind, tool_name, tool_input, decision, decision_message, decided_by_rule, options, allow_text`

// questionFields are a message's question and approval columns: all empty
// for a plain step or person's message.
type questionFields struct {
	Kind            sql.NullString // "approval", or empty
	ToolName        sql.NullString
	ToolInput       []byte // JSON
	Decision        sql.NullString
	DecisionMessage sql.NullString
	DecidedByRule   sql.NullString
	Options         []byte // JSON array of strings
	AllowText       bool
}

func (q *questionFields) scan() []any {
	return []any{&q.Kind, &q.ToolName, &q.ToolInput, &q.Decision, &q.DecisionMessage, &q.DecidedByRule, &q.Options, &q.AllowText}
}

// Approval decisions, as stored.
const (
	decisionAllow        = "allow"
	decisionAllowSession = "allow_session"
	decisionDeny         = "deny"
)

// approvalRequest is one call of the approve tool.
type approvalRequest struct {
	SessionID string
	AgentType string // to create the session when it is new
	Create    bool   // the session may be created
	ToolName  string
	Input     []byte // canonical JSON object
	ToolUseID string
	Content   string // what the timeline and the notification show
	Rule      sessionRule
	// ResumeOpenOnly: without a tool_use_id, resume only an undecided
	// approval, never a decided one (a PermissionRequest hook: Claude Code
	// sends no tool_use_id and the hook never sees the calls in between, so
	// the same request again is a new question).
	ResumeOpenOnly bool
	// ViaHook: asked by a PermissionRequest hook (turning Away off closes
	// the open ones).
	ViaHook bool
}

// approval is where an approval stands.
type approval struct {
	ID        string
	SessionID string
	Resumed   bool
	State     questionState // open, answered (decided), ended, expired
	Decision  string
	Message   string
	Rule      string        // the session rule that allowed it, if any
	Left      time.Duration // until it times out
}

// latestActiveSession returns the id of userID's most recently active
// ACTIVE (or AWAITING_INPUT: it waits on an approval) session of agentType,
// or "" when there is none.
func (s *store) latestActiveSession(ctx context.Context, userID, agentType string) (string, error) {
	var id string
	err := s.db.QueryRowContext(ctx, `
		SELECT a.id FROM agent_instances a
		JOIN user_agents ua ON ua.id = a.user_agent_id AND ua.user_id = $1
		WHERE a.user_id = $1 AND ua.name = lower($2) AND a.status IN ('ACTIVE', 'AWAITING_INPUT')
		ORDER BY a.last_activity_at DESC, a.id DESC LIMIT 1`, userID, agentType).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("latest active session: %w", err)
	}
	return id, nil
}

// askApproval stores an approval in the session, or resumes one: the
// session's approval with the same tool_use_id, or (without one) an
// undecided approval of the same tool and input, or (unless
// in.ResumeOpenOnly) a decided one that is still the session's latest agent
// message. A call that matches a session
// rule is stored already allowed by it, without asking or notifying. It
// returns errNotFound if the session is not userID's (or is missing and may
// not be created).
func (s *store) askApproval(ctx context.Context, userID string, in approvalRequest, timeout time.Duration) (approval, error) {
	ap := approval{SessionID: in.SessionID, Left: timeout}
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		var err error
		if in.Create {
			_, err = lockOrCreateSession(ctx, tx, userID, in.SessionID, in.AgentType)
		} else {
			_, _, _, err = lockSession(ctx, tx, userID, in.SessionID)
		}
		if err != nil {
			return err
		}
		var left float64
		var decision, msg, rule sql.NullString
		err = tx.QueryRowContext(ctx, `
			SELECT m.id, m.decision, m.decision_message, m.decided_by_rule,
				extract(epoch FROM m.created_at + make_interval(secs => $6) - now())
			FROM messages m
			WHERE m.agent_instance_id = $1 AND m.user_id = $2 AND m.kind = 'approval'
				AND (m.decision IS NOT NULL OR m.requires_user_input) -- never a closed one (issue 15)
				AND CASE WHEN $3 <> '' THEN m.tool_use_id = $3
					ELSE m.tool_use_id IS NULL AND m.tool_name = $4 AND m.tool_input = $5::jsonb
						AND (m.decision IS NULL OR (NOT $7 AND m.seq = (SELECT max(seq) FROM messages
							WHERE agent_instance_id = $1 AND user_id = $2 AND sender_type = 'AGENT')))
					END
			ORDER BY m.seq DESC LIMIT 1`,
			in.SessionID, userID, in.ToolUseID, in.ToolName, string(in.Input), timeout.Seconds(), in.ResumeOpenOnly,
		).Scan(&ap.ID, &decision, &msg, &rule, &left)
		if err == nil {
			ap.Resumed, ap.Left = true, time.Duration(left*float64(time.Second))
			ap.Decision, ap.Message, ap.Rule = decision.String, msg.String, rule.String
			return nil
		}
		if !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		allowed := false
		if in.Rule.ok {
			err := tx.QueryRowContext(ctx, `
				SELECT EXISTS (SELECT 1 FROM session_rules
					WHERE agent_instance_id = $1 AND user_id = $2 AND tool_name = $3 AND prefix = $4)`,
				in.SessionID, userID, in.Rule.tool, in.Rule.prefix).Scan(&allowed)
			if err != nil {
				return err
			}
		}
		m, _, err := insertAgentMessage(ctx, tx, userID, agentMessage{SessionID: in.SessionID, Content: in.Content, RequiresUserInput: !allowed}, false)
		if err != nil {
			return err
		}
		ap.ID = m.ID
		if allowed {
			ap.Decision, ap.Rule = decisionAllow, in.Rule.String()
		}
		return markApproval(ctx, tx, userID, m.ID, in, ap.Decision, ap.Rule, "")
	})
	if err != nil {
		return approval{}, fmt.Errorf("ask approval: %w", err)
	}
	if ap.Decision != "" {
		ap.State = questionAnswered
	}
	return ap, nil
}

// markApproval makes agent message id, just stored in tx, an approval of
// in's tool call: decided when decision is set (by rule, when rule is),
// closed without a decision when note is set (issue 15).
func markApproval(ctx context.Context, tx *sql.Tx, userID, id string, in approvalRequest, decision, rule, note string) error {
	_, err := tx.ExecContext(ctx, `
		UPDATE messages SET kind = 'approval', tool_name = $3, tool_input = $4::jsonb, tool_use_id = NULLIF($5, ''),
			decision = NULLIF($6, ''), decided_by_rule = NULLIF($7, ''), decided_at = CASE WHEN $6 <> '' THEN now() END,
			decision_message = NULLIF($8, ''), via_hook = $9
		WHERE id = $1 AND user_id = $2`, id, userID, in.ToolName, string(in.Input), in.ToolUseID, decision, rule, note, in.ViaHook)
	if err != nil {
		return fmt.Errorf("mark approval: %w", err)
	}
	return nil
}

// approvalOutcome reports where approval id of the session stands.
func (s *store) approvalOutcome(ctx context.Context, userID, sessionID, id string, timeout time.Duration) (approval, error) {
	ap := approval{ID: id, SessionID: sessionID}
	var decision, msg, rule sql.NullString
	var status string
	var expired, asks bool
	err := s.db.QueryRowContext(ctx, `
		SELECT m.decision, m.decision_message, m.decided_by_rule, a.status,
			m.created_at + make_interval(secs => $4) <= now(), m.requires_user_input
		FROM messages m JOIN agent_instances a ON a.id = m.agent_instance_id AND a.user_id = $2
		WHERE m.id = $3 AND m.agent_instance_id = $1 AND m.user_id = $2 AND m.kind = 'approval'`,
		sessionID, userID, id, timeout.Seconds()).Scan(&decision, &msg, &rule, &status, &expired, &asks)
	if errors.Is(err, sql.ErrNoRows) {
		return approval{}, errNotFound
	}
	if err != nil {
		return approval{}, fmt.Errorf("approval outcome: %w", err)
	}
	ap.Decision, ap.Message, ap.Rule = decision.String, msg.String, rule.String
	switch {
	case decision.Valid:
		ap.State = questionAnswered
	case !asks:
		ap.State = questionClosed
	case status == statusCompleted:
		ap.State = questionEnded
	case expired:
		ap.State = questionExpired
	}
	return ap, nil
}

// questionOptions are a question's choices: Options a JSON array (nil:
// none) and whether a free-text answer is allowed.
type questionOptions struct {
	Options   []byte
	AllowText bool
}

// setQuestionOptions stores the options of a question just asked, in tx.
func setQuestionOptions(ctx context.Context, tx *sql.Tx, userID, id string, o questionOptions) error {
	_, err := tx.ExecContext(ctx, `
		UPDATE messages SET options = $3::jsonb, allow_text = $4
		WHERE id = $1 AND user_id = $2 AND sender_type = 'AGENT'`, id, userID, nullJSON(o.Options), o.AllowText)
	if err != nil {
		return fmt.Errorf("set question options: %w", err)
	}
	return nil
}

func nullJSON(b []byte) any {
	if len(b) == 0 {
		return nil
	}
	return string(b)
}

// alreadyAnswered is a 409 whose detail says what was decided.
type alreadyAnswered struct{ detail string }

func (e *alreadyAnswered) Error() string { return e.detail }

// personAnswer is what the person sends to the answer endpoint.
type personAnswer struct {
	Decision string // an approval's
	Message  string
	Text     string // a question's (an option's text when Option chose one)
}

// answered is a question or approval after the person answered it.
type answered struct {
	ID        string
	SessionID string
	Kind      string // "question" or "approval"
	Decision  string
	Message   string
	Answer    string
	Rule      string // for allow_session: the rule now allowed
}

// answerQuestion records the person's answer to question id: an approval's
// decision (allow_session also stores the rule, when the call has one), or a
// question's answer as the person's message after it. The first answer
// wins: a decided approval, or a question a person's message already
// answered, is an *alreadyAnswered. A question that can no longer be
// answered (superseded, its session ended, timed out) is one too. validate
// checks the answer against the stored question under its lock. It returns
// errNotFound if the question is missing or not userID's.
func (s *store) answerQuestion(ctx context.Context, userID, id string, timeout time.Duration, validate func(q questionFields) (personAnswer, error)) (answered, error) {
	return s.answerQuestionWith(ctx, userID, id, "", timeout, validate)
}

// answerQuestionWith is answerQuestion; with capHash the answer comes from
// that lock-screen capability, which must still exist (errGone if not) and
// is used up in the same transaction.
func (s *store) answerQuestionWith(ctx context.Context, userID, id, capHash string, timeout time.Duration, validate func(q questionFields) (personAnswer, error)) (answered, error) {
	out := answered{ID: id}
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		err := tx.QueryRowContext(ctx, `
			SELECT agent_instance_id FROM messages
			WHERE id = $1 AND user_id = $2 AND sender_type = 'AGENT' AND (requires_user_input OR kind = 'approval')`,
			id, userID).Scan(&out.SessionID)
		if errors.Is(err, sql.ErrNoRows) {
			return errNotFound
		}
		if err != nil {
			return err
		}
		if _, _, _, err := lockSession(ctx, tx, userID, out.SessionID); err != nil {
			return err
		}
		if capHash != "" {
			// Under the session lock: of two uses at once, the second
			// finds the capability gone.
			res, err := tx.ExecContext(ctx, `
				DELETE FROM action_capabilities WHERE hash = $1 AND message_id = $2 AND user_id = $3`, capHash, id, userID)
			if err != nil {
				return err
			}
			if n, _ := res.RowsAffected(); n == 0 {
				return errGone
			}
		}
		// Any answer kills every capability of the question.
		if err := dropCapabilities(ctx, tx, userID, id); err != nil {
			return err
		}
		var q questionFields
		var seq int64
		var status string
		var expired, asks bool
		var answer sql.NullString
		var nextAgent sql.NullInt64
		err = tx.QueryRowContext(ctx, `
			SELECT m.seq, a.status, m.created_at + make_interval(secs => $3) <= now(), m.requires_user_input,
				(SELECT content FROM messages u WHERE u.agent_instance_id = m.agent_instance_id AND u.user_id = $2
					AND u.sender_type = 'USER' AND u.seq > m.seq ORDER BY u.seq LIMIT 1),
				(SELECT min(seq) FROM messages n WHERE n.agent_instance_id = m.agent_instance_id AND n.user_id = $2
					AND n.sender_type = 'AGENT' AND n.seq > m.seq),
				`+questionColumns+`
			FROM messages m JOIN agent_instances a ON a.id = m.agent_instance_id AND a.user_id = $2
			WHERE m.id = $1 AND m.user_id = $2`, id, userID, timeout.Seconds(),
		).Scan(append([]any{&seq, &status, &expired, &asks, &answer, &nextAgent}, q.scan()...)...)
		if err != nil {
			return err
		}
		if q.Kind.String == "approval" {
			out.Kind = "approval"
			if q.Decision.Valid {
				return &alreadyAnswered{"already answered: " + q.Decision.String}
			}
			if !asks { // closed without a decision (issue 15): the note says how
				return &alreadyAnswered{"no longer open: " + q.DecisionMessage.String}
			}
		} else {
			out.Kind = "question"
			if answer.Valid {
				return &alreadyAnswered{"already answered: " + cutChars(answer.String, 200)}
			}
			if nextAgent.Valid {
				return &alreadyAnswered{"no longer open: the agent moved on (superseded)"}
			}
		}
		switch {
		case status == statusCompleted:
			return &alreadyAnswered{"no longer open: the session ended"}
		case expired:
			return &alreadyAnswered{"no longer open: timed out"}
		}
		in, err := validate(q)
		if err != nil {
			return err
		}
		if out.Kind == "question" {
			out.Answer = cleanText(in.Text)
			_, err := insertUserMessage(ctx, tx, userID, out.SessionID, out.Answer)
			return err
		}
		out.Decision, out.Message = in.Decision, cleanText(in.Message)
		if in.Decision == decisionAllowSession {
			if rule := ruleFor(q.ToolName.String, q.ToolInput); rule.ok {
				out.Rule = rule.String()
				if _, err := tx.ExecContext(ctx, `
					INSERT INTO session_rules (agent_instance_id, user_id, tool_name, prefix)
					VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING`, out.SessionID, userID, rule.tool, rule.prefix); err != nil {
					return err
				}
			}
		}
		_, err = tx.ExecContext(ctx, `
			UPDATE messages SET decision = $3, decision_message = NULLIF($4, ''), decided_at = now(), requires_user_input = false
			WHERE id = $1 AND user_id = $2`, id, userID, out.Decision, out.Message)
		if err != nil {
			return err
		}
		return stopWaiting(ctx, tx, userID, out.SessionID)
	})
	if err != nil {
		var aa *alreadyAnswered
		if errors.As(err, &aa) {
			// Nothing more can answer it: its capabilities go too.
			if err := dropCapabilities(ctx, s.db, userID, id); err != nil {
				return answered{}, fmt.Errorf("answer question: %w", err)
			}
			return answered{}, aa
		}
		if errors.Is(err, errGone) {
			return answered{}, errGone
		}
		return answered{}, fmt.Errorf("answer question: %w", err)
	}
	return out, nil
}

// dropCapabilities deletes every lock-screen capability of question id.
func dropCapabilities(ctx context.Context, q execer, userID, id string) error {
	_, err := q.ExecContext(ctx, `DELETE FROM action_capabilities WHERE message_id = $1 AND user_id = $2`, id, userID)
	return err
}

// execer is a *sql.DB or a *sql.Tx.
type execer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

// stopWaiting records, in tx, that the session no longer waits on an
// approval: a session AWAITING_INPUT is ACTIVE again, its activity moves to
// now, and the hub hears of it.
func stopWaiting(ctx context.Context, tx *sql.Tx, userID, sessionID string) error {
	_, err := tx.ExecContext(ctx, `
		UPDATE agent_instances SET last_activity_at = now(),
			status = CASE WHEN status = 'AWAITING_INPUT' THEN 'ACTIVE' ELSE status END
		WHERE id = $1 AND user_id = $2`, sessionID, userID)
	if err != nil {
		return err
	}
	return notifySession(ctx, tx, userID, sessionID)
}

// insertUserMessage stores a person's message in a locked session, as
// addUserMessage does (without moving the read pointer).
func insertUserMessage(ctx context.Context, tx *sql.Tx, userID, sessionID, content string) (message, error) {
	m := message{SessionID: sessionID, SenderType: senderUser, Content: content}
	err := tx.QueryRowContext(ctx, `
		WITH lk AS (SELECT pg_advisory_xact_lock(hashtextextended($2::uuid::text, 0))),
		ins AS (
			INSERT INTO messages (agent_instance_id, user_id, sender_type, content)
			SELECT $1::uuid, $2::uuid, 'USER', $3::text FROM lk
			RETURNING id, seq, created_at
		),
		upd AS (
			UPDATE agent_instances AS a SET
				last_activity_at = GREATEST(a.last_activity_at, ins.created_at),
				status = CASE WHEN a.status = 'AWAITING_INPUT' THEN 'ACTIVE' ELSE a.status END
			FROM ins WHERE a.id = $1 AND a.user_id = $2
			RETURNING a.id
		)
		SELECT ins.id, ins.seq, ins.created_at,
			pg_notify($4, 'm ' || $2::uuid::text || ' ' || $1::uuid::text || ' ' || ins.seq)
		FROM ins, upd`, sessionID, userID, content, notifyChannel).Scan(&m.ID, &m.Seq, &m.CreatedAt, new(string))
	if err != nil {
		return message{}, fmt.Errorf("insert user message: %w", err)
	}
	return m, nil
}

// openQuestion is a session's open question or approval.
type openQuestion struct {
	SessionID string
	ID        string
	Content   string
	Q         questionFields
}

// openQuestions returns the open question of each of userID's sessions in
// ids that has one: its latest agent message, when that asks, the session
// has not ended, and (for a question) no person's message came after it;
// an approval stays open until decided.
func (s *store) openQuestions(ctx context.Context, userID string, ids []string) (map[string]openQuestion, map[string]string, error) {
	list, err := queryAll(ctx, s.db, func(o *openQuestion) []any {
		return append([]any{&o.SessionID, &o.ID, &o.Content}, o.Q.scan()...)
	}, `
		SELECT a.id, m.id, m.content, m.kind, m.tool_name, m.tool_input, m.decision, m.decision_message,
			m.decided_by_rule, m.options, m.allow_text
		FROM agent_instances a
		CROSS JOIN LATERAL (
			SELECT * FROM messages
			WHERE agent_instance_id = a.id AND user_id = $1 AND sender_type = 'AGENT'
			ORDER BY seq DESC LIMIT 1
		) m
		WHERE a.id = ANY ($2::uuid[]) AND a.user_id = $1 AND a.status <> 'COMPLETED' AND m.requires_user_input
			AND (m.kind = 'approval' OR NOT EXISTS (SELECT 1 FROM messages u
				WHERE u.agent_instance_id = a.id AND u.user_id = $1 AND u.sender_type = 'USER' AND u.seq > m.seq))`,
		userID, pq.Array(ids))
	if err != nil {
		return nil, nil, fmt.Errorf("open questions: %w", err)
	}
	out := make(map[string]openQuestion, len(list))
	for _, o := range list {
		out[o.SessionID] = o
	}
	// Who wrote each session's latest message.
	type sender struct{ id, sender string }
	senders, err := queryAll(ctx, s.db, func(v *sender) []any { return []any{&v.id, &v.sender} }, `
		SELECT a.id, m.sender_type FROM agent_instances a
		CROSS JOIN LATERAL (
			SELECT sender_type FROM messages
			WHERE agent_instance_id = a.id AND user_id = $1
			ORDER BY seq DESC LIMIT 1
		) m
		WHERE a.id = ANY ($2::uuid[]) AND a.user_id = $1`, userID, pq.Array(ids))
	if err != nil {
		return nil, nil, fmt.Errorf("last senders: %w", err)
	}
	last := make(map[string]string, len(senders))
	for _, v := range senders {
		last[v.id] = v.sender
	}
	return out, last, nil
}

// decisionsAt returns the approvals of the session that the person decided
// at the instant at (the transaction time a decision gives decided_at and
// the session's last_activity_at alike).
func (s *store) decisionsAt(ctx context.Context, userID, sessionID string, at time.Time) ([]approval, error) {
	out, err := queryAll(ctx, s.db, func(a *approval) []any { return []any{&a.ID, &a.Decision, &a.Message} }, `
		SELECT id, decision, COALESCE(decision_message, '') FROM messages
		WHERE agent_instance_id = $1 AND user_id = $2 AND kind = 'approval' AND decided_at = $3
			AND decided_by_rule IS NULL
		ORDER BY seq`, sessionID, userID, at)
	if err != nil {
		return nil, fmt.Errorf("decisions: %w", err)
	}
	return out, nil
}

// ---- lock-screen actions (issue 12) ----

// errGone: a capability that was used, expired or never existed.
var errGone = errors.New("gone")

// notifyAction is a button of a notification: its label, what it decides,
// and the capability that is its credential (only ever in the notification).
type notifyAction struct {
	Label      string
	Action     string // allow, deny or option
	Option     string
	Capability string
}

// maxActionOptions: a question with more options gets no buttons (ntfy
// shows at most three).
const maxActionOptions = 3

// addActions makes the lock-screen capabilities of the question.asked
// deliveries just claimed in tx: Allow and Deny for an undecided approval,
// one per option for a question with at most three options that is still
// open. A retried delivery's earlier capabilities are replaced.
func addActions(ctx context.Context, tx *sql.Tx, ds []delivery) error {
	for i := range ds {
		d := &ds[i]
		if d.EventKind != eventQuestionAsked || d.MessageID == "" {
			continue
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM action_capabilities WHERE delivery_id = $1 AND user_id = $2`, d.ID, d.UserID); err != nil {
			return err
		}
		var q questionFields
		var asks bool
		err := tx.QueryRowContext(ctx, `SELECT requires_user_input, `+questionColumns+` FROM messages WHERE id = $1 AND user_id = $2`,
			d.MessageID, d.UserID).Scan(append([]any{&asks}, q.scan()...)...)
		if errors.Is(err, sql.ErrNoRows) {
			continue
		}
		if err != nil {
			return err
		}
		var acts []notifyAction
		switch {
		case q.Kind.String == "approval" && !q.Decision.Valid && asks: // asks: not closed (issue 15)
			acts = []notifyAction{{Label: "Allow", Action: decisionAllow}, {Label: "Deny", Action: decisionDeny}}
		case q.Kind.String == "" && asks && len(q.Options) > 0:
			var opts []string
			json.Unmarshal(q.Options, &opts)
			if len(opts) > maxActionOptions {
				break
			}
			for _, o := range opts {
				acts = append(acts, notifyAction{Label: o, Action: "option", Option: o})
			}
		}
		for j := range acts {
			capability, hash := newCapability()
			acts[j].Capability = capability
			if _, err := tx.ExecContext(ctx, `
				INSERT INTO action_capabilities (hash, user_id, message_id, delivery_id, action, option)
				VALUES ($1, $2, $3, $4, $5, NULLIF($6, ''))`,
				hash, d.UserID, d.MessageID, d.ID, acts[j].Action, acts[j].Option); err != nil {
				return err
			}
		}
		d.Actions = acts
	}
	return nil
}

// capabilityTarget returns the user and question a capability (by its
// hash) is bound to, or errGone.
func (s *store) capabilityTarget(ctx context.Context, hash string) (userID, messageID, action, option string, err error) {
	var opt sql.NullString
	err = s.db.QueryRowContext(ctx, `
		SELECT user_id, message_id, action, option FROM action_capabilities WHERE hash = $1`, hash).
		Scan(&userID, &messageID, &action, &opt)
	if errors.Is(err, sql.ErrNoRows) {
		return "", "", "", "", errGone
	}
	if err != nil {
		return "", "", "", "", fmt.Errorf("capability: %w", err)
	}
	return userID, messageID, action, opt.String, nil
}

// ---- Claude Code's hooks (issue 15) ----

// presence reports whether userID's Away switch is on. It returns
// errNotFound for an unknown user.
func (s *store) presence(ctx context.Context, userID string) (bool, error) {
	var away bool
	err := s.db.QueryRowContext(ctx, `SELECT away FROM users WHERE id = $1`, userID).Scan(&away)
	if errors.Is(err, sql.ErrNoRows) {
		return false, errNotFound
	}
	if err != nil {
		return false, fmt.Errorf("presence: %w", err)
	}
	return away, nil
}

// setPresence turns userID's Away switch on or off. Off (the person is at
// the keyboard) closes the open approvals that PermissionRequest hooks
// asked, with note, so their hooks answer {} and Claude Code shows its own
// prompt. It returns errNotFound for an unknown user.
func (s *store) setPresence(ctx context.Context, userID string, away bool, note string) error {
	res, err := s.db.ExecContext(ctx, `UPDATE users SET away = $2, updated_at = now() WHERE id = $1`, userID, away)
	if err != nil {
		return fmt.Errorf("set presence: %w", err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return errNotFound
	}
	if away {
		return nil
	}
	rows, err := s.db.QueryContext(ctx, `
		SELECT id, agent_instance_id FROM messages
		WHERE user_id = $1 AND via_hook AND requires_user_input AND kind = 'approval' AND decision IS NULL`, userID)
	if err != nil {
		return fmt.Errorf("set presence: %w", err)
	}
	var open [][2]string
	for rows.Next() {
		var id, sid string
		if err := rows.Scan(&id, &sid); err != nil {
			rows.Close()
			return fmt.Errorf("set presence: %w", err)
		}
		open = append(open, [2]string{id, sid})
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("set presence: %w", err)
	}
	for _, o := range open {
		// Each under its session's lock; one decided meanwhile stays decided.
		if _, err := s.closeApproval(ctx, userID, o[1], o[0], note); err != nil && !errors.Is(err, errNotFound) {
			return fmt.Errorf("set presence: %w", err)
		}
	}
	return nil
}

// openHookSession makes sure Claude Code's session is userID's agentline
// session: created on first sight with agent type claude-code and title as
// its title (a title already kept stays); a COMPLETED session is ACTIVE
// again (`claude --resume` keeps the session id: any event but SessionEnd
// means it runs). It returns errNotFound when the id is another user's
// session.
func (s *store) openHookSession(ctx context.Context, userID, sessionID, title string) error {
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		if _, err := lockOrCreateSession(ctx, tx, userID, sessionID, hookAgentType); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, `
			UPDATE agent_instances SET title = $3
			WHERE id = $1 AND user_id = $2 AND title IS NULL AND $3 <> ''`, sessionID, userID, cutChars(cleanText(title), maxTitleChars))
		if err != nil {
			return err
		}
		res, err := tx.ExecContext(ctx, `
			UPDATE agent_instances SET status = 'ACTIVE', ended_at = NULL, last_activity_at = now()
			WHERE id = $1 AND user_id = $2 AND status = 'COMPLETED'`, sessionID, userID)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return nil
		}
		return notifySession(ctx, tx, userID, sessionID)
	})
	if err != nil {
		return fmt.Errorf("open hook session: %w", err)
	}
	return nil
}

// endHookSession ends userID's session (SessionEnd). A session agentline
// never saw is left alone: nothing is created or sent. It returns
// errNotFound when the id is another user's session.
func (s *store) endHookSession(ctx context.Context, userID, sessionID string) error {
	err := s.endSession(ctx, userID, sessionID)
	if !errors.Is(err, errNotFound) {
		return err
	}
	// Missing or another user's: creating it, as every other event would,
	// says which (another user's id stays not found); then rolled back.
	errUnseen := errors.New("unseen session")
	err = s.inTx(ctx, func(tx *sql.Tx) error {
		if _, err := lockOrCreateSession(ctx, tx, userID, sessionID, hookAgentType); err != nil {
			return err
		}
		return errUnseen
	})
	if errors.Is(err, errUnseen) {
		return nil
	}
	if err != nil && !errors.Is(err, errNotFound) {
		return fmt.Errorf("end hook session: %w", err)
	}
	return err
}

// maxTitleChars bounds a session's title (a path, but sent by a client).
const maxTitleChars = 1000

// hookStep is what a hook adds to a session's timeline.
type hookStep struct {
	SessionID string
	Content   string
	Event     string           // the notification it sends ("" for none)
	Waiting   bool             // the session now waits for the person
	Approval  *approvalRequest // a permission asked at the terminal: stored as a closed approval
	Note      string           // that approval's note
	// QuietWhenApprovalOpen: nothing at all is stored or sent while the
	// session has an open approval (it already asks the person).
	QuietWhenApprovalOpen bool
	Timeout               time.Duration // QUESTION_TIMEOUT: an older approval is no longer open
	// HookWait: an older approval a hook asked has no hook waiting any more
	// (it hung up), so Claude Code shows its own prompt: not counted.
	HookWait time.Duration
}

// addHookStep stores a hook's step in userID's existing session, marks the
// session waiting when asked, and enqueues its notification, in one
// transaction. It returns errNotFound if the session is missing or not
// userID's.
func (s *store) addHookStep(ctx context.Context, userID string, in hookStep) error {
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		if _, _, _, err := lockSession(ctx, tx, userID, in.SessionID); err != nil {
			return err
		}
		if in.QuietWhenApprovalOpen {
			var open bool
			err := tx.QueryRowContext(ctx, `
				SELECT EXISTS (SELECT 1 FROM messages
					WHERE agent_instance_id = $1 AND user_id = $2 AND kind = 'approval' AND decision IS NULL
						AND requires_user_input
						AND created_at + make_interval(secs => CASE WHEN via_hook THEN $4::float8 ELSE $3::float8 END) > now())`,
				in.SessionID, userID, in.Timeout.Seconds(), in.HookWait.Seconds()).Scan(&open)
			if err != nil || open {
				return err
			}
		}
		m, _, err := insertAgentMessage(ctx, tx, userID, agentMessage{SessionID: in.SessionID, Content: in.Content}, false)
		if err != nil {
			return err
		}
		if in.Approval != nil {
			if err := markApproval(ctx, tx, userID, m.ID, *in.Approval, "", "", in.Note); err != nil {
				return err
			}
		}
		if in.Waiting {
			if _, err := tx.ExecContext(ctx, `
				UPDATE agent_instances SET status = 'AWAITING_INPUT'
				WHERE id = $1 AND user_id = $2 AND status <> 'COMPLETED'`, in.SessionID, userID); err != nil {
				return err
			}
		}
		if in.Event == "" {
			return nil
		}
		return enqueueNotification(ctx, tx, userID, in.SessionID, in.Event, m.ID)
	})
	if err != nil {
		return fmt.Errorf("add hook step: %w", err)
	}
	return nil
}

// closeApproval closes approval id of the session without a decision, with
// note as its decision_message: it no longer asks, its lock-screen
// capabilities go, and the session no longer waits on it. It reports whether
// it closed it (false: it was decided or closed first), and returns
// errNotFound if the session is missing or not userID's.
func (s *store) closeApproval(ctx context.Context, userID, sessionID, id, note string) (bool, error) {
	closed := false
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		if _, _, _, err := lockSession(ctx, tx, userID, sessionID); err != nil {
			return err
		}
		res, err := tx.ExecContext(ctx, `
			UPDATE messages SET requires_user_input = false, decision_message = $4
			WHERE id = $1 AND user_id = $2 AND agent_instance_id = $3 AND kind = 'approval'
				AND decision IS NULL AND requires_user_input`, id, userID, sessionID, note)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return nil
		}
		closed = true
		if err := dropCapabilities(ctx, tx, userID, id); err != nil {
			return err
		}
		return stopWaiting(ctx, tx, userID, sessionID)
	})
	if err != nil {
		return false, fmt.Errorf("close approval: %w", err)
	}
	return closed, nil
}
