"""Request ids and the log lines of `minibatch serve`, in a real server process."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx

from tests.serve import Served


def log_lines(served: Served) -> list[dict]:
    return [json.loads(line) for line in served.log.read_text().splitlines()
            if line.startswith("{")]


def wait_for_line(served: Served, match, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in log_lines(served):
            if match(entry):
                return entry
        time.sleep(0.05)
    raise AssertionError(f"no such log line in:\n{served.log_tail()}")


def test_every_response_carries_a_request_id_the_callers_if_it_is_sane(tmp_path):
    served = Served(tmp_path, "--log-format", "json")
    auth = {"Authorization": f"Bearer {served.key['api_key']}"}
    try:
        ok = httpx.get(served.url + "/v1/batches", headers={**auth, "x-request-id": "trace-1.a:b"})
        assert ok.headers["x-request-id"] == "trace-1.a:b"
        for bad in ("has space", "x" * 129, "tab\there", ""):
            r = httpx.get(served.url + "/healthz", headers={"x-request-id": bad})
            assert re.fullmatch(r"req_[0-9a-f]{16}", r.headers["x-request-id"]), bad
        fresh = {httpx.get(served.url + "/healthz").headers["x-request-id"] for _ in range(5)}
        assert len(fresh) == 5
        for response in (httpx.get(served.url + "/v1/batches"),  # 401
                         httpx.get(served.url + "/v1/batches/batch_nope", headers=auth),  # 404
                         httpx.post(served.url + "/v1/batches", headers=auth, json={}),  # 422
                         httpx.post(served.url + "/v1/batches", headers=auth,
                                    json={"kind": "echo", "items": [{"input": 1}]})):  # 201
            assert response.headers["x-request-id"].startswith("req_"), response
        access = wait_for_line(served, lambda e: e.get("request_id") == "trace-1.a:b")
        assert access["logger"] == "minibatch.access"
        assert (access["method"], access["path"], access["status"]) == (
            "GET", "/v1/batches", 200)
        assert access["duration_ms"] >= 0
        missing = wait_for_line(served, lambda e: e.get("path") == "/v1/batches/batch_nope")
        assert missing["status"] == 404 and missing["request_id"].startswith("req_")
    finally:
        assert served.stop() == 0


def test_a_log_line_written_while_a_request_is_served_names_its_id(tmp_path):
    """A client that goes away mid-body makes the server log that, inside the request."""
    served = Served(tmp_path, "--log-format", "json")
    try:
        with socket.create_connection(("127.0.0.1", served.port)) as conn:
            conn.sendall(b"POST /v1/batches HTTP/1.1\r\nhost: x\r\nx-request-id: gone-1\r\n"
                         b"authorization: Bearer " + served.key["api_key"].encode() +
                         b"\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n"
                         b"\r\n{\"kind\":")
            time.sleep(0.2)
        entry = wait_for_line(served, lambda e: e["logger"] != "minibatch.access"
                              and e.get("request_id") == "gone-1")
        assert "disconnected" in entry["message"]
    finally:
        assert served.stop() == 0


def test_text_logs_name_the_request_and_the_access_log_can_be_turned_off(tmp_path):
    served = Served(tmp_path)
    try:
        httpx.get(served.url + "/healthz", headers={"x-request-id": "text-1"})
        deadline = time.monotonic() + 30
        while "request_id=text-1" not in served.log.read_text():
            assert time.monotonic() < deadline, served.log_tail()
            time.sleep(0.05)
        line = next(x for x in served.log.read_text().splitlines() if "text-1" in x)
        assert "minibatch.access: GET /healthz 200" in line
        forged = "/x%0A2026-12-01T00:00:00.000 INFO minibatch.access: POST /v1/batches 201"
        httpx.get(served.url + forged, headers={"x-request-id": "forge-1"})
        deadline = time.monotonic() + 30
        while "request_id=forge-1" not in served.log.read_text():
            assert time.monotonic() < deadline, served.log_tail()
            time.sleep(0.05)
        assert not [x for x in served.log.read_text().splitlines()
                    if x.startswith("2026-12-01T00:00:00.000")]  # no forged line
    finally:
        assert served.stop() == 0
    quiet = Served(tmp_path, "--no-access-log", "--log-format", "json")
    try:
        r = httpx.get(quiet.url + "/healthz", headers={"x-request-id": "quiet-1"})
        assert r.headers["x-request-id"] == "quiet-1"  # the id is still sent back
    finally:
        assert quiet.stop() == 0
    assert not [e for e in log_lines(quiet) if e["logger"] == "minibatch.access"]
    assert any(e["logger"].startswith("uvicorn") for e in log_lines(quiet))  # JSON lines
