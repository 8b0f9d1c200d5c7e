"""`fleetctl model`: register model versions and variants, list and show them.

A registered file is also stored zstd-compressed (verified to decompress to the model) when
that is smaller: full installs ship the compressed form, and `list` / `show` print its size.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from . import remote
from ._common import (
    JSON_HELP,
    WIDE_HELP,
    actor,
    blob_store,
    console,
    err_console,
    fmt_bytes,
    fmt_shape,
    fmt_time,
    load_config,
    open_store,
    print_json,
)
from .table import Table

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.orm import Session

    from ..optimize import OptimizeOptions
    from ..store import BlobStore, Store

app = typer.Typer(no_args_is_help=True, help="Model versions and their variants.")


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Model name (lowercase, e.g. 'detector').")],
    version: Annotated[str, typer.Argument(help="Version label, e.g. 'v2' or '1.4.0'.")],
    file: Annotated[Path, typer.Argument(help="ONNX, TFLite or PyTorch Mobile (.ptl) model file.")],
    variant: Annotated[
        str, typer.Option(help="Variant name, for another file of the same version "
                          "(e.g. 'tflite-int8').")
    ] = "default",
    precision: Annotated[str, typer.Option(help="Numeric precision: fp32, fp16 or int8.")] = "fp32",
    golden: Annotated[
        list[Path] | None, typer.Option(
            "--golden", help="Golden inputs: an .npz with one array per model input (repeat for "
            "more samples, up to 8; 256 KiB in all). Devices warm the model up on them before "
            "the swap, refuse it if they give an error or non-finite output, and probe with "
            "them during the trial when there is no live traffic.")
    ] = None,
    accelerator: Annotated[str | None, typer.Option(
        help="An execution provider or delegate this variant needs (cuda, npu, ...): "
             "selection (--prefer) gives it only to devices that report it.")] = None,
    min_runtime_version: Annotated[str | None, typer.Option(
        help="The oldest runtime version that loads this variant (e.g. 1.18): older "
             "devices are not given it under --prefer.")] = None,
) -> None:
    """Inspect FILE and register it as VERSION of model NAME (all or nothing); also store its
    zstd-compressed form, which full installs ship, when that is smaller. Manifests carry the
    model's IO signature, which devices check the loaded model against."""
    if remote.active():
        _add_remote(name, version, file, variant=variant, precision=precision,
                    golden=golden or [], accelerator=accelerator,
                    min_runtime_version=min_runtime_version)
        return
    from .. import catalog  # noqa: PLC0415
    from ..audit import audit  # noqa: PLC0415
    from ._reporting import ReportingBlobs  # noqa: PLC0415
    from .progress import Steps  # noqa: PLC0415

    cfg = load_config()
    blobs = blob_store(cfg)
    with open_store(cfg) as store:
        new_blobs: set[str] = set()
        try:
            with (
                Steps(f"model add {name}:{version}", enabled=_shows_progress(file)) as steps,
                store.session() as s,
            ):
                steps.start(f"inspecting {file.name}", silent=True)
                new_blobs = s.info.setdefault(catalog.NEW_BLOBS_KEY, set())
                row = catalog.add_model_version(s, ReportingBlobs(blobs, steps), name, version,
                                                 file, variant=variant, precision=precision,
                                                 golden=golden or [], accelerator=accelerator,
                                                 min_runtime_version=min_runtime_version)
                compressed = catalog.compressed_artifact(row.info)
                audit(s, actor(), "model.add", f"{name}:{version}", {
                    "variant": variant, "precision": precision, "format": row.format,
                    "sha256": row.artifact_sha256, "file": str(file),
                    "compressed_sha256": compressed.sha256 if compressed else None,
                    "golden_inputs": len((row.info or {}).get("golden", [])),
                })
                steps.done(f"{compressed.codec} form already stored" if compressed
                           else "compression does not make it smaller")
        except BaseException:
            _forget_unreferenced(store, blobs, new_blobs)
            raise
    steps.note("done")
    _print_added(name, version, variant, precision, row.format, (row.info or {}).get("size_bytes"),
                 row.artifact_sha256,
                 {"codec": compressed.codec, "size_bytes": compressed.size_bytes}
                 if compressed else None)


