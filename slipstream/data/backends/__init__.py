"""Backends run the source loaders: `inline` (in the planner's thread), `local` (a thread or
process pool in this process). Each implements the `Backend` protocol of `base.py`."""

from __future__ import annotations

from slipstream.data.backends.base import Backend, LoadTask
from slipstream.data.backends.inline import InlineBackend
from slipstream.data.backends.local import LocalBackend
from slipstream.data.sources.loader import build_source_loaders
from slipstream.data.spec import MixtureSpec


def build_backend(spec: MixtureSpec, tokenizer: str | None = None) -> Backend:
    """The backend `spec.backend.kind` names; `tokenizer` overrides `spec.tokenizer`."""
    if spec.backend.kind == "inline":
        return InlineBackend(build_source_loaders(spec, tokenizer))
    return LocalBackend(spec, tokenizer)


__all__ = ["Backend", "InlineBackend", "LoadTask", "LocalBackend", "build_backend"]
