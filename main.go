// Command agentline is the server AI coding agents talk to while they work:
// they log steps, ask a person questions and wait for the answer, pick up
// feedback and end their sessions, over MCP and a REST API.
package main

import (
	"cmp"
	"context"
	"crypto"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/lib/pq"
)

func main() {
	if err := run(context.Background(), os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "agentline:", err)
		os.Exit(1)
	}
}

// config is everything agentline reads from its environment.
type config struct {
	databaseURL     string // empty: run the embedded PostgreSQL in dataDir
	dataDir         string
	port            string
	publicKey       string // PEM text or a path
	privateKey      string
	questionTimeout time.Duration
	callLimit       time.Duration // 0: an ask_question call waits up to questionTimeout
	keyRecheck      time.Duration // how often a long-lived connection's key is checked again
	// notifications (issue 11)
	publicURL          string    // PUBLIC_URL: where people reach the inbox, for links ("" until serve knows the port)
	notifyAllowPrivate bool      // NOTIFY_ALLOW_PRIVATE=1: channels may reach private addresses
	rateLimit          rateLimit // issue 13: per key, per replica; zero is off
	metricsAddr        string    // issue 13: METRICS_ADDR; empty: no metrics listener
	// issue 13: DATABASE_LISTEN_URL, a direct connection for LISTEN only
	// (DATABASE_URL may then be a transaction pooler); empty: DATABASE_URL.
	databaseListenURL string
	hookWait          time.Duration // issue 15: HOOK_WAIT, how long a PermissionRequest hook waits for the person
}

// loadConfig reads and checks the environment; a value that does not parse
// stops start-up with a message naming the variable.
func loadConfig(getenv func(string) string) (config, error) {
	c := config{
		databaseURL: getenv("DATABASE_URL"),
		dataDir:     getenv("AGENTLINE_DATA"),
		port:        getenv("MCP_SERVER_PORT"),
		publicKey:   getenv("JWT_PUBLIC_KEY"),
		privateKey:  getenv("JWT_PRIVATE_KEY"),
	}
	if c.dataDir == "" {
		c.dataDir = "agentline-data"
	}
	if c.port == "" {
		c.port = "8080"
	}
	if p, err := strconv.Atoi(c.port); err != nil || p < 0 || p > 65535 {
		return c, fmt.Errorf("MCP_SERVER_PORT=%q: want a port number", c.port)
	}
	var err error
	if c.questionTimeout, err = durationEnv(getenv, "QUESTION_TIMEOUT", 24*time.Hour); err != nil {
		return c, err
	}
	if c.questionTimeout <= 0 {
		return c, errors.New("QUESTION_TIMEOUT must be positive")
	}
	if c.callLimit, err = durationEnv(getenv, "ASK_QUESTION_CALL_LIMIT", 280*time.Second); err != nil {
		return c, err
	}
	if c.callLimit < 0 {
		return c, errors.New("ASK_QUESTION_CALL_LIMIT must not be negative")
	}
	if c.keyRecheck, err = durationEnv(getenv, "KEY_RECHECK", time.Minute); err != nil {
		return c, err
	}
	if c.keyRecheck <= 0 || c.keyRecheck > time.Minute {
		// A revoked key must not keep a connection open for longer.
		return c, errors.New("KEY_RECHECK must be positive and at most 1m")
	}
	if c.hookWait, err = durationEnv(getenv, "HOOK_WAIT", 280*time.Second); err != nil { // issue 15
		return c, err
	}
	if c.hookWait <= 0 || c.hookWait > maxHookWait {
		// At or near the PermissionRequest hook's timeout (300 s in the
		// README's settings) Claude Code gives up first and never reads the
		// decision: refused rather than run unsafely.
		return c, fmt.Errorf("HOOK_WAIT must be positive and at most %s (below the 300 s timeout of the PermissionRequest hook in Claude Code's settings)", maxHookWait)
	}
	if err := loadNotifyConfig(getenv, &c); err != nil { // notifications (issue 11)
		return c, err
	}
	if err := loadOpsConfig(&c, getenv); err != nil { // issue 13
		return c, err
	}
	return c, nil
}

