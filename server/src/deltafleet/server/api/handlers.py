"""The API's endpoints: each one calls what the matching ``fleetctl`` command calls.

Handlers are plain functions of a ``Call`` (the principal, path and query parameters, the
parsed body) returning JSON-able data; they run in a worker thread (``app``), read through
``Store.read()`` and write through ``Store.session()``. Domain rules live in ``fleet``,
``catalog``, ``rollouts``, ``views`` and ``audit``: nothing here decides what a rollout or a
device may do. A write is audited by the domain function (or here, as the CLI does it) with
the token's name as the actor (``api:<name>``).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from .. import catalog, enroll, fleet, keys, views
from ..audit import audit, list_audit
from ..config import ServerConfig
from ..errors import UsageError
from ..rollout.states import ACTIONS, ACTIVE_ROLLOUT_STATES
from ..rollouts import (
    act_on_rollout,
    device_selection,
    get_rollout,
    list_rollouts,
    plan_rollout,
    rollout_events,
    rollout_json,
    start_rollout,
)
from ..store import BlobStore, Store
from ..store.models import Device
from .problems import ApiProblem
from .tokens import Principal, create_token, list_tokens, revoke_token, token_to_json

MAX_PAGE = 500
DEFAULT_PAGE = 100


@dataclass
class Call:
    """One API request as a handler sees it."""

    principal: Principal
    cfg: ServerConfig
    store: Store
    blobs: BlobStore
    params: Mapping[str, Any] = field(default_factory=dict)
    query: Mapping[str, list[str]] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)
    files: dict[str, list[Path]] = field(default_factory=dict)  # multipart uploads, on disk

    def q(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def q_bool(self, name: str) -> bool | None:
        raw = self.q(name)
        return None if raw is None or raw == "" else _parse_bool(name, raw)

    def flag(self, name: str) -> bool:
        """A true/false field of a JSON or multipart body (absent: false)."""
        value = self.body.get(name)
        if value is None or isinstance(value, bool):
            return bool(value)
        if isinstance(value, str):
            return _parse_bool(name, value)
        raise UsageError(f"field {name!r} must be true or false")

    def number(self, name: str, default: float) -> float:
        value = self.body.get(name)
        if value is None:
            return default
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"field {name!r} must be a number") from None
        if isinstance(value, bool) or not math.isfinite(number):
            raise UsageError(f"field {name!r} must be a number")
        return number

    def file(self, name: str) -> Path | None:
        """The one uploaded file of multipart field ``name`` (None: not sent)."""
        files = self.files.get(name) or []
        if len(files) > 1:
            raise UsageError(f"send at most one file as the multipart field {name!r}")
        return files[0] if files else None

    def q_int(self, name: str, default: int, lo: int, hi: int) -> int:
        raw = self.q(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            value = lo - 1
        if not lo <= value <= hi:
            raise UsageError(f"invalid {name}={raw!r}: use a whole number from {lo} to {hi}")
        return value

    def page(self) -> tuple[int, int]:
        return (self.q_int("limit", DEFAULT_PAGE, 1, MAX_PAGE),
                self.q_int("offset", 0, 0, 2**31))

    def text(self, name: str, *, required: bool = True) -> str | None:
        value = self.body.get(name)
        if value is None:
            if required:
                raise UsageError(f"missing field {name!r}")
            return None
        if not isinstance(value, str):
            raise UsageError(f"field {name!r} must be a string")
        return check_text(f"field {name!r}", value)


MAX_TEXT_CHARS = 4096


def check_text(what: str, value: str) -> str:
    """``value`` if a store, a file and a log line can hold it: UTF-8 text (no lone
    surrogates), no NUL, at most ``MAX_TEXT_CHARS``; else a UsageError naming ``what``."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid UTF-8 text") from None
    if "\x00" in value:
        raise UsageError(f"{what} holds a NUL character")
    if len(value) > MAX_TEXT_CHARS:
        raise UsageError(f"{what} is longer than {MAX_TEXT_CHARS} characters")
    return value


def _parse_bool(name: str, raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise UsageError(f"invalid {name}={raw!r}: use true or false")


def _paged(items: list[Any], limit: int, offset: int) -> dict[str, Any]:
    return {"items": items[offset:offset + limit], "total": len(items), "limit": limit,
            "offset": offset}


# -- devices ---------------------------------------------------------------------------------
def _label_filters(c: Call) -> dict[str, str]:
    out = {}
    for item in c.query.get("label", []):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"invalid label={item!r}: use label=KEY=VALUE")
        out[key] = value
    return out


