package main

// approve.go is issue 12, approvals and choices: the approve MCP tool
// (Claude Code's permission-prompt contract), session rules ("Allow for
// this session"), options on ask_question, and the person's answer endpoint
// POST /api/v1/questions/{id}/answer. Approvals are questions with kind
// "approval", so they travel the same open-question, outbox and event paths.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// ---- session rules ----

// sessionRule is what "Allow for this session" allows: a tool, or for Bash
// a command's first word. ok is false for a call no rule may match.
type sessionRule struct {
	tool, prefix string
	ok           bool
}

func (r sessionRule) String() string {
	if r.prefix == "" {
		return r.tool
	}
	return r.tool + "(" + r.prefix + ")"
}

// bashUnsafe are what make a Bash command more than one plain command:
// chaining, pipes, background, substitution, redirection, line breaks.
const bashUnsafe = ";&|\n\r`<>"

// ruleFor is the session rule a call matches: for Bash the first word of
// input.command after leading VAR=value assignments, and none at all for a
// command that chains or substitutes; for any other tool the tool's name.
func ruleFor(tool string, input []byte) sessionRule {
	if tool == "" {
		return sessionRule{}
	}
	if tool != "Bash" {
		return sessionRule{tool: tool, ok: true}
	}
	var in struct {
		Command string `json:"command"`
	}
	if json.Unmarshal(input, &in) != nil {
		return sessionRule{}
	}
	cmd := in.Command
	if strings.ContainsAny(cmd, bashUnsafe) || strings.Contains(cmd, "$(") {
		return sessionRule{}
	}
	for _, w := range strings.Fields(cmd) {
		if isAssignment(w) {
			if strings.ContainsAny(w, `"'\$`) {
				return sessionRule{} // a quoted or computed value: words are not what they seem
			}
			continue
		}
		if strings.ContainsAny(w, `"'\$`) {
			return sessionRule{}
		}
		return sessionRule{tool: tool, prefix: w, ok: true}
	}
	return sessionRule{}
}

