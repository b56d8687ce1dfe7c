package main

// Tests of the JWT path (auth.go) with real signed tokens, real HTTP, the
// real go-sdk MCP client and a real PostgreSQL. Forged tokens are registered
// in api_keys wherever that makes sense, so that the cryptographic or claim
// check under test is the only thing that can refuse them.

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"database/sql"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// RSA-2048 keys take a while to make (longer under -race): one each, shared.
var (
	authRSAOurs  = sync.OnceValue(func() *rsa.PrivateKey { return authMustRSA(2048) })
	authRSAOther = sync.OnceValue(func() *rsa.PrivateKey { return authMustRSA(2048) })
)

func authMustRSA(bits int) *rsa.PrivateKey {
	k, err := rsa.GenerateKey(rand.Reader, bits)
	if err != nil {
		panic(err)
	}
	return k
}

// authPub is pub as a configured verification key.
func authPub(t testing.TB, pub crypto.PublicKey) publicKey {
	t.Helper()
	alg, err := checkKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return publicKey{key: pub, alg: alg, kid: fingerprint(pub)}
}

// authPubPEM is pub as a PKIX "PUBLIC KEY" PEM block.
func authPubPEM(t testing.TB, pub crypto.PublicKey) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
}

// authPrivPEM is priv as a PKCS#8 "PRIVATE KEY" PEM block.
func authPrivPEM(t testing.TB, priv crypto.PrivateKey) string {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
}

// authWeakRSA is an RSA public key with a modulus of exactly bits bits
// (not a real key pair: loading must refuse it by size alone). Go no longer
// generates RSA keys under 1024 bits, and a 512-bit one is what Omnara used.
func authWeakRSA(bits int) *rsa.PublicKey {
	n := new(big.Int).Lsh(big.NewInt(1), uint(bits-1))
	n.Add(n, big.NewInt(0x10001*2+1))
	return &rsa.PublicKey{N: n, E: 65537}
}

// authWithKeys replaces the verifier's keys.
func authWithKeys(keys ...publicKey) envOption {
	return func(a *app) { a.verifier.keys = keys }
}

// authWithClock makes the verifier's clock run *off ahead of the real one,
// so expiry is tested without sleeping.
func authWithClock(off *atomic.Int64) envOption {
	return func(a *app) {
		a.verifier.now = func() time.Time { return time.Now().Add(time.Duration(off.Load())) }
	}
}

