"""deltafleet.server.delivery: getting artifacts to devices.

``chunks`` decides which chunks to publish and when (pure: dedup within a window, the
first-request window, bandwidth caps, repairs); ``artifacts`` is the chunk view of the blob
store (chunk hashes and verified chunk bytes). The daemon is the MQTT adapter around both.
"""

__all__ = ["artifacts", "chunks"]
