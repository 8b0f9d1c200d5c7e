"""Trial verdicts: is the new version as good as the previous one? Pure logic, no I/O.

The manifest's ``health_policy`` (integers) sets the bar:

    max_error_rate_ppm   errors per million requests allowed during the trial
    max_p95_ratio_pct    new p95 latency at most this % of the previous version's p95 (0 = off)
    min_requests         fewest samples to judge on; the agent tops up with golden/zero probes
    p95_slack_us         (optional) a p95 rise smaller than this is never a breach (timer noise)

Missing keys take the agent's defaults (``AgentConfig.trial_*``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    max_error_rate_ppm: int = 10_000
    max_p95_ratio_pct: int = 0
    min_requests: int = 20
    p95_slack_us: int = 1_000

    @classmethod
    def from_manifest(cls, policy: dict[str, int], defaults: HealthPolicy | None = None) -> HealthPolicy:
        d = defaults or cls()
        return cls(
            max_error_rate_ppm=int(policy.get("max_error_rate_ppm", d.max_error_rate_ppm)),
            max_p95_ratio_pct=int(policy.get("max_p95_ratio_pct", d.max_p95_ratio_pct)),
            min_requests=max(1, int(policy.get("min_requests", d.min_requests))),
            p95_slack_us=int(policy.get("p95_slack_us", d.p95_slack_us)),
        )


def p95(latencies_us: list[int]) -> int:
    """Nearest-rank 95th percentile; 0 for no samples."""
    if not latencies_us:
        return 0
    ordered = sorted(latencies_us)
    return int(ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)])


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str
    figures: dict[str, int]


def evaluate(requests: int, errors: int, latencies_us: list[int], baseline_p95_us: int,
             policy: HealthPolicy, *, final: bool) -> Verdict | None:
    """Judge a trial. Returns None while undecided (not ``final`` and no breach yet)."""
    figures: dict[str, Any] = {
        "requests": requests, "errors": errors, "p95_us": p95(latencies_us),
        "baseline_p95_us": baseline_p95_us,
        "error_rate_ppm": (errors * 1_000_000 // requests) if requests else 0,
    }
    if requests >= policy.min_requests and figures["error_rate_ppm"] > policy.max_error_rate_ppm:
        return Verdict(False, f"error rate {figures['error_rate_ppm']} ppm > "
                              f"{policy.max_error_rate_ppm} ppm ({errors}/{requests} requests)",
                       figures)
    if not final:
        return None
    if requests == 0:
        return Verdict(False, "no request could be judged", figures)
    if requests < policy.min_requests and errors * 1_000_000 > policy.max_error_rate_ppm * requests:
        return Verdict(False, f"{errors}/{requests} requests failed", figures)
    if policy.max_p95_ratio_pct > 0 and baseline_p95_us > 0:
        limit = baseline_p95_us * policy.max_p95_ratio_pct // 100
        new = figures["p95_us"]
        if new > limit and new - baseline_p95_us > policy.p95_slack_us:
            return Verdict(False, f"p95 latency {new} us > {policy.max_p95_ratio_pct}% of the "
                                  f"previous version's {baseline_p95_us} us", figures)
    return Verdict(True, "within policy", figures)
