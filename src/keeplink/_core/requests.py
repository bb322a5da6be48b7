"""What a request is made of, checked in one place: ``op``, ``args`` and ``key``.

A request names an operation (``op``: a non-empty string), carries its arguments
(``args``: a mapping with string keys, as a JSON object has) and may carry an idempotency
key (``key``: ``None`` or a non-empty string). The drivers check it before they encode
anything; the outbox checks the same parts before it stores a command.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeGuard

from keeplink._core.errors import InvalidRequestError

__all__ = ["check_request", "is_key", "is_name"]


def is_name(value: object) -> TypeGuard[str]:
    """True for a non-empty string: what an ``op`` (or a device id) must be."""
    return isinstance(value, str) and bool(value)


def is_key(key: object) -> TypeGuard[str | None]:
    """True for ``None`` or a non-empty string: what an idempotency ``key`` must be."""
    return key is None or is_name(key)


def check_request(op: object, args: object, key: object) -> Mapping[str, Any]:
    """Return ``args`` if ``op``, ``args`` and ``key`` make a request; raise
    InvalidRequestError (nothing was sent) naming the first part that does not."""
    # Exact-type checks first (what callers pass), the general ones only when they fail.
    if not (op.__class__ is str and op) and not is_name(op):
        raise InvalidRequestError(f"op must be a non-empty string, got {op!r}")
    if args.__class__ is not dict and not isinstance(args, Mapping):
        raise InvalidRequestError(f"args must be a mapping, got {type(args).__name__}")
    for k in args:
        if k.__class__ is not str and not isinstance(k, str):
            raise InvalidRequestError("args keys must be strings")
    if key is not None and not (key.__class__ is str and key) and not is_key(key):
        raise InvalidRequestError(f"key must be a non-empty string or None, got {key!r}")
    return args