// isAssignment reports whether w is a shell VAR=value word.
func isAssignment(w string) bool {
	name, _, ok := strings.Cut(w, "=")
	if !ok || name == "" {
		return false
	}
	for i, c := range name {
		if !(c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || i > 0 && c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// ---- the approve tool ----

var approveTool = &mcp.Tool{
	Name: "approve",
	Description: `Ask the person you work for whether a tool call may run, and wait for their decision.

This is Claude Code's permission prompt tool: run claude -p --permission-prompt-tool mcp__agentline__approve. Input: tool_name and input (the tool call), optionally tool_use_id and agent_instance_id. The result is one text block: {"behavior":"allow","updatedInput":{...}} or {"behavior":"deny","message":"..."}.

If nobody decides within this call's time limit the result is a deny that says the approval is still open: calling approve again with the same tool_use_id (or the same tool_name and input) keeps waiting on the same approval without asking twice.`,
	InputSchema: map[string]any{
		"type":     "object",
		"required": []string{"tool_name", "input"},
		"properties": map[string]any{
			"tool_name":         map[string]any{"type": "string", "description": "the tool that wants to run"},
			"input":             map[string]any{"type": "object", "description": "the tool call's input"},
			"tool_use_id":       map[string]any{"type": "string", "description": "the tool call's id"},
			"agent_instance_id": map[string]any{"type": "string", "description": "the session's id (a UUID); optional"},
		},
	},
	// Either shape of Claude Code's PermissionResult.
	OutputSchema: map[string]any{
		"type":     "object",
		"required": []string{"behavior"},
		"properties": map[string]any{
			"behavior":     map[string]any{"type": "string", "enum": []string{"allow", "deny"}},
			"updatedInput": map[string]any{"type": "object"},
			"message":      map[string]any{"type": "string"},
		},
		"additionalProperties": false,
	},
}

type approveIn struct {
	ToolName        string          `json:"tool_name"`
	Input           json.RawMessage `json:"input"`
	ToolUseID       string          `json:"tool_use_id,omitempty"`
	AgentInstanceID string          `json:"agent_instance_id,omitempty"`
}

// permissionAllow and permissionDeny are Claude Code's PermissionResult:
// exactly these keys, in this order.
type permissionAllow struct {
	Behavior     string          `json:"behavior"`
	UpdatedInput json.RawMessage `json:"updatedInput"`
}

type permissionDeny struct {
	Behavior string `json:"behavior"`
	Message  string `json:"message"`
}

// deniedByPerson is the deny message when the person gave no words.
const deniedByPerson = "Denied by the person."

// maxToolInput bounds a stored tool input.
const maxToolInput = 256 << 10

// maxNumberChars bounds a number in a tool input as written (a float64's
// largest, written out in full, is 309 digits).
const maxNumberChars = 400

// canonicalObject re-encodes a JSON object (numbers kept as written) as
// PostgreSQL's jsonb stores it, or says what is wrong with raw: not an
// object, or a number jsonb or a float64 cannot hold. A NUL, which jsonb
// cannot hold, becomes U+FFFD in strings and keys.
func canonicalObject(raw json.RawMessage) ([]byte, string) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v map[string]any
	if err := dec.Decode(&v); err != nil || v == nil {
		return nil, "must be a JSON object (the tool call's input)"
	}
	clean, bad := jsonbSafe(v)
	if bad != "" {
		return nil, "holds the number " + cutChars(bad, 40) + ", beyond the range of a 64-bit float"
	}
	b, err := json.Marshal(clean)
	if err != nil {
		return nil, "must be a JSON object (the tool call's input)"
	}
	return b, ""
}

// jsonbSafe returns v (decoded with UseNumber) with every NUL in its strings
// and keys replaced by U+FFFD, or the first number it holds that is out of
// a float64's range (an overflow, an underflow to zero, or over
// maxNumberChars).
func jsonbSafe(v any) (any, string) {
	switch v := v.(type) {
	case string:
		return strings.ReplaceAll(v, "\x00", "\uFFFD"), ""
	case json.Number:
		s := string(v)
		f, err := strconv.ParseFloat(s, 64)
		mantissa, _, _ := strings.Cut(strings.ToLower(s), "e")
		if len(s) > maxNumberChars || err != nil || (f == 0 && strings.ContainsAny(mantissa, "123456789")) {
			return nil, s
		}
		return v, ""
	case []any:
		for i, e := range v {
			c, bad := jsonbSafe(e)
			if bad != "" {
				return nil, bad
			}
			v[i] = c
		}
		return v, ""
	case map[string]any:
		out := make(map[string]any, len(v))
		for k, e := range v {
			c, bad := jsonbSafe(e)
			if bad != "" {
				return nil, bad
			}
			out[strings.ReplaceAll(k, "\x00", "\uFFFD")] = c
		}
		return out, ""
	}
	return v, ""
}

// permissionResult is the tool result: the one text block Claude Code
// reads, and the same object as structured content.
func permissionResult(v any) (*mcp.CallToolResult, json.RawMessage, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, nil, err
	}
	return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{Text: string(b)}}}, json.RawMessage(b), nil
}

// approvalContent is the approval's text in the timeline and notifications.
func approvalContent(tool string, input []byte) string {
	var in struct {
		Command string `json:"command"`
	}
	detail := string(input)
	if json.Unmarshal(input, &in) == nil && in.Command != "" {
		detail = in.Command
	}
	return "Approve " + tool + ": " + cutChars(detail, 500)
}

// approveSession picks the approval's session: agent_instance_id, else the
// X-Agentline-Session header, else the key's user's most recently active
// ACTIVE session of this agent type, else a new one.
func (m *mcpServer) approveSession(ctx context.Context, who mcpCaller, in approveIn) (id string, create bool, err error) {
	if in.AgentInstanceID != "" {
		id, err = uuidField("agent_instance_id", in.AgentInstanceID)
		return id, false, err
	}
	if who.sessionHeader != "" {
		id, ok := parseUUID(who.sessionHeader)
		if !ok {
			return "", false, errors.New("the X-Agentline-Session header must be a session id (a UUID)")
		}
		// A fixed header names a session the first call may create.
		return id, true, nil
	}
	id, err = m.a.store.latestActiveSession(ctx, who.UserID, who.agentType)
	if err != nil || id != "" {
		return id, false, err
	}
	return newUUID(), true, nil
}

