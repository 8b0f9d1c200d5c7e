"""The web console in a real headless browser (Debian's chromium driven by Playwright, no
browser download) against a real server (FleetServer with its API listener) and simulated
devices on a real Mosquitto. Screenshots of every page land in the module's tmp dir and in
``build/console-screenshots/`` at the repository root (gitignored; emptied at the start), and
their paths are printed."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from deltafleet.server import catalog
from deltafleet.server.api.tokens import create_token
from deltafleet.server.fleet import portraits
from deltafleet.shared import sha256_file
from deltafleet.shared.messages import BenchResult, Portrait
from tests.harness.api_client import ApiClient
from tests.harness.fleetlab import free_port, wait_port
from tests.harness.modelgen import make_incompressible_onnx_model, make_onnx_pair
from tests.harness.need import chromium
from tests.harness.rollout_lab import RolloutLab

pytestmark = [pytest.mark.broker, pytest.mark.slow]

HOSTILE = "<script>window.__pwned = 1</script><img src=x onerror=window.__pwned=2>"
TIMEOUT_MS = 60_000
SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "console-screenshots"


def hostile_portrait(lab: RolloutLab, device_id: str) -> None:
    """A portrait and benchmarks whose every free-text field is markup, stored as the server
    stores what an agent reports (the guard lets text through: it is the page's job)."""
    now = datetime.now(UTC)
    with lab.store.session() as s:
        portraits.record_portraits(s, [Portrait(device_id, {
            "runtimes": {"onnxruntime": "1.20.1"}, "accelerators": ["cpu"],
            "providers": [{"runtime": "onnxruntime", "name": "CPUExecutionProvider", "ok": True},
                          {"runtime": "onnxruntime", "name": "CUDAExecutionProvider",
                           "ok": False, "error": HOSTILE}],
            "cpu": {"count": 4, "model": HOSTILE, "flags": ["avx2"]},
            "memory": {"total_bytes": 8 << 30, "available_bytes": 6 << 30},
            "disk": {"free_bytes": 1 << 34, "total_bytes": 1 << 35},
            "power": [{"kind": "rapl", "name": HOSTILE, "energy_uj": 5}]})], now)
        shas = {v: sha256_file(lab.files[v]) for v in ("v1", "v2")}
        portraits.record_bench_results(s, [
            BenchResult("b-1", device_id, "bench-1", "default", shas["v1"], "onnxruntime",
                        "1.20.1", {"p50_us": 900, "p95_us": 1400, "load_ms": 12,
                                   "model_rss_bytes": 3 << 20, "runs": 50}),
            BenchResult("b-2", device_id, "bench-1", "default", shas["v2"], "onnxruntime",
                        "1.20.1", {}, error=HOSTILE)], now)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, broker) -> Iterator[dict[str, Any]]:
    executable = chromium()
    root = tmp_path_factory.mktemp("console")
    v1, v2 = make_onnx_pair(root / "models", size_mb=0.3)
    lab = RolloutLab(root, broker.url, {"v1": v1, "v2": v2})
    port = free_port()
    lab.cfg = dataclasses.replace(lab.cfg, api_listen=f"127.0.0.1:{port}")
    with lab.store.session() as s:
        tokens = {role: create_token(s, f"{role}-web", role, "test")[1]
                  for role in ("viewer", "operator", "admin")}
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)

    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=executable)
    try:
        lab.start_server()
        wait_port(port, 15)
        lab.add_devices(2, {"hw": "jetson"})
        lab.add_devices(1, {"hw": "jetson", "note": HOSTILE}, prefix="odd")
        hostile_portrait(lab, "odd-000")
        lab.group("jetson", hw="jetson")
        shots = root / "screenshots"
        shots.mkdir()
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for old in SCREENSHOTS.glob("*.png"):
            old.unlink()
        yield {"lab": lab, "port": port, "base": f"http://127.0.0.1:{port}", "tokens": tokens,
               "browser": browser, "shots": shots, "v2": v2}
    finally:
        browser.close()
        pw.stop()
        lab.close()
        print("console screenshots:", *sorted(map(str, SCREENSHOTS.glob("*.png"))), sep="\n  ")


