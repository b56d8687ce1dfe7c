package main

// metrics.go is issue 13's Prometheus metrics, written by hand in the text
// exposition format (version 0.0.4: small and stable) on a listener of their
// own, METRICS_ADDR, so counts never show on the public port. The hooks into
// the rest of agentline are one line each: routes() wraps its mux in
// instrument, awaitAnswer and handlePending defer a timer, the hub counts its
// reconnects, refuseRate counts refusals.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// opsState is what the operational parts (rate limits, metrics) keep per
// app; its zero value is ready to use.
type opsState struct {
	limits  limiters
	metrics metrics
}

// Histogram buckets, in seconds. Requests: a plain call takes milliseconds,
// a long wait up to the call limit (280 s by default). Answers: how long
// after its commit an answer reaches the waiting call.
var (
	requestBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}
	answerBuckets  = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}
)

// histogram is a Prometheus histogram: counts per upper bound, sum, count.
type histogram struct {
	bounds []float64
	counts []uint64 // per bound, not cumulative; one more for +Inf
	sum    float64
	n      uint64
}

func newHistogram(bounds []float64) *histogram {
	return &histogram{bounds: bounds, counts: make([]uint64, len(bounds)+1)}
}

func (h *histogram) observe(v float64) {
	i, _ := slices.BinarySearch(h.bounds, v) // the first bound >= v
	h.counts[i]++
	h.sum += v
	h.n++
}

type requestLabels struct {
	route, method string
	status        int
}

// metrics are an app's counters and histograms. Counters that the hot path
// touches are atomics; labelled series sit in maps under mu.
type metrics struct {
	rateLimited     atomic.Int64
	questionsWaited atomic.Int64 // ask_question calls waiting now

	mu        sync.Mutex
	requests  map[requestLabels]uint64
	durations map[string]*histogram // by route
	answers   map[string]*histogram // by "ask_question" or "pending"
	// Notifications (for the notification channels, once they exist):
	// deliveries by kind and result, and a function reporting the outbox
	// backlog (nil: not exported).
	deliveries    map[[2]string]uint64
	outboxBacklog func() (int64, error)
}

// observeDelivery counts one notification delivery attempt: kind is the
// channel ("webhook", "email", …), result "ok", "failed", "retry" or the like.
// Both must come from a fixed set in code, never from user input.
func (m *metrics) observeDelivery(kind, result string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.deliveries == nil {
		m.deliveries = map[[2]string]uint64{}
	}
	m.deliveries[[2]string{kind, result}]++
}

// setOutboxBacklog makes the metrics report f() as the outbox backlog.
func (m *metrics) setOutboxBacklog(f func() (int64, error)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.outboxBacklog = f
}

// observeRequest records one finished request.
func (m *metrics) observeRequest(route, method string, status int, d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.requests == nil {
		m.requests = map[requestLabels]uint64{}
		m.durations = map[string]*histogram{}
	}
	m.requests[requestLabels{route, method, status}]++
	h := m.durations[route]
	if h == nil {
		h = newHistogram(requestBuckets)
		m.durations[route] = h
	}
	h.observe(d.Seconds())
}

