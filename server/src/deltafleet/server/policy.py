"""Rollout policy: parsing operator input into a ``RolloutPolicy``, the retry rule and the
wave assignment. No I/O here.

The trial limits a rollout signs into manifests are a ``HealthPolicy``; their default is
``deltafleet.shared.ROLLOUT_HEALTH``, the one place the numbers live. ``HEALTH_OPTION_DEFAULTS``
is that policy spelled as `fleetctl rollout model` takes it. The wave and failure-threshold
rules are in ``rollout.engine``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from deltafleet.shared import ROLLOUT_HEALTH, HealthPolicy

from .errors import UsageError
from .selection import OBJECTIVES, Objective

ON_FAILURE = ("pause", "abort", "rollback")


def parse_duration(text: str) -> int:
    """'120s', '2m', '1h', '90' -> seconds."""
    m = re.fullmatch(r"\s*(\d+)\s*([smh]?)\s*", text or "")
    if not m:
        raise UsageError(f"invalid duration {text!r}: use e.g. 120s, 2m or 1h")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_count_or_pct(text: str, what: str) -> tuple[int, bool]:
    """'5%' -> (5, True); '3' -> (3, False)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", text or "")
    if not m:
        raise UsageError(f"invalid {what} {text!r}: use a count (3) or a percentage (5%)")
    value = float(m.group(1))
    if m.group(2):
        if not 0 < value <= 100:
            raise UsageError(f"{what} {text!r} must be between 0% and 100%")
        return math.ceil(value) if value > 1 else 1, True  # type: ignore[return-value]
    if value != int(value) or value < 1:
        raise UsageError(f"{what} {text!r} must be a whole number of devices")
    return int(value), False


def parse_waves(text: str) -> tuple[float, ...]:
    """'10%,50%,100%' -> (10.0, 50.0, 100.0); the last wave is always 100%."""
    waves: list[float] = []
    for part in (p.strip() for p in (text or "").split(",") if p.strip()):
        m = re.fullmatch(r"(\d+(?:\.\d+)?)%", part)
        if not m or not 0 < float(m.group(1)) <= 100:
            raise UsageError(f"invalid wave {part!r}: use percentages such as 10%,50%,100%")
        waves.append(float(m.group(1)))
    if waves != sorted(waves) or len(set(waves)) != len(waves):
        raise UsageError("waves must be increasing cumulative percentages, e.g. 10%,50%,100%")
    if not waves or waves[-1] != 100.0:
        waves.append(100.0)
    return tuple(waves)


