"""What the contained decoder costs on the common path: one real delta decoded in-process
(``codecs.decode_to_file``) or in the agent's child (``confined.decode_confined``).

    .venv/bin/python -m scripts.bench.confine_cost prepare DIR [--size-mb 25] [--codec tensor-xor]
    farm-bench --vs '.venv/bin/python -m scripts.bench.confine_cost inproc DIR' \\
        -- .venv/bin/python -m scripts.bench.confine_cost child DIR

With no arguments (``make bench``) it prepares a pair in a temp dir, runs each mode
``--runs`` times as its own process (interpreter start included, as above), checks every
output's sha256 and prints one JSON document with the medians and their ratio; any failed run
fails the benchmark. ``BENCH_QUICK=1`` uses a 5 MB model and 3 runs.

``prepare`` writes base.onnx, target.onnx and the delta (a fine-tune) once; each run decodes it
to DIR/out and checks the sha256. Both modes start an interpreter and import the agent's
codecs, so the ratio is the child's own cost: a second interpreter, its imports, the limits,
and the parent's re-hash of the output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_all(size_mb: float, codec: str, runs: int) -> int:
    """Prepare, then time each mode as whole processes; 1 if any run failed."""
    me = [sys.executable, "-m", "scripts.bench.confine_cost"]
    with tempfile.TemporaryDirectory(prefix="confine-bench-") as tmp:
        d = Path(tmp)
        subprocess.run([*me, "prepare", str(d), "--size-mb", str(size_mb), "--codec", codec],
                       check=True, capture_output=True, cwd=REPO)
        meta = json.loads((d / "meta.json").read_text())
        times: dict[str, list[float]] = {"inproc": [], "child": []}
        for _ in range(runs):
            for mode in times:  # interleaved, so both see the same machine
                (d / "out").unlink(missing_ok=True)
                t0 = time.perf_counter()
                res = subprocess.run([*me, mode, str(d)], capture_output=True, text=True, cwd=REPO)
                took = time.perf_counter() - t0
                if res.returncode != 0:
                    print(f"{mode} run failed: {res.stderr.strip()[-500:]}", file=sys.stderr)
                    return 1
                times[mode].append(took)
        med = {m: statistics.median(v) for m, v in times.items()}
        print(json.dumps({
            "benchmark": "confine_cost", "codec": codec, "target_bytes": meta["size"],
            "delta_bytes": meta["delta_bytes"], "runs": runs,
            "inproc_median_s": round(med["inproc"], 3), "child_median_s": round(med["child"], 3),
            "child_over_inproc": round(med["child"] / med["inproc"], 2),
            "every_output_sha256_checked": True}))
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "prepare", "inproc", "child"])
    ap.add_argument("dir", type=Path, nargs="?")
    quick = os.environ.get("BENCH_QUICK") == "1"
    ap.add_argument("--size-mb", type=float, default=5.0 if quick else 25.0)
    ap.add_argument("--codec", default="tensor-xor")
    ap.add_argument("--runs", type=int, default=3 if quick else 5)
    args = ap.parse_args()
    if args.mode == "run":
        sys.exit(run_all(args.size_mb, args.codec, args.runs))
    if args.dir is None:
        ap.error(f"{args.mode} needs DIR")
    d: Path = args.dir
    if args.mode == "prepare":
        from deltafleet.server.codecs import default_encoders
        from deltafleet.shared import sha256_file
        from scripts.bench.delta import make_pair

        d.mkdir(parents=True, exist_ok=True)
        base, target = make_pair("finetune", d, size_mb=args.size_mb)
        encoder = next(e for e in default_encoders() if e.name == args.codec)
        encoder.encode(base, target, d / "delta")
        (d / "meta.json").write_text(json.dumps({
            "codec": args.codec, "size": target.stat().st_size, "sha256": sha256_file(target),
            "delta_bytes": (d / "delta").stat().st_size}))
        print((d / "meta.json").read_text())
        return
    from deltafleet import codecs
    from deltafleet.agent import confined
    from deltafleet.agent.codecs import decode_to_file

    meta = json.loads((d / "meta.json").read_text())
    with codecs.FileSource(d / "delta") as src:
        if args.mode == "inproc":
            sha = decode_to_file(meta["codec"], src, d / "base.onnx", d / "out",
                                 target_size=meta["size"], expect_sha256=meta["sha256"])
        else:
            sha = confined.decode_confined(meta["codec"], src, d / "base.onnx", d / "out",
                                           target_size=meta["size"],
                                           expect_sha256=meta["sha256"]).sha256
    if sha != meta["sha256"]:
        sys.exit(f"decoded output {sha[:12]} is not the target {meta['sha256'][:12]}")


if __name__ == "__main__":
    main()
