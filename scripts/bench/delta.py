"""Delta codecs on synthetic model updates: size, build/apply time and peak RSS, round trip.

Prints ONE JSON document on stdout and writes a Markdown table to bench-results/delta.md (and
to stderr). Every build and every apply runs in its own child process, which reports its own
peak RSS (``VmHWM``), so the figures are what a worker or a device would see. Applying follows
the agent's path (artifact read in place, target streamed to a file and hashed; bsdiff4 in the
agent's bspatch child process, whose peak is added).

Update kinds (``make_pair``), on an ONNX MLP of 6 hidden layers (FP32, or INT8 weights behind
DequantizeLinear):
  head_only         last layer retrained
  finetune          every weight moved by N(0, 1e-3 x layer std)
  requant           (INT8) fine-tuned weights re-quantized with recalibrated scales
  graph_only        same weights, Relu -> LeakyRelu and an extra node
  layer_inserted    a new hidden layer in the middle, existing layers unchanged
  complete_retrain  every weight new

Real pairs: every directory under scripts/bench/data/ holding two ``*.onnx`` / ``*.tflite``
files (sorted by name: base, then target) is measured too — today silero-vad 5.1 -> 6.0.0
from the PyPI wheels (see its README). ``BENCH_REAL=0`` skips them.

Environment:
  BENCH_QUICK=1        2 MB models only (smoke test, ~1 min)
  BENCH_SIZES=25,100   FP32 sizes in MiB (INT8 variants are a quarter of the FP32 bytes
                       of the same sizes, i.e. the same parameter count)
  BENCH_BSDIFF_MAX_MB  run the bsdiff4 baseline up to this size (default 100; it needs
                       ~17x the model in memory and ~1 s per MB)
  BENCH_1GB=1          also build a 1 GiB FP32 fine-tune pair within the default budget
  BENCH_KINDS=a,b      only these update kinds; BENCH_PRECISIONS=fp32,int8 likewise
  BENCH_TAG            write bench-results/delta-<tag>.md instead of delta.md
  BENCH_DIR            where to write the models (default a temp dir)
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from deltafleet.shared import sha256_file

ROOT = Path(__file__).resolve().parents[2]
KINDS_FP32 = ["head_only", "finetune", "graph_only", "layer_inserted", "complete_retrain"]
KINDS_INT8 = ["head_only", "finetune", "requant", "graph_only", "layer_inserted",
              "complete_retrain"]
HIDDEN_LAYERS = 6
IN_DIM, OUT_DIM = 256, 16
MIB = 1 << 20


# ------------------------------------------------------------------ model pairs


def _layers(seed: int, size_mb: float, bytes_per_param: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    params = size_mb * MIB / bytes_per_param
    a, b = HIDDEN_LAYERS - 1, IN_DIM + OUT_DIM
    h = max(8, round((-b + math.sqrt(b * b + 4 * a * params)) / (2 * a)))
    dims = [IN_DIM] + [h] * HIDDEN_LAYERS + [OUT_DIM]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(len(dims) - 1):
        w = rng.standard_normal((dims[i], dims[i + 1]), dtype=np.float32)
        w *= np.float32(1 / math.sqrt(dims[i]))
        bias = (rng.standard_normal(dims[i + 1]) * 0.01).astype(np.float32)
        out.append((f"fc{i}", w, bias))
    return out


def _quantize(w: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8)


def _model_bytes(
    layers: list[tuple[str, np.ndarray, np.ndarray]],
    precision: str,
    *,
    graph_v2: bool = False,
    scales: dict[str, float] | None = None,
) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    x = "input"
    for i, (name, w, b) in enumerate(layers):
        last = i == len(layers) - 1
        if precision == "int8":
            scale = (scales or {}).get(name, float(np.abs(w).max()) / 127)
            inits += [
                numpy_helper.from_array(_quantize(w, scale), f"{name}.weight_q"),
                numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{name}.scale"),
                numpy_helper.from_array(np.array(0, dtype=np.int8), f"{name}.zp"),
            ]
            nodes.append(helper.make_node(
                "DequantizeLinear", [f"{name}.weight_q", f"{name}.scale", f"{name}.zp"],
                [f"{name}.weight"], name=f"{name}.dq"))
        else:
            inits.append(numpy_helper.from_array(w, f"{name}.weight"))
        inits.append(numpy_helper.from_array(b, f"{name}.bias"))
        nodes.append(helper.make_node("MatMul", [x, f"{name}.weight"], [f"{name}.mm"]))
        y = "output" if last and not graph_v2 else f"{name}.out"
        nodes.append(helper.make_node("Add", [f"{name}.mm", f"{name}.bias"],
                                      [y if last else f"{name}.add"]))
        if not last:
            if graph_v2:
                nodes.append(helper.make_node("LeakyRelu", [f"{name}.add"], [y], alpha=0.01))
            else:
                nodes.append(helper.make_node("Relu", [f"{name}.add"], [y]))
        x = y
    if graph_v2:
        nodes.append(helper.make_node("Softmax", [x], ["output"], axis=-1))
    graph = helper.make_graph(
        nodes, "bench_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", IN_DIM])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", OUT_DIM])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="deltafleet-bench",
                              model_version=2 if graph_v2 else 1)
    model.ir_version = 8
    return model.SerializeToString()  # type: ignore[no-any-return]


def make_pair(
    kind: str, directory: Path, *, size_mb: float, precision: str = "fp32", seed: int = 0
) -> tuple[Path, Path]:
    """Write base.onnx and target.onnx for one update kind; returns their paths."""
    bpp = 1 if precision == "int8" else 4
    base_layers = _layers(seed, size_mb, bpp)
    target_layers = list(base_layers)
    scales = None
    graph_v2 = False
    rng = np.random.default_rng([seed, 7])
    if kind == "head_only":
        name, w, b = base_layers[-1]
        r = np.random.default_rng([seed, 1])
        target_layers[-1] = (name, r.standard_normal(w.shape, dtype=np.float32) * w.std(),
                             (r.standard_normal(b.shape) * 0.01).astype(np.float32))
    elif kind in ("finetune", "requant"):
        target_layers = [
            (n, w + rng.standard_normal(w.shape, dtype=np.float32) * np.float32(1e-3 * w.std()),
             b + (rng.standard_normal(b.shape) * 1e-5).astype(np.float32))
            for n, w, b in base_layers
        ]
        if precision == "int8" and kind == "finetune":  # same calibration as the base
            scales = {n: float(np.abs(w).max()) / 127 for n, w, _ in base_layers}
    elif kind == "graph_only":
        graph_v2 = True
    elif kind == "layer_inserted":
        mid = len(base_layers) // 2
        w = base_layers[mid][1]
        r = np.random.default_rng([seed, 2])
        new = ("fc_inserted", (r.standard_normal((w.shape[0], w.shape[0]), dtype=np.float32)
                               * np.float32(1 / math.sqrt(w.shape[0]))),
               np.zeros(w.shape[0], dtype=np.float32))
        target_layers = base_layers[:mid] + [new] + base_layers[mid:]
    elif kind == "complete_retrain":
        target_layers = _layers(seed + 1000, size_mb, bpp)
    else:
        raise ValueError(f"unknown kind {kind}")
    directory.mkdir(parents=True, exist_ok=True)
    base, target = directory / "base.onnx", directory / "target.onnx"
    base.write_bytes(_model_bytes(base_layers, precision))
    target.write_bytes(_model_bytes(target_layers, precision, graph_v2=graph_v2, scales=scales))
    return base, target


# ------------------------------------------------------------------ measurement in children

_BUILD_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from deltafleet.server import codecs as C
enc_name, base, target, out = sys.argv[1:5]
encs = {e.name: e for e in C.default_encoders()}
t0 = time.perf_counter()
if enc_name == "auto":
    ch = C.choose(Path(base), Path(target), Path(out).parent)
    if ch.path is not None:
        ch.path.rename(out)
    res = {"codec": ch.codec, "size": ch.size_bytes, "reference": ch.reference_bytes,
           "attempts": [a.__dict__ for a in ch.attempts]}
elif enc_name.startswith("ref-zstd"):
    res = {"size": C.compressed_full_size(Path(target), level=int(enc_name[8:]))}
else:
    encs[enc_name].encode(Path(base), Path(target), Path(out))
    res = {"size": Path(out).stat().st_size}
res["seconds"] = time.perf_counter() - t0
res["peak_rss"] = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps(res))
"""

