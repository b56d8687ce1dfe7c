package main

// act.go is issue 12's lock-screen path: POST /api/v1/act/<capability>, the
// URL behind a notification's Allow / Deny (or option) button. The
// capability is the credential (no bearer key): 256 random bits, kept only
// as its SHA-256, bound to one question and one decision, single use. The
// endpoint is rate limited per client address, and a capability never
// reaches a log (the question id does).

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"net"
	"net/http"
	"strconv"
	"strings"
	"unicode"
)

// newCapability returns a fresh capability and the hash that is stored.
func newCapability() (capability, hash string) {
	b := make([]byte, 32)
	rand.Read(b)
	capability = base64.RawURLEncoding.EncodeToString(b)
	return capability, capabilityHash(capability)
}

func capabilityHash(capability string) string {
	sum := sha256.Sum256([]byte(capability))
	return hex.EncodeToString(sum[:])
}

// actionLink is a notification button as the senders put it.
type actionLink struct {
	Label  string `json:"label"`
	URL    string `json:"url"`
	Method string `json:"method"`
	Action string `json:"action"` // allow, deny or option
	Option string `json:"option,omitempty"`
}

// actionLinks turns a delivery's actions into buttons under publicURL.
func actionLinks(publicURL string, acts []notifyAction) []actionLink {
	out := make([]actionLink, 0, len(acts))
	for _, a := range acts {
		out = append(out, actionLink{Label: a.Label, URL: publicURL + "/api/v1/act/" + a.Capability, Method: http.MethodPost,
			Action: a.Action, Option: a.Option})
	}
	return out
}

// ntfyActions is ntfy's Actions header: "http, LABEL, URL, method=POST,
// clear=true" per button, ";"-separated. A label loses what the header
// syntax uses (commas, semicolons, quotes, control characters) and anything
// outside printable ASCII; one left empty becomes "Option N".
func ntfyActions(links []actionLink) string {
	var parts []string
	for i, l := range links {
		if i == 3 {
			break // ntfy shows three
		}
		label := strings.Map(func(r rune) rune {
			if r > unicode.MaxASCII || r < 0x20 || r == 0x7f || strings.ContainsRune(`,;"'=`, r) {
				return ' '
			}
			return r
		}, l.Label)
		label = strings.Join(strings.Fields(cutChars(label, 40)), " ")
		if label == "" {
			label = "Option " + string(rune('1'+i))
		}
		parts = append(parts, "http, "+label+", "+l.URL+", method=POST, clear=true")
	}
	return strings.Join(parts, "; ")
}

// actRate limits the act endpoint per client address, whatever RATE_LIMIT
// says: a small burst, then one every 3 s, enough for a person tapping
// buttons and nowhere near enough to guess a 256-bit capability.
var actRate = rateLimit{perSec: 1.0 / 3, burst: 20}

// clientAddr is the request's peer address without its port.
func clientAddr(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

const goneDetail = "this action link was already used, has expired or is unknown; open the inbox instead"

// handleAct answers a question with the decision its capability is bound
// to. 200 with the question's new state; 410 for a used, expired or unknown
// capability and for a question no longer open (nothing changes); 429
// over the rate limit.
func (a *app) handleAct(lim *limiter) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if ok, wait := lim.allow(clientAddr(r)); !ok {
			a.ops.metrics.rateLimited.Add(1)
			w.Header().Set("Retry-After", strconv.Itoa(retryAfterSeconds(wait)))
			writeJSON(w, http.StatusTooManyRequests, errorBody{"too many requests; wait a little"})
			return
		}
		capability := r.PathValue("capability")
		if len(capability) < 20 || len(capability) > 100 {
			writeJSON(w, http.StatusGone, errorBody{goneDetail})
			return
		}
		hash := capabilityHash(capability)
		userID, qid, action, option, err := a.store.capabilityTarget(r.Context(), hash)
		if err == nil {
			var res answered
			res, err = a.store.answerQuestionWith(r.Context(), userID, qid, hash, a.cfg.questionTimeout, func(q questionFields) (personAnswer, error) {
				if action == "option" {
					return personAnswer{Text: option}, nil
				}
				return personAnswer{Decision: action}, nil
			})
			if err == nil {
				a.log.Info("question answered from a notification action", "question", qid, "kind", res.Kind)
				writeJSON(w, http.StatusOK, toAnswerResponse(res))
				return
			}
		}
		var aa *alreadyAnswered
		switch {
		case errors.Is(err, errGone), errors.Is(err, errNotFound):
			writeJSON(w, http.StatusGone, errorBody{goneDetail})
		case errors.As(err, &aa):
			writeJSON(w, http.StatusGone, errorBody{"this question is " + aa.detail})
		case r.Context().Err() != nil:
		case isUnavailable(err):
			a.log.Warn("database unavailable", "path", "/api/v1/act/…", "question", qid, "err", err)
			writeJSON(w, http.StatusServiceUnavailable, errorBody{"database unavailable; retry"})
		default:
			// Never the path: it holds the capability.
			a.log.Error("action failed", "question", qid, "err", err)
			writeJSON(w, http.StatusInternalServerError, errorBody{"internal error"})
		}
	}
}
