"""`fleetctl device`: devices as they reported themselves (hello, status, events)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..views import asked_line
from ._common import (
    JSON_HELP,
    WIDE_HELP,
    actor,
    console,
    fmt_age,
    fmt_bytes,
    fmt_time,
    load_config,
    open_store,
    print_json,
    read_store,
)
from .table import Table

app = typer.Typer(no_args_is_help=True, help="Devices in the fleet.")

WideOpt = Annotated[bool, typer.Option("--wide", help=WIDE_HELP)]


def _load(device_id: str | None = None, group: str | None = None) -> list[dict[str, Any]]:
    """Devices as ``--json`` prints them: from the API when FLEET_API_URL is set, else the
    local store."""
    from . import remote  # noqa: PLC0415

    if remote.active():
        api = remote.client()
        if device_id is not None:
            return [api.get(f"/devices/{remote.quote_part(device_id)}")]
        return api.get_all("/devices", {"group": group})
    from .. import reads, views  # noqa: PLC0415

    if device_id is not None:
        with open_store() as store, store.read() as s:
            return [views.device_detail_json(s, device_id)]
    with read_store() as q:  # the SQLite default: no SQLAlchemy import
        devices = reads.devices(q, group)
        desired = reads.desired_for(q, devices)
        return [views.device_to_json(d, desired[d.id]) for d in devices]


def _trial(m: dict[str, Any]) -> str:
    """`` (trial)`` while the device runs the model in a trial (not committed yet)."""
    return " (trial)" if m.get("state") == "trial" else ""


def _runs(d: dict[str, Any]) -> str:
    return ", ".join(f"{m['model']}:{m['version'] or '?'}{_trial(m)}"
                     for m in d["running"]) or "-"


def _asked(d: dict[str, Any], *, wide: bool) -> str:
    """Compact: ``v2 r7 held`` (``detector:v2 r7 held`` when the device has several models);
    wide: the whole sentence with the reason."""
    if wide:
        return "; ".join(asked_line(x) for x in d["desired"]) or "-"
    names = {m["model"] for m in d["running"]} | {x["model"] for x in d["desired"]}
    return ", ".join(("" if len(names) == 1 else f"{x['model']}:")
                     + f"{x['version'] or '?'} r{x['rollout_id']} {x['state']}"
                     for x in d["desired"]) or "-"


def _labels(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(d["labels"].items())) or "-"


@app.command("list")
def list_cmd(
    group: Annotated[
        str | None, typer.Option(help="Only devices the named group's selector matches.")
    ] = None,
    wide: WideOpt = False,
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """List devices: online, what each runs (its own last report) and, apart, what a rollout
    asked of it that it does not run yet (version, rollout id, state; --wide: the reason,
    profile and labels)."""
    rows = _load(group=group)
    if json_:
        print_json(rows)
        return
    if not rows:
        console.print("no devices")
        return
    headers = ["device", "online", "seen", "runs", "asked"]
    if wide:
        headers += ["last seen", "arch", "os", "accelerator", "agent", "labels"]
    table = Table(*headers, wide=wide)
    for d in rows:
        p = d["profile"]
        cells = [d["id"], "yes" if d["online"] else "no", fmt_age(d["last_seen"]), _runs(d),
                 _asked(d, wide=wide)]
        if wide:
            cells += [fmt_time(d["last_seen"]), p["arch"] or "-", p["os"] or "-",
                      p["accelerator"] or "-", d["agent_version"] or "-", _labels(d)]
        table.add_row(*cells)
    console.print(table)


@app.command("show")
def show(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="Device id.")],
    wide: WideOpt = False,
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Show one device: profile, labels, presence, what it runs (from its own last report)
    and, apart, what a rollout asked it to run that it does not run, and why."""
    (d,) = _load(device_id=device_id)
    if json_:
        print_json(d)
        return
    p = d["profile"]
    table = Table("field", title=f"device {d['id']}", show_header=False, wide=wide)
    table.add_column("value", overflow="fold")
    table.add_row("online", "yes" if d["online"] else "no")
    table.add_row("last seen", fmt_time(d["last_seen"]))
    table.add_row("hardware id", d["hardware_id"] or "-")
    table.add_row("agent", d["agent_version"] or "-")
    for key in ("arch", "os", "cpu", "accelerator"):
        table.add_row(key, p[key] or "-")
    table.add_row("memory", fmt_bytes(p["memory_bytes"]))
    table.add_row("disk free", fmt_bytes(p["disk_free_bytes"]))
    table.add_row("runtimes", ", ".join(f"{k} {v}" for k, v in sorted(p["runtimes"].items()))
                  or "-")
    table.add_row("labels", _labels(d))
    console.print(table, "")
    if d["running"]:
        models = Table("model", "version", "variant", "since", "sha256",
                       title="runs (as the device reported)", wide=wide)
        for m in d["running"]:
            models.add_row(m["model"], (m["version"] or "?") + _trial(m), m["variant"] or "-",
                           fmt_time(m["updated_at"]), m["sha256"] if wide else m["sha256"][:12])
        console.print(models)
    else:
        console.print("runs no reported models")
    if d["desired"]:
        asked = Table("model", "version", "rollout", "state", title="asked to run (not running)",
                      wide=wide)
        asked.add_column("why", overflow="fold")
        for x in d["desired"]:
            asked.add_row(x["model"], x["version"] or "?", str(x["rollout_id"]), x["state"], x["why"])
        console.print("", asked)
    _show_portrait(d, wide=wide)


