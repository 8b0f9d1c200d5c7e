"""The ASGI app: versioned REST API under /api/v1, its OpenAPI schema, and the web console.

Every /api/v1 endpoint but ``GET /api/v1/health`` and the login (``POST /api/v1/session``,
which takes a token) needs a token with the endpoint's role (``ROUTES``); the console's static
files carry no data and are public. Errors are problem JSON (``problems``). The handlers are
synchronous (``handlers``) and run in a worker thread, so a slow query never blocks the loop.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import ServerConfig
from ..rollout.states import FINAL_ROLLOUT_STATES
from ..store import BlobStore, Store
from . import handlers as h
from .auth import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE, FailureLimiter, SessionTable
from .problems import ApiProblem, problem_for, problem_response
from .tokens import Principal, authenticate, role_allows
from .tokens import token_sha256 as sha

__all__ = ["ROUTES", "ApiContext", "build_app", "openapi_schema"]

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
MAX_JSON_BYTES = 1 << 20
MAX_UPLOAD_BYTES = 2 << 30
STATIC_DIR = Path(str(resources.files(__package__) / "static"))
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": ("default-src 'self'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                                "frame-ancestors 'none'; form-action 'self'"),
}


@dataclass(frozen=True)
class ApiRoute:
    method: str
    path: str  # under PREFIX, Starlette syntax ({id:int})
    handler: Callable[[h.Call], Any]
    role: str  # viewer | operator | admin
    summary: str
    query: tuple[str, ...] = ()
    body: str | None = None  # "json" | "multipart"
    status: int = 200
    form: tuple[str, ...] = ()  # multipart fields: "name", "name*" required, "name:file[]"

    @property
    def public_path(self) -> str:
        """The path as OpenAPI and messages show it (no Starlette convertors)."""
        return re.sub(r":\w+}", "}", self.path)


UPLOAD_FORM = ("file*:file", "version*", "variant", "precision", "accelerator",
               "min_runtime_version", "golden:file[]")
OPTIMIZE_FORM = ("version*", "int8:boolean", "fp16:boolean", "prune", "prune_mode", "variant",
                 "name", "max_accuracy_drop:number", "calibration:file", "eval:file")


ROUTES: tuple[ApiRoute, ...] = (
    ApiRoute("GET", "/whoami", h.whoami, "viewer", "The token's name and role."),
    ApiRoute("GET", "/fleet/summary", h.fleet_summary, "viewer",
             "Devices online, by model version and by update state."),
    ApiRoute("GET", "/devices", h.devices_list, "viewer", "List devices (filtered, paged).",
             ("group", "online", "model", "version", "state", "label", "q", "limit", "offset")),
    ApiRoute("GET", "/devices/{device_id}", h.device_show, "viewer",
             "One device: profile, labels, what it runs, what it was asked to run and why."),
    ApiRoute("GET", "/devices/{device_id}/history", h.device_history, "viewer",
             "A device's rollouts and reported update events, newest first.", ("limit",)),
    ApiRoute("GET", "/devices/{device_id}/variants", h.device_variants, "viewer",
             "Why the device gets the variant it does, per model (selection's reason)."),
    ApiRoute("GET", "/devices/{device_id}/labels", h.device_labels, "viewer",
             "A device's labels (as it reported them)."),
    # ``:path``: an id holding a "/" (%2F) reaches the handler, which refuses it as the CLI does
    ApiRoute("POST", "/devices/{device_id:path}/enroll", h.device_enroll, "admin",
             "Enroll a device: its certificate and bundle (in this response only).",
             body="json", status=201),
    ApiRoute("POST", "/devices/{device_id:path}/revoke", h.device_revoke, "admin",
             "Revoke a device: deny list and CRL; {reason}.", body="json"),
    ApiRoute("GET", "/labels", h.labels_list, "viewer",
             "Label keys in the fleet, with values and device counts."),
    ApiRoute("GET", "/groups", h.groups_list, "viewer", "Groups with their member ids."),
    ApiRoute("POST", "/groups", h.group_create, "operator",
             "Create a group: {name, match: [KEY=VALUE, ...]} or {name, all: true}.",
             body="json", status=201),
    ApiRoute("GET", "/groups/{name}", h.group_show, "viewer",
             "A group's selector and its members as devices."),
    ApiRoute("GET", "/models", h.models_list, "viewer", "Models, versions and variants."),
    ApiRoute("POST", "/models/compress", h.models_compress, "admin",
             "Store the zstd form of variants that have none: {model} or every model.",
             body="json"),
    ApiRoute("POST", "/models/optimize", h.model_optimize, "admin",
             "Make, measure and register INT8 / FP16 / pruned variants (synchronous).",
             body="multipart", status=201, form=OPTIMIZE_FORM),
    ApiRoute("GET", "/models/{name}", h.model_show, "viewer",
             "One model with every version and variant in detail."),
    ApiRoute("POST", "/models/{name}/versions", h.model_upload, "admin",
             "Register a version: multipart file, version, [variant, precision, golden].",
             body="multipart", status=201, form=UPLOAD_FORM),
    ApiRoute("GET", "/models/{name}/versions/{version}", h.version_show, "viewer",
             "One version with its variants."),
    ApiRoute("GET", "/models/{name}/versions/{version}/inspect", h.version_inspect, "viewer",
             "What a registered variant's file is (IO, ops, runtimes, memory, figures).",
             ("variant",)),
    ApiRoute("GET", "/deltas", h.deltas_list, "viewer",
             "Deltas: built (size, ratio to the full artifact), building, failed (paged).",
             ("model", "state", "limit", "offset")),
    ApiRoute("GET", "/deltas/{delta_id:int}", h.delta_show, "viewer",
             "One built delta: base -> target, codec, size, ratio to the full artifact."),
    ApiRoute("GET", "/rollouts", h.rollouts_list, "viewer", "Rollouts, newest first (paged).",
             ("state", "limit", "offset")),
    ApiRoute("POST", "/rollouts", h.rollout_create, "operator",
             "Start a rollout: {version, group, and `fleetctl rollout model` options}.",
             body="json", status=201),
    ApiRoute("GET", "/rollouts/plan", h.rollout_plan, "viewer",
             "What a rollout would send each device (sends nothing).", ("version", "group")),
    ApiRoute("GET", "/rollouts/{rollout_id:int}", h.rollout_show, "viewer",
             "A rollout's state, counts, bytes and per-device rows."),
    *(ApiRoute("POST", f"/rollouts/{{rollout_id:int}}/{a}", h.rollout_action(a), "operator",
               f"{a.capitalize()} a rollout (idempotent).", body="json")
      for a in ("pause", "resume", "abort", "rollback")),
    ApiRoute("GET", "/audit", h.audit_list, "viewer", "The audit log (paged).",
             ("since", "actor", "action", "newest_first", "limit", "offset")),
    ApiRoute("GET", "/tokens", h.tokens_list, "admin", "API tokens (never their secrets)."),
    ApiRoute("POST", "/tokens", h.token_create, "admin",
             "Create a token {name, role}; the secret is in this response only.",
             body="json", status=201),
    ApiRoute("DELETE", "/tokens/{name}", h.token_revoke, "admin", "Revoke a token."),
    ApiRoute("GET", "/keys", h.keys_show, "admin",
             "Root and key list versions, key ids, expiry, the online key id (no keys)."),
    ApiRoute("GET", "/keys/trust", h.keys_trust, "admin",
             "Public trust files: root.json, trust.json, a pending request.json."),
    ApiRoute("POST", "/keys/rotate", h.keys_rotate, "admin",
             "Rotate the online key, or the root ({root: true, new_root_pub: PEM}).",
             body="json"),
    ApiRoute("POST", "/keys/import", h.keys_import, "admin",
             "Activate a signed root / key list (the file `fleetctl keys sign` wrote).",
             body="json"),
)


@dataclass
class ApiContext:
    cfg: ServerConfig
    store: Store
    blobs: BlobStore
    sessions: SessionTable
    limiter: FailureLimiter
    secure_cookies: bool


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _json_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiProblem(400, "the request body is not valid JSON", kind="invalid-input") from None
    if not isinstance(body, dict):
        raise ApiProblem(400, "the request body must be a JSON object", kind="invalid-input")
    return body


async def _principal(ctx: ApiContext, request: Request, *, write: bool) -> Principal:
    """The request's principal, from a bearer token or a console session (CSRF on writes)."""
    client = _client(request)
    wait = ctx.limiter.retry_after(client)
    if wait > 0:
        raise ApiProblem(429, f"too many failed logins from {client}; retry in {wait:.0f} s",
                         kind="rate-limited", headers={"retry-after": str(int(wait) + 1)})
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise ApiProblem(401, "use Authorization: Bearer <token>", kind="unauthorized",
                             headers={"www-authenticate": "Bearer"})
        principal = await run_in_threadpool(_authenticate, ctx.store, secret.strip())
        if principal is None:
            ctx.limiter.failed(client)
            log.warning("API: a bad or revoked token from %s", client)
            raise ApiProblem(401, "invalid or revoked token", kind="unauthorized",
                             headers={"www-authenticate": "Bearer"})
        return principal
    session = ctx.sessions.get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        raise ApiProblem(401, "a token is required (Authorization: Bearer <token>, or log in "
                         "to the console)", kind="unauthorized",
                         headers={"www-authenticate": "Bearer"})
    principal = await run_in_threadpool(_authenticate_sha, ctx.store, session.token_sha256)
    if principal is None:
        ctx.sessions.close(request.cookies.get(SESSION_COOKIE))
        raise ApiProblem(401, "the session's token was revoked; log in again",
                         kind="unauthorized")
    if write and not (session.csrf_ok(request.headers.get(CSRF_HEADER))
                      and session.csrf_ok(request.cookies.get(CSRF_COOKIE))):
        raise ApiProblem(403, f"missing or wrong {CSRF_HEADER} header (the console sends it "
                         "from the fleet_csrf cookie)", kind="csrf")
    return principal


