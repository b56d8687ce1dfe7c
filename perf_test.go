package main

// perf_test.go measures agentline against its physical limit: pgbench running
// the server's own hot-path SQL on the same database and machine, and what
// many idle waiters cost. It also holds the helpers the replica, fault and
// soak tests share: a second app over any database, and the real binary run
// as a subprocess.
//
//	go test -run '^$' -bench BenchmarkPerfPgbench -benchtime 10s .  # ~70 s
//	AGENTLINE_PERF=1 go test -run TestPerfWaiters -v -timeout 30m .  # ~6 min
//
// scripts/perf runs these beside the REST and MCP benchmarks and prints the
// ratio server/pgbench.

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// ---- pgbench: the same SQL, without the server ----

// perfPgbenchClients is the concurrency of every throughput comparison.
const perfPgbenchClients = 16

// perfSessionExpr is client N's session id, built from pgbench's :client_id
// (0…15); perfSessionID is the same id in Go. Sessions of the shared user and
// of a user per client have different ids (8000 and 8001).
func perfSessionExpr(shared bool) string {
	return `('00000000-0000-4000-` + perfSessionGroup(shared) + `-' || lpad(:client_id::text, 12, '0'))::uuid`
}

func perfSessionID(shared bool, client int) string {
	return fmt.Sprintf("00000000-0000-4000-%s-%012d", perfSessionGroup(shared), client)
}

func perfSessionGroup(shared bool) string {
	if shared {
		return "8000"
	}
	return "8001"
}

// perfUserExpr is client N's user with one user per client; with a shared
// user every client is user 0.
const perfUserExpr = `('00000000-0000-4000-9000-' || lpad(:client_id::text, 12, '0'))::uuid`

func perfUserID(n int) string { return fmt.Sprintf("00000000-0000-4000-9000-%012d", n) }

// perfKeyHash is the api_keys.api_key_hash of client N's key; pgbench looks
// it up with perfKeyHashExpr. (The server hashes the bearer token first; a
// SHA-256 costs microseconds and is not SQL.)
func perfKeyHash(n int) string { return fmt.Sprintf("pgbench-key-%d", n) }

const perfKeyHashExpr = `('pgbench-key-' || :client_id)`

var perfParam = regexp.MustCompile(`\$([0-9]+)`)

// perfSubst replaces each $n in query with (args[n]); a $n without a value is
// an error, so a new parameter in store.go cannot slip through unnoticed.
func perfSubst(query string, args map[int]string) (string, error) {
	var missing []string
	out := perfParam.ReplaceAllStringFunc(query, func(p string) string {
		n, _ := strconv.Atoi(p[1:])
		v, ok := args[n]
		if !ok {
			missing = append(missing, p)
			return p
		}
		return "(" + v + ")"
	})
	if missing != nil {
		return "", fmt.Errorf("no pgbench value for %v in %q", missing, query)
	}
	return out, nil
}

// perfPgbenchVariant is one pgbench script: the request as the server runs
// it, or with a part taken out to measure what that part costs.
type perfPgbenchVariant struct {
	name         string
	sharedUser   bool // every client acts for one user (like one agent key); else a user per client
	auth         bool // the api_keys lookup every authenticated request makes first
	notify       bool // keep the pg_notify of sqlInsertAgentMessage
	advisoryLock bool // keep the per-user advisory lock of sqlInsertAgentMessage
}

var perfPgbenchVariants = []perfPgbenchVariant{
	{name: "request", sharedUser: true, auth: true, notify: true, advisoryLock: true},
	{name: "txn", sharedUser: true, notify: true, advisoryLock: true},
	{name: "request-16users", auth: true, notify: true, advisoryLock: true},
	{name: "no-notify", sharedUser: true, auth: true, advisoryLock: true},
	{name: "no-lock", sharedUser: true, auth: true, notify: true},
	{name: "no-notify-no-lock", sharedUser: true, auth: true},
}

var (
	perfNotifyCall = regexp.MustCompile(`pg_notify\([^\n]*\)`)
	perfLockCall   = regexp.MustCompile(`pg_advisory_xact_lock\(hashtextextended\([^)]*\)\)`)
)

