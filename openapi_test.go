package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/pb33f/libopenapi"
	validator "github.com/pb33f/libopenapi-validator"
)

// notREST are the routes openapi.json leaves out on purpose, each with why.
// A route in neither this list nor the document fails TestOpenAPIRoutes.
var notREST = map[string]string{
	"GET /{$}":     "the inbox page (HTML)",
	"GET /app.js":  "the inbox page's script",
	"GET /app.css": "the inbox page's style sheet",
	"/mcp":         "MCP (JSON-RPC over Streamable HTTP), described by MCP's tools/list",
	"/mcp/":        "MCP (JSON-RPC over Streamable HTTP), described by MCP's tools/list",
	"/mcp/sse":     "MCP's legacy SSE transport",
	"/api/":        "the JSON 404 for every path no route matches",
}

// openAPIOperations returns "METHOD /path" for every operation in the
// document, with its x-agentline-key and security.
type openAPIOp struct {
	key      string // x-agentline-key: "agent", "person" or "" (no key)
	noKey    bool   // security: [] (no key needed)
	statuses []string
}

func openAPIOperations(t testing.TB) map[string]openAPIOp {
	t.Helper()
	ops, err := parseOpenAPIOps()
	if err != nil {
		t.Fatalf("openapi.json: %v", err)
	}
	return ops
}

func parseOpenAPIOps() (map[string]openAPIOp, error) {
	var doc struct {
		Paths map[string]map[string]struct {
			Key       string                     `json:"x-agentline-key"`
			Security  *[]any                     `json:"security"`
			Responses map[string]json.RawMessage `json:"responses"`
		} `json:"paths"`
	}
	if err := json.Unmarshal(openAPIDoc, &doc); err != nil {
		return nil, err
	}
	ops := map[string]openAPIOp{}
	for path, item := range doc.Paths {
		for method, op := range item {
			var statuses []string
			for s := range op.Responses {
				statuses = append(statuses, s)
			}
			sort.Strings(statuses)
			ops[strings.ToUpper(method)+" "+path] = openAPIOp{key: op.Key, noKey: op.Security != nil && len(*op.Security) == 0, statuses: statuses}
		}
	}
	return ops, nil
}

// TestOpenAPIRoutes: every route registered in routeTable is in openapi.json
// (or in notREST, with a reason), and every documented operation is routed.
func TestOpenAPIRoutes(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	ops := openAPIOperations(t)
	routed := map[string]bool{}
	for _, rt := range e.a.routeTable() {
		routed[rt.pattern] = true
		if _, ok := notREST[rt.pattern]; ok {
			continue
		}
		if _, ok := ops[rt.pattern]; !ok {
			t.Errorf("route %q is not in openapi.json: document it (or add it to notREST with a reason)", rt.pattern)
		}
	}
	for op := range ops {
		if !routed[op] {
			t.Errorf("openapi.json documents %q, which routeTable does not register", op)
		}
	}
	for p := range notREST {
		if !routed[p] {
			t.Errorf("notREST lists %q, which is not routed any more", p)
		}
	}
}

// TestOpenAPIDocument: openapi.json is valid OpenAPI 3.1 by libopenapi's
// validator (the OAS 3.1 JSON Schema), and the key each operation documents
// is the key the server asks for: no key where security is [], 401 without
// one elsewhere, 403 for an agent key exactly where x-agentline-key is
// person (and the 403 is documented there).
func TestOpenAPIDocument(t *testing.T) {
	t.Parallel()
	doc, err := libopenapi.NewDocument(openAPIDoc)
	if err != nil {
		t.Fatal(err)
	}
	if v := doc.GetVersion(); v != "3.1.0" {
		t.Fatalf("openapi %q, want 3.1.0", v)
	}
	if _, err := doc.BuildV3Model(); err != nil {
		t.Fatalf("build model: %v", err)
	}
	v, errs := validator.NewValidator(doc)
	if len(errs) > 0 {
		t.Fatalf("validator: %v", errs)
	}
	if ok, verrs := v.ValidateDocument(); !ok {
		for _, e := range verrs {
			t.Errorf("openapi.json is not valid OpenAPI 3.1: %s", e.Error())
			for _, se := range e.SchemaValidationErrors {
				t.Errorf("  %s at %s", se.Reason, se.FieldPath+" "+se.KeywordLocation)
			}
		}
	}

	e := newTestEnv(t)
	agent := e.mustKey(t, "oa@example.com", scopeAgent)
	for name, op := range openAPIOperations(t) {
		method, path, _ := strings.Cut(name, " ")
		path = strings.NewReplacer("{id}", newUUID(), "{message_id}", newUUID()).Replace(path)
		if path == "/api/v1/messages/pending" {
			path += "?agent_instance_id=" + newUUID() // no long-poll
		}
		noKey, _ := e.call(t, method, path, "", nil)
		withAgent, _ := e.call(t, method, path, agent, "{}")
		switch {
		case op.noKey:
			// The capability endpoint needs no key but a live capability:
			// a made-up one is gone (410), never a 401.
			if noKey != 200 && !(strings.HasPrefix(path, "/api/v1/act/") && noKey == 410) {
				t.Errorf("%s: documented as needing no key, got %d without one", name, noKey)
			}
		case noKey != 401 || !slices.Contains(op.statuses, "401"):
			t.Errorf("%s: without a key %d (documented: %v)", name, noKey, op.statuses)
		case op.key == "person":
			if withAgent != 403 || !slices.Contains(op.statuses, "403") {
				t.Errorf("%s: documented for person keys; an agent key got %d (documented: %v)", name, withAgent, op.statuses)
			}
		case op.key == "agent":
			if withAgent == 403 || slices.Contains(op.statuses, "403") {
				t.Errorf("%s: documented for any key; an agent key got %d (documented: %v)", name, withAgent, op.statuses)
			}
		default:
			t.Errorf("%s: no x-agentline-key and not security: []", name)
		}
	}
}

