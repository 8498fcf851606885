"""The dashboard's rules over plain HTTP, against a real server: sessions and cookies,
forgery checks, tenant isolation, the CSP, escaping, and what each page shows. What only
a browser can show (live progress, clicking through) is in tests/browser."""

from __future__ import annotations

import hashlib
import re
import time

import httpx
import pytest

from minibatch.dashboard import CLIP
from minibatch.errors import Fail
from tests.conftest import ServerThread, tenant_client
from tests.receiver import Receiver

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Browsers:
    """httpx clients of the dashboard, closed when the test ends."""

    def __init__(self, srv: ServerThread) -> None:
        self.srv = srv
        self.made: list[httpx.Client] = []

    def anonymous(self, **options) -> httpx.Client:
        client = httpx.Client(base_url=self.srv.url, timeout=10, **options)
        self.made.append(client)
        return client

    def sign_in(self, key: str) -> tuple[httpx.Client, str]:
        """A client signed in with `key`, and its form token."""
        client = self.anonymous()
        page = client.get("/ui/login")
        answer = client.post("/ui/login", data={"api_key": key,
                                                "csrf": CSRF.search(page.text).group(1)})
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/batches"
        return client, CSRF.search(client.get("/ui/batches").text).group(1)


@pytest.fixture
def browsers(server):
    made = Browsers(server)
    yield made
    for client in made.made:
        client.close()


def wait_for(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerThread(str(tmp_path_factory.mktemp("ui") / "jobs.db"),
                       webhook_retry_schedule="0,0.05", retry_base_s=0.01)
    gate: dict[str, bool] = {"open": False}

    @srv.mb.handler("held", max_attempts=1)
    async def held(item):
        import anyio

        while not gate["open"]:
            await anyio.sleep(0.01)
        return item.input

    @srv.mb.handler("fails", max_attempts=1)
    async def fails(item):
        raise Fail(item.input["message"], code=item.input.get("code", "bad"))

    @srv.mb.openai_handler("/v1/chat/completions", max_attempts=1)
    async def chat(item):
        content = item.input["messages"][0]["content"]
        if content == "refuse":
            raise Fail("the model refused")
        return {"object": "chat.completion", "answer": content.upper()}

    @srv.mb.anthropic_handler(max_attempts=1)
    async def message(item):
        content = item.input["messages"][0]["content"]
        if content == "refuse":
            raise Fail("the model refused")
        return {"id": "msg_local", "type": "message", "role": "assistant",
                "model": item.input["model"], "content": [{"type": "text", "text": content}],
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 1}}

    yield srv.start()
    gate["open"] = True
    srv.stop()


@pytest.fixture
def api(server, tenant):
    with tenant_client(server, tenant) as c:
        yield c


def submit(api: httpx.Client, kind: str, inputs: list, **spec) -> dict:
    answer = api.post("/v1/batches", json={"kind": kind, "items": [{"input": i} for i in inputs],
                                           **spec})
    assert answer.status_code == 201, answer.text
    return answer.json()


def ended(api: httpx.Client, batch_id: str) -> dict:
    return wait_for(lambda: (b := api.get(f"/v1/batches/{batch_id}").json())["status"] in (
        "completed", "failed", "cancelled") and b)


# -- sign-in, sessions, cookies ----------

def test_sign_in_sets_a_strict_httponly_cookie_that_holds_no_key(server, tenant, browsers):
    key = server.key(tenant)
    client = browsers.anonymous()
    page = client.get("/ui/login")
    assert page.status_code == 200 and 'name="api_key"' in page.text
    answer = client.post("/ui/login", data={"api_key": key,
                                            "csrf": CSRF.search(page.text).group(1)})
    cookie = next(c for c in answer.headers.get_list("set-cookie")
                  if c.startswith("mb_session="))
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/ui"} <= flags
    token = cookie.split(";")[0].split("=", 1)[1]
    assert key not in cookie and key not in token and len(token) >= 40
    # The server keeps digests only: neither the key nor the token is stored.
    rows = server.mb.store._all("SELECT token_hash, key_hash FROM ui_sessions")
    assert (hashlib.sha256(token.encode()).digest(),
            hashlib.sha256(key.encode()).digest()) in rows
    assert client.get("/ui/batches").status_code == 200