def _show_portrait(d: dict[str, Any], *, wide: bool) -> None:
    """The portrait (what the device can use) and its own benchmarks (docs/portraits.md)."""
    p = d.get("portrait")
    if p is not None:
        doc = p["portrait"]
        table = Table("field", title=f"portrait (type {p['device_type']})", show_header=False,
                      wide=wide)
        table.add_column("value", overflow="fold")
        table.add_row("accelerators", ", ".join(doc.get("accelerators") or []) or "-")
        table.add_row("providers", ", ".join(
            f"{x['name']}{'' if x['ok'] else ' (failed)'}" for x in doc.get("providers") or [])
            or "-")
        table.add_row("delegates", ", ".join(
            f"{x['name']}{'' if x['ok'] else ' (failed)'}" for x in doc.get("delegates") or [])
            or "-")
        mem, disk = doc.get("memory") or {}, doc.get("disk") or {}
        table.add_row("memory available", fmt_bytes(mem.get("available_bytes")))
        table.add_row("disk free", fmt_bytes(disk.get("free_bytes")))
        table.add_row("power sensors", ", ".join(x["name"] for x in doc.get("power") or []) or "-")
        console.print("", table)
    if d.get("benchmarks"):
        bench = Table("variant", "sha256", "runtime", "load", "p50", "p95", "model memory",
                      "energy/inf", title="own benchmarks", wide=wide)
        for b in d["benchmarks"]:
            if b["error"]:
                bench.add_row(b["variant"], b["sha256"][:12], b["runtime"], "-", "-", "-", "-",
                              b["error"][:60])
                continue
            bench.add_row(b["variant"], b["sha256"][:12], f"{b['runtime']} {b['runtime_version']}",
                          f"{b['load_ms']} ms", f"{b['p50_us']} us", f"{b['p95_us']} us",
                          fmt_bytes(b["model_rss_bytes"]),
                          "-" if b["energy_uj"] is None else f"{b['energy_uj']} uJ")
        console.print("", bench)


HISTORY_LIMIT = 100


