"""The management API and web console served by `fleetctl server` (``FLEET_API_LISTEN``).

``tokens`` (roles, hashed secrets), ``auth`` (console sessions, CSRF, failed-login limits),
``problems`` (RFC 9457 errors), ``handlers`` (endpoints calling what the CLI calls), ``app``
(the ASGI app, OpenAPI, static console under ``static/``), ``server`` (uvicorn in a thread).
Only ``tokens`` is imported by fleetctl commands; starlette and uvicorn load with the API.
"""

__all__ = ["app", "auth", "handlers", "problems", "server", "tokens"]
