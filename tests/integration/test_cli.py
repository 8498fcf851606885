"""The `minibatch` command as users run it: subprocesses against a real server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.receiver import free_port
from tests.serve import Served, cli

ROOT = Path(__file__).resolve().parents[2]


def one_clear_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minibatch: "), proc.stderr
    return lines[0]


@pytest.fixture
def served(tmp_path):
    srv = Served(tmp_path, "--allow-private-webhooks", "--webhook-retry-schedule", "0,0.1")
    yield srv
    srv.stop()


def write_jsonl(path: Path, items: list[dict]) -> str:
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return str(path)


def test_keys_create_prints_one_json_line_and_the_key_works_at_once(served):
    created = cli("keys", "create", "--tenant", "acme", "--db", served.db)
    assert created.returncode == 0
    [line] = created.stdout.splitlines()
    out = json.loads(line)
    assert set(out) == {"tenant", "api_key", "webhook_secret", "key_id"}
    assert out["tenant"] == "acme" and out["key_id"].startswith("key_")
    assert out["webhook_secret"].startswith("whsec_")
    got = httpx.get(served.url + "/v1/batches", headers={"x-api-key": out["api_key"]})
    assert got.status_code == 200


def test_rotate_secret_prints_the_new_secret(served):
    rotated = cli("keys", "rotate-secret", "--tenant", "cli", "--overlap", "60",
                  "--db", served.db)
    out = json.loads(rotated.stdout)
    assert rotated.returncode == 0 and out["tenant"] == "cli"
    assert out["webhook_secret"] != served.key["webhook_secret"] and out["secret_id"]


def test_submit_wait_status_results(served, tmp_path):
    items = [{"input": {"n": i}, "entry_id": f"e{i}"} for i in range(300)]
    submitted = cli("submit", write_jsonl(tmp_path / "in.jsonl", items), "--kind", "echo",
                    "--wait", env=served.client_env)
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    assert re.fullmatch(r"batch_[0-9a-f]+", batch_id)
    assert "completed 300/300 done" in submitted.stderr  # plain lines without a terminal
    status = cli("status", batch_id, env=served.client_env)
    assert status.returncode == 0
    assert json.loads(status.stdout)["status"] == "completed"
    results = cli("results", batch_id, env=served.client_env)
    lines = [json.loads(line) for line in results.stdout.splitlines()]
    assert results.returncode == 0 and len(lines) == 300
    assert lines[7] == {"id": lines[7]["id"], "entry_id": "e7", "status": "succeeded",
                        "output": {"n": 7}, "error": None, "attempts": 1}


def test_submit_wait_exits_non_zero_when_the_batch_fails(served, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"input": {"seconds": -1}}] * 3)
    submitted = cli("submit", bad, "--kind", "sleep", "--wait", env=served.client_env)
    assert submitted.returncode == 1
    assert "failed 3/3 done, 3 failed" in submitted.stderr


def test_client_errors_are_one_line_and_non_zero(served, tmp_path):
    good = write_jsonl(tmp_path / "ok.jsonl", [{"input": 1}])
    unreachable = {**served.client_env, "MINIBATCH_URL": f"http://127.0.0.1:{free_port()}"}
    assert "cannot reach" in one_clear_line(cli("submit", good, "--kind", "echo",
                                                env=unreachable))
    bad_key = {**served.client_env, "MINIBATCH_API_KEY": "mb_wrong"}
    assert "API key" in one_clear_line(cli("status", "batch_x", env=bad_key))
    assert "cannot read" in one_clear_line(cli("submit", str(tmp_path / "missing.jsonl"),
                                               "--kind", "echo", env=served.client_env))
    assert "404" in one_clear_line(cli("status", "batch_nope", env=served.client_env))
    assert "404" in one_clear_line(cli("results", "batch_nope", env=served.client_env))
    no_key = {k: v for k, v in served.client_env.items() if k != "MINIBATCH_API_KEY"}
    env = {k: v for k, v in os.environ.items() if k != "MINIBATCH_API_KEY"} | no_key
    proc = subprocess.run([sys.executable, "-m", "minibatch", "status", "batch_x"],
                          capture_output=True, text=True, env=env, timeout=30)
    assert "MINIBATCH_API_KEY" in one_clear_line(proc)
    bad_line = write_jsonl(tmp_path / "bad.jsonl", [{"input": 1}, {"nope": 1}])
    assert "line 2" in one_clear_line(cli("submit", bad_line, "--kind", "echo",
                                          env=served.client_env))


def test_sigterm_hands_running_items_back_and_exits_0(tmp_path):
    srv = Served(tmp_path)
    items = write_jsonl(tmp_path / "slow.jsonl", [{"input": {"seconds": 60}}] * 5)
    batch_id = cli("submit", items, "--kind", "sleep", env=srv.client_env).stdout.strip()
    headers = {"x-api-key": srv.key["api_key"]}
    deadline = time.monotonic() + 60
    while httpx.get(f"{srv.url}/v1/batches/{batch_id}",
                    headers=headers).json()["metrics"]["running"] < 5:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - started < 30  # a 0.5 s grace, not the items' 60 s
    restarted = Served(tmp_path)
    batch = httpx.get(f"{restarted.url}/v1/batches/{batch_id}",
                      headers={"x-api-key": restarted.key["api_key"]}).json()
    restarted.stop()
    assert batch["metrics"]["queued"] + batch["metrics"]["running"] == 5
    assert batch["status"] == "running"


def test_handlers_module_kinds_are_served(tmp_path):
    (tmp_path / "myhandlers.py").write_text(
        "import minibatch\n\n"
        "@minibatch.handler('shout', concurrency=4)\n"
        "async def shout(item):\n"
        "    return item.input.upper()\n")
    srv = Served(tmp_path, "--handlers", "myhandlers")
    try:
        items = write_jsonl(tmp_path / "words.jsonl", [{"input": "hi"}, {"input": "yo"}])
        batch_id = cli("submit", items, "--kind", "shout", "--wait",
                       env=srv.client_env).stdout.strip()
        out = cli("results", batch_id, env=srv.client_env).stdout.splitlines()
        assert [json.loads(line)["output"] for line in out] == ["HI", "YO"]
    finally:
        assert srv.stop() == 0


def test_bad_server_flags_are_one_line(tmp_path):
    proc = cli("serve", "--webhook-retry-schedule", "soon", "--db", str(tmp_path / "x.db"))
    assert "webhook_retry_schedule" in one_clear_line(proc)
    proc = cli("serve", "--handlers", "no_such_module_here", "--db", str(tmp_path / "x.db"))
    assert "no_such_module_here" in one_clear_line(proc)


def test_demo_verifies_its_webhook_within_30_seconds():
    started = time.monotonic()
    proc = cli("demo", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verified" in proc.stdout.splitlines() and "signature verified" in proc.stdout
    assert time.monotonic() - started < 30


def test_readme_python_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "succeeded" in proc.stdout


def test_readme_curl_example_runs_as_written(served):
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```sh\n(.*?)```", readme, re.S) if "curl" in b)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **served.client_env})
    assert proc.returncode == 0, proc.stderr
    status, result = proc.stdout.strip().splitlines()[-2:]
    assert '"status":"completed"' in status.replace(" ", "")
    assert json.loads(result)["output"] == {"hello": "world"}


def test_more_client_mistakes_are_one_line(served, tmp_path):
    """Found in review: these printed tracebacks."""
    env = {**served.client_env, "MINIBATCH_URL": "http://[::1"}
    assert "URL" in one_clear_line(cli("status", "batch_x", env=env))
    env = {**served.client_env, "MINIBATCH_API_KEY": "clé"}
    assert "MINIBATCH_API_KEY" in one_clear_line(cli("status", "batch_x", env=env))
    taken = cli("serve", "--db", str(tmp_path / "other.db"), "--port", str(served.port))
    assert "cannot listen" in one_clear_line(taken)
    nobody = cli("keys", "rotate-secret", "--tenant", "nobody", "--db", served.db)
    assert "no tenant" in one_clear_line(nobody)
    negative = cli("keys", "rotate-secret", "--tenant", "cli", "--overlap", "-100",
                   "--db", served.db)
    assert "--overlap" in one_clear_line(negative)


def test_readme_openai_examples_run_as_written(tmp_path):
    """The README's OpenAI client script, against `serve --handlers` with the README's
    handler module: a real `openai` SDK, a real server, the handler's answers back."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    client_block = next(b for b in blocks if "from openai import OpenAI" in b)
    handler_block = next(b for b in blocks if "@minibatch.openai_handler" in b)
    (tmp_path / "readme_handlers.py").write_text(handler_block)
    (tmp_path / "requests.jsonl").write_text("".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "m", "messages": [{"role": "user", "content": f"hi {i}"}]}})
        + "\n" for i in range(3)))
    srv = Served(tmp_path, "--handlers", "readme_handlers")
    try:
        proc = subprocess.run([sys.executable, "-c", client_block], capture_output=True,
                              text=True, cwd=tmp_path, timeout=60,
                              env={**os.environ, **srv.client_env})
    finally:
        srv.stop()
    assert proc.returncode == 0, proc.stderr
    status, *lines = proc.stdout.strip().splitlines()
    assert status.startswith("completed")
    answers = [json.loads(line) for line in lines]
    assert [a["custom_id"] for a in answers] == ["r0", "r1", "r2"]
    assert [a["response"]["body"]["choices"][0]["message"]["content"] for a in answers] == [
        "HI 0", "HI 1", "HI 2"]


