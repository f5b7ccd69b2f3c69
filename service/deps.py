"""Shared state and the dependencies routes declare (`Annotated` aliases, so handlers read like types).

All are `async def`: FastAPI runs a plain `def` dependency in a worker thread, one hop per request."""

from __future__ import annotations

import hmac
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .metrics import Metrics
from .problems import Forbidden, Unauthorized
from .repository import Repository
from .settings import Settings


@dataclass(eq=False)
class ServiceState:
    settings: Settings
    metrics: Metrics
    repo: Repository
    pool: ThreadPoolExecutor  # image decoding and PNG encoding
    draining: bool = False  # shutdown has begun


async def get_state(request: Request) -> ServiceState:
    return request.app.state.vqtok  # type: ignore[no-any-return]


State = Annotated[ServiceState, Depends(get_state)]
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>` when the server has API keys configured")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _key_ok(creds: HTTPAuthorizationCredentials | None, keys: list[str]) -> bool:
    if creds is None:
        return False
    given = creds.credentials.encode()
    return any(hmac.compare_digest(given, k.encode()) for k in keys)  # constant time per key


async def require_api_key(state: State, creds: Credentials) -> None:
    keys = state.settings.api_keys
    if keys and not _key_ok(creds, keys):
        raise Unauthorized("missing or wrong API key (Authorization: Bearer <key>)")


async def require_admin_key(state: State, creds: Credentials) -> None:
    keys = state.settings.admin_keys
    if not keys:
        raise Forbidden("admin routes are off: set VQTOK_ADMIN_API_KEYS or VQTOK_API_KEYS (or send SIGHUP to reload)")
    if not _key_ok(creds, keys):
        raise Unauthorized("missing or wrong admin API key")
