"""What the contained decoder costs on the common path: one real delta decoded in-process
(``codecs.decode_to_file``) or in the agent's child (``confined.decode_confined``).

    .venv/bin/python scripts/bench/confine_cost.py prepare DIR [--size-mb 25] [--codec tensor-xor]
    farm-bench --vs '.venv/bin/python scripts/bench/confine_cost.py inproc DIR' \\
        -- .venv/bin/python scripts/bench/confine_cost.py child DIR

``prepare`` writes base.onnx, target.onnx and the delta (a fine-tune) once; each run decodes it
to DIR/out and checks the sha256. Both modes start an interpreter and import the agent's
codecs, so the ratio is the child's own cost: a second interpreter, its imports, the limits,
and the parent's re-hash of the output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["prepare", "inproc", "child"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--size-mb", type=float, default=25.0)
    ap.add_argument("--codec", default="tensor-xor")
    args = ap.parse_args()
    d: Path = args.dir
    if args.mode == "prepare":
        from bench.delta import make_pair

        from deltafleet.server.codecs import default_encoders
        from deltafleet.shared import sha256_file

        d.mkdir(parents=True, exist_ok=True)
        base, target = make_pair("finetune", d, size_mb=args.size_mb)
        encoder = next(e for e in default_encoders() if e.name == args.codec)
        encoder.encode(base, target, d / "delta")
        (d / "meta.json").write_text(json.dumps({
            "codec": args.codec, "size": target.stat().st_size, "sha256": sha256_file(target),
            "delta_bytes": (d / "delta").stat().st_size}))
        print((d / "meta.json").read_text())
        return
    from deltafleet.agent import codecs, confined

    meta = json.loads((d / "meta.json").read_text())
    with codecs.FileSource(d / "delta") as src:
        if args.mode == "inproc":
            sha = codecs.decode_to_file(meta["codec"], src, d / "base.onnx", d / "out",
                                        target_size=meta["size"], expect_sha256=meta["sha256"])
        else:
            sha = confined.decode_confined(meta["codec"], src, d / "base.onnx", d / "out",
                                           target_size=meta["size"],
                                           expect_sha256=meta["sha256"]).sha256
    assert sha == meta["sha256"]


if __name__ == "__main__":
    main()
