"""The review page in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

The gateway is real, the calls are real, the browser is real: it signs in through
the form, reads tasks and calls the way a reviewer does, and the tests check
what it shows, what it sends, and what it refuses. A screenshot is saved under
``test-artifacts/``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright import sync_api as playwright_sync

from proxy.audit import new_record, rfc3339
from tests.conftest import base_config
from tests.support import REPO, WORKLOAD, Gateway, Keys, Upstream
from tests.unit.audit.test_audit_query import T0, seed

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"
XSS = '<img src=x onerror="window.pwned=1">'


def task_records() -> list[dict[str, Any]]:
    """A task's calls as the tasks and approvals features write them."""
    common = dict(workload=WORKLOAD, task="t-1", owner="alice@acme.test", method="POST",
                  scheme="https", host="api.github.com", port=443)
    return [
        new_record(ts=rfc3339(T0), request_id="s1", decision="allow", rule="read-issues",
                   path="/repos/acme/widgets/issues/42", status=200, secret="github-read",
                   **{**common, "method": "GET"}),
        new_record(ts=rfc3339(T0 + 10), request_id="s2", decision="held", rule="open-pr",
                   path="/repos/acme/widgets/pulls", reason="waiting for approval",
                   approval={"id": "h1", "outcome": "waiting"}, **common),
        new_record(ts=rfc3339(T0 + 40), request_id="s2", decision="approved", rule="open-pr",
                   path="/repos/acme/widgets/pulls", status=201, secret="github-write",
                   approval={"id": "h1", "outcome": "approved", "by": "carol",
                             "comment": "looks right"}, **common),
        new_record(ts=rfc3339(T0 + 50), request_id="s3", decision="deny", rule=None,
                   path="/repos/acme/other", status=403, reason=XSS, **common),
        new_record(ts=rfc3339(T0 + 60), request_id="s4", decision="allow", task="t-2",
                   path="/x", status=200, **{k: v for k, v in common.items() if k != "task"}),
        new_record(ts=rfc3339(T0 + 70), request_id="s5", decision="would_deny", task="t-3",
                   path="/repos/acme/secret-plans", status=200,
                   reason="no rule for this host allows this path",
                   **{k: v for k, v in common.items() if k != "task"}),
    ]


def ui_config(shared_files: dict[str, Path], upstream: Upstream) -> dict[str, Any]:
    cfg = base_config(shared_files, upstream)
    wl = cfg["workloads"][WORKLOAD]
    wl["standing"].append({"id": "open-pr", "host": "127.0.0.1", "port": upstream.http_port,
                           "scheme": "http", "methods": ["POST"], "paths": ["/approve/**"],
                           "approval": "required"})
    return cfg


@pytest.fixture(scope="module")
def ugw(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
        upstream: Upstream, keys: Keys) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("ui"), ui_config(shared_files, upstream))
    seed(gw.audit_path, task_records())
    gw.start()
    base = f"http://127.0.0.1:{upstream.http_port}"
    with gw.client(keys.token()) as c:
        assert c.get(f"{base}/allowed/ui-1").status_code == 200
        assert c.get(f"{base}/forbidden/ui-2").status_code == 403
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-system-deps")
    pw = playwright_sync.sync_playwright().start()
    b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    yield b
    b.close()
    pw.stop()


def token_of(gw: Gateway) -> str:
    return (gw.home / "admin-token").read_text().strip()


class Visit:
    """One browser context: its page, every URL it asked for, dialogs and CSP reports."""

    def __init__(self, browser: Any, gw: Gateway) -> None:
        self.gw = gw
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.page.set_default_timeout(15000)
        self.urls: list[str] = []
        self.console: list[str] = []
        self.dialogs: list[str] = []
        self.context.on("request", lambda r: self.urls.append(r.url))
        self.page.on("console", lambda m: self.console.append(m.text))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def sign_in(self, token: str) -> Any:
        self.page.goto(f"{self.gw.control_url}/ui")
        self.page.fill("#token", token)
        with self.page.expect_navigation():
            self.page.click("button[type=submit]")
        return self.page

    def fetch_status(self, path: str, method: str = "GET", csrf: bool = False) -> int:
        return int(self.page.evaluate(
            """([path, method, csrf]) => {
                 const headers = {"Content-Type": "application/json"};
                 if (csrf) headers["X-CSRF-Token"] =
                     document.querySelector('meta[name="csrf-token"]').content;
                 return fetch(path, {method, headers, credentials: "same-origin",
                                     body: method === "GET" ? undefined :
                                           JSON.stringify({by: "t", comment: ""})})
                   .then(r => r.status);
               }""", [path, method, csrf]))

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def visit(browser: Any, ugw: Gateway) -> Iterator[Visit]:
    v = Visit(browser, ugw)
    yield v
    v.close()


