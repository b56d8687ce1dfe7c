package main

// ratelimit.go is issue 13's per-key rate limit: a token bucket per API key
// id, per replica, set by RATE_LIMIT (default 20/s,burst=100; 0 = off). It
// sits right behind requireKey, so /health and the inbox page's static files
// are never limited, and a long wait (a pending long-poll, ask_question)
// costs one token like any other request: the bucket is only consulted as
// the request comes in. Its limiter (a token bucket per name) also limits the
// keyless act endpoint per client address, at a fixed rate (act.go).

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// rateLimit is a parsed RATE_LIMIT: perSec tokens a second, up to burst
// saved up. The zero value means no limit.
type rateLimit struct {
	perSec float64
	burst  int
}

func (l rateLimit) off() bool { return l.perSec <= 0 }

func (l rateLimit) String() string {
	if l.off() {
		return "0"
	}
	return fmt.Sprintf("%g/s,burst=%d", l.perSec, l.burst)
}

// defaultRateLimit is RATE_LIMIT when unset: enough for any agent, human or
// inbox page; a runaway loop is slowed down, not cut off.
const defaultRateLimit = "20/s,burst=100"

// parseRateLimit reads "N/s", "N/m", "N/h", optionally followed by
// ",burst=B" (default: N, at least 1); "0" or "off" turn the limit off.
func parseRateLimit(v string) (rateLimit, error) {
	v = strings.ToLower(strings.TrimSpace(v))
	if v == "0" || v == "off" {
		return rateLimit{}, nil
	}
	bad := fmt.Errorf("RATE_LIMIT=%q: want a rate like 20/s, 600/m or 20/s,burst=100 (0 turns limits off)", v)
	rate, burstPart, hasBurst := strings.Cut(v, ",")
	num, unit, ok := strings.Cut(strings.TrimSpace(rate), "/")
	if !ok {
		return rateLimit{}, bad
	}
	n, err := strconv.ParseFloat(strings.TrimSpace(num), 64)
	if err != nil || n <= 0 || math.IsInf(n, 0) || math.IsNaN(n) || n > 1e6 {
		return rateLimit{}, bad
	}
	var per float64
	switch strings.TrimSpace(unit) {
	case "s", "sec", "second":
		per = 1
	case "m", "min", "minute":
		per = 60
	case "h", "hour":
		per = 3600
	default:
		return rateLimit{}, bad
	}
	l := rateLimit{perSec: n / per, burst: max(1, int(math.Ceil(n)))}
	if hasBurst {
		k, b, ok := strings.Cut(strings.TrimSpace(burstPart), "=")
		burst, err := strconv.Atoi(strings.TrimSpace(b))
		if !ok || strings.TrimSpace(k) != "burst" || err != nil || burst < 1 || burst > 1e6 {
			return rateLimit{}, bad
		}
		l.burst = burst
	}
	return l, nil
}

// rateLimitEnv is RATE_LIMIT from the environment, the default when unset.
func rateLimitEnv(getenv func(string) string) (rateLimit, error) {
	v := getenv("RATE_LIMIT")
	if strings.TrimSpace(v) == "" {
		v = defaultRateLimit
	}
	return parseRateLimit(v)
}

// ---- the buckets ----

// maxBuckets bounds a limiter's memory even when every bucket is busy (an
// address limiter faces as many addresses as an attacker has).
const maxBuckets = 100_000

// sweepEvery is how often idle buckets are dropped.
const sweepEvery = 30 * time.Second

type bucket struct {
	tokens float64
	last   time.Time
}

// limiter is a set of token buckets by name (a key id, a client address).
// A bucket that has refilled completely is the same as no bucket, so the
// sweep drops those: memory follows the names active in the last moments.
type limiter struct {
	limit rateLimit
	now   func() time.Time

	mu        sync.Mutex
	buckets   map[string]*bucket
	lastSweep time.Time
}

func newLimiter(l rateLimit, now func() time.Time) *limiter {
	if now == nil {
		now = time.Now
	}
	return &limiter{limit: l, now: now, buckets: map[string]*bucket{}}
}

