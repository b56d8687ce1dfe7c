package main

// pooler.go lets agentline run on PostgreSQL behind a transaction pooler
// such as PgBouncer in pool_mode=transaction (issue 13). Such a pooler hands
// each transaction to any server connection, so nothing that lives in a
// session survives: LISTEN above all. DATABASE_LISTEN_URL names a direct
// connection used only for the wait hub's LISTEN; every query goes through
// DATABASE_URL. Everything else agentline does is transaction-scoped already:
// the migration lock and the per-user locks are pg_advisory_xact_lock, no
// statement is prepared by name, no SET outlives its transaction.
//
// At start-up probeListen checks that a NOTIFY sent through DATABASE_URL
// reaches a LISTEN on the listener's connection, so a pooler without
// DATABASE_LISTEN_URL (or a listener URL on another database) is refused
// with a message saying what to set, instead of waits that never wake.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/lib/pq"
)

// loadOpsConfig reads issue 13's variables into c: RATE_LIMIT,
// METRICS_ADDR and DATABASE_LISTEN_URL.
func loadOpsConfig(c *config, getenv func(string) string) error {
	var err error
	if c.rateLimit, err = rateLimitEnv(getenv); err != nil {
		return err
	}
	c.metricsAddr = getenv("METRICS_ADDR")
	if err := checkMetricsAddr(c.metricsAddr); err != nil {
		return err
	}
	c.databaseListenURL = getenv("DATABASE_LISTEN_URL")
	if c.databaseListenURL != "" && c.databaseURL == "" {
		return errors.New("DATABASE_LISTEN_URL is set without DATABASE_URL: it names the direct connection for LISTEN beside a pooled DATABASE_URL; unset it for the embedded database")
	}
	return nil
}

// listenDSN is the DSN of the hub's LISTEN connection: DATABASE_LISTEN_URL
// when set, else the database's own DSN.
func (c config) listenDSN(dsn string) string {
	if c.databaseListenURL != "" {
		return c.databaseListenURL
	}
	return dsn
}

// pooledDSN is DATABASE_URL as agentline opens it: when it is a pooler
// (DATABASE_LISTEN_URL set), with lib/pq's binary_parameters=yes, which sends
// a statement and its parameters in one round trip. Without it lib/pq
// prepares and executes in two, and a transaction pooler may run the second
// on another server connection ("unnamed prepared statement does not exist").
func (c config) pooledDSN() string {
	dsn := c.databaseURL
	if c.databaseListenURL == "" || strings.Contains(dsn, "binary_parameters") {
		return dsn
	}
	if u, err := url.Parse(dsn); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		q := u.Query()
		q.Set("binary_parameters", "yes")
		u.RawQuery = q.Encode()
		return u.String()
	}
	return dsn + " binary_parameters=yes"
}

// probeTimeout is how long probeListen waits for its notification; a
// direct connection delivers it in milliseconds.
const probeTimeout = 3 * time.Second

// probeListen LISTENs on a fresh channel through listenDSN, NOTIFYs it
// through db and waits for the notification. fromEnv says whether listenDSN
// came from DATABASE_LISTEN_URL (it shapes the error message).
func probeListen(ctx context.Context, st *store, listenDSN string, fromEnv bool) error {
	var b [8]byte
	rand.Read(b[:])
	channel := "agentline_probe_" + hex.EncodeToString(b[:])
	l := pq.NewListener(listenDSN, 100*time.Millisecond, time.Second, nil)
	defer l.Close()
	name := "DATABASE_URL"
	if fromEnv {
		name = "DATABASE_LISTEN_URL"
	}
	if err := l.Listen(channel); err != nil {
		return fmt.Errorf("%s: LISTEN failed: %w", name, err)
	}
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	if err := st.pgNotify(ctx, channel, "probe"); err != nil {
		return fmt.Errorf("DATABASE_URL: NOTIFY for the LISTEN check failed: %w", err)
	}
	for {
		select {
		case n := <-l.NotificationChannel():
			if n != nil && n.Channel == channel {
				return nil
			}
		case <-ctx.Done():
			if fromEnv {
				return errors.New("DATABASE_LISTEN_URL: a NOTIFY sent through DATABASE_URL did not arrive on a LISTEN through DATABASE_LISTEN_URL within 3s: both must reach the same database, and DATABASE_LISTEN_URL must be a direct connection (not a transaction pooler)")
			}
			return errors.New("DATABASE_URL: LISTEN/NOTIFY does not work through it (a NOTIFY did not come back within 3s): it looks like a transaction pooler such as PgBouncer in pool_mode=transaction. Set DATABASE_LISTEN_URL to a direct connection to the same database; it is used only for LISTEN")
		}
	}
}
