package main

// openapi.go serves openapi.json, the OpenAPI 3.1 description of the REST
// API (issue 13), kept beside the handlers it describes. openapi_test.go
// holds it to routeTable (both ways) and validates it, and the responses the
// tests receive, with an OpenAPI 3.1 validator.

import (
	_ "embed"
	"net/http"
)

//go:embed openapi.json
var openAPIDoc []byte

// handleOpenAPI serves the document; it needs no key.
func (a *app) handleOpenAPI() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "public, max-age=300")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Write(openAPIDoc)
	}
}
