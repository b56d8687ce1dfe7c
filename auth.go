package main

// auth.go is the whole JWT path, in the order a request meets it:
// loading keys (start-up refuses anything unsafe), verifying a bearer token,
// the middleware REST and MCP share, and minting keys for `agentline token`.

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// minRSABits: 512-bit RSA (what Omnara shipped) is factorable on rented
// hardware; 2048 is the floor every current guideline sets.
const minRSABits = 2048

// maxTokenLen bounds the work an attacker can make us do per request. Our
// own tokens are under 400 bytes.
const maxTokenLen = 4096

// ---- keys ----

// publicKey is one configured verification key.
type publicKey struct {
	key crypto.PublicKey // ed25519.PublicKey or *rsa.PublicKey
	alg string           // the one JWT algorithm this key verifies
	kid string           // fingerprint: first 16 hex digits of SHA-256 over its PKIX DER
}

// readKeyText returns v itself when it holds PEM text, else the contents of
// the file v names.
func readKeyText(v string) ([]byte, error) {
	if strings.Contains(v, "-----BEGIN") {
		return []byte(v), nil
	}
	b, err := os.ReadFile(v)
	if err != nil {
		// v is not repeated in the message: it may be a secret pasted into
		// the wrong variable, and start-up errors end up in logs.
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return nil, fmt.Errorf("neither PEM text nor a readable file (%v); shared HMAC secrets are not accepted: use a PEM key pair from `agentline keygen -dir DIR`", err)
	}
	return b, nil
}

// fingerprint names a public key in a token's kid header.
func fingerprint(pub crypto.PublicKey) string {
	der, _ := x509.MarshalPKIXPublicKey(pub)
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:8])
}

// checkKey returns the algorithm pinned to pub, or an error for any key type
// or size we refuse.
func checkKey(pub crypto.PublicKey) (string, error) {
	switch k := pub.(type) {
	case ed25519.PublicKey:
		return jwt.SigningMethodEdDSA.Alg(), nil
	case *rsa.PublicKey:
		if k.N.BitLen() < minRSABits {
			return "", fmt.Errorf("RSA key of %d bits: under %d bits is refused (512-bit RSA is factorable); run `agentline keygen` for an Ed25519 pair", k.N.BitLen(), minRSABits)
		}
		return jwt.SigningMethodRS256.Alg(), nil
	default:
		return "", fmt.Errorf("unsupported key type %T: use Ed25519 (`agentline keygen`) or RSA of %d bits or more", pub, minRSABits)
	}
}

// parsePublicKeys reads every PEM block of text as a public key. Several
// blocks mean rotation: a token verifies against any of them.
func parsePublicKeys(text []byte) ([]publicKey, error) {
	var keys []publicKey
	for {
		var block *pem.Block
		block, text = pem.Decode(text)
		if block == nil {
			break
		}
		var pub crypto.PublicKey
		var err error
		switch block.Type {
		case "PUBLIC KEY":
			pub, err = x509.ParsePKIXPublicKey(block.Bytes)
		case "RSA PUBLIC KEY":
			pub, err = x509.ParsePKCS1PublicKey(block.Bytes)
		default:
			if strings.Contains(block.Type, "PRIVATE") {
				// A private key where a public one belongs would put the
				// signing key on every server that only needs to verify.
				return nil, errors.New("holds a private key; give the public key (jwt-public.pem from `agentline keygen`)")
			}
			return nil, fmt.Errorf("PEM block %q is not a public key", block.Type)
		}
		if err != nil {
			return nil, fmt.Errorf("bad public key: %w", err)
		}
		alg, err := checkKey(pub)
		if err != nil {
			return nil, err
		}
		keys = append(keys, publicKey{key: pub, alg: alg, kid: fingerprint(pub)})
	}
	if len(keys) == 0 {
		// A file holding an HMAC secret ends up here: shared secrets are
		// refused, since every server that verifies could also mint keys.
		return nil, errors.New("no PEM public key found (shared HMAC secrets are not accepted); run `agentline keygen -dir DIR` and set JWT_PUBLIC_KEY=DIR/jwt-public.pem")
	}
	return keys, nil
}

// loadPublicKeys reads JWT_PUBLIC_KEY's value (PEM text or a file path).
func loadPublicKeys(v string) ([]publicKey, error) {
	text, err := readKeyText(v)
	if err != nil {
		return nil, fmt.Errorf("JWT_PUBLIC_KEY: %w", err)
	}
	keys, err := parsePublicKeys(text)
	if err != nil {
		return nil, fmt.Errorf("JWT_PUBLIC_KEY: %w", err)
	}
	return keys, nil
}