// checkToolCall validates a tool call to approve (the approve tool's, or a
// PermissionRequest hook's): its tool name, its input (a JSON object,
// inputField names it) and tool_use_id. It returns the cleaned name and the
// canonical input, or a badRequest that says what is wrong.
func checkToolCall(toolName, inputField string, rawInput json.RawMessage, toolUseID string) (string, []byte, error) {
	tool := strings.TrimSpace(cleanText(toolName))
	if tool == "" || utf8.RuneCountInString(tool) > 200 {
		return "", nil, badRequestf("tool_name must be 1 to 200 characters")
	}
	if len(rawInput) > maxToolInput {
		return "", nil, badRequestf("%s is over %d bytes", inputField, maxToolInput)
	}
	input, wrong := canonicalObject(rawInput)
	if wrong != "" {
		return "", nil, badRequestf("%s %s", inputField, wrong)
	}
	if len(toolUseID) > 200 {
		return "", nil, badRequestf("tool_use_id is over 200 characters")
	}
	return tool, input, nil
}

// awaitApproval waits until approval ap of the session is decided, closed,
// ended or expired, or limit passes (see waitAnswer). It returns where ap
// stands then.
func (a *app) awaitApproval(ctx context.Context, c caller, sid string, ap approval, limit, every time.Duration, report func() error) (approval, error) {
	err := a.waitAnswer(ctx, c, sid, ap.Left, limit, every, report, func() (bool, error) {
		o, err := a.store.approvalOutcome(ctx, c.UserID, sid, ap.ID, a.cfg.questionTimeout)
		if err == nil {
			o.Resumed, o.Left = ap.Resumed, ap.Left
			ap = o
		}
		return err != nil || ap.State != questionOpen, err
	})
	return ap, err
}

func (m *mcpServer) approve(ctx context.Context, who mcpCaller, req *mcp.CallToolRequest, in approveIn) (*mcp.CallToolResult, json.RawMessage, error) {
	tool, input, err := checkToolCall(in.ToolName, "input", in.Input, in.ToolUseID)
	if err != nil {
		return nil, nil, err
	}
	sid, create, err := m.approveSession(ctx, who, in)
	if err != nil {
		return nil, nil, m.storeToolError(ctx, "approve", err)
	}
	timeout := m.a.cfg.questionTimeout
	ap, err := m.a.store.askApproval(ctx, who.UserID, approvalRequest{
		SessionID: sid, AgentType: who.agentType, Create: create, ToolName: tool, Input: input,
		ToolUseID: cleanText(in.ToolUseID), Content: approvalContent(tool, input), Rule: ruleFor(tool, input),
	}, timeout)
	if err != nil {
		return nil, nil, m.storeToolError(ctx, "approve", err)
	}
	if ap.State == questionOpen {
		every, report := m.progress(ctx, req)
		if ap, err = m.a.awaitApproval(ctx, who.caller, sid, ap, m.a.cfg.callLimit, every, report); err != nil {
			return nil, nil, m.storeToolError(ctx, "approve", err)
		}
	}
	switch ap.State {
	case questionAnswered:
		if ap.Decision == decisionDeny {
			msg := ap.Message
			if msg == "" {
				msg = deniedByPerson
			}
			return permissionResult(permissionDeny{"deny", msg})
		}
		return permissionResult(permissionAllow{"allow", input})
	case questionEnded:
		return permissionResult(permissionDeny{"deny", "The session ended before the person decided (approval " + ap.ID + ")."})
	case questionExpired:
		return permissionResult(permissionDeny{"deny", fmt.Sprintf("Nobody decided within %s (approval %s); it is closed.", timeout, ap.ID)})
	}
	// Claude Code has no "pending": a deny that says the approval waits.
	return permissionResult(permissionDeny{"deny", fmt.Sprintf(
		"No decision yet: approval %s is still open and waiting for the person. Call approve again with the same tool_use_id (or the same tool_name and input) to keep waiting; it does not ask twice.", ap.ID)})
}

