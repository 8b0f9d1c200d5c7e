"""``fleet-agent``: the device daemon and a local status command.

``fleet-agent status`` reads the state directory: ``state.json`` (what the device runs) and
``connection.json`` (the broker connection as the running agent last wrote it, with its pid;
see ``daemon``), so it works while the agent runs and after it stopped.

Exit codes: 0 ok, 2 bad configuration or usage, 1 any other error. Every error is one line on
stderr, ``error: ...`` (a usage error ends with the ``--help`` to read); a ``--trusted-key``
that is missing, a directory, a private key or not a PEM Ed25519 public key is refused before
anything starts or is written (``trust.load_trusted_key`` names the file and what was expected).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from deltafleet.shared import DeltafleetError, one_line

from .config import load_config, parse_labels
from .errors import ConfigError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``error: ...; see '<prog> --help'``, exit 2
    (subcommands' parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {one_line(message, limit=None)}; see '{self.prog} --help'\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fleet-agent", description="deltafleet device agent")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent daemon (foreground)")
    status = sub.add_parser("status", help="show the broker connection and the models this "
                                           "device runs")
    for sp in (run, status):
        sp.add_argument("--config", type=Path, help="TOML config file")
        sp.add_argument("--device-id", help="device id (FLEET_AGENT_DEVICE_ID)")
        sp.add_argument("--state-dir", type=Path, help="state directory (FLEET_AGENT_STATE_DIR)")
    run.add_argument("--broker", dest="broker_url", help="mqtt://host:port (FLEET_AGENT_BROKER_URL)")
    run.add_argument("--trusted-key", dest="trusted_keys", action="append", type=Path,
                     metavar="FILE", help="legacy: the server's signing public key (PEM, "
                     "signing.pub) to pin (repeatable)")
    run.add_argument("--root-of-trust", type=Path,
                     help="root.json to pin at first start (FLEET_AGENT_ROOT_OF_TRUST)")
    run.add_argument("--trust-bundle", type=Path,
                     help="trust.json key list from enrollment (FLEET_AGENT_TRUST_BUNDLE)")
    run.add_argument("--mqtt-ca-file", type=Path, help="CA certificate for mqtts://")
    run.add_argument("--mqtt-cert-file", type=Path, help="client certificate for mqtts://")
    run.add_argument("--mqtt-key-file", type=Path, help="client key for mqtts://")
    run.add_argument("--label", dest="labels", action="append", default=[],
                     help="KEY=VALUE label (repeatable)")
    run.add_argument("--accelerator", help="accelerator name reported in the profile")
    run.add_argument("--api-port", type=int,
                     help="local inference API port on 127.0.0.1, 0 disables (FLEET_AGENT_API_PORT)")
    run.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    sub.choices["status"].add_argument("--json", action="store_true", help="JSON output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "status":
            return _status(args)
        from .trust import load_trusted_key

        for key in args.trusted_keys or ():  # each named file checked before anything starts
            load_trusted_key(key)
        cfg = load_config(
            args.config, device_id=args.device_id, state_dir=args.state_dir,
            broker_url=args.broker_url, trusted_keys=args.trusted_keys,
            labels=parse_labels(args.labels) if args.labels else None,
            accelerator=args.accelerator, api_port=args.api_port,
            root_of_trust=args.root_of_trust, trust_bundle=args.trust_bundle,
            mqtt_ca_file=args.mqtt_ca_file, mqtt_cert_file=args.mqtt_cert_file,
            mqtt_key_file=args.mqtt_key_file,
        )
        for key in cfg.trusted_keys:  # from the config file or FLEET_AGENT_TRUSTED_KEYS
            load_trusted_key(key)
        logging.basicConfig(level=args.log_level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from .daemon import Agent

        agent = Agent(cfg)
        agent.install_signal_handlers()
        agent.run()
        return 0
    except ConfigError as e:
        print(f"error: {one_line(e, limit=None)}", file=sys.stderr)
        return 2
    except DeltafleetError as e:
        print(f"error: {one_line(e, limit=None)}", file=sys.stderr)
        return 1


def _status(args: argparse.Namespace) -> int:
    from .store import LocalStore

    state_dir = args.state_dir
    if state_dir is None and args.config is not None:
        import tomllib

        try:
            state_dir = tomllib.loads(Path(args.config).read_text()).get("state_dir")
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read {args.config}: {e}") from e
    if state_dir is None:
        state_dir = Path(os.environ.get("FLEET_AGENT_STATE_DIR", "/var/lib/deltafleet"))
    state_dir = Path(state_dir)
    has_state = (state_dir / "state.json").exists()
    broker = _read_connection(state_dir / "connection.json")
    if not has_state and broker is None:
        raise ConfigError(f"no agent state in {state_dir}")
    rows = []
    if has_state:
        store = LocalStore(state_dir)
        rows = [
            {"model": m.model, "version": m.version, "sha256": m.sha256, "variant": m.variant,
             "format": m.format,
             "previous": (p.version if (p := store.previous(m.model)) else None)}
            for m in store.all_current()
        ]
    if args.json:
        print(json.dumps({"broker": broker, "models": rows}, indent=2))
        return 0
    print(broker_line(broker, time.time()))
    if broker and broker.get("api") and broker.get("running"):
        print(f"api     {broker['api']}")
    if not rows:
        print("models  none installed")
    for r in rows:
        print(f"{r['model']:<20} {r['version']:<12} {str(r['sha256'])[:12]}  {r['format']}")
    return 0


def _read_connection(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"error": f"unreadable {path.name}"}
    if not isinstance(doc, dict):
        return {"error": f"unreadable {path.name}"}
    doc["running"] = _alive(doc.get("pid"))
    return doc


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ago(then: object, now: float) -> str:
    if not isinstance(then, (int, float)):
        return "unknown"
    secs = max(0, int(now - then))
    span = (f"{secs} s" if secs < 120 else f"{secs // 60} min" if secs < 7200
            else f"{secs // 3600} h")
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(then))} ({span} ago)"


def broker_line(doc: dict | None, now: float) -> str:
    """The broker connection in one or two lines, from ``connection.json`` (plus ``running``)."""
    if doc is None:
        return "broker  unknown (no connection.json: the agent has not run with this state dir)"
    if "url" not in doc:
        return f"broker  unknown ({doc.get('error')})"
    url, error = doc["url"], doc.get("error")
    if not doc.get("running"):
        state = f"agent not running (last written {_ago(doc.get('written_at'), now)})"
        if doc.get("connected"):
            return f"broker  {url}  {state}; it was connected"
        return f"broker  {url}  {state}; it was not connected: {error or 'no answer yet'}"
    if doc.get("connected"):
        line = f"broker  {url}  connected since {_ago(doc.get('since'), now)}"
        return line + (f"\n        last error: {error}" if error else "")
    if doc.get("final"):
        return f"broker  {url}  refused us: {error}; not retrying (fix, then restart the agent)"
    if error is None:
        return f"broker  {url}  connecting (no answer yet)"
    return f"broker  {url}  not connected since {_ago(doc.get('since'), now)}: {error}"


if __name__ == "__main__":
    sys.exit(main())
