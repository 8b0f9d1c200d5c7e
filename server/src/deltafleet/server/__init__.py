"""The deltafleet server: the fleet controller daemon and ``fleetctl``.

Public subpackages and modules, by noun: ``fleet`` (devices, groups), ``catalog`` (model
inspection and registered models), ``audit``, ``views`` (``--json`` rendering), ``rollouts``,
``planner``, ``delivery`` (chunk scheduling, artifact chunks), ``codecs`` (delta encoders), ``store`` (database and blobs), ``errors``; the
``daemon`` and the ``cli`` sit at the edge. Nothing is imported here: importing
``deltafleet.server`` stays cheap.
"""

__all__ = [
    "audit",
    "catalog",
    "cli",
    "codecs",
    "config",
    "controller",
    "daemon",
    "delivery",
    "deltas",
    "enroll",
    "errors",
    "fleet",
    "guard",
    "ingest",
    "keys",
    "pki",
    "planner",
    "policy",
    "rollouts",
    "store",
    "storecheck",
    "views",
]