// ---- options on ask_question ----

const (
	maxOptions     = 10
	maxOptionChars = 200
)

// checkOptions validates ask_question's options and returns them as JSON
// (nil for none).
func checkOptions(options []string, allowText *bool) ([]byte, bool, error) {
	at := allowText == nil || *allowText
	if options == nil {
		if !at {
			return nil, true, errors.New("allow_text may be false only with options")
		}
		return nil, true, nil
	}
	if len(options) < 1 || len(options) > maxOptions {
		return nil, at, fmt.Errorf("options must hold 1 to %d strings (got %d)", maxOptions, len(options))
	}
	seen := map[string]bool{}
	clean := make([]string, 0, len(options))
	for i, o := range options {
		o = strings.TrimSpace(cleanText(o))
		if n := utf8.RuneCountInString(o); n < 1 || n > maxOptionChars {
			return nil, at, fmt.Errorf("options[%d] must be 1 to %d characters", i, maxOptionChars)
		}
		if seen[o] {
			return nil, at, fmt.Errorf("options[%d] duplicates an earlier option: options must be distinct", i)
		}
		seen[o] = true
		clean = append(clean, o)
	}
	b, _ := json.Marshal(clean)
	return b, at, nil
}

// ---- POST /api/v1/questions/{id}/answer ----

type answerRequest struct {
	Decision *string `json:"decision"`
	Message  *string `json:"message"`
	Text     *string `json:"text"`
	Option   *string `json:"option"`
}

type answerResponse struct {
	ID        string  `json:"id"`
	SessionID string  `json:"session_id"`
	Kind      string  `json:"kind"`
	State     string  `json:"state"`
	Decision  *string `json:"decision,omitempty"`
	Message   *string `json:"message,omitempty"`
	Answer    *string `json:"answer,omitempty"`
	Rule      *string `json:"rule,omitempty"`
}

// validateAnswer checks the person's answer against question q.
func validateAnswer(req answerRequest, q questionFields) (personAnswer, error) {
	if q.Kind.String == "approval" {
		if req.Text != nil || req.Option != nil {
			return personAnswer{}, badRequestf("an approval takes decision (allow, allow_session or deny), not text or option")
		}
		if req.Decision == nil || !slices.Contains([]string{decisionAllow, decisionAllowSession, decisionDeny}, *req.Decision) {
			return personAnswer{}, badRequestf("decision must be allow, allow_session or deny")
		}
		msg := deref(req.Message)
		if utf8.RuneCountInString(msg) > 2000 {
			return personAnswer{}, badRequestf("message must be at most 2000 characters")
		}
		if *req.Decision != decisionDeny && msg != "" {
			return personAnswer{}, badRequestf("message goes with deny only")
		}
		return personAnswer{Decision: *req.Decision, Message: msg}, nil
	}
	if req.Decision != nil {
		return personAnswer{}, badRequestf("a question takes text or option, not decision")
	}
	var options []string
	if len(q.Options) > 0 {
		json.Unmarshal(q.Options, &options)
	}
	switch {
	case req.Option != nil && req.Text != nil:
		return personAnswer{}, badRequestf("send text or option, not both")
	case req.Option != nil:
		if !slices.Contains(options, *req.Option) {
			return personAnswer{}, badRequestf("option must be one of the question's options")
		}
		return personAnswer{Text: *req.Option}, nil
	case req.Text != nil:
		if strings.TrimSpace(cleanText(*req.Text)) == "" {
			return personAnswer{}, badRequestf("text must not be empty")
		}
		if slices.Contains(options, strings.TrimSpace(*req.Text)) {
			return personAnswer{Text: strings.TrimSpace(*req.Text)}, nil
		}
		if !q.AllowText {
			return personAnswer{}, badRequestf("this question takes one of its options only")
		}
		return personAnswer{Text: *req.Text}, nil
	}
	return personAnswer{}, badRequestf("send text or option")
}

