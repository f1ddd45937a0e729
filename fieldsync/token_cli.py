"""`fieldsync-token`: print a development token signed with FIELDSYNC_JWT_SECRET.

For local runs and tests only; production tokens come from the identity
provider. The claims follow SPEC §5 (sub, tenant_id, roles, exp, aud, iss).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fieldsync.auth import (
    DEFAULT_AUDIENCE,
    DEFAULT_SERVICE_AUDIENCE,
    ENV_AUDIENCE,
    ENV_ISSUER,
    ENV_SECRET,
    ENV_SERVICE_AUDIENCE,
    SERVICE_ROLE,
    mint_token,
)

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fieldsync-token",
        description=f"Print a development token signed (HS256) with ${ENV_SECRET}.",
    )
    parser.add_argument("--tenant", required=True, help="the tenant_id claim")
    parser.add_argument("--sub", required=True, help="the sub claim (the user)")
    parser.add_argument(
        "--role",
        action="append",
        default=[],
        dest="roles",
        metavar="ROLE",
        help="a role to grant; repeat for several",
    )
    parser.add_argument(
        "--ttl", type=int, default=3600, metavar="SECONDS", help="lifetime (default 3600)"
    )
    parser.add_argument(
        "--audience", help=f"the aud claim (default ${ENV_AUDIENCE}, else {DEFAULT_AUDIENCE!r})"
    )
    parser.add_argument(
        "--service",
        action="store_true",
        help=(
            f"a service token for RecordEvents: aud ${ENV_SERVICE_AUDIENCE} (else"
            f" {DEFAULT_SERVICE_AUDIENCE!r}) and the role {SERVICE_ROLE!r}"
        ),
    )
    parser.add_argument("--issuer", help=f"the iss claim (default ${ENV_ISSUER}, else none)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    secret = os.environ.get(ENV_SECRET)
    if not secret:
        print(
            f"fieldsync-token: {ENV_SECRET} is not set; it is the key tokens are signed with",
            file=sys.stderr,
        )
        return 2
    audience = args.audience or os.environ.get(ENV_AUDIENCE) or DEFAULT_AUDIENCE
    roles = list(args.roles)
    if args.service:
        audience = args.audience or os.environ.get(ENV_SERVICE_AUDIENCE) or DEFAULT_SERVICE_AUDIENCE
        roles = [*roles, SERVICE_ROLE] if SERVICE_ROLE not in roles else roles
    try:
        token = mint_token(
            secret,
            sub=args.sub,
            tenant_id=args.tenant,
            roles=roles,
            ttl_seconds=args.ttl,
            audience=audience,
            issuer=args.issuer or os.environ.get(ENV_ISSUER) or None,
        )
    except ValueError as exc:
        print(f"fieldsync-token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
