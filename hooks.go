package main

// hooks.go is issue 15: Claude Code's hooks (type "http"), POSTed by Claude
// Code itself to POST /api/v1/hooks/claude-code, and the person's Away
// switch at /api/v1/presence. It stands alone because its input and output
// are Claude Code's hook contract, not agentline's API: one endpoint takes
// every event as Claude Code sends it and answers in Claude Code's hook
// output format. The work itself is not new: a PermissionRequest while the
// person is away is an approval of approve.go (same card, notification,
// session rules and answer endpoint), and the rest are timeline steps and
// outbox events of the store.

import (
	"cmp"
	"encoding/json"
	"net/http"
	"strings"
	"time"
)

const (
	// maxHookWait bounds HOOK_WAIT: below the PermissionRequest hook's
	// 300 s timeout, with time to answer.
	maxHookWait = 290 * time.Second
	// hookAgentType is the agent type of a session a hook creates.
	hookAgentType = "claude-code"
	// hookClosedNote closes an approval nobody decided within HOOK_WAIT:
	// Claude Code then shows its own prompt in the terminal.
	hookClosedNote = "answered at the terminal or timed out"
	// hookDeskNote marks a permission asked while the person was at the desk.
	hookDeskNote = "asked at the terminal (the person was at the desk)"
)

// hookBody is a hook's input as Claude Code sends it: a JSON object whose
// hook_event_name says which event's fields it holds (its hooks reference).
// Only the events agentline handles are decoded further, each reading its
// own fields alone: an ignored event, or another event's field, can never
// make a request fail.
type hookBody struct {
	event string
	raw   []byte
}

func (h *hookBody) UnmarshalJSON(b []byte) error {
	var e struct {
		HookEventName string `json:"hook_event_name"`
	}
	if err := json.Unmarshal(b, &e); err != nil {
		return err
	}
	h.event, h.raw = e.HookEventName, append([]byte(nil), b...)
	return nil
}

// decode reads the event's own fields into v (a hook*Input holding
// common) and returns the session id, a UUID (Claude Code's are).
func (h hookBody) decode(v any, common *hookCommon) (string, error) {
	if err := parseJSON(h.raw, v); err != nil {
		return "", err
	}
	return uuidField("session_id", common.SessionID)
}

// hookCommon holds the fields of every event that agentline reads.
type hookCommon struct {
	SessionID string `json:"session_id"`
	Cwd       string `json:"cwd"`
}

type hookPermissionInput struct {
	hookCommon
	ToolName  *string         `json:"tool_name"`
	ToolInput json.RawMessage `json:"tool_input"`
	ToolUseID string          `json:"tool_use_id"`
}

type hookNotificationInput struct {
	hookCommon
	Message          string `json:"message"`
	Title            string `json:"title"`
	NotificationType string `json:"notification_type"`
}

type hookStopInput struct {
	hookCommon
	LastAssistantMessage string `json:"last_assistant_message"`
}

// hookOutput is a hook's answer: {} (no decision: Claude Code goes on as if
// no hook had answered) or a PermissionRequest's decision.
type hookOutput struct {
	HookSpecificOutput *hookSpecific `json:"hookSpecificOutput,omitempty"`
}

type hookSpecific struct {
	HookEventName string       `json:"hookEventName"`
	Decision      hookDecision `json:"decision"`
}

// hookDecision is PermissionRequest's decision: behavior allow, or deny
// with a message for Claude.
type hookDecision struct {
	Behavior string `json:"behavior"`
	Message  string `json:"message,omitempty"`
}

// handleClaudeCodeHook answers every hook event Claude Code sends. A body
// that is not a hook input is a 400 before anything is stored; another
// user's session is a 404; an event agentline does not handle is {}
// whatever else the body holds.
func (a *app) handleClaudeCodeHook() http.HandlerFunc {
	return handleJSON(a, func(r *http.Request, c caller, in hookBody) (any, error) {
		if strings.TrimSpace(in.event) == "" {
			return nil, badRequestf("field %q is required", "hook_event_name")
		}
		switch in.event {
		case "PermissionRequest":
			var p hookPermissionInput
			sid, err := in.decode(&p, &p.hookCommon)
			if err != nil {
				return nil, err
			}
			return a.hookPermission(r, c, sid, p)
		case "Notification":
			var n hookNotificationInput
			sid, err := in.decode(&n, &n.hookCommon)
			if err != nil {
				return nil, err
			}
			return a.recordHookStep(r, c, n.Cwd, a.notificationStep(sid, n))
		case "Stop":
			var st hookStopInput
			sid, err := in.decode(&st, &st.hookCommon)
			if err != nil {
				return nil, err
			}
			return a.recordHookStep(r, c, st.Cwd, stopStep(sid, st))
		case "SessionEnd":
			var e hookCommon
			sid, err := in.decode(&e, &e)
			if err != nil {
				return nil, err
			}
			return hookOutput{}, a.store.endHookSession(r.Context(), c.UserID, sid)
		}
		return hookOutput{}, nil // any other event: nothing stored
	})
}