def rows(page: Any) -> list[dict[str, str]]:
    return page.eval_on_selector_all(
        "#calls-body tr",
        "rs => rs.map(r => ({seq: r.dataset.seq, decision: r.dataset.decision, "
        "cls: r.className, text: r.innerText}))")


def test_page_refuses_without_sign_in(visit: Visit) -> None:
    page = visit.page
    resp = page.goto(f"{visit.gw.control_url}/ui")
    assert resp.status == 200
    assert page.is_visible("#token") and page.query_selector("#calls-table") is None
    assert visit.fetch_status("/v1/audit") == 401
    assert visit.fetch_status("/v1/audit", "POST") == 401
    # A made-up session cookie is no better than none.
    visit.context.add_cookies([{"name": "taskgate_session", "value": "forged",
                                "url": visit.gw.control_url}])
    page.reload()
    assert page.is_visible("#token")
    assert visit.fetch_status("/v1/audit") == 401
    # A wrong token: refused, no session.
    page.fill("#token", "not-the-token")
    with page.expect_navigation() as nav:
        page.click("button[type=submit]")
    assert nav.value.status == 401
    assert "not the admin token" in page.inner_text("#login-error")
    assert [c["value"] for c in visit.context.cookies()] == ["forged"]
    assert not visit.dialogs


def test_signed_in_page_shows_calls(visit: Visit, ugw: Gateway, upstream: Upstream,
                                    keys: Keys) -> None:
    token = token_of(ugw)
    page = visit.sign_in(token)
    assert page.url == f"{ugw.control_url}/ui"
    page.wait_for_selector("#calls-body tr")
    page.wait_for_function("() => document.getElementById('status').textContent"
                           ".startsWith('live')")
    shown = rows(page)
    logged = [json.loads(x) for x in ugw.audit_path.read_text().splitlines()]
    assert [int(r["seq"]) for r in shown] == [r["seq"] for r in logged][::-1]
    port = upstream.http_port
    by_text = {r["decision"]: r for r in shown if f"127.0.0.1:{port}/" in r["text"]}
    assert f"GET http://127.0.0.1:{port}/allowed/ui-1" in by_text["allow"]["text"]
    assert f"GET http://127.0.0.1:{port}/forbidden/ui-2" in by_text["deny"]["text"]
    assert "refused" in by_text["deny"]["cls"].split()
    assert "refused" not in by_text["allow"]["cls"].split()
    # Features not in this build say so; with them, their tables render.
    for panel in ("#tasks-body", "#approvals-body"):
        text = page.inner_text(panel)
        assert "not available" in text or page.query_selector(f"{panel} table, {panel} .muted,"
                                                              f" {panel} .approval")
    # The live tail: a new call appears without a reload.
    with ugw.client(keys.token()) as c:
        assert c.get(f"http://127.0.0.1:{port}/allowed/live-tail").status_code == 200
    page.wait_for_selector('#calls-body tr.fresh:has-text("/allowed/live-tail")', timeout=10000)
    assert rows(page)[0]["text"].count("/allowed/live-tail") == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-review.png"), full_page=True)
    # The session cookie: HttpOnly, SameSite=Strict, not Secure on plain HTTP.
    (cookie,) = visit.context.cookies()
    assert cookie["name"] == "taskgate_session" and cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict" and not cookie["secure"]
    assert page.evaluate("document.cookie") == ""
    # The token went in a form body, never in a URL, and stays out of the page.
    assert visit.urls and not [u for u in visit.urls if token in u]
    assert token not in page.content()
    assert token not in page.evaluate("JSON.stringify(localStorage) + JSON.stringify("
                                      "sessionStorage) + location.href + document.referrer")
    assert not [m for m in visit.console if "Content Security Policy" in m], visit.console