def devices_list(c: Call) -> dict[str, Any]:
    """Filters: group, online, model, version (what it runs), state (what a rollout asked of
    it is in this state), label=KEY=VALUE (repeatable), q (part of the id); limit/offset."""
    group, model, version, state, q = (c.q("group"), c.q("model"), c.q("version"), c.q("state"),
                                       c.q("q"))
    online = c.q_bool("online")
    labels = _label_filters(c)
    limit, offset = c.page()
    with c.store.read() as s:
        devices = fleet.devices_in_group(s, group) if group else fleet.list_devices(s)
        desired_all = fleet.desired_models(s, devices) if state else {}

        def keep(d: Device) -> bool:
            if online is not None and bool(d.online) is not online:
                return False
            if q and q not in d.id:
                return False
            if any((d.labels or {}).get(k) != v for k, v in labels.items()):
                return False
            if model or version:
                runs = [m for m in d.models if not model or m.model_name == model]
                if not runs or (version and not any(m.version == version for m in runs)):
                    return False
            return not state or any(x.state == state for x in desired_all.get(d.id, []))

        picked = [d for d in devices if keep(d)]
        page = picked[offset:offset + limit]
        desired = fleet.desired_models(s, page)
        items = [views.device_to_json(d, desired[d.id]) for d in page]
    return {"items": items, "total": len(picked), "limit": limit, "offset": offset}


def device_show(c: Call) -> dict[str, Any]:
    with c.store.read() as s:
        return views.device_detail_json(s, c.params["device_id"])


def device_variants(c: Call) -> dict[str, Any]:
    """Per model, the device's newest rollout: the variant it was sent, why delta or full
    (``delivery``) and the variant the rollout's rule picks for it now, with why (pin,
    ``--prefer`` selection on its portrait and benchmarks, or by format)."""
    with c.store.read() as s:
        return device_selection(s, c.params["device_id"])


def device_labels(c: Call) -> dict[str, Any]:
    with c.store.read() as s:
        d = fleet.get_device(s, c.params["device_id"])
        return {"device": d.id, "labels": dict(d.labels or {})}


def device_history(c: Call) -> dict[str, Any]:
    """As `fleetctl device history --json`: the device's rollout targets (newest first: what
    it was asked, and how it went) and the update events it reported lately (kept 7 days)."""
    from ..cli.device import history_json  # noqa: PLC0415 - what `device history` prints

    limit = c.q_int("limit", DEFAULT_PAGE, 1, MAX_PAGE)
    with c.store.read() as s:
        return history_json(s, c.params["device_id"], limit)


def device_enroll(c: Call) -> dict[str, Any]:
    """As `fleetctl device enroll`: the fleet CA issues the device a client certificate; the
    bundle (client.crt/key, ca.crt, root.json, trust.json, agent.toml) is in this response
    only, with each file's mode: the server keeps no copy of the device's key. Body:
    {"broker_url": "mqtts://...", "install_dir": "/etc/deltafleet"} (both optional)."""
    device_id = c.params["device_id"]
    broker_url = c.text("broker_url", required=False) or None
    install_dir = c.text("install_dir", required=False) or "/etc/deltafleet"
    with _scratch(c.cfg, "enroll-") as folder:
        result = enroll.enroll_device(c.cfg, device_id, folder / "bundle",
                                      broker_url=broker_url, install_dir=install_dir)
        files = [{"name": f.name, "mode": f.stat().st_mode & 0o777,
                  "content": f.read_text(encoding="utf-8")} for f in result.files]
    with c.store.session() as s:
        audit(s, c.principal.actor, "device.enroll", device_id,
              {"serial": str(result.serial), "broker_url": result.broker_url})
    return {"device_id": device_id, "serial": str(result.serial),
            "broker_url": result.broker_url, "files": files}


def device_revoke(c: Call) -> dict[str, Any]:
    """As `fleetctl device revoke`: the device is denied on the server (deny list) and its
    certificates go on the CRL (reload the broker to apply it). Body: {"reason": "..."}."""
    device_id = c.params["device_id"]
    reason = c.text("reason", required=False) or ""
    serials = enroll.revoke_device(c.cfg, device_id, reason=reason)
    with c.store.session() as s:
        audit(s, c.principal.actor, "device.revoke", device_id,
              {"serials": [str(x) for x in serials], "reason": reason})
    return {"device_id": device_id, "serials": [str(x) for x in serials]}