def _authenticate(store: Store, secret: str) -> Principal | None:
    with store.read() as s:
        return authenticate(s, secret)


def _authenticate_sha(store: Store, digest: str) -> Principal | None:
    from sqlalchemy import select  # noqa: PLC0415

    from ..store.models import ApiToken  # noqa: PLC0415

    with store.read() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.token_sha256 == digest))
        if row is None or row.revoked_at is not None:
            return None
        return Principal(row.name, row.role)


def _endpoint(ctx: ApiContext, route: ApiRoute) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        upload: Path | None = None
        try:
            principal = await _principal(ctx, request, write=route.method != "GET")
            if not role_allows(principal.role, route.role):
                raise ApiProblem(403, f"token {principal.name!r} ({principal.role}) may not "
                                 f"{route.method} {PREFIX}{route.public_path}; "
                                 f"it needs the {route.role} role", kind="forbidden")
            params = dict(request.path_params)
            for key, value in params.items():
                if isinstance(value, str):
                    h.check_text(key, value)
            call = h.Call(principal, ctx.cfg, ctx.store, ctx.blobs, params=params,
                          query={k: request.query_params.getlist(k)
                                 for k in request.query_params})
            if route.body == "json":
                call.body = _json_body(await _read_json(request))
            elif route.body == "multipart":
                upload = h.upload_dir(ctx.cfg)
                await _read_multipart(request, call, upload)
            result = await run_in_threadpool(route.handler, call)
            return JSONResponse(result, status_code=route.status)
        except Exception as e:
            p = problem_for(e)
            if p.status >= 500:
                log.exception("API %s %s failed", route.method, request.url.path)
            return problem_response(p)
        finally:
            if upload is not None:
                h.remove_upload(upload)

    return endpoint


