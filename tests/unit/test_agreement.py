"""The agreement gate's pure parts: how agreement is measured (top-1 for classifiers,
relative deviation otherwise), the shadow that reruns sampled requests on the previous model
without ever holding up the request path, the verdict, and the operator's spelling of it
(``--min-agreement``, ``--prefer``) down to the signed health policy."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from deltafleet.agent.latency import Shadow, compare_outputs
from deltafleet.agent.trial import MIN_AGREEMENT_SAMPLES, Agreement, evaluate
from deltafleet.server.errors import UsageError
from deltafleet.server.policy import RolloutPolicy
from deltafleet.shared import HealthPolicy, WireError

GATE = HealthPolicy(max_error_rate_ppm=10_000, max_p95_ratio_pct=0, min_requests=5,
                    min_agreement_ppm=980_000)


def test_classifier_outputs_agree_on_their_top_class_only():
    old = {"logits": np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]], np.float32)}
    new = {"logits": np.array([[0.0, 0.5, 0.4], [0.1, 0.2, 0.7]], np.float32)}
    assert compare_outputs(old, new) == (0.5, 1)  # row 1 same top class, row 2 not


def test_other_outputs_agree_within_a_relative_deviation():
    old = {"y": np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)}  # [N, 1]: a regressor
    new = {"y": np.array([[1.0005], [2.0], [3.1], [4.0]], np.float32)}
    assert compare_outputs(old, new) == (0.75, 1)


def test_an_output_of_another_shape_disagrees():
    assert compare_outputs({"y": np.zeros((2, 3))}, {"y": np.zeros((3, 3))}) == (0.0, 1)


class SlowModel:
    """A previous model that takes its time (the shadow must not make requests wait)."""

    def __init__(self, delay_s: float, answer: dict) -> None:
        self.delay_s, self.answer, self.calls = delay_s, answer, 0
        self.release = threading.Event()

    def run(self, feeds):
        self.release.wait(self.delay_s)
        self.calls += 1
        return self.answer


def test_the_shadow_never_blocks_the_request_path_and_drops_what_it_cannot_keep_up_with():
    old = SlowModel(5.0, {"logits": np.array([[0.0, 1.0]], np.float32)})
    shadow = Shadow(old, rate=1.0, queue_size=2)  # type: ignore[arg-type]
    try:
        out = {"logits": np.array([[0.0, 1.0]], np.float32)}
        t0 = time.perf_counter()
        for _ in range(200):
            shadow.offer({"input": np.zeros((1, 2), np.float32)}, out)
        per_call = (time.perf_counter() - t0) / 200
        assert per_call < 0.002  # microseconds, while the previous model takes 5 s a call
        assert shadow.dropped >= 200 - 3  # one running, two queued: the rest dropped
        old.release.set()
        shadow.wait_idle(5.0)
        agree, compared, samples = shadow.counts()
        assert samples >= 1 and agree == compared
    finally:
        old.release.set()
        shadow.stop()


def test_the_shadow_samples_every_kth_request_and_survives_a_failing_previous_model():
    class Broken:
        def run(self, feeds):
            raise RuntimeError("the previous model broke")

    shadow = Shadow(Broken(), rate=0.25, queue_size=100)  # type: ignore[arg-type]
    try:
        for _ in range(40):
            shadow.offer({"input": np.zeros((1, 2), np.float32)}, {"y": np.zeros(1)})
        shadow.wait_idle(5.0)
        assert shadow.failed == 10 and shadow.counts() == (0.0, 0, 0)
    finally:
        shadow.stop()


def test_the_shadow_copies_the_request_inputs_it_samples():
    seen: list[np.ndarray] = []

    class Record:
        def run(self, feeds):
            seen.append(feeds["input"])
            return {"y": np.zeros(1)}

    shadow = Shadow(Record(), rate=1.0)  # type: ignore[arg-type]
    try:
        x = np.ones((1, 2), np.float32)
        shadow.offer({"input": x}, {"y": np.zeros(1)})
        x[:] = 7  # the caller reuses its buffer
        shadow.wait_idle(5.0)
        assert seen and float(seen[0].max()) == 1.0
    finally:
        shadow.stop()


def test_the_gate_rolls_back_below_the_bar_once_enough_requests_were_compared():
    low = Agreement(700_000, MIN_AGREEMENT_SAMPLES, "shadowed live requests and golden inputs")
    v = evaluate(100, 0, GATE, final=False, agreement=low)
    assert v is not None and not v.ok
    assert v.reason.startswith("output agreement 70.0% with the previous version < 98%")
    assert v.figures["agreement_ppm"] == 700_000
    few = Agreement(0, MIN_AGREEMENT_SAMPLES - 1, "shadowed live requests")
    assert evaluate(100, 0, GATE, final=False, agreement=few) is None  # too few to end early
    assert not evaluate(100, 0, GATE, final=True, agreement=few).ok  # the window's end judges


def test_the_gate_passes_a_model_that_agrees_and_reports_agreement_without_a_gate():
    good = Agreement(990_000, 50, "shadowed live requests and golden inputs")
    v = evaluate(100, 0, GATE, final=True, agreement=good)
    assert v.ok and v.figures["agreement_ppm"] == 990_000
    no_gate = HealthPolicy(max_p95_ratio_pct=0)
    low = Agreement(100_000, 50, "golden inputs")
    assert evaluate(100, 0, no_gate, final=True, agreement=low).ok  # reported, not judged


def test_a_gate_with_nothing_to_compare_passes_and_says_so():
    v = evaluate(100, 0, GATE, final=True, unjudged="no previous version to compare with")
    assert v.ok and "agreement not judged" in v.note and "no previous version" in v.note


def test_min_agreement_is_signed_into_the_health_policy_and_left_out_when_off():
    p = RolloutPolicy.from_options(min_agreement="98%", prefer="latency")
    assert p.health.min_agreement_ppm == 980_000 and p.prefer == "latency"
    assert p.health.to_wire()["min_agreement_ppm"] == 980_000
    assert RolloutPolicy.from_json(p.to_json()) == p
    plain = RolloutPolicy.from_options()
    assert "min_agreement_ppm" not in plain.health.to_wire()
    assert "prefer" not in plain.to_json()
    assert RolloutPolicy.from_options(min_agreement="off").health.min_agreement_ppm == 0
    assert RolloutPolicy.from_options(min_agreement="99.5").health.min_agreement_ppm == 995_000


@pytest.mark.parametrize(("option", "value"), [("min_agreement", "101%"),
                                               ("min_agreement", "most"),
                                               ("prefer", "speed")])
def test_bad_gate_or_objective_is_a_usage_error(option, value):
    with pytest.raises(UsageError):
        RolloutPolicy.from_options(**{option: value})


def test_the_wire_form_of_the_gate_is_checked_and_old_agents_ignore_it():
    wire = GATE.to_wire()
    assert HealthPolicy.from_wire(wire) == GATE
    with pytest.raises(WireError):
        HealthPolicy.from_wire({**wire, "min_agreement_ppm": 1_000_001})
    assert HealthPolicy.from_manifest({**wire, "unknown_future_key": 1}) == GATE
