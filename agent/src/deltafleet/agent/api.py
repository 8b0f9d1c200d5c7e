"""Local inference API: HTTP/1.1 on 127.0.0.1 for applications on the device (stdlib only).

    GET  /v1/health                    200 {"status": "ok"|"degraded", "models": {...}}
    GET  /v1/models                    {"models": [{name, version, sha256, format, previous,
                                        inputs, outputs, fallback, in_trial}]}
    GET  /v1/models/{name}             one of the above
    POST /v1/models/{name}/predict     JSON {"inputs": {input: nested list}} (dtype from the
                                       model), or a binary .npy body (Content-Type
                                       application/x-npy; single-input models, or ?input=NAME)
                                       or .npz (application/x-npz, one array per input).
                                       Answers JSON {model, version, sha256, fallback,
                                       latency_us, outputs}; with ``Accept: application/x-npy``
                                       the first output as .npy and the version in X-Model-*
                                       headers.
    GET  /v1/results[?model=&limit=]   last-N results (input sha256, outputs, version, latency)
    GET  /v1/models/{name}/results     the same for one model

    GET  /metrics                      Prometheus text exposition (``telemetry``): inference
                                       counts and latency per model and version, memory

    GET  /v1/health also carries "broker": the agent's connection (url, connected, since,
    cause, error, attempts, retry_s, final; see ``deltafleet.shared.connection``).

Errors: 400 bad input, 404 unknown model or path, 413 body too large, 503 no model (and no
fallback) can answer; always one-line JSON ``{"error": ...}``. A predict body that does not fit
the model (not JSON, missing or unknown input names, a value that is not a number, a wrong
dtype, rank or fixed dimension) answers 400 before the model runs, naming what is expected,
e.g. ``{input: float32[?,64]}`` (``?`` a dynamic dimension), and also as ``"expected"``; it
never counts as a model error in a trial.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import zipfile
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from deltafleet.shared import TensorSpec

from .errors import ModelRuntimeError
from .serving import BadRequest, ModelUnavailable, Serving

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 << 20
NPY = "application/x-npy"
NPZ = "application/x-npz"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class InputMismatch(BadRequest):
    """A predict body that does not fit the model's inputs (``expected`` names them)."""

    def __init__(self, problem: str, expected: str) -> None:
        super().__init__(f"{problem}; expected inputs {expected}")
        self.expected = expected