_APPLY_CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
from deltafleet import codecs
from deltafleet.agent import bspatch
from deltafleet.agent.codecs import decode_to_file
codec, base, delta, size = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
child = 0
with tempfile.TemporaryDirectory(dir=delta.parent) as tmp, codecs.FileSource(delta) as src:
    dest = Path(tmp) / "target"
    t0 = time.perf_counter()
    # the agent's path: artifact read in place, target streamed to a file and hashed
    if codec == codecs.BSDIFF4:
        done = bspatch.apply_to_file(base, src, size, dest, max_memory_bytes=1 << 40)
        sha, child = done.sha256, done.child_peak_rss_bytes
    else:
        sha = decode_to_file(codec, src, base, dest, target_size=size,
                             max_memory_bytes=1 << 40)
    secs = time.perf_counter() - t0
own = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"sha256": sha, "seconds": secs, "peak_rss": own + child,
                  "bspatch_child_peak_rss": child}))
"""


def _child(code: str, *args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def measure_pair(
    label: str, base: Path, target: Path, work: Path, *, codecs: list[str]
) -> dict:
    full = target.stat().st_size
    target_sha = sha256_file(target)
    row: dict = {"pair": label, "base_bytes": base.stat().st_size, "full_bytes": full}
    # zstd -19 of 1 GB takes minutes; above 256 MiB the reference is level 3 (within ~1% on
    # model weights) and the row says so.
    ref_level = 19 if full <= 256 * MIB else 3
    row["zstd_reference_level"] = ref_level
    z19 = _child(_BUILD_CHILD, f"ref-zstd{ref_level}", str(base), str(target), str(work / "z19"))
    row["zstd19_bytes"] = z19.get("size")
    row["zstd19_seconds"] = z19.get("seconds")
    row["codecs"] = {}
    for name in codecs:
        out = work / f"delta.{name}"
        built = _child(_BUILD_CHILD, name, str(base), str(target), str(out))
        entry: dict = {"build_seconds": built.get("seconds"), "build_peak_rss": built.get("peak_rss")}
        if "error" in built or not out.exists():
            entry["error"] = built.get("error", "no output")
            row["codecs"][name] = entry
            continue
        if name == "auto":
            entry["winner"] = built["codec"]
            entry["attempts"] = built["attempts"]
        codec = built["codec"] if name == "auto" else name
        entry["bytes"] = out.stat().st_size
        applied = _child(_APPLY_CHILD, codec, str(base), str(out), str(full))
        entry["apply_seconds"] = applied.get("seconds")
        entry["apply_peak_rss"] = applied.get("peak_rss")
        entry["round_trip"] = applied.get("sha256") == target_sha
        if "error" in applied:
            entry["error"] = applied["error"]
        row["codecs"][name] = entry
        out.unlink()
    auto = row["codecs"].get("auto", {})
    shipped = auto.get("bytes") if auto.get("round_trip") else None
    row["shipped_bytes"] = shipped if shipped is not None else full
    row["shipped"] = auto.get("winner") or "full"
    bs = row["codecs"].get("bsdiff4", {}).get("bytes")
    row["bsdiff4_bytes"] = bs
    refs = [v for v in (bs, row["zstd19_bytes"]) if v]
    row["meets_size_target"] = bool(refs) and row["shipped_bytes"] <= min(refs)
    return row


def _fmt_mb(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:.2f}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| pair | codec | MB | % of full | % of zstd-19 | % of bsdiff4 | build s | build RSS MB "
        "| apply s | apply RSS MB | round trip |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['pair']} | full / zstd-19 | {_fmt_mb(r['full_bytes'])} / "
                     f"{_fmt_mb(r['zstd19_bytes'])} | 100 | | | {r['zstd19_seconds'] or 0:.1f} "
                     "(zstd-19) | | | | |")
        for name, c in r["codecs"].items():
            if "bytes" not in c:
                lines.append(f"| {r['pair']} | {name} | error: {c.get('error', '')[:60]} "
                             "| | | | | | | | |")
                continue
            label = f"**auto → {c['winner']}**" if name == "auto" else name
            pct = lambda ref, c=c: f"{100 * c['bytes'] / ref:.1f}" if ref else "-"  # noqa: E731
            lines.append(
                f"| {r['pair']} | {label} | {_fmt_mb(c['bytes'])} | {pct(r['full_bytes'])} "
                f"| {pct(r['zstd19_bytes'])} | {pct(r['bsdiff4_bytes'])} "
                f"| {c['build_seconds']:.2f} | {_fmt_mb(c['build_peak_rss'])} "
                f"| {c['apply_seconds'] or 0:.2f} | {_fmt_mb(c['apply_peak_rss'])} "
                f"| {'ok' if c['round_trip'] else 'FAIL'} |"
            )
    return "\n".join(lines) + "\n"


def real_pairs() -> list[tuple[Path, Path, str]]:
    """(base, target, label) for each shipped real model pair."""
    out = []
    data = Path(__file__).resolve().parent / "data"
    for d in sorted(p for p in data.iterdir() if p.is_dir()) if data.is_dir() else []:
        models = sorted([*d.glob("*.onnx"), *d.glob("*.tflite")])
        if len(models) == 2:
            out.append((models[0], models[1], f"real {models[0].stem} -> {models[1].stem}"))
    return out


def main() -> int:
    quick = os.environ.get("BENCH_QUICK") == "1"
    sizes_env = os.environ.get("BENCH_SIZES", "25,100")
    sizes = [2.0] if quick else [float(s) for s in sizes_env.split(",") if s]
    bsdiff_max = float(os.environ.get("BENCH_BSDIFF_MAX_MB", "100"))
    tmp = tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR"))
    work = Path(tmp.name)
    rows = []
    kinds = os.environ.get("BENCH_KINDS", "").split(",") if os.environ.get("BENCH_KINDS") else None
    precisions = os.environ.get("BENCH_PRECISIONS", "fp32,int8").split(",")
    plan = [(size, p, k) for p in ("fp32", "int8") if p in precisions for size in sizes
            for k in (KINDS_FP32 if p == "fp32" else KINDS_INT8) if kinds is None or k in kinds]
    for size, precision, kind in plan:
        # INT8 variants have the parameter count of the FP32 model of that size.
        mb = size / 4 if precision == "int8" else size
        d = work / f"{precision}-{size:g}-{kind}"
        base, target = make_pair(kind, d, size_mb=mb, precision=precision)
        codecs = ["auto", "tensor-xor", "zstd-dict"]
        if base.stat().st_size <= bsdiff_max * MIB * 1.05:
            codecs.append("bsdiff4")
        label = f"{precision} {size:g}M-params {kind}"
        print(f"[delta bench] {label}: {base.stat().st_size / MIB:.1f} MB", file=sys.stderr)
        rows.append(measure_pair(label, base, target, d, codecs=codecs))
        base.unlink()
        target.unlink()
    if os.environ.get("BENCH_REAL", "1") == "1":
        for base, target, label in real_pairs():
            print(f"[delta bench] {label}", file=sys.stderr)
            rows.append(measure_pair(label, base, target, work,
                                     codecs=["auto", "tensor-xor", "zstd-dict", "bsdiff4"]))
    if os.environ.get("BENCH_1GB") == "1":
        d = work / "fp32-1024-finetune"
        base, target = make_pair("finetune", d, size_mb=1024, precision="fp32")
        print("[delta bench] fp32 1 GiB finetune", file=sys.stderr)
        rows.append(measure_pair("fp32 1024M finetune", base, target, d, codecs=["auto"]))
    table = markdown(rows)
    print(table, file=sys.stderr)
    out_dir = ROOT / "bench-results"
    out_dir.mkdir(exist_ok=True)
    tag = os.environ.get("BENCH_TAG", "quick" if quick else "")
    (out_dir / (f"delta-{tag}.md" if tag else "delta.md")).write_text(table)
    doc = {
        "benchmark": "delta",
        "quick": quick,
        "machine": {"cpus": os.cpu_count()},
        "budget_bytes": 1 << 30,
        "pairs": rows,
        "all_meet_size_target": all(r["meets_size_target"] for r in rows),
        "bench_peak_rss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    print(json.dumps(doc, indent=2))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
