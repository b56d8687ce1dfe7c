// pg.go runs a private PostgreSQL cluster in a folder using the machine's
// own PostgreSQL binaries. It is its own file because it is a standalone
// concern: it knows nothing about agentline's schema, HTTP or MCP layers,
// only how to find initdb/pg_ctl, create a cluster, start or reuse a server
// listening on a private Unix socket, and stop it again.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// pgPort is the port number the private server uses; with TCP disabled it
// only names the socket file.
const pgPort = 5432

// pgSocketName is the file name of the server's Unix socket.
const pgSocketName = ".s.PGSQL.5432"

// pgMaxSocketPath is the longest socket path we put up with; the kernel
// limit (sun_path) is 108 bytes including the terminating NUL.
const pgMaxSocketPath = 100

// pgStartupWait bounds how long we wait for a server someone else is
// starting or stopping on the same folder, and for a crashed server's
// children to let go of its shared memory.
const pgStartupWait = 60 * time.Second

// localPG is a PostgreSQL cluster in a folder, listening only on a Unix socket.
type localPG struct {
	bin     string              // directory holding initdb, pg_ctl, postgres
	dataDir string              // absolute cluster directory
	realDir string              // dataDir with symlinks resolved
	sockDir string              // directory holding the Unix socket
	cred    *syscall.Credential // run server commands as this user; nil: as ourselves
	uid     int                 // owner for created dirs; -1 when not root
	gid     int
	logw    io.Writer

	mu      sync.Mutex
	owned   bool // this process started the server and stops it
	stopped bool
}

// findPGBin returns the directory holding initdb, pg_ctl and postgres: from
// PATH first, then the newest /usr/lib/postgresql/*/bin.
func findPGBin() (string, error) {
	if p, err := exec.LookPath("pg_ctl"); err == nil {
		if real, err := filepath.EvalSymlinks(p); err == nil {
			p = real
		}
		if dir := filepath.Dir(p); hasPGBinaries(dir) {
			return dir, nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool {
		return versionLess(filepath.Base(filepath.Dir(dirs[j])), filepath.Base(filepath.Dir(dirs[i])))
	})
	for _, dir := range dirs {
		if hasPGBinaries(dir) {
			return dir, nil
		}
	}
	return "", errors.New("findPGBin: no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or in /usr/lib/postgresql/*/bin: install PostgreSQL (e.g. `apt-get install postgresql`) or set DATABASE_URL to use an existing server")
}

// hasPGBinaries reports whether dir holds executable initdb, pg_ctl and postgres.
func hasPGBinaries(dir string) bool {
	for _, name := range []string{"initdb", "pg_ctl", "postgres"} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.IsDir() || fi.Mode().Perm()&0o111 == 0 {
			return false
		}
	}
	return true
}

// versionLess compares dotted numeric versions such as "9.6" and "15";
// non-numeric parts compare as strings.
func versionLess(a, b string) bool {
	as, bs := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; i < len(as) && i < len(bs); i++ {
		an, aerr := strconv.Atoi(as[i])
		bn, berr := strconv.Atoi(bs[i])
		switch {
		case aerr == nil && berr == nil && an != bn:
			return an < bn
		case (aerr != nil || berr != nil) && as[i] != bs[i]:
			return as[i] < bs[i]
		}
	}
	return len(as) < len(bs)
}

// openLocalPG makes sure a cluster exists in dataDir and that a server is
// running on it, reusing one another process already runs there.
func openLocalPG(ctx context.Context, dataDir string, logw io.Writer) (*localPG, error) {
	if logw == nil {
		logw = io.Discard
	}
	bin, err := findPGBin()
	if err != nil {
		return nil, fmt.Errorf("openLocalPG: %w", err)
	}
	abs, err := filepath.Abs(dataDir)
	if err != nil {
		return nil, fmt.Errorf("openLocalPG: %w", err)
	}
	p := &localPG{bin: bin, dataDir: abs, uid: -1, gid: -1, logw: logw}
	if err := p.setIdentity(); err != nil {
		return nil, fmt.Errorf("openLocalPG: %w", err)
	}
	if err := p.prepareDataDir(); err != nil {
		return nil, fmt.Errorf("openLocalPG: %w", err)
	}
	unlock, err := lockDir(ctx, p.dataDir)
	if err != nil {
		return nil, fmt.Errorf("openLocalPG: %w", err)
	}
	defer unlock()
	if err := p.prepareSockDir(); err != nil {
		return nil, fmt.Errorf("openLocalPG: %w", err)
	}
	if err := p.initdb(ctx); err != nil {
		return nil, fmt.Errorf("openLocalPG: %w", err)
	}
	for _, d := range []string{filepath.Join(p.dataDir, "log"), p.sockDir} {
		if err := p.mkdirOwned(d); err != nil {
			return nil, fmt.Errorf("openLocalPG: %w", err)
		}
	}
	if err := p.ensureRunning(ctx); err != nil {
		return nil, fmt.Errorf("openLocalPG: %w", err)
	}
	return p, nil
}

