"""Root of trust: the rules a device applies to roots, key lists and manifest signatures."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltafleet.server import keys
from deltafleet.server.config import ServerConfig
from deltafleet.shared import (
    KeyList,
    RootMetadata,
    SigningKey,
    TrustBundle,
    TrustStore,
    VerificationError,
    WireError,
    canonical_json,
    sign_payload,
    trust_topic,
)

NOW = 1_700_000_000
DAY = 86400


def root_env(version: int, key: SigningKey, *signers: SigningKey) -> dict:
    return sign_payload(RootMetadata(version, {key.keyid: key.public_key}).to_wire(),
                        list(signers) or [key])


def keylist_env(version: int, online: list[SigningKey], root: SigningKey, *,
                expires_at: int = NOW + 30 * DAY) -> dict:
    payload = KeyList(version, NOW - DAY, expires_at,
                      {k.keyid: k.public_key for k in online}).to_wire()
    return sign_payload(payload, [root])


def b(env: dict) -> bytes:
    return canonical_json(env)


@pytest.fixture
def root() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def online() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def store(root: SigningKey, online: SigningKey) -> TrustStore:
    s = TrustStore.pin(b(root_env(1, root)))
    s.update_keylist(b(keylist_env(1, [online], root)), NOW)
    return s


def manifest_bytes(key: SigningKey) -> bytes:
    return key.sign_bytes({"v": 1, "type": "manifest", "device_id": "dev-1"})


def test_key_list_signed_by_the_root_verifies(store: TrustStore, online: SigningKey) -> None:
    assert store.keylist is not None and store.keylist.version == 1
    assert store.verify_manifest_envelope(manifest_bytes(online), NOW)["device_id"] == "dev-1"


def test_key_list_signed_by_another_root_is_refused(store: TrustStore, online: SigningKey
                                                    ) -> None:
    mallory = SigningKey.generate()
    with pytest.raises(VerificationError):
        store.update_keylist(b(keylist_env(2, [mallory], mallory)), NOW)
    assert store.keylist is not None and store.keylist.version == 1


def test_pinning_a_root_that_is_not_self_signed_is_refused(root: SigningKey) -> None:
    other = SigningKey.generate()
    with pytest.raises(VerificationError):
        TrustStore.pin(b(root_env(1, root, other)))


def test_key_list_version_rollback_is_refused(root: SigningKey, online: SigningKey) -> None:
    s = TrustStore.pin(b(root_env(1, root)))
    s.update_keylist(b(keylist_env(5, [online], root)), NOW)
    with pytest.raises(VerificationError, match="older"):
        s.update_keylist(b(keylist_env(4, [SigningKey.generate()], root)), NOW)
    assert s.keylist is not None and s.keylist.version == 5


def test_same_key_list_version_with_other_content_is_refused(store: TrustStore,
                                                             root: SigningKey) -> None:
    with pytest.raises(VerificationError, match="differs"):
        store.update_keylist(b(keylist_env(1, [SigningKey.generate()], root)), NOW)


def test_redelivered_key_list_is_a_no_op(store: TrustStore, root: SigningKey,
                                         online: SigningKey) -> None:
    assert store.update_keylist(b(keylist_env(1, [online], root)), NOW).version == 1


def test_expired_key_list_is_refused(root: SigningKey, online: SigningKey) -> None:
    s = TrustStore.pin(b(root_env(1, root)))
    with pytest.raises(VerificationError, match="expired"):
        s.update_keylist(b(keylist_env(1, [online], root, expires_at=NOW - 1)), NOW)


def test_manifest_is_refused_once_the_trusted_key_list_expires(store: TrustStore,
                                                               online: SigningKey) -> None:
    with pytest.raises(VerificationError, match="expired"):
        store.verify_manifest_envelope(manifest_bytes(online), NOW + 365 * DAY)


def test_root_rotation_signed_by_old_and_new_root_is_accepted(store: TrustStore,
                                                              root: SigningKey) -> None:
    new_root = SigningKey.generate()
    store.update_root(b(root_env(2, new_root, root, new_root)))
    assert store.root.version == 2 and new_root.keyid in store.root.keys
    # the key list signed by the old root no longer counts
    assert store.keylist is None
    store.update_keylist(b(keylist_env(2, [SigningKey.generate()], new_root)), NOW)


def test_root_rotation_signed_by_the_new_root_only_is_refused(store: TrustStore) -> None:
    new_root = SigningKey.generate()
    with pytest.raises(VerificationError, match="signatures of root v1"):
        store.update_root(b(root_env(2, new_root, new_root)))
    assert store.root.version == 1


def test_root_rotation_signed_by_the_old_root_only_is_refused(store: TrustStore,
                                                              root: SigningKey) -> None:
    new_root = SigningKey.generate()
    with pytest.raises(VerificationError, match="its own"):
        store.update_root(b(root_env(2, new_root, root)))


def test_root_versions_cannot_be_skipped(store: TrustStore, root: SigningKey) -> None:
    new_root = SigningKey.generate()
    with pytest.raises(VerificationError, match="does not follow"):
        store.update_root(b(root_env(3, new_root, root, new_root)))


def test_manifest_signed_by_the_old_online_key_is_refused_after_rotation(
        store: TrustStore, root: SigningKey, online: SigningKey) -> None:
    new_online = SigningKey.generate()
    store.update_keylist(b(keylist_env(2, [new_online], root)), NOW)
    with pytest.raises(VerificationError):
        store.verify_manifest_envelope(manifest_bytes(online), NOW)
    assert store.verify_manifest_envelope(manifest_bytes(new_online), NOW)


def test_bundle_walks_the_root_chain_and_the_state_round_trips(
        store: TrustStore, root: SigningKey, online: SigningKey) -> None:
    new_root = SigningKey.generate()
    device = TrustStore.pin(b(root_env(1, root)))  # enrolled before the rotation
    server = TrustStore.pin(b(root_env(1, root)))
    server.update_root(b(root_env(2, new_root, root, new_root)))
    server.update_keylist(b(keylist_env(3, [online], new_root)), NOW)
    device.apply_bundle(server.bundle().to_bytes(), NOW)
    assert device.root.version == 2 and device.keylist is not None
    restored = TrustStore.from_state(device.to_state())
    assert restored.root.version == 2 and restored.keylist == device.keylist


def test_bundle_with_a_forked_root_history_is_refused(store: TrustStore, root: SigningKey,
                                                      online: SigningKey) -> None:
    forged_v1 = root_env(1, SigningKey.generate())
    bundle = TrustBundle((forged_v1,), keylist_env(2, [online], root))
    with pytest.raises(VerificationError, match="differs"):
        store.apply_bundle(bundle.to_bytes(), NOW)


def test_threshold_counts_distinct_keys(root: SigningKey) -> None:
    a, c = SigningKey.generate(), SigningKey.generate()
    payload = KeyList(1, NOW, NOW + DAY, {a.keyid: a.public_key, c.keyid: c.public_key},
                      threshold=2).to_wire()
    s = TrustStore.pin(b(root_env(1, root)))
    s.update_keylist(b(sign_payload(payload, [root])), NOW)
    twice_a = sign_payload({"x": 1}, [a, a])
    with pytest.raises(VerificationError, match="1 valid"):
        s.verify_manifest_envelope(b(twice_a), NOW)
    assert s.verify_manifest_envelope(b(sign_payload({"x": 1}, [a, c])), NOW) == {"x": 1}


def test_unknown_fields_in_a_key_list_are_refused(root: SigningKey, online: SigningKey) -> None:
    payload = KeyList(1, NOW, NOW + DAY, {online.keyid: online.public_key}).to_wire()
    payload["extra"] = 1
    s = TrustStore.pin(b(root_env(1, root)))
    with pytest.raises(WireError):
        s.update_keylist(b(sign_payload(payload, [root])), NOW)


# -- the server's key management ----------------------------------------------------------------
@pytest.fixture
def cfg(tmp_path: Path) -> ServerConfig:
    return ServerConfig.from_env({"FLEET_HOME": str(tmp_path / "home")})


def device_view(cfg: ServerConfig) -> TrustStore:
    device = TrustStore.pin(keys.pinned_root_bytes(cfg))
    topic, payload = keys.trust_publications(cfg)[0]
    assert topic == trust_topic(cfg.topic_prefix) == "deltafleet/v1/trust/keys"
    device.apply_bundle(payload, NOW + 1)
    return device


def test_server_rotation_makes_devices_refuse_the_old_online_key(cfg: ServerConfig) -> None:
    keys.init_keys(cfg, now=NOW)
    old = keys.online_signing_key(cfg, now=NOW + 1)
    device = device_view(cfg)
    assert device.verify_manifest_envelope(manifest_bytes(old), NOW + 1)
    result = keys.rotate_online_key(cfg, now=NOW + 1)  # root key in FLEET_HOME: immediate
    assert result.activated and result.keylist_version == 2
    new = keys.online_signing_key(cfg, now=NOW + 1)
    assert new.keyid != old.keyid
    device.apply_bundle(keys.trust_publications(cfg)[0][1], NOW + 1)
    with pytest.raises(VerificationError):
        device.verify_manifest_envelope(manifest_bytes(old), NOW + 1)
    assert device.verify_manifest_envelope(manifest_bytes(new), NOW + 1)


def test_offline_root_signs_a_rotation_request_that_the_server_imports(
        cfg: ServerConfig, tmp_path: Path) -> None:
    offline_root = tmp_path / "media" / "root.key"
    keys.init_keys(cfg, root_key_out=offline_root, now=NOW)
    assert not keys.paths(cfg).root_key.exists()
    old = keys.online_signing_key(cfg, now=NOW)
    pending = keys.rotate_online_key(cfg, now=NOW)
    assert not pending.activated and pending.request_path is not None
    assert keys.online_signing_key(cfg, now=NOW).keyid == old.keyid  # not active yet
    request = keys.read_signed_file(pending.request_path)
    signed = keys.sign_request(request, [SigningKey.load(offline_root)])
    keys.import_signed(cfg, signed, now=NOW)
    assert keys.online_signing_key(cfg, now=NOW).keyid != old.keyid
    assert not pending.request_path.exists()
    with pytest.raises(keys.KeysError):  # a request signed by a stranger
        keys.import_signed(cfg, keys.sign_request(request, [SigningKey.generate()]), now=NOW)


def test_server_root_rotation_needs_both_roots(cfg: ServerConfig, tmp_path: Path) -> None:
    keys.init_keys(cfg, now=NOW)
    enrolled_before = TrustStore.pin(keys.pinned_root_bytes(cfg))
    new_root = keys.generate_root_key(tmp_path / "new-root.key")
    pending = keys.rotate_root(cfg, tmp_path / "new-root.pub", now=NOW)
    assert not pending.activated and pending.request_path is not None
    request = keys.read_signed_file(pending.request_path)
    with pytest.raises(keys.KeysError, match="root v1"):
        keys.import_signed(cfg, keys.sign_request(request, [new_root]), now=NOW)
    old_root = SigningKey.load(keys.paths(cfg).root_key)
    keys.import_signed(cfg, keys.sign_request(request, [old_root, new_root]), now=NOW)
    enrolled_before.apply_bundle(keys.trust_publications(cfg)[0][1], NOW + 1)
    assert enrolled_before.root.version == 2 and new_root.keyid in enrolled_before.root.keys
    assert device_view(cfg).root.version == 2
