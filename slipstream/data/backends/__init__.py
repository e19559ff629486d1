"""Backends run the source loaders: `inline` (in the caller's thread), `local` (a thread or
process pool in this process), `ray` (actors shared by every rank of the job). Each implements
the `Backend` protocol of `base.py`."""

from __future__ import annotations

from slipstream.data.backends.base import Backend, LoadTask
from slipstream.data.backends.inline import InlineBackend
from slipstream.data.backends.local import LocalBackend
from slipstream.data.sources.loader import build_source_loaders
from slipstream.data.spec import MixtureSpec
from slipstream.topology import Topology


def build_backend(
    spec: MixtureSpec, tokenizer: str | None = None, topology: Topology | None = None
) -> Backend:
    """The backend `spec.backend.kind` names; `tokenizer` overrides `spec.tokenizer`;
    `topology`: where this process stands in the job (default: alone)."""
    topology = topology or Topology()
    if spec.backend.kind == "inline":
        return InlineBackend(build_source_loaders(spec, tokenizer))
    if spec.backend.kind == "ray":
        try:
            from slipstream.data.backends.ray import RayBackend
        except ImportError as e:
            raise ValueError(
                f"backend.kind: 'ray' needs Ray ({e}); pip install 'slipstream[ray]', or use "
                "'local'"
            ) from None
        return RayBackend(spec, tokenizer, topology)
    return LocalBackend(spec, tokenizer, run_id=topology.run_id)


__all__ = ["Backend", "InlineBackend", "LoadTask", "LocalBackend", "build_backend"]
