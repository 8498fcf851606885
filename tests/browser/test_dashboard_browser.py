"""The dashboard in a real headless browser: Playwright driving Debian's chromium against
a real server on 127.0.0.1. Each test fails on any console error or page error (a CSP
violation is one) and saves a screenshot of each page it visits to build/screenshots
(or $MINIBATCH_SCREENSHOTS).

Items of the `held` kind wait until the test releases them (`release`), so what the
browser must see - a bar that moves, a batch still running when it is cancelled - does
not depend on the machine's speed."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from minibatch.errors import Fail
from tests.conftest import ServerThread, tenant_client
from tests.receiver import Receiver

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

SCREENSHOTS = Path(os.environ.get("MINIBATCH_SCREENSHOTS",
                                  Path(__file__).resolve().parents[2] / "build" / "screenshots"))
WAIT_MS = 30_000  # the longest any expectation waits for the page to catch up
RELEASED: dict[str, int] = {}  # batch id -> items of it (by index) allowed to finish


def release(batch_id: str, count: int) -> None:
    RELEASED[batch_id] = count


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerThread(str(tmp_path_factory.mktemp("ui") / "jobs.db"),
                       webhook_retry_schedule="0,0.05", retry_base_s=0.01)

    @srv.mb.handler("held", max_attempts=1, concurrency=50)
    async def held(item):
        import anyio

        while item.index >= RELEASED.get(item.batch_id, 0):
            await anyio.sleep(0.01)
        return {"n": item.index}

    @srv.mb.handler("fails", max_attempts=1)
    async def fails(item):
        raise Fail(item.input["message"], code="upstream_error")

    yield srv.start()
    RELEASED.clear()
    srv.stop()


@pytest.fixture(scope="module")
def chromium():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync", "--disable-gpu"])
        yield browser
        browser.close()


class Tab:
    """A page in a fresh browser context that records console and page errors."""

    def __init__(self, browser, srv: ServerThread, name: str) -> None:
        self.context = browser.new_context(base_url=srv.url)
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.errors: list[str] = []
        self.name = name
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def sign_in(self, key: str) -> None:
        self.page.goto("/ui/login")
        self.page.fill('input[name="api_key"]', key)
        self.page.click('form[action="/ui/login"] button[type="submit"]')
        self.page.wait_for_url("**/ui/batches")

    def shot(self, what: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{self.name}-{what}.png"), full_page=True)


@pytest.fixture
def tabs(chromium, server, request):
    made: list[Tab] = []

    def open_tab() -> Tab:
        made.append(Tab(chromium, server, f"{request.node.name}-{len(made)}"))
        return made[-1]

    yield open_tab
    errors = [e for tab in made for e in tab.errors]
    for tab in made:
        tab.context.close()
    assert errors == [], errors  # a CSP violation, a script error, a failed load


@pytest.fixture
def api(server, tenant):
    with tenant_client(server, tenant) as c:
        yield c


def submit(api: httpx.Client, kind: str, inputs: list, **spec) -> str:
    answer = api.post("/v1/batches", json={"kind": kind, "items": [{"input": i} for i in inputs],
                                           **spec})
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


def test_sign_in_and_watch_a_running_batch_move(server, api, tenant, tabs):
    batch_id = submit(api, "held", list(range(10)))
    tab = tabs()
    tab.sign_in(server.key(tenant))
    row = tab.page.locator(f'[data-test="batch-row"][data-batch-id="{batch_id}"]')
    progress = row.locator('[data-test="progress"]')
    expect(progress).to_have_attribute("data-total", "10")
    expect(progress).to_have_attribute("data-done", "0")
    release(batch_id, 4)  # the bar follows without a reload
    expect(progress).to_have_attribute("data-done", "4")
    expect(row.locator('[data-test="status"]')).to_have_text("running")
    tab.shot("batches")
    row.locator(f'a[href="/ui/batches/{batch_id}"]').click()
    status = tab.page.locator('[data-test="status"]')
    expect(status).to_have_text("running")
    expect(tab.page.locator('[data-metric="succeeded"]')).to_have_text("4")
    release(batch_id, 10)
    expect(status).to_have_text("completed")  # and the page reloads to show the end
    expect(tab.page.locator('[data-test="progress"]')).to_have_attribute("data-done", "10")
    expect(tab.page.locator('[data-test="throughput"] rect').first).to_be_attached()
    tab.shot("batch")


def test_open_a_failed_items_error(server, api, tenant, tabs):
    batch_id = submit(api, "fails", [{"message": "upstream said 502"}] * 3
                      + [{"message": "<b>bad</b> row"}])
    tab = tabs()
    tab.sign_in(server.key(tenant))
    tab.page.goto(f"/ui/batches/{batch_id}")
    expect(tab.page.locator('[data-test="status"]')).to_have_text("failed")
    groups = tab.page.locator('[data-test="error-group"]')
    expect(groups).to_have_count(2)
    expect(groups.first).to_have_attribute("data-count", "3")
    expect(groups.nth(1)).to_contain_text("<b>bad</b> row")  # shown as text, not markup
    groups.first.locator("a").click()
    tab.page.wait_for_url("**items=failed**")
    error = tab.page.locator('[data-test="item-error"]').first
    error.locator("summary").click()
    expect(error.locator("pre")).to_be_visible()
    expect(error.locator("pre")).to_have_text("upstream said 502")
    tab.shot("failed-item")


def test_cancel_a_batch_after_confirming(server, api, tenant, tabs):
    batch_id = submit(api, "held", list(range(5)))
    tab = tabs()
    tab.sign_in(server.key(tenant))
    tab.page.goto(f"/ui/batches/{batch_id}")
    confirm = tab.page.locator('[data-test="confirm"]')
    expect(confirm).to_be_hidden()  # one click does not cancel
    tab.page.locator('[data-test="cancel"]').click()
    expect(confirm).to_be_visible()
    tab.shot("cancel-confirm")
    assert api.get(f"/v1/batches/{batch_id}").json()["status"] in ("queued", "running")
    confirm.click()
    tab.page.wait_for_url(f"**/ui/batches/{batch_id}")
    expect(tab.page.locator('[data-test="status"]')).to_have_text("cancelled")
    assert api.get(f"/v1/batches/{batch_id}").json()["metrics"]["cancelled"] == 5
    tab.shot("cancelled")


def test_redeliver_a_failed_delivery(server, api, tenant, tabs):
    with Receiver(script=[500, 500], default=200) as receiver:
        api.post("/v1/webhook-endpoints", json={"name": "hooks", "url": receiver.url,
                                                "event_types": ["batch.completed"]})
        batch_id = submit(api, "held", [0])
        release(batch_id, 1)
        deliveries = f"/v1/batches/{batch_id}/deliveries"
        deadline = time.monotonic() + WAIT_MS / 1000
        while not [d for d in api.get(deliveries).json()["data"] if d["status"] == "failed"]:
            assert time.monotonic() < deadline, "the delivery did not fail in time"
            time.sleep(0.02)
        tab = tabs()
        tab.sign_in(server.key(tenant))
        tab.page.goto(f"/ui/batches/{batch_id}")
        delivery = tab.page.locator('[data-test="delivery"]')
        expect(delivery).to_have_attribute("data-status", "failed")
        expect(delivery.locator('[data-test="attempt"]')).to_have_count(2)
        tab.shot("delivery-failed")
        delivery.locator('[data-test="redeliver"]').click()
        tab.page.wait_for_url(f"**/ui/batches/{batch_id}#deliveries")
        while len(receiver.requests) < 3:
            assert time.monotonic() < deadline + WAIT_MS / 1000, "no redelivery arrived"
            time.sleep(0.02)
        expect(_reloaded_until(tab, delivery, "succeeded")).to_have_count(3)
        tab.shot("delivery-redelivered")
        tab.page.goto("/ui/endpoints")
        expect(tab.page.locator('[data-test="success-rate"]')).to_contain_text("100.0 %")
        tab.shot("endpoints")


def _reloaded_until(tab: Tab, delivery, status: str):
    """The delivery's attempt rows once a reload shows it `status` (deliveries are not
    followed live: the page shows them as they were when it was drawn)."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while delivery.get_attribute("data-status") != status:
        assert time.monotonic() < deadline, f"the delivery never showed {status}"
        tab.page.reload()
    return delivery.locator('[data-test="attempt"]')


