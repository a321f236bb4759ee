"""API keys: global keys from the settings, and keys bound to policies (per-tenant policies).

A global key (``GUARD_API_KEYS``) may use every policy. A key bound by policies' ``access``
sections may use only those policies: it sees only them in ``/v1/models``, and any other model
answers 404 ``model_not_found`` exactly as a model that does not exist would (a 403 would confirm
to one tenant that another tenant's policy exists). With no key configured anywhere, nothing is
checked; once any key is configured, every ``/v1`` request needs a valid one.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

from guard.errors import AuthenticationError


@dataclass(frozen=True)
class Caller:
    """Who is calling: their key (``None`` without authentication) and what they may use."""

    api_key: str | None
    policies: frozenset[str] | None
    """The policies this caller may use; ``None``: every policy."""

    def may_use(self, model: str) -> bool:
        return self.policies is None or model in self.policies


def authenticate(
    authorization: str | None, global_keys: tuple[str, ...], bindings: Mapping[str, frozenset[str]]
) -> Caller:
    """The caller behind an ``Authorization`` header; :class:`AuthenticationError` (401) if invalid."""
    if not global_keys and not bindings:
        return Caller(None, None)
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("Missing API key: send it as 'Authorization: Bearer YOUR_KEY'.")
    if _matches(token, global_keys):
        return Caller(token, None)
    bound = [policies for key, policies in bindings.items() if _matches(token, (key,))]
    if bound:
        return Caller(token, bound[0])
    raise AuthenticationError("Incorrect API key provided.")


def _matches(token: str, keys: tuple[str, ...]) -> bool:
    # Compare against every key (no early exit), in constant time per key.
    return sum(hmac.compare_digest(token.encode(), k.encode()) for k in keys) > 0


ADMIN_KEY_ENV = "GUARD_ADMIN_KEY"
"""Environment variable holding the operators' key (review API, ``/metrics``, ``/health/detail``)."""


def admin_key_in_force(configured: str | None) -> str | None:
    """The admin key in force: the settings' (``--admin-key-env`` or ``$GUARD_ADMIN_KEY`` at start),
    else ``$GUARD_ADMIN_KEY`` as it is now (setting it on a running server locks the operator
    endpoints at once). The one place the admin key is read."""
    return configured or os.environ.get(ADMIN_KEY_ENV, "").strip() or None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header; ``None`` for any other header."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def check_admin(token: str | None, key: str, what: str) -> None:
    """:class:`AuthenticationError` (401) unless ``token`` is the admin ``key`` (constant time)."""
    if token is None or not _matches(token, (key,)):
        raise AuthenticationError(
            f"{what} needs the admin key: send it as 'Authorization: Bearer ADMIN_KEY'."
        )