// perfPgbenchScript is the pgbench script of one POST /api/v1/messages/agent
// in an existing session, built from store.go's own statements: the key
// lookup (its own implicit transaction, as the server runs it), then one
// transaction of lockSession, feedbackAfter and insertAgentMessage. The read
// pointer lockSession returns feeds feedbackAfter through \gset, as in Go.
func perfPgbenchScript(v perfPgbenchVariant) (string, error) {
	user := perfUserExpr
	if v.sharedUser {
		user = "'" + perfUserID(0) + "'::uuid"
	}
	session := perfSessionExpr(v.sharedUser)
	insert := sqlInsertAgentMessage
	if !v.notify {
		if len(perfNotifyCall.FindAllString(insert, -1)) != 1 {
			return "", errors.New("sqlInsertAgentMessage no longer has exactly one pg_notify call: update perfNotifyCall")
		}
		insert = perfNotifyCall.ReplaceAllString(insert, "''")
	}
	if !v.advisoryLock {
		if len(perfLockCall.FindAllString(insert, -1)) != 1 {
			return "", errors.New("sqlInsertAgentMessage no longer has exactly one advisory lock: update perfLockCall")
		}
		insert = perfLockCall.ReplaceAllString(insert, "1")
	}
	var b strings.Builder
	b.WriteString("-- generated by perf_test.go from store.go; do not edit\n")
	if v.auth {
		q, err := perfSubst(sqlAPIKeyByHash, map[int]string{1: perfKeyHashExpr})
		if err != nil {
			return "", err
		}
		fmt.Fprintf(&b, "%s;\n", strings.TrimSpace(q))
	}
	b.WriteString("BEGIN;\n")
	steps := []struct {
		query string
		args  map[int]string
		end   string
	}{
		{sqlLockSession, map[int]string{1: session, 2: user}, "\n\\gset\n"},
		{sqlFeedbackAfter, map[int]string{1: session, 2: user, 3: ":last_read_seq"}, ";\n"},
		{insert, map[int]string{1: session, 2: user, 3: "'pgbench step'", 4: "false",
			5: "NULL", 6: "NULL", 7: "NULL", 8: "NULL", 9: "true", 10: "'" + notifyChannel + "'"}, ";\n"},
	}
	for _, s := range steps {
		q, err := perfSubst(s.query, s.args)
		if err != nil {
			return "", err
		}
		b.WriteString(strings.TrimSpace(q) + s.end)
	}
	b.WriteString("COMMIT;\n")
	return b.String(), nil
}

// perfSeedPgbench makes what the scripts expect in db: a user and a key per
// client, and per client a session of the shared user (user 0) and one of
// its own user, each with one step in it.
func perfSeedPgbench(ctx context.Context, db *sql.DB, clients int) error {
	st := &store{db: db}
	for i := 0; i < clients; i++ {
		if _, err := db.ExecContext(ctx, `INSERT INTO users (id, email) VALUES ($1, $2)`,
			perfUserID(i), fmt.Sprintf("pgbench%d@example.com", i)); err != nil {
			return err
		}
		if _, err := st.addAPIKey(ctx, perfUserID(i), "pgbench", perfKeyHash(i), scopeAgent, nil); err != nil {
			return err
		}
		for _, shared := range []bool{true, false} {
			user := perfUserID(i)
			if shared {
				user = perfUserID(0)
			}
			in := agentMessage{SessionID: perfSessionID(shared, i), AgentType: "pgbench", Content: "seed"}
			if _, err := st.addAgentMessage(ctx, user, in); err != nil {
				return err
			}
		}
	}
	return nil
}

// perfPgbenchResult is what pgbench reported.
type perfPgbenchResult struct {
	tps       float64
	latencyMS float64
	done      int64
	output    string
}

var (
	perfTPSLine     = regexp.MustCompile(`(?m)^tps = ([0-9.]+) \(without initial connection time\)`)
	perfLatencyLine = regexp.MustCompile(`(?m)^latency average = ([0-9.]+) ms`)
	perfDoneLine    = regexp.MustCompile(`(?m)^number of transactions actually processed: ([0-9]+)`)
)

// perfPgbenchBin finds pgbench: PATH, then beside the PostgreSQL server.
func perfPgbenchBin() (string, error) {
	if p, err := exec.LookPath("pgbench"); err == nil {
		return p, nil
	}
	dir, err := findPGBin()
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, "pgbench")
	if _, err := os.Stat(p); err != nil {
		return "", err
	}
	return p, nil
}

// perfRunPgbench runs script against dsn with the given clients, for a
// duration ("-T 10") or a count of transactions per client ("-t 5").
func perfRunPgbench(ctx context.Context, dir, dsn, script string, clients int, limit ...string) (perfPgbenchResult, error) {
	bin, err := perfPgbenchBin()
	if err != nil {
		return perfPgbenchResult{}, err
	}
	path := filepath.Join(dir, "agentline-request.sql")
	if err := os.WriteFile(path, []byte(script), 0o644); err != nil {
		return perfPgbenchResult{}, err
	}
	args := append([]string{"-n", "-M", "extended", "-c", strconv.Itoa(clients), "-j", "2"}, limit...)
	args = append(args, "-f", path, dsn)
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = perfEnvWithout("PG")
	out, err := cmd.CombinedOutput()
	r := perfPgbenchResult{output: string(out)}
	if err != nil {
		return r, fmt.Errorf("pgbench %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	m := perfTPSLine.FindStringSubmatch(r.output)
	if m == nil {
		return r, fmt.Errorf("no tps in pgbench output:\n%s", out)
	}
	r.tps, _ = strconv.ParseFloat(m[1], 64)
	if m := perfLatencyLine.FindStringSubmatch(r.output); m != nil {
		r.latencyMS, _ = strconv.ParseFloat(m[1], 64)
	}
	if m := perfDoneLine.FindStringSubmatch(r.output); m != nil {
		r.done, _ = strconv.ParseInt(m[1], 10, 64)
	}
	return r, nil
}

// perfEnvWithout is the environment without variables starting with prefix.
func perfEnvWithout(prefix string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, prefix) {
			env = append(env, kv)
		}
	}
	return env
}