// observeAnswer records that an answer committed at committed reached a
// call that began waiting at start. Answers that were there before the call
// began are not counted: no one waited for them. The commit time is the
// database's clock (the answer's created_at): skew between the database and
// this host shows up here, so it is clamped at zero.
func (m *metrics) observeAnswer(via string, start, committed time.Time) {
	if committed.IsZero() || committed.Before(start) {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.answers == nil {
		m.answers = map[string]*histogram{}
	}
	h := m.answers[via]
	if h == nil {
		h = newHistogram(answerBuckets)
		m.answers[via] = h
	}
	h.observe(math.Max(0, time.Since(committed).Seconds()))
}

// answerWait is awaitAnswer's hook: called when the wait starts, it counts
// the question as waiting; the function it returns, deferred, stops counting
// and records the answer's latency if one came.
func (m *metrics) answerWait() func(state *questionState, ans *message) {
	start := time.Now()
	m.questionsWaited.Add(1)
	return func(state *questionState, ans *message) {
		m.questionsWaited.Add(-1)
		if *state == questionAnswered {
			m.observeAnswer("ask_question", start, ans.CreatedAt)
		}
	}
}

// pendingWait is handlePending's hook, the same for REST long-polls: the
// newest user message it returns is the answer it waited for.
func (m *metrics) pendingWait() func(msgs *[]message) {
	start := time.Now()
	return func(msgs *[]message) {
		if n := len(*msgs); n > 0 {
			m.observeAnswer("pending", start, (*msgs)[n-1].CreatedAt)
		}
	}
}

// ---- request instrumentation ----

// statusWriter remembers the status a handler sent. Unwrap keeps
// http.ResponseController (deadlines, Flush) working through it.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Flush() {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// metricMethods are the methods counted by name; any other is "other", so
// a client cannot make up label values.
var metricMethods = []string{"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}

// instrument counts and times every request by the mux pattern that served
// it (r.Pattern, which the mux sets on the request it was handed), so the
// label set is bounded by the routes, never by the URLs clients send.
func (a *app) instrument(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		defer func() {
			route := r.Pattern
			if route == "" {
				route = "unmatched"
			}
			method := r.Method
			if !slices.Contains(metricMethods, method) {
				method = "other"
			}
			status := sw.status
			if status == 0 {
				status = http.StatusOK // a handler that wrote nothing
			}
			a.ops.metrics.observeRequest(route, method, status, time.Since(start))
		}()
		mux.ServeHTTP(sw, r)
	})
}

// ---- exposition ----

// labelValue escapes v for a label value in the text format.
func labelValue(v string) string {
	return strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(v)
}