// authSign signs claims with method and key; header entries are added to the
// token's header (a nil value removes one, e.g. "kid").
func authSign(t testing.TB, method jwt.SigningMethod, key any, header map[string]any, claims jwt.MapClaims) string {
	t.Helper()
	tok := jwt.NewWithClaims(method, claims)
	for k, v := range header {
		if v == nil {
			delete(tok.Header, k)
		} else {
			tok.Header[k] = v
		}
	}
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// authSegment is v as a base64url JSON token segment.
func authSegment(t testing.TB, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

// authRegister puts token in api_keys for userID, as `token` would, and
// returns the key's id.
func (e *testEnv) authRegister(t testing.TB, token, userID string) string {
	t.Helper()
	id, err := e.a.store.addAPIKey(context.Background(), userID, "auth test", hashToken(token), scopeAgent, nil)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// authEndpoint is a guarded request whose body would succeed with a valid key,
// so that a test fails if the guard lets a forgery through.
type authEndpoint struct{ method, path, body string }

var authEndpoints = []authEndpoint{
	{"POST", "/api/v1/messages/agent", `{"agent_instance_id":"` + newUUID() + `","agent_type":"claude-code","content":"x"}`},
	{"POST", "/mcp/", `{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}`},
	{"POST", "/mcp", `{"jsonrpc":"2.0","id":1,"method":"tools/list"}`},
	{"GET", "/mcp/sse", ""},
}

// authDo sends one request with the given Authorization header (none when
// empty). A 2xx body is not read: an SSE stream would never end.
func authDo(t testing.TB, base string, ep authEndpoint, query, authz string) (int, http.Header, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var body io.Reader
	if ep.body != "" {
		body = strings.NewReader(ep.body)
	}
	req, err := http.NewRequestWithContext(ctx, ep.method, base+ep.path+query, body)
	if err != nil {
		t.Fatal(err)
	}
	if authz != "" {
		req.Header.Set("Authorization", authz)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 == 2 {
		return resp.StatusCode, resp.Header, nil
	}
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, b
}

// authMust401 checks that every guarded endpoint refuses the request with a
// 401, a Bearer challenge and a JSON detail that does not echo the token.
func authMust401(t testing.TB, base, query, authz string) {
	t.Helper()
	for _, ep := range authEndpoints {
		code, h, body := authDo(t, base, ep, query, authz)
		if code != http.StatusUnauthorized {
			t.Errorf("%s %s: status %d, want 401 (%.200s)", ep.method, ep.path, code, body)
			continue
		}
		if !strings.HasPrefix(h.Get("WWW-Authenticate"), "Bearer") {
			t.Errorf("%s %s: WWW-Authenticate = %q, want Bearer…", ep.method, ep.path, h.Get("WWW-Authenticate"))
		}
		var b struct {
			Detail string `json:"detail"`
		}
		if err := json.Unmarshal(body, &b); err != nil || b.Detail == "" || !strings.HasPrefix(h.Get("Content-Type"), "application/json") {
			t.Errorf("%s %s: body %q (%s), want JSON {detail}", ep.method, ep.path, body, h.Get("Content-Type"))
		}
		if tok := strings.TrimPrefix(authz, "Bearer "); len(tok) > 10 && bytes.Contains(body, []byte(tok)) {
			t.Errorf("%s %s: the answer echoes the token", ep.method, ep.path)
		}
	}
}

// authMCP connects the go-sdk client with key over Streamable HTTP or SSE.
func authMCP(t testing.TB, e *testEnv, key string, sse bool) (*mcp.ClientSession, error) {
	t.Helper()
	// The SSE stream lives as long as Connect's context: end it at cleanup.
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	c := mcp.NewClient(&mcp.Implementation{Name: "auth-test", Version: "1"}, nil)
	hc := &http.Client{Transport: bearerRT{key: key, ua: "claude-code/1.0"}}
	var tr mcp.Transport = &mcp.StreamableClientTransport{Endpoint: e.srv.URL + "/mcp/", HTTPClient: hc}
	if sse {
		tr = &mcp.SSEClientTransport{Endpoint: e.srv.URL + "/mcp/sse", HTTPClient: hc}
	}
	s, err := c.Connect(ctx, tr, nil)
	if err == nil {
		t.Cleanup(func() { s.Close() })
	}
	return s, err
}

// authLogStep calls log_step on s; a tool error counts as an error.
func authLogStep(s *mcp.ClientSession) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := s.CallTool(ctx, &mcp.CallToolParams{Name: "log_step", Arguments: map[string]any{"step_description": "auth test"}})
	if err != nil {
		return err
	}
	if res.IsError {
		return errors.New("log_step: tool error")
	}
	return nil
}

// authMustWorkOnMCP checks that key can call a tool over both transports.
func authMustWorkOnMCP(t testing.TB, e *testEnv, key string) {
	t.Helper()
	for _, sse := range []bool{false, true} {
		s, err := authMCP(t, e, key, sse)
		if err == nil {
			err = authLogStep(s)
		}
		if err != nil {
			t.Errorf("MCP (sse=%v) with a valid key: %v\n%s", sse, err, e.logs.String())
		}
	}
}

// authAgentMessage posts a step with key and returns the status.
func authAgentMessage(t testing.TB, e *testEnv, key string) int {
	t.Helper()
	code, _ := e.call(t, "POST", "/api/v1/messages/agent", key, map[string]any{
		"agent_instance_id": newUUID(), "agent_type": "claude-code", "content": "step"})
	return code
}

// authRun runs the agentline command line with env as its whole environment.
func authRun(args []string, env map[string]string) (stdout, stderr string, err error) {
	var out, errb bytes.Buffer
	err = run(context.Background(), append([]string{"agentline"}, args...), func(k string) string { return env[k] }, &out, &errb)
	return out.String(), errb.String(), err
}

// TestAuthAttacks sends every forgery we know of to REST and both MCP
// transports, against a server that accepts both EdDSA and RS256.
func TestAuthAttacks(t *testing.T) {
	t.Parallel()
	ours := authRSAOurs()
	e := newTestEnv(t, func(a *app) {
		a.verifier.keys = append(a.verifier.keys, authPub(t, &ours.PublicKey))
	})
	ctx := context.Background()
	ed := e.signer.(ed25519.PrivateKey)
	edKid, rsaKid := fingerprint(ed.Public()), fingerprint(&ours.PublicKey)
	edPEM, rsaPEM := authPubPEM(t, ed.Public()), authPubPEM(t, &ours.PublicKey)
	alice, bob := e.mustUserID(t, "alice@example.com"), e.mustUserID(t, "bob@example.com")
	now := time.Now()

	// claims are alice's, with kv pairs set on top (a nil value removes one).
	claims := func(kv ...any) jwt.MapClaims {
		c := jwt.MapClaims{"sub": alice, "iat": now.Unix(), "jti": newUUID()}
		for i := 0; i < len(kv); i += 2 {
			if kv[i+1] == nil {
				delete(c, kv[i].(string))
			} else {
				c[kv[i].(string)] = kv[i+1]
			}
		}
		return c
	}
	edSigned := func(hdr map[string]any, c jwt.MapClaims) string {
		if hdr == nil {
			hdr = map[string]any{"kid": edKid}
		}
		return authSign(t, jwt.SigningMethodEdDSA, ed, hdr, c)
	}
	reg := func(tok string) string { e.authRegister(t, tok, alice); return tok }

	// Two legitimate keys, to prove the server accepts what it should.
	legitEd := reg(edSigned(nil, claims()))
	legitRSA := reg(authSign(t, jwt.SigningMethodRS256, ours, map[string]any{"kid": rsaKid}, claims()))
	for _, k := range []string{legitEd, legitRSA} {
		if code := authAgentMessage(t, e, k); code != 200 {
			t.Fatalf("legitimate key refused: %d\n%s", code, e.logs.String())
		}
	}
	h, p, s := func() (string, string, string) { x := strings.Split(legitEd, "."); return x[0], x[1], x[2] }()
	_, p2, _ := func() (string, string, string) { x := strings.Split(legitRSA, "."); return x[0], x[1], x[2] }()

	otherEd := func() ed25519.PrivateKey { _, k, _ := ed25519.GenerateKey(rand.Reader); return k }()
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)

	carol := e.mustUserID(t, "carol@example.com")
	carolKey := edSigned(nil, claims("sub", carol))
	e.authRegister(t, carolKey, carol)
	inactive, deleted := reg(edSigned(nil, claims())), reg(edSigned(nil, claims()))
	rowExpired := edSigned(nil, claims())
	past := now.Add(-time.Minute)
	if _, err := e.a.store.addAPIKey(ctx, alice, "expired row", hashToken(rowExpired), scopeAgent, &past); err != nil {
		t.Fatal(err)
	}
	otherUser := edSigned(nil, claims()) // signed for alice, registered to bob
	e.authRegister(t, otherUser, bob)
	for q, arg := range map[string]string{
		`UPDATE api_keys SET is_active = false WHERE api_key_hash = $1`: hashToken(inactive),
		`DELETE FROM api_keys WHERE api_key_hash = $1`:                  hashToken(deleted),
		`DELETE FROM users WHERE id = $1`:                               carol,
	} {
		if _, err := e.db.Exec(q, arg); err != nil {
			t.Fatal(err)
		}
	}

	splice := reg(h + "." + p2 + "." + s) // alice's other payload, this signature
	cases := []struct {
		name  string
		authz string // the whole Authorization header; "" sends none
		query string
		want  error // what verify says about the token, where there is one
	}{
		{name: "no header", want: nil},
		{name: "basic scheme", authz: "Basic " + base64.StdEncoding.EncodeToString([]byte("alice:pw"))},
		{name: "bearer without token", authz: "Bearer "},
		{name: "key without scheme", authz: legitEd},
		{name: "not a JWT", authz: "Bearer not-a-jwt", want: errKeyInvalid},
		{name: "two segments", authz: "Bearer " + h + "." + p, want: errKeyInvalid},
		{name: "four segments", authz: "Bearer " + legitEd + "." + s, want: errKeyInvalid},
		{name: "garbage segments", authz: "Bearer !!!.@@@.###", want: errKeyInvalid},
		{name: "alg none", authz: "Bearer " + reg(authSign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, map[string]any{"kid": edKid}, claims())), want: errKeyInvalid},
		{name: "alg None, other spelling", authz: "Bearer " + reg(authSegment(t, map[string]any{"alg": "None", "typ": "JWT"})+"."+p+"."), want: errKeyInvalid},
		{name: "alg none with the real signature", authz: "Bearer " + reg(authSegment(t, map[string]any{"alg": "none", "kid": edKid})+"."+p+"."+s), want: errKeyInvalid},
		{name: "HS256 keyed with the Ed25519 public PEM", authz: "Bearer " + reg(authSign(t, jwt.SigningMethodHS256, []byte(edPEM), map[string]any{"kid": edKid}, claims())), want: errKeyInvalid},
		{name: "HS256 keyed with the RSA public PEM", authz: "Bearer " + reg(authSign(t, jwt.SigningMethodHS256, []byte(rsaPEM), map[string]any{"kid": rsaKid}, claims())), want: errKeyInvalid},
		{name: "another Ed25519 key with our kid", authz: "Bearer " + reg(authSign(t, jwt.SigningMethodEdDSA, otherEd, map[string]any{"kid": edKid}, claims())), want: errKeyInvalid},
		{name: "another Ed25519 key without kid", authz: "Bearer " + reg(authSign(t, jwt.SigningMethodEdDSA, otherEd, nil, claims())), want: errKeyInvalid},
		{name: "another RSA key with our kid", authz: "Bearer " + reg(authSign(t, jwt.SigningMethodRS256, authRSAOther(), map[string]any{"kid": rsaKid}, claims())), want: errKeyInvalid},
		{name: "another RSA key without kid", authz: "Bearer " + reg(authSign(t, jwt.SigningMethodRS256, authRSAOther(), nil, claims())), want: errKeyInvalid},
		{name: "ES256 with an EC key", authz: "Bearer " + reg(authSign(t, jwt.SigningMethodES256, ecKey, nil, claims())), want: errKeyInvalid},
		{name: "RS256 header on an Ed25519 signature", authz: "Bearer " + reg(authSegment(t, map[string]any{"alg": "RS256", "kid": rsaKid})+"."+p+"."+s), want: errKeyInvalid},
		{name: "signature stripped", authz: "Bearer " + reg(h+"."+p+"."), want: errKeyInvalid},
		{name: "signature and its dot stripped", authz: "Bearer " + reg(h+"."+p), want: errKeyInvalid},
		{name: "payload of one, signature of another", authz: "Bearer " + splice, want: errKeyInvalid},
		{name: "signature with a trailing byte", authz: "Bearer " + reg(legitEd+"A"), want: errKeyInvalid},
		{name: "signed, never registered", authz: "Bearer " + edSigned(nil, claims()), want: errKeyInvalid},
		{name: "signed RS256, never registered", authz: "Bearer " + authSign(t, jwt.SigningMethodRS256, ours, map[string]any{"kid": rsaKid}, claims()), want: errKeyInvalid},
		{name: "exp in the past", authz: "Bearer " + reg(edSigned(nil, claims("exp", now.Add(-time.Hour).Unix()))), want: errKeyExpired},
		{name: "exp not a number", authz: "Bearer " + reg(edSigned(nil, claims("exp", "tomorrow"))), want: errKeyInvalid},
		{name: "nbf in the future", authz: "Bearer " + reg(edSigned(nil, claims("nbf", now.Add(time.Hour).Unix()))), want: errKeyInvalid},
		{name: "iat 10 minutes ahead", authz: "Bearer " + reg(edSigned(nil, claims("iat", now.Add(10*time.Minute).Unix()))), want: errKeyInvalid},
		{name: "iat not a number", authz: "Bearer " + reg(edSigned(nil, claims("iat", "now"))), want: errKeyInvalid},
		{name: "sub not a UUID", authz: "Bearer " + reg(edSigned(nil, claims("sub", "admin"))), want: errKeyInvalid},
		{name: "sub SQL", authz: "Bearer " + reg(edSigned(nil, claims("sub", "' OR 1=1 --"))), want: errKeyInvalid},
		{name: "sub a number", authz: "Bearer " + reg(edSigned(nil, claims("sub", 42))), want: errKeyInvalid},
		{name: "sub missing", authz: "Bearer " + reg(edSigned(nil, claims("sub", nil))), want: errKeyInvalid},
		{name: "kid with ../", authz: "Bearer " + reg(edSigned(map[string]any{"kid": "../../../../etc/passwd"}, claims())), want: errKeyInvalid},
		{name: "unknown kid", authz: "Bearer " + reg(edSigned(map[string]any{"kid": "0123456789abcdef"}, claims())), want: errKeyInvalid},
		{name: "kid not a string", authz: "Bearer " + reg(edSigned(map[string]any{"kid": 7}, claims())), want: errKeyInvalid},
		{name: "kid of the RSA key on an EdDSA token", authz: "Bearer " + reg(edSigned(map[string]any{"kid": rsaKid}, claims())), want: errKeyInvalid},
		{name: "token over 4 KB", authz: "Bearer " + reg(edSigned(nil, claims("pad", strings.Repeat("x", maxTokenLen)))), want: errKeyInvalid},
		{name: "row inactive", authz: "Bearer " + inactive, want: errKeyInvalid},
		{name: "row deleted", authz: "Bearer " + deleted, want: errKeyInvalid},
		{name: "row expired", authz: "Bearer " + rowExpired, want: errKeyExpired},
		{name: "row of another user than sub", authz: "Bearer " + otherUser, want: errKeyInvalid},
		{name: "user deleted", authz: "Bearer " + carolKey, want: errKeyInvalid},
		{name: "key in access_token query", query: "?access_token=" + legitEd},
		{name: "key in token query", query: "?token=" + legitEd + "&api_key=" + legitEd},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			authMust401(t, e.srv.URL, c.query, c.authz)
			if c.want == nil {
				return
			}
			_, err := e.a.verifier.verify(ctx, strings.TrimPrefix(c.authz, "Bearer "))
			if !errors.Is(err, c.want) {
				t.Errorf("verify: %v, want %v", err, c.want)
			}
		})
	}

	// The legitimate keys still work (nothing above broke them), on MCP too.
	for _, k := range []string{legitEd, legitRSA} {
		if code := authAgentMessage(t, e, k); code != 200 {
			t.Errorf("legitimate key refused after the attacks: %d", code)
		}
		authMustWorkOnMCP(t, e, k)
	}

	// Keys never reach the log, refused or accepted; refusals of registered
	// keys are logged by id.
	logs := e.logs.String()
	for _, c := range cases {
		tok := strings.TrimPrefix(c.authz, "Bearer ")
		if len(tok) > 20 && strings.Contains(logs, tok) {
			t.Errorf("%s: the token is in the log", c.name)
		}
	}
	for _, k := range []string{legitEd, legitRSA, s} {
		if strings.Contains(logs, k) {
			t.Errorf("a valid key (or its signature) is in the log")
		}
	}
	var otherID string
	if err := e.db.QueryRow(`SELECT id FROM api_keys WHERE api_key_hash = $1`, hashToken(otherUser)).Scan(&otherID); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs, otherID) {
		t.Errorf("the refusal of a registered key does not name its id in the log:\n%s", logs)
	}
}