// TestPerfPgbenchScript runs every pgbench script for a few transactions, so
// a change to the hot-path SQL that the script cannot follow fails in CI, not
// on the day someone benchmarks.
func TestPerfPgbenchScript(t *testing.T) {
	t.Parallel()
	if _, err := perfPgbenchBin(); err != nil {
		t.Skip("no pgbench:", err)
	}
	db, dsn := mustDB(t)
	ctx := context.Background()
	if err := perfSeedPgbench(ctx, db, perfPgbenchClients); err != nil {
		t.Fatal(err)
	}
	var before int
	if err := db.QueryRow(`SELECT count(*) FROM messages`).Scan(&before); err != nil {
		t.Fatal(err)
	}
	for _, v := range perfPgbenchVariants {
		script, err := perfPgbenchScript(v)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(script, "$") {
			t.Fatalf("%s: unsubstituted parameter in\n%s", v.name, script)
		}
		if _, err := perfRunPgbench(ctx, t.TempDir(), dsn, script, 2, "-t", "3"); err != nil {
			t.Fatalf("%s: %v", v.name, err)
		}
	}
	var after, steps int
	if err := db.QueryRow(`SELECT count(*) FROM messages`).Scan(&after); err != nil {
		t.Fatal(err)
	}
	if want := before + 2*3*len(perfPgbenchVariants); after != want {
		t.Fatalf("messages: %d, want %d (each pgbench transaction stores one)", after, want)
	}
	// The script is the real thing: step counts moved like a real request's.
	if err := db.QueryRow(`SELECT step_count FROM agent_instances WHERE id = $1`, perfSessionID(true, 0)).Scan(&steps); err != nil {
		t.Fatal(err)
	}
	if steps < 2 {
		t.Fatalf("session 0 step_count = %d, want the seed plus pgbench's steps", steps)
	}
}

// BenchmarkPerfPgbench runs pgbench with 16 clients on the server's hot-path
// SQL: b.N transactions (rounded up to a multiple of 16), one transaction
// per agent message, reported as req/s (pgbench's tps, connection set-up
// excluded) to compare with BenchmarkRESTAgentMessage and
// BenchmarkMCPLogStep at the same -benchtime. Variants: request (what a
// REST request runs: the key lookup, then the transaction; one user for all
// clients, as one agent key), txn (the transaction alone), request-16users,
// and the request without NOTIFY, without the per-user advisory lock, or
// without both, to show what each costs.
//
//	go test -run '^$' -bench 'BenchmarkPerfPgbench' -benchtime 10s .
func BenchmarkPerfPgbench(b *testing.B) {
	if _, err := perfPgbenchBin(); err != nil {
		b.Skip("no pgbench:", err)
	}
	for _, v := range perfPgbenchVariants {
		b.Run(v.name, func(b *testing.B) {
			db, dsn := mustDB(b)
			ctx := context.Background()
			if err := perfSeedPgbench(ctx, db, perfPgbenchClients); err != nil {
				b.Fatal(err)
			}
			script, err := perfPgbenchScript(v)
			if err != nil {
				b.Fatal(err)
			}
			if dir := os.Getenv("AGENTLINE_PERF_DUMP"); dir != "" {
				os.WriteFile(filepath.Join(dir, "pgbench-"+v.name+".sql"), []byte(script), 0o644)
			}
			perClient := (b.N + perfPgbenchClients - 1) / perfPgbenchClients
			b.ResetTimer()
			r, err := perfRunPgbench(ctx, b.TempDir(), dsn, script, perfPgbenchClients, "-t", strconv.Itoa(perClient))
			b.StopTimer()
			if err != nil {
				b.Fatal(err)
			}
			if r.done != int64(perClient*perfPgbenchClients) {
				b.Fatalf("pgbench processed %d transactions, want %d:\n%s", r.done, perClient*perfPgbenchClients, r.output)
			}
			b.ReportMetric(r.tps, "req/s")
			b.ReportMetric(r.latencyMS, "ms/txn")
		})
	}
}

// ---- a second app over any database ----

// ---- the real binary as a subprocess ----

// perfBuildBinary builds agentline into a temp dir and returns its path.
func perfBuildBinary(t testing.TB) string {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command on PATH to build the binary with")
	}
	out := filepath.Join(t.TempDir(), "agentline")
	cmd := exec.Command(goBin, "build", "-o", out, ".")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, b)
	}
	return out
}

// perfBuffer is a bytes.Buffer safe for a process writing while a test reads.
type perfBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (p *perfBuffer) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.b.Write(b)
}

func (p *perfBuffer) String() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.b.String()
}

// perfServer is agentline running as a process of its own.
type perfServer struct {
	cmd    *exec.Cmd
	url    string // http://127.0.0.1:PORT
	stdout *perfBuffer
	stderr *perfBuffer
	done   chan struct{} // closed when the process has exited
	err    error         // its exit status, once done
}

var perfListenLine = regexp.MustCompile(`msg="agentline listening" addr=\S*:([0-9]+)`)