async def _read_json(request: Request) -> bytes:
    """The body, refused (413) unread when its Content-Length says it is too big, and as soon
    as it grows past the limit when it has none (or lies)."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_JSON_BYTES:
        raise ApiProblem(413, "the JSON body is larger than 1 MiB")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_JSON_BYTES:
            raise ApiProblem(413, "the JSON body is larger than 1 MiB")
    return bytes(raw)


async def _read_multipart(request: Request, call: h.Call, into: Path) -> None:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_UPLOAD_BYTES:
        raise ApiProblem(413, f"the upload is larger than {MAX_UPLOAD_BYTES >> 30} GiB")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiProblem(415, "send the model as multipart/form-data (field 'file')")
    async with request.form(max_files=16, max_fields=32) as form:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                name = Path(value.filename or "upload").name or "upload"
                folder = into / f"{len(list(into.iterdir()))}"
                folder.mkdir()
                path = folder / name
                with path.open("wb") as out:
                    while chunk := await value.read(1 << 20):
                        out.write(chunk)
                call.files.setdefault(key, []).append(path)
            else:
                call.body[key] = value


STREAM_POLL_S = 1.0
STREAM_BACKLOG = 100  # device events a client that names no Last-Event-ID gets first
STREAM_BATCH = 500  # device events read per poll at most (a big wave takes a few polls)


def _last_event_id(request: Request) -> int | None:
    """Where a client resumes: the ``Last-Event-ID`` header (an EventSource sends it when it
    reconnects) or ``?last_event_id=``; None: from the last ``STREAM_BACKLOG`` events."""
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if raw is None or raw == "":
        return None
    if not raw.isdigit():
        raise ApiProblem(400, f"invalid Last-Event-ID {raw[:40]!r}: use the id of an event "
                         "this stream sent", kind="invalid-input")
    return int(raw)


def _sse(event: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, sort_keys=True)}\n\n"


def _stream(ctx: ApiContext) -> Callable[[Request], Any]:
    """``GET /rollouts/{id}/stream``: server-sent events. ``device`` events (``id:`` the
    event's id; data: device, from, to, reason, at), each target's state move as the
    reconciler made it, oldest first; and a ``status`` event (the rollout's JSON, as ``GET
    /rollouts/{id}``) each time it changes, after the device events that led to it; checked
    every second. A client resumes after the last event it saw (``Last-Event-ID``); without
    one it gets the last ``STREAM_BACKLOG`` device events first. The stream ends after the
    event of a final state, or when the token is revoked."""

    async def stream(request: Request) -> Response:
        try:
            principal = await _principal(ctx, request, write=False)
            rollout_id = request.path_params["rollout_id"]
            after = _last_event_id(request)
            call = h.Call(principal, ctx.cfg, ctx.store, ctx.blobs,
                          params={"rollout_id": rollout_id})
            first = await run_in_threadpool(h.rollout_show, call)  # 404 before streaming
        except Exception as e:
            return problem_response(problem_for(e))
        secret = request.headers.get("authorization", "").partition(" ")[2].strip()
        session = ctx.sessions.get(request.cookies.get(SESSION_COOKIE))

        async def still_allowed() -> bool:
            if secret:
                return await run_in_threadpool(_authenticate, ctx.store, secret) is not None
            return session is not None and await run_in_threadpool(
                _authenticate_sha, ctx.store, session.token_sha256) is not None

        async def events() -> Any:
            import anyio  # noqa: PLC0415 - starlette's own dependency

            seen = after
            data: dict[str, Any] = first
            last = None
            while True:
                moves = await run_in_threadpool(h.rollout_device_events, call, seen,
                                                STREAM_BACKLOG if seen is None else STREAM_BATCH)
                seen = moves[-1]["id"] if moves else (seen or 0)
                for move in moves:
                    yield _sse("device", move, move["id"])
                text = json.dumps(data, sort_keys=True)
                if text != last:
                    yield f"event: status\ndata: {text}\n\n"
                    last = text
                caught_up = len(moves) < STREAM_BATCH
                if (data["state"] in FINAL_ROLLOUT_STATES and caught_up) \
                        or await request.is_disconnected():
                    return
                if caught_up:
                    await anyio.sleep(STREAM_POLL_S)
                if not await still_allowed():
                    yield _sse("end", {"reason": "token revoked"})
                    return
                data = await run_in_threadpool(h.rollout_show, call)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-accel-buffering": "no"})

    return stream


def _login(ctx: ApiContext) -> Callable[[Request], Any]:
    async def login(request: Request) -> Response:
        try:
            client = _client(request)
            wait = ctx.limiter.retry_after(client)
            if wait > 0:
                raise ApiProblem(429, f"too many failed logins from {client}; retry in "
                                 f"{wait:.0f} s", kind="rate-limited",
                                 headers={"retry-after": str(int(wait) + 1)})
            body = _json_body((await request.body())[:MAX_JSON_BYTES])
            secret = body.get("token")
            principal = (await run_in_threadpool(_authenticate, ctx.store, secret.strip())
                         if isinstance(secret, str) else None)
            if principal is None:
                ctx.limiter.failed(client)
                log.warning("API: a failed console login from %s", client)
                raise ApiProblem(401, "invalid or revoked token", kind="unauthorized")
            sid, session = ctx.sessions.open(sha(secret.strip()))  # type: ignore[union-attr]
            response = JSONResponse({"name": principal.name, "role": principal.role,
                                     "csrf": session.csrf})
            for key, value, http_only in ((SESSION_COOKIE, sid, True),
                                          (CSRF_COOKIE, session.csrf, False)):
                response.set_cookie(key, value, max_age=int(ctx.sessions.ttl_s), path="/",
                                    secure=ctx.secure_cookies, httponly=http_only,
                                    samesite="strict")
            return response
        except Exception as e:
            return problem_response(problem_for(e))

    async def logout(request: Request) -> Response:
        ctx.sessions.close(request.cookies.get(SESSION_COOKIE))
        response = Response(status_code=204)
        for key in (SESSION_COOKIE, CSRF_COOKIE):
            response.delete_cookie(key, path="/", samesite="strict")
        return response

    async def dispatch(request: Request) -> Response:
        return await (login if request.method == "POST" else logout)(request)

    return dispatch


FORM_TYPES: dict[str, dict[str, Any]] = {
    "string": {"type": "string"}, "boolean": {"type": "boolean"}, "number": {"type": "number"},
    "file": {"type": "string", "format": "binary"},
    "file[]": {"type": "array", "items": {"type": "string", "format": "binary"}},
}


def _form_schema(form: tuple[str, ...]) -> dict[str, Any]:
    """A multipart body's schema from ``ApiRoute.form`` ("name*" required, "name:type")."""
    props: dict[str, Any] = {}
    required = []
    for item in form:
        name, _, kind = item.partition(":")
        if name.endswith("*"):
            name = name[:-1]
            required.append(name)
        props[name] = FORM_TYPES[kind or "string"]
    return {"type": "object", "required": required, "properties": props}


def openapi_schema() -> dict[str, Any]:
    """OpenAPI 3.1 from ``ROUTES``: every path, its role (``x-role``) and query parameters."""
    problem = {"description": "problem JSON (RFC 9457)",
               "content": {"application/problem+json": {"schema": {"$ref":
                                                                   "#/components/schemas/Problem"}}}}
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        path = PREFIX + r.public_path
        params = [{"name": p.strip("{}").split(":")[0], "in": "path", "required": True,
                   "schema": {"type": "integer" if ":int" in p else "string"}}
                  for p in r.path.split("/") if p.startswith("{")]
        params += [{"name": q, "in": "query", "required": False, "schema": {"type": "string"}}
                   for q in r.query]
        op: dict[str, Any] = {"summary": r.summary, "description": (r.handler.__doc__ or "").strip(),
                              "x-role": r.role, "parameters": params,
                              "responses": {str(r.status): {"description": "OK"},
                                            "default": problem}}
        if r.body == "json":
            op["requestBody"] = {"content": {"application/json": {"schema": {"type": "object"}}}}
        elif r.body == "multipart":
            op["requestBody"] = {"content": {"multipart/form-data": {"schema": _form_schema(
                r.form)}}}
        paths.setdefault(path, {})[r.method.lower()] = op
    paths[f"{PREFIX}/rollouts/{{rollout_id}}/stream"] = {"get": {
        "summary": "Server-sent events: each device's state move (`device`, with an id to "
                   "resume after: Last-Event-ID) and the rollout's status each time it "
                   "changes (`status`), until it ends.",
        "x-role": "viewer", "parameters": [
            {"name": "rollout_id", "in": "path", "required": True, "schema": {"type": "integer"}},
            {"name": "Last-Event-ID", "in": "header", "required": False,
             "schema": {"type": "string"}},
            {"name": "last_event_id", "in": "query", "required": False,
             "schema": {"type": "string"}}],
        "responses": {"200": {"description": "text/event-stream"}, "default": problem}}}
    paths[f"{PREFIX}/health"] = {"get": {"summary": "Liveness (no token needed).", "security": [],
                                         "responses": {"200": {"description": "OK"}}}}
    paths[f"{PREFIX}/session"] = {
        "post": {"summary": "Console login: {token} -> session cookie + CSRF token.",
                 "security": [], "responses": {"200": {"description": "OK"}, "default": problem}},
        "delete": {"summary": "Console logout.", "responses": {"204": {"description": "OK"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "deltafleet management API", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "session": {"type": "apiKey", "in": "cookie",
                                            "name": SESSION_COOKIE}},
            "schemas": {"Problem": {"type": "object", "properties": {
                "type": {"type": "string"}, "title": {"type": "string"},
                "status": {"type": "integer"}, "detail": {"type": "string"}}}}},
        "security": [{"bearer": []}, {"session": []}],
    }


class SecurityHeaders:
    """ASGI middleware: the security headers on every response, no-store on the API's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = scope["path"].startswith(PREFIX)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers.setdefault(k, v)
                if api:
                    headers["cache-control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def build_app(cfg: ServerConfig, store: Store, *, secure_cookies: bool = False,
              limiter: FailureLimiter | None = None) -> Starlette:
    ctx = ApiContext(cfg, store, BlobStore(cfg.blobs_dir), SessionTable(),
                     limiter or FailureLimiter(), secure_cookies)
    schema = openapi_schema()

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    openapi_route = ApiRoute("GET", "/openapi.json", lambda _c: schema, "viewer",
                             "This schema.")

    async def console(_: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    async def unknown(request: Request) -> Response:
        return problem_response(ApiProblem(404, f"no endpoint {request.method} "
                                           f"{request.url.path}"))

    routes: list[Any] = [Route(f"{PREFIX}/health", health, methods=["GET"]),
                         Route(f"{PREFIX}/session", _login(ctx), methods=["POST", "DELETE"]),
                         Route(f"{PREFIX}/openapi.json", _endpoint(ctx, openapi_route),
                               methods=["GET"])]
    routes += [Route(PREFIX + r.path, _endpoint(ctx, r), methods=[r.method]) for r in ROUTES]
    routes.append(Route(f"{PREFIX}/rollouts/{{rollout_id:int}}/stream", _stream(ctx),
                        methods=["GET"]))
    routes += [Route(PREFIX + "/{rest:path}", unknown,
                     methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
               Route("/", console, methods=["GET"]),
               Mount("/static", StaticFiles(directory=STATIC_DIR), name="static")]

    async def not_allowed(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        return problem_response(ApiProblem(status, f"{request.method} {request.url.path}: "
                                           f"{getattr(exc, 'detail', 'error')}"))

    app = Starlette(routes=routes, exception_handlers={404: not_allowed, 405: not_allowed},
                    middleware=[Middleware(SecurityHeaders)])
    app.state.ctx = ctx
    return app