def test_an_unknown_key_is_refused_and_starts_no_session(server, browsers):
    client = browsers.anonymous()
    page = client.get("/ui/login")
    answer = client.post("/ui/login", data={"api_key": "mb_not-a-key",
                                            "csrf": CSRF.search(page.text).group(1)})
    assert answer.status_code == 401 and "Unknown or revoked API key" in answer.text
    assert "mb_session" not in client.cookies
    assert client.get("/ui/batches").status_code == 303


def test_without_a_session_pages_go_to_sign_in_and_the_rest_is_refused(server, api, browsers):
    batch = submit(api, "held", [1])
    anonymous = browsers.anonymous()
    for path in ("/ui/batches", f"/ui/batches/{batch['id']}", "/ui/endpoints",
                 f"/ui/batches/{batch['id']}/results"):
        answer = anonymous.get(path)
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/login", path
    assert anonymous.get("/ui/live", params={"id": batch["id"]}).status_code == 401
    forged = anonymous.post(f"/ui/batches/{batch['id']}/cancel", data={"csrf": "x"})
    assert forged.status_code == 403
    assert api.get(f"/v1/batches/{batch['id']}").json()["status"] in ("queued", "running")
    api.post(f"/v1/batches/{batch['id']}/cancel")


def test_revoking_the_key_ends_its_sessions(server, tenant, browsers):
    from minibatch.auth import create_tenant_key

    made = create_tenant_key(server.mb.store, tenant)
    client, _ = browsers.sign_in(made["api_key"])
    server.mb.store.key_revoke(made["key_id"], time.time())
    answer = client.get("/ui/batches")
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/login"
    token = client.cookies["mb_session"]
    assert server.mb.store.session_get(hashlib.sha256(token.encode()).digest(),
                                       time.time()) is None


def test_sign_out_ends_the_session_for_good(server, tenant, browsers):
    client, csrf = browsers.sign_in(server.key(tenant))
    token = client.cookies["mb_session"]
    answer = client.post("/ui/logout", data={"csrf": csrf})
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/login"
    assert 'mb_session=""' in answer.headers["set-cookie"]
    replayed = browsers.anonymous(cookies={"mb_session": token})
    assert replayed.get("/ui/batches").status_code == 303


# -- forgery ----------

FORGERIES = {
    "another origin": ({"origin": "http://evil.example"}, True),
    "a cross-site fetch": ({"sec-fetch-site": "cross-site"}, True),
    "a same-site fetch from another origin": ({"sec-fetch-site": "same-site"}, True),
    "an opaque origin": ({"origin": "null"}, True),
    "no form token": ({}, False),
}


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forged_cancel_is_403_and_changes_nothing(server, api, tenant, forgery, browsers):
    client, csrf = browsers.sign_in(server.key(tenant))
    batch = submit(api, "held", [1, 2])
    headers, with_token = FORGERIES[forgery]
    answer = client.post(f"/ui/batches/{batch['id']}/cancel", headers=headers,
                         data={"csrf": csrf} if with_token else {})
    assert answer.status_code == 403 and "text/html" in answer.headers["content-type"]
    assert api.get(f"/v1/batches/{batch['id']}").json()["status"] in ("queued", "running")
    # The same request from this origin, with the token, is what cancels.
    same_origin = {"origin": server.url, "sec-fetch-site": "same-origin"}
    answer = client.post(f"/ui/batches/{batch['id']}/cancel", headers=same_origin,
                         data={"csrf": csrf})
    assert answer.status_code == 303
    assert api.get(f"/v1/batches/{batch['id']}").json()["status"] in ("cancelling",
                                                                      "cancelled")


def test_a_wrong_or_another_sessions_token_is_403(server, api, tenant, browsers):
    client, _ = browsers.sign_in(server.key(tenant))
    _, other_token = browsers.sign_in(server.key(tenant))
    batch = submit(api, "held", [1])
    for token in ("", "x" * 32, other_token):
        answer = client.post(f"/ui/batches/{batch['id']}/cancel", data={"csrf": token})
        assert answer.status_code == 403
    assert api.get(f"/v1/batches/{batch['id']}").json()["status"] in ("queued", "running")
    api.post(f"/v1/batches/{batch['id']}/cancel")


