"""`fleetctl init`: create FLEET_HOME, migrate the database, create the signing key pair."""

from __future__ import annotations

import os
import stat

from deltafleet.shared import SigningKey

from ..audit import audit
from ..store import Store, current_revision, head_revision, safe_url, upgrade
from ._common import actor, console, load_config


def init() -> None:
    """Create FLEET_HOME, run the database migrations and create the Ed25519 signing key.

    Safe to run again: it only does what is missing and says what it did.
    """
    cfg = load_config()
    done: list[str] = []
    if not cfg.home.exists():
        cfg.home.mkdir(parents=True, mode=0o700)
        done.append(f"created {cfg.home}")
        console.print(f"created FLEET_HOME {cfg.home}")
    else:
        console.print(f"FLEET_HOME {cfg.home} exists")
    cfg.blobs_dir.mkdir(parents=True, exist_ok=True)

    before = current_revision(cfg.db_url)
    upgrade(cfg.db_url)
    head = head_revision()
    if before != head:
        done.append(f"migrated database {before or 'empty'} -> {head}")
        console.print(
            f"database {safe_url(cfg.db_url)} migrated from {before or 'empty'} to {head}"
        )
    else:
        console.print(f"database {safe_url(cfg.db_url)} is at {head} (up to date)")

    keys_dir = cfg.signing_key_path.parent
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not cfg.signing_key_path.exists():
        key = SigningKey.generate()
        key.save(cfg.signing_key_path, cfg.public_key_path)
        done.append(f"created signing key {key.keyid[:16]}")
        console.print(f"created signing key {cfg.signing_key_path} (keyid {key.keyid[:16]})")
    else:
        key = SigningKey.load(cfg.signing_key_path)
        mode = stat.S_IMODE(cfg.signing_key_path.stat().st_mode)
        if mode & 0o077:
            os.chmod(cfg.signing_key_path, 0o600)
            done.append("restricted signing key to mode 0600")
            console.print(f"signing key {cfg.signing_key_path} was mode {mode:o}; set to 0600")
        if not cfg.public_key_path.exists():
            key.save(cfg.signing_key_path, cfg.public_key_path)
            done.append("rewrote public key")
            console.print(f"wrote missing public key {cfg.public_key_path}")
        console.print(f"signing key {cfg.signing_key_path} exists (keyid {key.keyid[:16]})")

    if done:
        with Store(cfg.db_url) as store, store.session() as s:
            audit(s, actor(), "init", str(cfg.home), {"done": done})
    console.print("ready" if done else "nothing to do")
