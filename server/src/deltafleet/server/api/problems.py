"""Errors as one problem-JSON shape (RFC 9457): ``type``, ``title``, ``status``, ``detail``.

``detail`` is the line ``fleetctl`` prints after ``error:`` for the same failure (the same
exception, rendered by the same ``one_line``); the HTTP status says whose fault it is.
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from deltafleet.shared import DeltafleetError, one_line

from ..errors import CatalogError, ConflictError, NotFoundError, UsageError
from ..store import StoreError

__all__ = ["ApiProblem", "problem_for", "problem_response"]

PROBLEM_JSON = "application/problem+json"
FAILED_KIND = "failed"  # a deltafleet error that is not the caller's input: its line, exit 1
TITLES = {
    400: "bad request", 401: "unauthorized", 403: "forbidden", 404: "not found",
    405: "method not allowed", 409: "conflict", 413: "content too large",
    415: "unsupported media type", 422: "unprocessable content", 429: "too many requests",
    500: "internal server error", 503: "service unavailable",
}


class ApiProblem(Exception):
    """An HTTP error with its problem-JSON fields (raised by handlers and the auth layer)."""

    def __init__(self, status: int, detail: str, *, kind: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind or TITLES.get(status, "error").replace(" ", "-")
        self.headers = headers or {}


def problem_for(e: BaseException) -> ApiProblem:
    """The problem a deltafleet error stands for (anything else is a 500 without details)."""
    if isinstance(e, ApiProblem):
        return e
    if isinstance(e, ClientDisconnect):  # the body ended before its Content-Length
        return ApiProblem(400, "the request body ended before its Content-Length",
                          kind="invalid-input")
    if isinstance(e, HTTPException) and 400 <= e.status_code < 500:  # e.g. a malformed form
        return ApiProblem(e.status_code, " ".join(str(e.detail).split())[:300]
                          or TITLES.get(e.status_code, "bad request"), kind="invalid-input")
    if isinstance(e, DeltafleetError):
        line = one_line(e, limit=None)
        if isinstance(e, NotFoundError):
            return ApiProblem(404, line, kind="not-found")
        if isinstance(e, ConflictError):
            return ApiProblem(409, line, kind="conflict")
        if isinstance(e, CatalogError):
            return ApiProblem(422, line, kind="invalid-model")
        if isinstance(e, UsageError):
            return ApiProblem(400, line, kind="invalid-input")
        if isinstance(e, StoreError):
            return ApiProblem(503, line, kind="store-unavailable")
        return ApiProblem(500, line, kind=FAILED_KIND)  # the CLI's exit-1 line
    return ApiProblem(500, "internal error (see the server log)", kind="server-error")


def problem_response(p: ApiProblem) -> JSONResponse:
    body: dict[str, Any] = {"type": f"urn:deltafleet:problem:{p.kind}",
                            "title": TITLES.get(p.status, "error"), "status": p.status,
                            "detail": p.detail}
    return JSONResponse(body, status_code=p.status, media_type=PROBLEM_JSON, headers=p.headers)
