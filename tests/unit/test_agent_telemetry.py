"""The agent's telemetry: counts per served (model, version), bounded, cumulative summaries
that round-trip the wire, and a text exposition Prometheus' parser reads back."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from deltafleet.agent.telemetry import TelemetryRecorder, render_exposition
from deltafleet.shared import Event, Telemetry, decode, encode


def test_requests_errors_fallbacks_and_latency_are_counted_per_version():
    rec = TelemetryRecorder("cam-1")
    rec.record("detector", "v2", latency_us=700, error=False, fallback=False)
    rec.record("detector", "v2", latency_us=3_000_000, error=False, fallback=False)
    rec.record("detector", None, latency_us=900, error=True, fallback=True)  # fallback answered
    rec.record("detector", None, latency_us=None, error=True, fallback=False)  # nobody answered
    (m,) = rec.summary().models
    assert (m.model, m.version, m.requests, m.errors, m.fallbacks) == ("detector", "v2", 4, 2, 1)
    assert m.latency_buckets[1] == 2 and m.latency_buckets[-1] == 1 and sum(m.latency_buckets) == 3
    assert m.latency_sum_us == 700 + 3_000_000 + 900


def test_swaps_and_trial_verdicts_come_from_the_reports():
    rec = TelemetryRecorder("cam-1")
    rec.on_report(Event("e1", "cam-1", "m1", 1, "detector", "v2", "trial"))
    rec.on_report(Event("e2", "cam-1", "m1", 1, "detector", "v2", "healthy",
                        health={"requests": 50, "latency_ratio_pct": 97,
                                "agreement_ppm": 980_000}))
    rec.on_report(Event("e3", "cam-1", "m2", 2, "detector", "v3", "rolled_back",
                        health={"requests": 50, "errors": 9}))
    got = {(m.version, m.swaps, m.trials_passed, m.trials_failed, m.agreement_ppm_sum,
            m.agreement_trials) for m in rec.summary().models}
    assert got == {("v2", 1, 1, 0, 980_000, 1), ("v3", 0, 0, 1, 0, 0)}


def test_the_summary_is_bounded_and_cumulative():
    rec = TelemetryRecorder("cam-1", max_models=3)
    for i in range(10):
        rec.record("detector", f"v{i}", latency_us=10, error=False, fallback=False)
    first = rec.summary()
    assert [m.version for m in first.models] == ["v7", "v8", "v9"]
    rec.record("detector", "v9", latency_us=10, error=False, fallback=False)
    second = rec.summary()
    assert second.seq == first.seq + 1 and second.boot_id == first.boot_id
    assert next(m for m in second.models if m.version == "v9").requests == 2


def test_a_summary_leaves_out_what_the_server_already_acknowledged():
    """v1 and v2 served before v3: once a summary carrying their final counts is acked, later
    summaries carry v3 only; an entry sent but not acked yet (or changed since) stays in."""
    rec = TelemetryRecorder("cam-1")
    for v in ("v1", "v2"):
        rec.record("detector", v, latency_us=10, error=False, fallback=False)
    first = rec.summary()
    assert {m.version for m in first.models} == {"v1", "v2"}
    rec.record("detector", "v3", latency_us=10, error=False, fallback=False)
    second = rec.summary()  # first not acked yet: everything again
    assert {m.version for m in second.models} == {"v1", "v2", "v3"}
    rec.acked(first.seq)
    assert {m.version for m in rec.summary().models} == {"v3"}  # v3 was never acked
    rec.acked(second.seq)
    assert rec.summary().models == ()  # nothing changed since the acked one
    rec.record("detector", "v1", latency_us=10, error=False, fallback=False)  # served again
    (m,) = rec.summary().models
    assert (m.version, m.requests) == ("v1", 2)  # cumulative, as before


def test_a_late_ack_of_an_old_summary_does_not_hide_newer_counts():
    rec = TelemetryRecorder("cam-1")
    rec.record("detector", "v2", latency_us=10, error=False, fallback=False)
    old = rec.summary()
    rec.record("detector", "v2", latency_us=10, error=False, fallback=False)
    rec.acked(old.seq)
    (m,) = rec.summary().models
    assert m.requests == 2


def test_an_evicted_entry_that_comes_back_is_sent_from_zero():
    rec = TelemetryRecorder("cam-1", max_models=2)
    rec.record("detector", "v1", latency_us=10, error=False, fallback=False)
    rec.acked(rec.summary().seq)
    for v in ("v2", "v3"):  # v1 evicted
        rec.record("detector", v, latency_us=10, error=False, fallback=False)
    rec.record("detector", "v1", latency_us=10, error=False, fallback=False)
    assert {(m.version, m.requests) for m in rec.summary().models} == {("v3", 1), ("v1", 1)}


def test_a_summary_round_trips_the_wire_and_stays_under_a_kilobyte_per_model():
    rec = TelemetryRecorder("cam-1")
    for _ in range(1000):
        rec.record("detector", "v2", latency_us=1200, error=False, fallback=False)
    t = rec.summary(lambda m, v: "int8")
    data = encode(t)
    assert decode(Telemetry, data) == t
    assert len(data) < 1024


def test_the_exposition_parses_with_base_units_and_total_suffixes():
    rec = TelemetryRecorder("cam-1")
    rec.record("detector", "v2", latency_us=2000, error=False, fallback=False)
    text = render_exposition(rec, agent_version="0.1.0", models=[
        {"name": "detector", "version": "v2", "loaded": True, "fallback": None, "in_trial": False}],
        outbox_pending=3, broker_connected=True, variant_of=lambda m, v: "default").decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["deltafleet_agent_inference_requests"].type == "counter"
    hist = families["deltafleet_agent_inference_latency_seconds"]
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert buckets["0.001"] == 0 and buckets["0.0025"] == 1 and buckets["+Inf"] == 1
    total = next(s for s in hist.samples if s.name.endswith("_sum"))
    assert total.value == 0.002
    assert families["deltafleet_agent_outbox_messages"].samples[0].value == 3
    assert "cam-1" not in text  # the scrape target itself names the device


def test_a_superseded_summary_leaves_the_outbox_without_counting_as_acked(tmp_path):
    from deltafleet.agent.outbox import Outbox

    class Offline:
        def is_connected(self) -> bool:
            return False

        def publish_acked(self, topic: str, payload: bytes, timeout_s: float) -> None:
            raise AssertionError("offline")

    box = Outbox(tmp_path / "outbox", Offline())
    box.put("tm-b-1", "t", b"{}")
    box.put("event-1", "t", b"{}")
    assert box.discard(["tm-b-1", "unknown"]) == 1
    assert box.pending_ids() == ["event-1"] and box.acked == 0
    assert len(list((tmp_path / "outbox").glob("*.json"))) == 1


def test_output_agreement_compares_top_classes_on_the_same_inputs():
    import numpy as np

    from deltafleet.agent.latency import output_agreement

    class Fixed:
        def __init__(self, rows):
            self.rows = np.asarray(rows, dtype=np.float32)

        def run(self, feeds):
            return {"y": self.rows}

    old = Fixed([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    new = Fixed([[0.7, 0.3], [0.3, 0.7], [0.4, 0.6], [0.2, 0.8]])  # one row flips class
    assert output_agreement(old, new, [{}]) == 750_000  # type: ignore[arg-type]
    assert output_agreement(old, old, [{}, {}]) == 1_000_000  # type: ignore[arg-type]


def test_summaries_the_server_never_acks_are_not_remembered_forever():
    rec = TelemetryRecorder("cam-1")
    for _ in range(100):  # the server away for 100 minutes
        rec.record("detector", "v2", latency_us=10, error=False, fallback=False)
        last = rec.summary()
    assert len(rec._sent) <= 8
    rec.acked(last.seq)
    assert rec.summary().models == ()
