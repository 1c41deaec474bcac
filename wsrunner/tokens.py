"""Bearer tokens of the public API: their format, their digest, and their verification.

A token reads `wsr_<id>_<secret>`. The id is public and finds the row; only the SHA-256 of the
whole token is stored, and it is compared in constant time. Tokens carry 256 random bits, so a
fast digest is enough (a slow password hash protects guessable secrets, which these are not).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from wsrunner.errors import AuthenticationError, ValidationError
from wsrunner.models import ApiToken, TokenLimits
from wsrunner.payload import validate_workspace_id

if TYPE_CHECKING:
    from wsrunner.ports import TokenStore

PREFIX: Final = "wsr"
CACHE_S: Final = 5.0  #: a revoked token stops working on every daemon within this time
_FORMAT: Final = re.compile(r"wsr_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh (token id, token). The token is shown once; only its digest is stored."""
    token_id = secrets.token_hex(6)
    return token_id, f"{PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"


def token_id_of(token: str) -> str:
    """The id part of a well-formed token. Raises AuthenticationError for anything else."""
    match = _FORMAT.fullmatch(token)
    if match is None:
        raise AuthenticationError("the bearer token is malformed; expected wsr_<id>_<secret>")
    return match.group(1)


def matches(token: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(token).encode(), stored_digest.encode())


class TokenRegistry:
    """Create, list, revoke and check tokens; checks are cached for CACHE_S per daemon."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store
        self._cache: dict[str, tuple[float, ApiToken]] = {}

    async def authenticate(self, token: str) -> ApiToken:
        """The token's record if it is valid. Raises AuthenticationError, saying why not."""
        token_id = token_id_of(token)
        key = digest(token)
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < CACHE_S:
            return hit[1]
        found = await self.store.token_digest(token_id)
        if found is None or not matches(token, found[1]):
            raise AuthenticationError("the bearer token is not known")
        record = found[0]
        if record.revoked_at is not None:
            raise AuthenticationError(f"the bearer token {token_id} was revoked")
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (time.monotonic(), record)
        return record

    async def create(
        self, name: str, workspaces: Sequence[str] | None, limits: TokenLimits | None = None
    ) -> tuple[ApiToken, str]:
        """A new token scoped to `workspaces` (None: all), within `limits` (the defaults if
        None); returns (record, the token itself)."""
        if not name or len(name) > 200 or not name.isprintable():
            raise ValidationError("name", "expected 1-200 printable characters")
        if workspaces is not None:
            if not workspaces:
                raise ValidationError("workspaces", "expected at least one workspace id")
            for i, ws in enumerate(workspaces):
                validate_workspace_id(ws, f"workspaces[{i}]")
        token_id, token = new_token()
        scope = None if workspaces is None else sorted(set(workspaces))
        made = await self.store.create_token(
            token_id, name, digest(token), scope, limits or TokenLimits()
        )
        return made, token

    async def update(self, token_id: str, limits: TokenLimits) -> ApiToken:
        """Set a token's limits; daemons apply them within CACHE_S."""
        return await self.store.update_token(token_id, limits)

    async def list(self) -> list[ApiToken]:
        return await self.store.list_tokens()

    async def revoke(self, token_id: str) -> ApiToken:
        return await self.store.revoke_token(token_id)
