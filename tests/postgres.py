"""A throwaway PostgreSQL cluster for tests and CI: initdb in a temp dir, pg_ctl start on
127.0.0.1 and a free port, trust auth, fsync off. The server refuses to run as root, so
as root it runs as the `postgres` user.

    python -m tests.postgres start DIR   # prints the URL; the cluster lives in DIR
    python -m tests.postgres stop DIR

`fsync=off` and friends lose data only to an OS crash, never to kill -9 of a client or a
backend, which is what the tests do.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.receiver import free_port

SETTINGS = ["fsync=off", "synchronous_commit=off", "full_page_writes=off",
            "max_connections=300", "listen_addresses=127.0.0.1"]


def bindir() -> Path | None:
    """Where initdb and pg_ctl are (Debian keeps them off PATH), or None."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def start(root: str) -> str:
    """Start a cluster in `root` (made if missing) and return its URL."""
    bin_ = bindir()
    if bin_ is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql-15)")
    data, sockets = Path(root) / "data", Path(root) / "sockets"
    for d in (Path(root), sockets):
        d.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    subprocess.run(_as_owner([str(bin_ / "initdb"), "-D", str(data), "-A", "trust", "-U",
                              "postgres", "--no-sync"]), check=True, capture_output=True)
    options = " ".join(f"-c {s}" for s in SETTINGS) + f" -p {port} -k {sockets}"
    subprocess.run(_as_owner([str(bin_ / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                              str(Path(root) / "server.log"), "-w", "start"]),
                   check=True, capture_output=True)
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def stop(root: str) -> None:
    bin_ = bindir()
    data = Path(root) / "data"
    if bin_ is not None and data.exists():
        subprocess.run(_as_owner([str(bin_ / "pg_ctl"), "-D", str(data), "-m", "immediate",
                                  "stop"]), capture_output=True)


if __name__ == "__main__":
    command, where = sys.argv[1], sys.argv[2]
    if command == "start":
        print(start(where))
    else:
        stop(where)