// ---- response validation ----

var (
	openAPIOnce      sync.Once
	openAPIValidator validator.Validator
	openAPIErr       error
	openAPIMu        sync.Mutex // the validator is used by one test at a time
	openAPISeen      = map[string]bool{}
)

// checkOpenAPIResponse validates a response a test received from the REST
// API against openapi.json: its status must be documented for the
// operation, and its body must match the documented schema. e.call does it
// for every response, so each REST test checks the document too.
func checkOpenAPIResponse(t testing.TB, req *http.Request, resp *http.Response, body []byte) {
	t.Helper()
	if _, bench := t.(*testing.B); bench {
		return
	}
	p := req.URL.Path
	if p != "/health" && (!strings.HasPrefix(p, "/api/v1/") || !openAPIRouted(req)) {
		return // not a documented endpoint (a 404 for a path nobody routes, MCP, the page)
	}
	openAPIOnce.Do(func() {
		doc, err := libopenapi.NewDocument(openAPIDoc)
		if err != nil {
			openAPIErr = err
			return
		}
		v, errs := validator.NewValidator(doc)
		if len(errs) > 0 {
			openAPIErr = fmt.Errorf("%v", errs)
			return
		}
		openAPIValidator = v
	})
	if openAPIErr != nil {
		t.Fatalf("openapi.json: %v", openAPIErr)
	}
	r := resp
	r.Body = io.NopCloser(bytes.NewReader(body))
	openAPIMu.Lock()
	ok, errs := openAPIValidator.ValidateHttpResponse(req, r)
	openAPISeen[req.Method+" "+p] = true
	openAPIMu.Unlock()
	if !ok {
		for _, e := range errs {
			msg := e.Error()
			for _, se := range e.SchemaValidationErrors {
				msg += "; " + se.Reason + " at " + se.FieldPath + " " + se.KeywordLocation
			}
			t.Errorf("%s %s answered %d, which openapi.json does not describe: %s\nbody: %.300s", req.Method, req.URL.RequestURI(), resp.StatusCode, msg, body)
		}
	}
}

// openAPIRouted reports whether req reaches a documented route (and not the
// /api/ catch-all): a request the mux sends elsewhere says nothing about the
// document.
func openAPIRouted(req *http.Request) bool {
	openAPIRouteOnce.Do(func() {
		openAPIMux = http.NewServeMux()
		ops, _ := parseOpenAPIOps() // a broken document fails TestOpenAPIDocument
		for op := range ops {
			openAPIMux.Handle(op, http.NotFoundHandler())
		}
	})
	_, pattern := openAPIMux.Handler(req)
	return pattern != ""
}

var (
	openAPIRouteOnce sync.Once
	openAPIMux       *http.ServeMux
)