def _print_added(name: str, version: str, variant: str, precision: str, fmt: str,
                 size: int | None, sha256: str, compressed: dict[str, Any] | None) -> None:
    console.print(
        f"added {name}:{version} variant {variant} ({fmt}, {precision}, "
        f"{fmt_bytes(size)}, sha256 {sha256[:16]}); full installs ship "
        + (f"{compressed['codec']} {fmt_bytes(compressed['size_bytes'])}" if compressed
           else "the file as it is (compression does not make it smaller)")
    )


def _add_remote(name: str, version: str, file: Path, *, variant: str, precision: str,
                golden: list[Path], accelerator: str | None = None,
                min_runtime_version: str | None = None) -> None:
    """``model add`` through the API: the file (and golden inputs) uploaded, registered there."""
    from .progress import Steps  # noqa: PLC0415

    fields = {"version": version, "variant": variant, "precision": precision,
              **({"accelerator": accelerator} if accelerator else {}),
              **({"min_runtime_version": min_runtime_version} if min_runtime_version else {})}
    files = [("file", file), *(("golden", g) for g in golden)]
    size = file.stat().st_size if file.is_file() else None
    with Steps(f"model add {name}:{version}", enabled=_shows_progress(file)) as steps:
        steps.start(f"uploading {file.name}", size)
        out = remote.client().upload(f"/models/{remote.quote_part(name)}/versions", fields,
                                     files, on_bytes=steps.advance)
        steps.done(f"uploaded {fmt_bytes(size)}; registered on the server")
    steps.note("done")
    (x,) = [x for x in out["variants"] if x["name"] == variant]
    _print_added(name, version, variant, x["precision"], x["format"], x["size_bytes"],
                 x["sha256"], x["compressed"])


LARGE_MODEL_BYTES = 2 << 20  # `model add` shows its steps piped from this size on


def _shows_progress(file: Path) -> bool:
    """A bar on a terminal always; piped lines for a large model only."""
    try:
        return sys.stderr.isatty() or file.stat().st_size >= LARGE_MODEL_BYTES
    except (OSError, ValueError):
        return False


def _forget_unreferenced(store: Store, blobs: BlobStore, shas: set[str]) -> None:
    """Remove blobs a failed add wrote first, unless a committed artifact row uses them."""
    from ..store.models import Artifact  # noqa: PLC0415

    for sha in shas:
        with contextlib.suppress(Exception), store.session() as s:
            if s.get(Artifact, sha) is None:
                blobs.delete(sha)


@contextlib.contextmanager
def recording_new_blobs(store: Store, blobs: BlobStore) -> Iterator[Session]:
    """A write session whose newly stored blobs are removed again when it fails (unless a
    committed artifact row uses them): all or nothing, blobs included."""
    from .. import catalog  # noqa: PLC0415

    new_blobs: set[str] = set()
    try:
        with store.session() as s:
            new_blobs = s.info.setdefault(catalog.NEW_BLOBS_KEY, set())
            yield s
    except BaseException:
        _forget_unreferenced(store, blobs, new_blobs)
        raise


def compress_registered(store: Store, blobs: BlobStore, name: str | None,
                        who: str) -> list[dict[str, Any]]:
    """`model compress` (and ``POST /models/compress``): the compressed form of every variant
    (of ``name``, or all) that has none; one row per variant looked at. Audited as ``who``."""
    from .. import catalog  # noqa: PLC0415
    from ..audit import audit  # noqa: PLC0415

    with recording_new_blobs(store, blobs) as s:
        if name is not None:
            catalog.get_model(s, name)  # NotFoundError for an unknown model
        rows = [{"variant_id": v.id, "sha256": v.artifact_sha256,
                 "size_bytes": (v.info or {}).get("size_bytes"), "compressed": form}
                for v, form in catalog.backfill_compressed(s, blobs, name)]
        if rows:
            audit(s, who, "model.compress", name or "*", {
                "variants": [r["variant_id"] for r in rows],
                "compressed": sum(1 for r in rows if r["compressed"] is not None)})
    return rows