def test_a_forged_sign_in_is_403(server, tenant, browsers):
    key = server.key(tenant)
    client = browsers.anonymous()
    csrf = CSRF.search(client.get("/ui/login").text).group(1)
    cross = client.post("/ui/login", data={"api_key": key, "csrf": csrf},
                        headers={"origin": "http://evil.example"})
    no_cookie = browsers.anonymous().post("/ui/login", data={"api_key": key, "csrf": csrf})
    assert cross.status_code == no_cookie.status_code == 403
    assert "mb_session" not in client.cookies


# -- what a tenant sees ----------

def test_a_tenant_sees_only_its_own(server, api, tenant, browsers):
    with Receiver(default=500) as receiver:
        batch = submit(api, "echo", [1], webhook={"url": receiver.url})
        ended(api, batch["id"])
        delivery = wait_for(lambda: [d for d in api.get(
            f"/v1/batches/{batch['id']}/deliveries").json()["data"] if d["status"] == "failed"])[0]
    other, csrf = browsers.sign_in(server.key(tenant + "-other"))
    listed = other.get("/ui/batches")
    assert listed.status_code == 200 and batch["id"] not in listed.text
    for path in (f"/ui/batches/{batch['id']}", f"/ui/batches/{batch['id']}/results"):
        assert other.get(path).status_code == 404, path
    assert other.get("/ui/live", params={"id": batch["id"]}).json() == {"batches": {}}
    assert other.post(f"/ui/deliveries/{delivery['id']}/redeliver",
                      data={"csrf": csrf}).status_code == 404
    running = submit(api, "held", [1])
    assert other.post(f"/ui/batches/{running['id']}/cancel",
                      data={"csrf": csrf}).status_code == 404
    assert api.get(f"/v1/batches/{running['id']}").json()["status"] in ("queued", "running")
    api.post(f"/v1/batches/{running['id']}/cancel")
    attempts = len(api.get(f"/v1/batches/{batch['id']}/deliveries").json()["data"][0]
                   ["attempts"])
    assert attempts == delivery["attempt_count"]  # the refused redeliver sent nothing


# -- the pages ----------

INLINE = re.compile(r"<script(?![^>]*\bsrc=)|\sstyle=|\son[a-z]+=", re.IGNORECASE)


def test_every_page_has_a_strict_csp_and_no_inline_script(server, api, tenant, browsers):
    client, _ = browsers.sign_in(server.key(tenant))
    batch = submit(api, "fails", [{"message": "nope"}])
    ended(api, batch["id"])
    pages = ["/ui/login", "/ui/batches", f"/ui/batches/{batch['id']}",
             f"/ui/batches/{batch['id']}?items=failed", "/ui/endpoints",
             "/ui/batches/batch_missing"]
    for path in pages:
        answer = client.get(path)
        csp = answer.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp, path
        assert "unsafe" not in csp and "frame-ancestors 'none'" in csp, path
        assert answer.headers["x-content-type-options"] == "nosniff", path
        assert answer.headers["cache-control"] == "no-store", path
        assert not INLINE.search(answer.text), (path, INLINE.search(answer.text))


def test_untrusted_text_is_escaped_and_clipped(server, api, tenant, browsers):
    client, _ = browsers.sign_in(server.key(tenant))
    hostile = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    shown = submit(api, "echo", [{"html": hostile, "long": "y" * 5000}],
                   metadata={"note": hostile})
    failing = submit(api, "fails", [{"message": hostile + "z" * 5000, "code": "<b>x</b>"}])
    ended(api, shown["id"]), ended(api, failing["id"])
    for batch in (shown, failing):
        page = client.get(f"/ui/batches/{batch['id']}").text
        assert "<script>alert" not in page and "<img src=x" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "y" * (CLIP + 1) not in page and "z" * 4001 not in page
    assert "<b>x</b>" not in client.get(f"/ui/batches/{failing['id']}").text


