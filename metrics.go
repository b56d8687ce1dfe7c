package main

// metrics.go is issue 13's Prometheus metrics, written by hand in the text
// exposition format on a listener of their own (METRICS_ADDR), so counts
// never show on the public port.

import (
	"sync/atomic"
)

// opsState is what the operational parts (rate limits, metrics) keep per
// app; its zero value is ready to use.
type opsState struct {
	limits  limiters
	metrics metrics
}

// metrics are an app's counters and histograms.
type metrics struct {
	rateLimited atomic.Int64
}