// perfStartServer runs `bin serve` on a free port with env (and PATH, HOME,
// TMPDIR) and waits until it listens. The process is killed at cleanup if
// still running.
func perfStartServer(t testing.TB, bin string, env ...string) *perfServer {
	t.Helper()
	s := &perfServer{stdout: &perfBuffer{}, stderr: &perfBuffer{}, done: make(chan struct{})}
	s.cmd = exec.Command(bin, "serve")
	s.cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"),
		"TMPDIR=" + os.TempDir(), "MCP_SERVER_PORT=0",
		"RATE_LIMIT=0"}, env...) // issue 13: load tests drive one key far past any per-key limit
	s.cmd.Stdout, s.cmd.Stderr = s.stdout, s.stderr
	s.cmd.SysProcAttr = perfSysProcAttr()
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.err = s.cmd.Wait(); close(s.done) }()
	t.Cleanup(func() {
		select {
		case <-s.done:
		default:
			s.cmd.Process.Kill()
			<-s.done
		}
	})
	deadline := time.After(90 * time.Second)
	for {
		if m := perfListenLine.FindStringSubmatch(s.stderr.String()); m != nil {
			s.url = "http://127.0.0.1:" + m[1]
			return s
		}
		select {
		case <-s.done:
			t.Fatalf("agentline exited before listening: %v\nstderr:\n%s", s.err, s.stderr.String())
		case <-deadline:
			t.Fatalf("agentline did not listen within 90 s; stderr:\n%s", s.stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

var perfGCLine = regexp.MustCompile(`(?m)^gc \d+ .* (\d+)->(\d+)->(\d+) MB, \d+ MB goal, (\d+) MB stacks`)

// liveHeap is the heap left live by the process's latest garbage collection
// plus its goroutine stacks, in bytes, from GODEBUG=gctrace=1 output (MB
// precision); ok is false if there was no collection yet.
func (s *perfServer) liveHeap() (n int64, ok bool) {
	all := perfGCLine.FindAllStringSubmatch(s.stderr.String(), -1)
	if len(all) == 0 {
		return 0, false
	}
	m := all[len(all)-1]
	live, _ := strconv.ParseInt(m[3], 10, 64)
	stacks, _ := strconv.ParseInt(m[4], 10, 64)
	return (live + stacks) << 20, true
}

// gcCount is how many collections the process reported.
func (s *perfServer) gcCount() int {
	return len(perfGCLine.FindAllStringIndex(s.stderr.String(), -1))
}

// rss is the process's resident memory in bytes, from /proc.
func (s *perfServer) rss(t testing.TB) int64 {
	t.Helper()
	return perfProcStatus(t, s.cmd.Process.Pid, "VmRSS")
}

// perfProcStatus reads a "kB" field of /proc/PID/status, in bytes.
func perfProcStatus(t testing.TB, pid int, field string) int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, v, ok := strings.Cut(sc.Text(), ":")
		if ok && name == field {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				t.Fatalf("%s: %v", field, err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// stop sends SIGTERM and waits for the exit, returning the exit status.
func (s *perfServer) stop(t testing.TB) error {
	t.Helper()
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
		return s.err
	case <-time.After(60 * time.Second):
		t.Fatalf("agentline did not exit within 60 s of SIGTERM; stderr:\n%s", s.stderr.String())
		return nil
	}
}

// perfKeys writes a key pair into a temp dir and returns the public key's
// path (for JWT_PUBLIC_KEY) and the signer.
func perfKeys(t testing.TB) (string, crypto.Signer) {
	t.Helper()
	dir := t.TempDir()
	if err := keygen(dir); err != nil {
		t.Fatal(err)
	}
	signer, err := loadPrivateKey(filepath.Join(dir, "jwt-private.pem"))
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, "jwt-public.pem"), signer
}

// perfClient is an HTTP client for many concurrent long requests to one host.
func perfClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		MaxIdleConns: 4096, MaxIdleConnsPerHost: 4096, IdleConnTimeout: 90 * time.Second,
	}}
}

// perfDo makes a request with a bearer key and a JSON body, returning the
// status and decoded body (nil if it is not JSON).
func perfDo(ctx context.Context, c *http.Client, method, url, key string, body any) (int, map[string]any, error) {
	var r io.Reader
	if body != nil {
		j, err := json.Marshal(body)
		if err != nil {
			return 0, nil, err
		}
		r = bytes.NewReader(j)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, r)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+key)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, nil, err
	}
	var m map[string]any
	json.Unmarshal(b, &m)
	return resp.StatusCode, m, nil
}

// ---- what idle waiters cost ----

// perfProbe opens a connection to the admin database, so that watching a
// test database's statistics adds nothing to them.
func perfProbe(t testing.TB) *sql.DB {
	t.Helper()
	p, err := sql.Open("postgres", testAdminDSN)
	if err != nil {
		t.Fatal(err)
	}
	p.SetMaxOpenConns(1)
	t.Cleanup(func() { p.Close() })
	return p
}

// perfDBName is the name of the database db is connected to.
func perfDBName(t testing.TB, db *sql.DB) string {
	t.Helper()
	var name string
	if err := db.QueryRow(`SELECT current_database()`).Scan(&name); err != nil {
		t.Fatal(err)
	}
	return name
}