def test_errors_are_grouped_by_message_with_counts(server, api, tenant, browsers):
    client, _ = browsers.sign_in(server.key(tenant))
    inputs = [{"message": "timeout upstream"}] * 5 + [{"message": "bad row"}] * 2
    batch = submit(api, "fails", inputs)
    ended(api, batch["id"])
    page = client.get(f"/ui/batches/{batch['id']}").text
    groups = re.findall(r'data-test="error-group" data-count="(\d+)">.*?<a [^>]*>([^<]*)</a>',
                        page, re.S)
    assert groups == [("5", "timeout upstream"), ("2", "bad row")]


def test_items_are_paged_and_filtered_by_status(server, api, tenant, browsers):
    client, _ = browsers.sign_in(server.key(tenant))
    ok = submit(api, "echo", list(range(120)))
    ended(api, ok["id"])
    first = client.get(f"/ui/batches/{ok['id']}").text
    assert first.count('data-test="item"') == 50
    more = re.search(r'href="([^"]+)#items" data-test="next-items"', first).group(1)
    second = client.get(more.replace("&amp;", "&")).text
    indexes = re.findall(r'data-test="item" data-item-id="[^"]+" data-status="succeeded">\s*'
                         r'<td>(\d+)</td>', second)
    assert indexes[0] == "50" and len(indexes) == 50
    mixed = submit(api, "fails", [{"message": "no"}])
    ended(api, mixed["id"])
    failed = client.get(f"/ui/batches/{mixed['id']}", params={"items": "failed"}).text
    assert re.findall(r'data-test="item" data-item-id="[^"]+" data-status="(\w+)"',
                      failed) == ["failed"]  # the filter finds the failure it has
    none_failed = client.get(f"/ui/batches/{ok['id']}", params={"items": "failed"}).text
    assert 'data-test="item"' not in none_failed and "No items failed" in none_failed
    bad = client.get(f"/ui/batches/{ok['id']}", params={"items": "bogus"})
    assert bad.status_code == 422 and "unknown status" in bad.text


def test_the_batch_list_filters_by_status_newest_first(server, api, tenant, browsers):
    client, _ = browsers.sign_in(server.key(tenant))
    done = [submit(api, "echo", [i]) for i in range(3)]
    for batch in done:
        ended(api, batch["id"])
    running = submit(api, "held", [1])
    rows = re.findall(r'data-test="batch-row" data-batch-id="([^"]+)"',
                      client.get("/ui/batches").text)
    assert rows == [running["id"], *[b["id"] for b in reversed(done)]]
    completed = re.findall(r'data-batch-id="([^"]+)"',
                           client.get("/ui/batches", params={"status": "completed"}).text)
    assert completed == [b["id"] for b in reversed(done)]
    api.post(f"/v1/batches/{running['id']}/cancel")


def test_live_answers_the_counters_the_progress_bars_follow(server, api, tenant, browsers):
    client, _ = browsers.sign_in(server.key(tenant))
    batch = submit(api, "echo", list(range(7)))
    ended(api, batch["id"])
    live = client.get("/ui/live", params={"id": [batch["id"], "batch_unknown"]}).json()
    assert live == {"batches": {batch["id"]: {
        "status": "completed", "done": 7, "total": 7,
        "metrics": {"queued": 0, "running": 0, "succeeded": 7, "failed": 0, "cancelled": 0,
                    "expired": 0}}}}
    bar = re.search(r'data-test="progress" data-done="(\d+)" data-total="(\d+)"',
                    client.get(f"/ui/batches/{batch['id']}").text)
    assert bar.groups() == ("7", "7")


def test_results_download_as_jsonl(server, api, tenant, browsers):
    client, _ = browsers.sign_in(server.key(tenant))
    batch = submit(api, "echo", ["a", "b"])
    ended(api, batch["id"])
    answer = client.get(f"/ui/batches/{batch['id']}/results")
    assert answer.headers["content-disposition"] == (
        f'attachment; filename="{batch["id"]}.jsonl"')
    assert [line.split('"output":')[1].split(",")[0] for line in answer.text.splitlines()] == [
        '"a"', '"b"']