def test_a_second_tenant_sees_none_of_it_and_sign_out_ends_the_session(server, api, tenant,
                                                                       tabs):
    batch_id = submit(api, "held", [0])
    release(batch_id, 1)
    owner, other = tabs(), tabs()
    owner.sign_in(server.key(tenant))
    expect(owner.page.locator(f'[data-batch-id="{batch_id}"]')).to_have_count(1)
    other.sign_in(server.key(tenant + "-other"))
    expect(other.page.locator('[data-test="no-batches"]')).to_be_visible()
    expect(other.page.locator(f'[data-batch-id="{batch_id}"]')).to_have_count(0)
    assert other.context.request.get(f"/ui/batches/{batch_id}").status == 404
    other.shot("other-tenant")
    other.page.click('[data-test="sign-out"]')
    other.page.wait_for_url("**/ui/login")
    other.page.goto("/ui/batches")
    other.page.wait_for_url("**/ui/login")  # the session is gone
    expect(other.page.locator('input[name="api_key"]')).to_be_visible()
    other.shot("signed-out")


def test_the_guard_sees_a_csp_violation(server, tenant, chromium):
    """The console guard of `tabs` can fail: an inline script put into a page is refused
    by the CSP, and the refusal is a console error."""
    tab = Tab(chromium, server, "csp-guard")
    try:
        tab.sign_in(server.key(tenant))
        tab.page.evaluate("""() => {
            const script = document.createElement("script");
            script.textContent = "window.injected = true";
            document.body.appendChild(script);
        }""")
        deadline = time.monotonic() + WAIT_MS / 1000
        while not tab.errors:
            assert time.monotonic() < deadline, "no console error for a refused script"
            tab.page.wait_for_timeout(20)
        assert tab.page.evaluate("() => window.injected") is None
        assert any("Content Security Policy" in e for e in tab.errors), tab.errors
    finally:
        tab.context.close()
