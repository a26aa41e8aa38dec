"""Tokens: HS256 JWTs with ``sub`` (the user id) and ``exp`` required.

Verification is pinned to HS256 (no ``alg: none``, no algorithm confusion), requires ``exp``,
and allows a bounded clock skew. Token text is never logged or stored.

Exceptions (defined in :mod:`runtime.errors`, the package's one tree)::

    AuthError
    ConfigError     the secret is too short to sign with
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass

import jwt

from .errors import AuthError, ConfigError

__all__ = ["AuthError", "Identity", "TokenAuthority", "valid_user_id"]

_USER_ID = re.compile(r"^[A-Za-z0-9_.@:+-]{1,128}$")


def valid_user_id(user_id: str) -> bool:
    return bool(_USER_ID.match(user_id))


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    expires_at: float


class TokenAuthority:
    """Mints and verifies tokens with one HS256 secret."""

    ALGORITHM = "HS256"

    MIN_SECRET_BYTES = 32

    def __init__(self, secret: str | None, *, leeway_s: float = 30.0) -> None:
        if secret is not None and len(secret.encode()) < self.MIN_SECRET_BYTES:
            # RFC 7518 3.2: an HS256 key shorter than the hash is guessable.
            raise ConfigError(
                "RUNWATCH_JWT_SECRET", secret, f"at least {self.MIN_SECRET_BYTES} bytes long"
            )
        #: In dev mode (no secret) a random per-process secret signs the dev tokens.
        self.secret = secret or secrets.token_urlsafe(32)
        self.leeway_s = leeway_s

    def mint(self, user_id: str, ttl_s: float = 3600.0, now: float | None = None) -> str:
        if not valid_user_id(user_id):
            raise AuthError("user id must be 1-128 characters of [A-Za-z0-9_.@:+-]")
        issued = int(now if now is not None else time.time())
        payload = {"sub": user_id, "iat": issued, "exp": issued + int(ttl_s)}
        return jwt.encode(payload, self.secret, algorithm=self.ALGORITHM)

    def verify(self, token: str) -> Identity:
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=[self.ALGORITHM],
                options={"require": ["exp", "sub"]},
                leeway=self.leeway_s,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token ({type(exc).__name__})") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not valid_user_id(sub):
            raise AuthError("invalid token subject")
        return Identity(user_id=sub, expires_at=float(claims["exp"]))