@app.command("compress")
def compress(
    name: Annotated[str | None, typer.Argument(help="Only this model (default: all).")] = None,
) -> None:
    """Store the zstd-compressed form of models registered before full installs shipped
    compressed (idempotent: variants that have one are left alone)."""
    with err_console.status("compressing"):
        if remote.active():
            rows = remote.client().post("/models/compress", {"model": name})
        else:
            cfg = load_config()
            with open_store(cfg) as store:
                rows = compress_registered(store, blob_store(cfg), name, actor())
    if not rows:
        console.print("every variant already has its compressed form")
    for r in rows:
        form = r["compressed"]
        console.print(f"variant {r['variant_id']} ({r['sha256'][:16]}, "
                      f"{fmt_bytes(r['size_bytes'])}): " + (
                          f"full installs now ship {form['codec']} {fmt_bytes(form['size_bytes'])}"
                          if form else "compression does not make it smaller; it ships as it is"))


@app.command("list")
def list_cmd(
    wide: Annotated[bool, typer.Option("--wide", help=WIDE_HELP)] = False,
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """List models with their versions and variants."""
    if remote.active():
        models = remote.client().get("/models")
    else:
        from .. import catalog, views  # noqa: PLC0415

        with open_store() as store, store.read() as s:
            models = [views.model_to_json(m, detail=False) for m in catalog.list_models(s)]
    if json_:
        print_json(models)
        return
    headers = ["model", "version", "variant", "format", "precision", "size", "sha256"]
    table = Table(*headers, *(["zstd", "added"] if wide else []), wide=wide)
    for m in models:
        for v in m["versions"]:
            for x in v["variants"]:
                cells = [m["name"], v["version"], x["name"], x["format"], x["precision"],
                         fmt_bytes(x["size_bytes"]), x["sha256"] if wide else x["sha256"][:12]]
                if wide:
                    cells += [fmt_bytes(x["compressed"]["size_bytes"]) if x["compressed"]
                              else "-", fmt_time(x["created_at"])]
                table.add_row(*cells)
    console.print(table if models else "no models; add one with `fleetctl model add`")


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Model name.")],
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    wide: Annotated[bool, typer.Option("--wide", help=WIDE_HELP)] = False,
) -> None:
    """Show one model: versions, variants, format, precision, sha256, size, what a full
    install ships (the zstd-compressed file when smaller) and IO signature (--wide: long
    values on one line, not folded)."""
    if remote.active():
        model = remote.client().get(f"/models/{remote.quote_part(name)}")
    else:
        from .. import catalog, views  # noqa: PLC0415

        with open_store() as store, store.read() as s:
            model = views.model_to_json(catalog.get_model(s, name))
    if json_:
        print_json(model)
        return
    console.print(f"[bold]{model['name']}[/bold]  (latest {model['latest'] or '-'})")
    for v in model["versions"]:
        console.print(f"\n[bold]{model['name']}:{v['version']}[/bold]  added "
                      f"{fmt_time(v['created_at'])}")
        for x in v["variants"]:
            table = Table("field", title=f"variant {x['name']}", show_header=False, wide=wide)
            table.add_column("value", overflow="fold")
            info = x["info"]
            table.add_row("format", x["format"])
            table.add_row("precision", x["precision"])
            table.add_row("size", fmt_bytes(x["size_bytes"]))
            table.add_row("sha256", x["sha256"])
            compressed = x["compressed"]
            if compressed:
                pct = (f" ({100 * compressed['size_bytes'] / x['size_bytes']:.0f}% of the file)"
                       if x["size_bytes"] else "")
                table.add_row("full install",
                              f"{compressed['codec']}, {fmt_bytes(compressed['size_bytes'])}{pct}")
                table.add_row(f"{compressed['codec']} sha256", compressed["sha256"])
            else:
                table.add_row("full install", "the file as it is (identity)")
            table.add_row("params", str(info.get("param_count", "-")))
            if info.get("accelerator") or info.get("min_runtime_version"):
                table.add_row("needs", ", ".join(x for x in (
                    info.get("accelerator"),
                    info.get("min_runtime_version") and
                    f"runtime >= {info['min_runtime_version']}") if x))
            if info.get("opset"):
                table.add_row("opset", ", ".join(f"{k} {n}" for k, n in info["opset"].items()))
            for t in x["inputs"]:
                table.add_row("input", f"{t['name']} {t['dtype']} {fmt_shape(t['shape'])}")
            for t in x["outputs"]:
                table.add_row("output", f"{t['name']} {t['dtype']} {fmt_shape(t['shape'])}")
            table.add_row("IO signed", "yes" if x["io_signature"] else
                          "no (an IO type devices name differently)")
            table.add_row("golden inputs", str(x["golden_inputs"]) if x["golden_inputs"] else
                          "none (warm-up and probes use zeros)")
            console.print(table)