def shot(site, page, name: str) -> Path:
    """The page as a PNG in the module's tmp dir and in ``build/console-screenshots/``."""
    path = site["shots"] / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    stable = SCREENSHOTS / path.name
    stable.write_bytes(path.read_bytes())
    print(f"screenshot: {stable} ({path})")
    return stable


def login(site, role: str, *, screenshot: str | None = None, bypass_csp: bool = False):
    page = site["browser"].new_context(bypass_csp=bypass_csp).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(site["base"] + "/#/login")
    page.wait_for_selector("#login-form")
    if screenshot:
        shot(site, page, screenshot)
    page.fill("#token", site["tokens"][role])
    page.click("#login-submit")
    page.wait_for_selector("#devices")
    return page


def api(site, role: str) -> ApiClient:
    return ApiClient(site["port"], site["tokens"][role])


def test_login_leads_to_the_fleet_overview(site):
    page = login(site, "operator", screenshot="01-login")
    assert page.text_content("#who") == "operator-web (operator)"
    assert page.text_content("#card-devices .n") == "3"
    expect(page.locator("#card-online .n")).to_have_text("3")
    rows = page.locator("#devices tbody tr")
    assert rows.count() == 3
    shot(site, page, "02-fleet-overview")
    page.goto(site["base"] + "/#/?limit=2")
    expect(page.locator("#pager")).to_contain_text("devices 1-2 of 3")
    page.click("#pager >> text=next")
    expect(page.locator("#pager")).to_contain_text("devices 3-3 of 3")
    expect(page.locator("#devices tbody tr")).to_have_count(1)
    page.goto(site["base"] + "/#/?label=hw%3Djetson&q=odd")
    expect(page.locator("#pager")).to_contain_text("devices 1-1 of 1")
    expect(page.locator("#devices tbody")).to_contain_text("odd-000")


def test_a_bad_token_is_refused_at_the_login_form(site):
    page = site["browser"].new_context().new_page()
    page.goto(site["base"] + "/#/login")
    page.fill("#token", "dft_not-a-token")
    page.click("#login-submit")
    expect(page.locator("#login-error")).to_have_text("invalid or revoked token")


def test_a_rollout_started_from_the_api_completes_on_the_live_page(site):
    created = api(site, "operator").post("/api/v1/rollouts", {
        "version": "detector:v2", "group": "jetson", "health_window": "1s",
        "retry_backoff": "1s"})
    assert created.status == 201, created
    rid = created.body["id"]
    page = login(site, "operator")
    page.goto(f"{site['base']}/#/rollout/{rid}")
    page.wait_for_selector("#rollout-state")
    shot(site, page, "03-rollout-live-running")
    expect(page.locator("#rollout-state")).to_have_text("completed", timeout=TIMEOUT_MS)
    expect(page.locator("#bytes")).to_contain_text("bytes sent")
    states = page.locator("#targets tbody tr td:nth-child(3)").all_text_contents()
    assert states == ["healthy"] * 3
    # each device's moves arrived as stream events, newest first, ending in healthy
    expect(page.locator("#stream-state")).to_have_text("ended: completed")
    moves = page.locator("#events tbody tr td:nth-child(3)").all_text_contents()
    assert "new → pending" in moves and sum(m.endswith("→ healthy") for m in moves) == 3
    for device in ("sim-000", "sim-001", "odd-000"):
        cells = page.locator("#events tbody tr", has_text=device)
        expect(cells.first.locator("td:nth-child(3)")).to_contain_text("→ healthy")
    # what the state allows: a completed rollout cannot be paused, but can be rolled back
    expect(page.locator("#btn-pause")).to_be_disabled()
    expect(page.locator("#btn-rollback")).to_be_enabled()
    shot(site, page, "04-rollout-live-completed")
    page.goto(site["base"] + "/#/rollouts")
    page.wait_for_selector("#rollouts")
    assert str(rid) in page.text_content("#rollouts")
    shot(site, page, "05-rollouts")


