"""``fleet-agent``: the device daemon and a local status command.

Exit codes: 0 ok, 2 bad configuration or usage, 1 any other error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from deltafleet.shared import DeltafleetError

from .config import load_config, parse_labels
from .errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleet-agent", description="deltafleet device agent")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent daemon (foreground)")
    for sp in (run, sub.add_parser("status", help="show the models this device runs")):
        sp.add_argument("--config", type=Path, help="TOML config file")
        sp.add_argument("--device-id", help="device id (FLEET_AGENT_DEVICE_ID)")
        sp.add_argument("--state-dir", type=Path, help="state directory (FLEET_AGENT_STATE_DIR)")
    run.add_argument("--broker", dest="broker_url", help="mqtt://host:port (FLEET_AGENT_BROKER_URL)")
    run.add_argument("--trusted-key", dest="trusted_keys", action="append", type=Path,
                     help="legacy: server signing public key to pin (repeatable)")
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
    run.add_argument("--log-level", default="INFO")
    sub.choices["status"].add_argument("--json", action="store_true", help="JSON output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "status":
            return _status(args)
        logging.basicConfig(level=args.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        cfg = load_config(
            args.config, device_id=args.device_id, state_dir=args.state_dir,
            broker_url=args.broker_url, trusted_keys=args.trusted_keys,
            labels=parse_labels(args.labels) if args.labels else None,
            accelerator=args.accelerator, api_port=args.api_port,
            root_of_trust=args.root_of_trust, trust_bundle=args.trust_bundle,
            mqtt_ca_file=args.mqtt_ca_file, mqtt_cert_file=args.mqtt_cert_file,
            mqtt_key_file=args.mqtt_key_file,
        )
        from .daemon import Agent

        agent = Agent(cfg)
        agent.install_signal_handlers()
        agent.run()
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DeltafleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _status(args: argparse.Namespace) -> int:
    from .store import LocalStore

    state_dir = args.state_dir
    if state_dir is None:
        import os

        state_dir = Path(os.environ.get("FLEET_AGENT_STATE_DIR", "/var/lib/deltafleet"))
    if not (Path(state_dir) / "state.json").exists():
        raise ConfigError(f"no agent state in {state_dir}")
    store = LocalStore(state_dir)
    rows = [
        {"model": m.model, "version": m.version, "sha256": m.sha256, "variant": m.variant,
         "format": m.format, "previous": (p.version if (p := store.previous(m.model)) else None)}
        for m in store.all_current()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['model']:<20} {r['version']:<12} {str(r['sha256'])[:12]}  {r['format']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
