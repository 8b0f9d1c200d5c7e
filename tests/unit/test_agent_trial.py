"""Trial verdicts (pure): error rate, latency of the new version against the previous one on
interleaved pairs (judged with a distribution-free confidence bound), minimum samples."""

from __future__ import annotations

import random

from deltafleet.agent.trial import (
    HealthPolicy,
    compare_latency,
    evaluate,
    lower_bound_rank,
    median_lower_bound,
    p95,
)

POLICY = HealthPolicy(max_error_rate_ppm=1000, max_p95_ratio_pct=150, min_requests=20,
                      p95_slack_us=100)
SAME = [(1000 + 7 * (i % 5), 1000 + 7 * ((i + 2) % 5)) for i in range(50)]
TWICE = [(1000 + 7 * (i % 5), 2000 + 9 * (i % 3)) for i in range(50)]


def noisy_call(rng: random.Random, us: int, p_disturbed: float, mean_delay_us: float) -> int:
    """One inference on a busy CPU: ``us`` of work, plus (with probability ``p_disturbed``)
    an exponentially distributed delay from being preempted, plus a little timer jitter."""
    delay = rng.expovariate(1 / mean_delay_us) if rng.random() < p_disturbed else 0.0
    return max(1, int(us + delay + rng.gauss(0, 20)))


def noisy_pairs(seed: int, old_us: int, new_us: int, n: int = 50, *, p_disturbed: float = 0.5,
                mean_delay_us: float = 8000, repeats: int = 3) -> list[tuple[int, int]]:
    """Pairs as ``latency.sample_pairs`` forms them (fastest of ``repeats`` calls of each
    model) under heavy noise: half of all calls delayed by 8x the model's latency on average."""
    rng = random.Random(seed)
    return [(min(noisy_call(rng, old_us, p_disturbed, mean_delay_us) for _ in range(repeats)),
             min(noisy_call(rng, new_us, p_disturbed, mean_delay_us) for _ in range(repeats)))
            for _ in range(n)]


def test_p95_is_the_nearest_rank():
    assert p95(list(range(1, 101))) == 95
    assert p95([]) == 0


def test_median_bound_is_the_binomial_order_statistic():
    assert lower_bound_rank(6) is None  # 2**-6 > 1%: six values cannot bound the median
    assert lower_bound_rank(7) == 0  # the smallest of 7, P = 1/128
    assert lower_bound_rank(30) == 8  # P(Bin(30, .5) <= 8) = 0.8% <= 1% < P(<= 9) = 2.1%
    assert lower_bound_rank(50) == 16
    assert median_lower_bound(list(range(30, 0, -1))) == 9.0


def test_identical_speed_commits_with_its_figures():
    v = evaluate(150, 0, POLICY, final=True, pairs=SAME)
    assert v is not None and v.ok, v
    assert v.figures["requests"] == 150 and v.figures["pairs"] == 50
    assert 95 <= v.figures["latency_ratio_pct"] <= 105
    assert v.figures["latency_ratio_low_pct"] <= v.figures["latency_ratio_pct"]
    assert v.figures["baseline_p95_us"] > 0 and v.figures["p95_us"] > 0


def test_twice_as_slow_on_the_same_inputs_is_a_breach():
    v = evaluate(150, 0, POLICY, final=True, pairs=TWICE)
    assert v is not None and not v.ok
    assert v.reason.startswith("latency 198% of the previous") and "150% allowed" in v.reason and "50 interleaved" in v.reason
    assert v.figures["latency_ratio_low_pct"] > 150 and v.figures["latency_rise_low_us"] > 900


def test_heavy_noise_never_rolls_back_an_identical_model_and_always_a_twice_slower_one():
    unpaired_would_roll_back = 0
    for seed in range(200):
        same = noisy_pairs(seed, 1000, 1000)
        v = evaluate(150, 0, POLICY, final=True, pairs=same)
        assert v is not None and v.ok, (seed, v)
        slow = evaluate(150, 0, POLICY, final=True, pairs=noisy_pairs(seed, 1000, 2000))
        assert slow is not None and not slow.ok, (seed, slow)
        # what a p95 of single calls against a p95 taken earlier makes of the same load
        rng = random.Random(10_000 + seed)
        before = [noisy_call(rng, 1000, 0.5, 8000) for _ in range(50)]
        after = [noisy_call(rng, 1000, 0.5, 8000) for _ in range(50)]
        unpaired_would_roll_back += p95(after) > 1.5 * p95(before)
    assert unpaired_would_roll_back > 10  # the noise is heavy enough to fool the old rule


def test_an_unlucky_new_model_preempted_in_40pct_of_the_pairs_is_not_rolled_back():
    pairs = [(1000, 1010)] * 28 + [(30_000, 1005)] * 2 + [(1003, 40_000)] * 20
    v = evaluate(150, 0, POLICY, final=True, pairs=pairs)
    assert v is not None and v.ok, v
    assert v.figures["p95_us"] > 10 * v.figures["baseline_p95_us"]  # p95 against p95: a breach
    assert v.figures["latency_ratio_low_pct"] <= 101


def test_off_means_latency_is_not_judged_at_all():
    off = HealthPolicy(max_error_rate_ppm=1000, max_p95_ratio_pct=0, min_requests=20)
    v = evaluate(150, 0, off, final=True, pairs=[(1000, 10_000)] * 50)
    assert v is not None and v.ok and "latency not judged: off" in v.reason
    assert v.note == "latency not judged: off"  # reported with the healthy event
    assert HealthPolicy.from_manifest({"max_p95_ratio_pct": -5}, POLICY).max_p95_ratio_pct == 0


def test_too_few_pairs_or_no_previous_model_passes_and_says_why():
    v = evaluate(150, 0, POLICY, final=True, pairs=[(1000, 9000)] * 6)
    assert v is not None and v.ok and "6 latency pairs are too few" in v.reason
    v = evaluate(150, 0, POLICY, final=True, unjudged="the previous version was unloaded "
                 "for a cold swap")
    assert v is not None and v.ok and "cold swap" in v.reason and "cold swap" in v.note
    assert evaluate(150, 0, POLICY, final=True, pairs=SAME).note == ""  # judged: nothing to say


def test_small_absolute_rise_is_below_the_slack_not_a_breach():
    v = evaluate(150, 0, POLICY, final=True, pairs=[(50, 90)] * 50)
    assert v is not None and v.ok  # 180% but only 40 us slower
    cmp = compare_latency([(50, 90)] * 50)
    assert cmp is not None and cmp.ratio_low_pct == 180 and cmp.rise_low_us == 40


def test_error_rate_breach_decides_before_the_window_ends():
    v = evaluate(20, 1, POLICY, final=False)
    assert v is not None and not v.ok and "error rate" in v.reason


def test_application_errors_roll_back_even_when_latency_is_fine():
    v = evaluate(400, 5, POLICY, final=True, pairs=SAME)
    assert v is not None and not v.ok and "error rate 12500 ppm" in v.reason


def test_undecided_while_the_window_runs_and_nothing_is_wrong():
    assert evaluate(5, 0, POLICY, final=False) is None


def test_missing_policy_keys_take_the_agent_defaults():
    p = HealthPolicy.from_manifest({"min_requests": 5}, POLICY)
    assert p.min_requests == 5 and p.max_p95_ratio_pct == 150