def test_an_operator_pauses_a_rollout_from_the_live_page(site):
    created = api(site, "operator").post("/api/v1/rollouts", {
        "version": "detector:v1", "group": "jetson", "canary": "1", "health_window": "120s"})
    rid = created.body["id"]
    site["paused_rollout"] = rid
    page = login(site, "operator")
    page.goto(f"{site['base']}/#/rollout/{rid}")
    page.wait_for_selector("#btn-pause")
    page.click("#btn-pause")
    expect(page.locator("#rollout-state")).to_have_text("paused")
    assert api(site, "operator").get(f"/api/v1/rollouts/{rid}").body["state"] == "paused"
    audit = api(site, "viewer").get("/api/v1/audit", query={"action": "rollout.pause"}).body
    assert [e["actor"] for e in audit["items"]] == ["api:operator-web"]
    shot(site, page, "06-rollout-paused-by-operator")


def test_a_viewer_sees_no_action_buttons_and_its_writes_are_refused(site):
    rid = site.get("paused_rollout")
    assert rid is not None, "runs after the operator test"
    page = login(site, "viewer")
    page.goto(f"{site['base']}/#/rollout/{rid}")
    page.wait_for_selector("#readonly-note")
    assert page.locator("#actions button").count() == 0
    status = page.evaluate("""async (rid) => {
        const csrf = document.cookie.split('; ').find(c => c.startsWith('fleet_csrf=')).slice(11);
        const r = await fetch(`/api/v1/rollouts/${rid}/resume`, {method: 'POST',
            headers: {'X-CSRF-Token': csrf, 'Content-Type': 'application/json'}, body: '{}'});
        return [r.status, (await r.json()).detail];
    }""", rid)
    assert status[0] == 403 and "viewer" in status[1]
    assert api(site, "viewer").get(f"/api/v1/rollouts/{rid}").body["state"] == "paused"
    shot(site, page, "07-rollout-as-viewer")


def test_a_hostile_label_is_shown_as_text(site):
    # without the CSP's help: the escaping alone must hold
    page = login(site, "viewer", bypass_csp=True)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{site['base']}/#/device/odd-000")
    page.wait_for_selector("#labels")
    cells = page.locator("#labels tbody td").all_text_contents()
    assert cells == ["hw", "jetson", "note", HOSTILE]
    assert page.evaluate("window.__pwned") is None and dialogs == []
    assert page.locator("#main script, #main img").count() == 0
    assert page.text_content("#device-id") == "odd-000"
    assert page.locator("#history tbody tr").count() >= 1
    # the portrait and the benchmarks: the cpu name, a provider's error, a sensor's name and
    # a benchmark's error are the device's words, shown as those characters
    portrait = dict(zip(page.locator("#portrait tbody td:nth-child(1)").all_text_contents(),
                        page.locator("#portrait tbody td:nth-child(2)").all_text_contents(),
                        strict=True))
    assert portrait["cpu"] == f"4 × {HOSTILE} (avx2)"
    assert portrait["providers"] == f"CPUExecutionProvider, CUDAExecutionProvider (failed: {HOSTILE})"
    assert portrait["power sensors"] == f"{HOSTILE} (rapl)"
    assert portrait["memory"] == "6.0 GiB available of 8.0 GiB"
    expect(page.locator("#benchmarks tbody tr")).to_have_count(2)
    bench = {r.locator("td").first.text_content(): r.locator("td").all_text_contents()
             for r in page.locator("#benchmarks tbody tr").all()}
    assert bench["detector:v1/default"][3:5] == ["900 µs", "1400 µs"]
    assert bench["detector:v2/default"][-1] == HOSTILE
    # what it runs, what it was asked, and why this variant
    variants = page.locator("#variants tbody tr").first.locator("td").all_text_contents()
    assert variants[0] == "detector" and "by format" in variants[6]
    assert page.locator("#main script, #main img").count() == 0
    assert page.evaluate("window.__pwned") is None and dialogs == []
    shot(site, page, "08-device")
    page.goto(site["base"] + "/#/")
    page.wait_for_selector("#devices")
    assert HOSTILE in page.text_content("#devices")
    assert page.evaluate("window.__pwned") is None


