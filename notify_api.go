package main

// notify_api.go is how people manage their notification channels (issue 11):
// the person API under /api/v1/notification-channels and the operator's
// `agentline notify` commands. Both go through checkChannel, so the same
// rules hold whichever way a channel is made.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"text/tabwriter"
)

// channelEvents are the events a channel may ask for.
// agent.waiting also reaches every channel that asks for question.asked
// (issue 15: both mean the agent waits for the person).
var channelEvents = []string{eventQuestionAsked, eventSessionEnded, eventMessageFlagged, eventAgentWaiting, eventAgentIdle}

// channelRequest is a new channel as the API and the CLI take it.
type channelRequest struct {
	Kind   *string   `json:"kind"`
	URL    *string   `json:"url"`
	Token  *string   `json:"token"`
	Events *[]string `json:"events"`
}

// checkChannel validates a new channel and returns it ready to store (a
// webhook with a fresh secret). Every failure is a badRequest.
func checkChannel(req channelRequest, allowPrivate bool) (channel, error) {
	var c channel
	if req.Kind == nil || (*req.Kind != "ntfy" && *req.Kind != "webhook") {
		return c, badRequestf("field %q must be %q or %q", "kind", "ntfy", "webhook")
	}
	c.Kind = *req.Kind
	var raw string
	if req.URL != nil {
		raw = *req.URL
	}
	var err error
	if c.URL, err = checkChannelURL(raw, allowPrivate); err != nil {
		return c, err
	}
	if req.Token != nil && *req.Token != "" {
		if c.Kind != "ntfy" {
			return c, badRequestf("field %q is for ntfy channels only (a webhook is signed with its secret)", "token")
		}
		// It goes into an Authorization header: visible ASCII only, so it
		// can neither break the header nor smuggle another one.
		t := *req.Token
		if len(t) > 512 || strings.IndexFunc(t, func(r rune) bool { return r <= ' ' || r > '~' }) >= 0 {
			return c, badRequestf("field %q must be at most 512 visible ASCII characters", "token")
		}
		c.Token = t
	}
	c.Events = []string{eventQuestionAsked}
	if req.Events != nil {
		c.Events = nil
		for _, e := range *req.Events {
			e = strings.TrimSpace(e)
			if !slices.Contains(channelEvents, e) {
				return c, badRequestf("field %q: unknown event %q (want %s)", "events", cutChars(e, 40), strings.Join(channelEvents, ", "))
			}
			if !slices.Contains(c.Events, e) {
				c.Events = append(c.Events, e)
			}
		}
		if len(c.Events) == 0 {
			return c, badRequestf("field %q must name at least one event", "events")
		}
	}
	if c.Kind == "webhook" {
		c.Secret = newWebhookSecret()
	}
	return c, nil
}

// channelJSON is a channel as the API shows it: never its token or secret.
type channelJSON struct {
	ID             string   `json:"id"`
	Kind           string   `json:"kind"`
	URL            string   `json:"url"`
	Events         []string `json:"events"`
	CreatedAt      string   `json:"created_at"`
	LastDeliveryAt *string  `json:"last_delivery_at"`
	LastError      *string  `json:"last_error"`
	Failures       int      `json:"failures"`
}

func toChannelJSON(c channel) channelJSON {
	j := channelJSON{ID: c.ID, Kind: c.Kind, URL: c.URL, Events: c.Events, CreatedAt: timeJSON(c.CreatedAt), Failures: c.Failures}
	if j.Events == nil {
		j.Events = []string{}
	}
	if c.LastDeliveryAt.Valid {
		t := timeJSON(c.LastDeliveryAt.Time)
		j.LastDeliveryAt = &t
	}
	if c.LastError.Valid {
		j.LastError = &c.LastError.String
	}
	return j
}

// createdChannelJSON is the answer to a create: the channel and, for a
// webhook, its secret, shown this once.
type createdChannelJSON struct {
	channelJSON
	Secret string `json:"secret,omitempty"`
}

// ---- /api/v1/notification-channels ----

func (a *app) handleListChannels() http.HandlerFunc {
	return handleJSON(a, func(r *http.Request, c caller, _ noBody) (any, error) {
		chans, err := a.store.listChannels(r.Context(), c.UserID)
		if err != nil {
			return nil, err
		}
		out := make([]channelJSON, 0, len(chans))
		for _, ch := range chans {
			out = append(out, toChannelJSON(ch))
		}
		return map[string]any{"channels": out}, nil
	})
}

