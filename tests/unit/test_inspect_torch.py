"""The catalog reads .ptl files without torch: every field checked against what torch itself
reports on the same file; files that are not lite-interpreter models, or declare no IO
contract, are refused in one line; a hostile pickle runs nothing."""

from __future__ import annotations

import importlib.util
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest

from deltafleet.server.catalog.inspect import detect_format, inspect_model
from deltafleet.server.catalog.inspect_torch import inspect_torch
from deltafleet.server.errors import CatalogError
from deltafleet.shared import sha256_file
from tests.harness import modelgen
from tests.harness.need import missing


@pytest.fixture(scope="module")
def v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("torch") is None:
        missing("torch (the agent's torch extra)")
    return modelgen.make_ptl_model(tmp_path_factory.mktemp("ptl") / "v1.ptl", size_mb=0.25)


def test_inspection_matches_what_torch_reports(v1: Path) -> None:
    import torch
    from torch.jit.mobile import (
        _export_operator_list,
        _get_model_bytecode_version,
        _load_for_lite_interpreter,
    )

    from deltafleet.agent.runtime import load_model

    info = inspect_torch(v1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        lite = _load_for_lite_interpreter(str(v1))
    assert info.format == "ptl" and info.io_declared
    assert info.bytecode_version == _get_model_bytecode_version(str(v1))
    assert set(info.ops) == _export_operator_list(lite)
    assert info.methods == ("forward",)
    net = modelgen.ptl_classifier(size_mb=0.25)
    assert info.param_count == sum(p.numel() for p in net.parameters())
    assert info.bytes_by_dtype == {"float32": 4 * info.param_count}
    assert info.precision == "fp32"
    assert (info.size_bytes, info.sha256) == (v1.stat().st_size, sha256_file(v1))
    with load_model(v1, "ptl") as model:  # the IO contract is the one the agent runs with
        assert (info.inputs, info.outputs) == (model.inputs, model.outputs)
    assert torch.__version__  # torch was only used for the cross-check above


def test_the_catalog_registers_a_ptl_file_as_format_ptl(v1: Path) -> None:
    assert detect_format(v1) == "ptl"
    info = inspect_model(v1)
    assert info.format == "ptl" and info.param_count > 0
    assert info.ops == ("aten::linear", "aten::relu", "aten::softmax.int")
    assert info.to_json()["inputs"] == [{"name": "input", "dtype": "float32",
                                         "shape": [None, 64]}]


def test_fp16_weights_are_reported_as_fp16(tmp_path: Path) -> None:
    import torch

    v1 = tmp_path / "half.ptl"
    torch.jit.script(torch.nn.Linear(8, 4).half())._save_for_lite_interpreter(str(v1))
    info = inspect_torch(v1)
    assert (info.precision, info.param_count, info.bytes_by_dtype) == ("fp16", 36, {"float16": 72})
    assert not info.io_declared and [s.name for s in info.inputs] == ["input"]


def test_not_a_lite_model_or_no_io_contract_is_one_line(v1: Path, tmp_path: Path) -> None:
    import torch

    no_io = tmp_path / "no-io.ptl"
    torch.jit.script(torch.nn.Linear(4, 2))._save_for_lite_interpreter(str(no_io))
    full = tmp_path / "full.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), str(full))
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("a/readme.txt", "hello")
    truncated = tmp_path / "truncated.ptl"
    truncated.write_bytes(v1.read_bytes()[: v1.stat().st_size // 2])
    cases = {no_io: "declares no inputs/outputs", full: "saved for full torch",
             other_zip: "not a TorchScript-lite", truncated: "not a TorchScript-lite"}
    for path, words in cases.items():
        with pytest.raises(CatalogError) as e:
            inspect_model(path)
        assert words in str(e.value) and "\n" not in str(e.value), (path, e.value)


def test_a_hostile_pickle_is_read_without_running_anything(v1: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Touch:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    class Method:
        def __reduce__(self):
            return (getattr, (marker, "touch"))

    for name, payload in (("system", Touch()), ("getattr", [Method()])):
        evil = tmp_path / f"evil-{name}.ptl"
        with zipfile.ZipFile(v1) as src, zipfile.ZipFile(evil, "w") as dst:
            for item in src.infolist():
                data = src.read(item)
                if item.filename.endswith("/data.pkl"):
                    data = pickle.dumps(payload, protocol=2)
                dst.writestr(item, data)
        try:
            info = inspect_torch(evil)  # stand-ins only: no global is ever resolved
        except CatalogError as e:
            assert "does not unpickle" in str(e)
        else:
            assert info.param_count == 0
        assert not marker.exists(), name
