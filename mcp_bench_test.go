package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// mcpTBenchClients is how many agents log steps at once (SPEC.md, Targets).
const mcpTBenchClients = 16

// BenchmarkMCPLogStep measures log_step throughput: 16 go-sdk clients over
// Streamable HTTP, each in a session of its own, calling as fast as they
// can. "store" runs the same store call with no HTTP or MCP in between, for
// reference.
func BenchmarkMCPLogStep(b *testing.B) {
	b.Run("streamable", func(b *testing.B) {
		e := mcpTBenchEnv(b)
		key := e.mustKey(b, "bench@example.com", scopeAgent)
		clients := make([]*mcp.ClientSession, mcpTBenchClients)
		sessions := make([]string, mcpTBenchClients)
		for i := range clients {
			clients[i] = mcpTConnect(b, e, mcpTStreamable, key, mcpTDial{ua: "claude-code/1.0"})
			sessions[i] = mcpTNewSession(b, clients[i])
		}
		mcpTRunParallel(b, func(i int) error {
			res, err := clients[i].CallTool(context.Background(), &mcp.CallToolParams{Name: "log_step",
				Arguments: map[string]any{"agent_instance_id": sessions[i], "step_description": "ran the tests"}})
			if err == nil && res.IsError {
				err = fmt.Errorf("tool error: %s", mcpTText(res))
			}
			return err
		})
	})
	// "http": the same calls as the bytes Claude Code sends (MCP 2026-07-28:
	// one POST a call, no session) from a plain HTTP client, as light as the
	// REST benchmark's: the server's own cost, without the go-sdk client's
	// share of the two cores.
	b.Run("http", func(b *testing.B) {
		e := mcpTBenchEnv(b)
		key := e.mustKey(b, "bench@example.com", scopeAgent)
		c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: mcpTBenchClients}}
		sessions := make([]string, mcpTBenchClients)
		for i := range sessions {
			sessions[i] = mcpTNewSession(b, mcpTConnect(b, e, mcpTStreamable, key, mcpTDial{ua: "claude-code/1.0"}))
		}
		mcpTRunParallel(b, func(i int) error {
			req := mcpTRequest(context.Background(), e.srv.URL, key, "tools/call", "log_step",
				`{"name":"log_step","arguments":{"agent_instance_id":"`+sessions[i]+`","step_description":"ran the tests"}}`)
			res, err := c.Do(req)
			if err != nil {
				return err
			}
			defer res.Body.Close()
			out, err := io.ReadAll(res.Body)
			if err == nil && (res.StatusCode != http.StatusOK || !bytes.Contains(out, []byte(`"success":true`))) {
				err = fmt.Errorf("log_step: %d %s", res.StatusCode, out)
			}
			return err
		})
	})
	b.Run("store", func(b *testing.B) {
		e := mcpTBenchEnv(b)
		userID := e.mustUserID(b, "bench@example.com")
		sessions := make([]string, mcpTBenchClients)
		for i := range sessions {
			sessions[i] = newUUID()
			if _, err := e.a.store.addAgentMessage(context.Background(), userID, agentMessage{SessionID: sessions[i], AgentType: "claude-code", Content: "started"}); err != nil {
				b.Fatal(err)
			}
		}
		mcpTRunParallel(b, func(i int) error {
			_, err := e.a.store.addAgentMessage(context.Background(), userID, agentMessage{SessionID: sessions[i], Content: "ran the tests"})
			return err
		})
	})
}

// mcpTBenchEnv is a test env whose connection pool is sized as serve sizes
// it (openDatabase), so 16 clients do not reconnect on every call.
func mcpTBenchEnv(b *testing.B) *testEnv {
	e := newTestEnv(b)
	e.db.SetMaxOpenConns(40)
	e.db.SetMaxIdleConns(40)
	return e
}

// mcpTRunParallel runs b.N calls of op spread over mcpTBenchClients
// goroutines (client i always runs op(i)) and reports requests per second.
func mcpTRunParallel(b *testing.B, op func(i int) error) {
	var next atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for i := range mcpTBenchClients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(b.N) {
				if err := op(i); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "req/s")
}

// BenchmarkMCPAnswerLatency measures how long a waiting ask_question takes
// to return once a person's answer is committed: the answer is stored with
// the store (as the REST handler does) and the clock runs from the end of
// that commit until the client has the tool result.
func BenchmarkMCPAnswerLatency(b *testing.B) {
	for _, tr := range []mcpTTransport{mcpTStreamable, mcpTSSE} {
		b.Run(tr.name, func(b *testing.B) {
			e := newTestEnv(b)
			key := e.mustKey(b, "bench@example.com", scopeAgent)
			userID := e.mustUserID(b, "bench@example.com")
			cs := mcpTConnect(b, e, tr, key, mcpTDial{})
			sid := mcpTNewSession(b, cs)
			lat := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				p := mcpTGo(context.Background(), cs, "ask_question",
					map[string]any{"agent_instance_id": sid, "question_text": fmt.Sprintf("question %d?", i)}, nil)
				for e.a.hub.waiters() == 0 {
					time.Sleep(20 * time.Microsecond)
				}
				// Let the call's first check finish, so the answer has to
				// come through LISTEN/NOTIFY, as it does for a real person.
				time.Sleep(2 * time.Millisecond)
				if _, err := e.a.store.addUserMessage(context.Background(), userID, sid, "yes", false); err != nil {
					b.Fatal(err)
				}
				committed := time.Now()
				res := p.wait(b)
				lat = append(lat, time.Since(committed))
				if res.IsError {
					b.Fatalf("ask_question: %s", mcpTText(res))
				}
			}
			b.StopTimer()
			slices.Sort(lat)
			ms := func(q float64) float64 {
				return float64(lat[min(len(lat)-1, int(q*float64(len(lat))))]) / float64(time.Millisecond)
			}
			b.ReportMetric(ms(0.50), "p50-ms")
			b.ReportMetric(ms(0.99), "p99-ms")
		})
	}
}
