"""Hot swap under load: a real fleet-agent process, a real Mosquitto, the scripted server peer.

Prints ONE JSON document:

- ``load``: open-loop requests on the local inference API at ``rate_rps`` (200/s by default,
  ``BENCH_RATE``) from keep-alive client threads, while v1 and v2 are swapped 5 times
  (v1 -> v2 arrives as a bsdiff delta; later swaps reuse the model on disk);
  failed requests, p50/p99 latency steady vs during swaps, achieved rate;
- ``rss``: agent RSS sampled every 10 ms: steady vs peak during swaps, and idle without a model;
- ``patch``: peak RSS of applying a delta (assemble + patch + stage, as the agent does) vs the
  model size, in a fresh process.

``BENCH_QUICK=1`` runs a short configuration (smaller models, shorter phases).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

QUICK = os.environ.get("BENCH_QUICK") == "1"
RATE = float(os.environ.get("BENCH_RATE", "200"))
MODEL_MB = 2.0 if QUICK else 8.0
PATCH_MODEL_MB = 4.0 if QUICK else 16.0
STEADY_S = 3.0 if QUICK else 10.0
SWAPS = 5
CLIENT_THREADS = 8
TRIAL_WINDOW_S = 1


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
    """Open-loop load: every thread sends on its own schedule, RATE/THREADS per second."""

    def __init__(self, port: int, rate: float, threads: int) -> None:
        self.port, self.rate, self.threads = port, rate, threads
        self.records: list[tuple[float, float, bool, str | None]] = []  # (t, latency_s, ok, ver)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.late = 0

    def _worker(self, index: int) -> None:
        from deltafleet.agent.client import AgentClient

        x = np.random.default_rng(index).standard_normal((1, 64)).astype(np.float32)
        interval = self.threads / self.rate
        next_at = time.monotonic() + index * interval / self.threads
        with AgentClient(port=self.port, timeout_s=30) as c:
            while not self.stop.is_set():
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    self.late += 1
                t0 = time.monotonic()
                try:
                    r = c.predict("detector", x)
                    ok, version = True, r.version
                except Exception:  # noqa: BLE001 - a failed request is the figure we count
                    ok, version = False, None
                with self.lock:
                    self.records.append((t0, time.monotonic() - t0, ok, version))
                next_at += interval

    def start(self) -> None:
        self.workers = [threading.Thread(target=self._worker, args=(i,), daemon=True)
                        for i in range(self.threads)]
        for w in self.workers:
            w.start()

    def finish(self) -> None:
        self.stop.set()
        for w in self.workers:
            w.join(30)


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


def patch_rss(workdir: Path) -> dict:
    """Apply each artifact to a PATCH_MODEL_MB model in a fresh process per codec, as the agent
    does (chunk files on disk -> verified ChunkSet.source() -> apply_to_file into the models
    directory); report peak RSS over the model size."""
    from tests.harness.modelgen import make_onnx_pair

    v1, v2 = make_onnx_pair(workdir / "patch-models", size_mb=PATCH_MODEL_MB)
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


def main() -> int:
    import bsdiff4

    from deltafleet.shared import SigningKey, sha256_file
    from tests.harness.fleetlab import Lab, free_port, wait_port
    from tests.harness.modelgen import make_onnx_pair
    from tests.harness.mqtt_peer import Peer

    work = Path(tempfile.mkdtemp(prefix="bench-hot-swap-"))
    lab = Lab(work / "lab")
    lab.start_broker()
    key = SigningKey.generate()
    key.save(work / "signing.key", work / "signing.pub")
    peer = Peer(lab.mqtt_url, key)
    result: dict = {"quick": QUICK, "model_mb": MODEL_MB, "cpus": os.cpu_count(),
                    "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
    try:
        v1, v2 = make_onnx_pair(work / "models", size_mb=MODEL_MB)
        delta = work / "models" / "v1-v2.bsdiff"
        bsdiff4.file_diff(str(v1), str(v2), str(delta))
        port = free_port()
        proc = lab.start_agent("bench-1", {"hw": "bench"}, trusted_key=work / "signing.pub",
                               extra_env={"FLEET_AGENT_API_PORT": str(port)})
        wait_port(port, 30)
        time.sleep(2.0)
        idle_rss = rss_bytes(proc.pid)

        serial = 1
        m = peer.offer("bench-1", "detector", "v1", v1, serial=serial)
        peer.wait_event(lambda e: e.manifest_id == m.manifest_id and e.state == "healthy", 120)

        sampler = RssSampler(proc.pid)
        sampler.thread.start()
        load = Load(port, RATE, CLIENT_THREADS)
        t_start = time.monotonic()
        load.start()
        time.sleep(STEADY_S)
        windows: list[tuple[float, float]] = []
        swap_s: list[float] = []
        for i in range(SWAPS):
            serial += 1
            to_v2 = i % 2 == 0
            t0 = time.monotonic()
            if to_v2 and i == 0:
                m = peer.offer("bench-1", "detector", "v2", v2, serial=serial, artifact=delta,
                               base_sha256=sha256_file(v1), trial_window_s=TRIAL_WINDOW_S)
            else:
                target, version = (v2, "v2") if to_v2 else (v1, "v1")
                m = peer.offer("bench-1", "detector", version, target, serial=serial,
                               trial_window_s=TRIAL_WINDOW_S)
            trial = peer.wait_event(lambda e, mid=m.manifest_id: e.manifest_id == mid
                                    and e.state in ("trial", "failed", "rejected"), 120)
            t_trial = time.monotonic()
            assert trial.state == "trial", trial
            windows.append((t0, t_trial + 0.25))
            swap_s.append(t_trial - t0)
            done = peer.wait_event(lambda e, mid=m.manifest_id: e.manifest_id == mid
                                   and e.state in ("healthy", "rolled_back"), 120)
            assert done.state == "healthy", done
            time.sleep(1.0)
        time.sleep(1.0)
        load.finish()
        t_end = time.monotonic()
        result["loadavg_1m_after_load"] = round(os.getloadavg()[0], 2)
        sampler.stop.set()
        sampler.thread.join()

        def in_swap(t: float) -> bool:
            return any(a <= t <= b for a, b in windows)

        steady = [lat * 1e3 for t, lat, ok, _ in load.records if ok and not in_swap(t)]
        during = [lat * 1e3 for t, lat, ok, _ in load.records if ok and in_swap(t)]
        failed = sum(1 for r in load.records if not r[2])
        versions = {v for *_, v in load.records if v}
        rss_steady = [r for t, r in sampler.samples if not in_swap(t)]
        rss_swap = [r for t, r in sampler.samples if in_swap(t)]
        p99_steady, p99_during = pct(steady, 99), pct(during, 99)
        result["load"] = {
            "rate_target_rps": RATE,
            "rate_achieved_rps": round(len(load.records) / (t_end - t_start), 1),
            "late_sends": load.late,
            "client_threads": CLIENT_THREADS,
            "requests": len(load.records),
            "failed_requests": failed,
            "versions_answering": sorted(versions),
            "swaps": SWAPS,
            "swap_offer_to_trial_s": [round(s, 3) for s in swap_s],
            "requests_during_swaps": len(during),
            "steady_ms": {"p50": round(pct(steady, 50), 3), "p99": round(p99_steady, 3)},
            "during_swap_ms": {"p50": round(pct(during, 50), 3), "p99": round(p99_during, 3)},
            "p99_during_over_steady": round(p99_during / p99_steady, 2) if p99_steady else None,
            "target": "failed_requests == 0 and p99_during_over_steady <= 2",
        }
        result["rss"] = {
            "agent_idle_no_model_bytes": idle_rss,
            "steady_median_bytes": int(statistics.median(rss_steady)) if rss_steady else 0,
            "steady_max_bytes": max(rss_steady, default=0),
            "peak_during_swap_bytes": max(rss_swap, default=0),
            "model_bytes": v1.stat().st_size,
        }
        lab.stop("agent-bench-1")
        result["patch"] = patch_rss(work)
    finally:
        peer.close()
        lab.close()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
