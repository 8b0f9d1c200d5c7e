"""A small client for the agent's local inference API (stdlib + numpy, one keep-alive
connection per client; use one client per thread).

    from deltafleet.agent.client import AgentClient
    c = AgentClient(port=8470)
    r = c.predict("detector", {"input": x})      # x: np.ndarray
    r.outputs["output"], r.version, r.fallback
"""

from __future__ import annotations

import http.client
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import AgentError


class ApiError(AgentError):
    """The local API answered with an error (``status`` is the HTTP code)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True, slots=True)
class Result:
    model: str
    version: str | None
    sha256: str | None
    fallback: str | None
    latency_us: int
    outputs: dict[str, np.ndarray]


class AgentClient:
    def __init__(self, host: str = "127.0.0.1", port: int = 8470, timeout_s: float = 30.0) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                resp = self._conn.getresponse()
                data = resp.read()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (ConnectionError, http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        payload = json.dumps(body).encode() if body is not None else None
        status, _, data = self._request(method, path, payload,
                                        {"Content-Type": "application/json"})
        doc = json.loads(data or b"{}")
        if status >= 400:
            raise ApiError(status, doc.get("error", ""))
        return doc

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/v1/health")

    def models(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/models")["models"]

    def results(self, model: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        q = "&".join(f"{k}={v}" for k, v in (("model", model), ("limit", limit)) if v is not None)
        return self._json("GET", "/v1/results" + (f"?{q}" if q else ""))["results"]

    def predict(self, model: str, inputs: dict[str, np.ndarray] | np.ndarray) -> Result:
        """JSON request; ``inputs`` may be one array for a single-input model."""
        if isinstance(inputs, np.ndarray):
            body: Any = {"inputs": inputs.tolist()}
        else:
            body = {"inputs": {k: np.asarray(v).tolist() for k, v in inputs.items()}}
        doc = self._json("POST", f"/v1/models/{model}/predict", body)
        return Result(doc["model"], doc["version"], doc["sha256"], doc["fallback"],
                      doc["latency_us"], {k: np.asarray(v) for k, v in doc["outputs"].items()})

    def predict_npy(self, model: str, array: np.ndarray, input_name: str | None = None) -> Result:
        """Binary request and answer (.npy); returns the first output."""
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        path = f"/v1/models/{model}/predict" + (f"?input={input_name}" if input_name else "")
        status, headers, data = self._request(
            "POST", path, buf.getvalue(), {"Content-Type": "application/x-npy",
                                           "Accept": "application/x-npy"})
        if status >= 400:
            raise ApiError(status, json.loads(data or b"{}").get("error", ""))
        out = np.load(io.BytesIO(data), allow_pickle=False)
        return Result(model, headers.get("x-model-version") or None,
                      headers.get("x-model-sha256") or None, headers.get("x-fallback") or None,
                      int(headers.get("x-latency-us", "0")), {"output": out})