// loadPrivateKey reads JWT_PRIVATE_KEY's value (PEM text or a file path):
// an Ed25519 key, or RSA of at least minRSABits.
func loadPrivateKey(v string) (crypto.Signer, error) {
	text, err := readKeyText(v)
	if err != nil {
		return nil, fmt.Errorf("JWT_PRIVATE_KEY: %w", err)
	}
	block, _ := pem.Decode(text)
	if block == nil {
		return nil, errors.New("JWT_PRIVATE_KEY: no PEM private key found")
	}
	var key any
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("JWT_PRIVATE_KEY: PEM block %q is not a private key", block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("JWT_PRIVATE_KEY: %w", err)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("JWT_PRIVATE_KEY: unsupported key type %T", key)
	}
	if _, err := checkKey(signer.Public()); err != nil {
		return nil, fmt.Errorf("JWT_PRIVATE_KEY: %w", err)
	}
	return signer, nil
}

// keygen writes a new Ed25519 pair to dir: jwt-private.pem (0600) and
// jwt-public.pem. It refuses to overwrite an existing private key.
func keygen(dir string) error {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	privDER, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("keygen: %w", err)
	}
	privPath := filepath.Join(dir, "jwt-private.pem")
	f, err := os.OpenFile(privPath, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("keygen: %w", err)
	}
	if err := pem.Encode(f, &pem.Block{Type: "PRIVATE KEY", Bytes: privDER}); err != nil {
		f.Close()
		return fmt.Errorf("keygen: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("keygen: %w", err)
	}
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})
	if err := os.WriteFile(filepath.Join(dir, "jwt-public.pem"), pubPEM, 0o644); err != nil {
		return fmt.Errorf("keygen: %w", err)
	}
	return nil
}

// signToken mints an API key for userID: sub, iat, a random jti (so two
// keys are never equal, and neither are their hashes), exp when ttl > 0, and
// the signing key's fingerprint as kid.
func signToken(signer crypto.Signer, userID string, ttl time.Duration, now time.Time) (string, *time.Time, error) {
	method := jwt.SigningMethod(jwt.SigningMethodEdDSA)
	if _, ok := signer.(*rsa.PrivateKey); ok {
		method = jwt.SigningMethodRS256
	}
	claims := jwt.MapClaims{"sub": userID, "iat": now.Unix(), "jti": newUUID()}
	var exp *time.Time
	if ttl > 0 {
		t := now.Add(ttl)
		exp = &t
		claims["exp"] = t.Unix()
	}
	tok := jwt.NewWithClaims(method, claims)
	tok.Header["kid"] = fingerprint(signer.Public())
	s, err := tok.SignedString(signer)
	return s, exp, err
}

