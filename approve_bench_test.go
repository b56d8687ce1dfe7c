package main

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"
)

// BenchmarkApproveDecisionLatency measures how long a waiting approve call
// takes to return once the person's decision is committed (through the
// store, as the answer endpoint does); the clock runs from the end of that
// commit until the client has the tool result.
func BenchmarkApproveDecisionLatency(b *testing.B) {
	e := newTestEnv(b)
	key := e.mustKey(b, "bench@example.com", scopeAgent)
	userID := e.mustUserID(b, "bench@example.com")
	cs := mcpTConnect(b, e, mcpTStreamable, key, mcpTDial{})
	sid := mcpTNewSession(b, cs)
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		p := mcpTGo(context.Background(), cs, "approve", map[string]any{"tool_name": "Bash",
			"input": map[string]any{"command": fmt.Sprintf("make target%d", i)}, "agent_instance_id": sid}, nil)
		for e.a.hub.waiters() == 0 {
			time.Sleep(20 * time.Microsecond)
		}
		time.Sleep(2 * time.Millisecond) // the answer must come through LISTEN/NOTIFY
		var qid string
		if err := e.db.QueryRow(`SELECT id FROM messages WHERE agent_instance_id = $1 AND kind = 'approval' AND decision IS NULL`, sid).Scan(&qid); err != nil {
			b.Fatal(err)
		}
		if _, err := e.a.store.answerQuestion(context.Background(), userID, qid, time.Hour, func(questionFields) (personAnswer, error) {
			return personAnswer{Decision: decisionAllow}, nil
		}); err != nil {
			b.Fatal(err)
		}
		committed := time.Now()
		res := p.wait(b)
		lat = append(lat, time.Since(committed))
		if res.IsError {
			b.Fatalf("approve: %s", mcpTText(res))
		}
	}
	b.StopTimer()
	slices.Sort(lat)
	ms := func(q float64) float64 {
		return float64(lat[min(len(lat)-1, int(q*float64(len(lat))))]) / float64(time.Millisecond)
	}
	b.ReportMetric(ms(0.50), "p50-ms")
	b.ReportMetric(ms(0.99), "p99-ms")
}