// TestOpenAPIResponses: at least one answer from every documented
// operation, the successful one, validates against openapi.json (e.call
// validates each answer), and so do its documented errors that are easy to
// provoke. The event stream is checked by its headers.
func TestOpenAPIResponses(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	e := newTestEnv(t, withRateLimit(t, "1/m,burst=1000", clock))
	agent := e.mustKey(t, "oa-resp@example.com", scopeAgent)
	person := e.mustKey(t, "oa-resp@example.com", scopePerson)
	sid := newUUID()
	ok := func(method, path, key string, body any) map[string]any {
		t.Helper()
		code, out := e.call(t, method, path, key, body)
		if code != 200 {
			t.Fatalf("%s %s: %d %s", method, path, code, out)
		}
		return mustJSON(t, out)
	}
	want := func(status int, method, path, key string, body any) {
		t.Helper()
		if code, out := e.call(t, method, path, key, body); code != status {
			t.Errorf("%s %s: %d %s, want %d", method, path, code, out, status)
		}
	}
	ok("GET", "/health", "", nil)
	ok("GET", "/api/v1/openapi.json", "", nil)
	first := ok("POST", "/api/v1/messages/agent", agent, map[string]any{"agent_instance_id": sid, "agent_type": "claude-code", "content": "step one"})
	ok("POST", "/api/v1/messages/user", person, map[string]any{"agent_instance_id": sid, "content": "feedback", "mark_as_read": false})
	ok("POST", "/api/v1/messages/agent", agent, map[string]any{"agent_instance_id": sid, "content": "step two", "git_diff": "diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n"})
	ok("GET", "/api/v1/messages/pending?agent_instance_id="+sid, agent, nil)
	ok("GET", "/api/v1/sessions?limit=1", person, nil)
	ok("GET", "/api/v1/sessions/"+sid+"/messages?limit=1", person, nil)
	ok("PATCH", "/api/v1/messages/"+first["message_id"].(string)+"/request-input", agent, nil)
	ok("GET", "/api/v1/sessions?status=awaiting_input", person, nil) // an open question in the list
	keys := ok("GET", "/api/v1/keys", person, nil)["keys"].([]any)
	var agentKeyID string
	for _, k := range keys {
		if k.(map[string]any)["scope"] == scopeAgent {
			agentKeyID = k.(map[string]any)["id"].(string)
		}
	}
	ok("POST", "/api/v1/sessions/end", agent, map[string]any{"agent_instance_id": sid})

	// Errors.
	want(400, "POST", "/api/v1/messages/agent", agent, "{")
	want(400, "GET", "/api/v1/sessions?limit=0", person, nil)
	want(401, "GET", "/api/v1/keys", "", nil)
	want(403, "GET", "/api/v1/sessions", agent, nil)
	want(404, "POST", "/api/v1/messages/user", person, map[string]any{"agent_instance_id": newUUID(), "content": "x"})
	want(404, "GET", "/api/v1/sessions/"+newUUID()+"/messages", person, nil)
	want(409, "PATCH", "/api/v1/messages/"+first["message_id"].(string)+"/request-input", agent, nil)
	want(413, "POST", "/api/v1/messages/agent", agent, strings.Repeat(" ", maxBody+1))
	want(200, "DELETE", "/api/v1/keys/"+agentKeyID, person, nil)
	want(401, "POST", "/api/v1/sessions/end", agent, map[string]any{"agent_instance_id": sid})
	for i := 0; i < 1000; i++ {
		e.call(t, "GET", "/api/v1/keys", person, nil)
	}
	want(429, "GET", "/api/v1/keys", person, nil)

	// The event stream: status and content type, then it is left.
	req, _ := http.NewRequest("GET", e.srv.URL+"/api/v1/events", nil)
	other := e.mustKey(t, "oa-resp@example.com", scopePerson)
	req.Header.Set("Authorization", "Bearer "+other)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Errorf("events: %d %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	checkOpenAPIResponse(t, req, resp, nil)
}

// TestOpenAPIValidatorCatches: the response check is not a rubber stamp:
// a body off its schema and an undocumented status both fail it.
func TestOpenAPIValidatorCatches(t *testing.T) {
	t.Parallel()
	doc, err := libopenapi.NewDocument(openAPIDoc)
	if err != nil {
		t.Fatal(err)
	}
	v, _ := validator.NewValidator(doc)
	check := func(status int, body string) bool {
		req, _ := http.NewRequest("GET", "http://127.0.0.1:1/api/v1/keys", nil)
		resp := &http.Response{StatusCode: status, Header: http.Header{"Content-Type": {"application/json"}},
			Body: io.NopCloser(strings.NewReader(body)), Request: req}
		ok, _ := v.ValidateHttpResponse(req, resp)
		return ok
	}
	if !check(200, `{"keys":[]}`) {
		t.Fatal("a correct answer fails")
	}
	for _, bad := range []struct {
		status int
		body   string
	}{
		{200, `{"keys":[{"id":"x"}]}`},
		{200, `{"keys":[], "api_key_hash":"…"}`},
		{200, `{}`},
		{404, `{"detail":"not found"}`}, // GET /api/v1/keys has no 404
		{418, `{"detail":"teapot"}`},
		{401, `{"message":"no"}`},
	} {
		if check(bad.status, bad.body) {
			t.Errorf("%d %s passed validation", bad.status, bad.body)
		}
	}
}
