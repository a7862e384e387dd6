"""Marking of private data, so structural privacy checks are one-liners.

Contract:
- Every private parameter name (the user's M matrices) starts with ``PRIVATE_PREFIX``.
- ``mark_private(t)`` tags a tensor object (M, token ids, logits, labels) as private;
  ``is_private(t)`` reads the tag. The wire codec refuses to encode a tagged tensor into a
  cloud-bound frame. Tags live on the tensor object, so values *derived* from it (e.g. the
  reply ``M @ a``) are untagged: that reply is exactly the low-rank activation the method
  sends by design.
"""

from __future__ import annotations

from typing import Any

PRIVATE_PREFIX = "private."
_TAG = "_privatelora_private"


def mark_private(t: Any) -> Any:
    """Tag ``t`` (a tensor or ndarray) as private and return it."""
    try:
        setattr(t, _TAG, True)
    except AttributeError:  # numpy arrays take no attributes: wrap via a view subclass
        raise TypeError(f"cannot mark {type(t).__name__} as private; use a torch tensor")
    return t


def is_private(t: Any) -> bool:
    return bool(getattr(t, _TAG, False))


def private_names(names) -> list[str]:
    """The names among ``names`` that carry the private prefix."""
    return [n for n in names if n.startswith(PRIVATE_PREFIX) or f".{PRIVATE_PREFIX}" in n]