// TestAuthEveryRouteNeedsKey: every route but /health is behind requireKey.
func TestAuthEveryRouteNeedsKey(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	for _, r := range []struct{ method, path string }{
		{"POST", "/api/v1/messages/agent"},
		{"POST", "/api/v1/messages/user"},
		{"GET", "/api/v1/messages/pending?agent_instance_id=" + newUUID()},
		{"PATCH", "/api/v1/messages/" + newUUID() + "/request-input"},
		{"POST", "/api/v1/sessions/end"},
		{"POST", "/mcp"},
		{"POST", "/mcp/"},
		{"GET", "/mcp/sse"},
		{"POST", "/mcp/sse?sessionid=x"},
	} {
		code, body := e.call(t, r.method, r.path, "", "{}")
		if code != http.StatusUnauthorized || mustJSON(t, body)["detail"] == "" {
			t.Errorf("%s %s without a key: %d %s", r.method, r.path, code, body)
		}
	}
	if code, _ := e.call(t, "GET", "/health", "", nil); code != 200 {
		t.Errorf("/health: %d, want 200 without a key", code)
	}
}

// TestAuthLegitKeys: Ed25519 agent and person keys, minted by issueKey, work
// on REST and on both MCP transports; so does a 4-minute clock skew in iat.
func TestAuthLegitKeys(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	agent := e.mustKey(t, "a@example.com", scopeAgent)
	person := e.mustKey(t, "a@example.com", scopePerson)
	skewed := authSign(t, jwt.SigningMethodEdDSA, e.signer, map[string]any{"kid": fingerprint(e.signer.Public())},
		jwt.MapClaims{"sub": e.mustUserID(t, "a@example.com"), "iat": time.Now().Add(4 * time.Minute).Unix()})
	e.authRegister(t, skewed, e.mustUserID(t, "a@example.com"))
	for _, k := range []string{agent, person, skewed} {
		if code := authAgentMessage(t, e, k); code != 200 {
			t.Errorf("REST with a valid key: %d\n%s", code, e.logs.String())
		}
		// Scheme names are case-insensitive (RFC 9110); surrounding spaces are not part of the key.
		req, _ := http.NewRequest("POST", e.srv.URL+"/api/v1/messages/agent", strings.NewReader(`{"agent_instance_id":"`+newUUID()+`","agent_type":"x","content":"y"}`))
		req.Header.Set("Authorization", "bearer  "+k+" ")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Errorf("lower-case scheme: %d", resp.StatusCode)
		}
	}
	authMustWorkOnMCP(t, e, agent)
}

