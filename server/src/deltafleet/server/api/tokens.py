"""Management API tokens: create (the secret is shown once), revoke, list, authenticate.

A token is ``dft_`` + 32 random bytes (base64url). Only its sha256 is stored; a presented
secret is hashed, looked up by that hash and compared in constant time. A revoked token stays
listed and is refused from the next request on (every request reads the token's row).

Roles are ordered: a viewer reads; an operator also rolls out, pauses, resumes, aborts and rolls
back (and creates groups); an admin also registers models and manages tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..audit import audit
from ..errors import ConflictError, NotFoundError, UsageError
from ..store.models import ApiToken

__all__ = ["ROLES", "Principal", "authenticate", "create_token", "list_tokens", "revoke_token",
           "role_allows", "token_sha256", "token_to_json"]

ROLES = ("viewer", "operator", "admin")
TOKEN_PREFIX = "dft_"
TOKEN_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,47}")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as: the token's name and role; ``actor`` is what the audit log says."""

    name: str
    role: str

    @property
    def actor(self) -> str:
        return f"api:{self.name}"


def role_allows(role: str, needed: str) -> bool:
    return ROLES.index(role) >= ROLES.index(needed)


def token_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(s: Session, name: str, role: str, actor: str) -> tuple[ApiToken, str]:
    """A new token and its secret (shown once: only the hash is kept). Audited."""
    if not TOKEN_NAME_RE.fullmatch(name):
        raise UsageError(f"invalid token name {name!r}: lowercase letters, digits, '.', '_' or "
                         "'-', up to 48 characters")
    if role not in ROLES:
        raise UsageError(f"invalid role {role!r}: use viewer, operator or admin")
    if s.scalar(select(ApiToken).where(ApiToken.name == name)) is not None:
        raise ConflictError(f"token {name!r} exists (revoked tokens keep their name; pick "
                            "another)")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name, role=role, token_sha256=token_sha256(secret), created_by=actor[:64],
                   created_at=datetime.now(UTC))
    s.add(row)
    s.flush()
    audit(s, actor, "token.create", f"token/{name}", {"role": role})
    return row, secret


def revoke_token(s: Session, name: str, actor: str) -> tuple[ApiToken, bool]:
    """Revoke a token (idempotent); returns (token, changed). Audited."""
    row = s.scalar(select(ApiToken).where(ApiToken.name == name))
    if row is None:
        raise NotFoundError(f"unknown token {name!r} (see `fleetctl token list`)")
    changed = row.revoked_at is None
    if changed:
        row.revoked_at = datetime.now(UTC)
    audit(s, actor, "token.revoke", f"token/{name}", {"changed": changed})
    return row, changed


def list_tokens(s: Session) -> list[ApiToken]:
    return list(s.scalars(select(ApiToken).order_by(ApiToken.name)))


def authenticate(s: Session, secret: str) -> Principal | None:
    """The principal of a live token with this secret, else None (unknown, malformed, revoked)."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 128:
        return None
    digest = token_sha256(secret)
    row = s.scalar(select(ApiToken).where(ApiToken.token_sha256 == digest))
    if row is None or not hmac.compare_digest(row.token_sha256, digest):
        return None
    if row.revoked_at is not None:
        return None
    return Principal(row.name, row.role)


def token_to_json(t: ApiToken) -> dict[str, object]:
    return {"name": t.name, "role": t.role, "created_by": t.created_by,
            "created_at": t.created_at.astimezone(UTC).isoformat() if t.created_at else None,
            "revoked_at": t.revoked_at.astimezone(UTC).isoformat() if t.revoked_at else None}
