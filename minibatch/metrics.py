"""Prometheus text for /metrics, and the item latency histogram the runner feeds.

Totals only: no tenant names, ids or per-tenant labels, since /metrics needs no key.
"""

from __future__ import annotations

import bisect

# Seconds; from a no-op item (well under 1 ms) to a slow remote call.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class Histogram:
    """Cumulative-on-render histogram: `observe` is one bisect and two adds."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, "+Inf"), self.counts, strict=True):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {running}"]
        return out


def render(counts: dict[str, dict[str, int]], latency: Histogram) -> str:
    """The exposition text: items and deliveries by status, queue depth, item latency."""
    lines = ["# HELP minibatch_items Items by status.", "# TYPE minibatch_items gauge"]
    for status in ("queued", "running", "succeeded", "failed", "cancelled", "expired"):
        lines.append(f'minibatch_items{{status="{status}"}} {counts["items"].get(status, 0)}')
    lines += ["# HELP minibatch_deliveries Webhook deliveries by status.",
              "# TYPE minibatch_deliveries gauge"]
    for status in ("pending", "succeeded", "failed"):
        n = counts["deliveries"].get(status, 0)
        lines.append(f'minibatch_deliveries{{status="{status}"}} {n}')
    lines += ["# HELP minibatch_queue_depth Items waiting to run.",
              "# TYPE minibatch_queue_depth gauge",
              f"minibatch_queue_depth {counts['items'].get('queued', 0)}",
              "# HELP minibatch_item_duration_seconds Attempt time, claim to outcome,"
              " in this process.",
              "# TYPE minibatch_item_duration_seconds histogram",
              *latency.lines("minibatch_item_duration_seconds")]
    return "\n".join(lines) + "\n"