def test_list_cancel_deliveries_and_redeliver(served, tmp_path):
    from tests.receiver import Receiver

    env = served.client_env
    with Receiver([500, 500]) as rx:  # both scheduled attempts fail; the redelivery succeeds
        first = cli("submit", write_jsonl(tmp_path / "a.jsonl", [{"input": 1}]), "--kind",
                    "echo", "--webhook-url", rx.url, "--wait", env=env)
        assert first.returncode == 0, first.stderr
        first_id = first.stdout.splitlines()[0]
        long = cli("submit", write_jsonl(tmp_path / "b.jsonl", [{"input": {"seconds": 600}}]),
                   "--kind", "sleep", env=env)
        long_id = long.stdout.strip()

        listed = cli("list", env=env)
        assert listed.returncode == 0
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [b["id"] for b in rows] == [long_id, first_id]  # newest first
        only = cli("list", "--status", "completed", env=env)
        assert [json.loads(line)["id"] for line in only.stdout.splitlines()] == [first_id]

        cancelled = cli("cancel", long_id, env=env)
        assert cancelled.returncode == 0
        assert json.loads(cancelled.stdout)["status"] in ("cancelling", "cancelled")

        deadline = time.monotonic() + 30
        while True:  # both attempts of the batch.completed delivery fail
            out = cli("deliveries", first_id, env=env)
            [delivery] = [json.loads(line) for line in out.stdout.splitlines()]
            if delivery["status"] == "failed":
                break
            assert time.monotonic() < deadline, delivery
            time.sleep(0.1)
        assert len(delivery["attempts"]) == 2
        again = cli("redeliver", delivery["id"], env=env)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["id"] == delivery["id"]
        deadline = time.monotonic() + 30
        while len(rx.requests) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    assert "no batch" in one_clear_line(cli("cancel", "batch_nope", env=env))
    assert "no batch" in one_clear_line(cli("deliveries", "batch_nope", env=env))
    assert "HTTP 404" in one_clear_line(cli("redeliver", "msg_nope", env=env))
    assert "HTTP 4" in one_clear_line(cli("list", "--status", "bogus", env=env))
    assert "cannot reach" in one_clear_line(cli("list", env={**env, "MINIBATCH_URL":
                                                             f"http://127.0.0.1:{free_port()}"}))