// perfActivity is what pg_stat_activity says about a database's backends,
// leaving out the wait hub's listener (its last statement is its LISTEN, or
// the empty query of its keep-alive ping).
type perfActivity struct {
	conns      int       // backends connected to the database
	busy       int       // of them, running a statement or inside a transaction
	lastChange time.Time // the latest moment any of them changed state
	now        time.Time // the server's clock at the probe
}

func perfActivityOf(t testing.TB, probe *sql.DB, dbname string) perfActivity {
	t.Helper()
	var a perfActivity
	var last sql.NullTime
	err := probe.QueryRow(`
		SELECT count(*), count(*) FILTER (WHERE state <> 'idle'), max(state_change), now()
		FROM pg_stat_activity
		WHERE datname = $1 AND backend_type = 'client backend'
			AND query NOT LIKE 'LISTEN %' AND query <> ''`, dbname).Scan(&a.conns, &a.busy, &last, &a.now)
	if err != nil {
		t.Fatal(err)
	}
	a.lastChange = last.Time
	return a
}

// perfConnsOf counts all client backends of the database, listener included.
func perfConnsOf(t testing.TB, probe *sql.DB, dbname string) (total, busy int) {
	t.Helper()
	err := probe.QueryRow(`
		SELECT count(*), count(*) FILTER (WHERE state NOT IN ('idle'))
		FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'`, dbname).Scan(&total, &busy)
	if err != nil {
		t.Fatal(err)
	}
	return total, busy
}

// perfWaitQuiet waits until no backend of the database (but the listener)
// has done anything for quiet, and returns the server's clock then.
func perfWaitQuiet(t testing.TB, probe *sql.DB, dbname string, quiet, limit time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		a := perfActivityOf(t, probe, dbname)
		if a.busy == 0 && a.now.Sub(a.lastChange) >= quiet {
			return a.now
		}
		if time.Now().After(deadline) {
			t.Fatalf("database %s never went quiet: %+v", dbname, a)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// perfXacts is the database's committed plus rolled-back transactions as
// the statistics system has them. A backend reports its counts when it goes
// idle at least a second after its previous report, otherwise at its next
// activity or exit, so counts can arrive late: callers measure between quiet
// periods of a server whose connections keep working.
func perfXacts(t testing.TB, probe *sql.DB, dbname string) int64 {
	t.Helper()
	var n int64
	err := probe.QueryRow(`SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1`, dbname).Scan(&n)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// perfMakeSessions creates n sessions of userID, each with one step.
func perfMakeSessions(t testing.TB, st *store, userID string, n int) []string {
	t.Helper()
	ids := make([]string, n)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 8 {
				ids[i] = newUUID()
				in := agentMessage{SessionID: ids[i], AgentType: "perf", Content: "step 1"}
				if _, err := st.addAgentMessage(context.Background(), userID, in); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
	return ids
}

// perfLongPoll waits on a session with GET pending?wait=, again and again,
// until a message arrives (reported on got) or ctx ends. started counts the
// requests it made.
func perfLongPoll(ctx context.Context, c *http.Client, base, key, session string, wait int, started *atomic.Int64, got chan<- string) {
	for ctx.Err() == nil {
		started.Add(1)
		code, body, err := perfDo(ctx, c, "GET", fmt.Sprintf("%s/api/v1/messages/pending?agent_instance_id=%s&wait=%d", base, session, wait), key, nil)
		if err != nil {
			return
		}
		if code != http.StatusOK {
			got <- fmt.Sprintf("error %d %v", code, body)
			return
		}
		if msgs, _ := body["messages"].([]any); len(msgs) > 0 {
			m, _ := msgs[0].(map[string]any)
			content, _ := m["content"].(string)
			got <- content
			return
		}
	}
}

// TestPerfIdleWaiters holds 100 REST long-polls and 100 MCP ask_question
// calls and shows what they cost while nothing happens, for longer than the
// 30 s per-waiter re-check of earlier releases: no statement runs in the
// database, no pooled connection is in use, none is busy in PostgreSQL; then
// every one of them gets its answer. (TestPerfWaiters is the same at scale
// against the real binary.)
func TestPerfIdleWaiters(t *testing.T) {
	t.Parallel()
	const n, rest = 200, 100
	e := newTestEnv(t)
	key := e.mustKey(t, "idle@example.com", scopeAgent)
	user := e.mustUserID(t, "idle@example.com")
	sessions := perfMakeSessions(t, e.a.store, user, n)
	probe := perfProbe(t)
	dbname := perfDBName(t, e.db)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c := perfClient()
	var started atomic.Int64
	got := make(chan string, n)
	for i, s := range sessions {
		if i < rest {
			go perfLongPoll(ctx, c, e.srv.URL, key, s, 60, &started, got)
		} else {
			go perfAskAndWait(ctx, e.srv.URL, key, s, c.Transport, &started, func() {}, got)
		}
	}
	for deadline := time.Now().Add(30 * time.Second); e.a.hub.waiters() < n; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waiters = %d, want %d", e.a.hub.waiters(), n)
		}
	}
	t0 := perfWaitQuiet(t, probe, dbname, time.Second, 30*time.Second)
	time.Sleep(33 * time.Second)
	a := perfActivityOf(t, probe, dbname)
	stats := e.db.Stats()
	if a.lastChange.After(t0) || a.busy != 0 {
		t.Errorf("the database was not idle while %d requests waited: %+v (quiet since %v)", n, a, t0)
	}
	if stats.InUse != 0 {
		t.Errorf("%d pooled connections in use while %d requests waited, want 0", stats.InUse, n)
	}
	if w := e.a.hub.waiters(); w != n {
		t.Errorf("waiters = %d, want %d", w, n)
	}
	if s := started.Load(); s != n {
		t.Errorf("%d requests made, want %d (a long-poll returned early)", s, n)
	}
	t.Logf("%d waiting requests: %d pooled connections open, %d in use; %d PostgreSQL backends (listener aside), %d busy, none active for %v",
		n, stats.OpenConnections, stats.InUse, a.conns, a.busy, a.now.Sub(a.lastChange).Round(time.Millisecond))

	// They were real waiters: each gets its answer.
	for i, s := range sessions {
		if _, err := e.a.store.addUserMessage(context.Background(), user, s, fmt.Sprintf("answer %d", i), false); err != nil {
			t.Fatal(err)
		}
	}
	want := map[string]bool{}
	for i := range sessions {
		want[fmt.Sprintf("answer %d", i)] = true
	}
	for range sessions {
		select {
		case m := <-got:
			if !want[m] {
				t.Fatalf("unexpected delivery %q", m)
			}
			delete(want, m)
		case <-time.After(30 * time.Second):
			t.Fatalf("%d answers never arrived", len(want))
		}
	}
	for deadline := time.Now().Add(5 * time.Second); e.a.hub.waiters() != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waiters after all answers = %d, want 0", e.a.hub.waiters())
		}
	}
}

