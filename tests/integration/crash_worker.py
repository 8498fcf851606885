"""A worker process for the crash test: runs the `work` kind until the batch ends.

Usage: python crash_worker.py DB BATCH_ID RUN_LOG
Each handler call appends the item id to RUN_LOG, so the test can tell what ran.
"""

import os
import sys

import anyio

import minibatch


def make(db: str) -> minibatch.Minibatch:
    mb = minibatch.Minibatch(db, lease_s=5, poll_interval_s=0.02)

    @mb.handler("work", concurrency=20)
    async def work(item: minibatch.Item) -> dict:
        await anyio.sleep(0.002)
        log = os.environ.get("RUN_LOG")
        if log:
            with open(log, "a") as f:
                f.write(item.id + "\n")
        return {"i": item.input}

    return mb


async def main(db: str, batch_id: str) -> None:
    mb = make(db)
    async with mb:
        await mb.wait(batch_id)
    mb.close()


if __name__ == "__main__":
    os.environ["RUN_LOG"] = sys.argv[3]
    anyio.run(main, sys.argv[1], sys.argv[2])
