// One Java client call through the gateway, as an agent makes it; prints one JSON line.
// Usage: java [flags] Client.java URL (single-file source launch, JDK 11+). The JVM reads
// no proxy variable: the proxy comes from -Dhttps.proxyHost/-Dhttps.proxyPort (and the
// http.* pair) through ProxySelector.getDefault(), the token from an Authenticator
// (Basic over CONNECT needs -Djdk.http.auth.tunneling.disabledSchemes=), trust from
// -Djavax.net.ssl.trustStore; see docs/clients.md. The token is read from TASKGATE_TOKEN.
import java.net.Authenticator;
import java.net.PasswordAuthentication;
import java.net.ProxySelector;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class Client {
    static String quote(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') b.append('\\').append(c);
            else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
            else b.append(c);
        }
        return b.append('"').toString();
    }

    public static void main(String[] args) throws Exception {
        String token = System.getenv("TASKGATE_TOKEN");
        HttpClient client = HttpClient.newBuilder()
            .proxy(ProxySelector.getDefault())
            .authenticator(new Authenticator() {
                @Override
                protected PasswordAuthentication getPasswordAuthentication() {
                    if (getRequestorType() != RequestorType.PROXY) return null;
                    return new PasswordAuthentication("agent", token.toCharArray());
                }
            })
            .build();
        HttpResponse<String> r = client.send(
            HttpRequest.newBuilder(URI.create(args[0])).build(),
            HttpResponse.BodyHandlers.ofString());
        String id = r.headers().firstValue("x-taskgate-request-id").orElse("");
        System.out.println("{\"status\": " + r.statusCode() + ", \"id\": " + quote(id)
            + ", \"version\": " + quote(r.version().toString())
            + ", \"body\": " + quote(r.body()) + "}");
    }
}
