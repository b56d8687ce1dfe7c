package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// keysList is GET /api/v1/keys decoded.
func keysList(t *testing.T, e *testEnv, key string) []keyJSON {
	t.Helper()
	code, body := e.call(t, "GET", "/api/v1/keys", key, nil)
	if code != 200 {
		t.Fatalf("GET /api/v1/keys: %d %s", code, body)
	}
	var out keysResponse
	if err := json.Unmarshal(body, &out); err != nil {
		t.Fatal(err)
	}
	return out.Keys
}

// TestKeysAPI: a person key lists its own user's keys (never a token or a
// hash), revokes one, and the revoked key is refused at once; agent keys get
// 403, another user's key id 404, a bad id 400, and revoking twice keeps the
// first revocation time.
func TestKeysAPI(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	person := e.mustKey(t, "keys@example.com", scopePerson)
	agent := e.mustKey(t, "keys@example.com", scopeAgent)
	otherPerson := e.mustKey(t, "other@example.com", scopePerson)

	keys := keysList(t, e, person)
	if len(keys) != 2 {
		t.Fatalf("want 2 keys, got %+v", keys)
	}
	var agentID, personID string
	for _, k := range keys {
		if k.Scope == scopeAgent {
			agentID = k.ID
		} else {
			personID = k.ID
			if !k.Current {
				t.Errorf("the key making the request is not marked current: %+v", k)
			}
		}
		if !k.Active || k.RevokedAt != nil || k.Name != "test" || k.CreatedAt == "" {
			t.Errorf("fresh key listed wrongly: %+v", k)
		}
	}
	_, raw := e.call(t, "GET", "/api/v1/keys", person, nil)
	for _, secret := range []string{person, agent, hashToken(person), hashToken(agent)} {
		if strings.Contains(string(raw), secret) {
			t.Fatalf("the key list shows a key or its hash: %s", raw)
		}
	}

	// Agent keys may neither list nor revoke.
	if code, body := e.call(t, "GET", "/api/v1/keys", agent, nil); code != 403 || mustJSON(t, body)["detail"] == nil {
		t.Errorf("agent key listing keys: %d %s", code, body)
	}
	if code, _ := e.call(t, "DELETE", "/api/v1/keys/"+personID, agent, nil); code != 403 {
		t.Errorf("agent key revoking a key: %d", code)
	}
	// Another user's key is a 404, and stays active.
	if code, body := e.call(t, "DELETE", "/api/v1/keys/"+agentID, otherPerson, nil); code != 404 || mustJSON(t, body)["detail"] != "not found" {
		t.Errorf("revoking another user's key: %d %s", code, body)
	}
	if len(keysList(t, e, otherPerson)) != 1 {
		t.Errorf("another user sees keys that are not theirs")
	}
	for _, bad := range []string{"nope", "1234", "%27%20OR%201=1", strings.Repeat("a", 5000)} {
		if code, body := e.call(t, "DELETE", "/api/v1/keys/"+bad, person, nil); code != 400 || mustJSON(t, body)["detail"] == nil {
			t.Errorf("DELETE /api/v1/keys/%.20s: %d %s", bad, code, body)
		}
	}
	if code, _ := e.call(t, "DELETE", "/api/v1/keys/"+newUUID(), person, nil); code != 404 {
		t.Errorf("revoking an unknown id: %d", code)
	}
	if code := authAgentMessage(t, e, agent); code != 200 {
		t.Fatalf("agent key before revocation: %d", code)
	}

	code, body := e.call(t, "DELETE", "/api/v1/keys/"+strings.ToUpper(agentID), person, nil)
	if code != 200 {
		t.Fatalf("revoke: %d %s", code, body)
	}
	var rev revokeKeyResponse
	if err := json.Unmarshal(body, &rev); err != nil {
		t.Fatal(err)
	}
	if !rev.Success || rev.Key.ID != agentID || rev.Key.Active || rev.Key.RevokedAt == nil {
		t.Fatalf("revoke answer: %s", body)
	}
	if code := authAgentMessage(t, e, agent); code != 401 {
		t.Errorf("revoked agent key still works: %d", code)
	}
	time.Sleep(10 * time.Millisecond)
	_, body = e.call(t, "DELETE", "/api/v1/keys/"+agentID, person, nil)
	var again revokeKeyResponse
	json.Unmarshal(body, &again)
	if again.Key.RevokedAt == nil || *again.Key.RevokedAt != *rev.Key.RevokedAt {
		t.Errorf("revoking twice moved revoked_at: %v then %v", *rev.Key.RevokedAt, again.Key.RevokedAt)
	}
	for _, k := range keysList(t, e, person) {
		if k.ID == agentID && (k.Active || k.RevokedAt == nil) {
			t.Errorf("revoked key listed as %+v", k)
		}
	}
	if strings.Contains(e.logs.String(), agent) {
		t.Errorf("a key is in the log")
	}
}

// TestKeysCommand: `agentline keys -user EMAIL` prints id, name, scope and
// times of each key, revoked ones with their time, never a key; it refuses
// an unknown user and a missing -user; `agentline revoke ID` sets revoked_at.
func TestKeysCommand(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	ctx := context.Background()
	agent := e.mustKey(t, "cli@example.com", scopeAgent)
	tok, err := issueKey(ctx, e.a.store, e.signer, "cli@example.com", "laptop\x1b[31m\tevil", scopePerson, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	authAgentMessage(t, e, agent) // sets last used
	var agentID string
	if err := e.db.QueryRow(`SELECT id FROM api_keys WHERE api_key_hash = $1`, hashToken(agent)).Scan(&agentID); err != nil {
		t.Fatal(err)
	}
	if _, stderr, err := authRun([]string{"revoke", agentID}, map[string]string{"DATABASE_URL": e.dsn}); err != nil {
		t.Fatalf("revoke: %v %s", err, stderr)
	}
	out, stderr, err := authRun([]string{"keys", "-user", "cli@example.com"}, map[string]string{"DATABASE_URL": e.dsn})
	if err != nil {
		t.Fatalf("keys: %v %s", err, stderr)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "ID") || !strings.Contains(lines[0], "LAST USED") {
		t.Fatalf("keys output:\n%s", out)
	}
	if strings.Contains(out, agent) || strings.Contains(out, tok) || strings.Contains(out, hashToken(agent)) || strings.Contains(out, "\x1b") {
		t.Fatalf("keys output holds a key, a hash or an escape:\n%q", out)
	}
	for _, l := range lines[1:] {
		f := strings.Fields(l)
		switch {
		case strings.HasPrefix(l, agentID):
			// id name scope created last-used expires revoked
			if len(f) != 7 || f[1] != "test" || f[2] != "agent" || f[4] == "-" || f[5] != "-" || f[6] == "-" {
				t.Errorf("revoked agent key line: %q", l)
			}
		default:
			if !strings.Contains(l, "laptop") || !strings.Contains(l, "person") || f[len(f)-1] != "-" || f[len(f)-2] == "-" {
				t.Errorf("person key line: %q", l)
			}
		}
	}
	if _, _, err := authRun([]string{"keys", "-user", "nobody@example.com"}, map[string]string{"DATABASE_URL": e.dsn}); err == nil || !strings.Contains(err.Error(), "no user") {
		t.Errorf("unknown user: %v", err)
	}
	if _, _, err := authRun([]string{"keys"}, map[string]string{"DATABASE_URL": e.dsn}); err == nil {
		t.Errorf("keys without -user succeeded")
	}
}
