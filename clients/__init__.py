"""Python clients (sync and async), dataset tokenization and the `vqtok` command line.

    from clients import Client, AsyncClient, LocalBackend

Re-exports resolve lazily: the `vqtok` command line imports this package, and must not pay for
httpx or numpy before a subcommand needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # re-exported names, for type checkers and IDEs
    from ._base import ModelCard
    from ._retry import RetryPolicy
    from .client import AsyncClient, Client
    from .errors import (
        APIConnectionError,
        APIStatusError,
        APITimeoutError,
        AuthenticationError,
        BadRequestError,
        NotFoundError,
        OverloadedError,
        PayloadTooLargeError,
        RateLimitError,
        RequestTimeoutError,
        ServerError,
        UnprocessableEntityError,
        UnsupportedMediaTypeError,
        ValidationError,
        VqtokError,
    )
    from .local import LocalBackend

_EXPORTS = {
    "Client": "client",
    "AsyncClient": "client",
    "LocalBackend": "local",
    "ModelCard": "_base",
    "RetryPolicy": "_retry",
    **{
        name: "errors"
        for name in (
            "VqtokError",
            "APIConnectionError",
            "APITimeoutError",
            "APIStatusError",
            "BadRequestError",
            "AuthenticationError",
            "NotFoundError",
            "PayloadTooLargeError",
            "UnsupportedMediaTypeError",
            "ValidationError",
            "UnprocessableEntityError",
            "RateLimitError",
            "OverloadedError",
            "RequestTimeoutError",
            "ServerError",
        )
    },
}


__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "LocalBackend",
    "ModelCard",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "RateLimitError",
    "RequestTimeoutError",
    "RetryPolicy",
    "ServerError",
    "UnprocessableEntityError",
    "UnsupportedMediaTypeError",
    "ValidationError",
    "VqtokError",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'clients' has no attribute {name!r}")
