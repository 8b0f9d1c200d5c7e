"""The variant factory on a real trained model (an MLP trained on scikit-learn's digits):
`fleetctl model inspect` checked against what ONNX Runtime and LiteRT report, `model optimize`
registering INT8 variants whose recorded accuracy a recomputation matches, the accuracy gate
refusing a broken INT8, and a mixed fleet (onnxruntime, litert, tflite-runtime and PyTorch
Mobile devices) each getting a variant its runtime loads, with deltas only along a variant
lineage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter
from sqlalchemy import select

from deltafleet.server import catalog, optimize
from deltafleet.server.store.models import Delta, Variant
from tests.harness.cli import assert_one_line_error, fleetctl
from tests.harness.modelgen import (
    DigitsModel,
    make_digits_onnx,
    make_digits_ptl,
    make_digits_tflite,
    retrain_digits_head,
    save_digits_npz,
    train_digits,
)

FAST = {"health_window_s": 1, "retry_backoff_s": 1, "state_timeout_s": 60}
ORT_DTYPES = {"tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | DigitsModel]:
    """v1 (trained) and v2 (head retrained) as ONNX and TFLite, eval and calibration files."""
    root = tmp_path_factory.mktemp("digits")
    v1 = train_digits(seed=0)
    v2 = retrain_digits_head(v1)
    return {"model": v1, "onnx": make_digits_onnx(root / "v1.onnx", v1),
            "tflite": make_digits_tflite(root / "v1.tflite", v1),
            "onnx2": make_digits_onnx(root / "v2.onnx", v2, version=2),
            "tflite2": make_digits_tflite(root / "v2.tflite", v2),
            "ptl": make_digits_ptl(root / "v1.ptl", v1), "ptl2": make_digits_ptl(root / "v2.ptl", v2),
            **save_digits_npz(root, v1)}


def _json(*args: str) -> object:
    res = fleetctl(*args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _ort_accuracy(path: Path, model: DigitsModel) -> float:
    """One sample per run, as devices serve (and as optimize measures: dynamic INT8 scales
    activations per run, so the batch changes its outputs)."""
    sess = ort.InferenceSession(str(path))
    hits = sum(int(sess.run(None, {"input": x[None]})[0].argmax() == y)
               for x, y in zip(model.x_test, model.y_test, strict=True))
    return hits / len(model.y_test)


def _tflite_accuracy(path: Path, model: DigitsModel) -> float:
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    hits = 0
    for x, y in zip(model.x_test, model.y_test, strict=True):
        it.set_tensor(i, x[None])
        it.invoke()
        hits += int(it.get_tensor(o)[0].argmax() == y)
    return hits / len(model.y_test)


# -- inspect ------------------------------------------------------------------------------------


def test_inspect_onnx_matches_what_onnxruntime_reports(digits):
    info = _json("model", "inspect", str(digits["onnx"]))
    sess = ort.InferenceSession(str(digits["onnx"]))
    for mine, theirs in ((info["inputs"], sess.get_inputs()), (info["outputs"], sess.get_outputs())):
        assert [t["name"] for t in mine] == [t.name for t in theirs]
        assert [t["dtype"] for t in mine] == [ORT_DTYPES[t.type] for t in theirs]
        assert [t["shape"] for t in mine] == [list(t.shape) for t in theirs]
    model = digits["model"]
    assert info["param_count"] == sum(w.size + b.size for w, b in model.layers)
    assert info["precision"] == "fp32" and info["quantization"] == {"scheme": "none"}
    assert info["opset"] == {"ai.onnx": 17} and info["ir_version"] == 8
    assert info["runtimes"][0]["runtime"] == "onnxruntime"
    assert info["runtimes"][0]["min_version"] == "1.12"  # opset 17 / IR 8
    assert info["memory"]["weights_bytes"] == 4 * info["param_count"]
    assert info["memory"]["largest_op_working_set_bytes"] == 4 * (64 + 64)  # fc0 in + out
    assert info["size_bytes"] == digits["onnx"].stat().st_size


def test_inspect_tflite_matches_what_litert_reports(digits):
    info = _json("model", "inspect", str(digits["tflite"]))
    it = Interpreter(model_path=str(digits["tflite"]))
    for mine, theirs in ((info["inputs"], it.get_input_details()),
                         (info["outputs"], it.get_output_details())):
        assert [t["name"] for t in mine] == [d["name"] for d in theirs]
        assert [t["dtype"] for t in mine] == [np.dtype(d["dtype"]).name for d in theirs]
        assert [t["shape"] for t in mine] == [d["shape_signature"].tolist() for d in theirs]
    assert info["op_versions"] == {"FULLY_CONNECTED": 1}
    assert info["quantization"]["scheme"] == "none" and info["precision"] == "fp32"
    assert {r["runtime"] for r in info["runtimes"]} == {"tflite-runtime", "litert"}


def test_inspect_rejects_a_file_that_is_not_a_model(tmp_path, fleet_home):
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"\x08\x01garbage that is not protobuf" * 10)
    assert_one_line_error(fleetctl("model", "inspect", str(junk)), 2)
    assert_one_line_error(fleetctl("model", "inspect", str(tmp_path / "absent.onnx")), 2)


# -- optimize -----------------------------------------------------------------------------------


@pytest.fixture
def registered(fleet_home, digits) -> dict[str, Path | DigitsModel]:
    assert fleetctl("init").exit_code == 0
    assert fleetctl("model", "add", "digits", "v1", str(digits["onnx"])).exit_code == 0
    assert fleetctl("model", "add", "digits", "v1", str(digits["tflite"]),
                    "--variant", "tflite").exit_code == 0
    return digits


def _blob(fleet_home: Path, sha: str) -> Path:
    from deltafleet.server.config import ServerConfig
    from deltafleet.server.store import BlobStore

    return BlobStore(ServerConfig.from_env().blobs_dir).path(sha)


def test_optimize_int8_records_accuracy_a_recomputation_matches(registered, fleet_home):
    model = registered["model"]
    (onnx_int8,) = _json("model", "optimize", "digits:v1", "--int8",
                         "--eval", str(registered["eval"]))
    (tfl_int8,) = _json("model", "optimize", "digits:v1", "--variant", "tflite", "--int8",
                        "--calibration", str(registered["calibration"]),
                        "--eval", str(registered["eval"]))
    assert (onnx_int8["variant"], onnx_int8["precision"]) == ("int8", "int8")
    assert (tfl_int8["variant"], tfl_int8["format"]) == ("tflite-int8", "tflite")
    for made, run in ((onnx_int8, _ort_accuracy), (tfl_int8, _tflite_accuracy)):
        fig = made["optimize"]
        blob = _blob(fleet_home, made["sha256"])
        assert fig["accuracy"]["variant"] == pytest.approx(run(blob, model), abs=1e-9)
        assert fig["accuracy"]["parent"] == pytest.approx(model.accuracy(), abs=1e-9)
        assert fig["accuracy"]["drop_points"] <= 1.0  # post-training INT8 on this model
        assert fig["size_bytes"] == blob.stat().st_size < 0.5 * fig["parent_size_bytes"]
        assert fig["deviation"]["top1_agreement"] >= 0.95
        assert fig["latency_ms"]["variant"] > 0 and fig["compressed_bytes"] > 0
    shown = _json("model", "inspect", "digits:v1", "--variant", "tflite-int8")
    assert shown["quantization"]["scheme"] == "full-integer"
    assert shown["parent"]["variant"] == "tflite"
    it = Interpreter(model_path=str(_blob(fleet_home, tfl_int8["sha256"])))
    weights = [d for d in it.get_tensor_details() if d["name"].endswith("weights")]
    assert weights and all(np.dtype(d["dtype"]) == np.int8 for d in weights)
    int8_onnx = _json("model", "inspect", "digits:v1", "--variant", "int8")
    assert int8_onnx["quantization"]["scheme"] == "dynamic"
    assert "MatMulInteger" in int8_onnx["ops"]


def test_accuracy_gate_refuses_an_int8_whose_scale_an_outlier_corrupts(fleet_home, digits,
                                                                        tmp_path):
    """Pixel 0 of every digit is blank, so a huge weight on it leaves the FP32 model's output
    unchanged, but it sets the per-tensor INT8 scale of that layer: every other weight
    quantizes to 0. The gate must refuse, and nothing must be registered."""
    model = digits["model"]
    w0, b0 = model.layers[0]
    w0 = w0.copy()
    w0[0, :] = 400.0
    broken = model.with_layer(0, w0, b0)
    assert broken.accuracy() == model.accuracy()
    path = make_digits_onnx(tmp_path / "outlier.onnx", broken)
    assert fleetctl("init").exit_code == 0
    assert fleetctl("model", "add", "digits", "v1", str(path)).exit_code == 0
    blobs_before = sorted(p.name for p in (fleet_home / "blobs").rglob("*") if p.is_file())
    res = fleetctl("model", "optimize", "digits:v1", "--int8", "--eval", str(digits["eval"]))
    assert_one_line_error(res, 1)
    assert "nothing registered" in res.stderr and "int8" in res.stderr
    (m,) = _json("model", "list")
    assert [x["name"] for x in m["versions"][0]["variants"]] == ["default"]
    assert sorted(p.name for p in (fleet_home / "blobs").rglob("*") if p.is_file()) == blobs_before


def test_optimize_refuses_what_it_cannot_make(registered):
    assert_one_line_error(fleetctl("model", "optimize", "digits:v1"), 2)
    assert_one_line_error(fleetctl("model", "optimize", "digits:v1", "--prune", "150%"), 2)
    assert_one_line_error(fleetctl("model", "optimize", "digits:v1", "--variant", "tflite",
                                   "--fp16"), 2)
    assert_one_line_error(fleetctl("model", "optimize", "digits:v9", "--int8"), 2)


def test_fp16_and_pruned_variants_record_their_figures(registered):
    (fp16,) = _json("model", "optimize", "digits:v1", "--fp16")
    assert fp16["precision"] == "fp16" and fp16["optimize"]["size_ratio"] < 0.6
    assert fp16["optimize"]["deviation"]["max_abs"] < 0.05
    (pruned,) = _json("model", "optimize", "digits:v1", "--prune", "30%",
                      "--max-accuracy-drop", "100", "--eval", str(registered["eval"]))
    assert pruned["variant"] == "pruned30"
    assert pruned["optimize"]["recipe"]["prune"]["sparsity"] == pytest.approx(0.3, abs=0.01)
    assert pruned["optimize"]["compressed_ratio"] < 0.9


def test_combined_static_int8_fp16_and_structured_pruning_in_one_call(registered, fleet_home):
    """``--int8 --fp16 --prune 50% --prune-mode structured --calibration``: one variant per
    precision, each pruned by whole output channels first; the INT8 one is static QDQ."""
    import onnx
    from onnx import numpy_helper

    made = _json("model", "optimize", "digits:v1", "--int8", "--fp16", "--prune", "50%",
                 "--prune-mode", "structured", "--calibration", str(registered["calibration"]),
                 "--eval", str(registered["eval"]), "--max-accuracy-drop", "100")
    assert [m["variant"] for m in made] == ["int8-pruned50s", "fp16-pruned50s"]
    for m in made:
        prune = m["optimize"]["recipe"]["prune"]
        assert prune["mode"] == "structured" and prune["sparsity"] == pytest.approx(0.5, abs=0.05)
        assert m["optimize"]["accuracy"]["variant"] is not None
        out = ort.InferenceSession(str(_blob(fleet_home, m["sha256"]))).run(
            None, {"input": np.zeros((4, 64), np.float32)})[0]
        assert out.shape == (4, 10) and np.isfinite(out).all()
    shown = _json("model", "inspect", "digits:v1", "--variant", "int8-pruned50s")
    assert shown["quantization"]["scheme"] == "static-qdq"
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(shown["ops"])
    # structured: whole output channels (MatMul columns) are zero, not scattered weights
    fp16 = onnx.load_model(str(_blob(fleet_home, made[1]["sha256"])))
    weights = [numpy_helper.to_array(t) for t in fp16.graph.initializer if len(t.dims) == 2]
    assert weights and all(w.dtype == np.float16 for w in weights)
    for w in weights:
        dead = (w == 0).all(axis=0)
        assert dead.sum() == round(w.shape[1] * 0.5), w.shape
        assert (w[:, ~dead] != 0).mean() > 0.9  # the kept channels keep their weights


# -- variants end to end --------------------------------------------------------------------


def _add_variants(lab, digits, version: str, onnx_key: str, tflite_key: str,
                  ptl_key: str | None = None) -> None:
    with lab.store.session() as s:
        catalog.add_model_version(s, lab.blobs, "detector", version, digits[tflite_key],
                                  variant="tflite")
    if ptl_key is not None:
        with lab.store.session() as s:
            catalog.add_model_version(s, lab.blobs, "detector", version, digits[ptl_key],
                                      variant="mobile")
    with lab.store.session() as s:
        optimize.optimize_version(s, lab.blobs, f"detector:{version}",
                                  optimize.OptimizeOptions(optimize.recipes(True, False, None)))
        optimize.optimize_version(s, lab.blobs, f"detector:{version}", optimize.OptimizeOptions(
            optimize.recipes(True, False, None), parent_variant="tflite",
            calibration=digits["calibration"]))


def _variant_files(lab, version: str) -> dict[str, bytes]:
    with lab.store.session() as s:
        mv = catalog.resolve_version(s, f"detector:{version}")
        return {v.name: lab.blobs.path(v.artifact_sha256).read_bytes() for v in mv.variants}


def _loads(data: bytes, runtimes: dict[str, str], tmp: Path) -> np.ndarray:
    if "torch" in runtimes:  # the agent's own PyTorch Mobile adapter, on the lite interpreter
        from deltafleet.agent.runtime_torch import TorchLiteModel

        path = tmp / "m.ptl"
        path.write_bytes(data)
        return TorchLiteModel(path).run({"input": np.zeros((1, 64), np.float32)})["logits"]
    if "onnxruntime" in runtimes:
        return ort.InferenceSession(data).run(None, {"input": np.zeros((1, 64), np.float32)})[0]
    path = tmp / "m.tflite"
    path.write_bytes(data)
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], np.zeros((1, 64), np.float32))
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


@pytest.mark.broker
def test_mixed_fleet_gets_loadable_variants_and_deltas_stay_in_their_lineage(
        rollout_lab, digits, tmp_path):
    lab = rollout_lab({"v1": digits["onnx"], "v2": digits["onnx2"]}, start=False)
    _add_variants(lab, digits, "v1", "onnx", "tflite", "ptl")
    _add_variants(lab, digits, "v2", "onnx2", "tflite2", "ptl2")
    v1, v2 = _variant_files(lab, "v1"), _variant_files(lab, "v2")
    assert set(v2) == {"default", "int8", "tflite", "tflite-int8", "mobile"}
    lab.start_server()
    # (device, runtimes, the v1 variant it runs) -> the v2 variant it must end on
    fleet = [("gw-fp32", {"onnxruntime": "1.20"}, "default", "default"),
             ("pi-int8", {"onnxruntime": "1.17"}, "int8", "int8"),
             ("mcu-int8", {"litert": "1.2"}, "tflite-int8", "tflite-int8"),
             ("mcu-tflr", {"tflite-runtime": "2.14"}, "tflite-int8", "tflite-int8"),
             ("app-new", {"litert": "1.2"}, None, "tflite"),
             ("app-torch", {"torch": "2.13"}, "mobile", "mobile")]
    for device_id, runtimes, runs, _ in fleet:
        models = {"detector": lab.Installed("v1", v1[runs], variant=runs)} if runs else {}
        dev = lab.fleet.add(device_id, {"fleet": "mixed"}, models)
        dev.runtimes = dict(runtimes)
    lab.fleet.wait_connected()
    for dev in lab.fleet.devices.values():
        dev.send_hello()
    ids = {d for d, _, _, _ in fleet}
    lab.wait_for(lambda: lab.known_devices() >= ids and all(
        lab.status_runtimes(d) == r for d, r, _, _ in fleet), 30, "profiles with runtimes")
    lab.group("mixed", fleet="mixed")
    rid = lab.rollout("v2", "mixed", waves=[100], **FAST)
    done = lab.wait_state(rid, {"completed"}, 90)
    assert all(t["state"] == "healthy" for t in done["targets"]), done["targets"]
    sha_to_variant = {}
    with lab.store.session() as s:
        for v in s.scalars(select(Variant)):
            sha_to_variant[v.artifact_sha256] = v.name
        deltas = [(sha_to_variant.get(d.base_sha256), sha_to_variant.get(d.target_sha256))
                  for d in s.scalars(select(Delta))]
    for device_id, runtimes, _, want in fleet:
        got = lab.fleet.devices[device_id].models["detector"]
        assert got.data == v2[want], f"{device_id} got {sha_to_variant.get(got.sha256)}"
        assert _loads(got.data, runtimes, tmp_path).shape == (1, 10)
    assert deltas, "no delta was built for the devices that run a v1 variant"
    assert all(base == target for base, target in deltas), deltas