// hashToken is how a key is found in api_keys: SHA-256 of the whole token,
// lower-case hex (as Omnara stores it).
func hashToken(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// ---- verification ----

// caller is who a request comes from, as its verified key says.
type caller struct {
	UserID  string
	KeyID   string
	Scope   string    // "agent" or "person"
	Expires time.Time // when the key stops working; zero: never
}

// authError is a refused key; its message is safe to send to the client.
type authError struct{ msg string }

func (e *authError) Error() string { return e.msg }

var (
	errKeyInvalid = &authError{"invalid API key"}
	errKeyExpired = &authError{"API key expired"}
	errNoKey      = &authError{"missing API key: send Authorization: Bearer <key>"}
	// errKeyRevoked ends a long-lived connection whose key was revoked,
	// expired or lost its user while it was open.
	errKeyRevoked = &authError{"key revoked"}
)

// verifier checks bearer tokens against the configured keys and api_keys.
type verifier struct {
	keys  []publicKey
	store *store
	log   *slog.Logger
	now   func() time.Time

	parserOnce sync.Once
	parser     *jwt.Parser
	touched    sync.Map // key id → *atomic.Int64: when this replica last wrote its last_used_at (claimTouch)
}

// jwtParser is the token parser, built once from the configured keys.
func (v *verifier) jwtParser() *jwt.Parser {
	v.parserOnce.Do(func() {
		var methods []string
		for _, k := range v.keys {
			methods = append(methods, k.alg)
		}
		v.parser = jwt.NewParser(
			// Only the algorithms of the configured keys: this is what refuses
			// "none", HS256 keyed with the public key's bytes, and every mismatch.
			jwt.WithValidMethods(methods),
			// One token, one spelling: no re-encoded variants of a signed key.
			jwt.WithStrictDecoding(),
			// exp and nbf are checked when present, with 1 s for clock skew.
			jwt.WithLeeway(time.Second),
			jwt.WithTimeFunc(func() time.Time { return v.now() }),
		)
	})
	return v.parser
}

// verify returns the caller a token belongs to. Order: size; signature, by a
// configured key of the token's algorithm (and of its kid, if it has one);
// exp, nbf, iat; sub a UUID; then the key's row in api_keys (registered,
// active, same user as sub, unexpired). Nothing is read from the database
// before the signature holds. It returns an *authError for a refused token
// and another error if the database failed.
func (v *verifier) verify(ctx context.Context, token string) (caller, error) {
	if token == "" || len(token) > maxTokenLen {
		return caller{}, errKeyInvalid
	}
	now := v.now()
	claims := jwt.MapClaims{}
	_, err := v.jwtParser().ParseWithClaims(token, claims, func(t *jwt.Token) (any, error) {
		alg := t.Method.Alg()
		// A kid is only ever compared with our fingerprints: it never names
		// a file, a URL or a row. One that matches none (or is not a string)
		// leaves no key, so the token is refused.
		_, hasKid := t.Header["kid"]
		kid, _ := t.Header["kid"].(string)
		var set jwt.VerificationKeySet
		for _, k := range v.keys {
			if k.alg == alg && (!hasKid || kid == k.kid) {
				set.Keys = append(set.Keys, k.key)
			}
		}
		if len(set.Keys) == 0 {
			return nil, errors.New("no key for this token")
		}
		return set, nil
	})
	if errors.Is(err, jwt.ErrTokenExpired) {
		return caller{}, errKeyExpired
	}
	if err != nil {
		return caller{}, errKeyInvalid
	}
	// iat in the future means a wrong clock or a forged token; we allow
	// five minutes of skew.
	if iat, err := claims.GetIssuedAt(); err != nil || iat != nil && iat.After(now.Add(5*time.Minute)) {
		return caller{}, errKeyInvalid
	}
	// sub is the user id; the key's row must name the same user below.
	sub, _ := claims.GetSubject()
	userID, ok := parseUUID(sub)
	if !ok {
		return caller{}, errKeyInvalid
	}
	c, err := v.registered(ctx, token, userID, now)
	if err != nil {
		return caller{}, err
	}
	if exp, _ := claims.GetExpirationTime(); exp != nil && (c.Expires.IsZero() || exp.Time.Before(c.Expires)) {
		c.Expires = exp.Time
	}
	return c, nil
}

// registered checks the second half of a key: a valid signature is not
// enough, the key must be registered, active, unexpired and userID's, so
// `revoke` works and a leaked signing key cannot mint keys.
func (v *verifier) registered(ctx context.Context, token, userID string, now time.Time) (caller, error) {
	k, err := v.store.apiKeyByHash(ctx, hashToken(token))
	if errors.Is(err, errNotFound) {
		return caller{}, errKeyInvalid
	}
	if err != nil {
		return caller{}, err
	}
	if !k.Active || k.UserID != userID {
		// Worth an audit line: a revoked key in use, or a key whose row and
		// signed user disagree. Logged by id; the token itself never is.
		v.log.Warn("refused a registered API key", "key_id", k.ID, "active", k.Active, "user_matches", k.UserID == userID)
		return caller{}, errKeyInvalid
	}
	if k.ExpiresAt.Valid && !now.Before(k.ExpiresAt.Time) {
		return caller{}, errKeyExpired
	}
	// At most one write a minute per key: a busy key must not turn every
	// request into a write (touchAPIKey's SQL holds the same rule).
	if (!k.LastUsedAt.Valid || now.Sub(k.LastUsedAt.Time) > time.Minute) && v.claimTouch(k.ID, now) {
		if err := v.store.touchAPIKey(ctx, k.ID); err != nil {
			v.log.Warn("touch api key", "key_id", k.ID, "err", err)
		}
	}
	return caller{UserID: userID, KeyID: k.ID, Scope: k.Scope, Expires: k.ExpiresAt.Time}, nil
}

// claimTouch reports whether this request is the one, on this replica, to
// record that the key was used: every request of a burst reads the key's
// row as "not used for a minute" until the first write commits, and each
// would write.
func (v *verifier) claimTouch(keyID string, now time.Time) bool {
	last, _ := v.touched.LoadOrStore(keyID, new(atomic.Int64))
	t := last.(*atomic.Int64)
	prev := t.Load()
	return now.UnixNano()-prev > int64(time.Minute) && t.CompareAndSwap(prev, now.UnixNano())
}

// ---- middleware ----

type callerKey struct{}

// callerFrom returns the verified caller of a request that passed requireKey.
func callerFrom(ctx context.Context) (caller, bool) {
	c, ok := ctx.Value(callerKey{}).(caller)
	return c, ok
}

// bearerToken returns the token of an "Authorization: Bearer …" header.
// Tokens in query strings are ignored: URLs end up in logs and histories.
func bearerToken(r *http.Request) string {
	scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return ""
	}
	return strings.TrimSpace(token)
}

