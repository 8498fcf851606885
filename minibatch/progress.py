"""Following a batch to its end: a rich progress bar on a terminal, plain lines elsewhere.

Progress goes to stderr, so stdout stays the batch id (or results) for scripts.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

TERMINAL = ("completed", "failed", "cancelled", "expired")
PLAIN_EVERY_S = 1.0


class BatchProgress:
    """Shows done/total, rate, ETA and failures for a batch dict as it changes."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.last_plain = 0.0
        self.bar: Any = None
        self.task: Any = None
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TextColumn("{task.fields[rate]}/s"),
                                TimeRemainingColumn(),
                                TextColumn("[red]{task.fields[failed]} failed"),
                                console=Console(file=self.stream))
            self.bar.start()

    def update(self, batch: dict[str, Any]) -> None:
        m = batch["metrics"]
        done = m["succeeded"] + m["failed"] + m["cancelled"] + m.get("expired", 0)
        rate = done / max(time.monotonic() - self.started, 1e-6)
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task(batch["id"], total=m["total"], rate="0",
                                              failed=0)
            self.bar.update(self.task, completed=done, rate=f"{rate:,.0f}", failed=m["failed"],
                            description=f"{batch['id']} {batch['status']}")
            return
        now = time.monotonic()
        if now - self.last_plain >= PLAIN_EVERY_S or batch["status"] in TERMINAL:
            self.last_plain = now
            print(f"{batch['id']} {batch['status']} {done}/{m['total']} done,"
                  f" {m['failed']} failed, {rate:,.0f}/s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def follow(fetch: Callable[[], dict[str, Any]], poll_s: float = 0.25) -> dict[str, Any]:
    """Poll `fetch()` until the batch is terminal, showing progress; return the last one."""
    progress = BatchProgress()
    try:
        while True:
            batch = fetch()
            progress.update(batch)
            if batch["status"] in TERMINAL:
                return batch
            time.sleep(poll_s)
    finally:
        progress.close()
