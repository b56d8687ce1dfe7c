package main

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestTSClient runs the official TypeScript MCP client
// (scripts/tsclient/check.mjs) against the server over Streamable HTTP and
// SSE. It needs node and `npm ci --prefix scripts/tsclient`, which .ci/run
// does; without them it skips and says so.
func TestTSClient(t *testing.T) {
	t.Parallel()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node not installed: the TypeScript MCP client check needs Node.js")
	}
	if _, err := os.Stat("scripts/tsclient/node_modules/@modelcontextprotocol/sdk"); err != nil {
		t.Skip("run `npm ci --prefix scripts/tsclient` to check the TypeScript MCP client")
	}
	e := newTestEnv(t)
	key := e.mustKey(t, "ts@example.com", scopeAgent)
	person := e.mustKey(t, "ts@example.com", scopePerson) // the approval (issue 12)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, node, "scripts/tsclient/check.mjs", e.srv.URL, key, person).CombinedOutput()
	if err != nil {
		t.Fatalf("TypeScript client: %v\n%s", err, out)
	}
	for _, want := range []string{"streamable: ok", "sse: ok", "streamable: approve ok", "sse: approve ok"} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("TypeScript client output lacks %q:\n%s", want, out)
		}
	}
}
