"""`fleetctl server`: run the MQTT handler, rollout reconciler and delta builder."""

from __future__ import annotations

import dataclasses
import logging
import signal
from typing import Annotated

import typer

from ..config import ServerConfig
from ._common import open_store


def server(
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING")] = "INFO",
    api_listen: Annotated[str | None, typer.Option(
        "--api-listen", metavar="HOST:PORT",
        help="Serve the management API and web console here (default: FLEET_API_LISTEN; "
             "unset = off; PORT alone = 127.0.0.1:PORT).")] = None,
    metrics_listen: Annotated[str | None, typer.Option(
        "--metrics-listen", metavar="HOST:PORT",
        help="serve Prometheus /metrics here (default: FLEET_METRICS_LISTEN, else off)")] = None,
) -> None:
    """Run the server in the foreground until SIGTERM/SIGINT."""
    from ..config import check_listen
    from ..daemon import FleetServer

    cfg = ServerConfig.from_env()
    if api_listen:
        cfg = dataclasses.replace(cfg, api_listen=api_listen)
    if metrics_listen:
        cfg = dataclasses.replace(cfg, metrics_listen=check_listen(metrics_listen,
                                                                   "--metrics-listen"))
    store = open_store(cfg)  # a home without `fleetctl init` is refused before any log line
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with store:
        srv = FleetServer(cfg, store)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: srv.stop_event.set())
        srv.run()
