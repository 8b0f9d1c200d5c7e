"""A manifest a device cannot read (signed with a key it does not trust): the device's
rejection, which names no version, reaches the server and counts against the rollout, and
fleetctl shows the device and the rollout with no "None" in them."""

from __future__ import annotations

import json

import pytest

from deltafleet.shared import SigningKey
from tests.harness import cli
from tests.harness.rollout_lab import RolloutLab

pytestmark = pytest.mark.broker


@pytest.fixture
def lab(rollout_lab, onnx_pair, monkeypatch: pytest.MonkeyPatch) -> RolloutLab:
    lab = rollout_lab(onnx_pair(0.05), start=False)
    monkeypatch.setenv("FLEET_HOME", str(lab.cfg.home))
    monkeypatch.setenv("FLEET_DB_URL", lab.cfg.db_url)
    monkeypatch.setenv("FLEET_ACTOR", "alice")
    lab.start_server()
    return lab


def test_a_rejection_of_an_unreadable_manifest_is_applied_and_shown(lab):
    (dev,) = lab.add_devices(1, {"hw": "cam"})
    lab.stop_server()
    SigningKey.generate().save(lab.cfg.signing_key_path, lab.cfg.public_key_path)
    lab.start_server()
    lab.group("cams", hw="cam")
    rid = lab.rollout("v2", "cams", state_timeout_s=600)
    lab.wait_state(rid, {"paused"}, 30)
    (target,) = lab.status(rid)["targets"]
    assert target["state"] == "held" and "rejected" in target["reason"], target
    assert "signature" in target["reason"], target
    for args in (("device", "list"), ("device", "show", dev), ("rollout", "status", str(rid))):
        res = cli.fleetctl(*args)
        assert res.exit_code in (0, 1) and "None" not in res.output, res.output
    (model,) = json.loads(cli.fleetctl("device", "show", dev, "--json").output)["models"]
    assert model["version"] is None and model["sha256"] == target["running_sha256"]
