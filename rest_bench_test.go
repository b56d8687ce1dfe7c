package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"runtime"
	"slices"
	"sync/atomic"
	"testing"
	"time"
)

// restBenchClients is the concurrency of SPEC.md's throughput target.
const restBenchClients = 16

// BenchmarkRESTAgentMessage measures POST /api/v1/messages/agent through the
// real handler, auth and store over HTTP, with 16 concurrent clients each
// posting steps to a session of its own (so they contend only for the
// database, not for one session's row lock).
//
//	go test -run '^$' -bench BenchmarkRESTAgentMessage -benchtime 3s .
func BenchmarkRESTAgentMessage(b *testing.B) {
	e := newTestEnv(b)
	e.db.SetMaxOpenConns(40) // as openDatabase sets it in production
	e.db.SetMaxIdleConns(40)
	key := e.mustKey(b, "bench@example.com", scopeAgent)

	par := (restBenchClients + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0)
	clients := par * runtime.GOMAXPROCS(0)
	bodies := make([][]byte, clients)
	for i := range bodies {
		sid := newUUID()
		restStep(b, e, key, sid, "warm-up", false)
		bodies[i], _ = json.Marshal(map[string]any{"agent_instance_id": sid, "content": "Ran the test suite: 3 failures in store_test.go"})
	}
	tr := &http.Transport{MaxIdleConnsPerHost: clients}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	url := e.srv.URL + "/api/v1/messages/agent"
	var next atomic.Int64

	b.SetParallelism(par)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		body := bodies[next.Add(1)-1] // one session per client
		for pb.Next() {
			req, _ := http.NewRequest("POST", url, bytes.NewReader(body))
			req.Header.Set("Authorization", "Bearer "+key)
			req.Header.Set("Content-Type", "application/json")
			resp, err := hc.Do(req)
			if err != nil {
				b.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				b.Errorf("status %d", resp.StatusCode)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
	b.ReportMetric(float64(clients), "clients")
}

// BenchmarkRESTAnswerLatency measures how long a waiting long-poll takes to
// answer once a person's message is committed: the time from
// addUserMessage returning (the commit) to the long-poll's response having
// arrived at the client, over b.N answers, as p50 and p99 in milliseconds.
//
//	go test -run '^$' -bench BenchmarkRESTAnswerLatency -benchtime 3s .
func BenchmarkRESTAnswerLatency(b *testing.B) {
	e := newTestEnv(b)
	const email = "latency@example.com"
	key := e.mustKey(b, email, scopeAgent)
	uid := e.mustUserID(b, email)
	sid := newUUID()
	restStep(b, e, key, sid, "Which database?", true)
	hc := &http.Client{Transport: &http.Transport{}}
	url := e.srv.URL + restPendingPath(sid, "", 60)
	ctx := context.Background()

	type arrival struct {
		at      time.Time
		content string
		err     error
	}
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		done := make(chan arrival, 1)
		go func() {
			req, _ := http.NewRequest("GET", url, nil)
			req.Header.Set("Authorization", "Bearer "+key)
			resp, err := hc.Do(req)
			if err != nil {
				done <- arrival{err: err}
				return
			}
			var body pendingResponse
			err = json.NewDecoder(resp.Body).Decode(&body)
			resp.Body.Close()
			a := arrival{at: time.Now(), err: err}
			if len(body.Messages) == 1 {
				a.content = body.Messages[0].Content
			}
			done <- a
		}()
		for e.a.hub.waiters() == 0 { // the long-poll is waiting
			time.Sleep(20 * time.Microsecond)
		}
		if _, err := e.a.store.addUserMessage(ctx, uid, sid, "PostgreSQL", false); err != nil {
			b.Fatal(err)
		}
		committed := time.Now()
		a := <-done
		if a.err != nil || a.content != "PostgreSQL" {
			b.Fatalf("long-poll: %v %q", a.err, a.content)
		}
		lat = append(lat, max(a.at.Sub(committed), 0))
		for e.a.hub.waiters() != 0 { // its waiter is gone before the next
			time.Sleep(20 * time.Microsecond)
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
