// check.mjs runs the official TypeScript MCP client against an agentline
// server, over Streamable HTTP and over SSE: list the tools, log a step, ask
// a question answered through REST while it waits, end the session; with a
// person key also an approval (the approve tool, Claude Code's permission
// prompt contract) allowed through the answer endpoint while it waits. Over
// Streamable HTTP it also prints the negotiated protocol revision and
// cancels a waiting call ("streamable: cancel sent").
// Usage: node check.mjs BASE_URL AGENT_KEY [PERSON_KEY]   (exits non-zero on any failure)
import assert from "node:assert/strict";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { SSEClientTransport } from "@modelcontextprotocol/sdk/client/sse.js";

const [base, key, personKey] = process.argv.slice(2);
const headers = { Authorization: `Bearer ${key}` };

for (const kind of ["streamable", "sse"]) {
  const client = new Client({ name: "agentline-ts-check", version: "1.0.0" });
  const transport = kind === "streamable"
    ? new StreamableHTTPClientTransport(new URL(base + "/mcp/"), { requestInit: { headers } })
    : new SSEClientTransport(new URL(base + "/mcp/sse"), {
        requestInit: { headers },
        eventSourceInit: { fetch: (u, i) => fetch(u, { ...i, headers: { ...(i?.headers || {}), ...headers } }) },
      });
  await client.connect(transport);

  const { tools } = await client.listTools();
  assert.deepEqual(tools.map((t) => t.name).sort(), ["approve", "ask_question", "end_session", "log_step"]);

  const step = await client.callTool({ name: "log_step", arguments: { step_description: `hello from the TypeScript client (${kind})` } });
  assert.equal(step.isError ?? false, false, JSON.stringify(step));
  const sid = step.structuredContent.agent_instance_id;
  assert.equal(step.structuredContent.step_number, 1);

  setTimeout(() => fetch(base + "/api/v1/messages/user", {
    method: "POST",
    headers: { ...headers, "Content-Type": "application/json" },
    body: JSON.stringify({ agent_instance_id: sid, content: "yes, go ahead", mark_as_read: false }),
  }), 300);
  const ans = await client.callTool({ name: "ask_question", arguments: { agent_instance_id: sid, question_text: "Proceed?" } });
  assert.equal(ans.isError ?? false, false, JSON.stringify(ans));
  assert.equal(ans.structuredContent.status, "answered");
  assert.equal(ans.structuredContent.answer, "yes, go ahead");

  if (kind === "streamable") {
    // Cancelling a waiting call: the SDK rejects the promise and POSTs
    // notifications/cancelled, keeping the call's own connection open. The
    // Go test checks, while this waits, that the server's waiting call ended.
    console.log(`streamable: protocol ${transport.protocolVersion}`);
    const ac = new AbortController();
    const pending = client.callTool({ name: "ask_question", arguments: { agent_instance_id: sid, question_text: "Cancel me?" } }, undefined, { signal: ac.signal });
    await new Promise((res) => setTimeout(res, 500));
    ac.abort();
    await assert.rejects(pending);
    console.log("streamable: cancel sent");
    await new Promise((res) => setTimeout(res, 3000));
  }

  if (personKey) {
    // The person allows the approval once it is the session's open question.
    const person = { Authorization: `Bearer ${personKey}`, "Content-Type": "application/json" };
    const allow = (async () => {
      for (let i = 0; i < 100; i++) {
        const r = await (await fetch(base + "/api/v1/sessions", { headers: person })).json();
        const q = r.sessions.find((s) => s.id === sid)?.open_question;
        if (q && q.kind === "approval") {
          assert.equal(q.tool_name, "Bash");
          const a = await fetch(base + `/api/v1/questions/${q.id}/answer`, { method: "POST", headers: person, body: JSON.stringify({ decision: "allow" }) });
          assert.equal(a.status, 200);
          return;
        }
        await new Promise((res) => setTimeout(res, 100));
      }
      throw new Error("the approval never became the open question");
    })();
    const input = { command: "npm test", timeout: 60000 };
    const ap = await client.callTool({ name: "approve", arguments: { tool_name: "Bash", input, tool_use_id: `toolu_ts_${kind}`, agent_instance_id: sid } });
    await allow;
    assert.equal(ap.isError ?? false, false, JSON.stringify(ap));
    assert.equal(ap.content.length, 1);
    assert.equal(ap.content[0].type, "text");
    assert.equal(ap.content[0].text, JSON.stringify({ behavior: "allow", updatedInput: input }));
    assert.deepEqual(ap.structuredContent, { behavior: "allow", updatedInput: input });
    console.log(`${kind}: approve ok`);
  }

  const end = await client.callTool({ name: "end_session", arguments: { agent_instance_id: sid } });
  assert.equal(end.structuredContent.final_status, "COMPLETED");
  console.log(`${kind}: ok`);
  await client.close();
}
