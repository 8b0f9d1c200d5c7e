"""The fleet's and the catalog's pure rules, without a database: the selector grammar,
selector matching and how a variant's catalog info names its compressed form."""

from __future__ import annotations

from typing import Any

import pytest

from deltafleet.server.catalog import compressed_artifact
from deltafleet.server.errors import UsageError
from deltafleet.server.fleet import check_selector, device_matches
from deltafleet.server.planner import FullArtifact
from deltafleet.server.store.models import Device

SHA = "d" * 64


@pytest.mark.parametrize("selector", [
    {},
    {"arch": "aarch64"},
    {"site": "berlin", "k8s.io/zone": "a-1"},
    {"x": "v" * 256},
])
def test_valid_selector_is_returned_as_given(selector: dict[str, str]) -> None:
    assert check_selector(selector) == selector


@pytest.mark.parametrize(("selector", "says"), [
    ({"": "x"}, "invalid selector key"),
    ({"-site": "x"}, "invalid selector key"),
    ({"si te": "x"}, "invalid selector key"),
    ({"k" * 65: "x"}, "invalid selector key"),
    ({1: "x"}, "invalid selector key"),
    ({"site": ""}, "invalid value"),
    ({"site": "v" * 257}, "invalid value"),
    ({"site": 3}, "invalid value"),
])
def test_invalid_selector_is_refused_with_what_is_wrong(selector: dict[Any, Any],
                                                        says: str) -> None:
    with pytest.raises(UsageError, match=says):
        check_selector(selector)


def _device() -> Device:
    return Device(id="dev-1", arch="aarch64", os="linux", accelerator=None, cpu="a78",
                  labels={"site": "berlin", "arch": "label-not-profile"})


@pytest.mark.parametrize(("selector", "matches"), [
    ({}, True),
    ({"arch": "aarch64"}, True),
    ({"arch": "label-not-profile"}, False),
    ({"site": "berlin", "os": "linux", "cpu": "a78"}, True),
    ({"site": "paris"}, False),
    ({"accelerator": "None"}, False),
    ({"missing": "x"}, False),
])
def test_profile_keys_read_the_profile_and_other_keys_read_labels(
        selector: dict[str, str], matches: bool) -> None:
    assert device_matches(_device(), selector) is matches


@pytest.mark.parametrize(("info", "expected"), [
    ({"compressed": {"codec": "zstd", "sha256": SHA, "size_bytes": 80}},
     FullArtifact("zstd", SHA, 80)),
    (None, None),
    ({}, None),
    ({"compressed": "zstd"}, None),
    ({"compressed": {"codec": "identity", "sha256": SHA, "size_bytes": 80}}, None),
    ({"compressed": {"codec": "zstd", "sha256": "D" * 64, "size_bytes": 80}}, None),
    ({"compressed": {"codec": "zstd", "sha256": SHA, "size_bytes": 0}}, None),
    ({"compressed": {"codec": "zstd", "sha256": SHA, "size_bytes": True}}, None),
    ({"compressed": {"codec": "zstd", "sha256": SHA}}, None),
])
def test_only_a_well_formed_zstd_entry_names_a_compressed_form(
        info: dict[str, Any] | None, expected: FullArtifact | None) -> None:
    assert compressed_artifact(info) == expected
