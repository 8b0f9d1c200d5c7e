"""Observability against a real Prometheus: it scrapes a real `fleetctl server` and two
`fleet-agent` processes through two real rollouts (v1 full to the fleet, v2 delta to jetson),
with the shipped alert rules loaded. Every exposition passes `promtool check metrics`, every
panel query of every shipped dashboard returns data, and the telemetry figures (on the
device's /metrics, and summed by the server) match the inference requests the test sent."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from deltafleet.agent.client import AgentClient
from deltafleet.server.monitoring import RULES, dashboards
from tests.harness import need
from tests.harness.fleetlab import Lab, free_port, wait_for, wait_port
from tests.harness.prometheus import Prometheus, promtool

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DEVICES = {"jetson-1": "jetson", "rpi-1": "rpi"}
SENT = {"jetson-1": 25, "rpi-1": 10}  # predicts the test sends to each device after the rollouts


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """``name``'s samples in an exposition: label set -> value."""
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
            out[labels] = float(m.group(2))
    return out


@pytest.fixture(scope="module")
def obs(tmp_path_factory: pytest.TempPathFactory, broker):
    prom_bin, tool = need.prometheus()
    root = tmp_path_factory.mktemp("metrics")
    lab = Lab(root / "lab", mqtt_url=broker.url)
    lab.env["FLEET_TOPIC_PREFIX"] = "metrics/v1"  # the session broker is shared
    metrics_port = free_port()
    lab.env["FLEET_METRICS_LISTEN"] = f"127.0.0.1:{metrics_port}"
    prom = None
    try:
        v1, v2 = lab.seed_detector(root / "models", size_mb=1.0, site="lab", devices=DEVICES,
                                   agent_env={"FLEET_AGENT_TELEMETRY_S": "1"})
        wait_port(metrics_port)
        prom = Prometheus(prom_bin, {
            "deltafleet-server": [f"127.0.0.1:{metrics_port}"],
            "deltafleet-agent": [f"127.0.0.1:{lab.api_ports[d]}" for d in DEVICES],
        }, rules=[RULES], interval_s=1.0, root=root / "prometheus")
        wait_for(lambda: lab.online_devices() >= set(DEVICES), 30, "agents online")
        r1 = lab.fleetctl_json("rollout", "model", "v1", "--group", "fleet", "--wait",
                               "--timeout", "90", "--health-window", "1s")
        r2 = lab.fleetctl_json("rollout", "model", "detector:v2", "--group", "jetson", "--wait",
                               "--timeout", "90", "--health-window", "1s")
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        for device_id, n in SENT.items():
            with AgentClient(port=lab.api_ports[device_id]) as client:
                for _ in range(n):
                    client.predict("detector", x)
        yield {"lab": lab, "prom": prom, "tool": tool, "r1": r1, "r2": r2,
               "server": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:
        if prom is not None:
            prom.close()
        lab.close()


def expositions(obs) -> dict[str, str]:
    lab = obs["lab"]
    pages = {"server": get(obs["server"]).decode()}
    for d in DEVICES:
        pages[d] = get(f"http://127.0.0.1:{lab.api_ports[d]}/metrics").decode()
    return pages


def test_rollouts_completed_with_a_full_and_a_delta_artifact(obs):
    assert obs["r1"]["state"] == obs["r2"]["state"] == "completed"
    assert {t["artifact"] for t in obs["r2"]["targets"]} == {"delta"}


def test_promtool_check_metrics_passes_on_every_exposition(obs):
    for name, text in expositions(obs).items():
        res = promtool(obs["tool"], "check", "metrics", stdin=text.encode())
        assert res.returncode == 0, f"{name}: {res.stdout}{res.stderr}"


def test_device_metrics_count_exactly_the_requests_sent(obs):
    lab = obs["lab"]
    running = {"jetson-1": "v2", "rpi-1": "v1"}
    for device_id, n in SENT.items():
        text = get(f"http://127.0.0.1:{lab.api_ports[device_id]}/metrics").decode()
        requests = samples(text, "deltafleet_agent_inference_requests_total")
        key = frozenset({("model", "detector"), ("version", running[device_id]),
                         ("variant", "default")})
        # v1 on jetson-1 has its swap counted, and no request: the test sent none before v2
        assert {k: v for k, v in requests.items() if v} == {key: n}, device_id
        count = samples(text, "deltafleet_agent_inference_latency_seconds_count")
        assert {k: v for k, v in count.items() if v} == {key: n}
        assert sum(samples(text, "deltafleet_agent_inference_errors_total").values()) == 0
        assert sum(samples(text, "deltafleet_agent_fallback_answers_total").values()) == 0
        rss = samples(text, "deltafleet_agent_memory_rss_bytes")[frozenset()]
        assert 10e6 < rss < 4e9


def test_the_server_sums_device_telemetry_by_model_version_variant_and_device_type(obs):
    def fleet_requests():
        text = get(obs["server"]).decode()
        got = samples(text, "deltafleet_fleet_inference_requests_total")
        return {dict(k)["version"]: v for k, v in got.items()} == {"v2": 25.0, "v1": 10.0} and got

    got = wait_for(fleet_requests, 20, "telemetry summed on the server")
    assert all(dict(k)["variant"] == "default" and "/" in dict(k)["device_type"] for k in got)
    text = get(obs["server"]).decode()
    swaps = {dict(k)["version"]: v for k, v in
             samples(text, "deltafleet_fleet_model_swaps_total").items()}
    assert swaps.get("v2", 0) >= 1  # jetson-1 swapped to v2 while reporting telemetry
    verdicts = samples(text, "deltafleet_fleet_trial_verdicts_total")
    assert sum(v for k, v in verdicts.items() if ("verdict", "passed") in k) >= 1
    agreement = {dict(k)["version"]: v for k, v in
                 samples(text, "deltafleet_fleet_trial_output_agreement_ratio").items()}
    assert 0 <= agreement["v2"] <= 1  # v2's trial on jetson-1 ran beside v1


def test_fleet_gauges_come_from_the_store(obs):
    text = get(obs["server"]).decode()
    assert samples(text, "deltafleet_devices")[frozenset({("online", "true")})] == 2
    models = {(dict(k)["version"], dict(k)["online"]): v
              for k, v in samples(text, "deltafleet_device_models").items()}
    assert models == {("v2", "true"): 1, ("v1", "true"): 1}
    groups = {dict(k)["group"]: v for k, v in samples(text, "deltafleet_group_devices").items()
              if ("online", "true") in k}
    assert groups == {"fleet": 2, "jetson": 1}
    r2 = str(obs["r2"]["id"])
    targets = {dict(k)["state"]: v for k, v in samples(text, "deltafleet_rollout_targets").items()
               if ("rollout", r2) in k and v}
    assert targets == {"healthy": 1}
    published = {dict(k)["kind"]: v for k, v in
                 samples(text, "deltafleet_published_bytes_total").items()}
    assert published["full"] > 0 and published["delta"] > 0
    assert sum(samples(text, "deltafleet_delta_ratio_count").values()) >= 1  # the v2 delta


def test_prometheus_scrapes_the_server_and_every_agent(obs):
    prom = obs["prom"]
    up = wait_for(lambda: (t := prom.targets_up()) and len(t) == 3 and all(t.values()) and t,
                  20, "every target up")
    assert len(up) == 3


def test_every_panel_query_of_every_dashboard_returns_data(obs):
    prom = obs["prom"]
    rollout = str(obs["r2"]["id"])

    def concrete(expr: str) -> str:
        return (expr.replace("$__rate_interval", "20s").replace("$rollout", rollout)
                .replace("$model", "detector"))

    queries = [(name, title, concrete(expr)) for name, board in dashboards.build().items()
               for title, expr in dashboards.panel_queries(board)]
    assert len(queries) >= 30

    def empty() -> list[str]:
        return [f"{name} / {title}: {expr}" for name, title, expr in queries
                if not prom.query(expr)]

    # telemetry arrives every second and rates need two samples: give Prometheus a few scrapes
    deadline = time.monotonic() + 30
    missing = empty()
    while missing and time.monotonic() < deadline:
        time.sleep(1)  # poll pacing: one round of queries per scrape
        missing = empty()
    assert not missing, "panels without data:\n" + "\n".join(missing)


def test_the_shipped_rules_load_and_no_alert_fires_on_a_healthy_fleet(obs):
    prom = obs["prom"]
    groups = prom.api("rules")["groups"]
    names = {r["name"] for g in groups for r in g["rules"]}
    assert {"DeltafleetRolloutStalled", "DeltafleetRolloutFailureRatio", "DeltafleetDevicesOffline",
            "DeltafleetFallbackRateRising", "DeltafleetDeltaRatioRegression",
            "DeltafleetSuspectDevice"} <= names
    assert all(r["health"] == "ok" for g in groups for r in g["rules"]), json.dumps(groups)[:2000]
    assert [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"] == []


def test_the_dashboards_are_provisioned_from_the_package():
    from deltafleet.server.monitoring import DASHBOARDS_DIR, PROVISIONING_DIR

    assert sorted(p.stem for p in Path(DASHBOARDS_DIR).glob("*.json")) == sorted(dashboards.BOARDS)
    assert (PROVISIONING_DIR / "dashboards" / "deltafleet.yml").is_file()
    assert (PROVISIONING_DIR / "datasources" / "deltafleet.yml").is_file()
