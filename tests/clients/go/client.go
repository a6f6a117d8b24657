// One Go client call through the gateway, as an agent makes it; prints one JSON line.
// Usage: go run client.go URL   (proxy and trust from the environment: HTTPS_PROXY /
// HTTP_PROXY through http.ProxyFromEnvironment, the default transport's setting, and
// SSL_CERT_FILE; see docs/clients.md)
package main

import (
	"encoding/json"
	"io"
	"net/http"
	"os"
)

func main() {
	out := json.NewEncoder(os.Stdout)
	r, err := http.Get(os.Args[1])
	if err != nil {
		out.Encode(map[string]any{"error": err.Error()})
		os.Exit(1)
	}
	defer r.Body.Close()
	body, err := io.ReadAll(r.Body)
	if err != nil {
		out.Encode(map[string]any{"error": err.Error()})
		os.Exit(1)
	}
	out.Encode(map[string]any{
		"status": r.StatusCode,
		"id":     r.Header.Get("X-Taskgate-Request-Id"),
		"proto":  r.Proto,
		"body":   string(body),
	})
}
