"""`fleetctl profile`: the baseline library (benchmarks per device type) and bench requests.

    fleetctl profile list [--json]            device types: devices, portraits, variants measured
    fleetctl profile show TYPE [--json]       per variant: median and spread over the type
                                              (``auto``: figures an automatic request asked for)
    fleetctl profile bench MODEL:VERSION (--device ID ... | --group NAME) [--runs N]
                                              ask devices to benchmark the version's variants
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from ._common import JSON_HELP, WIDE_HELP, actor, console, fmt_bytes, open_store, print_json
from .table import Table

app = typer.Typer(no_args_is_help=True, help="Device types and their benchmark baselines.")


def _types(s: Any) -> list[dict[str, Any]]:
    from sqlalchemy import func, select  # noqa: PLC0415

    from ..fleet.portraits import baselines  # noqa: PLC0415
    from ..store.models import DeviceBenchmark, DevicePortrait  # noqa: PLC0415

    portraits = dict(s.execute(select(DevicePortrait.device_type, func.count())
                               .group_by(DevicePortrait.device_type)).all())
    measured = dict(s.execute(select(DeviceBenchmark.device_type,
                                     func.count(func.distinct(DeviceBenchmark.device_id)))
                              .group_by(DeviceBenchmark.device_type)).all())
    variants: dict[str, set[str]] = {}
    auto: dict[str, set[str]] = {}
    for b in baselines(s):
        variants.setdefault(b.device_type, set()).add(b.variant)
        if b.auto:
            auto.setdefault(b.device_type, set()).add(b.variant)
    return [{"device_type": t, "devices": portraits.get(t, 0),
             "devices_measured": measured.get(t, 0),
             "variants_measured": sorted(variants.get(t, ())),
             "variants_auto": sorted(auto.get(t, ()))}
            for t in sorted(set(portraits) | set(measured))]


@app.command("list")
def list_cmd(json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
             wide: Annotated[bool, typer.Option("--wide", help=WIDE_HELP)] = False) -> None:
    """Device types (a device's ``device-type`` label, else arch/cpu/memory class), how many
    devices sent a portrait, how many benchmarked, and which variants have a baseline
    ("(auto)": measured on an automatic request)."""
    with open_store() as store, store.read() as s:
        rows = _types(s)
    if json_:
        print_json(rows)
        return
    if not rows:
        console.print("no device portraits yet")
        return
    table = Table("device type", "devices", "measured", "variants measured", wide=wide)
    for r in rows:
        shown = [f"{v} (auto)" if v in r["variants_auto"] else v for v in r["variants_measured"]]
        table.add_row(r["device_type"], str(r["devices"]), str(r["devices_measured"]),
                      ", ".join(shown) or "-")
    console.print(table)


def _median(b: dict[str, Any], key: str) -> str:
    m = b["median"].get(key)
    return "-" if m is None else str(m)


def _range(b: dict[str, Any], key: str) -> str:
    lo_hi = b["spread"].get(key)
    return "-" if not lo_hi else f"{lo_hi[0]}-{lo_hi[1]}"


@app.command("show")
def show(
    device_type: Annotated[str, typer.Argument(metavar="TYPE", help="A device type.")],
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    wide: Annotated[bool, typer.Option("--wide", help=WIDE_HELP)] = False,
) -> None:
    """One device type's baselines: per variant the median over its devices of load time,
    p50/p95 latency, model memory and energy per inference, with the spread (min-max);
    ``auto``: how many of the devices measured it on an automatic request."""
    from ..errors import NotFoundError  # noqa: PLC0415
    from ..fleet.portraits import baselines  # noqa: PLC0415

    with open_store() as store, store.read() as s:
        known = {r["device_type"] for r in _types(s)}
        if device_type not in known:
            raise NotFoundError(f"no device type {device_type!r} (see `fleetctl profile list`)")
        rows = [b.to_json() for b in baselines(s, device_type)]
    if json_:
        print_json({"device_type": device_type, "baselines": rows})
        return
    if not rows:
        console.print(f"{device_type}: no benchmarks yet (`fleetctl profile bench`, or the "
                      "server's automatic requests)")
        return
    table = Table("variant", "sha256", "devices", "auto", "load ms", "p50 us", "p50 min-max",
                  "p95 us", "memory", "uJ/inf", title=f"baselines of {device_type} (medians)",
                  wide=wide)
    for b in rows:
        mem = b["median"].get("model_rss_bytes")
        table.add_row(b["variant"], b["sha256"] if wide else b["sha256"][:12],
                      str(b["devices"]), str(b["auto"]),
                      _median(b, "load_ms"),
                      _median(b, "p50_us"), _range(b, "p50_us"), _median(b, "p95_us"),
                      fmt_bytes(mem), _median(b, "energy_uj"))
    console.print(table)


@app.command("bench")
def bench(
    spec: Annotated[str, typer.Argument(metavar="MODEL:VERSION", help="The version whose "
                                        "variants to benchmark.")],
    device: Annotated[list[str] | None, typer.Option(
        "--device", help="A device id (repeatable).")] = None,
    group: Annotated[str | None, typer.Option(help="Every device of the group.")] = None,
    runs: Annotated[int, typer.Option(help="Timed inferences per variant.")] = 50,
    warmup: Annotated[int, typer.Option(help="Untimed inferences first.")] = 5,
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Ask devices to benchmark every variant of a version at low priority, off their request
    path; the running server signs and publishes the requests and serves the files. Results:
    `fleetctl device show ID`, `fleetctl profile show TYPE`."""
    from .. import bench_requests, catalog, fleet  # noqa: PLC0415
    from ..audit import audit  # noqa: PLC0415
    from ..errors import UsageError  # noqa: PLC0415

    if bool(device) == bool(group):
        raise UsageError("name the devices: --device ID (repeatable) or --group NAME")
    with open_store() as store, store.session() as s:
        version = catalog.resolve_version(s, spec)
        options = catalog.variant_options(s, version.id)
        ids = list(device or []) or [d.id for d in fleet.devices_in_group(s, group or "")]
        if not ids:
            raise UsageError(f"group {group!r} matches no devices")
        rids = bench_requests.request_benchmarks(s, ids, options, runs=runs, warmup=warmup,
                                                 now=datetime.now(UTC))
        audit(s, actor(), "profile.bench", spec, {"devices": len(ids), "runs": runs})
    if json_:
        print_json({"requests": dict(zip(ids, rids, strict=True)),
                    "variants": [o.name for o in options]})
        return
    console.print(f"asked {len(ids)} device(s) to benchmark {len(options)} variant(s) of "
                  f"{spec}; the server publishes the requests")