// TestAuthRotation: two keys configured (Ed25519 and RSA-2048, as two PEM
// blocks in one JWT_PUBLIC_KEY), tokens of both verify; dropping one from the
// configuration stops its tokens and only its tokens.
func TestAuthRotation(t *testing.T) {
	t.Parallel()
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	rsaKey := authRSAOurs()
	edPEM, rsaPEM := authPubPEM(t, ed.Public()), authPubPEM(t, &rsaKey.PublicKey)
	both, err := loadPublicKeys(edPEM + rsaPEM)
	if err != nil || len(both) != 2 || both[0].alg != "EdDSA" || both[1].alg != "RS256" {
		t.Fatalf("two PEM blocks: %+v, %v", both, err)
	}
	e := newTestEnv(t, authWithKeys(both...))
	ctx := context.Background()
	edTok, err := issueKey(ctx, e.a.store, ed, "rot@example.com", "ed", scopeAgent, 0)
	if err != nil {
		t.Fatal(err)
	}
	rsaTok, err := issueKey(ctx, e.a.store, rsaKey, "rot@example.com", "rsa", scopeAgent, 0)
	if err != nil {
		t.Fatal(err)
	}
	if hdr, _ := base64.RawURLEncoding.DecodeString(strings.Split(rsaTok, ".")[0]); !bytes.Contains(hdr, []byte(`"RS256"`)) {
		t.Fatalf("an RSA signer should mint RS256 keys: %s", hdr)
	}
	for _, k := range []string{edTok, rsaTok} {
		if code := authAgentMessage(t, e, k); code != 200 {
			t.Errorf("REST with a key of a configured signer: %d\n%s", code, e.logs.String())
		}
		authMustWorkOnMCP(t, e, k)
	}

	// The next configuration drops one key: its tokens stop, the other's go on.
	for _, step := range []struct {
		pem        string
		ok, refuse string
	}{{edPEM, edTok, rsaTok}, {rsaPEM, rsaTok, edTok}} {
		keys, err := loadPublicKeys(step.pem)
		if err != nil {
			t.Fatal(err)
		}
		v := &verifier{keys: keys, store: e.a.store, log: e.a.log, now: time.Now}
		srv := httptest.NewServer(requireKey(v, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			c, _ := callerFrom(r.Context())
			writeJSON(w, 200, map[string]string{"user": c.UserID})
		})))
		for tok, want := range map[string]int{step.ok: 200, step.refuse: 401} {
			code, _, _ := authDo(t, srv.URL, authEndpoint{"GET", "/", ""}, "", "Bearer "+tok)
			if code != want {
				t.Errorf("after rotation: status %d, want %d", code, want)
			}
		}
		srv.Close()
	}
}

