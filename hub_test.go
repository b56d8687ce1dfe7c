package main

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
)

// TestHubSelfCheck: a waiter re-reads nothing while it waits, however long;
// the hub's one self-check per replica wakes every waiter only when a
// notification may have been lost (its own self-check never came back).
func TestHubSelfCheck(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t, func(a *app) { a.hubCheckEvery = 50 * time.Millisecond })
	var checks atomic.Int64
	var changed atomic.Bool
	done := make(chan error, 1)
	go func() {
		_, err := e.a.wait(context.Background(), "s:self-check", 0, func() (bool, error) {
			checks.Add(1)
			return changed.Load(), nil
		}, 0, nil)
		done <- err
	}()
	time.Sleep(600 * time.Millisecond) // about ten self-checks, each heard
	if n := checks.Load(); n != 1 {
		t.Fatalf("the waiter checked %d times while nothing changed, want once", n)
	}
	if n := e.a.hub.missed.Load(); n != 0 {
		t.Fatalf("%d self-checks missed on a healthy listener", n)
	}

	// A change committed without a notification reaching this replica, and
	// a self-check that is lost the same way: every waiter re-checks.
	changed.Store(true)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go e.a.hub.watch(ctx, 50*time.Millisecond, func(context.Context, string) error { return nil })
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a lost self-check did not wake the waiter")
	}
	if e.a.hub.missed.Load() == 0 {
		t.Fatal("the lost self-check was not counted")
	}
}
