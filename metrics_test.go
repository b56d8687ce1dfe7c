package main

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// scrapeMetrics GETs url and parses it with the Prometheus project's own
// text parser.
func scrapeMetrics(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain; version=0.0.4") {
		t.Fatalf("GET %s: %d %s", url, resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("the Prometheus parser refused the metrics: %v", err)
	}
	return fams
}

// metricValue is the value of the series of name whose labels include
// labels (a counter, gauge, or a histogram's count); -1 when missing.
func metricValue(fams map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	f := fams[name]
	if f == nil {
		return -1
	}
next:
	for _, m := range f.Metric {
		have := map[string]string{}
		for _, l := range m.Label {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range labels {
			if have[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	return -1
}

// TestMetrics: the metrics listener serves text the Prometheus parser reads,
// every named metric is there, and requests, refusals, waits, answers and a
// hub reconnect move their values. The public port does not serve them.
func TestMetrics(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	e := newTestEnv(t, withRateLimit(t, "1/m,burst=60", clock))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	stop, err := e.a.serveMetrics(addr, e.a.log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	url := "http://" + addr + "/metrics"

	before := scrapeMetrics(t, url)
	for _, name := range []string{"agentline_questions_waiting", "agentline_hub_waiters", "agentline_hub_reconnects_total", "agentline_hub_selfcheck_missed_total",
		"agentline_db_connections", "agentline_rate_limited_total"} {
		if before[name] == nil {
			t.Errorf("metric %s missing", name)
		}
	}
	if code, _ := e.call(t, "GET", "/metrics", "", nil); code != 404 {
		t.Errorf("the public port serves /metrics: %d", code)
	}

	agent := e.mustKey(t, "metrics@example.com", scopeAgent)
	person := e.mustKey(t, "metrics@example.com", scopePerson)
	sid := newUUID()
	for i := 0; i < 3; i++ {
		if code, body := e.call(t, "POST", "/api/v1/messages/agent", agent, map[string]any{
			"agent_instance_id": sid, "agent_type": "claude-code", "content": "step"}); code != 200 {
			t.Fatalf("%d %s", code, body)
		}
	}
	e.call(t, "GET", "/api/v1/sessions", agent, nil) // 403
	e.call(t, "GET", "/api/v1/nothing", agent, nil)  // 404
	e.call(t, "BREW", "/api/v1/sessions", agent, nil)

	// A question over MCP, answered over REST while it waits.
	s, err := authMCP(t, e, agent, false)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	answered := make(chan error, 1)
	go func() {
		res, err := s.CallTool(ctx, &mcp.CallToolParams{Name: "ask_question", Arguments: map[string]any{"agent_instance_id": sid, "question_text": "ship it?"}})
		if err == nil && res.IsError {
			b, _ := json.Marshal(res.Content)
			err = &badRequest{string(b)}
		}
		answered <- err
	}()
	deadline := time.Now().Add(10 * time.Second)
	for e.a.ops.metrics.questionsWaited.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	mid := scrapeMetrics(t, url)
	if v := metricValue(mid, "agentline_questions_waiting", nil); v != 1 {
		t.Errorf("questions waiting while one waits: %v", v)
	}
	if v := metricValue(mid, "agentline_hub_waiters", nil); v < 1 {
		t.Errorf("hub waiters while one waits: %v", v)
	}
	if code, body := e.call(t, "POST", "/api/v1/messages/user", person, map[string]any{"agent_instance_id": sid, "content": "yes", "mark_as_read": false}); code != 200 {
		t.Fatalf("%d %s", code, body)
	}
	if err := <-answered; err != nil {
		t.Fatalf("ask_question: %v", err)
	}

	// A REST long-poll answered while it waits.
	polled := make(chan int, 1)
	go func() {
		code, _ := e.call(t, "GET", "/api/v1/messages/pending?wait=20&agent_instance_id="+sid, agent, nil)
		polled <- code
	}()
	deadline = time.Now().Add(10 * time.Second)
	for e.a.hub.waiters() == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	e.call(t, "POST", "/api/v1/messages/user", person, map[string]any{"agent_instance_id": sid, "content": "and this", "mark_as_read": false})
	if code := <-polled; code != 200 {
		t.Fatalf("long-poll: %d", code)
	}

	// Refusals: spend the person key's bucket.
	for i := 0; i < 70; i++ {
		e.call(t, "GET", "/api/v1/keys", person, nil)
	}

	// A hub reconnect: end the listener's connection from the server side.
	if _, err := e.db.Exec(`SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE datname = current_database() AND pid <> pg_backend_pid() AND query ILIKE 'listen%'`); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(15 * time.Second)
	for e.a.hub.reconnects.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}

	after := scrapeMetrics(t, url)
	checks := []struct {
		name   string
		labels map[string]string
		min    float64
	}{
		{"agentline_http_requests_total", map[string]string{"route": "POST /api/v1/messages/agent", "method": "POST", "status": "200"}, 3},
		{"agentline_http_requests_total", map[string]string{"route": "GET /api/v1/sessions", "method": "GET", "status": "403"}, 1},
		{"agentline_http_requests_total", map[string]string{"route": "/api/", "method": "GET", "status": "404"}, 1},
		{"agentline_http_requests_total", map[string]string{"route": "/api/", "method": "other", "status": "404"}, 1},
		{"agentline_http_requests_total", map[string]string{"route": "GET /api/v1/keys", "status": "429"}, 1},
		{"agentline_http_requests_total", map[string]string{"route": "/mcp/", "method": "POST", "status": "200"}, 2},
		{"agentline_http_request_duration_seconds", map[string]string{"route": "POST /api/v1/messages/agent"}, 3},
		{"agentline_http_request_duration_seconds", map[string]string{"route": "GET /api/v1/messages/pending"}, 1},
		{"agentline_answer_latency_seconds", map[string]string{"via": "ask_question"}, 1},
		{"agentline_answer_latency_seconds", map[string]string{"via": "pending"}, 1},
		{"agentline_rate_limited_total", nil, 1},
		{"agentline_hub_reconnects_total", nil, 1},
		{"agentline_db_connections", map[string]string{"state": "idle"}, 1},
	}
	for _, c := range checks {
		if v := metricValue(after, c.name, c.labels); v < c.min {
			t.Errorf("%s%v = %v, want at least %v", c.name, c.labels, v, c.min)
		}
	}
	if v := metricValue(after, "agentline_questions_waiting", nil); v != 0 {
		t.Errorf("questions waiting after the answer: %v", v)
	}
	if f := after["agentline_http_request_duration_seconds"]; f == nil || f.GetType() != dto.MetricType_HISTOGRAM {
		t.Errorf("request duration is not a histogram")
	}
	// The answer came within the histogram's range, not in +Inf.
	for _, m := range after["agentline_answer_latency_seconds"].GetMetric() {
		if h := m.GetHistogram(); h.GetSampleSum() > 10 {
			t.Errorf("answer latency sum %v s", h.GetSampleSum())
		}
	}
}

// TestMetricsAddr: a bad METRICS_ADDR stops start-up naming the variable.
func TestMetricsAddr(t *testing.T) {
	t.Parallel()
	for _, bad := range []string{"9464", "localhost", "http://x:1/"} {
		if _, err := loadConfig(func(k string) string {
			if k == "METRICS_ADDR" {
				return bad
			}
			return ""
		}); err == nil || !strings.Contains(err.Error(), "METRICS_ADDR") {
			t.Errorf("METRICS_ADDR=%q: %v", bad, err)
		}
	}
}

// BenchmarkInstrument: what request metrics add to a request: the same
// mux with and without instrument around it.
func BenchmarkInstrument(b *testing.B) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /x/{id}", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(204) })
	for _, bc := range []struct {
		name string
		h    http.Handler
	}{{"bare", mux}, {"instrumented", (&app{}).instrument(mux)}} {
		b.Run(bc.name, func(b *testing.B) {
			b.RunParallel(func(pb *testing.PB) {
				w := &nopWriter{h: http.Header{}}
				for pb.Next() {
					r, _ := http.NewRequest("GET", "/x/1", nil)
					bc.h.ServeHTTP(w, r)
				}
			})
		})
	}
}

type nopWriter struct{ h http.Header }

func (w *nopWriter) Header() http.Header         { return w.h }
func (w *nopWriter) Write(b []byte) (int, error) { return len(b), nil }
func (w *nopWriter) WriteHeader(int)             {}

// TestMetricsNotifications: the hooks the notification channels will call
// show up as agentline_notification_deliveries_total and
// agentline_outbox_backlog, in text the Prometheus parser reads.
func TestMetricsNotifications(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	srv := httptest.NewServer(e.a.metricsHandler())
	defer srv.Close()
	if fams := scrapeMetrics(t, srv.URL+"/metrics"); fams["agentline_notification_deliveries_total"] != nil {
		t.Fatal("delivery metrics before any delivery")
	}
	person, agent := e.mustKey(t, "m@example.com", scopePerson), e.mustKey(t, "m@example.com", scopeAgent)
	rc := newReceiver(t, nil)
	mustChannel(t, e, person, map[string]any{"kind": "webhook", "url": rc.URL + "/hook"})
	mustAsk(t, e, agent, newUUID(), "Counted?")
	notifyWaitFor(t, "the webhook", 10*time.Second, func() bool { return rc.count() >= 1 })
	var fams map[string]*dto.MetricFamily
	notifyWaitFor(t, "the delivery counted", 10*time.Second, func() bool {
		fams = scrapeMetrics(t, srv.URL+"/metrics")
		return metricValue(fams, "agentline_notification_deliveries_total", map[string]string{"kind": "webhook", "result": "sent"}) == 1
	})
	if v := metricValue(fams, "agentline_outbox_backlog", nil); v != 0 {
		t.Errorf("backlog %v after the only delivery was sent", v)
	}
}