def test_keys_list_never_shows_a_key_and_a_revoked_key_is_401_at_once(served):
    made = json.loads(cli("keys", "create", "--tenant", "acme", "--name", "ci", "--db",
                          served.db).stdout)
    other = json.loads(cli("keys", "create", "--tenant", "acme", "--db", served.db).stdout)
    key = {"Authorization": f"Bearer {made['api_key']}"}
    assert httpx.get(served.url + "/v1/batches", headers=key).status_code == 200  # cached now
    running = httpx.post(served.url + "/v1/batches", headers=key, json={
        "kind": "sleep", "items": [{"input": {"seconds": 0.5}} for _ in range(3)]}).json()

    listed = cli("keys", "list", "--tenant", "acme", "--db", served.db)
    assert listed.returncode == 0
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["id"] for r in rows] == [made["key_id"], other["key_id"]]
    assert {"id", "tenant", "name", "created_at", "last_used_at"} <= set(rows[0])
    assert rows[0]["name"] == "ci" and rows[0]["last_used_at"] is not None
    assert rows[1]["last_used_at"] is None and rows[1]["revoked_at"] is None
    assert made["api_key"] not in listed.stdout and other["api_key"] not in listed.stdout
    everyone = cli("keys", "list", "--db", served.db).stdout
    assert {json.loads(line)["tenant"] for line in everyone.splitlines()} == {"cli", "acme"}

    revoked = cli("keys", "revoke", made["key_id"], "--db", served.db)
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["status"] == "revoked"
    refused = httpx.get(served.url + "/v1/batches", headers=key)  # the very next request
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    still = httpx.get(served.url + "/v1/batches",
                      headers={"Authorization": f"Bearer {other['api_key']}"})
    assert still.status_code == 200  # the tenant's other key goes on
    # The batch the revoked key made runs on: a key is the caller's door, not the work's.
    deadline = time.monotonic() + 30
    while httpx.get(f"{served.url}/v1/batches/{running['id']}", headers={
            "Authorization": f"Bearer {other['api_key']}"}).json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "no API key" in one_clear_line(cli("keys", "revoke", "key_nope", "--db",
                                              served.db))
