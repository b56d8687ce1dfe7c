package main

import (
	"fmt"
	"net/http"
	"testing"
)

// BenchmarkSessionsList measures GET /api/v1/sessions?limit=50 over HTTP
// for a user with 50 sessions of 3 messages each, 10 of them waiting on a
// question (the open-question and last-sender lookups of issue 12 run per page).
func BenchmarkSessionsList(b *testing.B) {
	e := newTestEnv(b)
	agent := e.mustKey(b, "bench@example.com", scopeAgent)
	person := e.mustKey(b, "bench@example.com", scopePerson)
	for i := 0; i < 50; i++ {
		sid := newUUID()
		for j := 0; j < 3; j++ {
			asks := j == 2 && i%5 == 0
			if code, body := e.call(b, "POST", "/api/v1/messages/agent", agent, map[string]any{
				"agent_instance_id": sid, "agent_type": "claude-code", "content": fmt.Sprintf("step %d", j), "requires_user_input": asks}); code != 200 {
				b.Fatalf("%d %s", code, body)
			}
		}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if code, body := e.call(b, "GET", "/api/v1/sessions?limit=50", person, nil); code != http.StatusOK {
			b.Fatalf("%d %s", code, body)
		}
	}
}
