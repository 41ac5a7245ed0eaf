"""API keys and tenants.

With keys configured, every route but the open ones needs `Authorization: Bearer KEY`. A key
stands for a tenant: a stable, non-secret id (the first 16 hex digits of the key's SHA-256)
that scopes conversations in the engine, so one key's conversations are invisible to another.
Keys are compared in constant time (digests of equal length, every key compared, no early
exit) and never leave this module: not in reprs, errors or logs.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from pensieve.errors import PensieveError

# Open without a key: liveness, the API description. /metrics too unless --metrics-auth.
OPEN_PATHS = frozenset({"/health", "/openapi.json"})


class AuthenticationError(PensieveError):
    """No key, or a wrong one: OpenAI's 401 body with code invalid_api_key."""

    status = 401
    type = "invalid_request_error"
    headers = {"WWW-Authenticate": 'Bearer realm="pensieve"'}

    def __init__(self, message: str):
        super().__init__(message, code="invalid_api_key")


def tenant_id(key: str) -> str:
    """The tenant a key stands for: safe to log and to show, useless to guess the key from."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def parse_keys(values: Iterable[str]) -> tuple[str, ...]:
    """Keys from flags and comma-separated environment values: stripped, empty ones dropped,
    duplicates kept once (in order)."""
    keys = (key.strip() for value in values for key in value.split(","))
    return tuple(dict.fromkeys(key for key in keys if key))


class ApiKeys:
    """The configured keys as digests, each with its tenant."""

    def __init__(self, keys: Iterable[str]):
        self._entries = [(hashlib.sha256(k.encode()).digest(), tenant_id(k)) for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._entries)} keys)"

    def tenant_for(self, authorization: str | None) -> str:
        """The tenant of an `Authorization` header; AuthenticationError unless it names a key."""
        if authorization is None:
            raise AuthenticationError(
                "Missing API key: send the header 'Authorization: Bearer <key>'"
            )
        scheme, _, token = authorization.strip().partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = ""
        matched = False
        for key, tenant in self._entries:  # no early exit: time does not depend on which key
            if hmac.compare_digest(digest, key):
                found, matched = tenant, True
        if not matched or scheme.lower() != "bearer":
            raise AuthenticationError("Incorrect API key provided")
        return found

    def protects(self, path: str, metrics_auth: bool) -> bool:
        """Whether `path` needs a key: all of them once keys exist, except the open ones."""
        if not self.enabled or path in OPEN_PATHS:
            return False
        return metrics_auth or path != "/metrics"
