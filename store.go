package main

import (
	"context"
	"crypto/rand"
	"database/sql"
	"database/sql/driver"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
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

// notifyChannel is the one LISTEN/NOTIFY channel of agentline. A payload is
// "KIND USER SESSION SEQ": ids only, never text (payloads are capped at 8000
// bytes, and text does not belong in a broadcast).
const notifyChannel = "agentline"

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
}

// migrate applies schema.sql under an advisory lock, so two processes starting
// at once do not race on CREATE … IF NOT EXISTS.
func migrate(ctx context.Context, db *sql.DB) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(7260151201)`); err != nil {
		return fmt.Errorf("migrate: lock: %w", err)
	}
	if _, err := tx.ExecContext(ctx, schemaSQL); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("migrate: commit: %w", err)
	}
	return nil
}

// inTx runs fn in a transaction and commits it if fn returns nil.
func (s *store) inTx(ctx context.Context, fn func(tx *sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
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

// parseUUID returns s in canonical lower-case 8-4-4-4-12 form, accepting the
// canonical form and 32 bare hex digits; ok is false for anything else.
func parseUUID(s string) (id string, ok bool) {
	var hex string
	switch len(s) {
	case 36:
		if s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-' {
			return "", false
		}
		hex = s[:8] + s[9:13] + s[14:18] + s[19:23] + s[24:]
	case 32:
		hex = s
	default:
		return "", false
	}
	for i := 0; i < len(hex); i++ {
		c := hex[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return "", false
		}
	}
	hex = strings.ToLower(hex)
	return hex[:8] + "-" + hex[8:12] + "-" + hex[12:16] + "-" + hex[16:20] + "-" + hex[20:], true
}

// newUUID returns a random (version 4) UUID.
func newUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
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
	var res sql.Result
	var err error
	if id, ok := parseUUID(idOrHash); ok {
		res, err = s.db.ExecContext(ctx, `UPDATE api_keys SET is_active = false WHERE id = $1`, id)
	} else {
		res, err = s.db.ExecContext(ctx, `UPDATE api_keys SET is_active = false WHERE api_key_hash = $1`, idOrHash)
	}
	if err != nil {
		return fmt.Errorf("revoke api key: %w", err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return errNotFound
	}
	return nil
}

// ---- sessions and messages ----

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
		SELECT id, seq, content, requires_user_input, created_at FROM messages
		WHERE agent_instance_id = $1 AND user_id = $2 AND sender_type = 'USER' AND seq > $3
		ORDER BY seq`
	// $3 content, $4 requires_user_input, $5-$7 send_email/sms/push, $8 git_diff.
	sqlInsertAgentMessage = `
		WITH lk AS (SELECT pg_advisory_xact_lock(hashtextextended($2::uuid::text, 0))),
		ins AS (
			INSERT INTO messages (agent_instance_id, user_id, sender_type, content, requires_user_input, send_email, send_sms, send_push)
			SELECT $1::uuid, $2::uuid, 'AGENT', $3::text, $4::boolean, $5::boolean, $6::boolean, $7::boolean FROM lk
			RETURNING id, seq, created_at
		),
		upd AS (
			UPDATE agent_instances AS a SET
				last_read_message_id = ins.id,
				last_read_seq = ins.seq,
				delivered_seq = ins.seq,
				step_count = a.step_count + (NOT $4)::int,
				last_activity_at = GREATEST(a.last_activity_at, ins.created_at),
				status = CASE WHEN a.status = 'COMPLETED' THEN a.status WHEN $4 THEN 'AWAITING_INPUT' ELSE 'ACTIVE' END,
				git_diff = COALESCE($8::text, a.git_diff)
			FROM ins WHERE a.id = $1 AND a.user_id = $2
			RETURNING a.step_count
		)
		SELECT ins.id, ins.seq, ins.created_at, upd.step_count,
			pg_notify('agentline', 'm ' || $2::uuid::text || ' ' || $1::uuid::text || ' ' || ins.seq)
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

// createSession inserts a session for userID with the given agent type. It
// returns errNotFound if the id is taken (by this user, concurrently, or by
// another user: the caller re-reads to tell which).
func createSession(ctx context.Context, tx *sql.Tx, userID, sessionID, agentType string) error {
	res, err := tx.ExecContext(ctx, `
		WITH ua AS (
			INSERT INTO user_agents (user_id, name) VALUES ($2, lower($3))
			ON CONFLICT (user_id, name) DO UPDATE SET updated_at = user_agents.updated_at
			RETURNING id
		)
		INSERT INTO agent_instances (id, user_agent_id, user_id)
		SELECT $1::uuid, ua.id, $2::uuid FROM ua
		ON CONFLICT (id) DO NOTHING`, sessionID, userID, agentType)
	if err != nil {
		return fmt.Errorf("create session: %w", err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return errNotFound
	}
	return nil
}

// lockOrCreateSession locks the session, creating it first when it does not
// exist and agentType is given. It returns errNeedAgentType for a new id
// without an agent type and errNotFound for another user's id.
func lockOrCreateSession(ctx context.Context, tx *sql.Tx, userID, sessionID, agentType string) (readSeq int64, status string, err error) {
	readSeq, _, status, err = lockSession(ctx, tx, userID, sessionID)
	if !errors.Is(err, errNotFound) {
		return readSeq, status, err
	}
	if agentType == "" {
		return 0, "", errNeedAgentType
	}
	// A concurrent create by the same user makes this insert wait, then do
	// nothing; the second lockSession then finds that row.
	if err := createSession(ctx, tx, userID, sessionID, strings.ToLower(agentType)); err != nil && !errors.Is(err, errNotFound) {
		return 0, "", err
	}
	readSeq, _, status, err = lockSession(ctx, tx, userID, sessionID)
	return readSeq, status, err
}

// feedbackAfter returns the user messages of the session after seq, oldest
// first.
func feedbackAfter(ctx context.Context, tx *sql.Tx, userID, sessionID string, seq int64) ([]message, error) {
	rows, err := tx.QueryContext(ctx, sqlFeedbackAfter, sessionID, userID, seq)
	if err != nil {
		return nil, fmt.Errorf("feedback: %w", err)
	}
	defer rows.Close()
	var out []message
	for rows.Next() {
		m := message{SessionID: sessionID, SenderType: senderUser}
		if err := rows.Scan(&m.ID, &m.Seq, &m.Content, &m.RequiresUserInput, &m.CreatedAt); err != nil {
			return nil, fmt.Errorf("feedback: %w", err)
		}
		out = append(out, m)
	}
	return out, rows.Err()
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

// insertAgentMessage stores an agent message in a locked session, moves the
// read pointer to it and notifies the hub, all in tx. The user lock makes seq
// order commit order across all of a user's sessions (the event stream resumes
// by seq, so a smaller seq must never commit after a larger one is visible).
func insertAgentMessage(ctx context.Context, tx *sql.Tx, userID string, in agentMessage) (message, int, error) {
	m := message{SessionID: in.SessionID, SenderType: senderAgent, Content: cleanText(in.Content), RequiresUserInput: in.RequiresUserInput}
	var steps int
	err := tx.QueryRowContext(ctx, sqlInsertAgentMessage,
		in.SessionID, userID, m.Content, in.RequiresUserInput, in.SendEmail, in.SendSMS, in.SendPush, in.GitDiff,
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
		readSeq, _, err := lockOrCreateSession(ctx, tx, userID, in.SessionID, in.AgentType)
		if err != nil {
			return err
		}
		if r.Feedback, err = feedbackAfter(ctx, tx, userID, in.SessionID, readSeq); err != nil {
			return err
		}
		r.Message, r.Steps, err = insertAgentMessage(ctx, tx, userID, in)
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
				pg_notify('agentline', 'm ' || $2::uuid::text || ' ' || $1::uuid::text || ' ' || ins.seq)
			FROM ins, upd`,
			sessionID, userID, m.Content, markAsRead,
		).Scan(&m.ID, &m.Seq, &m.CreatedAt, new(string))
	})
	if err != nil {
		return message{}, fmt.Errorf("add user message: %w", err)
	}
	return m, nil
}

