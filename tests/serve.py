"""`minibatch serve` and the CLI as subprocesses, for integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import database
from tests.receiver import free_port


def cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minibatch", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


class Served:
    """`minibatch serve` in a subprocess, configured through MINIBATCH_* variables."""

    def __init__(self, tmp_path: Path, *flags: str, env: dict | None = None,
                 preexec_fn: Callable[[], None] | None = None, db: str | None = None) -> None:
        self.db = db or database(tmp_path / "served.db")
        for _ in range(3):  # a port found free may be taken before serve binds it
            if self._start(tmp_path, flags, env, preexec_fn):
                break
        else:
            raise AssertionError(f"serve did not start:\n{self.log.read_text()}")
        self.key = json.loads(cli("keys", "create", "--tenant", "cli", "--db", self.db).stdout)
        self.client_env = {"MINIBATCH_URL": self.url,
                           "MINIBATCH_API_KEY": self.key["api_key"]}

    def _start(self, tmp_path: Path, flags: tuple[str, ...], env: dict | None,
               preexec_fn: Callable[[], None] | None) -> bool:
        """Start serve on a free port; True once /healthz answers, False if it exited
        (say, the port was taken meanwhile). A serve that neither answers nor exits in a
        minute is killed, so no failed start leaves a process behind."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "MINIBATCH_DB": self.db, "MINIBATCH_PORT": str(self.port),
                    "MINIBATCH_SHUTDOWN_GRACE_S": "0.5", **(env or {})}
        self.log = tmp_path / f"serve-{self.port}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "minibatch", "serve", *flags], env=self.env,
                stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp_path),
                preexec_fn=preexec_fn)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                return False
            time.sleep(0.05)
        self.kill()
        return False

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text().splitlines()[-lines:])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)
