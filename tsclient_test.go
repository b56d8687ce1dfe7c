package main

import (
	"bufio"
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
	cmd := exec.CommandContext(ctx, node, "scripts/tsclient/check.mjs", e.srv.URL, key, person)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		out.WriteString(sc.Text() + "\n")
		if sc.Text() == "streamable: cancel sent" {
			// The client keeps the cancelled call's connection open: its
			// notifications/cancelled alone must end the wait (issue 14),
			// well before the script goes on 3 s later.
			for deadline := time.Now().Add(2 * time.Second); e.a.hub.waiters() != 0; time.Sleep(5 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Errorf("the cancelled call still waits on the server 2 s after notifications/cancelled")
					break
				}
			}
		}
		if v, ok := strings.CutPrefix(sc.Text(), "streamable: protocol "); ok {
			t.Logf("TypeScript SDK client negotiated MCP %s", v)
		}
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("TypeScript client: %v\n%s%s", err, out.String(), stderr.String())
	}
	for _, want := range []string{"streamable: ok", "sse: ok", "streamable: approve ok", "sse: approve ok", "streamable: cancel sent"} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("TypeScript client output lacks %q:\n%s", want, out.String())
		}
	}
}