def test_filters_and_a_task_timeline(visit: Visit, ugw: Gateway) -> None:
    page = visit.sign_in(token_of(ugw))
    page.wait_for_selector("#calls-body tr")
    page.select_option("#filters select[name=decision]", "deny")
    page.click("#filters button[type=submit]")
    page.wait_for_function("() => [...document.querySelectorAll('#calls-body tr')]"
                           ".every(r => r.dataset.decision === 'deny')")
    logged = [json.loads(x) for x in ugw.audit_path.read_text().splitlines()]
    assert sorted(int(r["seq"]) for r in rows(page)) == [
        r["seq"] for r in logged if r["decision"] == "deny"]
    # One task's timeline: oldest first, its hold, approval (and by whom) and refusal marked.
    page.click("#clear")
    page.wait_for_selector('#calls-body button.task-link:text-is("t-1")')
    page.click('#calls-body button.task-link:text-is("t-1")')
    page.wait_for_function("() => document.getElementById('calls-title').textContent"
                           " === 'Calls of task t-1'")
    page.wait_for_function("() => document.querySelectorAll('#calls-body tr').length === 4")
    shown = rows(page)
    assert [r["decision"] for r in shown] == ["allow", "held", "approved", "deny"]
    assert [int(r["seq"]) for r in shown] == [1, 2, 3, 4]
    assert "held" in shown[1]["cls"].split()
    assert "approved by carol “looks right”" in shown[2]["text"]
    assert "refused" in shown[3]["cls"].split()
    assert page.is_visible("#task-detail") and "t-1" in page.inner_text("#task-detail")
    assert page.input_value("#filters input[name=task]") == "t-1"
    # The same through the filter form: another task, typed in.
    page.fill("#filters input[name=task]", "t-2")
    page.click("#filters button[type=submit]")
    page.wait_for_function("() => document.getElementById('calls-title').textContent"
                           " === 'Calls of task t-2'")
    page.wait_for_function("() => document.querySelectorAll('#calls-body tr').length === 1")
    assert rows(page)[0]["text"].count("POST https://api.github.com/x") == 1
    # A reason that looks like markup is shown as text and never runs.
    assert XSS in shown[3]["text"]
    assert page.evaluate("window.pwned") is None and not visit.dialogs
    assert page.query_selector("#calls-body img") is None


