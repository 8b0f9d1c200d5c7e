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

Errors: 400 bad input, 404 unknown model or path, 503 no model (and no fallback) can answer.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

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


class InferenceApi:
    def __init__(self, serving: Serving, describe: Callable[[], list[dict[str, Any]]],
                 host: str = "127.0.0.1", port: int = 8470) -> None:
        self.serving = serving
        self.describe = describe
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
            length = int(h.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                h.close_connection = True
                self._json(h, 413, {"error": f"body of {length} bytes exceeds {MAX_BODY_BYTES}"})
                return
            body = h.rfile.read(length)
        try:
            if method == "GET" and parts == ["v1", "health"]:
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
        return {"status": "degraded" if degraded else "ok", "models": models}

    def _results(self, h: BaseHTTPRequestHandler, model: str | None, query: dict[str, str]) -> None:
        limit = int(query["limit"]) if "limit" in query else None
        self._json(h, 200, {"results": self.serving.last_results(model, limit)})

    def _predict(self, h: BaseHTTPRequestHandler, name: str, query: dict[str, str],
                 body: bytes) -> None:
        slot = self.serving.slots.get(name)
        if slot is None:
            raise BadRequest(f"no model named {name!r}")
        ctype = (h.headers.get("Content-Type") or "application/json").split(";")[0].strip()
        specs = _input_specs(slot)
        if ctype in (NPY, "application/octet-stream"):
            arr = np.load(io.BytesIO(body), allow_pickle=False)
            input_name = query.get("input") or (next(iter(specs)) if len(specs) == 1 else None)
            if input_name is None:
                raise BadRequest("model has several inputs: send .npz or name one with ?input=")
            feeds = {input_name: arr}
        elif ctype == NPZ:
            with np.load(io.BytesIO(body), allow_pickle=False) as z:
                feeds = {k: z[k] for k in z.files}
        else:
            doc = json.loads(body or b"{}")
            raw = doc.get("inputs") if isinstance(doc, dict) else None
            if isinstance(raw, list) and len(specs) == 1:
                raw = {next(iter(specs)): raw}
            if not isinstance(raw, dict):
                raise BadRequest('JSON body must be {"inputs": {input name: nested list}}')
            feeds = {k: np.asarray(v, dtype=specs.get(k, "float32")) for k, v in raw.items()}
        if specs and set(feeds) != set(specs):
            raise BadRequest(f"inputs {sorted(feeds)} do not match the model's {sorted(specs)}")
        p = self.serving.predict(name, feeds)
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


def _input_specs(slot: Any) -> dict[str, str]:
    """Input names and dtypes: of the primary, of the last primary during a cold-swap gap,
    else of the fallback."""
    session = slot.session
    if session is not None:
        specs = session.model.inputs
    elif slot.last_inputs:
        specs = slot.last_inputs
    elif slot.fallback is not None:
        specs = slot.fallback.inputs
    else:
        return {}
    return {s.name: s.dtype for s in specs}
