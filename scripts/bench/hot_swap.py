"""Hot swap under load: a real fleet-agent process, a real Mosquitto, the scripted server peer.

Prints ONE JSON document; exit status 1 when a swap failed (or the run broke), 0 otherwise.

- ``load``: ``--runs`` runs (5 by default), each a steady phase then ``--swaps`` hot swaps,
  under open-loop requests on the local inference API at ``--rate`` (200/s) from keep-alive
  client threads. Open loop means request k of a thread is due at t0 + k x threads / rate, and
  its latency is completion - DUE time: a send that leaves late (the previous answer was slow)
  counts its wait, so a stall is not hidden by the clients slowing down with it. A request
  counts as "during a swap" when it was due between the offer and 0.25 s after the healthy
  report (download, patch, load, warm-up, swap, trial and the old model's release all count).
  Per run: failed requests, p50/p99 steady vs during swaps, late sends, achieved rate.
- Every swap downloads and patches a NEW version: ``runs x swaps + 1`` versions are generated
  (each the previous with its last layer retrained), swap k ships the bsdiff4 delta from
  version k to k+1, and must end healthy on version k+1's sha256 (the agent's report, its
  on-disk state and the version the API answers); anything else is a failed swap.
- ``rss``: agent RSS sampled every 10 ms: steady vs peak during swaps, and idle without a model;
- ``patch``: peak RSS of applying a delta (assemble + patch + stage, as the agent does) vs the
  model size, in a fresh process.

Targets live in ``targets.json`` (key ``hot_swap``: p99 during swaps / steady, failed
requests, in every run) and are reported under ``"targets"``; a missed target is reported, not
an error. Flags have environment fallbacks for ``run_all``: BENCH_RUNS, BENCH_SWAPS,
BENCH_RATE, BENCH_MODEL_MB, BENCH_STEADY_S; ``BENCH_QUICK=1`` selects a short configuration
(one run, smaller models, shorter phases).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
QUICK = os.environ.get("BENCH_QUICK") == "1"
MODEL = "detector"
DEVICE = "bench-1"
TRIAL_WINDOW_S = 1
SWAP_TIMEOUT_S = 120
WINDOW_TAIL_S = 0.25  # a swap's window: from its offer to this long after its healthy report


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered))) - 1))]


class Load:
    """Open-loop load: every thread has its own schedule, rate/threads per second; a record is
    (due time, completion - due, ok, version answering, seconds the send left late)."""

    def __init__(self, port: int, rate: float, threads: int) -> None:
        self.port, self.rate, self.threads = port, rate, threads
        self.records: list[tuple[float, float, bool, str | None, float]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def _worker(self, index: int) -> None:
        from deltafleet.agent.client import AgentClient

        x = np.random.default_rng(index).standard_normal((1, 64)).astype(np.float32)
        interval = self.threads / self.rate
        due = time.monotonic() + index * interval / self.threads
        with AgentClient(port=self.port, timeout_s=30) as c:
            while not self.stop.is_set():
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                late = max(0.0, time.monotonic() - due)
                try:
                    r = c.predict(MODEL, x)
                    ok, version = True, r.version
                except Exception:  # noqa: BLE001 - a failed request is the figure we count
                    ok, version = False, None
                with self.lock:
                    self.records.append((due, time.monotonic() - due, ok, version, late))
                due += interval

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.workers = [threading.Thread(target=self._worker, args=(i,), daemon=True)
                        for i in range(self.threads)]
        for w in self.workers:
            w.start()

    def finish(self) -> None:
        self.stop.set()
        for w in self.workers:
            w.join(30)
        self.t1 = time.monotonic()


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append((time.monotonic(), rss_bytes(self.pid)))
            except OSError:
                return
            time.sleep(0.01)


def make_versions(directory: Path, count: int, size_mb: float) -> list[Path]:
    """``count`` models of the same size: v1 from modelgen, each later one the one before with
    its last layer retrained (fresh weights from its own seed), so consecutive deltas are small."""
    import onnx
    from onnx import numpy_helper

    from tests.harness.modelgen import make_onnx_model

    directory.mkdir(parents=True, exist_ok=True)
    paths = [make_onnx_model(directory / "v1.onnx", seed=0, size_mb=size_mb)]
    model = onnx.load(str(paths[0]))
    last = max((i for i, t in enumerate(model.graph.initializer) if t.name.endswith(".weight")),
               key=lambda i: model.graph.initializer[i].name)
    for k in range(2, count + 1):
        old = model.graph.initializer[last]
        w = numpy_helper.to_array(old)
        fresh = (np.random.default_rng([7, k]).standard_normal(w.shape)
                 / np.sqrt(w.shape[0])).astype(np.float32)
        model.graph.initializer[last].CopyFrom(numpy_helper.from_array(fresh, old.name))
        path = directory / f"v{k}.onnx"
        path.write_bytes(model.SerializeToString())
        paths.append(path)
    return paths


def _deltas(v1: Path, v2: Path, workdir: Path) -> dict[str, Path]:
    """One artifact per codec the server can build (its delta encoders, and the compressed
    full model); bsdiff4 at least."""
    import zstandard as zstd

    out: dict[str, Path] = {}
    try:
        from deltafleet.server.codecs import default_encoders

        for enc in default_encoders():
            path = workdir / f"patch.{enc.name}"
            try:
                if enc.applicable(v1, v2):
                    enc.encode(v1, v2, path)
                    out[enc.name] = path
            except Exception:  # noqa: BLE001 - a codec the server cannot build is skipped
                continue
    except ImportError:
        pass
    if "bsdiff4" not in out:
        import bsdiff4

        bsdiff4.file_diff(str(v1), str(v2), str(workdir / "patch.bsdiff4"))
        out["bsdiff4"] = workdir / "patch.bsdiff4"
    full = workdir / "full.zstd"
    full.write_bytes(zstd.ZstdCompressor(level=19).compress(v2.read_bytes()))
    out["zstd"] = full
    return out


def patch_rss(workdir: Path, size_mb: float) -> dict:
    """Apply each artifact to a ``size_mb`` model in a fresh process per codec, as the agent
    does (chunk files on disk -> verified ChunkSet.source() -> apply_to_file into the models
    directory); report peak RSS over the model size."""
    from tests.harness.modelgen import make_onnx_pair

    v1, v2 = make_onnx_pair(workdir / "patch-models", size_mb=size_mb)
    size = v2.stat().st_size
    results: dict = {"model_bytes": size, "target_x_model": 2.5,
                     "measure": "((VmHWM after apply - VmRSS before) + peak RSS of a patch child "
                                "process) / model size, agent modules already imported; the "
                                "artifact is read from its chunk files, the target streamed "
                                "to disk"}
    for codec, artifact in _deltas(v1, v2, workdir).items():
        kind = "full" if codec == "zstd" else "delta"
        child = textwrap.dedent(f"""
            import json, resource, shutil, time
            from pathlib import Path
            from deltafleet.agent.update import ChunkSet, apply_to_file
            from deltafleet.shared import (ArtifactRef, Manifest, chunk_hashes_file, sha256_file)
            import deltafleet.agent.daemon  # everything the agent has loaded when it patches

            def rss(field):
                for line in open('/proc/self/status'):
                    if line.startswith(field + ':'):
                        return int(line.split()[1]) * 1024
            v1, v2, art = Path({str(v1)!r}), Path({str(v2)!r}), Path({str(artifact)!r})
            m = Manifest('m', 'bench', 2, 0, int(time.time()) + 60, None, 'detector', 'v2',
                         'default', 'onnx', sha256_file(v2), v2.stat().st_size,
                         None if {kind!r} == 'full' else sha256_file(v1),
                         ArtifactRef({kind!r}, {codec!r}, sha256_file(art),
                                     art.stat().st_size, 65536,
                                     tuple(chunk_hashes_file(art, 65536))))
            dl = Path({str(workdir / 'dl')!r})
            shutil.rmtree(dl, ignore_errors=True)
            chunks = ChunkSet(m, dl)
            with open(art, 'rb') as f:  # what the download left on disk
                for i in range(chunks.total):
                    chunks.accept(i, f.read(65536))
            staged = Path({str(workdir / 'models')!r}) / ({codec!r} + '.onnx')
            staged.unlink(missing_ok=True)
            before = rss('VmRSS')
            t0 = time.perf_counter()
            if {codec!r} == 'bsdiff4':  # the agent's path for bsdiff4, keeping the child's peak
                from deltafleet.agent import bspatch
                child = bspatch.apply_to_file(v1, chunks.source(), m.target_size_bytes, staged,
                                              expect_sha256=m.target_sha256).child_peak_rss_bytes
            else:
                apply_to_file(m, chunks.source(), v1, staged)
                child = 0
            took = time.perf_counter() - t0
            print(json.dumps({{"before": before, "peak": rss('VmHWM'), "took_s": took,
                              "child_peak": child}}))
        """)
        res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
        if res.returncode != 0:
            results[codec] = {"error": res.stderr.strip().splitlines()[-1][:300]}
            continue
        doc = json.loads(res.stdout)
        # the agent's own growth plus a patch child process's whole peak (bsdiff4 runs there)
        extra = doc["peak"] - doc["before"] + doc["child_peak"]
        results[codec] = {
            "artifact_bytes": artifact.stat().st_size, "process_rss_before_bytes": doc["before"],
            "process_peak_rss_bytes": doc["peak"], "child_peak_rss_bytes": doc["child_peak"],
            "patch_extra_peak_bytes": extra,
            "patch_extra_peak_x_model": round(extra / size, 2), "apply_s": round(doc["took_s"], 3),
        }
    measured = [r["patch_extra_peak_x_model"] for k, r in results.items()
                if isinstance(r, dict) and "patch_extra_peak_x_model" in r]
    results["worst_x_model"] = max(measured) if measured else None
    results["meets_target"] = bool(measured) and max(measured) <= 2.5
    return results


class SwapFailed(Exception):
    """A swap that did not end healthy on the version it shipped."""


def swap(peer: Any, lab: Any, port: int, serial: int, base: Path, target: Path,
         version: str, delta: Path) -> dict:
    """Offer ``target`` as a bsdiff4 delta from ``base``; wait for trial and healthy; check the
    agent runs and serves ``target``. Raises SwapFailed otherwise."""
    from deltafleet.agent.client import AgentClient
    from deltafleet.agent.store import LocalStore
    from deltafleet.shared import sha256_file

    want = sha256_file(target)
    t0 = time.monotonic()
    m = peer.offer(DEVICE, MODEL, version, target, serial=serial, artifact=delta,
                   base_sha256=sha256_file(base), trial_window_s=TRIAL_WINDOW_S)

    def outcome(states: tuple[str, ...]) -> Any:
        try:
            return peer.wait_event(lambda e: e.manifest_id == m.manifest_id
                                   and e.state in states, SWAP_TIMEOUT_S)
        except TimeoutError as e:
            raise SwapFailed(f"{version}: {e}") from None

    trial = outcome(("trial", "failed", "rejected", "rolled_back"))
    t_trial = time.monotonic()
    if trial.state != "trial":
        raise SwapFailed(f"{version}: {trial.state}: {trial.reason}")
    done = outcome(("healthy", "failed", "rejected", "rolled_back"))
    t_done = time.monotonic()
    if done.state != "healthy":
        raise SwapFailed(f"{version}: {done.state}: {done.reason}")
    if done.sha256 not in (None, want):
        raise SwapFailed(f"{version}: healthy report names sha256 {done.sha256}, not {want}")
    on_disk = {m.model: m.sha256 for m in LocalStore(lab.agent_dir(DEVICE)).all_current()}
    if on_disk.get(MODEL) != want:
        raise SwapFailed(f"{version}: agent state runs {on_disk.get(MODEL)}, not {want}")
    with AgentClient(port=port, timeout_s=30) as c:
        served = c.predict(MODEL, np.zeros((1, 64), np.float32)).version
    if served != version:
        raise SwapFailed(f"{version}: the API answers with {served}")
    received = [e.bytes_received for e in peer.device_events(DEVICE)
                if e.manifest_id == m.manifest_id and e.bytes_received]
    return {"version": version, "t_offer": t0, "t_trial": t_trial, "t_healthy": t_done,
            "offer_to_trial_s": round(t_trial - t0, 3), "offer_to_healthy_s": round(t_done - t0, 3),
            "delta_bytes": delta.stat().st_size, "bytes_received": max(received, default=None)}


def summarise(load: Load, swaps: list[dict], targets: dict) -> dict:
    windows = [(s["t_offer"], s["t_healthy"] + WINDOW_TAIL_S) for s in swaps]

    def in_swap(t: float) -> bool:
        return any(a <= t <= b for a, b in windows)

    steady = [lat * 1e3 for t, lat, ok, _, _ in load.records if ok and not in_swap(t)]
    during = [lat * 1e3 for t, lat, ok, _, _ in load.records if ok and in_swap(t)]
    failed = sum(1 for r in load.records if not r[2])
    late = [r[4] for r in load.records if r[4] > 0.001]
    p99_steady, p99_during = pct(steady, 99), pct(during, 99)
    ratio = round(p99_during / p99_steady, 2) if p99_steady and during else None
    max_ratio = targets.get("p99_during_over_steady_max")
    max_failed = targets.get("failed_requests_max")
    met = None
    if ratio is not None and max_ratio is not None:
        met = ratio <= max_ratio and (max_failed is None or failed <= max_failed)
    return {
        "requests": len(load.records),
        "rate_achieved_rps": round(len(load.records) / (load.t1 - load.t0), 1),
        "failed_requests": failed,
        "late_sends": len(late), "late_sends_pct": round(100 * len(late) / len(load.records), 1)
        if load.records else None,
        "late_send_p99_ms": round(pct([x * 1e3 for x in late], 99), 3),
        "versions_answering": sorted({r[3] for r in load.records if r[3]}),
        "swaps": [{k: v for k, v in s.items() if not k.startswith("t_")} for s in swaps],
        "requests_during_swaps": len(during),
        "steady_ms": {"p50": round(pct(steady, 50), 3), "p99": round(p99_steady, 3)},
        "during_swap_ms": {"p50": round(pct(during, 50), 3), "p99": round(p99_during, 3)},
        "p99_during_over_steady": ratio,
        "target_met": met,
        "swap_window": f"offer -> healthy report + {WINDOW_TAIL_S} s",
        "swap_offers_at_s": [round(s["t_offer"] - load.t0, 2) for s in swaps],
        "slowest": [{"due_at_s": round(t - load.t0, 2), "latency_ms": round(lat * 1e3, 1),
                     "in_swap": in_swap(t)}
                    for t, lat, *_ in sorted(load.records, key=lambda r: -r[1])[:5]],
    }


def load_targets(path: Path) -> dict:
    try:
        return json.loads(path.read_text()).get("hot_swap", {})
    except (OSError, ValueError) as e:
        return {"error": f"cannot read {path}: {e}"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m scripts.bench.hot_swap",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=int(env("BENCH_RUNS") or (1 if QUICK else 5)))
    p.add_argument("--swaps", type=int, default=int(env("BENCH_SWAPS") or 5),
                   help="hot swaps per run, each to a new version")
    p.add_argument("--rate", type=float, default=float(env("BENCH_RATE") or 200),
                   help="requests per second, open loop")
    p.add_argument("--threads", type=int, default=8, help="keep-alive client threads")
    p.add_argument("--model-mb", "--artifact-mb", dest="model_mb", type=float,
                   default=float(env("BENCH_MODEL_MB") or (2.0 if QUICK else 8.0)))
    p.add_argument("--patch-model-mb", type=float, default=4.0 if QUICK else 16.0)
    p.add_argument("--steady-s", type=float,
                   default=float(env("BENCH_STEADY_S") or (3.0 if QUICK else 10.0)))
    p.add_argument("--no-patch", action="store_true", help="skip the patch-RSS measurement")
    p.add_argument("--targets", type=Path, default=HERE / "targets.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import bsdiff4

    from deltafleet.shared import SigningKey
    from tests.harness.fleetlab import Lab, free_port, wait_port
    from tests.harness.mqtt_peer import Peer

    opts = parse_args(argv)
    targets = load_targets(opts.targets)
    work = Path(tempfile.mkdtemp(prefix="bench-hot-swap-"))
    total = opts.runs * opts.swaps
    result: dict[str, Any] = {
        "quick": QUICK, "cpus": os.cpu_count(), "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        "config": {"runs": opts.runs, "swaps_per_run": opts.swaps, "rate_rps": opts.rate,
                   "client_threads": opts.threads, "model_mb": opts.model_mb,
                   "steady_s": opts.steady_s, "versions": total + 1, "argv": sys.argv[1:]},
        "failures": []}
    versions = make_versions(work / "models", total + 1, opts.model_mb)
    deltas = []
    for k in range(total):
        deltas.append(work / "models" / f"v{k + 1}-v{k + 2}.bsdiff4")
        bsdiff4.file_diff(str(versions[k]), str(versions[k + 1]), str(deltas[-1]))
    lab = Lab(work / "lab")
    lab.start_broker()
    key = SigningKey.generate()
    key.save(work / "signing.key", work / "signing.pub")
    peer = Peer(lab.mqtt_url, key)
    runs: list[dict] = []
    sampler = None
    windows: list[tuple[float, float]] = []
    try:
        port = free_port()
        proc = lab.start_agent(DEVICE, {"hw": "bench"}, trusted_key=work / "signing.pub",
                               extra_env={"FLEET_AGENT_API_PORT": str(port)})
        wait_port(port, 30)
        time.sleep(2.0)
        idle_rss = rss_bytes(proc.pid)
        serial = 1
        m = peer.offer(DEVICE, MODEL, "v1", versions[0], serial=serial)
        peer.wait_event(lambda e: e.manifest_id == m.manifest_id and e.state == "healthy", 120)
        sampler = RssSampler(proc.pid)
        sampler.thread.start()
        k = 0
        for _ in range(opts.runs):
            load = Load(port, opts.rate, opts.threads)
            load.start()
            swaps: list[dict] = []
            try:
                time.sleep(opts.steady_s)
                for _ in range(opts.swaps):
                    serial += 1
                    swaps.append(swap(peer, lab, port, serial, versions[k], versions[k + 1],
                                      f"v{k + 2}", deltas[k]))
                    k += 1
                    time.sleep(1.0)
                time.sleep(1.0)
            finally:
                load.finish()
                windows += [(s["t_offer"], s["t_healthy"] + WINDOW_TAIL_S) for s in swaps]
                runs.append(summarise(load, swaps, targets))
        lab.stop(f"agent-{DEVICE}")
        sampler.stop.set()
        sampler.thread.join()

        def in_swap(t: float) -> bool:
            return any(a <= t <= b for a, b in windows)

        rss_steady = [r for t, r in sampler.samples if not in_swap(t)]
        rss_swap = [r for t, r in sampler.samples if in_swap(t)]
        result["rss"] = {
            "agent_idle_no_model_bytes": idle_rss,
            "steady_median_bytes": int(statistics.median(rss_steady)) if rss_steady else 0,
            "steady_max_bytes": max(rss_steady, default=0),
            "peak_during_swap_bytes": max(rss_swap, default=0),
            "model_bytes": versions[0].stat().st_size,
        }
        if not opts.no_patch:
            result["patch"] = patch_rss(work, opts.patch_model_mb)
    except SwapFailed as e:
        result["failures"].append(f"swap {len(windows) + 1} of {total}: {e}")
    except Exception as e:  # noqa: BLE001 - a broken run is reported in the JSON, exit 1
        result["failures"].append(f"{type(e).__name__}: {e}")
        result["traceback"] = traceback.format_exc()[-2000:]
    finally:
        if sampler is not None:
            sampler.stop.set()
        peer.close()
        lab.close()
    done = sum(len(r["swaps"]) for r in runs)
    if done != total and not result["failures"]:
        result["failures"].append(f"{done} of {total} swaps done")
    result["swaps_healthy_on_expected_sha"] = done
    result["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    result["load"] = {"runs": runs,
                      "p99_during_over_steady": [r["p99_during_over_steady"] for r in runs]}
    verdicts = [r["target_met"] for r in runs]
    every = targets.get("every_run", True)
    result["targets"] = {
        "file": str(opts.targets), "targets": targets,
        "runs_met": sum(1 for v in verdicts if v), "runs": len(verdicts),
        "met": (None if not verdicts or None in verdicts or len(runs) < opts.runs
                else all(verdicts) if every else any(verdicts))}
    result["ok"] = not result["failures"]
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