def test_the_model_catalog_lists_versions_variants_and_sizes(site):
    page = login(site, "viewer")
    page.goto(site["base"] + "/#/models")
    page.wait_for_selector("#models")
    rows = page.locator("#models tbody tr").all_text_contents()
    assert len(rows) == 2 and "v1" in rows[0] and "KiB" in rows[0]
    assert page.locator("#upload").count() == 0  # only admins register models
    # the delta the server built for the v1 -> v2 rollout, weighed against the full install
    built = api(site, "viewer").get("/api/v1/deltas", query={"state": "built"}).body["items"]
    (up,) = [d for d in built if (d["base"], d["target"]) == ("detector:v1/default",
                                                              "detector:v2/default")]
    cells = page.locator("#deltas tbody tr").nth(built.index(up)).locator("td")
    assert cells.all_text_contents()[:4] == ["detector:v1/default", "detector:v2/default",
                                             "built", up["codec"]]
    assert cells.nth(6).text_content() == f"{100 * up['ratio']:.1f}%"
    shot(site, page, "09-models")


def test_an_admin_registers_a_model_from_the_catalog_page(site):
    page = login(site, "admin")
    page.goto(site["base"] + "/#/models")
    page.wait_for_selector("#upload")
    page.fill("#upload input[name=name]", "classifier")
    page.fill("#upload input[name=version]", "v1")
    page.set_input_files("#upload input[name=file]", str(site["v2"]))
    page.click("#upload button[type=submit]")
    expect(page.locator("#models tbody")).to_contain_text("classifier")
    audit = api(site, "viewer").get("/api/v1/audit", query={"action": "model.add"}).body["items"]
    assert [(e["actor"], e["subject"]) for e in audit] == [("api:admin-web", "classifier:v1")]
    shot(site, page, "10-models-after-upload")


def test_a_hostile_failure_reason_is_shown_as_text_in_the_live_events(site, tmp_path):
    """Last in the module: it adds a device."""
    lab = site["lab"]
    probe = make_incompressible_onnx_model(tmp_path / "probe.onnx", size_mb=0.05)
    with lab.store.session() as s:  # a file no device has: it is downloaded and applied
        catalog.add_model_version(s, lab.blobs, "probe", "v1", probe)
    # a device of its own (the others may still be busy with the paused rollout's trial)
    lab.add_devices(1, {"hw": "edge"}, prefix="bad", version=None)
    lab.group("edge", hw="edge")
    knobs = lab.fleet.devices["bad-000"].knobs
    knobs.fail_apply, knobs.apply_error = True, HOSTILE
    created = api(site, "operator").post("/api/v1/rollouts", {
        "version": "probe:v1", "group": "edge", "retry_backoff": "1s", "max_attempts": 1})
    assert created.status == 201, created
    page = login(site, "viewer", bypass_csp=True)  # the escaping alone must hold
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{site['base']}/#/rollout/{created.body['id']}")
    failed = page.locator("#events tbody tr", has_text="→ failed")
    expect(failed.first).to_be_visible()
    assert HOSTILE in failed.first.locator("td").nth(3).text_content()
    expect(page.locator("#targets")).to_contain_text(HOSTILE)
    assert page.locator("#main script, #main img").count() == 0
    assert page.evaluate("window.__pwned") is None and dialogs == []
    shot(site, page, "11-rollout-events-hostile-reason")
