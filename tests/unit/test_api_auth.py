"""Pure parts of the API's authentication: failed-login windows, sessions, roles, problems."""

from __future__ import annotations

from deltafleet.server.api.auth import FailureLimiter, SessionTable
from deltafleet.server.api.problems import problem_for
from deltafleet.server.api.tokens import role_allows
from deltafleet.server.errors import CatalogError, ConflictError, NotFoundError, UsageError


def test_an_address_is_limited_after_its_failures_and_freed_when_the_window_moves():
    limiter = FailureLimiter(limit=3, window_s=60)
    for t in (0, 1, 2):
        assert limiter.retry_after("a", now=t) == 0
        limiter.failed("a", now=t)
    assert limiter.retry_after("a", now=3) == 57
    assert limiter.retry_after("b", now=3) == 0  # per address
    assert limiter.retry_after("a", now=60.5) == 0


def test_a_session_expires_and_its_csrf_token_must_match():
    table = SessionTable(ttl_s=10)
    sid, session = table.open("digest", now=0)
    assert table.get(sid, now=5) == session
    assert session.csrf_ok(session.csrf) and not session.csrf_ok("x") and not session.csrf_ok(None)
    assert table.get(sid, now=10) is None
    sid2, _ = table.open("digest", now=20)
    table.close(sid2)
    assert table.get(sid2, now=21) is None


def test_roles_are_ordered():
    assert role_allows("admin", "operator") and role_allows("operator", "viewer")
    assert not role_allows("viewer", "operator") and not role_allows("operator", "admin")


def test_errors_map_to_statuses_by_whose_fault_they_are():
    assert problem_for(NotFoundError("no group 'x'")).status == 404
    assert problem_for(ConflictError("dup")).status == 409
    assert problem_for(CatalogError("bad model")).status == 422
    assert problem_for(UsageError("bad")).detail == "bad"
    hidden = problem_for(RuntimeError("secret path /x"))
    assert hidden.status == 500 and "secret" not in hidden.detail