func (a *app) handleCreateChannel() http.HandlerFunc {
	return handleJSON(a, func(r *http.Request, c caller, req channelRequest) (any, error) {
		ch, err := checkChannel(req, a.notify.allowPrivate)
		if err != nil {
			return nil, err
		}
		ch, err = a.store.createChannel(r.Context(), c.UserID, ch)
		if errors.Is(err, errTooManyChannels) {
			return nil, badRequestf("at most %d notification channels per user", maxChannelsPerUser)
		}
		if err != nil {
			return nil, err
		}
		return created{createdChannelJSON{toChannelJSON(ch), ch.Secret}}, nil
	})
}

// channelID reads the {id} of the path; a malformed one is a 404 like any
// id that is not the caller's.
func channelID(r *http.Request) (string, error) {
	id, ok := parseUUID(r.PathValue("id"))
	if !ok {
		return "", errNotFound
	}
	return id, nil
}

func (a *app) handleDeleteChannel() http.HandlerFunc {
	return handleJSON(a, func(r *http.Request, c caller, _ noBody) (any, error) {
		id, err := channelID(r)
		if err == nil {
			err = a.store.deleteChannel(r.Context(), c.UserID, id)
		}
		if err != nil {
			return nil, err
		}
		return map[string]any{"success": true, "id": id}, nil
	})
}

// channelTestJSON is what a test send came to.
type channelTestJSON struct {
	Delivered bool   `json:"delivered"`
	Status    int    `json:"status"` // the receiver's HTTP status, 0 if it did not answer
	Error     string `json:"error,omitempty"`
}

func (a *app) handleTestChannel() http.HandlerFunc {
	return handleJSON(a, func(r *http.Request, c caller, _ noBody) (any, error) {
		id, err := channelID(r)
		if err != nil {
			return nil, err
		}
		return a.notify.testChannel(r.Context(), c.UserID, id)
	})
}

// testChannel sends a test event to userID's channel id now, outside the
// outbox, and keeps the outcome on the channel. It returns errNotFound if
// the channel is missing or not userID's.
func (n *notifier) testChannel(ctx context.Context, userID, id string) (channelTestJSON, error) {
	ch, err := n.store.channelForSend(ctx, userID, id)
	if err != nil {
		return channelTestJSON{}, err
	}
	at := n.send(ctx, ch, n.testNotification(), newUUID())
	outcome, _, why := n.judge(at, 1)
	res := channelTestJSON{Delivered: outcome == outcomeSent, Status: at.status, Error: why}
	if err := n.store.recordChannelTest(ctx, userID, id, res.Delivered, why); err != nil {
		return channelTestJSON{}, err
	}
	return res, nil
}

// ---- agentline notify ----

const notifyUsage = `usage:
  agentline notify add -user EMAIL -kind ntfy|webhook -url URL [-token T] [-events question.asked,session.ended,message.flagged,agent.waiting,agent.idle]
  agentline notify list -user EMAIL
  agentline notify remove ID
  agentline notify test ID`

func runNotify(ctx context.Context, cfg config, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return errors.New(notifyUsage)
	}
	st, _, closeDB, err := openStore(ctx, cfg, stderr)
	if err != nil {
		return err
	}
	defer closeDB()
	n := newNotifier(st, nil, slog.New(slog.NewTextHandler(stderr, nil)), cfg.publicURL, cfg.notifyAllowPrivate)
	n.client = newNotifyClient(n.allowPrivate, n.attemptTimeout)
	sub, rest := args[0], args[1:]
	switch sub {
	case "add":
		return notifyAdd(ctx, n, rest, stdout, stderr)
	case "list":
		return notifyList(ctx, st, rest, stdout, stderr)
	case "remove", "test":
		return notifyRemoveOrTest(ctx, n, sub, rest, stdout)
	default:
		return fmt.Errorf("unknown notify command %q\n%s", sub, notifyUsage)
	}
}

