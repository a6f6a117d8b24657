"""The review page shows the whole held call (issue 10.5), all of it as inert text.

Real gateway, real agent, real headless Chromium (the fixtures of test_ui.py):
the held call's query values, headers, body (with its size and SHA-256) and
digest are on the page; what the agent wrote there — HTML, bidi overrides,
zero-width and control characters — is shown as text and visible escapes,
never as markup and never reordered or hidden. The approval from the page
lets the call go, and the upstream gets the body that was shown.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import httpx

from tests.e2e.test_ui import XSS, Visit, browser, token_of, ugw, visit  # noqa: F401
from tests.support import Gateway, Keys, Upstream


def test_the_page_shows_the_held_request_as_text(visit: Visit, ugw: Gateway,  # noqa: F811
                                                 upstream: Upstream, keys: Keys) -> None:
    page = visit.sign_in(token_of(ugw))
    page.wait_for_selector("#calls-body tr")
    body = (f'{{"amount": 990000, "to": "ATTACKER-IBAN", "html": "{XSS}", '
            '"bidi": "invoice\u202egpj.exe", "zw": "pay\u200bpal", "esc": "\x1b[2J"}')
    raw = body.encode()
    result: dict[str, Any] = {}

    def agent() -> None:
        with ugw.client(keys.token()) as c:
            c.timeout = httpx.Timeout(60)
            result["r"] = c.post(
                f"http://127.0.0.1:{upstream.http_port}/approve/pr-view?amount=990000"
                "&to=ATTACKER-IBAN", content=raw,
                headers={"X-Note": "<b>bold</b>", "Content-Type": "application/json"})

    caller = threading.Thread(target=agent)
    caller.start()
    try:
        held = page.wait_for_selector('[data-approval]:has-text("/approve/pr-view")',
                                      timeout=15000)
        text = held.inner_text()
        # The full URL with its query values, the header, the body and what proves it.
        assert "/approve/pr-view?amount=990000&to=ATTACKER-IBAN" in text
        assert "X-Note: <b>bold</b>" in text or "x-note: <b>bold</b>" in text
        assert f"body {len(raw)} bytes (utf-8)" in text
        assert hashlib.sha256(raw).hexdigest() in text
        assert '"amount": 990000, "to": "ATTACKER-IBAN"' in text
        # The agent's text is text: no element made from it, nothing run ...
        assert held.query_selector("img") is None and held.query_selector("b") is None
        assert XSS in text
        # ... and nothing hidden or reordered: the invisible characters are spelled out.
        assert "invoice\\u202egpj.exe" in text and "pay\\u200bpal" in text
        assert "\\u001b[2J" in text
        for c in ("\u202e", "\u200b", "\x1b"):
            assert c not in text
        digest = held.query_selector(".held-digest").inner_text().split()[-1]
        page.fill("#approver", "dana")
        held.query_selector("button.approve").click()
    finally:
        caller.join(30)
    assert result["r"].status_code == 200, result["r"].text
    assert page.evaluate("() => window.pwned") is None and not visit.dialogs
    # What the page showed is what went out, and the record keeps the digest shown.
    forwarded = [s for s in upstream.seen if s["path"].startswith("/approve/pr-view")]
    assert [s["body_len"] for s in forwarded] == [len(raw)]
    assert forwarded[0]["path"] == "/approve/pr-view?amount=990000&to=ATTACKER-IBAN"
    [rec] = [r for r in ugw.audit() if r["decision"] == "approved"
             and r["path"].startswith("/approve/pr-view")]
    assert rec["approval"]["digest"] == digest
    assert rec["approval"]["body_sha256"] == hashlib.sha256(raw).hexdigest()