// dsn returns a lib/pq key=value connection string for database dbname over the socket.
func (p *localPG) dsn(dbname string) string {
	return fmt.Sprintf("host=%s port=%d user=postgres dbname=%s sslmode=disable",
		dsnQuote(p.sockDir), pgPort, dsnQuote(dbname))
}

// dsnQuote quotes a key=value connection string value when it needs it.
func dsnQuote(v string) string {
	if v != "" && !strings.ContainsAny(v, " \t\n\r'\\") {
		return v
	}
	v = strings.ReplaceAll(v, `\`, `\\`)
	v = strings.ReplaceAll(v, `'`, `\'`)
	return "'" + v + "'"
}

// stop stops the server if this process started it, else does nothing.
// It is safe to call more than once.
func (p *localPG) stop() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped || !p.owned {
		p.stopped = true
		return nil
	}
	p.stopped = true
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	fmt.Fprintf(p.logw, "stopping PostgreSQL in %s\n", p.dataDir)
	err := p.run(ctx, "pg_ctl", "stop", "-D", p.dataDir, "-m", "fast", "-w", "-t", "90")
	if err == nil {
		return nil
	}
	// Already gone (someone else stopped it) is not an error.
	status := p.command(ctx, "pg_ctl", "status", "-D", p.dataDir)
	var exit *exec.ExitError
	if serr := status.Run(); errors.As(serr, &exit) && exit.ExitCode() == 3 {
		return nil
	}
	return fmt.Errorf("stop: %w", err)
}

// setIdentity decides which OS user runs the server: ourselves, or the
// "postgres" user when we are root, since PostgreSQL refuses to run as root.
func (p *localPG) setIdentity() error {
	if os.Geteuid() != 0 {
		return nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return fmt.Errorf("setIdentity: PostgreSQL refuses to run as root and there is no OS user \"postgres\" to run it as (%w): create one (e.g. `useradd --system --home-dir /var/lib/postgresql postgres`), run agentline as a non-root user, or set DATABASE_URL", err)
	}
	uid, err := strconv.Atoi(u.Uid)
	if err != nil {
		return fmt.Errorf("setIdentity: uid of postgres: %w", err)
	}
	gid, err := strconv.Atoi(u.Gid)
	if err != nil {
		return fmt.Errorf("setIdentity: gid of postgres: %w", err)
	}
	if uid == 0 {
		return errors.New("setIdentity: OS user \"postgres\" has uid 0, and PostgreSQL refuses to run as root")
	}
	p.uid, p.gid = uid, gid
	p.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{uint32(gid)}}
	return nil
}

// prepareDataDir creates the cluster directory, owned by the server user,
// and checks that the server user can reach it.
func (p *localPG) prepareDataDir() error {
	parent := filepath.Dir(p.dataDir)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return fmt.Errorf("prepareDataDir: %w", err)
	}
	if p.cred != nil {
		if err := p.makeTraversable(parent); err != nil {
			return fmt.Errorf("prepareDataDir: %w", err)
		}
	}
	if err := os.Mkdir(p.dataDir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("prepareDataDir: %w", err)
	}
	fi, err := os.Stat(p.dataDir)
	if err != nil {
		return fmt.Errorf("prepareDataDir: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("prepareDataDir: %s is not a directory", p.dataDir)
	}
	if p.cred != nil {
		if owner := fileUID(fi); owner != p.uid {
			entries, err := os.ReadDir(p.dataDir)
			if err != nil {
				return fmt.Errorf("prepareDataDir: %w", err)
			}
			if len(entries) > 0 {
				return fmt.Errorf("prepareDataDir: %s is not empty and is owned by uid %d, not by the postgres user (uid %d)", p.dataDir, owner, p.uid)
			}
			if err := os.Chown(p.dataDir, p.uid, p.gid); err != nil {
				return fmt.Errorf("prepareDataDir: %w", err)
			}
			if err := os.Chmod(p.dataDir, 0o700); err != nil {
				return fmt.Errorf("prepareDataDir: %w", err)
			}
		}
	}
	if p.realDir, err = filepath.EvalSymlinks(p.dataDir); err != nil {
		return fmt.Errorf("prepareDataDir: %w", err)
	}
	if p.cred != nil {
		if err := p.checkReachable(filepath.Dir(p.realDir)); err != nil {
			return fmt.Errorf("prepareDataDir: %w", err)
		}
	}
	return nil
}

