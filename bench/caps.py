"""A capped batch (or kind) runs at its cap: items/s against cap / item time, in one run.

For each case, a fresh SQLite file and one `Minibatch` in this process run `--items` items
of an async handler that sleeps `t` seconds. The cap is the batch's `concurrency` (the
kind's being far above it) or the kind's `concurrency`. The ceiling of such a run is
cap / t items/s (no system does better with that many at once); the ratio printed is
items/s / ceiling, the clock running from the submit until the batch is terminal.

Before issue 14 a capped batch waited a whole poll interval (0.2 s) for each freed slot:
1 ms items at concurrency 3 ran at ~15 items/s, a ratio of 0.005.

    .venv/bin/python bench/caps.py [--items 400]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import anyio

import minibatch

CASES = [  # (what is capped, cap, item seconds)
    ("batch", 3, 0.001), ("batch", 8, 0.01), ("batch", 30, 0.001), ("batch", 30, 0.01),
    ("kind", 3, 0.001), ("kind", 8, 0.01),
]


async def one_case(path: str, capped: str, cap: int, t: float, n: int) -> float:
    kind_cap = cap if capped == "kind" else 1000
    mb = minibatch.Minibatch(path, claim_size=min(100, 2 * kind_cap))

    @mb.handler("sleepy", concurrency=kind_cap)
    async def sleepy(item: minibatch.Item) -> None:
        await anyio.sleep(t)

    async with mb:
        started = time.perf_counter()
        batch = await mb.submit("sleepy", ({"input": i} for i in range(n)),
                                concurrency=cap if capped == "batch" else None)
        batch = await mb.wait(batch.id, timeout=600)
        elapsed = time.perf_counter() - started
    mb.close()
    if batch.metrics.succeeded != n:
        raise SystemExit(f"batch ended {batch.status} with {batch.metrics}")
    return n / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=400)
    args = p.parse_args()
    print(f"{'capped':>6} {'cap':>4} {'item ms':>8} {'items/s':>9} {'cap/t':>8} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (capped, cap, t) in enumerate(CASES):
            rate = anyio.run(one_case, os.path.join(tmp, f"{i}.db"), capped, cap, t,
                             args.items)
            ceiling = cap / t
            print(f"{capped:>6} {cap:>4} {t * 1000:>8g} {rate:>9.0f} {ceiling:>8.0f}"
                  f" {rate / ceiling:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