// TestAuthRS256 runs a server whose only key is RSA-2048 (an existing RS256
// deployment after re-keying): RS256 keys work, EdDSA ones do not.
func TestAuthRS256(t *testing.T) {
	t.Parallel()
	rsaKey := authRSAOurs()
	e := newTestEnv(t, authWithKeys(authPub(t, &rsaKey.PublicKey)))
	tok, err := issueKey(context.Background(), e.a.store, rsaKey, "rs@example.com", "", scopeAgent, 0)
	if err != nil {
		t.Fatal(err)
	}
	if code := authAgentMessage(t, e, tok); code != 200 {
		t.Fatalf("RS256 key: %d\n%s", code, e.logs.String())
	}
	authMustWorkOnMCP(t, e, tok)
	edTok := e.mustKey(t, "rs@example.com", scopeAgent) // signed by the env's Ed25519 key, registered
	authMust401(t, e.srv.URL, "", "Bearer "+edTok)
}

// TestAuthRevoke: a revoked key is refused from the very next request, over
// REST and over an MCP session that was already open, whether revoked in the
// store, by `agentline revoke KEY` or by `agentline revoke ID`.
func TestAuthRevoke(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	ctx := context.Background()
	revokers := map[string]func(t *testing.T, key string){
		"store": func(t *testing.T, key string) {
			if err := e.a.store.revokeAPIKey(ctx, hashToken(key)); err != nil {
				t.Fatal(err)
			}
		},
		"command with the key": func(t *testing.T, key string) {
			if _, stderr, err := authRun([]string{"revoke", key}, map[string]string{"DATABASE_URL": e.dsn}); err != nil {
				t.Fatalf("revoke: %v\n%s", err, stderr)
			}
		},
		"command with the id": func(t *testing.T, key string) {
			var id string
			if err := e.db.QueryRow(`SELECT id FROM api_keys WHERE api_key_hash = $1`, hashToken(key)).Scan(&id); err != nil {
				t.Fatal(err)
			}
			if _, stderr, err := authRun([]string{"revoke", id}, map[string]string{"DATABASE_URL": e.dsn}); err != nil {
				t.Fatalf("revoke: %v\n%s", err, stderr)
			}
		},
	}
	for name, revoke := range revokers {
		t.Run(name, func(t *testing.T) {
			key := e.mustKey(t, "rev@example.com", scopeAgent)
			other := e.mustKey(t, "rev@example.com", scopeAgent)
			var sessions []*mcp.ClientSession
			for _, sse := range []bool{false, true} {
				s, err := authMCP(t, e, key, sse)
				if err != nil {
					t.Fatal(err)
				}
				if err := authLogStep(s); err != nil {
					t.Fatalf("before revocation (sse=%v): %v", sse, err)
				}
				sessions = append(sessions, s)
			}
			if code := authAgentMessage(t, e, key); code != 200 {
				t.Fatalf("before revocation: %d", code)
			}
			revoke(t, key)
			authMust401(t, e.srv.URL, "", "Bearer "+key)
			for i, s := range sessions {
				if err := authLogStep(s); err == nil {
					t.Errorf("open MCP session (sse=%v) still works after revocation", i == 1)
				}
			}
			if code := authAgentMessage(t, e, other); code != 200 {
				t.Errorf("revoking one key refused another of the same user: %d", code)
			}
			if strings.Contains(e.logs.String(), key) {
				t.Errorf("the revoked key is in the log")
			}
		})
	}
	if _, _, err := authRun([]string{"revoke", newUUID()}, map[string]string{"DATABASE_URL": e.dsn}); err == nil {
		t.Errorf("revoking an unknown key id succeeded")
	}
}

