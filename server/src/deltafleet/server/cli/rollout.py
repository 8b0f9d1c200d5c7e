"""`fleetctl rollout ...`: plan, start, watch, pause, resume, abort and roll back rollouts.

Exit codes: 0 ok (with --wait: the rollout completed); 1 the rollout paused, aborted, rolled
back or --wait timed out; 2 bad input (unknown group or version, invalid option, an action the
rollout's state does not allow, a running rollout of the model already covering some of the
group's devices without --supersede, a --variant some device of the group cannot load).
"""

from __future__ import annotations

import sys
import textwrap
import time
from typing import Annotated, Any

import typer

from ..policy import HEALTH_OPTION_DEFAULTS, RolloutPolicy, parse_duration
from ..rollout.states import FINAL_ROLLOUT_STATES, WAIT_ENDS
from . import remote
from ._common import (
    WIDE_HELP,
    actor,
    blob_store,
    console,
    fmt_bytes,
    load_config,
    open_store,
    print_json,
    read_store,
)
from .table import Table, terminal_width

PER_DEVICE_ROWS = 100  # rollout plan --prefer: a larger group prints its per-type summary only

app = typer.Typer(no_args_is_help=True, help="Roll model versions out to device groups.")

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
VariantOpt = Annotated[str | None, typer.Option(
    "--variant", help="pin this variant: every device gets it (a device that cannot load it "
    "is refused by `rollout model`, listed by `rollout plan`)")]
WideOpt = Annotated[bool, typer.Option("--wide", help=WIDE_HELP)]
IdArg = Annotated[int, typer.Argument(help="rollout id (see `fleetctl rollout list`)")]


def _render(data: dict[str, Any], *, wide: bool = False) -> list[str]:
    """The status view as lines, fitted to the terminal (``wide``: nothing cut)."""
    head = (f"rollout {data['id']}: {data['model']} {data['version']} -> group {data['group']}"
            f"  {data['state']}  wave {data['current_wave'] + 1}"
            + (f"  ({data['state_reason']})" if data.get("state_reason") else ""))
    by_wave: dict[int, dict[str, int]] = {}
    for t in data["targets"]:
        counts = by_wave.setdefault(t["wave"], {})
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    waves = Table("wave", "devices", "states", title="by wave", wide=wide)
    for w in sorted(by_wave):
        c = by_wave[w]
        waves.add_row(str(w + 1), str(sum(c.values())),
                      ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    devices = Table("device", "wave", "state", "artifact", "sent", "full",
                    *(["variant", "running"] if wide else []), wide=wide)
    devices.add_column("reason", overflow="below")
    for t in data["targets"]:
        devices.add_row(t["device"], str(t["wave"] + 1), t["state"], t["artifact"] or "-",
                        fmt_bytes(t["bytes_sent"]), fmt_bytes(t["full_bytes"]),
                        *([t["variant"] or "-", t["running_sha256"] or "-"] if wide else []),
                        _note(t))
    width = None if wide else terminal_width()
    parts: list[str] = [*_wrap(head, width), *waves.lines(width), *devices.lines(width)]
    if data["full_bytes"]:
        pct = 100 * data["bytes_sent"] / data["full_bytes"]
        parts.append(f"bytes sent {fmt_bytes(data['bytes_sent'])} of "
                     f"{fmt_bytes(data['full_bytes'])} full ({pct:.1f}%)")
    if any(t.get("rollback") for t in data["targets"]):
        parts.append(f"rollback sent {fmt_bytes(data.get('rollback_bytes_sent') or 0)}")
    if agreement_line(data):
        parts.append(agreement_line(data))
    return parts


def agreement_line(data: dict[str, Any]) -> str:
    """`rollout status`: agreement per wave in one line ("" when no device reported one)."""
    parts = [f"wave {a['wave'] + 1} {a['median_ppm'] / 10_000:.1f}% "
             f"(min {a['min_ppm'] / 10_000:.1f}%, {a['devices']} device(s))"
             for a in data.get("agreement") or []]
    return ("agreement with the previous version: " + "; ".join(parts)) if parts else ""


def _note(t: dict[str, Any]) -> str:
    """A device's reason, then why delta or full, then what its rollback sent."""
    parts = [t["reason"] or "", t.get("delivery") or "",
             (t.get("rollback") or {}).get("note") or ""]
    return "; ".join(p for p in parts if p)


def _status(rollout_id: int, *, with_targets: bool = True) -> dict[str, Any]:
    """``rollout status --json``: from the API when FLEET_API_URL is set, else the store."""
    if remote.active():
        data: dict[str, Any] = remote.client().get(f"/rollouts/{rollout_id}")
        data.pop("actions", None)  # the API's extra: what the console may offer
        return data
    from .. import reads  # noqa: PLC0415

    with read_store() as q:  # the SQLite default: no SQLAlchemy import
        return reads.rollout_json(q, rollout_id, with_targets=with_targets)


def _wrap(text: str, width: int | None, indent: str = "") -> list[str]:
    if width is None:
        return [indent + text]
    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False) or [indent]