// makeTraversable gives others search (x) permission on dir, which we own,
// so the postgres user can reach the cluster inside it without listing it.
func (p *localPG) makeTraversable(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("makeTraversable: %w", err)
	}
	if p.canTraverse(fi) || fileUID(fi) != os.Geteuid() {
		return nil
	}
	mode := fi.Mode().Perm() | 0o011
	if err := os.Chmod(dir, mode); err != nil {
		return fmt.Errorf("makeTraversable: %w", err)
	}
	fmt.Fprintf(p.logw, "made %s traversable (mode %04o) for the postgres user\n", dir, mode)
	return nil
}

// canTraverse reports whether the server user may search the directory fi.
func (p *localPG) canTraverse(fi fs.FileInfo) bool {
	perm := fi.Mode().Perm()
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case !ok:
		return true
	case int(st.Uid) == p.uid:
		return perm&0o100 != 0
	case int(st.Gid) == p.gid:
		return perm&0o010 != 0
	default:
		return perm&0o001 != 0
	}
}

// checkReachable fails if the server user cannot search dir and each of its parents.
func (p *localPG) checkReachable(dir string) error {
	for d := dir; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil {
			return fmt.Errorf("checkReachable: %w", err)
		}
		if !p.canTraverse(fi) {
			return fmt.Errorf("checkReachable: the postgres user (uid %d) cannot enter %s (mode %04o), so it cannot reach %s: allow it (e.g. `chmod o+x %s`) or put the data directory elsewhere", p.uid, d, fi.Mode().Perm(), p.dataDir, d)
		}
		if d == filepath.Dir(d) {
			return nil
		}
	}
}

// fileUID returns the owner of fi, or -1 if unknown.
func fileUID(fi fs.FileInfo) int {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return int(st.Uid)
	}
	return -1
}

// mkdirOwned creates dir (mode 0700) if missing and hands it to the server user.
func (p *localPG) mkdirOwned(dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("mkdirOwned: %w", err)
	}
	if p.cred != nil {
		if err := os.Lchown(dir, p.uid, p.gid); err != nil {
			return fmt.Errorf("mkdirOwned: %w", err)
		}
	}
	return nil
}

// socketDirFor returns the socket directory for the cluster in absDataDir:
// absDataDir/run, or, when that socket path would be too long, a short
// directory in the temp dir named after absDataDir.
func socketDirFor(absDataDir string) string {
	dir := filepath.Join(absDataDir, "run")
	if len(filepath.Join(dir, pgSocketName)) <= pgMaxSocketPath {
		return dir
	}
	sum := sha256.Sum256([]byte(absDataDir))
	name := "agentline-" + hex.EncodeToString(sum[:])[:12]
	dir = filepath.Join(os.TempDir(), name)
	if len(filepath.Join(dir, pgSocketName)) > pgMaxSocketPath {
		dir = filepath.Join("/tmp", name)
	}
	return dir
}

