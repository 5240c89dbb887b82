"""API keys: with `WANSERVE_API_KEY` set, every route that reads or changes jobs asks for one.

Sent as `Authorization: Bearer <key>` (the OpenAI SDK's `api_key`) or `X-API-Key: <key>`. Liveness, readiness
and metrics stay open: probes and scrapers do not carry keys. A browser cannot add either header to a request
another site makes it send, so a key also keeps web pages from creating, reading or cancelling jobs.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence

from fastapi import Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import Request

from wanserve.config import Settings
from wanserve.errors import WanserveError


class Unauthorized(WanserveError, PermissionError):
    """No key, or not one of the server's (401)."""


def presented_key(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def key_matches(presented: str | None, keys: Sequence[str]) -> bool:
    """Compared in constant time, against every key, so timing tells nothing about which came close."""
    if presented is None:
        return False
    given = presented.encode()
    return any([hmac.compare_digest(given, key.encode()) for key in keys])


# Declared as security schemes, so /docs offers an "Authorize" button and the OpenAPI says what to send.
_BEARER = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>` (the OpenAI SDK's api_key)")
_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="the key, for clients that cannot send a bearer")


def require_key(settings: Settings) -> Callable[..., None]:
    """A FastAPI dependency that refuses requests without one of the server's keys (wired only when some are set)."""
    keys = settings.api_keys

    def check(
        bearer: HTTPAuthorizationCredentials | None = Security(_BEARER), header: str | None = Security(_HEADER)
    ) -> None:
        if not key_matches(bearer.credentials if bearer is not None else header, keys):
            raise Unauthorized(
                "a valid API key is required: send it as 'Authorization: Bearer <key>' (the OpenAI SDK's api_key) "
                "or 'X-API-Key: <key>'"
            )

    return check
