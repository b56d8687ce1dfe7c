package main

import (
	"context"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// pgTestDir returns a fresh directory the postgres user can reach, or skips
// the test when this machine cannot run a private PostgreSQL.
func pgTestDir(t *testing.T) string {
	t.Helper()
	if _, err := findPGBin(); err != nil {
		t.Skipf("no PostgreSQL: %v", err)
	}
	if os.Geteuid() == 0 {
		if _, err := user.Lookup("postgres"); err != nil {
			t.Skipf("running as root without a postgres user: %v", err)
		}
	}
	dir := t.TempDir()
	// t.TempDir's per-test parent is made 0700 by os.MkdirTemp.
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// openPG opens a cluster in dataDir and stops it when the test ends.
func openPG(t *testing.T, dataDir string) *localPG {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	p, err := openLocalPG(ctx, dataDir, testLogWriter{t})
	if err != nil {
		t.Fatalf("openLocalPG: %v", err)
	}
	t.Cleanup(func() {
		if err := p.stop(); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	return p
}

// testLogWriter sends progress lines to the test log.
type testLogWriter struct{ t *testing.T }

func (w testLogWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

// psql runs sql in database postgres over p's socket and returns the output.
func psql(p *localPG, sql string) (string, error) {
	cmd := exec.Command(filepath.Join(p.bin, "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", p.dsn("postgres"), "-c", sql)
	cmd.Dir = "/"
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// mustPSQL is psql that fails the test on error.
func mustPSQL(t *testing.T, p *localPG, sql string) string {
	t.Helper()
	out, err := psql(p, sql)
	if err != nil {
		t.Fatalf("psql %q: %v: %s", sql, err, out)
	}
	return out
}

func TestFindPGBin(t *testing.T) {
	t.Parallel()
	dir, err := findPGBin()
	if err != nil {
		t.Skipf("no PostgreSQL: %v", err)
	}
	for _, name := range []string{"initdb", "pg_ctl", "postgres"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("findPGBin() = %s, which has no %s: %v", dir, name, err)
		}
	}
}

func TestVersionLess(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		a, b string
		want bool
	}{
		{"9.6", "10", true},
		{"10", "9.6", false},
		{"15", "16", true},
		{"16", "16", false},
		{"9.5", "9.6", true},
	} {
		if got := versionLess(c.a, c.b); got != c.want {
			t.Errorf("versionLess(%q, %q) = %v, want %v", c.a, c.b, got, c.want)
		}
	}
}

func TestLocalPGDSN(t *testing.T) {
	t.Parallel()
	p := &localPG{sockDir: "/x/run"}
	if got, want := p.dsn("agentline"), "host=/x/run port=5432 user=postgres dbname=agentline sslmode=disable"; got != want {
		t.Errorf("dsn = %q, want %q", got, want)
	}
	p.sockDir = "/a b/it's"
	if got, want := p.dsn("d"), `host='/a b/it\'s' port=5432 user=postgres dbname=d sslmode=disable`; got != want {
		t.Errorf("dsn = %q, want %q", got, want)
	}
}

func TestLocalPGStartConnectReuse(t *testing.T) {
	t.Parallel()
	dataDir := filepath.Join(pgTestDir(t), "data", "pg")
	p := openPG(t, dataDir)
	if want := filepath.Join(dataDir, "run"); p.sockDir != want {
		t.Errorf("sockDir = %s, want %s", p.sockDir, want)
	}
	if !p.owned {
		t.Error("first open did not start the server")
	}
	if out := mustPSQL(t, p, "select 1"); out != "1" {
		t.Errorf("select 1 = %q", out)
	}
	if _, err := os.Stat(filepath.Join(dataDir, "log", "postgres.log")); err != nil {
		t.Errorf("server log: %v", err)
	}

	// A second handle on the running folder reuses the server and does not stop it.
	q := openPG(t, dataDir)
	if q.owned {
		t.Error("second open started a server of its own")
	}
	if err := q.stop(); err != nil {
		t.Fatalf("second stop: %v", err)
	}
	if out := mustPSQL(t, p, "select 2"); out != "2" {
		t.Errorf("after the second handle's stop, select 2 = %q", out)
	}

	// The owner stops it, twice without harm.
	if err := p.stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if err := p.stop(); err != nil {
		t.Fatalf("second stop: %v", err)
	}
	if out, err := psql(p, "select 1"); err == nil {
		t.Errorf("server still answers after stop: %s", out)
	}
	if _, err := os.Stat(filepath.Join(dataDir, "postmaster.pid")); !os.IsNotExist(err) {
		t.Errorf("postmaster.pid after stop: %v", err)
	}
}

func TestLocalPGKeepsData(t *testing.T) {
	t.Parallel()
	dataDir := filepath.Join(pgTestDir(t), "pg")
	p := openPG(t, dataDir)
	mustPSQL(t, p, "create table kept (v text); insert into kept values ('hello')")
	if err := p.stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	q := openPG(t, dataDir)
	if !q.owned {
		t.Error("reopen after stop did not start the server")
	}
	if out := mustPSQL(t, q, "select v from kept"); out != "hello" {
		t.Errorf("after restart, select v from kept = %q, want hello", out)
	}
}

func TestLocalPGStalePidFile(t *testing.T) {
	t.Parallel()
	dataDir := filepath.Join(pgTestDir(t), "pg")
	p := openPG(t, dataDir)
	mustPSQL(t, p, "create table survived (v int); insert into survived values (7)")
	pf, ok, err := p.readPidFile()
	if err != nil || !ok || pf.pid <= 0 {
		t.Fatalf("readPidFile = %+v, %v, %v", pf, ok, err)
	}
	if err := syscall.Kill(pf.pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill -9 %d: %v", pf.pid, err)
	}
	// Wait for it to be gone (it may linger as a zombie, which counts as gone).
	for deadline := time.Now().Add(10 * time.Second); p.postmasterAlive(pf.pid); {
		if time.Now().After(deadline) {
			t.Fatalf("postmaster %d still alive after kill -9", pf.pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := os.Stat(filepath.Join(dataDir, "postmaster.pid")); err != nil {
		t.Fatalf("expected a stale postmaster.pid: %v", err)
	}

	q := openPG(t, dataDir)
	if !q.owned {
		t.Error("open after a crash did not start the server")
	}
	if out := mustPSQL(t, q, "select v from survived"); out != "7" {
		t.Errorf("after crash recovery, select v from survived = %q, want 7", out)
	}
	pf2, _, _ := q.readPidFile()
	if pf2.pid == pf.pid {
		t.Errorf("postmaster pid unchanged (%d) after restart", pf.pid)
	}
}

func TestLocalPGStalePidFileReusedPid(t *testing.T) {
	t.Parallel()
	dataDir := filepath.Join(pgTestDir(t), "pg")
	p := openPG(t, dataDir)
	if err := p.stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	// A crash left a pid file naming a pid that now belongs to another live process.
	sleeper := exec.Command("sleep", "60")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sleeper.Process.Kill(); sleeper.Wait() })
	stale := strconv.Itoa(sleeper.Process.Pid) + "\n" + dataDir + "\n0\n5432\n" + p.sockDir + "\n\n0 0\nready   \n"
	if err := os.WriteFile(filepath.Join(dataDir, "postmaster.pid"), []byte(stale), 0o600); err != nil {
		t.Fatal(err)
	}
	if p.cred != nil {
		if err := os.Chown(filepath.Join(dataDir, "postmaster.pid"), p.uid, p.gid); err != nil {
			t.Fatal(err)
		}
	}
	q := openPG(t, dataDir)
	if !q.owned {
		t.Error("open with a stale pid file did not start the server")
	}
	mustPSQL(t, q, "select 1")
}

func TestLocalPGLongPath(t *testing.T) {
	t.Parallel()
	dataDir := filepath.Join(pgTestDir(t), strings.Repeat("long-directory-name-", 5), "pg")
	abs, err := filepath.Abs(dataDir)
	if err != nil {
		t.Fatal(err)
	}
	want := socketDirFor(abs)
	if !strings.HasPrefix(filepath.Base(want), "agentline-") || filepath.Dir(want) != os.TempDir() {
		t.Fatalf("socketDirFor(%s) = %s, want %s/agentline-*", abs, want, os.TempDir())
	}
	if again := socketDirFor(abs); again != want {
		t.Errorf("socketDirFor is not deterministic: %s then %s", want, again)
	}
	t.Cleanup(func() { os.RemoveAll(want) })
	p := openPG(t, dataDir)
	if p.sockDir != want {
		t.Errorf("sockDir = %s, want %s", p.sockDir, want)
	}
	fi, err := os.Stat(p.sockDir)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Errorf("socket dir mode = %04o, want 0700", fi.Mode().Perm())
	}
	if out := mustPSQL(t, p, "select 1"); out != "1" {
		t.Errorf("select 1 = %q", out)
	}
}

func TestLocalPGConcurrentOpen(t *testing.T) {
	t.Parallel()
	dataDir := filepath.Join(pgTestDir(t), "pg")
	const n = 3
	pgs := make(chan *localPG, n)
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			p, err := openLocalPG(ctx, dataDir, nil)
			if err != nil {
				errs <- err
				return
			}
			pgs <- p
		}()
	}
	var owners int
	for i := 0; i < n; i++ {
		select {
		case err := <-errs:
			t.Errorf("openLocalPG: %v", err)
		case p := <-pgs:
			t.Cleanup(func() { p.stop() })
			if p.owned {
				owners++
			}
			mustPSQL(t, p, "select 1")
		}
	}
	if owners != 1 {
		t.Errorf("%d of %d concurrent opens started a server, want exactly 1", owners, n)
	}
}

func TestLocalPGUnreachableDir(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("only root runs the server as another user")
	}
	dir := pgTestDir(t)
	// The cluster's own parent is made traversable...
	secret := filepath.Join(dir, "secret")
	if err := os.Mkdir(secret, 0o700); err != nil {
		t.Fatal(err)
	}
	p := openPG(t, filepath.Join(secret, "pg"))
	mustPSQL(t, p, "select 1")
	if fi, err := os.Stat(secret); err != nil || fi.Mode().Perm() != 0o711 {
		t.Errorf("parent mode = %v, %v; want 0711", fi.Mode().Perm(), err)
	}
	// ...but a closed grandparent is reported, not changed.
	closed := filepath.Join(dir, "closed")
	if err := os.Mkdir(closed, 0o700); err != nil {
		t.Fatal(err)
	}
	_, err := openLocalPG(context.Background(), filepath.Join(closed, "sub", "pg"), nil)
	if err == nil || !strings.Contains(err.Error(), "cannot enter "+closed) {
		t.Errorf("openLocalPG under a closed directory: err = %v, want one naming %s", err, closed)
	}
}