// pending returns the user messages after the session's read pointer and
// moves the pointer past them. If lastReadID is not empty and is not the
// current pointer, another reader moved it: pending reports stale and
// returns nothing. It returns errNotFound if the session is missing or not
// userID's.
func (s *store) pending(ctx context.Context, userID, sessionID, lastReadID string) (msgs []message, stale bool, err error) {
	err = s.inTx(ctx, func(tx *sql.Tx) error {
		readSeq, readID, _, err := lockSession(ctx, tx, userID, sessionID)
		if err != nil {
			return err
		}
		if lastReadID != "" && (!readID.Valid || readID.String != lastReadID) {
			stale = true
			return nil
		}
		if msgs, err = feedbackAfter(ctx, tx, userID, sessionID, readSeq); err != nil || len(msgs) == 0 {
			return err
		}
		return movePointer(ctx, tx, userID, sessionID, msgs[len(msgs)-1])
	})
	if err != nil {
		return nil, false, fmt.Errorf("pending: %w", err)
	}
	return msgs, stale, nil
}

// movePointer records that m was handed to the agent: the read pointer
// moves to it unless already past it, and delivered_seq covers it.
func movePointer(ctx context.Context, tx *sql.Tx, userID, sessionID string, m message) error {
	_, err := tx.ExecContext(ctx, `
		UPDATE agent_instances SET
			last_read_message_id = CASE WHEN last_read_seq < $4 THEN $3 ELSE last_read_message_id END,
			last_read_seq = GREATEST(last_read_seq, $4),
			delivered_seq = GREATEST(delivered_seq, $4)
		WHERE id = $1 AND user_id = $2`, sessionID, userID, m.ID, m.Seq)
	if err != nil {
		return fmt.Errorf("move read pointer: %w", err)
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
			WHERE id = $1 AND user_id = $2 AND NOT requires_user_input`, messageID, userID)
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
			return movePointer(ctx, tx, userID, sessionID, msgs[len(msgs)-1])
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
	_, err := tx.ExecContext(ctx, `SELECT pg_notify('agentline', 's ' || $1::uuid::text || ' ' || $2::uuid::text || ' 0')`, userID, sessionID)
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
	rows, err := s.db.QueryContext(ctx, `
		SELECT a.id, ua.name, a.status, a.started_at, a.ended_at, a.last_activity_at,
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
	defer rows.Close()
	var out []sessionSummary
	for rows.Next() {
		var ss sessionSummary
		if err := rows.Scan(&ss.ID, &ss.AgentType, &ss.Status, &ss.StartedAt, &ss.EndedAt, &ss.LastActivityAt,
			&ss.LastMessage, &ss.QuestionID, &ss.Question); err != nil {
			return nil, fmt.Errorf("list sessions: %w", err)
		}
		out = append(out, ss)
	}
	if err := rows.Err(); err != nil {
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
	tx, err := s.db.BeginTx(ctx, &sql.TxOptions{Isolation: sql.LevelRepeatableRead, ReadOnly: true})
	if err != nil {
		return tl, fmt.Errorf("session messages: %w", err)
	}
	defer tx.Rollback()
	err = tx.QueryRowContext(ctx, `
		SELECT ua.name, a.status, a.git_diff
		FROM agent_instances a JOIN user_agents ua ON ua.id = a.user_agent_id AND ua.user_id = $2
		WHERE a.id = $1 AND a.user_id = $2`, sessionID, userID).Scan(&tl.AgentType, &tl.Status, &tl.GitDiff)
	if errors.Is(err, sql.ErrNoRows) {
		return tl, errNotFound
	}
	if err != nil {
		return tl, fmt.Errorf("session messages: %w", err)
	}
	rows, err := tx.QueryContext(ctx, `
		SELECT id, seq, sender_type, content, requires_user_input, created_at FROM messages
		WHERE agent_instance_id = $1 AND user_id = $2 AND seq > $3
		ORDER BY seq LIMIT $4`, sessionID, userID, after, limit)
	if err != nil {
		return tl, fmt.Errorf("session messages: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		m := message{SessionID: sessionID}
		if err := rows.Scan(&m.ID, &m.Seq, &m.SenderType, &m.Content, &m.RequiresUserInput, &m.CreatedAt); err != nil {
			return tl, fmt.Errorf("session messages: %w", err)
		}
		tl.Messages = append(tl.Messages, m)
	}
	if err := rows.Err(); err != nil {
		return tl, fmt.Errorf("session messages: %w", err)
	}
	return tl, tx.Commit()
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
	rows, err := s.db.QueryContext(ctx, `
		SELECT id, seq, agent_instance_id, sender_type, content, requires_user_input, created_at FROM messages
		WHERE user_id = $1 AND seq > $2
		ORDER BY seq LIMIT $3`, userID, after, limit)
	if err != nil {
		return nil, fmt.Errorf("messages after: %w", err)
	}
	defer rows.Close()
	var out []message
	for rows.Next() {
		var m message
		if err := rows.Scan(&m.ID, &m.Seq, &m.SessionID, &m.SenderType, &m.Content, &m.RequiresUserInput, &m.CreatedAt); err != nil {
			return nil, fmt.Errorf("messages after: %w", err)
		}
		out = append(out, m)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("messages after: %w", err)
	}
	return out, nil
}

// recentSessions returns userID's sessions whose last activity is within
// window of the database's clock, newest first, at most 500. Every change of
// a session's status also moves its last activity, so a reader comparing two
// calls sees every change made in between.
func (s *store) recentSessions(ctx context.Context, userID string, window time.Duration) ([]sessionSummary, error) {
	rows, err := s.db.QueryContext(ctx, `
		SELECT a.id, ua.name, a.status, a.started_at, a.ended_at, a.last_activity_at
		FROM agent_instances a JOIN user_agents ua ON ua.id = a.user_agent_id AND ua.user_id = $1
		WHERE a.user_id = $1 AND a.last_activity_at > now() - make_interval(secs => $2)
		ORDER BY a.last_activity_at DESC, a.id DESC
		LIMIT 500`, userID, window.Seconds())
	if err != nil {
		return nil, fmt.Errorf("recent sessions: %w", err)
	}
	defer rows.Close()
	var out []sessionSummary
	for rows.Next() {
		var ss sessionSummary
		if err := rows.Scan(&ss.ID, &ss.AgentType, &ss.Status, &ss.StartedAt, &ss.EndedAt, &ss.LastActivityAt); err != nil {
			return nil, fmt.Errorf("recent sessions: %w", err)
		}
		out = append(out, ss)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("recent sessions: %w", err)
	}
	return out, nil
}

// ---- questions ----

// question is an agent message that waits for a person's answer.
type question struct {
	ID        string
	Seq       int64
	CreatedAt time.Time
	Resumed   bool      // an earlier call asked it; no new message was stored
	Feedback  []message // user messages queued before it was asked
}

// askQuestion stores a question in an existing session, or resumes the
// session's open question when it has the same text: the latest agent
// message, asking, and not yet answered to an ask_question call. It returns
// errNotFound if the session is missing or not userID's.
func (s *store) askQuestion(ctx context.Context, userID, sessionID, text string) (question, error) {
	text = cleanText(text)
	var q question
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		readSeq, _, _, err := lockSession(ctx, tx, userID, sessionID)
		if err != nil {
			return err
		}
		var content string
		var asks, answered bool
		err = tx.QueryRowContext(ctx, `
			SELECT m.id, m.seq, m.created_at, m.content, m.requires_user_input, m.seq <= a.answered_question_seq
			FROM messages m JOIN agent_instances a ON a.id = m.agent_instance_id
			WHERE m.agent_instance_id = $1 AND m.user_id = $2 AND a.user_id = $2 AND m.sender_type = 'AGENT'
			ORDER BY m.seq DESC LIMIT 1`, sessionID, userID).Scan(&q.ID, &q.Seq, &q.CreatedAt, &content, &asks, &answered)
		if err != nil && !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		if err == nil && asks && !answered && content == text {
			q.Resumed = true
			return nil
		}
		if q.Feedback, err = feedbackAfter(ctx, tx, userID, sessionID, readSeq); err != nil {
			return err
		}
		m, _, err := insertAgentMessage(ctx, tx, userID, agentMessage{SessionID: sessionID, Content: text, RequiresUserInput: true})
		q = question{ID: m.ID, Seq: m.Seq, CreatedAt: m.CreatedAt, Feedback: q.Feedback}
		return err
	})
	if err != nil {
		return question{}, fmt.Errorf("ask question: %w", err)
	}
	return q, nil
}

// questionState is where a question stands.
type questionState int

const (
	questionOpen       questionState = iota
	questionAnswered                 // a user message came after it
	questionSuperseded               // a newer agent message came first
	questionEnded                    // the session ended first
)

// answer reports where question q of the session stands. When it is
// answered, the answer (the first user message after q) is returned, the
// question is marked as answered to a caller and the read pointer moves past
// the answer, so it is not handed out again as feedback. It returns
// errNotFound if the session is missing or not userID's.
func (s *store) answer(ctx context.Context, userID, sessionID string, q question) (questionState, message, error) {
	var st questionState
	var ans message
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		_, _, status, err := lockSession(ctx, tx, userID, sessionID)
		if err != nil {
			return err
		}
		rows, err := tx.QueryContext(ctx, `
			(SELECT id, seq, sender_type, content, created_at FROM messages
			 WHERE agent_instance_id = $1 AND user_id = $2 AND sender_type = 'USER' AND seq > $3
			   -- never a message already handed to the agent another way
			   AND seq > (SELECT delivered_seq FROM agent_instances WHERE id = $1 AND user_id = $2)
			 ORDER BY seq LIMIT 1)
			UNION ALL
			(SELECT id, seq, sender_type, content, created_at FROM messages
			 WHERE agent_instance_id = $1 AND user_id = $2 AND sender_type = 'AGENT' AND seq > $3
			 ORDER BY seq LIMIT 1)`, sessionID, userID, q.Seq)
		if err != nil {
			return err
		}
		defer rows.Close()
		var first *message
		for rows.Next() {
			m := message{SessionID: sessionID}
			if err := rows.Scan(&m.ID, &m.Seq, &m.SenderType, &m.Content, &m.CreatedAt); err != nil {
				return err
			}
			if first == nil || m.Seq < first.Seq {
				first = &m
			}
		}
		if err := rows.Err(); err != nil {
			return err
		}
		rows.Close()
		switch {
		case first != nil && first.SenderType == senderUser:
			st, ans = questionAnswered, *first
		case first != nil:
			st = questionSuperseded
			return nil
		case status == statusCompleted:
			st = questionEnded
			return nil
		default:
			st = questionOpen
			return nil
		}
		if err := movePointer(ctx, tx, userID, sessionID, ans); err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, `
			UPDATE agent_instances SET answered_question_seq = $3
			WHERE id = $1 AND user_id = $2 AND answered_question_seq < $3`, sessionID, userID, q.Seq)
		return err
	})
	if err != nil {
		return 0, message{}, fmt.Errorf("answer: %w", err)
	}
	return st, ans, nil
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

