"""`fleetctl keys`: the root of trust (offline root key -> key list -> online signing key).

Through the API (``FLEET_API_URL``, an admin token): ``show``, ``rotate``, ``export`` and
``import`` (public material and signed files only: private keys never travel); ``init`` runs
on the server's host only; ``sign`` and ``new-root`` belong to the offline machine and touch
no server at all.

Exit codes as for every fleetctl command: 0 ok, 1 deltafleet error, 2 invalid input (including
a signed file that does not verify).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from . import remote
from ._common import JSON_HELP, WIDE_HELP, actor, console, fmt_time, load_config, print_json
from .table import Table

app = typer.Typer(no_args_is_help=True, help="Root of trust and manifest signing keys.")


def _audit(action: str, subject: str, details: dict) -> None:
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

    from deltafleet.shared import DeltafleetError  # noqa: PLC0415

    from ..audit import audit  # noqa: PLC0415
    from ..store import Store  # noqa: PLC0415

    cfg = load_config()
    try:
        with Store(cfg.db_url) as store, store.session() as s:
            audit(s, actor(), action, subject, details)
    except (DeltafleetError, SQLAlchemyError):
        pass  # key commands work without a database (e.g. before `fleetctl init`)


@app.command("init")
def init(
    root_key_out: Annotated[Path | None, typer.Option(
        help="Write the root private key here (e.g. removable media) instead of keeping it in "
             "FLEET_HOME. Recommended: the root key then lives offline.")] = None,
) -> None:
    """Create root v1 and key list v1 naming the online signing key."""
    remote.local_only("keys init")
    from .. import keys  # noqa: PLC0415

    cfg = load_config()
    store = keys.init_keys(cfg, root_key_out=root_key_out)
    assert store.keylist is not None
    where = str(root_key_out) if root_key_out else str(keys.paths(cfg).root_key)
    console.print(f"root v1 {next(iter(store.root.keys))[:16]}; root key written to {where}")
    if root_key_out is None:
        console.print("[yellow]the root key is in FLEET_HOME: move it offline for production"
                      "[/yellow]")
    console.print(f"key list v{store.keylist.version} expires "
                  f"{fmt_time_unix(store.keylist.expires_at)}")
    _audit("keys.init", "root", {"root_version": 1})


def fmt_time_unix(ts: int) -> str:
    return fmt_time(datetime.fromtimestamp(ts, UTC))


@app.command("show")
def show(json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
         wide: Annotated[bool, typer.Option("--wide", help=WIDE_HELP)] = False) -> None:
    """Root version and keys, key list version and expiry, the online key, pending requests
    (key ids cut to 16 hex digits; --wide: whole)."""
    cut = None if wide else 16
    if remote.active():
        d = remote.client().get("/keys")
    else:
        from .. import keys  # noqa: PLC0415

        d = keys.describe(load_config())
    if json_:
        print_json(d)
        return
    t = Table("field", show_header=False, wide=wide)
    t.add_column("value", overflow="fold")
    t.add_row("root", f"v{d['root_version']} threshold {d['root_threshold']}: "
              + ", ".join(k[:cut] for k in d["root_keyids"]))
    t.add_row("root key online", "yes (move it offline)" if d["root_key_online"] else "no")
    t.add_row("key list", f"v{d['keylist_version']}: "
              + ", ".join(k[:cut] for k in d["keylist_keyids"]))
    t.add_row("key list expires", fmt_time_unix(d["keylist_expires_at"])
              + (" [red]EXPIRED[/red]" if d["keylist_expired"] else ""))
    t.add_row("online key", (d["online_keyid"] or "-")[:cut])
    t.add_row("pending request", d["pending_request"] or "-")
    console.print(t)


@app.command("rotate")
def rotate(
    root: Annotated[bool, typer.Option(
        "--root", help="Rotate the root key instead of the online key.")] = False,
    new_root_pub: Annotated[Path | None, typer.Option(
        help="With --root: the new root public key (from `fleetctl keys new-root`).")] = None,
    root_key: Annotated[Path | None, typer.Option(
        help="The current root private key, if it is not in FLEET_HOME.")] = None,
    new_root_key: Annotated[Path | None, typer.Option(
        help="With --root: the new root private key, to sign here instead of offline.")] = None,
) -> None:
    """Rotate the online key (key list version + 1, old key refused) or the root.

    Without the root key(s) at hand this writes a signing request: take it to the offline
    machine (`fleetctl keys export`), sign it (`fleetctl keys sign`), bring back the result
    (`fleetctl keys import`).
    """
    if remote.active():
        out = _rotate_remote(root, new_root_pub, root_key, new_root_key)
    else:
        from .. import keys  # noqa: PLC0415

        cfg = load_config()
        if root:
            if new_root_pub is None:
                raise keys.KeysError("--root needs --new-root-pub (make one with `keys new-root`)")
            result = keys.rotate_root(cfg, new_root_pub, root_key=root_key,
                                      new_root_key=new_root_key)
        else:
            result = keys.rotate_online_key(cfg, root_key=root_key)
        out = keys.rotation_to_json(result)
        _audit("keys.rotate", "root" if root else "online",
               {"keylist_version": out["keylist_version"], "activated": out["activated"]})
    if out["activated"]:
        console.print(f"key list v{out['keylist_version']} active; online key "
                      f"{out['online_keyid'][:16]}. Restart `fleetctl server` to publish it.")
    else:
        console.print(f"signing request written to {out['request_path']}; sign it with the "
                      "root key (`fleetctl keys sign`), then `fleetctl keys import`")


def _rotate_remote(root: bool, new_root_pub: Path | None, root_key: Path | None,
                   new_root_key: Path | None) -> dict[str, Any]:
    """``keys rotate`` through the API: only the new root's PUBLIC key is sent."""
    from ..errors import UsageError  # noqa: PLC0415

    if root_key is not None or new_root_key is not None:
        raise UsageError("--root-key and --new-root-key name private keys, which never go "
                         "to the API: sign the request offline (`fleetctl keys sign`), then "
                         "`fleetctl keys import`")
    body: dict[str, object] = {"root": root}
    if root and new_root_pub is not None:  # without it the server says what is missing
        try:
            body["new_root_pub"] = new_root_pub.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read {new_root_pub}: {e}") from None
    return remote.client().post("/keys/rotate", body)  # type: ignore[no-any-return]