class InferenceApi:
    def __init__(self, serving: Serving, describe: Callable[[], list[dict[str, Any]]],
                 host: str = "127.0.0.1", port: int = 8470,
                 connection: Callable[[], dict[str, Any]] | None = None,
                 telemetry: Any = None, metrics: Callable[[], bytes] | None = None) -> None:
        self.serving = serving
        self.telemetry = telemetry  # a telemetry.TelemetryRecorder: every predict is counted
        self.metrics = metrics
        self.describe = describe
        self.connection = connection
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "fleet-agent"
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("api: " + fmt, *args)

            def do_GET(self) -> None:  # noqa: N802
                api._dispatch(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                api._dispatch(self, "POST")

        self.httpd = _Server((host, port), Handler)
        self.port = int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- routing ---------------------------------------------------------------------------
    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(h.path)
        parts = [p for p in url.path.split("/") if p]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = b""
        if method == "POST":  # read it whatever happens, so the keep-alive stream stays in step
            try:
                length = int(h.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                h.close_connection = True
                self._json(h, 400, {"error": "Content-Length must be a byte count"})
                return
            if length > MAX_BODY_BYTES:
                h.close_connection = True
                self._json(h, 413, {"error": f"body of {length} bytes exceeds {MAX_BODY_BYTES}"})
                return
            body = h.rfile.read(length)
        try:
            if method == "GET" and parts == ["metrics"] and self.metrics is not None:
                self._send(h, 200, self.metrics(), "text/plain; version=0.0.4; charset=utf-8")
            elif method == "GET" and parts == ["v1", "health"]:
                self._json(h, 200, self._health())
            elif method == "GET" and parts == ["v1", "models"]:
                self._json(h, 200, {"models": self.describe()})
            elif method == "GET" and len(parts) == 3 and parts[:2] == ["v1", "models"]:
                found = [m for m in self.describe() if m["name"] == parts[2]]
                if not found:
                    raise BadRequest(f"no model named {parts[2]!r}")
                self._json(h, 200, found[0])
            elif method == "GET" and parts == ["v1", "results"]:
                self._results(h, query.get("model"), query)
            elif method == "GET" and len(parts) == 4 and parts[:2] == ["v1", "models"] \
                    and parts[3] == "results":
                self._results(h, parts[2], query)
            elif method == "POST" and len(parts) == 4 and parts[:2] == ["v1", "models"] \
                    and parts[3] == "predict":
                self._predict(h, parts[2], query, body)
            else:
                self._json(h, 404, {"error": f"no route {method} {url.path}"})
        except InputMismatch as e:
            self._json(h, 400, {"error": str(e), "expected": e.expected})
        except BadRequest as e:
            unknown = str(e).startswith("no model named")
            self._json(h, 404 if unknown else 400, {"error": str(e)})
        except ModelUnavailable as e:
            self._json(h, 503, {"error": str(e)})
        except (ModelRuntimeError, ValueError, TypeError, KeyError) as e:
            self._json(h, 400, {"error": f"bad request: {e}"})
        except Exception as e:  # noqa: BLE001 - never leak a traceback to a client
            log.exception("api: internal error")
            self._json(h, 500, {"error": f"internal error: {type(e).__name__}"})

    # -- handlers --------------------------------------------------------------------------
    def _health(self) -> dict[str, Any]:
        models = {}
        degraded = False
        for m in self.describe():
            serving = "primary" if m.get("loaded") else ("fallback" if m.get("fallback") else "none")
            degraded |= serving != "primary"
            models[m["name"]] = {"version": m.get("version"), "serving": serving,
                                 "fallback": m.get("fallback"), "in_trial": m.get("in_trial")}
        doc: dict[str, Any] = {"status": "degraded" if degraded else "ok", "models": models}
        if self.connection is not None:
            doc["broker"] = self.connection()
        return doc

    def _results(self, h: BaseHTTPRequestHandler, model: str | None, query: dict[str, str]) -> None:
        try:
            limit = int(query["limit"]) if "limit" in query else None
        except ValueError:
            raise BadRequest("limit must be a whole number") from None
        self._json(h, 200, {"results": self.serving.last_results(model, limit)})

    def _predict(self, h: BaseHTTPRequestHandler, name: str, query: dict[str, str],
                 body: bytes) -> None:
        slot = self.serving.slots.get(name)
        if slot is None:
            raise BadRequest(f"no model named {name!r}")
        ctype = (h.headers.get("Content-Type") or "application/json").split(";")[0].strip()
        specs = _input_specs(slot)
        want = expected_inputs(specs)
        raw: dict[str, Any]
        if ctype in (NPY, "application/octet-stream"):
            single = specs[0].name if len(specs) == 1 else None
            input_name = query.get("input") or single
            if input_name is None:
                raise InputMismatch("model has several inputs: send .npz or name one with "
                                    "?input=", want)
            raw = {input_name: _load_array(body, NPY, want)}
        elif ctype == NPZ:
            raw = _load_npz(body, want)
        else:
            try:
                doc = json.loads(body or b"{}")
            except ValueError:  # also not UTF-8
                raise InputMismatch('body is not JSON: send {"inputs": {name: nested list}}',
                                    want) from None
            got = doc.get("inputs") if isinstance(doc, dict) else None
            if isinstance(got, list) and len(specs) == 1:
                got = {specs[0].name: got}
            if not isinstance(got, dict):
                raise InputMismatch('JSON body must be {"inputs": {name: nested list}}', want)
            raw = got
        feeds = conform_inputs(specs, raw)
        try:
            p = self.serving.predict(name, feeds)
        except ModelUnavailable:
            if self.telemetry is not None:
                self.telemetry.record(name, None, latency_us=None, error=True, fallback=False)
            raise
        if self.telemetry is not None:
            self.telemetry.record(name, p.version, latency_us=p.latency_us,
                                  error=p.primary_error is not None, fallback=p.fallback is not None)
        head = {"X-Model-Name": name, "X-Model-Version": p.version or "",
                "X-Model-Sha256": p.sha256 or "", "X-Fallback": p.fallback or "",
                "X-Latency-Us": str(p.latency_us)}
        if NPY in (h.headers.get("Accept") or ""):
            buf = io.BytesIO()
            np.save(buf, np.asarray(next(iter(p.outputs.values()))), allow_pickle=False)
            self._send(h, 200, buf.getvalue(), NPY, head)
            return
        self._json(h, 200, {
            "model": name, "version": p.version, "sha256": p.sha256, "fallback": p.fallback,
            "primary_error": p.primary_error, "latency_us": p.latency_us,
            "outputs": {k: np.asarray(v).tolist() for k, v in p.outputs.items()},
        }, head)

    # -- plumbing --------------------------------------------------------------------------
    def _json(self, h: BaseHTTPRequestHandler, code: int, doc: Any,
              headers: dict[str, str] | None = None) -> None:
        self._send(h, code, json.dumps(doc).encode(), "application/json", headers)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str,
              headers: dict[str, str] | None = None) -> None:
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)


