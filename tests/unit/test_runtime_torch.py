"""The PyTorch Mobile adapter: a trained TorchScript-lite classifier runs in torch's lite
interpreter with the numbers torch itself computes; torch stays out of the agent until a .ptl
model is loaded; bad files and bad answers fail in one line; the planner hands .ptl variants
to devices that advertise torch."""

from __future__ import annotations

import base64
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from deltafleet.agent.errors import ModelRuntimeError
from deltafleet.agent.runtime import load_model, zero_feeds
from deltafleet.agent.serving import check_outputs, decode_golden
from deltafleet.server.planner import VariantOption, choose_variant
from deltafleet.shared import TensorSpec
from tests.harness import modelgen
from tests.harness.need import missing


def need_torch() -> None:
    if importlib.util.find_spec("torch") is None:
        missing("torch (the agent's torch extra)")


@pytest.fixture(scope="module")
def ptl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    need_torch()
    d = tmp_path_factory.mktemp("ptl")
    return {"v1": modelgen.make_ptl_model(d / "v1.ptl", size_mb=0.25),
            "shape": modelgen.make_ptl_model(d / "shape.ptl", size_mb=0.25,
                                             misbehave="wrong_shape"),
            "nan": modelgen.make_ptl_model(d / "nan.ptl", size_mb=0.25,
                                           misbehave="nan_on_negative")}