// hookPermission is a PermissionRequest. At the desk it is recorded and
// answered {} at once, so Claude Code shows its own prompt as if no hook
// existed. Away, it is an approval: answered with the person's decision, or
// {} once HOOK_WAIT passes (the approval is then closed, and the person
// answers at the terminal). A client that hangs up leaves the approval open;
// the same request again resumes it while it is open (a decided one is
// never reused: Claude Code sends no tool_use_id, so it asks again).
func (a *app) hookPermission(r *http.Request, c caller, sid string, in hookPermissionInput) (any, error) {
	ctx := r.Context()
	if in.ToolName == nil {
		return nil, badRequestf("field %q is required", "tool_name")
	}
	tool, input, err := checkToolCall(*in.ToolName, "tool_input", in.ToolInput, in.ToolUseID)
	if err != nil {
		return nil, err
	}
	if err := a.store.openHookSession(ctx, c.UserID, sid, in.Cwd); err != nil {
		return nil, err
	}
	req := approvalRequest{SessionID: sid, ToolName: tool, Input: input, ToolUseID: cleanText(in.ToolUseID),
		Content: approvalContent(tool, input), Rule: ruleFor(tool, input), ResumeOpenOnly: true, ViaHook: true}
	away, err := a.store.presence(ctx, c.UserID)
	if err != nil {
		return nil, err
	}
	if !away {
		err = a.store.addHookStep(ctx, c.UserID, hookStep{SessionID: sid, Content: req.Content, Approval: &req, Note: hookDeskNote})
		return hookOutput{}, err
	}
	ap, err := a.store.askApproval(ctx, c.UserID, req, a.cfg.questionTimeout)
	if err == nil && ap.State == questionOpen {
		ap, err = a.awaitApproval(ctx, c, sid, ap, a.cfg.hookWait, 0, nil)
	}
	if err == nil && ap.State == questionOpen {
		ap, err = a.closeHookApproval(r, c, ap)
	}
	if err != nil {
		return nil, err
	}
	return permissionOutput(ap), nil
}

// closeHookApproval closes an approval nobody decided within HOOK_WAIT, or
// returns the decision that came first.
func (a *app) closeHookApproval(r *http.Request, c caller, ap approval) (approval, error) {
	closed, err := a.store.closeApproval(r.Context(), c.UserID, ap.SessionID, ap.ID, hookClosedNote)
	if err != nil || closed {
		ap.State = questionClosed
		return ap, err
	}
	return a.store.approvalOutcome(r.Context(), c.UserID, ap.SessionID, ap.ID, a.cfg.questionTimeout)
}

// permissionOutput is the PermissionRequest answer for ap: the person's
// allow (allow_session too) or deny, else {} (no decision).
func permissionOutput(ap approval) hookOutput {
	if ap.State != questionAnswered {
		return hookOutput{}
	}
	d := hookDecision{Behavior: "allow"}
	if ap.Decision == decisionDeny {
		d = hookDecision{Behavior: "deny", Message: cmp.Or(ap.Message, deniedByPerson)}
	}
	return hookOutput{&hookSpecific{HookEventName: "PermissionRequest", Decision: d}}
}

// recordHookStep stores a Notification's or Stop's step in the session (created
// on first sight) and answers {}.
func (a *app) recordHookStep(r *http.Request, c caller, cwd string, step hookStep) (any, error) {
	if err := a.store.openHookSession(r.Context(), c.UserID, step.SessionID, cwd); err != nil {
		return nil, err
	}
	return hookOutput{}, a.store.addHookStep(r.Context(), c.UserID, step)
}

// maxHookText bounds the text a hook stores.
const maxHookText = 4000

// waitingNotifications are the notification types that wait for the
// person ("" too: older Claude Code sends no type).
var waitingNotifications = map[string]bool{"permission_prompt": true, "idle_prompt": true, "elicitation_dialog": true, "": true}

// notificationStep is a Notification. One that waits for the person
// (waitingNotifications) marks the session waiting, and the person hears of
// it as agent.waiting; a permission_prompt while the session's approval is
// open adds nothing (the approval already asks; one a hook asked counts only
// within HOOK_WAIT, while its hook may still wait). Any other type
// (auth_success, …) is a timeline step only.
func (a *app) notificationStep(sid string, in hookNotificationInput) hookStep {
	text := strings.TrimSpace(cleanText(in.Message))
	if text == "" {
		text = cmp.Or(strings.TrimSpace(cleanText(in.Title)), "Claude is waiting for you")
	}
	step := hookStep{SessionID: sid, Content: cutChars(text, maxHookText)}
	if waitingNotifications[in.NotificationType] {
		step.Event, step.Waiting = eventAgentWaiting, true
		step.QuietWhenApprovalOpen = in.NotificationType == "permission_prompt"
		step.Timeout, step.HookWait = a.cfg.questionTimeout, a.cfg.hookWait
	}
	return step
}

// stopStep is a Stop: Claude finished its turn and waits for the person;
// channels that ask for agent.idle hear of it.
func stopStep(sid string, in hookStopInput) hookStep {
	text := "Finished its turn; waiting for you."
	if last := strings.TrimSpace(cleanText(in.LastAssistantMessage)); last != "" {
		text += "\n\n" + last
	}
	return hookStep{SessionID: sid, Content: cutChars(text, maxHookText), Event: eventAgentIdle, Waiting: true}
}

// ---- /api/v1/presence ----

// presenceJSON is the Away switch: true sends approvals to the phone.
type presenceJSON struct {
	Away bool `json:"away"`
}

type presenceRequest struct {
	Away *bool `json:"away"`
}

func (a *app) handleGetPresence() http.HandlerFunc {
	return handleJSON(a, func(r *http.Request, c caller, _ noBody) (any, error) {
		away, err := a.store.presence(r.Context(), c.UserID)
		return presenceJSON{away}, err
	})
}

func (a *app) handlePutPresence() http.HandlerFunc {
	return handleJSON(a, func(r *http.Request, c caller, in presenceRequest) (any, error) {
		if in.Away == nil {
			return nil, badRequestf("field %q is required (true or false)", "away")
		}
		return presenceJSON{*in.Away}, a.store.setPresence(r.Context(), c.UserID, *in.Away, hookClosedNote)
	})
}