def labels_list(c: Call) -> dict[str, Any]:
    """Every label key in the fleet with its values and how many devices carry each."""
    out: dict[str, dict[str, int]] = {}
    with c.store.read() as s:
        for labels in s.scalars(select(Device.labels)):
            for k, v in (labels or {}).items():
                out.setdefault(k, {})
                out[k][v] = out[k].get(v, 0) + 1
    return {"labels": out}


def fleet_summary(c: Call) -> dict[str, Any]:
    """Devices online/offline, by what they run and by the state of what they were asked."""
    with c.store.read() as s:
        devices = fleet.list_devices(s)
        desired = fleet.desired_models(s, devices)
        active = sum(1 for r in list_rollouts(s) if r.state in ACTIVE_ROLLOUT_STATES)
        by_model: dict[str, int] = {}
        by_state: dict[str, int] = {}
        for d in devices:
            for m in d.models:
                key = f"{m.model_name}:{m.version or '?'}"
                by_model[key] = by_model.get(key, 0) + 1
            for x in desired[d.id]:
                by_state[x.state] = by_state.get(x.state, 0) + 1
        online = sum(1 for d in devices if d.online)
    return {"devices": len(devices), "online": online, "offline": len(devices) - online,
            "by_model": dict(sorted(by_model.items())), "by_state": dict(sorted(by_state.items())),
            "active_rollouts": active}


# -- groups ----------------------------------------------------------------------------------
def groups_list(c: Call) -> list[dict[str, Any]]:
    with c.store.read() as s:
        devices = fleet.list_devices(s)
        return [views.group_to_json(g, [d.id for d in devices
                                        if fleet.device_matches(d, g.selector)])
                for g in fleet.list_groups(s)]


def group_show(c: Call) -> dict[str, Any]:
    """As `fleetctl group show --json`: the selector and each member as a device."""
    with c.store.read() as s:
        return views.group_show_json(s, c.params["name"])


def group_create(c: Call) -> dict[str, Any]:
    """Body: {"name": ..., "match": ["KEY=VALUE", "KEY in (A, B)"]} or {"name": ..., "all": true}."""
    from ..cli.group import parse_matches  # noqa: PLC0415 - the parser `group create` uses

    name = c.text("name")
    assert name is not None
    matches = c.body.get("match") or []
    if not isinstance(matches, list) or not all(isinstance(m, str) for m in matches):
        raise UsageError("field 'match' must be a list of strings")
    all_devices = c.body.get("all") is True
    if not matches and not all_devices:
        raise UsageError("give at least one match KEY=VALUE, or all: true for every device")
    if matches and all_devices:
        raise UsageError("all and match exclude each other")
    selector = parse_matches(matches)
    with c.store.session() as s:
        group = fleet.create_group(s, name, selector)
        members = [d.id for d in fleet.devices_in_group(s, name)]
        audit(s, c.principal.actor, "group.create", name, {"selector": selector})
        return views.group_to_json(group, members)


# -- models ----------------------------------------------------------------------------------
def models_list(c: Call) -> list[dict[str, Any]]:
    with c.store.read() as s:
        return [views.model_to_json(m, detail=False) for m in catalog.list_models(s)]


def model_show(c: Call) -> dict[str, Any]:
    with c.store.read() as s:
        return views.model_to_json(catalog.get_model(s, c.params["name"]))


def version_show(c: Call) -> dict[str, Any]:
    name, version = c.params["name"], c.params["version"]
    with c.store.read() as s:
        catalog.resolve_version(s, f"{name}:{version}")  # the CLI's "unknown version" error
        model = views.model_to_json(catalog.get_model(s, name))
    (v,) = [v for v in model["versions"] if v["version"] == version]
    return {"model": name, **v}


def version_inspect(c: Call) -> dict[str, Any]:
    """As `fleetctl model inspect NAME:VERSION --json`: IO, opset and operators, runtimes
    that load it, parameters, precision, memory; lineage and measured figures of a variant
    `model optimize` made. Query: ``variant`` (default: 'default', or the only one)."""
    from ..cli.model import inspect_registered  # noqa: PLC0415 - what `model inspect` runs

    spec = f"{c.params['name']}:{c.params['version']}"
    return inspect_registered(c.store, c.blobs, spec, c.q("variant") or None)


