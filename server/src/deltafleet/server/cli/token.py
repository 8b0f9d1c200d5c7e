"""`fleetctl token`: management API tokens (create shows the secret once; revoke; list)."""

from __future__ import annotations

from typing import Annotated

import typer

from . import remote
from ._common import JSON_HELP, WIDE_HELP, actor, console, fmt_time, open_store, print_json
from .table import Table

app = typer.Typer(no_args_is_help=True, help="Management API tokens and their roles.")


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Token name, recorded in the audit log "
                                        "(e.g. 'ci-pipeline').")],
    role: Annotated[str, typer.Option(help="viewer (reads), operator (also rollouts), admin "
                                      "(also models and tokens).")] = "viewer",
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Create a token and print its secret ONCE (only its hash is stored)."""
    if remote.active():
        out = remote.client().post("/tokens", {"name": name, "role": role})
    else:
        from ..api.tokens import create_token, token_to_json  # noqa: PLC0415

        with open_store() as store, store.session() as s:
            row, secret = create_token(s, name, role, actor())
            out = {**token_to_json(row), "token": secret}
    secret = out["token"]
    if json_:
        print_json(out)
        return
    console.print(f"created token {name} ({role}); its secret, shown only now:")
    typer.echo(secret)


@app.command("revoke")
def revoke(name: Annotated[str, typer.Argument(help="Token name.")]) -> None:
    """Revoke a token: every request with it is refused from now on."""
    if remote.active():
        changed = remote.client().delete(f"/tokens/{remote.quote_part(name)}")["changed"]
    else:
        from ..api.tokens import revoke_token  # noqa: PLC0415

        with open_store() as store, store.session() as s:
            _, changed = revoke_token(s, name, actor())
    console.print(f"revoked token {name}" if changed else f"token {name} was already revoked")


@app.command("list")
def list_cmd(json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
             wide: Annotated[bool, typer.Option("--wide", help=WIDE_HELP)] = False) -> None:
    """List tokens (names, roles, who made them, revoked or not; never the secrets)."""
    if remote.active():
        rows = remote.client().get("/tokens")
    else:
        from ..api.tokens import list_tokens, token_to_json  # noqa: PLC0415

        with open_store() as store, store.read() as s:
            rows = [token_to_json(t) for t in list_tokens(s)]
    if json_:
        print_json(rows)
        return
    table = Table("token", "role", "created (UTC)", "by", "revoked (UTC)", wide=wide)
    for t in rows:
        table.add_row(str(t["name"]), str(t["role"]), fmt_time(t["created_at"]),  # type: ignore[arg-type]
                      str(t["created_by"]), fmt_time(t["revoked_at"]) if t["revoked_at"] else "-")  # type: ignore[arg-type]
    console.print(table if rows else "no tokens; create one with `fleetctl token create`")