// requireKey lets a request through only with a verified key, and puts the
// caller in its context. REST and MCP both sit behind it.
func requireKey(v *verifier, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		token := bearerToken(r)
		if token == "" {
			writeUnauthorized(w, errNoKey)
			return
		}
		c, err := v.verify(r.Context(), token)
		var ae *authError
		if errors.As(err, &ae) {
			writeUnauthorized(w, ae)
			return
		}
		if err != nil {
			writeError(w, r, v.log, err)
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), callerKey{}, c)))
	})
}

const (
	scopeAgent  = "agent"
	scopePerson = "person"
)

// writeUnauthorized answers 401 with the Bearer challenge RFC 6750 asks for
// and a reason that never says which check or which key failed.
func writeUnauthorized(w http.ResponseWriter, e *authError) {
	w.Header().Set("WWW-Authenticate", `Bearer realm="agentline"`)
	writeJSON(w, http.StatusUnauthorized, errorBody{Detail: e.msg})
}

// requirePerson lets through only callers with a person key: an agent key
// pasted into an agent's configuration must not open the user's history.
// It sits behind requireKey.
func requirePerson(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if c, _ := callerFrom(r.Context()); c.Scope != scopePerson {
			writeJSON(w, http.StatusForbidden, errorBody{Detail: "this call needs a person key (agentline token -scope person)"})
			return
		}
		next.ServeHTTP(w, r)
	})
}

// ---- keys held open ----

// keyWatch ends long-lived connections (event streams, long-polls, waiting
// MCP calls, MCP streams) within one KEY_RECHECK of their key being revoked,
// expiring or losing its user: a key check at connect is not enough for a
// connection that lasts hours. Every interval, one indexed query checks every
// key that a connection on this replica holds open.
type keyWatch struct {
	store *store
	log   *slog.Logger

	mu   sync.Mutex
	held map[*keyHold]struct{}
}

type keyHold struct {
	keyID   string
	expires time.Time // zero: never
	end     func()
}

func newKeyWatch(st *store, log *slog.Logger) *keyWatch {
	return &keyWatch{store: st, log: log, held: map[*keyHold]struct{}{}}
}

// hold returns ctx that ends with cause errKeyRevoked once c's key goes bad
// (after grace, so that a final answer can still be written), and the
// release to call when the connection is done.
func (w *keyWatch) hold(ctx context.Context, c caller, grace time.Duration) (context.Context, func()) {
	ctx, cancel := context.WithCancelCause(ctx)
	h := &keyHold{keyID: c.KeyID, expires: c.Expires, end: func() {
		time.AfterFunc(grace, func() { cancel(errKeyRevoked) })
	}}
	w.mu.Lock()
	w.held[h] = struct{}{}
	w.mu.Unlock()
	return ctx, func() {
		w.mu.Lock()
		delete(w.held, h)
		w.mu.Unlock()
		cancel(nil)
	}
}

// valid reports whether c's key is still good (true if the database cannot say).
func (w *keyWatch) valid(ctx context.Context, c caller) bool {
	ok, err := w.store.validKeys(ctx, []string{c.KeyID})
	return err != nil || ok[c.KeyID]
}

// run re-checks the held keys every interval until ctx ends.
func (w *keyWatch) run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			w.check(ctx)
		}
	}
}

// check ends the holds whose key is no longer valid. A database that does not
// answer ends nothing: connections are not cut for an outage.
func (w *keyWatch) check(ctx context.Context) {
	w.mu.Lock()
	checked := map[string]bool{}
	for h := range w.held {
		checked[h.keyID] = true
	}
	w.mu.Unlock()
	if len(checked) == 0 {
		return
	}
	valid, err := w.store.validKeys(ctx, slices.Collect(maps.Keys(checked)))
	if err != nil {
		if ctx.Err() == nil {
			w.log.Warn("key re-check failed", "err", err)
		}
		return
	}
	now := time.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	for h := range w.held {
		if checked[h.keyID] && !valid[h.keyID] || !h.expires.IsZero() && now.After(h.expires) {
			delete(w.held, h)
			h.end()
		}
	}
}