# ------------------------------------------------------------------ inspect / optimize


@app.command("inspect")
def inspect_cmd(
    target: Annotated[str, typer.Argument(
        help="A model file (ONNX or TFLite), or NAME:VERSION of a registered version.")],
    variant: Annotated[str | None, typer.Option(
        help="The variant of NAME:VERSION to inspect (default: 'default', or the only one).")
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """What a model is, read without running it: inputs and outputs, opset and operators
    (and which runtimes at which versions load it), parameters, size, precision and
    quantization scheme, estimated inference memory. A registered variant made by `model
    optimize` also shows its measured figures. Exit 2 for a file that is not a valid model."""
    from ..errors import UsageError  # noqa: PLC0415

    path = Path(target)
    if path.is_file():
        if variant is not None:
            raise UsageError("--variant is for NAME:VERSION, not a file")
        from ..catalog.inspect import inspect_model  # noqa: PLC0415

        info = inspect_model(path).to_json()
        where = str(path)
    elif ":" in target and remote.active():
        name, _, version = target.partition(":")
        if not name or not version:  # catalog.resolve_version's line: no path to ask
            raise UsageError(f"invalid version {target!r}: use NAME:VERSION")
        info = remote.client().get(
            f"/models/{remote.quote_part(name)}/versions/{remote.quote_part(version)}/inspect",
            {"variant": variant})
        where = f"{target} variant {info['variant']}"
    elif ":" in target:
        cfg = load_config()
        with open_store(cfg) as store:
            info = inspect_registered(store, blob_store(cfg), target, variant)
        where = f"{target} variant {info['variant']}"
    else:
        raise UsageError(f"no such file: {target} (or give NAME:VERSION)")
    if json_:
        print_json(info)
        return
    _print_inspect(where, info)


def inspect_registered(store: Store, blobs: BlobStore, target: str,
                       variant: str | None) -> dict[str, Any]:
    """`model inspect NAME:VERSION --json` (and ``GET .../versions/{v}/inspect``): what the
    variant's file is, plus its lineage and measured figures when `model optimize` made it."""
    from .. import catalog  # noqa: PLC0415
    from ..catalog.inspect import inspect_model  # noqa: PLC0415
    from ..errors import CatalogError, UsageError  # noqa: PLC0415

    with store.read() as s:
        mv = catalog.resolve_version(s, target)
        by_name = {v.name: v for v in mv.variants}
        name = variant or ("default" if "default" in by_name or len(by_name) != 1
                           else next(iter(by_name)))
        row = by_name.get(name)
        if row is None:
            raise UsageError(f"{target} has no variant {name!r} "
                             f"(it has {', '.join(sorted(by_name)) or 'none'})")
        sha = row.artifact_sha256
        extra: dict[str, Any] = {k: row.info[k] for k in ("parent", "optimize")
                                 if k in (row.info or {})}
    blob = blobs.path(sha)
    if not blob.is_file():
        raise CatalogError(f"the model file of {target} {name} ({sha[:12]}) is missing "
                           "from the blob store")
    info = inspect_model(blob).to_json()
    info["variant"] = name
    info.update(extra)
    return info


def _print_inspect(where: str, info: dict) -> None:  # type: ignore[type-arg]
    table = Table("field", title=where, show_header=False)
    table.add_column("value", overflow="fold")
    table.add_row("format", info["format"])
    table.add_row("size", f"{fmt_bytes(info['size_bytes'])} ({info['size_bytes']} bytes)")
    table.add_row("sha256", info["sha256"])
    for t in info["inputs"]:
        table.add_row("input", f"{t['name']} {t['dtype']} {fmt_shape(t['shape'])}")
    for t in info["outputs"]:
        table.add_row("output", f"{t['name']} {t['dtype']} {fmt_shape(t['shape'])}")
    table.add_row("params", f"{info['param_count']:,}")
    q = info.get("quantization") or {}
    scheme = q.get("scheme", "none")
    detail = ", ".join(f"{k} {v}" for k, v in q.items() if k != "scheme" and v is not None)
    table.add_row("precision", f"{info.get('precision', '-')}; quantization {scheme}"
                  + (f" ({detail})" if detail else ""))
    if info.get("opset"):
        table.add_row("opset", ", ".join(f"{k} {n}" for k, n in info["opset"].items())
                      + f"; IR {info['ir_version']}")
    if info.get("op_versions"):
        table.add_row("ops", ", ".join(f"{k} v{n}" for k, n in info["op_versions"].items()))
    else:
        table.add_row("ops", ", ".join(info["ops"]))
    for r in info.get("runtimes", []):
        table.add_row("loads in", f"{r['runtime']} >= {r['min_version']} ({r['why']})"
                      if r["min_version"] else f"{r['runtime']}: {r['why']}")
    mem = info.get("memory") or {}
    if mem:
        table.add_row("memory", f"~{fmt_bytes(mem['estimate_bytes'])} = weights "
                      f"{fmt_bytes(mem['weights_bytes'])} + largest op working set "
                      f"{fmt_bytes(mem['largest_op_working_set_bytes'])} ({mem['largest_op']}); "
                      "batch 1, a floor")
    if info.get("parent"):
        table.add_row("made from", f"variant {info['parent']['variant']} "
                      f"({info['parent']['sha256'][:12]})")
    for label, value in _figure_rows(info.get("optimize")):
        table.add_row(label, value)
    console.print(table)


def _figure_rows(fig: dict | None) -> list[tuple[str, str]]:  # type: ignore[type-arg]
    if not fig:
        return []
    rows = [("size vs parent", f"{fig['size_ratio']:.3f}x ({fmt_bytes(fig['size_bytes'])} vs "
             f"{fmt_bytes(fig['parent_size_bytes'])})"),
            ("zstd vs parent", f"{fig['compressed_ratio']:.3f}x "
             f"({fmt_bytes(fig['compressed_bytes'])} vs {fmt_bytes(fig['parent_compressed_bytes'])})")]
    lat = fig["latency_ms"]
    if lat.get("ratio") is not None:
        rows.append(("latency vs parent", f"{lat['ratio']:.2f}x ({lat['variant']:.4g} vs "
                     f"{lat['parent']:.4g} ms/sample, {lat['threads']} thread, "
                     f"{lat['inputs']} inputs)"))
    dev = fig["deviation"]
    rows.append(("output deviation", f"max {dev['max_abs']:.4g}, mean {dev['mean_abs']:.4g}"
                 + (f", top-1 agreement {dev['top1_agreement']:.1%}" if "top1_agreement" in dev
                    else "")))
    acc = fig.get("accuracy")
    if acc:
        rows.append(("accuracy", f"{acc['variant']:.2%} vs parent {acc['parent']:.2%} "
                     f"(drop {acc['drop_points']:.2f} points, {acc['samples']} samples)"))
    rows.append(("made in", f"{fig['optimize_seconds']:.1f} s on {fig['measured_on']['host']}"))
    return rows


@app.command("optimize")
def optimize_cmd(
    spec: Annotated[str, typer.Argument(help="NAME:VERSION whose variant to optimize.")],
    int8: Annotated[bool, typer.Option("--int8", help="INT8: ONNX dynamic (static QDQ with "
                                       "--calibration); TFLite full-integer.")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 (ONNX).")] = False,
    prune: Annotated[str | None, typer.Option(
        help="Magnitude-prune this share of each weight tensor, e.g. 50% (ONNX).")] = None,
    prune_mode: Annotated[str, typer.Option(
        help="unstructured (single weights) or structured (whole output channels).")
    ] = "unstructured",
    variant: Annotated[str | None, typer.Option(
        help="The parent variant (default: 'default', or the only one).")] = None,
    name: Annotated[str | None, typer.Option(
        help="Name of the new variant (default: parent + recipe, e.g. 'int8-pruned50').")
    ] = None,
    calibration: Annotated[Path | None, typer.Option(
        help=".npz, one array per model input (first axis: samples): INT8 static "
             "calibration; latency and deviation are measured on it.")] = None,
    eval_: Annotated[Path | None, typer.Option(
        "--eval", help=".npz with the model inputs and 'labels': accuracy of parent and "
                       "variant is recorded, and gated.")] = None,
    max_accuracy_drop: Annotated[float, typer.Option(
        help="Refuse (exit 1, nothing registered) a variant losing more accuracy points "
             "than this on --eval.")] = 1.0,
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Make INT8 / FP16 / pruned variants of a registered version, measure each against its
    parent on this machine (size, zstd size, latency, output deviation, accuracy with
    --eval) and register it beside the parent. Needs deltafleet-server[optimize]."""
    check_optimize_inputs(calibration, eval_, max_accuracy_drop)
    with err_console.status(f"optimizing {spec}"):
        if remote.active():
            fields = {"version": spec, "int8": str(int8).lower(), "fp16": str(fp16).lower(),
                      "prune_mode": prune_mode, "max_accuracy_drop": repr(max_accuracy_drop),
                      **{k: v for k, v in (("prune", prune), ("variant", variant),
                                           ("name", name)) if v is not None}}
            files = [(k, f) for k, f in (("calibration", calibration), ("eval", eval_))
                     if f is not None]
            out = remote.client().upload("/models/optimize", fields, files)
        else:
            opts = optimize_options(int8, fp16, prune, prune_mode, variant=variant, name=name,
                                    calibration=calibration, eval_=eval_,
                                    max_accuracy_drop=max_accuracy_drop)
            cfg = load_config()
            with open_store(cfg) as store:
                out = optimize_registered(store, blob_store(cfg), spec, opts, actor())
    if json_:
        print_json(out)
        return
    for o in out:
        fig = o["optimize"]
        table = Table("field", title=f"added {spec} variant {o['variant']} ({o['format']}, "
                      f"{o['precision']}) from {o['parent']['variant']}", show_header=False)
        table.add_column("value", overflow="fold")
        for label, value in _figure_rows(fig):
            table.add_row(label, value)
        console.print(table)


def check_optimize_inputs(calibration: Path | None, eval_: Path | None,
                          max_accuracy_drop: float) -> None:
    from ..errors import UsageError  # noqa: PLC0415

    for f, what in ((calibration, "--calibration"), (eval_, "--eval")):
        if f is not None and not f.is_file():
            raise UsageError(f"{what}: no such file: {f}")
    if not max_accuracy_drop >= 0:  # NaN too
        raise UsageError("--max-accuracy-drop must be >= 0")


def optimize_options(int8: bool, fp16: bool, prune: str | None, prune_mode: str, *,
                     variant: str | None, name: str | None, calibration: Path | None,
                     eval_: Path | None, max_accuracy_drop: float) -> OptimizeOptions:
    from .. import optimize  # noqa: PLC0415

    return optimize.OptimizeOptions(
        optimize.recipes(int8, fp16, optimize.parse_prune(prune), prune_mode),
        parent_variant=variant, name=name, calibration=calibration, eval=eval_,
        max_accuracy_drop_points=max_accuracy_drop)


def optimize_registered(store: Store, blobs: BlobStore, spec: str, opts: OptimizeOptions,
                        who: str) -> list[dict[str, Any]]:
    """`model optimize` (and ``POST /models/optimize``): make, measure and register the
    variants (all or nothing); what ``--json`` prints. Audited as ``who``."""
    from .. import optimize  # noqa: PLC0415
    from ..audit import audit  # noqa: PLC0415

    with recording_new_blobs(store, blobs) as s:
        rows = optimize.optimize_version(s, blobs, spec, opts)
        out = [{"variant": r.name, "format": r.format, "precision": r.precision,
                "sha256": r.artifact_sha256, "parent": r.info["parent"],
                "optimize": r.info["optimize"]} for r in rows]
        audit(s, who, "model.optimize", spec, {
            "variants": [{"name": o["variant"], "sha256": o["sha256"]} for o in out],
            "parent": out[0]["parent"]["variant"] if out else None})
    return out