// notifyAdd is `agentline notify add`: it prints the channel's id and, for a
// webhook, its secret (the only time it is shown).
func notifyAdd(ctx context.Context, n *notifier, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("notify add", flag.ContinueOnError)
	fs.SetOutput(stderr)
	email := fs.String("user", "", "the user's email (created if new)")
	kind := fs.String("kind", "", "ntfy or webhook")
	u := fs.String("url", "", "the ntfy topic URL or the webhook URL")
	token := fs.String("token", "", "an ntfy access token (optional)")
	events := fs.String("events", eventQuestionAsked, "comma-separated: "+strings.Join(channelEvents, ","))
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *email == "" || !strings.Contains(*email, "@") {
		return errors.New("notify add: -user EMAIL is required")
	}
	evs := strings.Split(*events, ",")
	ch, err := checkChannel(channelRequest{Kind: kind, URL: u, Token: token, Events: &evs}, n.allowPrivate)
	if err != nil {
		return fmt.Errorf("notify add: %w", err)
	}
	userID, err := n.store.ensureUser(ctx, *email)
	if err != nil {
		return err
	}
	if ch, err = n.store.createChannel(ctx, userID, ch); err != nil {
		return fmt.Errorf("notify add: %w", err)
	}
	fmt.Fprintf(stdout, "id=%s\n", ch.ID)
	if ch.Secret != "" {
		fmt.Fprintf(stdout, "secret=%s\n", ch.Secret)
	}
	return nil
}

// notifyList is `agentline notify list`: never a token or a secret.
func notifyList(ctx context.Context, st *store, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("notify list", flag.ContinueOnError)
	fs.SetOutput(stderr)
	email := fs.String("user", "", "the user's email")
	if err := fs.Parse(args); err != nil {
		return err
	}
	userID, err := st.userByEmail(ctx, *email)
	if errors.Is(err, errNotFound) {
		return fmt.Errorf("notify list: no user %q", *email)
	}
	if err != nil {
		return err
	}
	chans, err := st.listChannels(ctx, userID)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tKIND\tURL\tEVENTS\tLAST DELIVERY\tLAST ERROR\tFAILURES")
	for _, c := range chans {
		last, lastErr := "-", "-"
		if c.LastDeliveryAt.Valid {
			last = timeJSON(c.LastDeliveryAt.Time)
		}
		if c.LastError.Valid {
			lastErr = c.LastError.String
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\n", c.ID, c.Kind, c.URL, strings.Join(c.Events, ","), last, lastErr, c.Failures)
	}
	return tw.Flush()
}

// notifyRemoveOrTest is `agentline notify remove ID` and `notify test ID`.
func notifyRemoveOrTest(ctx context.Context, n *notifier, sub string, args []string, stdout io.Writer) error {
	if len(args) != 1 {
		return errors.New(notifyUsage)
	}
	id, ok := parseUUID(strings.TrimSpace(args[0]))
	if !ok {
		return fmt.Errorf("notify %s: %q is not a channel id", sub, args[0])
	}
	userID, err := n.store.channelOwner(ctx, id)
	if errors.Is(err, errNotFound) {
		return fmt.Errorf("notify %s: no such channel", sub)
	}
	if err != nil {
		return err
	}
	if sub == "remove" {
		if err := n.store.deleteChannel(ctx, userID, id); err != nil {
			return err
		}
		fmt.Fprintln(stdout, "removed")
		return nil
	}
	res, err := n.testChannel(ctx, userID, id)
	if err != nil {
		return err
	}
	if !res.Delivered {
		return fmt.Errorf("notify test: not delivered: %s", res.Error)
	}
	fmt.Fprintf(stdout, "delivered: HTTP %d\n", res.Status)
	return nil
}

// ---- configuration ----

// loadNotifyConfig reads PUBLIC_URL and NOTIFY_ALLOW_PRIVATE into c.
func loadNotifyConfig(getenv func(string) string, c *config) error {
	if v := strings.TrimSpace(getenv("PUBLIC_URL")); v != "" {
		u, err := url.Parse(v)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("PUBLIC_URL=%q: want the inbox's address, like https://agentline.example.com", v)
		}
		c.publicURL = strings.TrimRight(v, "/")
	} else {
		c.publicURL = "http://localhost:" + c.port
	}
	switch v := strings.TrimSpace(getenv("NOTIFY_ALLOW_PRIVATE")); strings.ToLower(v) {
	case "", "0", "false", "no":
	case "1", "true", "yes":
		c.notifyAllowPrivate = true
	default:
		return fmt.Errorf("NOTIFY_ALLOW_PRIVATE=%q: want 1 or 0", v)
	}
	return nil
}

// startNotifier starts the outbox worker of a serving app; port is where it
// listens (for the default PUBLIC_URL when the port was 0).
func startNotifier(a *app, port int) *notifier {
	pub := a.cfg.publicURL
	if pub == "" || pub == "http://localhost:0" {
		pub = fmt.Sprintf("http://localhost:%d", port)
	}
	n := newNotifier(a.store, a.hub, a.log, pub, a.cfg.notifyAllowPrivate)
	a.measureNotifier(n)
	n.start()
	return n
}