def history_json(s: Any, device_id: str, limit: int = HISTORY_LIMIT) -> dict[str, Any]:
    """A device's rollout targets, newest first (what it was asked, how it went), and the
    update events it reported lately (kept 7 days), newest first; ``limit`` of each."""
    from sqlalchemy import select  # noqa: PLC0415

    from .. import fleet  # noqa: PLC0415
    from ..store.models import (  # noqa: PLC0415
        DeviceEvent,
        Model,
        ModelVersion,
        Rollout,
        RolloutTarget,
    )

    d = fleet.get_device(s, device_id)
    rows = s.execute(
        select(RolloutTarget, Rollout.state, Model.name, ModelVersion.version)
        .join(Rollout, Rollout.id == RolloutTarget.rollout_id)
        .join(Model, Model.id == Rollout.model_id)
        .join(ModelVersion, ModelVersion.id == Rollout.version_id)
        .where(RolloutTarget.device_id == d.id)
        .order_by(RolloutTarget.rollout_id.desc()).limit(limit)).all()
    events = s.scalars(select(DeviceEvent).where(DeviceEvent.device_id == d.id)
                       .order_by(DeviceEvent.at.desc()).limit(limit)).all()
    return {
        "device": d.id,
        "rollouts": [{"rollout_id": t.rollout_id, "rollout_state": rstate, "model": name,
                      "version": version, "state": t.state, "reason": t.reason,
                      "attempts": t.attempts, "artifact": t.artifact_kind,
                      "bytes_sent": t.bytes_to_send, "previous_version": t.previous_version,
                      "updated_at": t.updated_at.isoformat() if t.updated_at else None}
                     for t, rstate, name, version in rows],
        "events": [{"state": e.state, "at": e.at.isoformat()} for e in events],
    }


@app.command("history")
def history(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="Device id.")],
    limit: Annotated[int, typer.Option(
        min=1, max=500, help="At most this many rollouts, and as many events.")] = HISTORY_LIMIT,
    wide: WideOpt = False,
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """A device's rollouts, newest first (what each asked, the state it reached, attempts,
    bytes, reason) and the update events it reported lately (kept 7 days)."""
    from . import remote  # noqa: PLC0415

    if remote.active():
        out = remote.client().get(f"/devices/{remote.quote_part(device_id)}/history",
                                  {"limit": limit})
    else:
        with open_store() as store, store.read() as s:
            out = history_json(s, device_id, limit)
    if json_:
        print_json(out)
        return
    if out["rollouts"]:
        table = Table("rollout", "model", "version", "state", "attempts", "artifact", "sent",
                      *(["rollout state", "before", "updated"] if wide else []),
                      title=f"device {out['device']}: rollouts", wide=wide)
        table.add_column("reason", overflow="below")  # under its row: 80 columns hold the rest
        for r in out["rollouts"]:
            table.add_row(str(r["rollout_id"]), r["model"], r["version"], r["state"],
                          str(r["attempts"]), r["artifact"] or "-", fmt_bytes(r["bytes_sent"]),
                          *([r["rollout_state"], r["previous_version"] or "-",
                             fmt_time(r["updated_at"])] if wide else []), r["reason"] or "")
        console.print(table)
    else:
        console.print(f"device {out['device']}: in no rollout yet")
    if out["events"]:
        events = Table("at (UTC)", "state", title="update events (7 days)", wide=wide)
        for e in out["events"]:
            events.add_row(fmt_time(e["at"]), e["state"])
        console.print("", events)


@app.command("variants")
def variants(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="Device id.")],
    wide: WideOpt = False,
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Why the device gets the variant it does: per model its newest rollout, the variant it
    was sent, and what the rollout's rule (--variant pin, --prefer selection on its portrait
    and benchmarks, else by format) picks for it now, with why."""
    from . import remote  # noqa: PLC0415

    if remote.active():
        out = remote.client().get(f"/devices/{remote.quote_part(device_id)}/variants")
    else:
        from ..rollouts import device_selection  # noqa: PLC0415

        with open_store() as store, store.read() as s:
            out = device_selection(s, device_id)
    if json_:
        print_json(out)
        return
    if not out["models"]:
        console.print(f"device {out['device']}: in no rollout yet")
        return
    table = Table("model", "version", "rollout", "state", "sent", "picked now",
                  *(["delta or full"] if wide else []),
                  title=f"device {out['device']}: variants", wide=wide)
    table.add_column("why", overflow="below")
    for m in out["models"]:
        table.add_row(m["model"], m["version"], str(m["rollout_id"]), m["state"],
                      m["variant"] or "-", m["chosen_now"] or "none",
                      *([m["delivery"] or "-"] if wide else []), m["why"])
    console.print(table)


@app.command("labels")
def labels(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="Device id.")],
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    wide: WideOpt = False,
) -> None:
    """A device's labels, as it reported them (--wide: long values on one line)."""
    from . import remote  # noqa: PLC0415

    if remote.active():
        out = remote.client().get(f"/devices/{remote.quote_part(device_id)}/labels")
    else:
        (d,) = _load(device_id=device_id)
        out = {"device": d["id"], "labels": d["labels"]}
    if json_:
        print_json(out)
        return
    table = Table("label", "value", title=f"device {out['device']}: labels", wide=wide)
    for k, v in sorted(out["labels"].items()):
        table.add_row(k, v)
    console.print(table if out["labels"] else f"device {out['device']} has no labels")