// TestAuthExpiry: a key made with a 1 s ttl works at once and is refused 3 s
// later (the verifier's clock is moved, nothing sleeps), whether made by
// issueKey or by `agentline token -ttl 1s` with JWT_PRIVATE_KEY as PEM text.
func TestAuthExpiry(t *testing.T) {
	t.Parallel()
	var off atomic.Int64
	e := newTestEnv(t, authWithClock(&off))
	viaIssue, err := issueKey(context.Background(), e.a.store, e.signer, "ttl@example.com", "", scopeAgent, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	stdout, stderr, err := authRun([]string{"token", "-user", "ttl@example.com", "-ttl", "1s"},
		map[string]string{"DATABASE_URL": e.dsn, "JWT_PRIVATE_KEY": authPrivPEM(t, e.signer)})
	if err != nil {
		t.Fatalf("token: %v\n%s", err, stderr)
	}
	viaCommand := strings.TrimSpace(stdout)
	if strings.Count(viaCommand, ".") != 2 || strings.Contains(stderr, viaCommand) {
		t.Fatalf("token should print the key alone on stdout (and nowhere else): %q", stdout)
	}
	for _, k := range []string{viaIssue, viaCommand} {
		if code := authAgentMessage(t, e, k); code != 200 {
			t.Fatalf("fresh 1 s key: %d", code)
		}
	}
	off.Store(int64(3 * time.Second))
	for _, k := range []string{viaIssue, viaCommand} {
		authMust401(t, e.srv.URL, "", "Bearer "+k)
		if _, err := e.a.verifier.verify(context.Background(), k); !errors.Is(err, errKeyExpired) {
			t.Errorf("verify: %v, want %v", err, errKeyExpired)
		}
	}
	// A key whose row expires (exp claim absent) is refused by the row alone.
	off.Store(0)
	tok := authSign(t, jwt.SigningMethodEdDSA, e.signer, nil, jwt.MapClaims{"sub": e.mustUserID(t, "ttl@example.com")})
	soon := time.Now().Add(time.Minute)
	if _, err := e.a.store.addAPIKey(context.Background(), e.mustUserID(t, "ttl@example.com"), "", hashToken(tok), scopeAgent, &soon); err != nil {
		t.Fatal(err)
	}
	if code := authAgentMessage(t, e, tok); code != 200 {
		t.Fatalf("key before its row expires: %d", code)
	}
	off.Store(int64(2 * time.Minute))
	authMust401(t, e.srv.URL, "", "Bearer "+tok)
}

// TestAuthOversizedHeader: a 100 KB Authorization header gets a clean 431
// from the production server settings before any handler runs, and a 401 from
// requireKey where the server lets it through.
func TestAuthOversizedHeader(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	ts := httptest.NewUnstartedServer(nil)
	ts.Config = newHTTPServer(e.a.routes(), e.a.log)
	ts.Start()
	defer ts.Close()
	big := "Bearer " + strings.Repeat("A", 100<<10)
	for _, ep := range authEndpoints {
		if code, _, _ := authDo(t, ts.URL, ep, "", big); code != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("%s %s with a 100 KB header: %d, want 431", ep.method, ep.path, code)
		}
	}
	authMust401(t, e.srv.URL, "", big) // httptest's default allows 1 MB of headers
	// The server still serves normal requests afterwards.
	key := e.mustKey(t, "big@example.com", scopeAgent)
	if code, _, _ := authDo(t, ts.URL, authEndpoints[0], "", "Bearer "+key); code != 200 {
		t.Errorf("after the oversized header: %d", code)
	}
}

// TestAuthLastUsed: last_used_at is written on first use, not again within a
// minute, and again once a minute has passed.
func TestAuthLastUsed(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	key := e.mustKey(t, "lu@example.com", scopeAgent)
	lastUsed := func() sql.NullTime {
		t.Helper()
		var v sql.NullTime
		if err := e.db.QueryRow(`SELECT last_used_at FROM api_keys WHERE api_key_hash = $1`, hashToken(key)).Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	if lastUsed().Valid {
		t.Fatal("last_used_at set before any use")
	}
	authAgentMessage(t, e, key)
	first := lastUsed()
	if !first.Valid {
		t.Fatal("last_used_at not set by a request")
	}
	authAgentMessage(t, e, key)
	if second := lastUsed(); !second.Time.Equal(first.Time) {
		t.Errorf("last_used_at rewritten within a minute: %v then %v", first.Time, second.Time)
	}
	if _, err := e.db.Exec(`UPDATE api_keys SET last_used_at = now() - interval '2 minutes' WHERE api_key_hash = $1`, hashToken(key)); err != nil {
		t.Fatal(err)
	}
	e.a.verifier.touched.Clear() // this replica's own minute has passed too
	old := lastUsed()
	authAgentMessage(t, e, key)
	if third := lastUsed(); !third.Time.After(old.Time) {
		t.Errorf("last_used_at not rewritten after a minute: %v", third.Time)
	}
}

// TestAuthLoadKeys: what JWT_PUBLIC_KEY accepts, and what it refuses with a
// message that names the problem (and never repeats a secret).
func TestAuthLoadKeys(t *testing.T) {
	t.Parallel()
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	_, ed2, _ := ed25519.GenerateKey(rand.Reader)
	rsaKey := authRSAOurs()
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	edPEM := authPubPEM(t, ed.Public())
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	const secret = "hmac-s3cret-that-must-not-be-printed"
	pkcs1 := func(pub *rsa.PublicKey) string {
		return string(pem.EncodeToMemory(&pem.Block{Type: "RSA PUBLIC KEY", Bytes: x509.MarshalPKCS1PublicKey(pub)}))
	}
	ecPriv, _ := x509.MarshalECPrivateKey(ecKey)

	for _, c := range []struct {
		name  string
		value string
		algs  []string // accepted: the keys' algorithms in order
		msg   string   // refused: a word the message must contain
	}{
		{name: "Ed25519 PEM text", value: edPEM, algs: []string{"EdDSA"}},
		{name: "Ed25519 PEM file", value: write("pub.pem", edPEM), algs: []string{"EdDSA"}},
		{name: "RSA-2048 PKIX", value: authPubPEM(t, &rsaKey.PublicKey), algs: []string{"RS256"}},
		{name: "RSA-2048 PKCS#1", value: pkcs1(&rsaKey.PublicKey), algs: []string{"RS256"}},
		{name: "three blocks, three keys", value: "comment\n" + edPEM + authPubPEM(t, &rsaKey.PublicKey) + authPubPEM(t, ed2.Public()), algs: []string{"EdDSA", "RS256", "EdDSA"}},
		{name: "RSA-1024", value: authPubPEM(t, authWeakRSA(1024)), msg: "2048"},
		{name: "RSA-1024 PKCS#1", value: pkcs1(authWeakRSA(1024)), msg: "2048"},
		{name: "RSA-512 (Omnara's)", value: authPubPEM(t, authWeakRSA(512)), msg: "2048"},
		{name: "RSA-2047", value: authPubPEM(t, authWeakRSA(2047)), msg: "2048"},
		{name: "a weak key among good ones", value: edPEM + authPubPEM(t, authWeakRSA(1024)), msg: "2048"},
		{name: "HMAC secret text", value: secret, msg: "HMAC"},
		{name: "HMAC secret in a file", value: write("secret", secret), msg: "HMAC"},
		{name: "missing file", value: filepath.Join(dir, "nope.pem"), msg: "keygen"},
		{name: "empty file", value: write("empty", ""), msg: "keygen"},
		{name: "garbage PEM body", value: "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", msg: "public key"},
		{name: "certificate block", value: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", msg: "not a public key"},
		{name: "Ed25519 private key", value: authPrivPEM(t, ed), msg: "private"},
		{name: "RSA private key (PKCS#1)", value: string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey)})), msg: "private"},
		{name: "EC private key", value: string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: ecPriv})), msg: "private"},
		{name: "EC public key", value: authPubPEM(t, &ecKey.PublicKey), msg: "Ed25519"},
	} {
		keys, err := loadPublicKeys(c.value)
		if c.algs != nil {
			if err != nil || len(keys) != len(c.algs) {
				t.Errorf("%s: %d keys, %v; want %v", c.name, len(keys), err, c.algs)
				continue
			}
			for i, k := range keys {
				if k.alg != c.algs[i] || k.kid != fingerprint(k.key) {
					t.Errorf("%s: key %d is %s/%s, want %s", c.name, i, k.alg, k.kid, c.algs[i])
				}
			}
			continue
		}
		if err == nil {
			t.Errorf("%s: accepted %d keys, want a refusal", c.name, len(keys))
			continue
		}
		if !strings.HasPrefix(err.Error(), "JWT_PUBLIC_KEY") || !strings.Contains(err.Error(), c.msg) {
			t.Errorf("%s: message %q should name JWT_PUBLIC_KEY and say %q", c.name, err, c.msg)
		}
		if strings.Contains(err.Error(), secret) {
			t.Errorf("%s: message repeats the secret: %q", c.name, err)
		}
	}
	// Fingerprints tell keys apart.
	if fingerprint(ed.Public()) == fingerprint(ed2.Public()) {
		t.Error("two keys with one fingerprint")
	}

	// JWT_PRIVATE_KEY refuses what JWT_PUBLIC_KEY would, and a public key.
	weakPriv := authMustRSA(1024)
	for name, v := range map[string]string{
		"RSA-1024 private": string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(weakPriv)})),
		"public key":       edPEM,
		"HMAC secret":      secret,
		"EC private":       authPrivPEM(t, ecKey),
	} {
		if _, err := loadPrivateKey(v); err == nil || !strings.HasPrefix(err.Error(), "JWT_PRIVATE_KEY") || strings.Contains(err.Error(), secret) {
			t.Errorf("JWT_PRIVATE_KEY %s: %v", name, err)
		}
	}
}