def _input_specs(slot: Any) -> tuple[TensorSpec, ...]:
    """The inputs: of the primary, of the last primary during a cold-swap gap, else of the
    fallback."""
    session = slot.session
    if session is not None:
        return tuple(session.model.inputs)
    if slot.last_inputs:
        return tuple(slot.last_inputs)
    if slot.fallback is not None:
        return tuple(slot.fallback.inputs)
    return ()


def _fixed(d: Any) -> int | None:
    return d if isinstance(d, int) and not isinstance(d, bool) and d > 0 else None


def expected_inputs(specs: tuple[TensorSpec, ...]) -> str:
    """``{input: float32[?,64]}``: the names, dtypes and shapes a predict must send."""
    def dims(s: TensorSpec) -> str:
        return ",".join(str(_fixed(d)) if _fixed(d) else "?" for d in s.shape)
    return "{" + ", ".join(f"{_safe(s.name)}: {s.dtype}[{dims(s)}]" for s in specs) + "}"


def _safe(text: str) -> str:
    """A name as it may be echoed in an error: printable, no lone surrogates."""
    return text if text.isprintable() and text.isascii() else ascii(text)[1:-1]


def _numpy_dtype(name: str) -> np.dtype[Any] | None:
    try:
        return np.dtype(name)
    except TypeError:
        return None


def conform_inputs(specs: tuple[TensorSpec, ...], raw: dict[str, Any]) -> dict[str, np.ndarray]:
    """The feeds for ``specs`` from what a client sent (nested lists or arrays), or
    ``InputMismatch`` naming what is wrong and what is expected. Without specs (nothing
    loaded) the values pass as float32 / as sent."""
    want = expected_inputs(specs)
    if not specs:
        return {k: _as_array(k, v, np.dtype("float32"), want) for k, v in raw.items()}
    names = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in raw]
    unknown = [k for k in raw if k not in names]
    if missing or unknown:
        parts = ([f"missing {', '.join(map(_safe, missing))}"] if missing else []) + \
                ([f"unknown {', '.join(map(_safe, unknown))}"] if unknown else [])
        raise InputMismatch(f"inputs do not match the model: {'; '.join(parts)}", want)
    feeds = {}
    for s in specs:
        arr = _as_array(s.name, raw[s.name], _numpy_dtype(s.dtype), want)
        if arr.ndim != len(s.shape) or any(
                _fixed(d) is not None and n != d for n, d in zip(arr.shape, s.shape, strict=False)):
            got = ",".join(map(str, arr.shape))
            raise InputMismatch(f"input {_safe(s.name)} has shape [{got}]", want)
        feeds[s.name] = arr
    return feeds


def _as_array(name: str, value: Any, dtype: np.dtype[Any] | None, want: str) -> np.ndarray:
    try:
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        raise InputMismatch(f"input {_safe(name)} is not a rectangular array of numbers",
                            want) from None
    if arr.dtype.kind not in "biuf":
        raise InputMismatch(f"input {_safe(name)} is not an array of numbers "
                            f"({arr.dtype.name})", want)
    if dtype is None or arr.dtype == dtype:
        return arr
    if not np.can_cast(arr.dtype, dtype, "same_kind"):
        raise InputMismatch(f"input {_safe(name)} is {arr.dtype.name}, not {dtype.name}", want)
    return arr.astype(dtype)


def _load_array(body: bytes, kind: str, want: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise InputMismatch(f"body is not a {kind} array", want) from None


def _load_npz(body: bytes, want: str) -> dict[str, np.ndarray]:
    try:
        z = np.load(io.BytesIO(body), allow_pickle=False)
        if isinstance(z, np.ndarray):
            raise InputMismatch(f"body is not a {NPZ} archive", want)
        with z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile):
        raise InputMismatch(f"body is not a {NPZ} archive", want) from None