def model_optimize(c: Call) -> list[dict[str, Any]]:
    """As `fleetctl model optimize SPEC --json`, run here and now (it may take minutes).
    Multipart: ``version`` ([NAME:]VERSION), ``int8``, ``fp16`` (true/false), ``prune``
    (50%), ``prune_mode``, ``variant`` (the parent), ``name``, ``max_accuracy_drop``, and the
    files ``calibration`` and ``eval`` (.npz)."""
    from ..cli.model import (  # noqa: PLC0415 - what `model optimize` runs
        check_optimize_inputs,
        optimize_options,
        optimize_registered,
    )

    spec = c.text("version")
    assert spec is not None
    calibration, eval_ = c.file("calibration"), c.file("eval")
    max_drop = c.number("max_accuracy_drop", 1.0)
    check_optimize_inputs(calibration, eval_, max_drop)
    opts = optimize_options(c.flag("int8"), c.flag("fp16"), c.text("prune", required=False),
                            c.text("prune_mode", required=False) or "unstructured",
                            variant=c.text("variant", required=False),
                            name=c.text("name", required=False), calibration=calibration,
                            eval_=eval_, max_accuracy_drop=max_drop)
    return optimize_registered(c.store, c.blobs, spec, opts, c.principal.actor)


def models_compress(c: Call) -> list[dict[str, Any]]:
    """As `fleetctl model compress [NAME]`: store the zstd form of every variant (of
    ``model``, or all) that has none; one row per variant looked at. Body: {"model": NAME}."""
    from ..cli.model import compress_registered  # noqa: PLC0415 - what `model compress` runs

    return compress_registered(c.store, c.blobs, c.text("model", required=False),
                               c.principal.actor)


def model_upload(c: Call) -> dict[str, Any]:
    """Multipart: ``file`` (ONNX or TFLite), ``version``, optional ``variant``, ``precision``
    and ``golden`` files (.npz); registers the version as `fleetctl model add` does."""
    from ..cli.model import _forget_unreferenced  # noqa: PLC0415 - the clean-up `model add` does

    name = c.params["name"]
    version = c.text("version")
    variant = c.text("variant", required=False) or "default"
    precision = c.text("precision", required=False) or "fp32"
    accelerator = c.text("accelerator", required=False) or None
    min_runtime_version = c.text("min_runtime_version", required=False) or None
    files = c.files.get("file") or []
    if len(files) != 1:
        raise UsageError("send exactly one model file as the multipart field 'file'")
    file = files[0]
    golden = c.files.get("golden") or []
    new_blobs: set[str] = set()
    try:
        with c.store.session() as s:
            new_blobs = s.info.setdefault(catalog.NEW_BLOBS_KEY, set())
            row = catalog.add_model_version(s, c.blobs, name, str(version), file,
                                            variant=variant, precision=precision, golden=golden,
                                            accelerator=accelerator,
                                            min_runtime_version=min_runtime_version)
            compressed = catalog.compressed_artifact(row.info)
            audit(s, c.principal.actor, "model.add", f"{name}:{version}", {
                "variant": variant, "precision": precision, "format": row.format,
                "sha256": row.artifact_sha256, "file": file.name,
                "compressed_sha256": compressed.sha256 if compressed else None,
                "golden_inputs": len((row.info or {}).get("golden", [])),
            })
    except BaseException:
        _forget_unreferenced(c.store, c.blobs, new_blobs)
        raise
    with c.store.read() as s:
        model = views.model_to_json(catalog.get_model(s, name))
    (v,) = [v for v in model["versions"] if v["version"] == version]
    return {"model": name, **v}


@contextlib.contextmanager
def _scratch(cfg: ServerConfig, prefix: str) -> Iterator[Path]:
    """A private (0700) folder under FLEET_HOME/work for the request, removed after it."""
    work = cfg.home / "work"
    work.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=work))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def upload_dir(cfg: ServerConfig) -> Path:
    path = cfg.home / "work" / "uploads" / uuid.uuid4().hex
    path.mkdir(parents=True)
    return path