// TestAuthKeygen: keygen writes a working Ed25519 pair, the private key
// 0600, and never overwrites it.
func TestAuthKeygen(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "keys")
	if out, stderr, err := authRun([]string{"keygen", "-dir", dir}, nil); err != nil || !strings.Contains(out, "jwt-private.pem") {
		t.Fatalf("keygen: %v %q %q", err, out, stderr)
	}
	privPath := filepath.Join(dir, "jwt-private.pem")
	fi, err := os.Stat(privPath)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("jwt-private.pem mode %v, want 0600", fi.Mode().Perm())
	}
	before, _ := os.ReadFile(privPath)
	signer, err := loadPrivateKey(privPath)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := loadPublicKeys(filepath.Join(dir, "jwt-public.pem"))
	if err != nil || len(keys) != 1 || keys[0].alg != "EdDSA" {
		t.Fatalf("jwt-public.pem: %+v %v", keys, err)
	}
	if keys[0].kid != fingerprint(signer.Public()) {
		t.Error("the pair does not match")
	}
	// A token it signs verifies against the public half.
	db, _ := mustDB(t)
	st := &store{db: db}
	tok, err := issueKey(context.Background(), st, signer, "kg@example.com", "", scopeAgent, 0)
	if err != nil {
		t.Fatal(err)
	}
	v := &verifier{keys: keys, store: st, log: slog.New(slog.NewTextHandler(io.Discard, nil)), now: time.Now}
	if _, err := v.verify(context.Background(), tok); err != nil {
		t.Errorf("a token signed by the new key: %v", err)
	}
	if _, _, err := authRun([]string{"keygen", "-dir", dir}, nil); err == nil {
		t.Error("a second keygen in the same folder succeeded")
	}
	if after, _ := os.ReadFile(privPath); !bytes.Equal(before, after) {
		t.Error("keygen overwrote jwt-private.pem")
	}
}

// TestAuthServeRefuses: `agentline serve` stops before listening on
// configurations it must not run with, and says what to fix.
func TestAuthServeRefuses(t *testing.T) {
	t.Parallel()
	const secret = "hmac-s3cret-that-must-not-be-printed"
	base := map[string]string{"DATABASE_URL": "postgres://127.0.0.1:1/none?sslmode=disable", "MCP_SERVER_PORT": "0"}
	for _, c := range []struct {
		name string
		env  map[string]string
		msg  string
	}{
		{"database without public key", map[string]string{}, "JWT_PUBLIC_KEY"},
		{"RSA-1024 public key", map[string]string{"JWT_PUBLIC_KEY": authPubPEM(t, authWeakRSA(1024))}, "2048"},
		{"RSA-512 public key", map[string]string{"JWT_PUBLIC_KEY": authPubPEM(t, authWeakRSA(512))}, "2048"},
		{"HMAC secret as public key", map[string]string{"JWT_PUBLIC_KEY": secret}, "HMAC"},
		{"bad QUESTION_TIMEOUT", map[string]string{"QUESTION_TIMEOUT": "soon"}, "QUESTION_TIMEOUT"},
	} {
		env := map[string]string{}
		for k, v := range base {
			env[k] = v
		}
		for k, v := range c.env {
			env[k] = v
		}
		_, stderr, err := authRun([]string{"serve"}, env)
		if err == nil || !strings.Contains(err.Error(), c.msg) {
			t.Errorf("%s: %v, want an error mentioning %q", c.name, err, c.msg)
		}
		if err != nil && strings.Contains(err.Error()+stderr, secret) {
			t.Errorf("%s: the secret was printed", c.name)
		}
	}
}