def test_importing_the_agent_imports_no_torch_until_a_ptl_model_loads() -> None:
    code = ("import sys, json\n"
            "import deltafleet.agent, deltafleet.agent.daemon, deltafleet.agent.runtime_torch\n"
            "from deltafleet.agent.runtime import available_runtimes\n"
            "runtimes = available_runtimes()\n"
            "print(json.dumps({'torch': 'torch' in sys.modules, 'runtimes': runtimes}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    result = json.loads(out.stdout)
    assert result["torch"] is False
    if importlib.util.find_spec("torch") is not None:
        assert result["runtimes"]["torch"] == importlib.metadata.version("torch")


def test_torch_is_only_in_the_agents_torch_extra() -> None:
    requires = importlib.metadata.requires("deltafleet-agent") or []
    torch_reqs = [r for r in requires if r.split(";")[0].strip().startswith("torch")]
    assert torch_reqs and all(r.split(";")[1].replace('"', "'").strip() == "extra == 'torch'"
                              for r in torch_reqs), torch_reqs


def test_a_trained_ptl_classifier_gives_torchs_own_numbers(ptl: dict[str, Path]) -> None:
    import torch

    x, y = modelgen.ptl_dataset()
    with load_model(ptl["v1"], "ptl") as model:
        assert (model.format, model.runtime) == ("ptl", "torch")
        assert model.inputs == (TensorSpec("input", "float32", (None, 64)),)
        assert model.outputs == (TensorSpec("probs", "float32", (None, 10)),)
        probs = model.run({"input": x[-512:]})["probs"]
        check_outputs(model, {"probs": probs}, batch=512)
        reference = modelgen.ptl_classifier(size_mb=0.25)
        with torch.inference_mode():
            expected = reference(torch.from_numpy(x[-512:])).numpy()
        np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
        assert (probs.argmax(axis=1) == y[-512:]).mean() > 0.9  # a real, trained classifier
        zeros = model.run(zero_feeds(model))["probs"]
        assert zeros.shape == (1, 10) and abs(float(zeros.sum()) - 1) < 1e-5


def test_read_only_and_float64_feeds_are_taken(ptl: dict[str, Path]) -> None:
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
    golden = decode_golden(({"input": {"dtype": "float32", "shape": [1, 64],
                                       "b64": base64.b64encode(x.tobytes()).decode()}},))
    with load_model(ptl["v1"], "ptl") as model:
        a = model.run(golden[0])["probs"]  # a read-only array over the decoded bytes
        b = model.run({"input": x.astype(np.float64)})["probs"]
        np.testing.assert_array_equal(a, b)


def test_bad_feeds_and_closed_models_fail_in_one_line(ptl: dict[str, Path]) -> None:
    model = load_model(ptl["v1"], "ptl")
    with pytest.raises(ModelRuntimeError, match=r"missing inputs \['input'\], unknown \['x'\]"):
        model.run({"x": np.zeros((1, 64), np.float32)})
    with pytest.raises(ModelRuntimeError) as e:
        model.run({"input": np.zeros((1, 63), np.float32)})
    assert str(e.value).startswith("torch inference failed") and "\n" not in str(e.value)
    model.close()
    with pytest.raises(ModelRuntimeError, match="closed"):
        model.run({"input": np.zeros((1, 64), np.float32)})


def test_an_answer_of_the_wrong_shape_or_nan_is_an_error(ptl: dict[str, Path]) -> None:
    with load_model(ptl["shape"], "ptl") as model, pytest.raises(ModelRuntimeError, match="shape"):
        check_outputs(model, model.run(zero_feeds(model)))
    with load_model(ptl["nan"], "ptl") as model:
        check_outputs(model, model.run(zero_feeds(model)))  # zeros (the warm-up) pass
        with pytest.raises(ModelRuntimeError, match="NaN"):
            check_outputs(model, model.run({"input": -np.ones((2, 64), np.float32)}))


def test_files_that_are_not_runnable_ptl_models_fail_in_one_line(ptl: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    import torch

    junk = tmp_path / "junk.ptl"
    junk.write_bytes(b"not a zip at all")
    no_io = tmp_path / "no-io.ptl"
    torch.jit.script(torch.nn.Linear(4, 2))._save_for_lite_interpreter(str(no_io))
    bad_io = tmp_path / "bad-io.ptl"
    torch.jit.script(torch.nn.Linear(4, 2))._save_for_lite_interpreter(
        str(bad_io), _extra_files={"deltafleet_io.json": b'{"version": 1, "inputs": []}'})
    full = tmp_path / "full.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), str(full))
    cases = {junk: "not a TorchScript-lite", no_io: "declares no inputs/outputs",
             bad_io: "deltafleet_io.json is invalid", full: "not a TorchScript-lite",
             tmp_path / "absent.ptl": "does not exist"}
    for path, words in cases.items():
        with pytest.raises(ModelRuntimeError) as e:
            load_model(path, "ptl")
        assert words in str(e.value) and "\n" not in str(e.value), (path, e.value)
    # a .pt saved for full torch with our IO file still is not lite bytecode
    with zipfile.ZipFile(full, "a") as z:
        z.writestr(f"{z.namelist()[0].split('/')[0]}/extra/deltafleet_io.json",
                   json.dumps({"version": 1,
                               "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
                               "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 2]}]}))
    with pytest.raises(ModelRuntimeError, match="torch cannot load full.pt"):
        load_model(full, "ptl")


def test_without_torch_installed_the_error_names_the_extra(ptl: dict[str, Path]) -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "from pathlib import Path\n"
            "from deltafleet.agent.runtime import load_model\n"
            "from deltafleet.agent.errors import ModelRuntimeError\n"
            f"try:\n    load_model(Path({str(ptl['v1'])!r}), 'ptl')\n"
            "except ModelRuntimeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert "pip install deltafleet-agent[torch]" in out.stdout, out


def test_devices_advertising_torch_get_the_ptl_variant() -> None:
    onnx = VariantOption(1, "default", "onnx", "fp32", "a" * 64, 100)
    ptl = VariantOption(2, "mobile", "ptl", "fp32", "b" * 64, 90)
    assert choose_variant({"torch": "2.13.0+cpu"}, None, [onnx, ptl]).variant == ptl
    assert choose_variant({"onnxruntime": "1.20"}, None, [onnx, ptl]).variant == onnx
    assert choose_variant({"torch": "2.13.0", "onnxruntime": "1.20"}, "mobile",
                          [onnx, ptl]).variant == ptl
    choice = choose_variant({"litert": "2"}, None, [ptl])
    assert choice.variant is None and "ptl" in choice.reason
