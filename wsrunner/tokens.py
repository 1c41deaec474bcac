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
from typing import Final

from wsrunner.errors import AuthenticationError

PREFIX: Final = "wsr"
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