// ---- the wait hub ----

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

	mu     sync.Mutex
	topics map[string]map[chan struct{}]struct{} // "s:"+session or "u:"+user
	count  int
	done   chan struct{}
}

// newHub connects the listener to dsn and starts dispatching. It returns once
// LISTEN is in effect, so no notification committed after it is missed.
func newHub(ctx context.Context, dsn string, log *slog.Logger) (*hub, error) {
	h := &hub{log: log, topics: map[string]map[chan struct{}]struct{}{}, done: make(chan struct{})}
	h.listener = pq.NewListener(dsn, 100*time.Millisecond, 5*time.Second, func(ev pq.ListenerEventType, err error) {
		switch ev {
		case pq.ListenerEventDisconnected:
			log.Warn("wait hub: listener disconnected", "err", err)
		case pq.ListenerEventReconnected:
			log.Info("wait hub: listener reconnected")
		}
	})
	if err := h.listener.Listen(notifyChannel); err != nil {
		h.listener.Close()
		return nil, fmt.Errorf("wait hub: listen: %w", err)
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

// dispatch wakes the waiters of the session and the user named in payload.
func (h *hub) dispatch(payload string) {
	f := strings.Fields(payload)
	if len(f) != 4 {
		return
	}
	if f[0] == "o" { // notifications (issue 11): the outbox has new rows
		h.wake("outbox")
		return
	}
	h.wake("u:" + f[1])
	h.wake("s:" + f[2])
}

func (h *hub) wake(topic string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for ch := range h.topics[topic] {
		select {
		case ch <- struct{}{}:
		default: // already has a wake-up pending
		}
	}
}

func (h *hub) wakeAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, set := range h.topics {
		for ch := range set {
			select {
			case ch <- struct{}{}:
			default:
			}
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
			if len(set) == 0 && h.topics[topic] != nil && len(h.topics[topic]) == 0 {
				delete(h.topics, topic)
			}
			h.count--
			h.mu.Unlock()
		})
	}
}