// perfBearer adds a bearer key to every request, over its own transport.
type perfBearer struct {
	key  string
	base http.RoundTripper
}

func (p perfBearer) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+p.key)
	return p.base.RoundTrip(r)
}

// perfMCPConnect connects the go-sdk client over Streamable HTTP to url.
func perfMCPConnect(ctx context.Context, url, key string, base http.RoundTripper) (*mcp.ClientSession, error) {
	c := mcp.NewClient(&mcp.Implementation{Name: "perf", Version: "1"}, nil)
	tr := &mcp.StreamableClientTransport{Endpoint: url + "/mcp/", HTTPClient: &http.Client{Transport: perfBearer{key: key, base: base}}}
	return c.Connect(ctx, tr, nil)
}

// perfAskAndWait asks a question in session over MCP and reports the answer
// (or the failure) on got. connected is called once the client is connected.
func perfAskAndWait(ctx context.Context, url, key, session string, base http.RoundTripper, started *atomic.Int64, connected func(), got chan<- string) {
	cs, err := perfMCPConnect(ctx, url, key, base)
	connected()
	if err != nil {
		got <- "connect: " + err.Error()
		return
	}
	defer cs.Close()
	started.Add(1)
	res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: "ask_question",
		Arguments: map[string]any{"agent_instance_id": session, "question_text": "May I?"}})
	switch {
	case err != nil:
		got <- "call: " + err.Error()
	case res.IsError:
		got <- fmt.Sprintf("tool error: %v", res.Content)
	default:
		m, _ := res.StructuredContent.(map[string]any)
		a, _ := m["answer"].(string)
		got <- a
	}
}

// perfWaiterMix is what a run of TestPerfWaiters holds at once: REST
// long-polls, MCP ask_question calls and idle MCP clients holding only their
// subscriptions/listen stream (as each running Claude Code does).
type perfWaiterMix struct{ rest, mcp, listen int }

func (m perfWaiterMix) total() int { return m.rest + m.mcp + m.listen }

// perfWaiterReport is what holding the waiters for a minute cost.
type perfWaiterReport struct {
	mix          perfWaiterMix
	window       time.Duration
	xacts        int64 // transactions the database ran in the window
	requests     int64 // client requests started in the window (each costs its own transactions)
	conns, busy  int   // backends of the database mid-window, listener included
	fds          int   // the server's open files mid-window (a socket per waiter)
	rssBefore    int64
	rssDuring    int64
	perWaiterKiB float64 // RSS growth per waiter: an upper bound (uncollected garbage counts)
	liveBefore   int64   // live heap and stacks after the last collection
	liveDuring   int64
	liveKiB      float64       // live heap and stacks growth per waiter
	answerAll    time.Duration // from the first answer's send to the last waiter's return
}

