"""Prometheus metrics of the server: fleet gauges from the store (``fleet``), this process's
counters and the /metrics endpoint (``process``), device telemetry into the store
(``telemetry``). The list of metrics and how to read them: docs/observability.md."""

from .fleet import FleetCollector
from .process import ServerMetrics
from .telemetry import apply_telemetry, device_type

__all__ = ["FleetCollector", "ServerMetrics", "apply_telemetry", "device_type"]