def test_a_delivery_shows_every_attempt_and_redelivers(server, api, tenant, browsers):
    client, csrf = browsers.sign_in(server.key(tenant))
    with Receiver(default=503) as receiver:
        batch = submit(api, "echo", [1], webhook={"url": receiver.url})
        delivery = wait_for(lambda: [d for d in api.get(
            f"/v1/batches/{batch['id']}/deliveries").json()["data"] if d["status"] == "failed"])[0]
        page = client.get(f"/ui/batches/{batch['id']}").text
        block = page.split(f'data-delivery-id="{delivery["id"]}"')[1].split("</article>")[0]
        assert block.count('data-test="attempt"') == delivery["attempt_count"] == 2
        assert "HTTP 503" in block and 'action="/ui/deliveries/' in block
        answer = client.post(f"/ui/deliveries/{delivery['id']}/redeliver", data={"csrf": csrf})
        assert answer.status_code == 303
        assert answer.headers["location"] == f"/ui/batches/{batch['id']}#deliveries"
        wait_for(lambda: len(receiver.requests) == 3)


def test_endpoint_health_shows_success_rate_and_last_error(server, api, tenant, browsers):
    client, _ = browsers.sign_in(server.key(tenant))
    with Receiver(default=200) as good, Receiver(default=500) as bad:
        made = [api.post("/v1/webhook-endpoints", json={
            "name": name, "url": r.url, "event_types": ["batch.completed"]}).json()
            for name, r in (("good", good), ("bad", bad))]
        for i in range(2):
            ended(api, submit(api, "echo", [i])["id"])
        wait_for(lambda: len(good.requests) == 2 and len(bad.requests) == 4)
        page = wait_for(lambda: (p := client.get("/ui/endpoints").text).count("of the last 2")
                        == 2 and p)
    rows = {m[0]: m[1] for m in re.findall(
        r'data-endpoint-id="([^"]+)">(.*?)</tr>', page, re.S)}
    good_row, bad_row = rows[made[0]["id"]], rows[made[1]["id"]]
    assert "100.0 %" in good_row and 'data-test="last-error">—' in good_row
    assert "0.0 %" in bad_row and "HTTP 500" in bad_row


def test_batches_of_every_dialect_are_shown(server, api, tenant, browsers):
    import json

    import anthropic
    import openai

    key = server.key(tenant)
    native = submit(api, "echo", [1])
    with openai.OpenAI(base_url=server.url + "/openai/v1", api_key=key) as oai:
        lines = [{"custom_id": c, "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "m", "messages": [{"role": "user", "content": c}]}}
                 for c in ("hello", "refuse")]
        file = oai.files.create(file=("in.jsonl", "".join(json.dumps(x) + "\n" for x in lines)
                                      .encode()), purpose="batch")
        openai_batch = oai.batches.create(input_file_id=file.id, completion_window="24h",
                                          endpoint="/v1/chat/completions").id
        wait_for(lambda: oai.batches.retrieve(openai_batch).status == "completed")
    with anthropic.Anthropic(base_url=server.url + "/anthropic", api_key=key) as claude:
        anthropic_batch = claude.messages.batches.create(requests=[
            {"custom_id": c, "params": {"model": "m", "max_tokens": 10,
                                        "messages": [{"role": "user", "content": c}]}}
            for c in ("hello", "refuse")]).id
        wait_for(lambda: claude.messages.batches.retrieve(anthropic_batch)
                 .processing_status == "ended")
    client, _ = browsers.sign_in(key)
    listed = client.get("/ui/batches").text
    for batch_id, dialect in ((native["id"], "native"), (openai_batch, "openai"),
                              (anthropic_batch, "anthropic")):
        row = listed.split(f'data-batch-id="{batch_id}"')[1].split("</tr>")[0]
        assert f"<td>{dialect}</td>" in row, (dialect, row)
    for batch_id in (openai_batch, anthropic_batch):
        page = client.get(f"/ui/batches/{batch_id}")
        assert page.status_code == 200
        assert re.search(r'data-test="error-group" data-count="1">.*the model refused',
                         page.text, re.S), batch_id
        assert 'data-done="2" data-total="2"' in page.text