func formatFloat(v float64) string {
	switch {
	case math.IsInf(v, 1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

// writeHistogram writes one histogram's _bucket, _sum and _count lines;
// labels is "" or `name="value",` (with the trailing comma).
func writeHistogram(w io.Writer, name, labels string, h *histogram) {
	var cum uint64
	for i, b := range h.bounds {
		cum += h.counts[i]
		fmt.Fprintf(w, "%s_bucket{%sle=\"%s\"} %d\n", name, labels, formatFloat(b), cum)
	}
	cum += h.counts[len(h.bounds)]
	fmt.Fprintf(w, "%s_bucket{%sle=\"+Inf\"} %d\n", name, labels, cum)
	l := strings.TrimSuffix(labels, ",")
	if l != "" {
		l = "{" + l + "}"
	}
	fmt.Fprintf(w, "%s_sum%s %s\n%s_count%s %d\n", name, l, formatFloat(h.sum), name, l, h.n)
}

// writeMetrics writes every metric of a in the text exposition format.
func (a *app) writeMetrics(w io.Writer) {
	m := &a.ops.metrics
	help := func(name, typ, text string) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", name, text, name, typ)
	}

	m.mu.Lock()
	help("agentline_http_requests_total", "counter", "HTTP requests by route pattern, method and status.")
	reqs := make([]requestLabels, 0, len(m.requests))
	for k := range m.requests {
		reqs = append(reqs, k)
	}
	slices.SortFunc(reqs, func(x, y requestLabels) int {
		return strings.Compare(fmt.Sprint(x.route, x.method, x.status), fmt.Sprint(y.route, y.method, y.status))
	})
	for _, k := range reqs {
		fmt.Fprintf(w, "agentline_http_requests_total{route=\"%s\",method=\"%s\",status=\"%d\"} %d\n",
			labelValue(k.route), k.method, k.status, m.requests[k])
	}
	help("agentline_http_request_duration_seconds", "histogram", "Time from a request's arrival to its handler's return, by route pattern (long waits included).")
	for _, route := range sortedKeys(m.durations) {
		writeHistogram(w, "agentline_http_request_duration_seconds", `route="`+labelValue(route)+`",`, m.durations[route])
	}
	help("agentline_answer_latency_seconds", "histogram", "From an answer's commit to the waiting call returning it, by how the agent waited (ask_question or pending).")
	for _, via := range sortedKeys(m.answers) {
		writeHistogram(w, "agentline_answer_latency_seconds", `via="`+via+`",`, m.answers[via])
	}
	if len(m.deliveries) > 0 {
		help("agentline_notification_deliveries_total", "counter", "Notification deliveries by channel kind and result.")
		keys := make([][2]string, 0, len(m.deliveries))
		for k := range m.deliveries {
			keys = append(keys, k)
		}
		slices.SortFunc(keys, func(x, y [2]string) int { return strings.Compare(x[0]+"\x00"+x[1], y[0]+"\x00"+y[1]) })
		for _, k := range keys {
			fmt.Fprintf(w, "agentline_notification_deliveries_total{kind=\"%s\",result=\"%s\"} %d\n", labelValue(k[0]), labelValue(k[1]), m.deliveries[k])
		}
	}
	backlog := m.outboxBacklog
	m.mu.Unlock()
	if backlog != nil {
		if n, err := backlog(); err == nil {
			help("agentline_outbox_backlog", "gauge", "Notifications waiting in the outbox.")
			fmt.Fprintf(w, "agentline_outbox_backlog %d\n", n)
		}
	}

	help("agentline_questions_waiting", "gauge", "ask_question calls waiting for an answer now.")
	fmt.Fprintf(w, "agentline_questions_waiting %d\n", m.questionsWaited.Load())
	if a.hub != nil {
		help("agentline_hub_waiters", "gauge", "Waits registered with the wait hub now (questions, long-polls, event streams).")
		fmt.Fprintf(w, "agentline_hub_waiters %d\n", a.hub.waiters())
		help("agentline_hub_reconnects_total", "counter", "Times the hub's LISTEN connection was re-established.")
		fmt.Fprintf(w, "agentline_hub_reconnects_total %d\n", a.hub.reconnects.Load())
		help("agentline_hub_selfcheck_missed_total", "counter", "Self-checks the hub's listener never received (every waiter re-checked).")
		fmt.Fprintf(w, "agentline_hub_selfcheck_missed_total %d\n", a.hub.missed.Load())
	}
	if a.store != nil {
		s := a.store.db.Stats()
		help("agentline_db_connections", "gauge", "Database pool connections by state.")
		fmt.Fprintf(w, "agentline_db_connections{state=\"in_use\"} %d\n", s.InUse)
		fmt.Fprintf(w, "agentline_db_connections{state=\"idle\"} %d\n", s.Idle)
		help("agentline_db_wait_total", "counter", "Times a query waited for a free pool connection.")
		fmt.Fprintf(w, "agentline_db_wait_total %d\n", s.WaitCount)
	}
	help("agentline_rate_limited_total", "counter", "Requests refused by the rate limit.")
	fmt.Fprintf(w, "agentline_rate_limited_total %d\n", m.rateLimited.Load())
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// metricsHandler serves GET /metrics.
func (a *app) metricsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		a.writeMetrics(w)
	})
	return mux
}

// checkMetricsAddr checks METRICS_ADDR: empty (off) or host:port.
func checkMetricsAddr(v string) error {
	if v == "" {
		return nil
	}
	if _, port, err := net.SplitHostPort(v); err != nil || port == "" {
		return fmt.Errorf("METRICS_ADDR=%q: want host:port, e.g. 127.0.0.1:9464", v)
	}
	return nil
}

// serveMetrics starts the metrics listener on addr ("" does nothing) and
// returns a function that stops it.
func (a *app) serveMetrics(addr string, log *slog.Logger) (stop func(), err error) {
	if addr == "" {
		return func() {}, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("METRICS_ADDR: listen on %s: %w", addr, err)
	}
	srv := &http.Server{Handler: a.metricsHandler(), ReadHeaderTimeout: 10 * time.Second,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("metrics listener stopped", "err", err)
		}
	}()
	log.Info("metrics listening", "addr", ln.Addr().String())
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}, nil
}

// measureNotifier makes n count its deliveries and the metrics report the
// outbox backlog.
func (a *app) measureNotifier(n *notifier) {
	n.observe = a.ops.metrics.observeDelivery
	a.ops.metrics.setOutboxBacklog(func() (int64, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		return a.store.outboxBacklog(ctx)
	})
}