// FuzzAuthVerify feeds arbitrary tokens to requireKey and verify. Whatever
// comes in, the answer is the one registered key's user or a clean 401,
// never a panic or a 500. Keys, user and clock are fixed, so the seed tokens
// mean the same in every fuzz worker process.
func FuzzAuthVerify(f *testing.F) {
	db, _ := mustDB(f)
	st := &store{db: db}
	const user = "0b7e3c1e-4a8f-4d2b-9c61-5f1d2e3a4b5c"
	if _, err := db.Exec(`INSERT INTO users (id, email) VALUES ($1, 'fuzz@example.com')`, user); err != nil {
		f.Fatal(err)
	}
	seed := sha256.Sum256([]byte("agentline auth fuzz"))
	ed := ed25519.NewKeyFromSeed(seed[:])
	seed2 := sha256.Sum256([]byte("someone else"))
	other := ed25519.NewKeyFromSeed(seed2[:])
	kid := fingerprint(ed.Public())
	now := time.Unix(1_800_000_000, 0)
	claims := func(kv ...any) jwt.MapClaims {
		c := jwt.MapClaims{"sub": user, "iat": now.Unix(), "exp": now.Add(time.Hour).Unix(), "jti": "fuzz"}
		for i := 0; i < len(kv); i += 2 {
			c[kv[i].(string)] = kv[i+1]
		}
		return c
	}
	sign := func(hdr map[string]any, c jwt.MapClaims) string {
		return authSign(f, jwt.SigningMethodEdDSA, ed, hdr, c)
	}
	legit := sign(map[string]any{"kid": kid}, claims())
	second := sign(map[string]any{"kid": kid}, claims("jti", "second"))
	for _, tok := range []string{legit, second} {
		if _, err := st.addAPIKey(context.Background(), user, "fuzz", hashToken(tok), scopeAgent, nil); err != nil {
			f.Fatal(err)
		}
	}
	if _, err := db.Exec(`UPDATE api_keys SET is_active = false WHERE api_key_hash = $1`, hashToken(second)); err != nil {
		f.Fatal(err)
	}
	rsaKey := authRSAOurs()
	v := &verifier{
		keys:  []publicKey{authPub(f, ed.Public()), authPub(f, &rsaKey.PublicKey)},
		store: st, log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		now: func() time.Time { return now },
	}
	parts := strings.Split(legit, ".")
	h, p, s := parts[0], parts[1], parts[2]
	for _, tok := range []string{
		legit, second, "", " ", "a.b.c", "..", "not-a-jwt", h + "." + p, h + "." + p + ".", legit + "A", legit + "=",
		authSign(f, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, map[string]any{"kid": kid}, claims()),
		authSegment(f, map[string]any{"alg": "none"}) + "." + p + "." + s,
		authSegment(f, map[string]any{"alg": "RS256", "kid": kid}) + "." + p + "." + s,
		authSign(f, jwt.SigningMethodHS256, []byte(authPubPEM(f, ed.Public())), map[string]any{"kid": kid}, claims()),
		authSign(f, jwt.SigningMethodEdDSA, other, map[string]any{"kid": kid}, claims()),
		h + "." + strings.Split(second, ".")[1] + "." + s,
		sign(map[string]any{"kid": kid}, claims("jti", "never registered")),
		sign(map[string]any{"kid": "../../etc/passwd"}, claims()),
		sign(map[string]any{"kid": 7}, claims()),
		sign(nil, claims("exp", now.Add(-time.Hour).Unix())),
		sign(nil, claims("nbf", now.Add(time.Hour).Unix())),
		sign(nil, claims("iat", now.Add(time.Hour).Unix())),
		sign(nil, claims("sub", "admin")),
		sign(nil, claims("sub", []any{user})),
		sign(nil, claims("exp", "soon")),
		strings.Repeat("A", maxTokenLen+1),
	} {
		f.Add(tok)
	}
	f.Fuzz(func(t *testing.T, token string) {
		c, err := v.verify(context.Background(), token)
		var ae *authError
		switch {
		case err == nil:
			if token != legit || c.UserID != user {
				t.Fatalf("verify accepted %q as %+v", token, c)
			}
		case !errors.As(err, &ae):
			t.Fatalf("verify: not an auth error: %v", err)
		}

		r := httptest.NewRequest("POST", "/", nil)
		r.Header.Set("Authorization", "Bearer "+token)
		w := httptest.NewRecorder()
		passed := false
		requireKey(v, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			c, ok := callerFrom(r.Context())
			passed = ok && c.UserID == user
		})).ServeHTTP(w, r)
		if passed {
			if strings.TrimSpace(token) != legit {
				t.Fatalf("requireKey let %q through", token)
			}
			return
		}
		var body struct {
			Detail string `json:"detail"`
		}
		if w.Code != http.StatusUnauthorized || !strings.HasPrefix(w.Header().Get("WWW-Authenticate"), "Bearer") ||
			json.Unmarshal(w.Body.Bytes(), &body) != nil || body.Detail == "" {
			t.Fatalf("requireKey on %q: %d %q %s", token, w.Code, w.Header().Get("WWW-Authenticate"), w.Body.Bytes())
		}
	})
}

// TestClaimTouch: a burst of requests with a key unused for a minute writes
// its last_used_at once per replica, not once per request; a minute later,
// once again.
func TestClaimTouch(t *testing.T) {
	t.Parallel()
	v := &verifier{}
	now := time.Now()
	var wg sync.WaitGroup
	var claimed atomic.Int64
	for range 100 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if v.claimTouch("key-1", now) {
				claimed.Add(1)
			}
		}()
	}
	wg.Wait()
	if n := claimed.Load(); n != 1 {
		t.Fatalf("%d of 100 concurrent requests would write last_used_at, want 1", n)
	}
	if v.claimTouch("key-1", now.Add(59*time.Second)) {
		t.Fatal("written again within the minute")
	}
	if !v.claimTouch("key-1", now.Add(61*time.Second)) || !v.claimTouch("key-2", now) {
		t.Fatal("not written after a minute, or for another key")
	}
}