// durationEnv parses a Go duration ("90s", "24h") or a plain number of seconds.
func durationEnv(getenv func(string) string, name string, def time.Duration) (time.Duration, error) {
	v := strings.TrimSpace(getenv(name))
	if v == "" {
		return def, nil
	}
	if secs, err := strconv.ParseFloat(v, 64); err == nil {
		return time.Duration(secs * float64(time.Second)), nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return 0, fmt.Errorf("%s=%q: want a duration like 90s or 24h, or a number of seconds", name, v)
	}
	return d, nil
}

const usage = `usage:
  agentline [serve]                 run the server
  agentline migrate                 apply the schema and exit
  agentline keygen -dir D           write an Ed25519 key pair to D
  agentline token -user EMAIL [-name N] [-ttl 720h] [-scope agent|person]
                                    register a new API key and print it
  agentline revoke KEY_OR_ID        revoke an API key
  agentline keys -user EMAIL        list a user's API keys (never the keys themselves)
  agentline notify add|list|remove|test …
                                    manage notification channels (agentline notify for help)`

// run is agentline: main with its outside world passed in.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(stderr, nil))
	cmd, rest := "serve", []string(nil)
	if len(args) > 1 {
		cmd, rest = args[1], args[2:]
	}
	if cmd == "keygen" {
		return runKeygen(rest, stdout)
	}
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	switch cmd {
	case "serve":
		return serve(ctx, cfg, log, stdout, stderr)
	case "migrate":
		_, _, closeDB, err := openStore(ctx, cfg, stderr)
		if err != nil {
			return err
		}
		closeDB()
		fmt.Fprintln(stderr, "schema applied")
		return nil
	case "token":
		return runToken(ctx, cfg, rest, stdout, stderr)
	case "revoke":
		return runRevoke(ctx, cfg, rest, stderr)
	case "notify": // notifications (issue 11)
		return runNotify(ctx, cfg, rest, stdout, stderr)
	case "keys": // issue 13
		return runKeys(ctx, cfg, rest, stdout, stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprintln(stdout, usage)
		return nil
	default:
		return fmt.Errorf("unknown command %q\n%s", cmd, usage)
	}
}

func runKeygen(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("keygen", flag.ContinueOnError)
	dir := fs.String("dir", "", "folder for jwt-private.pem and jwt-public.pem")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" {
		return errors.New("keygen: -dir is required")
	}
	if err := keygen(*dir); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s (keep it secret) and %s\n", filepath.Join(*dir, "jwt-private.pem"), filepath.Join(*dir, "jwt-public.pem"))
	return nil
}

func runToken(ctx context.Context, cfg config, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("token", flag.ContinueOnError)
	fs.SetOutput(stderr)
	email := fs.String("user", "", "the user's email (created if new)")
	name := fs.String("name", "", "a name for the key")
	ttl := fs.Duration("ttl", 0, "lifetime of the key, e.g. 720h (default: no expiry)")
	scope := fs.String("scope", scopeAgent, "agent (write) or person (write and read)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *email == "" || !strings.Contains(*email, "@") {
		return errors.New("token: -user EMAIL is required")
	}
	if *scope != scopeAgent && *scope != scopePerson {
		return fmt.Errorf("token: -scope must be %s or %s", scopeAgent, scopePerson)
	}
	if *ttl < 0 {
		return errors.New("token: -ttl must not be negative")
	}
	signer, err := tokenSigner(cfg)
	if err != nil {
		return err
	}
	st, _, closeDB, err := openStore(ctx, cfg, stderr)
	if err != nil {
		return err
	}
	defer closeDB()
	tok, err := issueKey(ctx, st, signer, *email, *name, *scope, *ttl)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, tok)
	return nil
}

// issueKey creates the user if new, signs a key and registers it.
func issueKey(ctx context.Context, st *store, signer crypto.Signer, email, name, scope string, ttl time.Duration) (string, error) {
	userID, err := st.ensureUser(ctx, email)
	if err != nil {
		return "", err
	}
	tok, exp, err := signToken(signer, userID, ttl, time.Now())
	if err != nil {
		return "", err
	}
	if _, err := st.addAPIKey(ctx, userID, name, hashToken(tok), scope, exp); err != nil {
		return "", err
	}
	return tok, nil
}