def test_cookie_requests_need_the_csrf_header(visit: Visit, ugw: Gateway) -> None:
    page = visit.sign_in(token_of(ugw))
    page.wait_for_selector("#calls-body tr")
    assert visit.fetch_status("/v1/audit") == 200
    assert visit.fetch_status("/v1/approvals/nope/approve", "POST") == 403
    assert visit.fetch_status("/v1/approvals/nope/approve", "POST", csrf=True) == 404
    assert visit.fetch_status("/v1/tasks/nope", "DELETE") == 403
    assert visit.fetch_status("/ui/logout", "POST") == 403
    # The right header from another origin is refused too.
    (cookie,) = visit.context.cookies()
    csrf = page.get_attribute('meta[name="csrf-token"]', "content")
    r = httpx.post(f"{ugw.control_url}/v1/approvals/nope/approve", timeout=10,
                   cookies={"taskgate_session": cookie["value"]},
                   headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"})
    assert r.status_code == 403
    r = httpx.post(f"{ugw.control_url}/v1/approvals/nope/approve", timeout=10,
                   cookies={"taskgate_session": cookie["value"]},
                   headers={"X-CSRF-Token": csrf, "Origin": ugw.control_url}, json={})
    assert r.status_code not in (401, 403)


def test_sign_out_ends_the_session(visit: Visit, ugw: Gateway) -> None:
    page = visit.sign_in(token_of(ugw))
    page.wait_for_selector("#calls-body tr")
    (cookie,) = visit.context.cookies()
    with page.expect_navigation():
        page.click("#signout")
    page.wait_for_selector("#token")
    assert visit.context.cookies() == []
    r = httpx.get(f"{ugw.control_url}/v1/audit", cookies={"taskgate_session": cookie["value"]},
                  timeout=10)
    assert r.status_code == 401


def test_security_headers_and_no_token_in_urls(ugw: Gateway) -> None:
    token = token_of(ugw)
    r = httpx.get(f"{ugw.control_url}/ui", params={"token": token}, timeout=10)
    assert r.status_code == 200 and 'id="token"' in r.text  # the sign-in form, no session
    assert "set-cookie" not in r.headers
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["cache-control"] == "no-store"
    assert httpx.get(f"{ugw.control_url}/v1/audit", params={"token": token},
                     timeout=10).status_code == 401
    r = httpx.post(f"{ugw.control_url}/ui/login", data={"token": token}, timeout=10,
                   headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    r = httpx.post(f"{ugw.control_url}/ui/login", data={"token": token}, timeout=10)
    assert r.status_code == 303 and r.headers["location"] == "/ui"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    assert token not in cookie
    for asset in ("app.js", "app.css"):
        r = httpx.get(f"{ugw.control_url}/ui/static/{asset}", timeout=10)
        assert r.status_code == 200 and "http://" not in r.text and "https://" not in r.text
    assert httpx.get(f"{ugw.control_url}/ui/static/index.html", timeout=10).status_code == 404
    assert httpx.get(f"{ugw.control_url}/ui/static/..%2Fui.py", timeout=10).status_code == 404


def test_failed_sign_ins_are_throttled(tmp_path: Path, shared_files: dict[str, Path],
                                       upstream: Upstream) -> None:
    gw = Gateway(tmp_path, base_config(shared_files, upstream)).start()
    try:
        url = f"{gw.control_url}/ui/login"
        codes = [httpx.post(url, data={"token": f"guess{i}"}, timeout=10).status_code
                 for i in range(10)]
        assert codes == [401] * 10
        r = httpx.post(url, data={"token": "guess10"}, timeout=10)
        assert r.status_code == 429 and "set-cookie" not in r.headers
        # Others' failures never lock the admin out, even from the same address ...
        r = httpx.post(url, data={"token": token_of(gw)}, timeout=10)
        assert r.status_code == 303 and "taskgate_session" in r.headers["set-cookie"]
        # ... and a throttled address is only that address.
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"),
                          timeout=10) as other:
            assert other.post(url, data={"token": "guess"}).status_code == 401
        assert httpx.post(url, data={"token": "guess11"}, timeout=10).status_code == 429
    finally:
        gw.stop()


def test_approve_from_the_page(visit: Visit, ugw: Gateway, upstream: Upstream,
                               keys: Keys) -> None:
    page = visit.sign_in(token_of(ugw))
    page.wait_for_selector("#calls-body tr")
    result: dict[str, Any] = {}

    def agent() -> None:
        with ugw.client(keys.token()) as c:
            c.timeout = httpx.Timeout(60)
            result["r"] = c.post(f"http://127.0.0.1:{upstream.http_port}/approve/pr-1",
                                 json={"title": "fix"})

    caller = threading.Thread(target=agent)
    caller.start()
    try:
        page.wait_for_selector('[data-approval]:has-text("/approve/pr-1")', timeout=15000)
        assert pending(ugw) == 1
        page.click("[data-approval] button.approve")
        assert "Enter your name" in page.inner_text("#status")  # who approves is required
        page.fill("#approver", "dana")
        page.fill("[data-approval] input", "ok to merge")
        page.click("[data-approval] button.approve")
    finally:
        caller.join(30)
    assert result["r"].status_code == 200, result["r"].text
    page.wait_for_selector('#calls-body tr:has-text("approved by dana “ok to merge”")',
                           timeout=10000)
    assert pending(ugw) == 0
    page.wait_for_selector("#approvals-body >> text=Nothing is waiting.")


def pending(gw: Gateway) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{gw.control_url}/metrics", timeout=10).text
    (family,) = [f for f in text_string_to_metric_families(text)
                 if f.name == "taskgate_pending_approvals"]
    return family.samples[0].value


def test_report_mode_calls_are_shown_and_filtered(visit: Visit, ugw: Gateway) -> None:
    """Report mode's would_deny records: their own filter, marked, not shown as refused."""
    page = visit.sign_in(token_of(ugw))
    page.wait_for_selector("#calls-body tr")
    page.select_option("#filters select[name=decision]", "would_deny")
    page.click("#filters button[type=submit]")
    page.wait_for_function("() => [...document.querySelectorAll('#calls-body tr')]"
                           ".every(r => r.dataset.decision === 'would_deny')")
    (row,) = rows(page)
    assert "would" in row["cls"].split() and "refused" not in row["cls"].split()
    assert "/repos/acme/secret-plans" in row["text"]
    assert "no rule for this host allows this path" in row["text"]