func (a *app) handleAnswer() http.HandlerFunc {
	return handleJSON(a, func(r *http.Request, c caller, req answerRequest) (any, error) {
		id, err := uuidField("id", r.PathValue("id"))
		if err != nil {
			return nil, err
		}
		res, err := a.store.answerQuestion(r.Context(), c.UserID, id, a.cfg.questionTimeout, func(q questionFields) (personAnswer, error) {
			return validateAnswer(req, q)
		})
		if err != nil {
			return nil, err
		}
		return toAnswerResponse(res), nil
	})
}

func toAnswerResponse(res answered) answerResponse {
	out := answerResponse{ID: res.ID, SessionID: res.SessionID, Kind: res.Kind, State: "answered"}
	opt := func(s string) *string {
		if s == "" {
			return nil
		}
		return &s
	}
	out.Decision, out.Message, out.Answer, out.Rule = opt(res.Decision), opt(res.Message), opt(res.Answer), opt(res.Rule)
	return out
}

// ---- read API fields ----

// questionJSONFields are a question's or approval's fields in the read API
// and the event stream: kind, options, the tool call (input as JSON, never
// rendered) and the decision.
type questionJSONFields struct {
	Kind            string          `json:"kind,omitempty"` // "question" or "approval"
	Options         []string        `json:"options,omitempty"`
	AllowText       *bool           `json:"allow_text,omitempty"`
	ToolName        string          `json:"tool_name,omitempty"`
	ToolInput       json.RawMessage `json:"tool_input,omitempty"`
	Decision        string          `json:"decision,omitempty"`
	DecisionMessage string          `json:"decision_message,omitempty"`
	DecidedByRule   string          `json:"decided_by_rule,omitempty"`
}

func toQuestionJSONFields(requiresInput bool, q questionFields) questionJSONFields {
	var j questionJSONFields
	switch {
	case q.Kind.String == "approval":
		j.Kind = "approval"
		j.ToolName, j.ToolInput = q.ToolName.String, json.RawMessage(q.ToolInput)
		j.Decision, j.DecisionMessage, j.DecidedByRule = q.Decision.String, q.DecisionMessage.String, q.DecidedByRule.String
	case requiresInput:
		j.Kind = "question"
		if len(q.Options) > 0 {
			json.Unmarshal(q.Options, &j.Options)
			at := q.AllowText
			j.AllowText = &at
		}
	}
	return j
}

// withOpenQuestions replaces each listed session's open question by the
// one openQuestions finds (an undecided approval stays open after the
// person's messages; a decided one is closed).
func (a *app) withOpenQuestions(ctx context.Context, userID string, page *sessionsPage) error {
	ids := make([]string, 0, len(page.Sessions))
	for _, s := range page.Sessions {
		ids = append(ids, s.ID)
	}
	if len(ids) == 0 {
		return nil
	}
	open, senders, err := a.store.openQuestions(ctx, userID, ids)
	if err != nil {
		return err
	}
	for i := range page.Sessions {
		s := &page.Sessions[i]
		s.LastSender = senders[s.ID]
		s.OpenQuestion = nil
		if o, ok := open[s.ID]; ok {
			s.OpenQuestion = &questionJSON{ID: o.ID, Content: o.Content, questionJSONFields: toQuestionJSONFields(true, o.Q)}
		}
	}
	return nil
}

// ---- the event stream ----

// decisionJSON is a "decision" event: the person decided an approval.
type decisionJSON struct {
	SessionID       string `json:"session_id"`
	ID              string `json:"id"`
	Kind            string `json:"kind"`
	Decision        string `json:"decision"`
	DecisionMessage string `json:"decision_message,omitempty"`
}

// sendDecisions sends a "decision" event for each approval of the session
// that the change to ss decided: a decision moves the session's last
// activity to the moment it was made, so it is sent once, with that change.
func (s *eventStream) sendDecisions(ctx context.Context, ss sessionSummary) error {
	ds, err := s.a.store.decisionsAt(ctx, s.userID, ss.ID, ss.LastActivityAt)
	if err != nil {
		return err
	}
	for _, d := range ds {
		data, _ := json.Marshal(decisionJSON{SessionID: ss.ID, ID: d.ID, Kind: "approval", Decision: d.Decision, DecisionMessage: d.Message})
		if err := s.send("decision", "", data); err != nil {
			return err
		}
	}
	return nil
}
