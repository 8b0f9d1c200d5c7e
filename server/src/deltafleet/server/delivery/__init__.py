"""deltafleet.server.delivery: what leaves the server for a device, and how.

``manifests`` builds and signs desired-state manifests: every manifest is signed with the
server's online key before it is stored or published, and never re-signed or edited after it
was recorded as sent (a re-send is the same bytes, a change is a new manifest with a higher
serial). ``chunks`` decides which artifact chunks to publish and when (pure: dedup within a
window, the first-request window, bandwidth caps, repairs); ``artifacts`` is the chunk view of
the blob store (chunk hashes and verified chunk bytes); ``retained`` is the durable list of
artifacts whose chunks the server retained on the broker. The daemon is the MQTT adapter.
"""

from .manifests import build_manifest, sign_manifest

__all__ = ["artifacts", "build_manifest", "chunks", "manifests", "retained", "sign_manifest"]
