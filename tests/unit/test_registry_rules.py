"""The fleet's and the catalog's pure rules, without a database: the selector grammar,
selector matching and how a variant's catalog info names its compressed form."""

from __future__ import annotations

from typing import Any

import pytest

from deltafleet.server.catalog import compressed_artifact
from deltafleet.server.errors import UsageError
from deltafleet.server.fleet import check_selector, device_matches, format_selector, parse_match
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


@pytest.mark.parametrize(("selector", "matches"), [
    ({"site": ["paris", "berlin"]}, True),
    ({"site": ["paris", "rome"]}, False),
    ({"arch": ["x86_64", "aarch64"], "site": "berlin"}, True),
    ({"arch": ["x86_64", "aarch64"], "site": ["rome"]}, False),
    ({"accelerator": ["None", "cuda"]}, False),
])
def test_any_of_selectors_match_one_of_their_values(
        selector: dict[str, Any], matches: bool) -> None:
    assert device_matches(_device(), selector) is matches


@pytest.mark.parametrize(("selector", "stored"), [
    ({"hw": ["jetson", "xavier"]}, {"hw": ["jetson", "xavier"]}),
    ({"hw": ["jetson"]}, {"hw": "jetson"}),  # one value: the plain form old selectors use
    ({"hw": "jetson", "site": ["a", "b"]}, {"hw": "jetson", "site": ["a", "b"]}),
])
def test_any_of_selectors_are_stored_backward_compatibly(
        selector: dict[str, Any], stored: dict[str, Any]) -> None:
    assert check_selector(selector) == stored


@pytest.mark.parametrize(("selector", "says"), [
    ({"hw": []}, "give 1-64 values"),
    ({"hw": ["x"] * 65}, "give 1-64 values"),
    ({"hw": ["a", "a"]}, "given twice"),
    ({"hw": ["a", ""]}, "invalid value"),
    ({"hw": ["a", 3]}, "invalid value"),
])
def test_invalid_any_of_selectors_are_refused(selector: dict[str, Any], says: str) -> None:
    with pytest.raises(UsageError, match=says):
        check_selector(selector)


@pytest.mark.parametrize(("text", "parsed"), [
    ("hw=jetson", ("hw", "jetson")),
    (" hw = jetson ", ("hw", "jetson")),
    ("hw in (jetson, xavier)", ("hw", ["jetson", "xavier"])),
    ("hw in(jetson,xavier)", ("hw", ["jetson", "xavier"])),
    ("note=a in (b)", ("note", "a in (b)")),
])
def test_match_grammar_reads_equals_and_any_of(text: str, parsed: tuple[str, Any]) -> None:
    assert parse_match(text) == parsed


@pytest.mark.parametrize("text", ["hw", "=x", "hw=", "hw in (a, )", "hw in ()"])
def test_bad_match_is_refused(text: str) -> None:
    with pytest.raises(UsageError, match="invalid --match"):
        parse_match(text)


def test_selector_is_printed_as_written() -> None:
    assert format_selector({"arch": "aarch64", "hw": ["jetson", "xavier"]}) == \
        "arch=aarch64, hw in (jetson, xavier)"
