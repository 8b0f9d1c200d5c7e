"""DeviceMessageGuard: the pure bookkeeping the daemon applies to untrusted device messages."""

from __future__ import annotations

from deltafleet.server.guard import DeviceMessageGuard, GuardConfig


def test_oversized_payload_is_refused_before_parsing_and_counted() -> None:
    guard = DeviceMessageGuard(GuardConfig(max_payload_bytes=100))
    assert guard.admit("dev-a", 100, now=0).ok
    verdict = guard.admit("dev-a", 101, now=0)
    assert not verdict.ok and "too large" in verdict.reason
    assert guard.snapshot("dev-a").oversize_total == 1  # type: ignore[union-attr]


def test_device_over_the_invalid_threshold_becomes_suspect_and_others_are_unaffected() -> None:
    guard = DeviceMessageGuard(GuardConfig(suspect_threshold=3, window_s=60))
    assert not guard.invalid("dev-a", "bad json", now=0)
    assert not guard.invalid("dev-a", "bad json", now=1)
    assert guard.invalid("dev-a", "bad json", now=2)  # third within the window
    assert guard.is_suspect("dev-a") and guard.suspects() == ["dev-a"]
    assert not guard.is_suspect("dev-b") and guard.admit("dev-b", 10, now=3).ok


def test_invalid_messages_outside_the_window_do_not_add_up() -> None:
    guard = DeviceMessageGuard(GuardConfig(suspect_threshold=3, window_s=10))
    for t in (0, 20, 40, 60):
        guard.invalid("dev-a", "bad", now=t)
    assert not guard.is_suspect("dev-a")


def test_suspect_device_is_dropped_only_when_configured() -> None:
    lenient = DeviceMessageGuard(GuardConfig(suspect_threshold=1))
    strict = DeviceMessageGuard(GuardConfig(suspect_threshold=1, drop_suspect=True))
    for g in (lenient, strict):
        g.invalid("dev-a", "bad", now=0)
    assert lenient.admit("dev-a", 1, now=1).ok
    assert not strict.admit("dev-a", 1, now=1).ok
    strict.clear("dev-a")
    assert strict.admit("dev-a", 1, now=2).ok


def test_revoked_device_is_refused() -> None:
    guard = DeviceMessageGuard(is_denied=lambda d: d == "dev-r")
    assert not guard.admit("dev-r", 1, now=0).ok
    assert guard.admit("dev-a", 1, now=0).ok


def test_counters_are_bounded_against_invented_device_ids() -> None:
    guard = DeviceMessageGuard(GuardConfig(max_devices=10))
    for i in range(1000):
        guard.invalid(f"dev-{i}", "bad", now=0)
    assert len(guard.suspects()) <= 10 and guard.invalid_total == 1000


def test_refusals_are_counted_per_device_and_kind() -> None:
    guard = DeviceMessageGuard()
    guard.invalid("dev-a", "profile.cpu holds a NUL character", now=0, kind="unstorable")
    guard.invalid("dev-a", "not valid JSON", now=1)
    guard.invalid("dev-b", "the store refused it", now=1, kind="store_refused")
    a, b = guard.snapshot("dev-a"), guard.snapshot("dev-b")
    assert a is not None and a.refusals == {"unstorable": 1, "malformed": 1}
    assert a.last_reason == "not valid JSON"
    assert b is not None and b.refusals == {"store_refused": 1}
    guard.admit("dev-c", 10**9, now=2)
    assert guard.snapshot("dev-c").refusals == {"oversize": 1}  # type: ignore[union-attr]