// TestPerfWaiters holds 10,000 waiters for a minute against the real binary
// (its own process, so the clients' memory does not count) and reports the
// database's transactions over that minute, the connections in use and the
// server's memory per waiter, then answers them all (SPEC.md, issue 14).
// "questions" holds 5,000 REST long-polls (wait=60, re-polled when they run
// out) and 5,000 MCP ask_question calls (go-sdk client, MCP 2026-07-28,
// ASK_QUESTION_CALL_LIMIT=0 so one call waits the whole time) on one
// server; "listen" holds 10,000 idle MCP clients, each with its
// subscriptions/listen stream open, on a fresh one. About 6 minutes:
//
//	AGENTLINE_PERF=1 go test -run TestPerfWaiters -v -timeout 30m .
//
// AGENTLINE_PERF_WAITERS changes the count.
func TestPerfWaiters(t *testing.T) {
	if os.Getenv("AGENTLINE_PERF") != "1" {
		t.Skip("set AGENTLINE_PERF=1 to hold 10,000 waiters for a minute (about 6 minutes)")
	}
	n := 10000
	if v := os.Getenv("AGENTLINE_PERF_WAITERS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 2 {
			t.Fatalf("AGENTLINE_PERF_WAITERS=%q", v)
		}
	}
	bin := perfBuildBinary(t)
	for _, run := range []struct {
		name string
		mix  perfWaiterMix
	}{{"questions", perfWaiterMix{rest: n / 2, mcp: n - n/2}}, {"listen", perfWaiterMix{listen: n}}} {
		t.Run(run.name, func(t *testing.T) {
			r := perfHoldWaiters(t, bin, run.mix)
			// Where the transactions go: each request a client starts (a
			// long-poll returns at 60 s and is made again): its key lookup
			// (lib/pq runs a parameterized statement outside a transaction
			// as two protocol exchanges, which the statistics count as two
			// transactions) and its first check. A waiter itself re-reads
			// nothing while it waits. The rest is the server's own: the
			// hub's self-check (one a minute), the key re-check of held
			// connections (one a minute), a last_used_at write, autovacuum.
			other := r.xacts - 3*r.requests
			perSec := float64(other) / r.window.Seconds()
			t.Logf("PERF waiters run=%s rest=%d mcp=%d listen=%d window=%v xacts=%d = client requests %d×3 + server's own %d (%.2f/s); conns=%d busy=%d fds=%d; rss_before=%.1fMiB rss_during=%.1fMiB rss_per_waiter=%.1fKiB; live_before=%dMiB live_during=%dMiB live_per_waiter=%.1fKiB; answer_all=%v",
				run.name, r.mix.rest, r.mix.mcp, r.mix.listen, r.window, r.xacts, r.requests, other, perSec, r.conns, r.busy, r.fds,
				float64(r.rssBefore)/(1<<20), float64(r.rssDuring)/(1<<20), r.perWaiterKiB, r.liveBefore>>20, r.liveDuring>>20, r.liveKiB, r.answerAll.Round(time.Millisecond))
			if perSec >= 1 {
				t.Errorf("%.2f transactions a second beyond the clients' requests with %d idle waiters: want < 1", perSec, n)
			}
			if r.busy > 0 || r.conns > 41 {
				t.Errorf("%d connections (%d busy) mid-wait: want at most the pool (40) and the listener, none busy", r.conns, r.busy)
			}
			if r.fds < n {
				t.Errorf("the server had %d files open mid-wait: fewer than its %d waiters' sockets", r.fds, n)
			}
		})
	}
}

// perfListen connects an MCP client that opens its subscriptions/listen
// stream and holds it until ctx ends.
func perfListen(ctx context.Context, url, key string, base http.RoundTripper, started *atomic.Int64, connected func(), got chan<- string) {
	c := mcp.NewClient(&mcp.Implementation{Name: "perf", Version: "1"}, &mcp.ClientOptions{
		ToolListChangedHandler: func(context.Context, *mcp.ToolListChangedRequest) {}, // so the client listens
	})
	tr := &mcp.StreamableClientTransport{Endpoint: url + "/mcp/", HTTPClient: &http.Client{Transport: perfBearer{key: key, base: base}}}
	cs, err := c.Connect(ctx, tr, nil)
	connected()
	if err != nil {
		got <- "connect: " + err.Error()
		return
	}
	started.Add(1)
	<-ctx.Done()
	cs.Close()
}