@app.command("export")
def export(out: Annotated[Path, typer.Option(help="Directory to write to.")]) -> None:
    """Write public trust material: root.json (pin), trust.json, request.json if pending."""
    from .. import keys  # noqa: PLC0415

    if remote.active():
        files = remote.client().get("/keys/trust")["files"]
        written = keys.write_trust_files({k: v.encode() for k, v in files.items()}, out)
    else:
        written = keys.export_trust(load_config(), out)
    for p in written:
        console.print(f"wrote {p}")


@app.command("sign")
def sign(
    request: Annotated[Path, typer.Argument(help="request.json from `keys rotate` / `export`.")],
    root_key: Annotated[list[Path], typer.Option(
        help="Root private key; give it twice (old and new) for a root rotation.")],
    out: Annotated[Path, typer.Option(help="Where to write the signed file.")],
) -> None:
    """Offline machine: sign a request with the root key(s). Needs no FLEET_HOME."""
    from deltafleet.shared import SigningKey  # noqa: PLC0415

    from .. import keys  # noqa: PLC0415

    signed = keys.sign_request(keys.read_signed_file(request),
                               [SigningKey.load(p) for p in root_key])
    out.write_text(json.dumps(signed, indent=2, sort_keys=True))
    console.print(f"wrote {out}")


@app.command("import")
def import_(signed: Annotated[Path, typer.Argument(help="File written by `keys sign`.")]
            ) -> None:
    """Verify a signed root / key list exactly as a device would, then activate it."""
    from .. import keys  # noqa: PLC0415

    if remote.active():
        out = remote.client().post("/keys/import", keys.read_signed_file(signed))
    else:
        store = keys.import_signed(load_config(), keys.read_signed_file(signed))
        assert store.keylist is not None
        out = {"root_version": store.root.version, "keylist_version": store.keylist.version}
        _audit("keys.import", "keylist", out)
    console.print(f"root v{out['root_version']}, key list v{out['keylist_version']} active. "
                  "Restart `fleetctl server` to publish it.")


@app.command("new-root")
def new_root(out: Annotated[Path, typer.Option(help="Private key path (.pub beside it).")]
             ) -> None:
    """Offline machine: generate a new root key pair for `keys rotate --root`."""
    from .. import keys  # noqa: PLC0415

    key = keys.generate_root_key(out)
    console.print(f"new root key {key.keyid[:16]}: {out} (public: {out.with_suffix('.pub')})")
