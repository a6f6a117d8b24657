from tests.support import Gateway, Upstream


def test_allowed_http(gateway: Gateway, upstream: Upstream, token: str) -> None:
    with gateway.client(token) as c:
        r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x?q=secret")
    assert r.status_code == 200, r.text
    assert "proxy-authorization" not in {k.lower() for k in r.json()["headers"]}
    rid = r.headers["x-taskgate-request-id"]
    recs = gateway.records_for(rid)
    assert len(recs) == 1 and recs[0]["decision"] == "allow", recs
    assert "secret" not in recs[0]["path"]


def test_allowed_https(gateway: Gateway, upstream: Upstream, token: str) -> None:
    with gateway.client(token) as c:
        r = c.get(f"https://localhost:{upstream.https_port}/allowed/x")
        r2 = c.get(f"https://localhost:{upstream.https_port}/denied")
    assert r.status_code == 200, r.text
    assert r2.status_code == 403, r2.text
    assert r2.json()["request_id"] == r2.headers["x-taskgate-request-id"]


def test_no_token(gateway: Gateway, upstream: Upstream) -> None:
    with gateway.client(None) as c:
        r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x")
    assert r.status_code == 407
    assert r.headers["proxy-authenticate"] == 'Basic realm="taskgate"'