def parse_rate(text: str) -> int:
    """'10MB/s', '512KB/s', '1000000' -> bytes per second."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?(?:/s)?\s*", text or "")
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"invalid bandwidth {text!r}: use e.g. 10MB/s or 512KB/s")
    unit = {None: 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KiB": 1024,
            "MiB": 1024**2, "GiB": 1024**3}[m.group(2)]
    return int(float(m.group(1)) * unit)


LATENCY_OFF = ("off", "0", "0%")


def parse_latency_ratio(text: str, what: str = "--max-p95-ratio") -> int:
    """The trial's latency bar as a whole percentage of the previous version's latency:
    '150%' / '150' -> 150; 'off', '0' or '0%' -> 0 (latency not judged). Below 100% would
    roll back a model exactly as fast as the previous one, so it is refused."""
    if (text or "").strip().lower() in LATENCY_OFF:
        return 0
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%?\s*", text or "")
    if not m:
        raise UsageError(f"invalid {what} {text!r}: use a percentage such as 150%, or off")
    value = float(m.group(1))
    if value == 0:
        return 0
    if value < 100:
        raise UsageError(f"{what} {text!r} would roll back a model as fast as the previous "
                         "one: use at least 100%, or off")
    return math.floor(value)


def parse_pct(text: str, what: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%?\s*", text or "")
    if not m or not 0 <= float(m.group(1)) <= 100:
        raise UsageError(f"invalid {what} {text!r}: use a percentage such as 5%")
    return float(m.group(1))


def parse_agreement(text: str | None) -> int:
    """``--min-agreement``: '98%' / '98' -> 980000 ppm; None, 'off', '0' -> 0 (not judged)."""
    if text is None or text.strip().lower() in LATENCY_OFF:
        return 0
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%?\s*", text)
    if not m or not 0 <= float(m.group(1)) <= 100:
        raise UsageError(f"invalid --min-agreement {text!r}: use a percentage such as 98%, "
                         "or off")
    return round(float(m.group(1)) * 10_000)


def parse_prefer(text: str | None) -> str | None:
    """``--prefer``: one of ``selection.OBJECTIVES``, optionally ``@POINTS``, the accuracy it
    may give up against the most accurate fitting variant (``latency@1``); None: choose by
    format, as before. Returns the normal form."""
    if text is None or not text.strip():
        return None
    try:
        return Objective.parse(text).text()
    except ValueError as e:
        if "budget" in str(e):
            raise UsageError(f"invalid --prefer: {e}") from None
        raise UsageError(f"invalid --prefer {text!r}: use one of {', '.join(OBJECTIVES)}, "
                         "optionally @POINTS (e.g. latency@1)") from None


def health_from_options(*, max_error_rate: str, max_p95_ratio: str, p95_slack_ms: float,
                        min_requests: int, min_agreement: str | None = None) -> HealthPolicy:
    """The trial limits signed into manifests, from operator input."""
    if min_requests < 1:
        raise UsageError("the trial's minimum number of requests must be at least 1")
    return HealthPolicy(
        max_error_rate_ppm=int(parse_pct(max_error_rate, "--max-error-rate") * 10_000),
        max_p95_ratio_pct=parse_latency_ratio(max_p95_ratio), min_requests=min_requests,
        p95_slack_us=int(p95_slack_ms * 1000), min_agreement_ppm=parse_agreement(min_agreement))


def _health_options(policy: HealthPolicy) -> dict[str, Any]:
    """``policy`` spelled as `fleetctl rollout model`'s options; ``health_from_options`` reads
    the spelling of :data:`ROLLOUT_HEALTH` back to exactly that policy."""
    return {"max_error_rate": f"{policy.max_error_rate_ppm / 10_000:g}%",
            "max_p95_ratio": f"{policy.max_p95_ratio_pct}%" if policy.judges_latency else "off",
            "p95_slack_ms": policy.p95_slack_us / 1000, "min_requests": policy.min_requests}


# Trial limits, as `fleetctl rollout model` takes them. Devices judge latency on interleaved
# old/new calls with a confidence bound (docs/agent.md), so a busy CPU does not need a big
# slack; the slack only keeps sub-millisecond rises of tiny models from counting. A latency
# ratio of "off" (0) means latency is not judged.
HEALTH_OPTION_DEFAULTS: dict[str, Any] = _health_options(ROLLOUT_HEALTH)


@dataclass(frozen=True, slots=True)
class RolloutPolicy:
    canary: str | None = None  # "N" devices or "N%" of the group, wave 0
    waves: tuple[float, ...] = (100.0,)  # cumulative percentages after the canary
    max_failure_pct: float = 5.0  # failures allowed, as % of the devices dispatched so far
    on_failure: str = "pause"
    health_window_s: int = 60
    max_concurrent: int | None = None  # devices in flight at once (None = no limit)
    max_attempts: int = 3  # per device, then it is held out for good
    retry_backoff_s: int = 30  # first hold; doubles with every failed attempt
    state_timeout_s: int = 600  # notified (while online) / downloading / applying / trial
    bandwidth_bytes_per_s: int | None = None  # cap on chunk bytes the server publishes
    allow_io_change: bool = False  # devices accept a model whose inputs/outputs differ
    health: HealthPolicy = ROLLOUT_HEALTH  # trial limits signed into every manifest
    variant: str | None = None  # --variant: pin this variant for every device that can load it
    # --prefer latency|size|accuracy: choose each device's variant by selection (portraits,
    # benchmarks; docs/portraits.md); None: by format, as before
    prefer: str | None = None

    def __post_init__(self) -> None:
        if self.on_failure not in ON_FAILURE:
            raise UsageError(f"--on-failure must be one of {', '.join(ON_FAILURE)}")
        if self.canary is not None:
            parse_count_or_pct(self.canary, "canary")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise UsageError("--max-concurrent must be at least 1")
        if self.prefer is not None:
            parse_prefer(self.prefer)

    @classmethod
    def from_options(
        cls, *, canary: str | None = None, waves: str = "100%", max_failure: str = "5%",
        on_failure: str = "pause", health_window: str = "60s",
        max_error_rate: str = HEALTH_OPTION_DEFAULTS["max_error_rate"],
        max_p95_ratio: str = HEALTH_OPTION_DEFAULTS["max_p95_ratio"],
        p95_slack_ms: float = HEALTH_OPTION_DEFAULTS["p95_slack_ms"],
        min_requests: int = HEALTH_OPTION_DEFAULTS["min_requests"],
        max_concurrent: int | None = None, max_attempts: int = 3, retry_backoff: str = "30s",
        state_timeout: str = "600s", bandwidth: str | None = None,
        allow_io_change: bool = False, variant: str | None = None,
        prefer: str | None = None, min_agreement: str | None = None,
    ) -> RolloutPolicy:
        """A policy from operator input as `fleetctl rollout model` takes it (UsageError on
        anything invalid)."""
        return cls(
            canary=canary, waves=parse_waves(waves),
            max_failure_pct=parse_pct(max_failure, "--max-failure"), on_failure=on_failure,
            health_window_s=parse_duration(health_window), max_concurrent=max_concurrent,
            max_attempts=max_attempts, retry_backoff_s=parse_duration(retry_backoff),
            state_timeout_s=parse_duration(state_timeout),
            bandwidth_bytes_per_s=parse_rate(bandwidth) if bandwidth else None,
            allow_io_change=allow_io_change, variant=(variant or "").strip() or None,
            prefer=parse_prefer(prefer),
            health=health_from_options(max_error_rate=max_error_rate,
                                       max_p95_ratio=max_p95_ratio,
                                       p95_slack_ms=p95_slack_ms, min_requests=min_requests,
                                       min_agreement=min_agreement),
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["waves"] = list(self.waves)
        d["health"] = self.health.to_wire()
        for key in ("variant", "prefer"):  # left out when unset: stored forms stay as they were
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RolloutPolicy:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "waves" in known:
            known["waves"] = tuple(known["waves"])
        if "health" in known:
            known["health"] = HealthPolicy.from_wire(known["health"])
        return cls(**known)

    def wave_count(self) -> int:
        return len(self.waves) + (1 if self.canary else 0)

    def hold_seconds(self, attempts: int) -> int:
        return self.retry_backoff_s * (2 ** max(0, attempts - 1))


def assign_waves(device_ids: list[str], policy: RolloutPolicy) -> dict[str, int]:
    """Deterministic wave per device: canary first (if any), then cumulative percentages."""
    ids = sorted(device_ids)
    n = len(ids)
    cutoffs: list[int] = []
    if policy.canary:
        value, pct = parse_count_or_pct(policy.canary, "canary")
        cutoffs.append(min(n, math.ceil(n * value / 100) if pct else value))
    for p in policy.waves:
        cutoffs.append(max(cutoffs[-1] if cutoffs else 0, math.ceil(n * p / 100)))
    out: dict[str, int] = {}
    wave = 0
    for i, device_id in enumerate(ids):
        while wave < len(cutoffs) - 1 and i >= cutoffs[wave]:
            wave += 1
        out[device_id] = wave
    return out
