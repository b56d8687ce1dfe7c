-- agentline schema. Applied at every start-up and by `agentline migrate`
-- under an advisory lock; every statement is idempotent, so running it again
-- (or from two processes at once) changes nothing. Table and column names
-- follow Omnara's where Omnara has them.

CREATE TABLE IF NOT EXISTS users (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email        text NOT NULL UNIQUE,
    display_name text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- One row per user and agent type ("claude-code", "cursor", …); names are
-- folded to lower case before they get here.
CREATE TABLE IF NOT EXISTS user_agents (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name       text NOT NULL CHECK (name <> '' AND name = lower(name)),
    is_active  boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, name)
);

-- A session. user_id is repeated here (it is also reachable through
-- user_agent_id) so that every query can scope by owner in its WHERE clause.
CREATE TABLE IF NOT EXISTS agent_instances (
    id                   uuid PRIMARY KEY,
    user_agent_id        uuid NOT NULL REFERENCES user_agents (id) ON DELETE CASCADE,
    user_id              uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    status               text NOT NULL DEFAULT 'ACTIVE'
                         CHECK (status IN ('ACTIVE', 'AWAITING_INPUT', 'PAUSED', 'STALE',
                                           'COMPLETED', 'FAILED', 'KILLED', 'DISCONNECTED')),
    started_at           timestamptz NOT NULL DEFAULT now(),
    ended_at             timestamptz,
    -- The read pointer: the newest message the agent has seen. User messages
    -- with a larger seq are its pending feedback. last_read_seq is the
    -- pointer's seq, kept beside it so no lookup is needed (0 = nothing read).
    last_read_message_id uuid,
    last_read_seq        bigint NOT NULL DEFAULT 0,
    -- The newest user message handed to the agent (as feedback, by pending,
    -- request-input or as an answer). Unlike the read pointer it does not
    -- move for mark_as_read: it is what keeps an answer from being handed
    -- out twice.
    delivered_seq        bigint NOT NULL DEFAULT 0,
    -- Agent messages so far, so log_step's step_number costs no scan.
    step_count           integer NOT NULL DEFAULT 0,
    -- The newest question whose answer an ask_question call has returned
    -- (kept for replicas of the first releases during a rolling upgrade).
    answered_question_seq bigint NOT NULL DEFAULT 0,
    -- The seq of that answer: asking the same question again, with no agent
    -- message since, returns it again, so a client that vanished just after
    -- the answer was taken still gets it.
    answer_seq           bigint NOT NULL DEFAULT 0,
    last_activity_at     timestamptz NOT NULL DEFAULT now(),
    git_diff             text
);

-- Columns added after the first release. delivered_seq starts at the read
-- pointer: the first release handed out (or marked read) everything up to
-- it, and 0 would let a question's answer be handed out a second time.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = 'agent_instances'
                     AND column_name = 'delivered_seq') THEN
        ALTER TABLE agent_instances ADD COLUMN delivered_seq bigint NOT NULL DEFAULT 0;
        UPDATE agent_instances SET delivered_seq = last_read_seq;
    END IF;
END $$;
ALTER TABLE agent_instances ADD COLUMN IF NOT EXISTS answer_seq bigint NOT NULL DEFAULT 0;

CREATE INDEX IF NOT EXISTS agent_instances_user_activity
    ON agent_instances (user_id, last_activity_at DESC, id DESC);

-- The order of messages. A message takes its seq while its transaction holds
-- the session's row lock and its user's advisory lock, so seq order is commit
-- order for each user: never a client's or a server's clock.
CREATE SEQUENCE IF NOT EXISTS message_seq;