// tokenSigner is JWT_PRIVATE_KEY, or in embedded mode the pair in the data
// folder.
func tokenSigner(cfg config) (crypto.Signer, error) {
	if cfg.privateKey != "" {
		return loadPrivateKey(cfg.privateKey)
	}
	if cfg.databaseURL != "" {
		return nil, errors.New("JWT_PRIVATE_KEY is not set: point it at jwt-private.pem from `agentline keygen`")
	}
	path := filepath.Join(cfg.dataDir, "jwt-private.pem")
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("no key pair in %s yet: start the server once (`agentline`) or set JWT_PRIVATE_KEY", cfg.dataDir)
	}
	return loadPrivateKey(path)
}

func runRevoke(ctx context.Context, cfg config, args []string, stderr io.Writer) error {
	if len(args) != 1 || args[0] == "" {
		return errors.New("usage: agentline revoke KEY_OR_ID")
	}
	target := strings.TrimSpace(args[0])
	if _, isID := parseUUID(target); !isID {
		target = hashToken(target) // a whole key: find it by its hash
	}
	st, _, closeDB, err := openStore(ctx, cfg, stderr)
	if err != nil {
		return err
	}
	defer closeDB()
	if err := st.revokeAPIKey(ctx, target); err != nil {
		if errors.Is(err, errNotFound) {
			return errors.New("revoke: no such key")
		}
		return err
	}
	fmt.Fprintln(stderr, "key revoked")
	return nil
}

// openStore connects to DATABASE_URL, or starts (or reuses) the embedded
// PostgreSQL in the data folder, and applies the schema. It returns the DSN
// for the hub's listener and a function that closes the pool and stops a
// PostgreSQL it started.
func openStore(ctx context.Context, cfg config, logw io.Writer) (*store, string, func(), error) {
	dsn := cfg.pooledDSN()
	var pg *localPG
	if dsn == "" {
		if err := os.MkdirAll(cfg.dataDir, 0o711); err != nil {
			return nil, "", nil, fmt.Errorf("data folder: %w", err)
		}
		var err error
		pg, err = openLocalPG(ctx, filepath.Join(cfg.dataDir, "pg"), logw)
		if err != nil {
			return nil, "", nil, err
		}
		if err := createDatabase(ctx, pg.dsn("postgres"), "agentline"); err != nil {
			pg.stop()
			return nil, "", nil, err
		}
		dsn = pg.dsn("agentline")
	}
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		if pg != nil {
			pg.stop()
		}
		return nil, "", nil, fmt.Errorf("DATABASE_URL: %w", err)
	}
	db.SetMaxOpenConns(40)
	db.SetMaxIdleConns(40)
	db.SetConnMaxIdleTime(5 * time.Minute)
	closeDB := func() {
		db.Close()
		if pg != nil {
			if err := pg.stop(); err != nil {
				fmt.Fprintln(logw, "stopping PostgreSQL:", err)
			}
		}
	}
	if err := migrate(ctx, db); err != nil {
		closeDB()
		return nil, "", nil, err
	}
	return &store{db: db}, dsn, closeDB, nil
}

// createDatabase creates database name unless it exists.
func createDatabase(ctx context.Context, adminDSN, name string) error {
	db, err := sql.Open("postgres", adminDSN)
	if err != nil {
		return err
	}
	defer db.Close()
	_, err = db.ExecContext(ctx, `CREATE DATABASE `+pq.QuoteIdentifier(name))
	var pqErr *pq.Error
	if errors.As(err, &pqErr) && pqErr.Code == "42P04" { // duplicate_database
		return nil
	}
	if err != nil {
		return fmt.Errorf("create database %s: %w", name, err)
	}
	return nil
}

// app is the running service: what every handler needs.
type app struct {
	store    *store
	hub      *hub
	keys     *keyWatch
	verifier *verifier
	log      *slog.Logger
	cfg      config
	stopping context.Context // done when the server begins to shut down
	mcp      *mcpServer
	notify   *notifier // notifications (issue 11)
	// progressEvery overrides how often ask_question reports progress
	// (tests shorten it); zero means the default.
	progressEvery time.Duration
	// eventsKeepalive overrides how often the event stream sends a comment
	// line (tests shorten it); zero means the default.
	eventsKeepalive time.Duration
	// hubCheckEvery overrides how often the wait hub checks itself (tests);
	// zero means hubCheckEvery.
	hubCheckEvery time.Duration
	ops           opsState // issue 13: rate limits and metrics
}