@app.command("model")
def rollout_model(
    spec: Annotated[str, typer.Argument(help="[NAME:]VERSION to roll out")],
    group: Annotated[str, typer.Option("--group", "-g", help="device group to target")],
    canary: Annotated[str | None, typer.Option(
        "--canary", help="first wave: N devices or N% of the group")] = None,
    waves: Annotated[str, typer.Option(
        "--waves", help="cumulative waves after the canary, e.g. 10%,50%,100%")] = "100%",
    max_failure: Annotated[str, typer.Option(
        "--max-failure", help="failures allowed, as a % of the devices dispatched so far")] = "5%",
    on_failure: Annotated[str, typer.Option(
        "--on-failure", help="pause | abort | rollback when --max-failure is exceeded")] = "pause",
    health_window: Annotated[str, typer.Option(
        "--health-window", help="trial window on each device before it counts as healthy")] = "60s",
    max_error_rate: Annotated[str, typer.Option(
        "--max-error-rate", help="trial: errors allowed on a device, % of its requests")
    ] = HEALTH_OPTION_DEFAULTS["max_error_rate"],
    max_p95_ratio: Annotated[str, typer.Option(
        "--max-p95-ratio", help="trial: new latency allowed, % of the previous version's on "
        "the same inputs (judged with a confidence bound); off or 0 = latency not judged")
    ] = HEALTH_OPTION_DEFAULTS["max_p95_ratio"],
    p95_slack_ms: Annotated[float, typer.Option(
        "--p95-slack-ms", help="trial: latency rises smaller than this never count")
    ] = HEALTH_OPTION_DEFAULTS["p95_slack_ms"],
    max_concurrent: Annotated[int | None, typer.Option(
        "--max-concurrent", help="devices updating at once")] = None,
    max_attempts: Annotated[int, typer.Option(
        "--max-attempts", help="attempts per device before it is held out for good")] = 3,
    retry_backoff: Annotated[str, typer.Option(
        "--retry-backoff", help="first hold after a failure; doubles each time")] = "30s",
    state_timeout: Annotated[str, typer.Option(
        "--state-timeout", help="time a device may spend in one state")] = "600s",
    bandwidth: Annotated[str | None, typer.Option(
        "--bandwidth", help="cap on artifact bytes the server publishes, e.g. 10MB/s")] = None,
    allow_io_change: Annotated[bool, typer.Option(
        "--allow-io-change", help="let devices accept a model whose inputs/outputs differ "
        "from the one they run (refused otherwise)")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="block until the rollout ends or pauses")] = False,
    timeout: Annotated[str, typer.Option("--timeout", help="how long --wait waits")] = "600s",
    allow_empty: Annotated[bool, typer.Option(
        "--allow-empty", help="allow a group with no device yet")] = False,
    supersede: Annotated[bool, typer.Option(
        "--supersede", help="move the devices a running rollout of this model covers to this "
        "one (refused otherwise); its other devices stay in it")] = False,
    variant: VariantOpt = None,
    prefer: Annotated[str | None, typer.Option(
        "--prefer", help="choose each device's variant by selection: latency | size | "
        "accuracy (its portrait and benchmarks; devices no variant fits are skipped); "
        "latency@1: giving up at most 1 accuracy point")] = None,
    min_agreement: Annotated[str | None, typer.Option(
        "--min-agreement", help="trial: roll back a model whose answers agree with the "
        "previous version's on less than this share of sampled requests, e.g. 98%")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a rollout; a running `fleetctl server` delivers it wave by wave."""
    options: dict[str, Any] = dict(
        canary=canary, waves=waves, max_failure=max_failure, on_failure=on_failure,
        health_window=health_window, max_error_rate=max_error_rate, max_p95_ratio=max_p95_ratio,
        p95_slack_ms=p95_slack_ms, max_concurrent=max_concurrent, max_attempts=max_attempts,
        retry_backoff=retry_backoff, state_timeout=state_timeout, bandwidth=bandwidth,
        allow_io_change=allow_io_change, variant=variant, prefer=prefer,
        min_agreement=min_agreement)
    timeout_s = parse_duration(timeout)
    if remote.active():  # the server parses the options, with the same rules and messages
        body = {k: v for k, v in options.items() if v is not None or k in ("canary", "bandwidth")}
        started = remote.client().post("/rollouts", {
            "version": spec, "group": group, "allow_empty": allow_empty,
            "supersede": supersede, **body})
        rollout_id, took_over = started["id"], started.get("took_over") or []
        summary = [o["summary"] for o in took_over]
        incompatible, unfit = started.get("incompatible", 0), started.get("incompatible_line", "")
    else:
        from ..rollouts import start_rollout  # noqa: PLC0415

        policy = RolloutPolicy.from_options(**options)
        with open_store() as store, store.session() as s:
            begun = start_rollout(s, spec, group, actor(), policy=policy,
                                  allow_empty=allow_empty, supersede=supersede)
            rollout_id = begun.rollout.id
            took_over = [o.to_json() for o in begun.took_over]
            summary = [o.summary() for o in begun.took_over]
            incompatible, unfit = begun.incompatible, begun.incompatible_line()
    if not as_json:
        if unfit:
            console.print(unfit)
        console.print("; ".join([f"rollout {rollout_id} started", *summary]))
    if not wait:
        if as_json:
            print_json({"id": rollout_id, "took_over": [
                {k: o[k] for k in ("rollout", "devices", "left")} for o in took_over],
                "incompatible": incompatible})
        return
    _wait(rollout_id, timeout_s, quiet=as_json)
    data = _status(rollout_id)
    if as_json:
        print_json(data)
    else:
        console.print(*_render(data))
    if data["state"] != "completed":
        raise typer.Exit(1)


def _wait(rollout_id: int, timeout_s: float, *, quiet: bool) -> None:
    """Until the rollout ends or pauses (``WAIT_ENDS``) or ``timeout_s``: a live view on a
    terminal, one line per change when piped (``progress.follow``), nothing when ``quiet``."""
    from . import progress  # noqa: PLC0415

    live = not quiet and progress.is_terminal(sys.stdout)

    def fetch() -> dict[str, Any]:
        return _status(rollout_id, with_targets=live)

    def ended(data: dict[str, Any]) -> bool:
        return data["state"] in WAIT_ENDS

    if quiet:
        deadline = time.monotonic() + timeout_s
        while not ended(fetch()) and time.monotonic() <= deadline:
            time.sleep(0.5)
        return
    followed = progress.follow(fetch, until=ended, timeout_s=timeout_s, transient=True,
                               tty=live, interval_s=1.0 if live else 0.5)
    if followed.timed_out:
        console.print(f"timed out after {timeout_s:.0f} s; the rollout goes on "
                      f"(`fleetctl rollout status {rollout_id} --watch`)")


@app.command("plan")
def rollout_plan(
    spec: Annotated[str, typer.Argument(help="[NAME:]VERSION to plan")],
    group: Annotated[str, typer.Option("--group", "-g", help="device group to target")],
    variant: VariantOpt = None,
    wide: WideOpt = False,
    as_json: JsonOpt = False,
    prefer: Annotated[str | None, typer.Option(
        help="Hardware-aware selection by latency|size|accuracy (docs/portraits.md): per "
             "device type the variant, its figures and why; latency@1: giving up at most 1 "
             "accuracy point.")] = None,
    per_device: Annotated[bool, typer.Option(
        "--per-device", help=f"With --prefer, list every device too when the group has more "
                             f"than {PER_DEVICE_ROWS} (--json always does).")] = False,
) -> None:
    """Per device: the variant it would get, its base, delta or full (with its codec), bytes
    to send (a full model ships compressed when that is smaller) against the model's size, and
    which devices cannot take the model and why; what the server would do with the blobs in
    its store now. Sends nothing."""
    if remote.active():
        query = {"version": spec, "group": group, "variant": variant, "prefer": prefer}
        plan = remote.client().get("/rollouts/plan", {k: v for k, v in query.items() if v})
    else:
        from ..rollouts import plan_rollout  # noqa: PLC0415

        cfg = load_config()
        blobs = blob_store(cfg)
        with open_store(cfg) as store, store.read() as s:
            plan = plan_rollout(s, spec, group, variant=variant,
                                blob_problem=lambda sha: None if blobs.has(sha) else "missing",
                                prefer=prefer)
    if as_json:
        print_json(plan)
        return
    if plan.get("device_types"):
        _print_type_plans(plan)
        if len(plan["devices"]) > PER_DEVICE_ROWS and not per_device:
            console.print(f"{len(plan['devices'])} devices: one row each with --per-device "
                          "or --json")
            _print_plan_total(plan)
            return
    show_variant = wide or bool(plan.get("device_types"))
    table = Table("device", "online", "runs", "artifact", "bytes", "full",
                  *(["variant"] if show_variant else []), wide=wide)
    table.add_column("note", overflow="below")
    for d in plan["devices"]:
        artifact = d.get("artifact") or "cannot take"
        if d.get("codec"):
            artifact += f" ({d['codec']})"
        table.add_row(d["device"], "yes" if d["online"] else "no", d["runs"] or "-", artifact,
                      fmt_bytes(d.get("bytes")), fmt_bytes(d.get("full_bytes")),
                      *([d.get("variant") or "-"] if show_variant else []),
                      "; ".join(x for x in (d.get("selection"), d["reason"]) if x))
    pin = f" (variant {plan['variant']} pinned)" if plan.get("variant") else ""
    console.print(f"plan: {plan['model']} {plan['version']} -> group {plan['group']}{pin}")
    console.print(table)
    _print_plan_total(plan)


def _print_plan_total(plan: dict) -> None:
    console.print(f"{fmt_bytes(plan['bytes'])} to send instead of {fmt_bytes(plan['full_bytes'])}"
                  f" full; {plan['cannot_take']} device(s) cannot take the model")


def _print_type_plans(plan: dict) -> None:
    types = Table("device type", "devices", "variant", "p50", "memory", "source",
                  title=f"selection by {plan['prefer']}")
    types.add_column("why", overflow="below")
    for t in plan["device_types"]:
        f = t["figures"]
        p50 = f"{f['p50_us']} us" if f.get("p50_us") is not None else "-"
        chosen = t["variant"] or "incompatible"
        if len(t.get("variants") or {}) > 1:
            chosen = ", ".join(f"{k} x{n}" for k, n in sorted(t["variants"].items()))
        types.add_row(t["device_type"], str(t["devices"]), chosen, p50,
                      fmt_bytes(f.get("model_rss_bytes")), f.get("source", "-"), t["reason"])
    console.print(types)


@app.command("status")
def rollout_status(
    rollout_id: IdArg,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="live view until it ends")] = False,
    wide: WideOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Each device's wave, state and reason; bytes sent against the full size."""
    data = _status(rollout_id)
    if as_json:
        print_json(data)
        return
    if not watch:
        console.print(*_render(data, wide=wide))
        return
    from . import progress  # noqa: PLC0415

    live = progress.is_terminal(sys.stdout)
    # on a terminal the status view stays live; piped, one line per change
    progress.follow(lambda: _status(rollout_id, with_targets=live),
                    until=lambda d: d["state"] in FINAL_ROLLOUT_STATES,
                    view=lambda d, _elapsed: _render(d, wide=wide), interval_s=1.0, tty=live)


@app.command("list")
def rollout_list(wide: WideOpt = False, as_json: JsonOpt = False) -> None:
    """List rollouts, newest first."""
    if remote.active():
        rows = remote.client().get_all("/rollouts")
    else:
        from .. import reads  # noqa: PLC0415

        with read_store() as q:
            rows = reads.rollouts_json(q)
    if as_json:
        print_json(rows)
        return
    table = Table("id", "model", "version", "group", "state", "wave", "devices", "sent", "full",
                  wide=wide)
    for r in rows:
        table.add_row(str(r["id"]), r["model"], r["version"], r["group"], r["state"],
                      str(r["current_wave"] + 1), str(sum(r["counts"].values())),
                      fmt_bytes(r["bytes_sent"]), fmt_bytes(r["full_bytes"]))
    console.print(table)


def _action(action: str, rollout_id: int, as_json: bool) -> None:
    if remote.active():
        out = remote.client().post(f"/rollouts/{rollout_id}/{action}")
    else:
        from ..rollouts import act_on_rollout  # noqa: PLC0415

        with open_store() as store, store.session() as s:
            r, changed = act_on_rollout(s, rollout_id, action, actor())
            out = {"id": r.id, "state": r.state, "changed": changed}
    if as_json:
        print_json(out)
    elif out["changed"]:
        console.print(f"rollout {rollout_id}: {action} requested; state is now {out['state']}")
    else:
        console.print(f"rollout {rollout_id} is already {out['state']}; nothing to do")


ACTION_HELP = {
    "pause": "Stop dispatching to more devices (devices already updating finish).",
    "resume": "Continue a paused rollout; failures so far are acknowledged, new ones count.",
    "abort": "Stop the rollout for good; undelivered manifests are withdrawn.",
    "rollback": "Return every device the rollout touched to the version it ran before.",
}


def _action_command(action: str) -> None:
    def command(rollout_id: IdArg, as_json: JsonOpt = False) -> None:
        _action(action, rollout_id, as_json)

    command.__name__ = f"rollout_{action}"
    command.__doc__ = ACTION_HELP[action]
    app.command(action)(command)


for _name in ACTION_HELP:
    _action_command(_name)
