package main

import (
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
)

// Tests of the inbox page's files and headers (ui.go, ui/).

func TestUIPageHeaders(t *testing.T) {
	t.Parallel()
	e := newTestEnv(t)
	cases := []struct {
		path, contentType, contains string
	}{
		{"/", "text/html", "<title>agentline inbox</title>"},
		{"/app.js", "text/javascript", "textContent"},
		{"/app.css", "text/css", "pre-wrap"},
	}
	for _, c := range cases {
		t.Run(c.path, func(t *testing.T) {
			for _, method := range []string{"GET", "HEAD"} {
				req, _ := http.NewRequest(method, e.srv.URL+c.path, nil)
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					t.Fatalf("%s %s: %d", method, c.path, resp.StatusCode)
				}
				h := resp.Header
				if got := h.Get("Content-Security-Policy"); got != pageCSP {
					t.Errorf("CSP = %q", got)
				}
				for _, want := range []string{"default-src 'self'", "script-src 'self'", "frame-ancestors 'none'", "base-uri 'none'", "form-action 'none'"} {
					if !strings.Contains(pageCSP, want) {
						t.Errorf("CSP lacks %q", want)
					}
				}
				if strings.Contains(pageCSP, "unsafe-inline") || strings.Contains(pageCSP, "unsafe-eval") {
					t.Errorf("CSP allows inline code: %q", pageCSP)
				}
				if h.Get("X-Content-Type-Options") != "nosniff" || h.Get("Referrer-Policy") != "no-referrer" {
					t.Errorf("headers: %v", h)
				}
				if !strings.HasPrefix(h.Get("Content-Type"), c.contentType) {
					t.Errorf("Content-Type = %q, want %s", h.Get("Content-Type"), c.contentType)
				}
				if method == "GET" && !strings.Contains(string(body), c.contains) {
					t.Errorf("body lacks %q", c.contains)
				}
			}
		})
	}
	// Only the page's own files are served; everything else is not found.
	for _, p := range []string{"/index.html/x", "/ui/app.js", "/favicon.ico", "/../main.go", "/app.js/"} {
		if code, _ := e.call(t, "GET", p, "", nil); code != 404 && code != 301 {
			t.Errorf("GET %s: %d, want 404", p, code)
		}
	}
}

// TestUINoInlineCode checks what the CSP would also refuse: the HTML has
// no inline script, event handler or style, and the script never writes
// markup.
func TestUINoInlineCode(t *testing.T) {
	t.Parallel()
	html, err := uiFiles.ReadFile("ui/index.html")
	if err != nil {
		t.Fatal(err)
	}
	page := string(html)
	scripts := regexp.MustCompile(`(?is)<script\b([^>]*)>(.*?)</script\s*>`).FindAllStringSubmatch(page, -1)
	if len(scripts) == 0 {
		t.Fatal("no script tag: the page would do nothing")
	}
	for _, s := range scripts {
		if !strings.Contains(s[1], `src="app.js"`) || strings.TrimSpace(s[2]) != "" {
			t.Errorf("inline or foreign script: %q", s[0])
		}
	}
	for name, re := range map[string]string{
		"event handler attribute": `(?i)\son[a-z]+\s*=`,
		"style attribute":         `(?i)\sstyle\s*=`,
		"style element":           `(?i)<style\b`,
		"javascript: URL":         `(?i)javascript:`,
		"other host":              `(?i)(src|href)\s*=\s*"(https?:)?//`,
	} {
		if m := regexp.MustCompile(re).FindString(page); m != "" {
			t.Errorf("index.html has a %s: %q", name, m)
		}
	}
	for _, label := range []string{">API key<", ">Sign out<", ">Feedback<", ">Send<", ">End session<", "Enable notifications"} {
		if !strings.Contains(page, label) {
			t.Errorf("index.html lacks %q", label)
		}
	}
	js, err := uiFiles.ReadFile("ui/app.js")
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "?key=", "access_token"} {
		if strings.Contains(string(js), bad) {
			t.Errorf("app.js uses %q", bad)
		}
	}
	for _, want := range []string{"'Answer'", "Last-Event-ID", "mark_as_read: false", "/api/v1/sessions/end", "Notification.requestPermission"} {
		if !strings.Contains(string(js), want) {
			t.Errorf("app.js lacks %q", want)
		}
	}
}
