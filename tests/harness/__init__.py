"""The test harness: real processes and the fakes that stand in for one side of the protocol.

Tests, the demo and the benchmarks import it as ``tests.harness.<module>`` from the repository
root (pytest's ``pythonpath``; ``python -m scripts.demo`` / ``python -m scripts.bench.<name>``).
Nothing here is imported by ``src``.

- ``fleetlab``: ``Lab``, the processes an operator runs (broker, ``fleetctl server``,
  ``fleet-agent``s, ``fleetctl`` calls), and the port and wait helpers;
- ``broker``: Mosquitto processes of a test's own (plain, persistent);
- ``tls_broker``: a Mosquitto on the config ``fleetctl broker config`` generates, and a TLS peer;
- ``mqtt_peer``: the server side for agent tests (signs manifests, serves chunks);
- ``fleetsim``: the device side for server tests (many simulated devices in one process);
- ``rollout_lab``: ``RolloutLab``, a server thread plus a simulated fleet;
- ``modelgen``: small deterministic ONNX and TFLite models;
- ``cli``: ``fleetctl`` in-process and the one-line-error check;
- ``need``: skip, or fail under ``CI=true``, when a service is missing;
- ``cleanvenv``: a fresh virtualenv with only the distributions a test names.
"""

__all__ = ["broker", "cleanvenv", "cli", "fleetlab", "fleetsim", "modelgen", "mqtt_peer", "need",
           "rollout_lab", "tls_broker"]
