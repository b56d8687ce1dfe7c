package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lib/pq"
)

// The tests run against a real PostgreSQL: TEST_DATABASE_URL if set, else a
// throwaway cluster started here in a temp dir. Every test gets a fresh
// database copied from a migrated template, so tests run in parallel and
// never see each other's rows.

const templateDB = "agentline_template"

var testAdminDSN string // DSN of a database to run CREATE DATABASE from

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	ctx := context.Background()
	if u := os.Getenv("TEST_DATABASE_URL"); u != "" {
		testAdminDSN = u
	} else {
		dir, err := os.MkdirTemp("", "agentline-test-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		os.Chmod(dir, 0o755)
		pg, err := openLocalPG(ctx, dir+"/pg", io.Discard)
		if err != nil {
			fmt.Fprintln(os.Stderr, "tests need PostgreSQL:", err)
			return 1
		}
		defer pg.stop()
		testAdminDSN = pg.dsn("postgres")
	}
	if err := prepareTemplate(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "prepare template database:", err)
		return 1
	}
	return m.Run()
}

// prepareTemplate (re)creates the migrated template database.
func prepareTemplate(ctx context.Context) error {
	admin, err := sql.Open("postgres", testAdminDSN)
	if err != nil {
		return err
	}
	defer admin.Close()
	if _, err := admin.ExecContext(ctx, `DROP DATABASE IF EXISTS `+templateDB+` WITH (FORCE)`); err != nil {
		return err
	}
	if _, err := admin.ExecContext(ctx, `CREATE DATABASE `+templateDB); err != nil {
		return err
	}
	db, err := sql.Open("postgres", dsnWithDB(testAdminDSN, templateDB))
	if err != nil {
		return err
	}
	defer db.Close()
	return migrate(ctx, db)
}

// dsnWithDB returns dsn pointing at database name (URL or key=value form).
func dsnWithDB(dsn, name string) string {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err == nil {
			u.Path = "/" + name
			return u.String()
		}
	}
	return dsn + " dbname=" + name
}

var dbCounter atomic.Int64

// mustDB returns a fresh, migrated database of its own and its DSN.
func mustDB(t testing.TB) (*sql.DB, string) {
	t.Helper()
	dsn := mustCreateDB(t, "t", templateDB)
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() }) // runs before mustCreateDB's drop
	return db, dsn
}

// mustCreateDB creates a database named from prefix as a copy of template,
// drops it when the test ends, and returns its DSN.
func mustCreateDB(t testing.TB, prefix, template string) string {
	t.Helper()
	name := fmt.Sprintf("%s_%d_%d", prefix, os.Getpid(), dbCounter.Add(1))
	admin, err := sql.Open("postgres", testAdminDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	for try := 0; ; try++ {
		_, err = admin.Exec(`CREATE DATABASE ` + name + ` TEMPLATE ` + template)
		var pqErr *pq.Error
		// 55006: the template is briefly in use by a concurrent copy.
		if err == nil || !errors.As(err, &pqErr) || pqErr.Code != "55006" || try > 50 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("create test database: %v", err)
	}
	t.Cleanup(func() {
		admin, err := sql.Open("postgres", testAdminDSN)
		if err == nil {
			admin.Exec(`DROP DATABASE IF EXISTS ` + name + ` WITH (FORCE)`)
			admin.Close()
		}
	})
	return dsnWithDB(testAdminDSN, name)
}

// testEnv is a whole agentline (store, hub, verifier, routes) on an
// httptest server over a database of its own.
type testEnv struct {
	a      *app
	srv    *httptest.Server
	db     *sql.DB
	dsn    string
	signer crypto.Signer
	stop   func()
	logs   *lockedBuffer // what the app logged; safe to read while it writes
}

type envOption = func(*app)

// newTestEnv builds an app over a fresh database with a fresh Ed25519 key.
func newTestEnv(t testing.TB, opts ...envOption) *testEnv {
	t.Helper()
	_, dsn := mustDB(t)
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return newTestEnvOn(t, dsn, priv, opts...)
}

// newTestEnvOn builds an app over the database at dsn, verifying keys signed
// by signer: a second replica over another env's database, or an app over a
// PostgreSQL that a fault test stops and starts.
func newTestEnvOn(t testing.TB, dsn string, signer crypto.Signer, opts ...envOption) *testEnv {
	t.Helper()
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		t.Fatal(err)
	}
	logs := &lockedBuffer{}
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	h, err := newHub(context.Background(), dsn, log)
	if err != nil {
		db.Close()
		t.Fatal(err)
	}
	pub := publicKey{key: signer.Public(), alg: "EdDSA", kid: fingerprint(signer.Public())}
	cfg := config{questionTimeout: 24 * time.Hour, callLimit: 280 * time.Second, keyRecheck: time.Minute, hookWait: 280 * time.Second}
	// The notifier first, so options can adjust it; loopback receivers allowed.
	withNotifier := func(a *app) {
		a.notify = newNotifier(a.store, h, log, "http://inbox.test", true)
		a.measureNotifier(a.notify)
	}
	a, stop := newApp(&store{db: db}, h, []publicKey{pub}, cfg, log, append([]envOption{withNotifier}, opts...)...)
	a.notify.start() // notifications (issue 11)
	srv := httptest.NewServer(a.routes())
	t.Cleanup(func() {
		stop()
		a.notify.stop() // notifications (issue 11)
		srv.CloseClientConnections()
		srv.Close()
		h.close()
		db.Close()
	})
	return &testEnv{a: a, srv: srv, db: db, dsn: dsn, signer: signer, stop: stop, logs: logs}
}

// lockedBuffer is a log buffer safe for concurrent writes and reads.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// mustKey registers a key for email and returns it.
func (e *testEnv) mustKey(t testing.TB, email, scope string) string {
	t.Helper()
	tok, err := issueKey(context.Background(), e.a.store, e.signer, email, "test", scope, 0)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// mustUserID returns the user id of email.
func (e *testEnv) mustUserID(t testing.TB, email string) string {
	t.Helper()
	id, err := e.a.store.ensureUser(context.Background(), email)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// call makes a request with a bearer key (none if key is empty) and a JSON
// body (raw if body is a string or []byte), returning status and body.
func (e *testEnv) call(t testing.TB, method, path, key string, body any) (int, []byte) {
	t.Helper()
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		r = strings.NewReader(b)
	case []byte:
		r = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		r = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, e.srv.URL+path, r)
	if err != nil {
		t.Fatal(err)
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	checkOpenAPIResponse(t, req, resp, out) // issue 13: every REST answer matches openapi.json
	return resp.StatusCode, out
}

// mustJSON decodes b into a map, failing the test on bad JSON.
func mustJSON(t testing.TB, b []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("bad JSON %q: %v", b, err)
	}
	return m
}
