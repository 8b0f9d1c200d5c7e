"""Trial verdicts (pure): error rate, p95 against the previous version, minimum samples."""

from __future__ import annotations

from deltafleet.agent.trial import HealthPolicy, evaluate, p95

POLICY = HealthPolicy(max_error_rate_ppm=1000, max_p95_ratio_pct=150, min_requests=20,
                      p95_slack_us=100)


def test_p95_is_the_nearest_rank():
    assert p95(list(range(1, 101))) == 95
    assert p95([]) == 0


def test_healthy_trial_commits_with_its_figures():
    v = evaluate(100, 0, [1000] * 100, 1000, POLICY, final=True)
    assert v.ok and v.figures["requests"] == 100 and v.figures["p95_us"] == 1000


def test_slower_than_the_ratio_allows_is_a_breach():
    v = evaluate(100, 0, [1600] * 100, 1000, POLICY, final=True)
    assert not v.ok and "p95" in v.reason


def test_small_absolute_rise_is_timer_noise_not_a_breach():
    v = evaluate(100, 0, [90] * 100, 50, POLICY, final=True)
    assert v.ok


def test_error_rate_breach_decides_before_the_window_ends():
    v = evaluate(20, 1, [100] * 19, 100, POLICY, final=False)
    assert v is not None and not v.ok and "error rate" in v.reason


def test_undecided_while_the_window_runs_and_nothing_is_wrong():
    assert evaluate(5, 0, [100] * 5, 100, POLICY, final=False) is None


def test_missing_policy_keys_take_the_agent_defaults():
    p = HealthPolicy.from_manifest({"min_requests": 5}, POLICY)
    assert p.min_requests == 5 and p.max_p95_ratio_pct == 150