// prepareSockDir picks the socket directory and, if it lives in the shared
// temp dir, creates it now as a private directory of the server user.
// The default one inside the cluster is created after initdb, which wants
// an empty directory.
func (p *localPG) prepareSockDir() error {
	p.sockDir = socketDirFor(p.dataDir)
	if p.sockDir == filepath.Join(p.dataDir, "run") {
		return nil
	}
	if err := os.Mkdir(p.sockDir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("prepareSockDir: %w", err)
	}
	fi, err := os.Lstat(p.sockDir)
	if err != nil {
		return fmt.Errorf("prepareSockDir: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("prepareSockDir: %s exists and is not a directory", p.sockDir)
	}
	owner, me := fileUID(fi), os.Geteuid()
	want := me
	if p.cred != nil {
		want = p.uid
	}
	if owner != me && owner != want {
		return fmt.Errorf("prepareSockDir: %s belongs to uid %d, not to us: remove it", p.sockDir, owner)
	}
	if err := os.Chmod(p.sockDir, 0o700); err != nil {
		return fmt.Errorf("prepareSockDir: %w", err)
	}
	if p.cred != nil {
		if err := os.Lchown(p.sockDir, p.uid, p.gid); err != nil {
			return fmt.Errorf("prepareSockDir: %w", err)
		}
		if err := p.checkReachable(filepath.Dir(p.sockDir)); err != nil {
			return fmt.Errorf("prepareSockDir: %w", err)
		}
	}
	return nil
}

// initdb creates the cluster unless dataDir already holds one.
func (p *localPG) initdb(ctx context.Context) error {
	if _, err := os.Stat(filepath.Join(p.dataDir, "PG_VERSION")); err == nil {
		return nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("initdb: %w", err)
	}
	fmt.Fprintf(p.logw, "initialising PostgreSQL in %s\n", p.dataDir)
	// trust is safe here because the server listens on no TCP port, only on
	// a socket of mode 0700 in a folder of its own: the only ones who can
	// connect are its own OS user and root, who could read the files anyway.
	if err := p.run(ctx, "initdb", "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C", "-D", p.dataDir); err != nil {
		return fmt.Errorf("initdb: %w", err)
	}
	return nil
}

// pidFile is what we read from postmaster.pid.
type pidFile struct {
	pid     int
	sockDir string
	status  string // "starting", "stopping", "ready" or "standby"
}

// readPidFile reads dataDir/postmaster.pid; ok is false if there is none.
func (p *localPG) readPidFile() (pf pidFile, ok bool, err error) {
	b, err := os.ReadFile(filepath.Join(p.dataDir, "postmaster.pid"))
	if errors.Is(err, fs.ErrNotExist) {
		return pf, false, nil
	}
	if err != nil {
		return pf, false, fmt.Errorf("readPidFile: %w", err)
	}
	lines := strings.Split(string(b), "\n")
	field := func(i int) string {
		if i < len(lines) {
			return strings.TrimSpace(lines[i])
		}
		return ""
	}
	pf.pid, _ = strconv.Atoi(field(0))
	if pf.pid < 0 {
		pf.pid = -pf.pid
	}
	pf.sockDir, pf.status = field(4), field(7)
	return pf, true, nil
}

// postmasterAlive reports whether pid is a live postmaster of our cluster.
// A postmaster's working directory is its data directory, which tells a
// live server from a dead one whose pid was reused, or a zombie.
func (p *localPG) postmasterAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	if _, err := os.Stat("/proc/self/cwd"); err != nil {
		// No /proc: all we can ask is whether the pid exists.
		err := syscall.Kill(pid, 0)
		return err == nil || errors.Is(err, syscall.EPERM)
	}
	cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
	if err == nil {
		return cwd == p.realDir
	}
	if errors.Is(err, fs.ErrNotExist) {
		return false
	}
	// Not allowed to look (another user's process): trust its name.
	comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return false
	}
	name := strings.TrimSpace(string(comm))
	return name == "postgres" || name == "postmaster"
}