func perfHoldWaiters(t *testing.T, bin string, mix perfWaiterMix) perfWaiterReport {
	ctx := context.Background()
	db, dsn := mustDB(t)
	pub, signer := perfKeys(t)
	srv := perfStartServer(t, bin, "DATABASE_URL="+dsn, "JWT_PUBLIC_KEY="+pub, "ASK_QUESTION_CALL_LIMIT=0", "GODEBUG=gctrace=1")
	st := &store{db: db}
	key, err := issueKey(ctx, st, signer, "perf@example.com", "perf", scopeAgent, 0)
	if err != nil {
		t.Fatal(err)
	}
	userID, err := st.ensureUser(ctx, "perf@example.com")
	if err != nil {
		t.Fatal(err)
	}
	asking := mix.rest + mix.mcp
	sessions := perfMakeSessions(t, st, userID, asking+1)
	warm, sessions := sessions[asking], sessions[:asking]
	db.SetMaxIdleConns(0) // so that the database's connections are the server's
	probe := perfProbe(t)
	dbname := perfDBName(t, db)
	n := mix.total()
	base := &http.Transport{MaxIdleConns: 4 * n, MaxIdleConnsPerHost: 4 * n}
	c := &http.Client{Transport: base}

	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var started atomic.Int64
	got := make(chan string, n+1)
	ask := func(s string, connected func()) {
		perfAskAndWait(wctx, srv.url, key, s, base, &started, connected, got)
	}
	// Warm up: one waiter answered, so the baseline has every code path
	// loaded and the pool open.
	go ask(warm, func() {})
	time.Sleep(time.Second)
	if code, body, err := perfDo(ctx, c, "POST", srv.url+"/api/v1/messages/user", key, map[string]any{"agent_instance_id": warm, "content": "warm", "mark_as_read": false}); err != nil || code != 200 {
		t.Fatalf("answer: %d %v %v", code, body, err)
	}
	select {
	case m := <-got:
		if m != "warm" {
			t.Fatalf("warm-up waiter got %q", m)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the warm-up waiter never got its answer")
	}
	perfWaitQuiet(t, probe, dbname, time.Second, time.Minute)
	r := perfWaiterReport{mix: mix, rssBefore: srv.rss(t)}
	r.liveBefore, _ = srv.liveHeap()

	// Start them all, 32 connecting at a time.
	started.Store(0)
	sem := make(chan struct{}, 32)
	for i := 0; i < n; i++ {
		sem <- struct{}{}
		connected := func() { <-sem }
		switch {
		case i < mix.rest:
			go func() { connected(); perfLongPoll(wctx, c, srv.url, key, sessions[i], 60, &started, got) }()
		case i < asking:
			go ask(sessions[i], connected)
		default:
			go perfListen(wctx, srv.url, key, base, &started, connected, got)
		}
	}
	for deadline := time.Now().Add(5 * time.Minute); started.Load() < int64(n); time.Sleep(50 * time.Millisecond) {
		select {
		case m := <-got:
			t.Fatalf("a waiter failed while they started: %q", m)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d waiters started", started.Load(), n)
		}
	}
	// Every waiter has made its first check once the database is quiet.
	// The window starts 17 s later and lasts a minute, so the statistics
	// of the first checks (reported up to ~10 s late) stay out of it and a
	// long-poll's return and re-poll at 60 s falls inside it.
	// Then the tables the start-up wrote are vacuumed and analyzed now,
	// so that autovacuum (which counts its transactions in the same
	// statistics) has nothing left to do in the window.
	perfWaitQuiet(t, probe, dbname, 2*time.Second, 3*time.Minute)
	if _, err := db.Exec(`VACUUM ANALYZE`); err != nil {
		t.Fatal(err)
	}
	quiet := time.Now()
	perfWaitQuiet(t, probe, dbname, 2*time.Second, 3*time.Minute)
	time.Sleep(time.Until(quiet.Add(17 * time.Second)))
	// Statistics arrive up to a second or so after the work: the requests
	// are counted over the window moved that much earlier.
	const statsLag = 2 * time.Second
	req0 := started.Load()
	time.Sleep(statsLag)
	x0, w0 := perfXacts(t, probe, dbname), time.Now()
	time.Sleep(time.Until(quiet.Add(47 * time.Second)))
	r.rssDuring = srv.rss(t)
	r.conns, r.busy = perfConnsOf(t, probe, dbname)
	if fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", srv.cmd.Process.Pid)); err == nil {
		r.fds = len(fds)
	}
	time.Sleep(time.Until(w0.Add(time.Minute - statsLag)))
	r.requests = started.Load() - req0
	time.Sleep(time.Until(w0.Add(time.Minute)))
	r.xacts, r.window = perfXacts(t, probe, dbname)-x0, time.Since(w0).Round(time.Second)
	r.perWaiterKiB = float64(r.rssDuring-r.rssBefore) / 1024 / float64(n)
	select {
	case m := <-got:
		t.Fatalf("a waiter returned before its answer: %q", m)
	default:
	}
	// An idle server collects no garbage: make some (tools/list calls)
	// until a collection reports what the waiters keep live.
	gcs := srv.gcCount()
	for deadline := time.Now().Add(time.Minute); srv.gcCount() == gcs && time.Now().Before(deadline); {
		perfToolsList(ctx, c, srv.url, key)
	}
	if srv.gcCount() == gcs {
		t.Logf("no garbage collection after the waiters started: the live-heap figure is not measured")
	}
	r.liveDuring, _ = srv.liveHeap()
	r.liveKiB = float64(r.liveDuring-r.liveBefore) / 1024 / float64(n)

	// Answer every question, 16 at a time, through the server.
	t0 := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < asking; i += 16 {
				code, body, err := perfDo(ctx, c, "POST", srv.url+"/api/v1/messages/user", key,
					map[string]any{"agent_instance_id": sessions[i], "content": "answer " + sessions[i], "mark_as_read": false})
				if err != nil || code != 200 {
					t.Errorf("answer: %d %v %v", code, body, err)
				}
			}
		}()
	}
	for i := 0; i < asking; i++ {
		select {
		case m := <-got:
			if !strings.HasPrefix(m, "answer ") {
				t.Fatalf("waiter got %q", m)
			}
		case <-time.After(2 * time.Minute):
			t.Fatalf("%d of %d waiters never got their answer", asking-i, asking)
		}
	}
	r.answerAll = time.Since(t0)
	wg.Wait()
	return r
}

// perfToolsList makes one MCP tools/list request (MCP 2026-07-28, no
// session): garbage for the collector.
func perfToolsList(ctx context.Context, c *http.Client, base, key string) {
	req := mcpTRequest(ctx, base, key, "tools/list", "", "")
	if res, err := c.Do(req); err == nil {
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
	}
}
