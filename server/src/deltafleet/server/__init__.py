"""The deltafleet server: the fleet controller daemon and ``fleetctl``.

Public subpackages and modules, by noun: ``fleet`` (devices, groups), ``catalog`` (model
inspection and registered models), ``rollout`` (states, the pure engine, its SQL adapter),
``rollouts`` (create, plan, operator actions), ``planner`` (one plan per target), ``delivery``
(manifests, chunk scheduling, artifact chunks), ``codecs`` (delta encoders), ``audit``,
``views`` (``--json`` rendering), ``store`` (database and blobs), ``errors``; the ``daemon``,
the ``api`` (management API and console) and the ``cli`` sit at the edge. Nothing is
imported here: importing ``deltafleet.server`` stays cheap.
"""

__all__ = [
    "api",
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
    "rollout",
    "rollouts",
    "store",
    "storecheck",
    "views",
]