// allow takes a token from name's bucket. When there is none it returns
// false and how long until there is one.
func (l *limiter) allow(name string) (bool, time.Duration) {
	if l == nil || l.limit.off() {
		return true, 0
	}
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.lastSweep) >= sweepEvery || len(l.buckets) >= maxBuckets {
		l.sweep(now)
	}
	b := l.buckets[name]
	if b == nil {
		b = &bucket{tokens: float64(l.limit.burst), last: now}
		l.buckets[name] = b
	} else if el := now.Sub(b.last).Seconds(); el > 0 {
		b.tokens = math.Min(float64(l.limit.burst), b.tokens+el*l.limit.perSec)
		b.last = now
	}
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	return false, time.Duration((1 - b.tokens) / l.limit.perSec * float64(time.Second))
}

// sweep drops the buckets that are full again. If that leaves the map at
// its cap (a flood of distinct names), it starts over empty: memory stays
// bounded, and the worst case is a fresh burst for everyone. Callers hold mu.
func (l *limiter) sweep(now time.Time) {
	l.lastSweep = now
	for name, b := range l.buckets {
		if b.tokens+now.Sub(b.last).Seconds()*l.limit.perSec >= float64(l.limit.burst) {
			delete(l.buckets, name)
		}
	}
	if len(l.buckets) >= maxBuckets {
		clear(l.buckets)
	}
}

// size is the number of buckets held (for tests and metrics).
func (l *limiter) size() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.buckets)
}

// retryAfterSeconds is a wait as Retry-After wants it: whole seconds,
// rounded up, so a client that waits that long finds a token.
func retryAfterSeconds(d time.Duration) int {
	return max(1, int(math.Ceil(d.Seconds())))
}

// ---- middleware ----

// limiters are an app's key limiter, made on first use from cfg.rateLimit.
type limiters struct {
	once      sync.Once
	byKey     *limiter
	testClock func() time.Time // tests move time by hand; nil is time.Now
}

func (a *app) limiters() *limiters {
	l := &a.ops.limits
	l.once.Do(func() {
		l.byKey = newLimiter(a.cfg.rateLimit, l.testClock)
	})
	return l
}

// limitKey refuses a request whose key has no token left. It sits behind
// requireKey (it needs the caller's key id).
func (a *app) limitKey(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, _ := callerFrom(r.Context())
		if ok, wait := a.limiters().byKey.allow(c.KeyID); !ok {
			a.refuseRate(w, r, wait)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// refuseRate answers a request over the limit: 429, Retry-After and a
// {"detail"}; a tools/call on the streamable MCP endpoint gets a tool error
// instead, which an agent reads like any other tool result.
func (a *app) refuseRate(w http.ResponseWriter, r *http.Request, wait time.Duration) {
	a.ops.metrics.rateLimited.Add(1)
	secs := retryAfterSeconds(wait)
	w.Header().Set("Retry-After", strconv.Itoa(secs))
	msg := fmt.Sprintf("rate limit exceeded (%s per key); retry in %d s", a.cfg.rateLimit, secs)
	if id, ok := mcpToolCallID(r); ok {
		res := map[string]any{"jsonrpc": "2.0", "id": id, "result": map[string]any{
			"content": []map[string]string{{"type": "text", "text": msg}},
			"isError": true,
		}}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusOK)
		json.NewEncoder(w).Encode(res)
		return
	}
	writeJSON(w, http.StatusTooManyRequests, errorBody{msg})
}

// mcpToolCallID returns the id of a single JSON-RPC tools/call POSTed to the
// streamable MCP endpoint. Only a request already over the limit is read.
func mcpToolCallID(r *http.Request) (json.RawMessage, bool) {
	if r.Method != http.MethodPost || (r.URL.Path != "/mcp" && r.URL.Path != "/mcp/") {
		return nil, false
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		return nil, false
	}
	var m struct {
		ID     json.RawMessage `json:"id"`
		Method string          `json:"method"`
	}
	if json.Unmarshal(bytes.TrimSpace(body), &m) != nil || m.Method != "tools/call" || len(m.ID) == 0 || string(m.ID) == "null" {
		return nil, false
	}
	return m.ID, true
}