// newApp builds the service over st and h (opts adjust it first: tests) and
// starts its background work; stop begins its shutdown (waits end, streams
// close, background work stops).
func newApp(st *store, h *hub, keys []publicKey, cfg config, log *slog.Logger, opts ...func(*app)) (a *app, stop func()) {
	stopping, stop := context.WithCancel(context.Background())
	a = &app{store: st, hub: h, log: log, cfg: cfg, stopping: stopping,
		keys:     newKeyWatch(st, log),
		verifier: &verifier{keys: keys, store: st, log: log, now: time.Now}}
	for _, o := range opts {
		o(a)
	}
	a.mcp = newMCPServer(a)
	go a.keys.run(stopping, a.cfg.keyRecheck)
	go h.watch(stopping, cmp.Or(a.hubCheckEvery, hubCheckEvery), func(ctx context.Context, payload string) error {
		return st.pgNotify(ctx, notifyChannel, payload)
	})
	return a, stop
}

// route is one registration of routes(): a ServeMux pattern and its handler.
type route struct {
	pattern string
	h       http.Handler
}

// routeTable is the whole HTTP surface of agentline, one line a route
// (openapi_test.go walks it against openapi.json).
func (a *app) routeTable() []route {
	auth := func(h http.Handler) http.Handler { return requireKey(a.verifier, a.limitKey(h)) }
	person := func(h http.Handler) http.Handler { return auth(requirePerson(h)) }
	page := a.handlePage()
	return []route{
		{"GET /health", a.handleHealth()},
		{"GET /api/v1/openapi.json", a.handleOpenAPI()}, // no key: it describes, it holds no data
		{"POST /api/v1/messages/agent", auth(a.handleAgentMessage())},
		{"POST /api/v1/messages/user", auth(a.handleUserMessage())},
		{"GET /api/v1/messages/pending", auth(a.handlePending())},
		{"PATCH /api/v1/messages/{message_id}/request-input", auth(a.handleRequestInput())},
		{"POST /api/v1/sessions/end", auth(a.handleEndSession())},

		{"GET /api/v1/sessions", person(a.handleSessions())},
		{"GET /api/v1/sessions/{id}/messages", person(a.handleSessionMessages())},
		{"GET /api/v1/events", person(a.handleEvents())},
		{"GET /api/v1/keys", person(a.handleListKeys())},
		{"DELETE /api/v1/keys/{id}", person(a.handleRevokeKey())},
		{"POST /api/v1/questions/{id}/answer", person(a.handleAnswer())},
		{"POST /api/v1/act/{capability}", a.handleAct(newLimiter(actRate, nil))}, // the capability is the credential
		{"POST /api/v1/hooks/claude-code", auth(a.handleClaudeCodeHook())},       // issue 15: Claude Code's http hooks
		{"GET /api/v1/presence", person(a.handleGetPresence())},
		{"PUT /api/v1/presence", person(a.handlePutPresence())},
		{"GET /api/v1/notification-channels", person(a.handleListChannels())},
		{"POST /api/v1/notification-channels", person(a.handleCreateChannel())},
		{"DELETE /api/v1/notification-channels/{id}", person(a.handleDeleteChannel())},
		{"POST /api/v1/notification-channels/{id}/test", person(a.handleTestChannel())},
		{"GET /{$}", page}, // the inbox page: no auth, it holds no data
		{"GET /app.js", page},
		{"GET /app.css", page},

		{"/mcp", auth(a.mcp.streamable)},
		{"/mcp/", auth(a.mcp.streamable)},
		{"/mcp/sse", auth(a.mcp.sse)},

		{"/api/", a.handleNoRoute()},
	}
}

// routes is the HTTP handler of agentline: routeTable on a ServeMux.
func (a *app) routes() http.Handler {
	mux := http.NewServeMux()
	for _, rt := range a.routeTable() {
		mux.Handle(rt.pattern, rt.h)
	}
	return a.instrument(mux) // request metrics
}

func (a *app) handleNoRoute() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, errorBody{"no such endpoint"})
	}
}

