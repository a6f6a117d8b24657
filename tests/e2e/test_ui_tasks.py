"""The review page with a real task, in a real headless Chromium.

The task is made on the control plane, its agent calls through the gateway with the
task's ``proxy_url`` (an allowed call, a refusal, a call held for approval), the
reviewer approves from the page, and the page shows the task (owner, purpose,
expiry, calls used and left, status) and its timeline with each kind marked.
"""

from __future__ import annotations

import threading
from typing import Any

import httpx

from tests.e2e.test_ui import ARTIFACTS, Visit, browser, rows, token_of
from tests.support import Gateway, Upstream
from tests.tasks_support import client, create_task, http_rule, show

__all__ = ["browser"]  # the fixture, used by name

PURPOSE = "triage issue 42"


def approval_rule(up: Upstream) -> dict[str, Any]:
    """Within the ceiling's 'up-http' rule: POSTs a person must allow."""
    return {"id": "post-note", "host": "127.0.0.1", "port": up.http_port, "scheme": "http",
            "methods": ["POST"], "paths": ["/allowed/**"], "approval": "required"}


def cells(page: Any, task_id: str) -> list[str]:
    return page.eval_on_selector_all(f'#tasks-body tr[data-task="{task_id}"] td',
                                     "tds => tds.map(td => td.innerText)")


def test_a_real_task_and_its_timeline(browser: Any, ceiling_gateway: Gateway,
                                      upstream: Upstream) -> None:
    gw = ceiling_gateway
    task = create_task(gw, upstream, [http_rule(upstream), approval_rule(upstream)],
                       owner="alice@acme.test", purpose=PURPOSE, max_calls=10)
    tid = task["task_id"]
    base = f"http://127.0.0.1:{upstream.http_port}"
    with client(gw, task) as c:
        assert c.get(f"{base}/allowed/ui-task-ok").status_code == 200
        assert c.get(f"{base}/forbidden/ui-task-no").status_code == 403
    result: dict[str, httpx.Response] = {}

    def agent() -> None:
        with client(gw, task) as c:
            c.timeout = httpx.Timeout(60)
            result["r"] = c.post(f"{base}/allowed/ui-task-pr", json={"title": "fix"})

    visit = Visit(browser, gw)
    caller = threading.Thread(target=agent)
    try:
        page = visit.sign_in(token_of(gw))
        page.wait_for_selector(f'#tasks-body tr[data-task="{tid}"]')
        caller.start()
        held = page.wait_for_selector('[data-approval]:has-text("/allowed/ui-task-pr")',
                                      timeout=15000)
        text = held.inner_text()
        assert f"task {tid}" in text and "owner alice@acme.test" in text and PURPOSE in text
        page.fill("#approver", "dana")
        page.fill("[data-approval] input", "fine by me")
        page.click("[data-approval] button.approve")
        caller.join(30)
        assert result["r"].status_code == 200, result["r"].text

        # The task's row: owner, purpose, expiry, calls used and left, status.
        page.wait_for_function(
            f"""() => {{ const r = document.querySelector('#tasks-body tr[data-task="{tid}"]');
                        return r && r.children[5].innerText === '2'; }}""", timeout=10000)
        shown = show(gw, tid)
        row = cells(page, tid)
        assert row[:4] == [tid, shown["workload"], "alice@acme.test", PURPOSE]
        assert row[4] == shown["expires_at"].replace("T", " ")[:19] + "Z"
        assert row[5:] == ["2", "8", "active"]
        assert (shown["calls_used"], shown["calls_left"]) == (2, 8)

        # Its timeline: oldest first, the call, the refusal, the hold and the approval.
        page.click(f'#tasks-body tr[data-task="{tid}"]')
        page.wait_for_function("() => document.getElementById('calls-title').textContent"
                               f" === 'Calls of task {tid}'")
        page.wait_for_function("() => document.querySelectorAll('#calls-body tr').length"
                               " === 4")
        timeline = rows(page)
        assert [r["decision"] for r in timeline] == ["allow", "deny", "held", "approved"]
        assert "/allowed/ui-task-ok" in timeline[0]["text"]
        assert "refused" not in timeline[0]["cls"].split()
        assert "/forbidden/ui-task-no" in timeline[1]["text"]
        assert "refused" in timeline[1]["cls"].split()
        assert "held" in timeline[2]["cls"].split()
        assert "approved by dana “fine by me”" in timeline[3]["text"]
        assert timeline[3]["text"].count("approved by dana") == 1
        assert all("post-note" in r["text"] for r in timeline[2:])
        detail = page.inner_text("#task-detail")
        assert f"owner alice@acme.test · purpose {PURPOSE}" in detail
        assert "calls used 2 · left 8 · active" in detail
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui-task-timeline.png"), full_page=True)
        assert not visit.dialogs
    finally:
        if caller.is_alive():
            caller.join(30)
        visit.close()
