package main

import (
	"context"
	"encoding/base64"
	"net/http"
	"testing"
	"time"
)

// Feedback that ask_question picked up when it stored its question has moved
// the read pointer: if the call then ends with a shutdown error, that
// feedback must travel with the error, or it is lost for good.
func TestReviewAskShutdownKeepsFeedback(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "a@example.com", scopeAgent)
	cs := mcpTConnect(t, e, mcpTStreamable, key, mcpTDial{})
	sid := mcpTNewSession(t, cs)
	mcpTAnswer(t, e, key, sid, "use the staging db")
	p := mcpTGo(context.Background(), cs, "ask_question", map[string]any{"agent_instance_id": sid, "question_text": "Which db?"}, nil)
	mcpTWaiters(t, e, 1)
	e.stop()
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		t.Fatal("shutdown did not end the wait")
	}
	if p.err != nil {
		t.Fatalf("protocol error: %v", p.err)
	}
	mcpTWantError(t, p.res, "shutting down")
	mcpTWantError(t, p.res, "use the staging db")
}

// A `before` cursor with an extreme but well-formed time is a 200 or a 400,
// never a 500.
func TestReviewSessionsCursorExtremes(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "p@example.com", scopePerson)
	for _, ts := range []string{
		"0000-01-01T00:00:00Z", "9999-12-31T23:59:59.999999999-23:59", "0000-01-01T00:00:00+23:59",
		"2024-01-01T00:00:00.123456789Z",
	} {
		c := base64.RawURLEncoding.EncodeToString([]byte(ts + "_" + newUUID()))
		code, body := e.call(t, "GET", "/api/v1/sessions?before="+c, key, nil)
		if code != http.StatusOK && code != http.StatusBadRequest {
			t.Errorf("before=%s: %d %s", ts, code, body)
		}
	}
}