def remove_upload(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# -- deltas ----------------------------------------------------------------------------------
def deltas_list(c: Call) -> dict[str, Any]:
    """As `fleetctl delta list --json`, paged: built deltas (by id), then the pairs the server
    is building or failed to build (``state``, ``reason``); ``model``: from or to a version of
    it; ``state``: built, building or failed."""
    from ..delta_views import list_deltas  # noqa: PLC0415

    limit, offset = c.page()
    with c.store.read() as s:
        rows = list_deltas(s, c.cfg.home, model=c.q("model") or None, state=c.q("state") or None)
    return _paged(rows, limit, offset)


def delta_show(c: Call) -> dict[str, Any]:
    """As `fleetctl delta show --json`: base -> target, codec, size, ratio to the target's
    full artifact (the compressed model when the catalog has one)."""
    from ..delta_views import show_delta  # noqa: PLC0415

    with c.store.read() as s:
        return show_delta(s, c.params["delta_id"])


# -- rollouts --------------------------------------------------------------------------------
POLICY_TEXT = ("canary", "waves", "max_failure", "on_failure", "health_window", "max_error_rate",
               "max_p95_ratio", "retry_backoff", "state_timeout", "bandwidth", "variant", "prefer",
               "min_agreement")
POLICY_NUMBER = {"p95_slack_ms": float, "max_concurrent": int, "max_attempts": int}
POLICY_FLAG = ("allow_io_change",)


def _policy(body: Mapping[str, Any]) -> Any:
    """The rollout policy from the same option names as `fleetctl rollout model` (with its
    defaults for those not given)."""
    from ..policy import RolloutPolicy  # noqa: PLC0415

    opts: dict[str, Any] = {}
    for key, value in body.items():
        if key in ("version", "group", "allow_empty", "supersede"):
            continue
        if key in POLICY_TEXT:
            ok = isinstance(value, str) or (value is None and key in (
                "canary", "bandwidth", "variant", "prefer", "min_agreement"))
        elif key in POLICY_NUMBER:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if ok and POLICY_NUMBER[key] is int:
                ok = isinstance(value, int)
        elif key in POLICY_FLAG:
            ok = isinstance(value, bool)
        else:
            raise UsageError(f"unknown field {key!r}")
        if not ok:
            raise UsageError(f"field {key!r} has the wrong type")
        opts[key] = value
    return RolloutPolicy.from_options(**opts)


def rollouts_list(c: Call) -> dict[str, Any]:
    limit, offset = c.page()
    state = c.q("state")
    with c.store.read() as s:
        rows = [r for r in list_rollouts(s) if not state or r.state == state]
        page = [rollout_json(s, r, with_targets=False) for r in rows[offset:offset + limit]]
    return {"items": page, "total": len(rows), "limit": limit, "offset": offset}


def rollout_show(c: Call) -> dict[str, Any]:
    """As `fleetctl rollout status --json`, plus ``actions``: the operator actions its state
    allows now (``rollout.states.ACTIONS``)."""
    with c.store.read() as s:
        out = rollout_json(s, get_rollout(s, c.params["rollout_id"]))
    out["actions"] = [a for a, act in ACTIONS.items() if out["state"] in act.allowed]
    return out


def rollout_device_events(c: Call, after: int | None, limit: int) -> list[dict[str, Any]]:
    """The rollout's device events after event id ``after`` (None: its last ``limit``)."""
    with c.store.read() as s:
        return rollout_events(s, c.params["rollout_id"], after=after, limit=limit)


def rollout_plan(c: Call) -> dict[str, Any]:
    spec, group = c.q("version"), c.q("group")
    if not spec or not group:
        raise UsageError("give version=[NAME:]VERSION and group=NAME")
    blobs = c.blobs
    with c.store.read() as s:
        return plan_rollout(s, spec, group, variant=c.q("variant") or None,
                            prefer=c.q("prefer") or None,
                            blob_problem=lambda sha: None if blobs.has(sha) else "missing")


def rollout_create(c: Call) -> dict[str, Any]:
    """Body: {"version": "[NAME:]VERSION", "group": NAME, "allow_empty": false, "supersede":
    false, and any option of `fleetctl rollout model` by its name: "canary": "2", "waves":
    "50%,100%", "variant": "int8", ...}. ``took_over``: what ``supersede`` moved."""
    spec, group = c.text("version"), c.text("group")
    assert spec is not None and group is not None
    policy = _policy(c.body)
    allow_empty = c.body.get("allow_empty") is True
    with c.store.session() as s:
        started = start_rollout(s, spec, group, c.principal.actor, policy=policy,
                                allow_empty=allow_empty, supersede=c.body.get("supersede") is True)
        rollout_id = started.rollout.id
        took_over = [o.to_json() for o in started.took_over]
        incompatible, unfit = started.incompatible, started.incompatible_line()
    with c.store.read() as s:
        return {**rollout_json(s, get_rollout(s, rollout_id)), "took_over": took_over,
                "incompatible": incompatible, "incompatible_line": unfit}


def rollout_action(action: str) -> Callable[[Call], dict[str, Any]]:
    def act(c: Call) -> dict[str, Any]:
        with c.store.session() as s:
            r, changed = act_on_rollout(s, c.params["rollout_id"], action, c.principal.actor)
            return {"id": r.id, "state": r.state, "changed": changed}

    act.__doc__ = {"pause": "Stop dispatching to more devices (devices updating finish).",
                   "resume": "Continue a paused rollout; failures so far are acknowledged.",
                   "abort": "Stop the rollout for good; undelivered manifests are withdrawn.",
                   "rollback": "Return every device the rollout touched to what it ran before.",
                   }[action]
    return act


# -- keys (public material only: no endpoint reads or returns a private key) -------------------
def keys_show(c: Call) -> dict[str, Any]:
    """As `fleetctl keys show --json`: root version, key ids and threshold, key list version
    and expiry, the online key's id, a pending signing request. Key ids, never keys."""
    return keys.describe(c.cfg)


def keys_trust(c: Call) -> dict[str, Any]:
    """As `fleetctl keys export`: the public trust files by name (root.json to pin,
    trust.json, request.json while a rotation waits for the offline root)."""
    return {"files": {name: data.decode("utf-8") for name, data in keys.trust_files(c.cfg).items()}}


def keys_rotate(c: Call) -> dict[str, Any]:
    """As `fleetctl keys rotate [--root --new-root-pub PUB]`: a new online key, or a new
    root, activated at once if the root key is on the server, else a signing request to take
    to the offline root. Body: {"root": false} or {"root": true, "new_root_pub": "<PEM>"}
    (a public key; private keys are never sent)."""
    root = c.flag("root")
    if root:
        pem = c.text("new_root_pub", required=False)
        if not pem:
            raise keys.KeysError("--root needs --new-root-pub (make one with `keys new-root`)")
        with _scratch(c.cfg, "root-pub-") as folder:
            (folder / "root.pub").write_text(pem, encoding="utf-8")
            result = keys.rotate_root(c.cfg, folder / "root.pub")
    else:
        result = keys.rotate_online_key(c.cfg)
    with c.store.session() as s:
        audit(s, c.principal.actor, "keys.rotate", "root" if root else "online",
              {"keylist_version": result.keylist_version, "activated": result.activated})
    return keys.rotation_to_json(result)


def keys_import(c: Call) -> dict[str, Any]:
    """As `fleetctl keys import SIGNED`: the body is the file `fleetctl keys sign` wrote; it
    is verified exactly as a device would before it becomes the server's."""
    store = keys.import_signed(c.cfg, c.body)
    assert store.keylist is not None
    out = {"root_version": store.root.version, "keylist_version": store.keylist.version}
    with c.store.session() as s:
        audit(s, c.principal.actor, "keys.import", "keylist", out)
    return out


# -- audit and tokens --------------------------------------------------------------------------
def audit_list(c: Call) -> dict[str, Any]:
    """Oldest first (``newest_first=true`` to reverse); since: ISO time or 30m, 24h, 7d;
    actor, action: exact matches; limit/offset."""
    from ..cli.audit import parse_since  # noqa: PLC0415 - the parser `fleetctl audit` uses

    since = c.q("since")
    actor, action = c.q("actor"), c.q("action")
    limit, offset = c.page()
    with c.store.read() as s:
        rows = [views.audit_to_json(e) for e in list_audit(s, parse_since(since) if since else None)
                if (not actor or e.actor == actor) and (not action or e.action == action)]
    if c.q_bool("newest_first"):
        rows.reverse()
    return _paged(rows, limit, offset)


def tokens_list(c: Call) -> list[dict[str, Any]]:
    with c.store.read() as s:
        return [token_to_json(t) for t in list_tokens(s)]


def token_create(c: Call) -> dict[str, Any]:
    name, role = c.text("name"), c.text("role", required=False) or "viewer"
    assert name is not None
    with c.store.session() as s:
        row, secret = create_token(s, name, role, c.principal.actor)
        return {**token_to_json(row), "token": secret}


def token_revoke(c: Call) -> dict[str, Any]:
    with c.store.session() as s:
        row, changed = revoke_token(s, c.params["name"], c.principal.actor)
        return {**token_to_json(row), "changed": changed}


def whoami(c: Call) -> dict[str, Any]:
    return {"name": c.principal.name, "role": c.principal.role}


def not_found(_: Call) -> Any:
    raise ApiProblem(404, "no such endpoint")
