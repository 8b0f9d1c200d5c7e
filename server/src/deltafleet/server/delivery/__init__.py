"""Delivery: what leaves the server for a device. Signed desired-state manifests
(``manifests``); the artifacts they point at go out as chunks over MQTT.

Every manifest is signed with the server's online key before it is stored or published; a
manifest is never re-signed or edited after it was recorded as sent (a re-send is the same
bytes, a change is a new manifest with a higher serial).
"""

from .manifests import build_manifest, sign_manifest

__all__ = ["build_manifest", "sign_manifest"]
