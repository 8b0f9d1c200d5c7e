"""A real ``fleet-agent`` says where it stands with its broker: the cause of failed attempts
logged once per change with the backoff, the recovery logged once, ``fleet-agent status`` and
``/v1/health`` showing the connection; TLS failures named as TLS; and its local API answering
a body that does not fit with 400 naming the expected inputs."""

from __future__ import annotations

import datetime
import http.client
import json
import subprocess
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from deltafleet.agent.client import AgentClient
from tests.harness import modelgen
from tests.harness.broker import Mosquitto, has_mosquitto
from tests.harness.fleetlab import BIN, Lab, free_port, wait_for
from tests.harness.need import missing


def _status(lab: Lab, device: str, *json_flag: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fleet-agent"), "status", *json_flag, "--state-dir",
                           str(lab.agent_dir(device))], text=True, capture_output=True, timeout=30)


def _broker_doc(lab: Lab, device: str) -> dict | None:
    res = _status(lab, device, "--json")
    return json.loads(res.stdout)["broker"] if res.returncode == 0 else None


def test_no_broker_is_logged_once_then_the_recovery_once(tmp_path: Path, key) -> None:
    if not has_mosquitto():
        missing("the mosquitto binary")
    port = free_port()
    lab = Lab(tmp_path / "lab", mqtt_url=f"mqtt://127.0.0.1:{port}")
    broker = None
    try:
        lab.start_agent("conn-1", {"hw": "x"}, trusted_key=key[1])
        log = "agent-conn-1"
        wait_for(lambda: "unreachable: connection refused" in lab.log(log), 30,
                 "the refused connection in the agent's log")
        with AgentClient(port=lab.api_ports["conn-1"]) as c:
            health = wait_for(lambda: (h := c.health()["broker"])["attempts"] >= 3 and h,
                              30, "three failed attempts")
        assert health["connected"] is False and health["cause"] == "connection refused"
        assert health["retry_s"] >= 1
        down = _broker_doc(lab, "conn-1")
        assert down is not None and down["cause"] == "connection refused"
        assert down["connected"] is False and down["running"] is True
        assert down["url"] == f"mqtt://127.0.0.1:{port}"
        text = _status(lab, "conn-1").stdout
        assert f"mqtt://127.0.0.1:{port}  not connected since" in text
        assert "connection refused" in text

        (tmp_path / "broker").mkdir()
        conf = tmp_path / "broker" / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        broker = Mosquitto(tmp_path / "broker", port, conf)
        broker.start()
        wait_for(lambda: "connected to broker 127.0.0.1:" in lab.log(log), 30, "the recovery")
        up = wait_for(lambda: (d := _broker_doc(lab, "conn-1")) and d["connected"] and d,
                      30, "status to show the connection")
        assert up["cause"] == "connection refused"  # the last error, kept for the operator
        text = _status(lab, "conn-1").stdout
        assert "connected since" in text and "last error: connection refused" in text
        assert "retrying" in lab.log(log)
        assert lab.log(log).count("connection refused") == 1
        assert lab.log(log).count("connected to broker") == 1
        lab.stop("agent-conn-1")
        stopped = _broker_doc(lab, "conn-1")
        assert stopped is not None and stopped["running"] is False
        assert "agent not running" in _status(lab, "conn-1").stdout
    finally:
        lab.close()
        if broker is not None:
            broker.stop()


def _other_ca(path: Path) -> Path:
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "some other CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(k.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(k, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_a_tls_broker_with_the_wrong_ca_is_named_as_tls(tmp_path: Path, key, secure_fleet) -> None:
    _, broker = secure_fleet
    bundle = tmp_path / "enroll-dev-a"
    lab = Lab(tmp_path / "lab", mqtt_url=broker.url)
    try:
        lab.start_agent("dev-a", {}, trusted_key=key[1], extra_env={
            "FLEET_AGENT_MQTT_CA_FILE": str(_other_ca(tmp_path / "other-ca.crt")),
            "FLEET_AGENT_MQTT_CERT_FILE": str(bundle / "client.crt"),
            "FLEET_AGENT_MQTT_KEY_FILE": str(bundle / "client.key"),
        })
        wait_for(lambda: "TLS failure: certificate verify failed" in lab.log("agent-dev-a"), 30,
                 "the TLS failure in the agent's log")
        with AgentClient(port=lab.api_ports["dev-a"]) as c:
            wait_for(lambda: c.health()["broker"]["attempts"] >= 2, 30, "a second attempt")
        doc = _broker_doc(lab, "dev-a")
        assert doc is not None and doc["cause"] == "TLS failure: certificate verify failed"
        assert lab.log("agent-dev-a").count("TLS failure") == 1
        assert "TLS failure: certificate verify failed" in _status(lab, "dev-a").stdout
    finally:
        lab.close()


def _post(port: int, body: bytes, ctype: str = "application/json") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/models/detector/predict", body=body,
                     headers={"Content-Type": ctype})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


BAD_BODIES = [
    b"{not json",
    b'{"inputs": {}}',
    b'{"inputs": {"input": [[1, 2, 3]]}}',
    b'{"inputs": {"input": [["a"]]}}',
    b'{"inputs": {"\\ud800": [1], "input": [[0]]}}',
    b'{"inputs": {"in\\u0000put": [1]}}',
]


def test_a_real_agent_answers_a_bad_body_with_400_naming_the_expected_inputs(
        tmp_path: Path, key, lab: Lab) -> None:
    model = modelgen.make_onnx_model(tmp_path / "fallback.onnx", size_mb=0.1)
    lab.start_agent("api-1", {}, trusted_key=key[1],
                    extra_env={"FLEET_AGENT_FALLBACK": f"detector={model}"})
    port = lab.api_ports["api-1"]
    wait_for(lambda: "local inference API on" in lab.log("agent-api-1"), 30, "the local API")
    for body in BAD_BODIES:
        status, doc = _post(port, body)
        assert status == 400, (body, doc)
        assert doc["expected"] == "{input: float32[?,64]}"
        assert doc["error"].endswith("expected inputs {input: float32[?,64]}")
    with AgentClient(port=port) as c:  # and the model still answers a good one
        r = c.predict("detector", {"input": np.zeros((1, 64), np.float32)})
    assert r.fallback == "fallback.onnx" and r.outputs["output"].shape == (1, 10)
    assert "Traceback" not in lab.log("agent-api-1")