// serve runs the server until ctx ends, then shuts down: in-flight requests
// finish, waits end with a clean error, the embedded PostgreSQL stops.
func serve(ctx context.Context, cfg config, log *slog.Logger, stdout, stderr io.Writer) error {
	embedded := cfg.databaseURL == ""
	firstRun := false
	if cfg.publicKey == "" {
		if !embedded {
			return errors.New("DATABASE_URL is set but JWT_PUBLIC_KEY is not: run `agentline keygen -dir DIR` and set JWT_PUBLIC_KEY=DIR/jwt-public.pem (and JWT_PRIVATE_KEY for `agentline token`)")
		}
		var err error
		if firstRun, err = ensureLocalKeys(cfg.dataDir); err != nil {
			return err
		}
		cfg.publicKey = filepath.Join(cfg.dataDir, "jwt-public.pem")
	}
	keys, err := loadPublicKeys(cfg.publicKey)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", ":"+cfg.port)
	if err != nil {
		return fmt.Errorf("listen on port %s: %w", cfg.port, err)
	}
	defer ln.Close()

	st, dsn, closeDB, err := openStore(ctx, cfg, stderr)
	if err != nil {
		return err
	}
	defer closeDB()
	if err := probeListen(ctx, st, cfg.listenDSN(dsn), cfg.databaseListenURL != ""); err != nil {
		return err
	}
	h, err := newHub(ctx, cfg.listenDSN(dsn), log)
	if err != nil {
		return err
	}
	defer h.close()

	a, beginStop := newApp(st, h, keys, cfg, log)
	defer beginStop()
	stopMetrics, err := a.serveMetrics(cfg.metricsAddr, log)
	if err != nil {
		return err
	}
	defer stopMetrics()
	srv := newHTTPServer(a.routes(), log)
	port := ln.Addr().(*net.TCPAddr).Port
	a.notify = startNotifier(a, port) // notifications (issue 11)
	defer a.notify.stop()
	if firstRun {
		if err := printFirstRun(ctx, st, cfg, port, stdout); err != nil {
			return err
		}
	}
	log.Info("agentline listening", "addr", ln.Addr().String(), "embedded_postgres", embedded)

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down")
	beginStop() // waits answer now; plain requests finish below
	shutCtx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutCtx); err != nil {
		srv.Close()
	}
	return nil
}

// newHTTPServer is the http.Server serve runs (tests build theirs with it
// too, so they meet the same limits).
func newHTTPServer(h http.Handler, log *slog.Logger) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
		// Bounds what one request's headers cost us; an oversized
		// Authorization header gets a 431 before any handler runs.
		MaxHeaderBytes: 64 << 10,
		// No WriteTimeout: long-polls, questions and event streams
		// legitimately last minutes; each bounds itself.
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
}

// ensureLocalKeys makes sure the data folder has a key pair, and reports
// whether it had to make one (which makes this the first start).
func ensureLocalKeys(dir string) (bool, error) {
	if _, err := os.Stat(filepath.Join(dir, "jwt-private.pem")); err == nil {
		return false, nil
	}
	if err := keygen(dir); err != nil {
		return false, err
	}
	return true, nil
}

// localUser is the user the first start makes keys for.
const localUser = "me@localhost"

func printFirstRun(ctx context.Context, st *store, cfg config, port int, stdout io.Writer) error {
	signer, err := loadPrivateKey(filepath.Join(cfg.dataDir, "jwt-private.pem"))
	if err != nil {
		return err
	}
	agentKey, err := issueKey(ctx, st, signer, localUser, "first agent key", scopeAgent, 0)
	if err != nil {
		return err
	}
	personKey, err := issueKey(ctx, st, signer, localUser, "first person key", scopePerson, 0)
	if err != nil {
		return err
	}
	base := fmt.Sprintf("http://localhost:%d", port)
	fmt.Fprintf(stdout, `
agentline is ready (first start: this is printed once; keys are not stored in readable form).

Agent key for %s (give it to your agents):
  %s

Register agentline with Claude Code:
  claude mcp add --transport http agentline %s/mcp/ --header "Authorization: Bearer %s"

Inbox, to read and answer your agents: %s/
Person key to paste there (it can read your history; keep it to yourself):
  %s

More keys: agentline token -user %s [-scope person]

`, localUser, agentKey, base, agentKey, base, personKey, localUser)
	return nil
}