CREATE TABLE IF NOT EXISTS messages (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq                 bigint NOT NULL UNIQUE DEFAULT nextval('message_seq'),
    agent_instance_id   uuid NOT NULL REFERENCES agent_instances (id) ON DELETE CASCADE,
    user_id             uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    sender_type         text NOT NULL CHECK (sender_type IN ('AGENT', 'USER')),
    content             text NOT NULL,
    requires_user_input boolean NOT NULL DEFAULT false,
    send_email          boolean,
    send_sms            boolean,
    send_push           boolean,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS messages_instance_seq ON messages (agent_instance_id, seq);
CREATE INDEX IF NOT EXISTS messages_user_seq ON messages (user_id, seq);

-- API keys. The token itself is never stored: only the SHA-256 of the whole
-- token (hex), which is how a request finds its row.
CREATE TABLE IF NOT EXISTS api_keys (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         text NOT NULL DEFAULT '',
    api_key_hash text NOT NULL UNIQUE,
    is_active    boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    last_used_at timestamptz
);

-- Key scopes (added after the first release, so existing databases upgrade
-- in place): 'agent' keys write; 'person' keys may also read a user's history.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS scope text NOT NULL DEFAULT 'agent';
DO $$ BEGIN
    ALTER TABLE api_keys ADD CONSTRAINT api_keys_scope_check CHECK (scope IN ('agent', 'person'));
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

-- ---- notifications (issue 11) ----

-- Where a user's notifications go. token (an ntfy access token) and secret
-- (a webhook's signing secret) are kept only to send with; the API never
-- returns them after creation. window_* is the per-channel flood limit: how
-- many requests were started in the window that began at window_start.
CREATE TABLE IF NOT EXISTS notification_channels (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id          uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind             text NOT NULL CHECK (kind IN ('ntfy', 'webhook')),
    url              text NOT NULL,
    token            text,
    secret           text,
    events           text[] NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_delivery_at timestamptz,
    last_error       text,
    failures         integer NOT NULL DEFAULT 0,
    window_start     timestamptz,
    window_sent      integer NOT NULL DEFAULT 0
);

CREATE INDEX IF NOT EXISTS notification_channels_user ON notification_channels (user_id, created_at);

-- What happened, written in the same transaction as the question, message
-- or session change it reports (the transactional outbox). kind is
-- question.asked, message.flagged, session.ended or summary (the "N more
-- waiting" of a flooded channel). The unique indexes make "one notification
-- per question" a property of the database, not of the callers.
CREATE TABLE IF NOT EXISTS notification_events (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    session_id uuid REFERENCES agent_instances (id) ON DELETE CASCADE,
    kind       text NOT NULL,
    message_id uuid REFERENCES messages (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX IF NOT EXISTS notification_events_message
    ON notification_events (message_id, kind) WHERE message_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS notification_events_session_ended
    ON notification_events (session_id) WHERE kind = 'session.ended';

-- One row per (event, channel): the unit a worker claims, sends and
-- retries. Its id is the webhook-id, the same on every retry.
-- next_attempt_at is also the lease of a claimed row: a worker that dies
-- mid-attempt leaves it pending, and it is tried again when the lease ends.
-- A row over its channel's flood limit is 'folded' into a summary row
-- (summary_id); folded_count is the number a summary reports.
CREATE TABLE IF NOT EXISTS notification_deliveries (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    event_id        uuid NOT NULL REFERENCES notification_events (id) ON DELETE CASCADE,
    channel_id      uuid NOT NULL REFERENCES notification_channels (id) ON DELETE CASCADE,
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'sent', 'failed', 'folded')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    sent_at         timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    summary_id      uuid,
    folded_count    integer NOT NULL DEFAULT 0,
    UNIQUE (event_id, channel_id)
);

CREATE INDEX IF NOT EXISTS notification_deliveries_due
    ON notification_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS notification_deliveries_summary
    ON notification_deliveries (summary_id) WHERE summary_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS notification_deliveries_channel
    ON notification_deliveries (channel_id);
-- When a key was revoked (issue 13: keys an operator can see). is_active
-- stays what verification reads; revoked_at is for people listing keys.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS revoked_at timestamptz;

-- ---- approvals and choices (issue 12) ----

-- An approval is an agent message (requires_user_input while it waits)
-- with kind 'approval': the tool call it asks about, and the person's
-- decision, stored on the row (a person's message never decides one).
-- decided_by_rule names the session rule that allowed it without asking.
-- A question may offer options (a JSON array of strings); with allow_text
-- false the answer endpoint takes only one of them.
ALTER TABLE messages ADD COLUMN IF NOT EXISTS kind text;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS tool_name text;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS tool_input jsonb;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS tool_use_id text;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS decision text;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS decision_message text;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS decided_by_rule text;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS decided_at timestamptz;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS options jsonb;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS allow_text boolean NOT NULL DEFAULT true;
DO $$ BEGIN
    ALTER TABLE messages ADD CONSTRAINT messages_kind_check CHECK (kind IS NULL OR kind = 'approval');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
DO $$ BEGIN
    ALTER TABLE messages ADD CONSTRAINT messages_decision_check
        CHECK (decision IS NULL OR decision IN ('allow', 'allow_session', 'deny'));
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
CREATE INDEX IF NOT EXISTS messages_tool_use
    ON messages (agent_instance_id, tool_use_id) WHERE tool_use_id IS NOT NULL;

-- "Allow for this session": a tool (prefix '') or, for Bash, a command's
-- first word (prefix). Later approvals of the session that match are
-- allowed without asking.
CREATE TABLE IF NOT EXISTS session_rules (
    agent_instance_id uuid NOT NULL REFERENCES agent_instances (id) ON DELETE CASCADE,
    user_id           uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    tool_name         text NOT NULL,
    prefix            text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_instance_id, tool_name, prefix)
);

-- Lock-screen actions: single-use capabilities, each bound to one question
-- and one decision (allow or deny) or option. Only the SHA-256 (hex) of a
-- capability is kept; the capability itself exists only in the
-- notification that carried it. A capability is made when its delivery is
-- claimed (a retry replaces the ones of its earlier attempt), and all of a
-- question's capabilities go when it is answered.
CREATE TABLE IF NOT EXISTS action_capabilities (
    hash        text PRIMARY KEY,
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    message_id  uuid NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    delivery_id uuid REFERENCES notification_deliveries (id) ON DELETE CASCADE,
    action      text NOT NULL CHECK (action IN ('allow', 'deny', 'option')),
    option      text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS action_capabilities_message ON action_capabilities (message_id);
CREATE INDEX IF NOT EXISTS action_capabilities_delivery ON action_capabilities (delivery_id);

-- ---- Claude Code's hooks (issue 15) ----

-- The person's Away switch: while it is on, a PermissionRequest hook waits
-- for the person's decision; while off (at the desk) it is only recorded.
ALTER TABLE users ADD COLUMN IF NOT EXISTS away boolean NOT NULL DEFAULT false;
-- A session's title: the working directory Claude Code's hooks reported.
ALTER TABLE agent_instances ADD COLUMN IF NOT EXISTS title text;
-- An approval with no decision that no longer requires input was closed
-- without one (asked at the terminal while the person was at the desk, or
-- answered at the terminal or timed out): decision_message says which.
-- An approval a PermissionRequest hook asked: turning Away off closes the
-- open ones, so their hooks answer {} and the terminal prompt shows.
ALTER TABLE messages ADD COLUMN IF NOT EXISTS via_hook boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS messages_open_hook ON messages (user_id) WHERE via_hook AND requires_user_input;