// socketAccepts reports whether the server socket takes connections.
func (p *localPG) socketAccepts() bool {
	c, err := net.DialTimeout("unix", filepath.Join(p.sockDir, pgSocketName), time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// serverState is what we found on the cluster folder.
type serverState int

const (
	serverDown  serverState = iota // no server: start one
	serverReady                    // a server is up on our socket: reuse it
	serverBusy                     // a server is starting or stopping: wait
)

// probe looks at postmaster.pid and the socket; it removes a stale pid file.
func (p *localPG) probe() (serverState, error) {
	pf, ok, err := p.readPidFile()
	if err != nil {
		return serverDown, fmt.Errorf("probe: %w", err)
	}
	if !ok {
		return serverDown, nil
	}
	if !p.postmasterAlive(pf.pid) {
		fmt.Fprintf(p.logw, "removing stale postmaster.pid (pid %d is not a running server)\n", pf.pid)
		if err := os.Remove(filepath.Join(p.dataDir, "postmaster.pid")); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return serverDown, fmt.Errorf("probe: %w", err)
		}
		// Our private socket dir: the old socket and its lock are leftovers too.
		for _, name := range []string{pgSocketName, pgSocketName + ".lock"} {
			if err := os.Remove(filepath.Join(p.sockDir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return serverDown, fmt.Errorf("probe: %w", err)
			}
		}
		return serverDown, nil
	}
	if pf.status == "ready" && pf.sockDir != "" && pf.sockDir != p.sockDir {
		return serverDown, fmt.Errorf("probe: PostgreSQL (pid %d) is already running on %s but with its socket in %s, not %s: stop it (pg_ctl stop -D %s)", pf.pid, p.dataDir, pf.sockDir, p.sockDir, p.dataDir)
	}
	if pf.status == "ready" && p.socketAccepts() {
		return serverReady, nil
	}
	return serverBusy, nil
}

// waitSettled probes until the server is ready or gone.
func (p *localPG) waitSettled(ctx context.Context) (serverState, error) {
	deadline := time.Now().Add(pgStartupWait)
	for {
		st, err := p.probe()
		if err != nil || st != serverBusy {
			return st, err
		}
		if time.Now().After(deadline) {
			return st, fmt.Errorf("waitSettled: a PostgreSQL server is running on %s but has not accepted connections at %s for %v (see %s)", p.dataDir, p.sockDir, pgStartupWait, p.logFile())
		}
		select {
		case <-ctx.Done():
			return st, fmt.Errorf("waitSettled: %w", ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// logFile is where the server writes its log.
func (p *localPG) logFile() string {
	return filepath.Join(p.dataDir, "log", "postgres.log")
}

// ensureRunning reuses a server already running on the cluster, or starts one.
func (p *localPG) ensureRunning(ctx context.Context) error {
	st, err := p.waitSettled(ctx)
	if err != nil {
		return fmt.Errorf("ensureRunning: %w", err)
	}
	if st == serverReady {
		fmt.Fprintf(p.logw, "using the PostgreSQL server already running in %s\n", p.dataDir)
		return nil
	}
	fmt.Fprintf(p.logw, "starting PostgreSQL in %s (socket in %s)\n", p.dataDir, p.sockDir)
	deadline := time.Now().Add(pgStartupWait)
	for {
		logStart := fileSize(p.logFile())
		err := p.start(ctx)
		if err == nil {
			p.owned = true
			return nil
		}
		// Someone else may have won a race to start it.
		if st, perr := p.probe(); perr == nil && st != serverDown {
			if st, werr := p.waitSettled(ctx); werr == nil && st == serverReady {
				fmt.Fprintf(p.logw, "using the PostgreSQL server already running in %s\n", p.dataDir)
				return nil
			}
		}
		tail := readFrom(p.logFile(), logStart)
		// After a crash, the dead server's children may still hold its shared memory for a moment.
		if strings.Contains(tail, "still in use") && time.Now().Before(deadline) && ctx.Err() == nil {
			time.Sleep(250 * time.Millisecond)
			continue
		}
		if tail = strings.TrimSpace(tail); tail != "" {
			return fmt.Errorf("ensureRunning: %w; server log:\n%s", err, tail)
		}
		return fmt.Errorf("ensureRunning: %w (see %s)", err, p.logFile())
	}
}

// start runs pg_ctl start with our socket-only settings.
func (p *localPG) start(ctx context.Context) error {
	opts := strings.Join([]string{
		"-c", "listen_addresses=",
		"-c", "port=" + strconv.Itoa(pgPort),
		"-c", shellQuote("unix_socket_directories=" + `"` + strings.ReplaceAll(p.sockDir, `"`, `""`) + `"`),
		// Only the socket's owner (the server's user) may connect; root, which
		// runs the server as the postgres user, passes any file mode.
		"-c", "unix_socket_permissions=0700",
		"-c", "max_connections=200",
	}, " ")
	if err := p.run(ctx, "pg_ctl", "start", "-w", "-t", "120", "-D", p.dataDir, "-l", p.logFile(), "-o", opts); err != nil {
		return fmt.Errorf("start: %w", err)
	}
	return nil
}

// shellQuote quotes s for /bin/sh, which pg_ctl passes the -o options through.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// fileSize returns the size of the file at path, or 0.
func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// readFrom returns the file at path from offset on, at most its last 4 KiB.
func readFrom(path string, offset int64) string {
	b, err := os.ReadFile(path)
	if err != nil || offset > int64(len(b)) {
		return ""
	}
	b = b[offset:]
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	return string(b)
}

// command builds a command from the PostgreSQL bin dir, run as the server
// user, from "/" (our own working directory may be closed to that user) and
// without PG* variables that could point it elsewhere.
func (p *localPG) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, filepath.Join(p.bin, name), args...)
	cmd.Dir = "/"
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PG") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	if p.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred}
	}
	return cmd
}

// run runs a PostgreSQL program, putting its output in the error if it fails.
func (p *localPG) run(ctx context.Context, name string, args ...string) error {
	out, err := p.command(ctx, name, args...).CombinedOutput()
	if err != nil {
		if msg := strings.TrimSpace(string(out)); msg != "" {
			return fmt.Errorf("%s: %w: %s", name, err, msg)
		}
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// lockDir takes an exclusive flock on dir, so that processes opening the
// same cluster at once take turns; the returned func releases it.
func lockDir(ctx context.Context, dir string) (func(), error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("lockDir: %w", err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() {
				syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
				f.Close()
			}, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lockDir: %w", err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lockDir: %w", ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}