@app.command("enroll")
def enroll_cmd(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="Device id (certificate CN).")],
    out: Annotated[Path | None, typer.Option(
        help="Bundle directory (default: ./enroll-ID).")] = None,
    broker_url: Annotated[str | None, typer.Option(
        help="mqtts:// URL the device connects to (default: FLEET_MQTT_URL).")] = None,
    install_dir: Annotated[str, typer.Option(
        help="Where the bundle's files will live on the device (for agent.toml).")
    ] = "/etc/deltafleet",
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Issue a client certificate and write an enrollment bundle: client.crt/key, ca.crt,
    root.json (the root of trust to pin), trust.json (current key list) and agent.toml.
    The bundle holds a private key: copy it to the device over a trusted channel, then delete."""
    from . import remote  # noqa: PLC0415

    folder = out or Path(f"enroll-{device_id}")
    if remote.active():
        result = _enroll_remote(remote.client(), device_id, folder, broker_url=broker_url,
                                install_dir=install_dir)
    else:
        from .. import enroll  # noqa: PLC0415
        from ..audit import audit  # noqa: PLC0415

        cfg = load_config()
        made = enroll.enroll_device(cfg, device_id, folder, broker_url=broker_url,
                                    install_dir=install_dir)
        with open_store(cfg) as store, store.session() as s:
            audit(s, actor(), "device.enroll", device_id,
                  {"serial": str(made.serial), "broker_url": made.broker_url})
        result = {"device_id": device_id, "directory": str(made.directory),
                  "serial": str(made.serial), "files": [str(f) for f in made.files]}
    if json_:
        print_json(result)
        return
    console.print(f"enrolled {device_id}: bundle in {result['directory']}")


def _enroll_remote(api: Any, device_id: str, folder: Path, *, broker_url: str | None,
                   install_dir: str) -> dict[str, Any]:
    """``device enroll`` through the API: the server's CA issues the certificate and sends the
    bundle once; it is written here, each file with the mode the local command gives it."""
    from deltafleet.shared import atomic_write_bytes  # noqa: PLC0415

    from ..errors import ConflictError  # noqa: PLC0415
    from .remote import quote_part  # noqa: PLC0415

    if folder.exists() and any(folder.iterdir()):  # before the server issues anything
        raise ConflictError(f"{folder} exists and is not empty")
    made = api.post(f"/devices/{quote_part(device_id)}/enroll",
                    {"broker_url": broker_url, "install_dir": install_dir})
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for f in made["files"]:
        atomic_write_bytes(folder / Path(f["name"]).name, f["content"].encode("utf-8"),
                           mode=int(f["mode"]) & 0o644)
    return {"device_id": device_id, "directory": str(folder), "serial": made["serial"],
            "files": [str(folder / Path(f["name"]).name) for f in made["files"]]}


@app.command("revoke")
def revoke_cmd(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="Device id.")],
    reason: Annotated[str, typer.Option(help="Recorded in the deny list and audit log.")] = "",
) -> None:
    """Deny the device on the server and put its certificates on the CRL. Reload the broker
    (restart Mosquitto) so it reads the new CRL."""
    from . import remote  # noqa: PLC0415

    if remote.active():
        serials = remote.client().post(f"/devices/{remote.quote_part(device_id)}/revoke",
                                       {"reason": reason})["serials"]
    else:
        from .. import enroll  # noqa: PLC0415
        from ..audit import audit  # noqa: PLC0415

        cfg = load_config()
        serials = [str(x) for x in enroll.revoke_device(cfg, device_id, reason=reason)]
        with open_store(cfg) as store, store.session() as s:
            audit(s, actor(), "device.revoke", device_id, {"serials": serials, "reason": reason})
    console.print(f"revoked {device_id}: {len(serials)} certificate(s) on the CRL; "
                  "reload the broker to apply it")
