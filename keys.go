package main

// keys.go lets people see their API keys (issue 13): `agentline keys -user
// EMAIL` for an operator, GET /api/v1/keys and DELETE /api/v1/keys/{id} for a
// person key (the inbox's Keys panel), so a leaked agent key can be found by
// name and cut off from a phone. Nothing here ever shows a key or its hash.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
)

// keyJSON is a key as GET /api/v1/keys shows it.
type keyJSON struct {
	ID         string  `json:"id"`
	Name       string  `json:"name"`
	Scope      string  `json:"scope"`
	Active     bool    `json:"active"`
	Current    bool    `json:"current"` // the key this request was made with
	CreatedAt  string  `json:"created_at"`
	LastUsedAt *string `json:"last_used_at"`
	ExpiresAt  *string `json:"expires_at"`
	RevokedAt  *string `json:"revoked_at"`
}

func nullTimeJSON(valid bool, t time.Time) *string {
	if !valid {
		return nil
	}
	s := timeJSON(t)
	return &s
}

func toKeyJSON(k keyInfo, currentID string) keyJSON {
	return keyJSON{ID: k.ID, Name: k.Name, Scope: k.Scope, Active: k.Active, Current: k.ID == currentID,
		CreatedAt:  timeJSON(k.CreatedAt),
		LastUsedAt: nullTimeJSON(k.LastUsedAt.Valid, k.LastUsedAt.Time),
		ExpiresAt:  nullTimeJSON(k.ExpiresAt.Valid, k.ExpiresAt.Time),
		RevokedAt:  nullTimeJSON(k.RevokedAt.Valid, k.RevokedAt.Time)}
}

type keysResponse struct {
	Keys []keyJSON `json:"keys"`
}

// ---- GET /api/v1/keys ----

func (a *app) handleListKeys() http.HandlerFunc {
	return handleJSON(a, func(r *http.Request, c caller, _ noBody) (any, error) {
		keys, err := a.store.listAPIKeys(r.Context(), c.UserID)
		if err != nil {
			return nil, err
		}
		out := keysResponse{Keys: make([]keyJSON, 0, len(keys))}
		for _, k := range keys {
			out.Keys = append(out.Keys, toKeyJSON(k, c.KeyID))
		}
		return out, nil
	})
}

// ---- DELETE /api/v1/keys/{id} ----

type revokeKeyResponse struct {
	Success bool    `json:"success"`
	Key     keyJSON `json:"key"`
}

func (a *app) handleRevokeKey() http.HandlerFunc {
	return handleJSON(a, func(r *http.Request, c caller, _ noBody) (any, error) {
		id, err := uuidField("id", r.PathValue("id"))
		if err != nil {
			return nil, err
		}
		k, err := a.store.revokeUserAPIKey(r.Context(), c.UserID, id)
		if err != nil {
			return nil, err
		}
		// An audit line by id; the key itself is never logged.
		a.log.Info("API key revoked", "key_id", k.ID, "by_key_id", c.KeyID)
		return revokeKeyResponse{true, toKeyJSON(k, c.KeyID)}, nil
	})
}

// ---- agentline keys -user EMAIL ----

func runKeys(ctx context.Context, cfg config, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("keys", flag.ContinueOnError)
	fs.SetOutput(stderr)
	email := fs.String("user", "", "the user's email")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *email == "" || fs.NArg() > 0 {
		return errors.New("usage: agentline keys -user EMAIL")
	}
	st, _, closeDB, err := openStore(ctx, cfg, stderr)
	if err != nil {
		return err
	}
	defer closeDB()
	userID, err := st.userByEmail(ctx, *email)
	if errors.Is(err, errNotFound) {
		return fmt.Errorf("keys: no user %q", *email)
	}
	if err != nil {
		return err
	}
	keys, err := st.listAPIKeys(ctx, userID)
	if err != nil {
		return err
	}
	return printKeys(stdout, keys)
}

// printKeys writes keys as a table, one key a line.
func printKeys(w io.Writer, keys []keyInfo) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tSCOPE\tCREATED\tLAST USED\tEXPIRES\tREVOKED")
	when := func(valid bool, t time.Time) string {
		if !valid {
			return "-"
		}
		return t.UTC().Format(time.RFC3339)
	}
	for _, k := range keys {
		revoked := when(k.RevokedAt.Valid, k.RevokedAt.Time)
		if !k.Active && !k.RevokedAt.Valid {
			revoked = "yes" // revoked before revoked_at existed
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k.ID, printableName(k.Name), k.Scope,
			when(true, k.CreatedAt), when(k.LastUsedAt.Valid, k.LastUsedAt.Time),
			when(k.ExpiresAt.Valid, k.ExpiresAt.Time), revoked)
	}
	return tw.Flush()
}

// printableName makes a key's name safe for a terminal table: control
// characters (escape sequences, tabs, newlines) become spaces; empty is "-".
func printableName(s string) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) || r == unicode.ReplacementChar {
			return ' '
		}
		return r
	}, s)
	if s = strings.TrimSpace(s); s == "" {
		return "-"
	}
	return s
}
