"""Trial verdicts: is the new version as good as the previous one? Pure logic, no I/O.

The manifest's ``health_policy`` (integers) sets the bar:

    max_error_rate_ppm   errors per million requests allowed during the trial
    max_p95_ratio_pct    latency bar: the new version at most this % of the previous one's
                         latency on the same inputs (0 or less = latency not judged)
    min_requests         fewest samples to judge on; the agent tops up with golden/zero probes
    p95_slack_us         (optional) a latency rise smaller than this is never a breach
    min_agreement_ppm    (optional) the agreement gate: the new version's answers must agree
                         with the previous one's on at least this share of what was compared
                         (0 or missing = not judged)

Missing keys take the agent's defaults (``AgentConfig.trial_*``, which default to
:class:`deltafleet.shared.HealthPolicy`'s).

Latency is judged on *paired* samples, never on figures taken at different times: the agent
keeps the previous model loaded during the trial and, at the end of the window, runs the
previous and the new model back to back on the same input (alternating which goes first), so
both see the same CPU load (see ``latency.sample_pairs``). Per pair it forms the ratio
new/old and the rise new - old. A busy CPU stretches single calls, which spreads these values
in both directions, but it hardly moves their median, and a wider spread only lowers the
confidence bound. The verdict is a breach only when the one-sided lower confidence bound
(``LATENCY_CONFIDENCE``) of the median ratio exceeds ``max_p95_ratio_pct`` *and* the lower
bound of the median rise exceeds ``p95_slack_us``. The bound is distribution-free (a sign
test: the k-th smallest of n values, with k from the Binomial(n, 1/2) tail), so it needs no
assumption about the shape of the noise. The key keeps its historical name (``p95``): the
policy value is the allowed slowdown; how it is measured is described here and in
docs/agent.md.

Agreement is measured on a sample of live requests rerun on the previous model off the request
path (``latency.Shadow``) plus the golden inputs at the end of the window (run on both models,
or compared with the previous model's answers recorded before a cold swap unloaded it). Top-1
for classifiers, relative deviation otherwise (``latency.compare_outputs``). The gate breaks
early once ``MIN_AGREEMENT_SAMPLES`` requests were compared and the share is below the bar; at
the end of the window it judges on whatever was compared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from deltafleet.shared.contracts import HealthPolicy

MIN_AGREEMENT_SAMPLES = 20  # compared requests before the gate may end a trial early
LATENCY_CONFIDENCE = 0.99  # one-sided, for the median ratio and rise of paired latencies
MIN_PAIRS = 50  # pairs the agent asks for (at least min_requests); fewer if its budget ends


def p95(latencies_us: Sequence[int]) -> int:
    """Nearest-rank 95th percentile; 0 for no samples."""
    if not latencies_us:
        return 0
    ordered = sorted(latencies_us)
    return int(ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)])


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        # a caller's bug, not bad input: stays builtin (test_error_root)
        raise ValueError("median of no values")
    mid = n // 2
    return float(ordered[mid]) if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def lower_bound_rank(n: int, confidence: float = LATENCY_CONFIDENCE) -> int | None:
    """0-based index k into n sorted values whose value is a one-sided lower confidence
    bound for the median: sorted[k] exceeds the median only when at most k of the n values
    lie below it, which has probability P(Binomial(n, 1/2) <= k) <= 1 - confidence. The largest
    such k; None when n is too small for any bound (2**-n > 1 - confidence)."""
    alpha = 1.0 - confidence
    total = 2 ** n
    k, tail = -1, 0
    while k + 1 < n:
        nxt = tail + math.comb(n, k + 1)
        if nxt / total > alpha:
            break
        k, tail = k + 1, nxt
    return k if k >= 0 else None


def median_lower_bound(values: Sequence[float],
                       confidence: float = LATENCY_CONFIDENCE) -> float | None:
    """Distribution-free lower confidence bound of the median of ``values`` (sign test)."""
    k = lower_bound_rank(len(values), confidence)
    return None if k is None else float(sorted(values)[k])


@dataclass(frozen=True, slots=True)
class LatencyComparison:
    """New against previous version on interleaved pairs of calls (figures in us or %)."""

    pairs: int
    ratio_pct: int  # median of new/old per pair
    ratio_low_pct: int  # its lower confidence bound
    rise_us: int  # median of new - old per pair
    rise_low_us: int  # its lower confidence bound
    old_p95_us: int
    new_p95_us: int

    def figures(self) -> dict[str, int]:
        return {"pairs": self.pairs, "latency_ratio_pct": self.ratio_pct,
                "latency_ratio_low_pct": self.ratio_low_pct, "latency_rise_us": self.rise_us,
                "latency_rise_low_us": self.rise_low_us, "p95_us": self.new_p95_us,
                "baseline_p95_us": self.old_p95_us}


def compare_latency(pairs: Sequence[tuple[int, int]],
                    confidence: float = LATENCY_CONFIDENCE) -> LatencyComparison | None:
    """Compare ``(old_us, new_us)`` pairs; None when they are too few for a bound."""
    ratios = [new / max(old, 1) for old, new in pairs]
    rises = [float(new - old) for old, new in pairs]
    ratio_low = median_lower_bound(ratios, confidence)
    rise_low = median_lower_bound(rises, confidence)
    if ratio_low is None or rise_low is None:
        return None
    return LatencyComparison(
        pairs=len(pairs), ratio_pct=round(100 * median(ratios)),
        ratio_low_pct=math.floor(100 * ratio_low), rise_us=round(median(rises)),
        rise_low_us=math.floor(rise_low), old_p95_us=p95([o for o, _ in pairs]),
        new_p95_us=p95([n for _, n in pairs]))


@dataclass(frozen=True, slots=True)
class Agreement:
    """Output agreement of the new version with the previous one, as measured in a trial."""

    ppm: int  # agreeing share of the compared outputs, parts per million
    samples: int  # inputs compared (shadowed requests + golden inputs)
    source: str  # what was compared, in words
    dropped: int = 0  # shadow samples dropped because the shadow was behind

    def figures(self) -> dict[str, int]:
        return {"agreement_ppm": self.ppm, "agreement_samples": self.samples,
                "shadow_dropped": self.dropped}


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str
    figures: dict[str, int]
    note: str = ""  # on a pass: what was not judged and why (reported with ``healthy``)


def evaluate(requests: int, errors: int, policy: HealthPolicy, *, final: bool,
             pairs: Sequence[tuple[int, int]] = (), unjudged: str = "",
             agreement: Agreement | None = None) -> Verdict | None:
    """Judge a trial. Returns None while undecided (not ``final`` and no breach yet).

    ``requests``/``errors`` count every call on the new version (applications' requests and
    the agent's probes); ``pairs`` are ``(old_us, new_us)`` latencies of interleaved calls on
    the same inputs. ``unjudged`` says why there are no pairs although the policy judges
    latency (it goes into the reason of a passing verdict). ``agreement``: what the trial
    measured of output agreement (always reported; judged when the policy has a gate)."""
    figures: dict[str, Any] = {
        "requests": requests, "errors": errors,
        "error_rate_ppm": (errors * 1_000_000 // requests) if requests else 0,
    }
    if agreement is not None:
        figures.update(agreement.figures())
    if requests >= policy.min_requests and figures["error_rate_ppm"] > policy.max_error_rate_ppm:
        return Verdict(False, f"error rate {figures['error_rate_ppm']} ppm > "
                              f"{policy.max_error_rate_ppm} ppm ({errors}/{requests} requests)",
                       figures)
    breach = _disagrees(policy, agreement, final=final)
    if breach:
        return Verdict(False, breach, figures)
    if not final:
        return None
    if requests == 0:
        return Verdict(False, "no request could be judged", figures)
    if requests < policy.min_requests and errors * 1_000_000 > policy.max_error_rate_ppm * requests:
        return Verdict(False, f"{errors}/{requests} requests failed", figures)
    notes = []
    if policy.judges_agreement and agreement is None:
        notes.append("agreement not judged: nothing compared with the previous version ("
                     + (unjudged or "no previous version loaded") + ")")
    if not policy.judges_latency:
        notes.insert(0, "latency not judged: off")
        return Verdict(True, f"within policy ({'; '.join(notes)})", figures, "; ".join(notes))
    cmp = compare_latency(pairs)
    if cmp is None:
        why = unjudged or f"{len(pairs)} latency pairs are too few for a bound"
        notes.insert(0, f"latency not judged: {why}")
        return Verdict(True, f"within policy ({'; '.join(notes)})", figures, "; ".join(notes))
    figures.update(cmp.figures())
    if cmp.ratio_low_pct > policy.max_p95_ratio_pct and cmp.rise_low_us > policy.p95_slack_us:
        return Verdict(False, f"latency {cmp.ratio_pct}% of the previous version's on the same "
                              f"inputs (at least {cmp.ratio_low_pct}% at "
                              f"{LATENCY_CONFIDENCE:.0%} confidence) > "
                              f"{policy.max_p95_ratio_pct}% allowed; {cmp.pairs} interleaved "
                              f"pairs, p95 {cmp.new_p95_us} us vs {cmp.old_p95_us} us", figures)
    if notes:
        return Verdict(True, f"within policy ({'; '.join(notes)})", figures, "; ".join(notes))
    return Verdict(True, "within policy", figures)


def _disagrees(policy: HealthPolicy, agreement: Agreement | None, *, final: bool) -> str:
    """Why the agreement gate fails the trial, or "" (not judged, too few yet, or within)."""
    if not policy.judges_agreement or agreement is None:
        return ""
    if not final and agreement.samples < MIN_AGREEMENT_SAMPLES:
        return ""
    if agreement.ppm >= policy.min_agreement_ppm:
        return ""
    return (f"output agreement {agreement.ppm / 10_000:.1f}% with the previous version < "
            f"{policy.min_agreement_ppm / 10_000:g}% required ({agreement.samples} inputs "
            f"compared: {agreement.source})")
