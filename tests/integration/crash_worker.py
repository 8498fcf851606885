"""A worker process for the crash test: runs the `work` kind until the batch ends.

Usage: python crash_worker.py DB BATCH_ID RUN_LOG [HOLD_FROM]
Each handler call appends the item id to RUN_LOG, so the test can tell what ran. With
HOLD_FROM, items whose input is at least HOLD_FROM never finish: this process cannot end
the batch, so a kill is sure to land mid-run however fast the machine is.
"""

import os
import sys

import anyio

import minibatch


def make(db: str, *, lease_s: float = 5, hold_from: int | None = None) -> minibatch.Minibatch:
    mb = minibatch.Minibatch(db, lease_s=lease_s, poll_interval_s=0.02)

    @mb.handler("work", concurrency=20)
    async def work(item: minibatch.Item) -> dict:
        if hold_from is not None and item.input >= hold_from:
            await anyio.sleep_forever()  # until the test kills this process
        await anyio.sleep(0.002)
        log = os.environ.get("RUN_LOG")
        if log:
            with open(log, "a") as f:
                f.write(item.id + "\n")
        return {"i": item.input}

    return mb


async def main(db: str, batch_id: str, hold_from: int | None) -> None:
    mb = make(db, hold_from=hold_from)
    async with mb:
        await mb.wait(batch_id)
    mb.close()


if __name__ == "__main__":
    os.environ["RUN_LOG"] = sys.argv[3]
    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[4]) if len(sys.argv) > 4 else None)