// waiters returns the number of registered waiters.
func (h *hub) waiters() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.count - len(h.topics["outbox"]) // notifications (issue 11): the outbox worker is no waiter
}

// close stops the listener and wakes every waiter so it can notice shutdown.
func (h *hub) close() {
	h.listener.Close()
	<-h.done
	h.wakeAll()
}

// safetyRecheck is how often a waiter re-reads the database even when no
// notification came: the last line of defence against a lost wake-up.
const safetyRecheck = 30 * time.Second

// wait blocks until check reports done, ctx ends, or limit passes. check is
// called at once and again after every wake-up of topic and every
// safetyRecheck. While it waits, wait holds no database connection.
func (h *hub) wait(ctx context.Context, topic string, limit time.Duration, check func() (bool, error)) (done bool, err error) {
	wake, cancel := h.subscribe(topic)
	defer cancel()
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	recheck := time.NewTicker(safetyRecheck)
	defer recheck.Stop()
	for {
		if done, err := check(); done || err != nil {
			return done, err
		}
		select {
		case <-wake:
		case <-recheck.C:
		case <-deadline.C:
			return false, nil
		case <-ctx.Done():
			return false, ctx.Err()
		}
	}
}

// ---- notifications (issue 11) ----

// Notification event kinds. eventSummary is the "N more waiting" a
// flooded channel gets instead of the events over its limit.
const (
	eventQuestionAsked  = "question.asked"
	eventSessionEnded   = "session.ended"
	eventMessageFlagged = "message.flagged"
	eventSummary        = "summary"
	eventTest           = "test"
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
			WHERE user_id = $1 AND $3 = ANY (events)
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
		SELECT pg_notify('agentline', 'o ' || $1::uuid::text || ' ' || $2::uuid::text || ' 0')
		FROM (SELECT count(*) AS n FROM d) x WHERE x.n > 0`, userID, sessionID, kind, messageID)
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
	Folded    int // for a summary: how many events it stands for
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
		type cand struct {
			id, channelID, userID, kind string
			attempts                    int
		}
		// A claim lost in a database crash only means the row is sent
		// again (same webhook-id), so it need not wait for a WAL flush:
		// that wait is most of a notification's latency.
		if _, err := tx.ExecContext(ctx, `SET LOCAL synchronous_commit = off`); err != nil {
			return err
		}
		rows, err := tx.QueryContext(ctx, `
			SELECT d.id, d.channel_id, d.user_id, e.kind, d.attempts
			FROM notification_deliveries d
			JOIN notification_events e ON e.id = d.event_id AND e.user_id = d.user_id
			WHERE d.status = 'pending' AND d.next_attempt_at <= now()
			ORDER BY d.next_attempt_at, d.id
			LIMIT $1
			FOR UPDATE OF d SKIP LOCKED`, limit)
		if err != nil {
			return err
		}
		var cands []cand
		var chanIDs []string
		for rows.Next() {
			var c cand
			if err := rows.Scan(&c.id, &c.channelID, &c.userID, &c.kind, &c.attempts); err != nil {
				rows.Close()
				return err
			}
			cands = append(cands, c)
			chanIDs = append(chanIDs, c.channelID)
		}
		rows.Close()
		if err := rows.Err(); err != nil || len(cands) == 0 {
			return err
		}
		// The channels' flood counters, locked in id order (so two
		// workers never wait on each other in a cycle). FOR NO KEY UPDATE,
		// not FOR UPDATE: it must not conflict with the KEY SHARE locks
		// that agents' transactions take on a channel (the foreign key of
		// the delivery rows they write), or the two deadlock.
		type window struct {
			start time.Time
			sent  int
			dirty bool
		}
		wins := map[string]*window{}
		var now time.Time
		rows, err = tx.QueryContext(ctx, `
			SELECT id, window_start, window_sent, now() FROM notification_channels
			WHERE id = ANY ($1::uuid[])
			ORDER BY id
			FOR NO KEY UPDATE`, pq.Array(chanIDs))
		if err != nil {
			return err
		}
		for rows.Next() {
			var id string
			var start sql.NullTime
			w := &window{}
			if err := rows.Scan(&id, &start, &w.sent, &now); err != nil {
				rows.Close()
				return err
			}
			w.start = start.Time
			if !start.Valid || !now.Before(w.start.Add(lim.window)) {
				w.start, w.sent, w.dirty = now, 0, true
			}
			wins[id] = w
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return err
		}
		summaries := map[string]string{} // channel -> its pending summary row
		var claimed []string
		for _, c := range cands {
			w := wins[c.channelID]
			switch {
			case w == nil: // the channel was deleted meanwhile; the row goes with it
			case c.kind == eventSummary:
				claimed = append(claimed, c.id)
			case w.sent < lim.perWindow:
				w.sent++
				w.dirty = true
				claimed = append(claimed, c.id)
			case c.attempts > 0:
				if _, err := tx.ExecContext(ctx, `
					UPDATE notification_deliveries SET next_attempt_at = $2 WHERE id = $1`,
					c.id, w.start.Add(lim.window)); err != nil {
					return err
				}
			default:
				sum, ok := summaries[c.channelID]
				if !ok {
					err := tx.QueryRowContext(ctx, `
						SELECT d.id FROM notification_deliveries d
						JOIN notification_events e ON e.id = d.event_id AND e.user_id = d.user_id
						WHERE d.channel_id = $1 AND d.user_id = $2 AND e.kind = 'summary'
							AND d.status = 'pending' AND d.attempts = 0
						LIMIT 1`, c.channelID, c.userID).Scan(&sum)
					if errors.Is(err, sql.ErrNoRows) {
						err = tx.QueryRowContext(ctx, `
							WITH ev AS (
								INSERT INTO notification_events (user_id, kind) VALUES ($1, 'summary')
								RETURNING id
							)
							INSERT INTO notification_deliveries (event_id, channel_id, user_id, next_attempt_at)
							SELECT ev.id, $2, $1, $3 FROM ev
							RETURNING id`, c.userID, c.channelID, w.start.Add(lim.window)).Scan(&sum)
					}
					if err != nil {
						return err
					}
					summaries[c.channelID] = sum
				}
				if _, err := tx.ExecContext(ctx, `
					UPDATE notification_deliveries SET status = 'folded', summary_id = $2 WHERE id = $1`, c.id, sum); err != nil {
					return err
				}
			}
		}
		for id, w := range wins {
			if !w.dirty {
				continue
			}
			if _, err := tx.ExecContext(ctx, `
				UPDATE notification_channels SET window_start = $2, window_sent = $3 WHERE id = $1`,
				id, w.start, w.sent); err != nil {
				return err
			}
		}
		if len(claimed) == 0 {
			return nil
		}
		// A summary counts what was folded into it when it is first claimed;
		// a retry sends the same number.
		rows, err = tx.QueryContext(ctx, `
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
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var d delivery
			if err := rows.Scan(&d.ID, &d.UserID, &d.ChannelID, &d.Attempts, &d.Folded,
				&d.Channel.Kind, &d.Channel.URL, &d.Channel.Token, &d.Channel.Secret,
				&d.EventKind, &d.SessionID, &d.MessageID, &d.EventAt, &d.AgentType, &d.Text); err != nil {
				return err
			}
			d.Channel.ID, d.Channel.UserID = d.ChannelID, d.UserID
			out = append(out, d)
		}
		return rows.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("claim deliveries: %w", err)
	}
	return out, nil
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
