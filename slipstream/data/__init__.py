"""The data plane: per-source loaders, a planner that mixes, packs and balances, per-rank
batches.

Exports are resolved lazily so that loader worker processes, which only need the source
loaders, do not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "MixtureSpec": "spec",
    "SourceSpec": "spec",
    "WeightSchedule": "spec",
    "BalanceSpec": "spec",
    "BackendSpec": "spec",
    "SourceLoader": "sources.loader",
    "build_source_loaders": "sources.loader",
    "Planner": "planner",
    "StepPlan": "planner",
    "Piece": "packing",
    "pack_best_fit": "packing",
    "partition": "balance",
    "assign_rows": "balance",
    "row_cost": "balance",
    "build_micro_batch": "batch",
    "IGNORE_INDEX": "batch",
    "MixtureLoader": "loader",
    "StepBatch": "loader",
    "Backend": "backends",
    "InlineBackend": "backends",
    "LocalBackend": "backends",
    "build_backend": "backends",
    "build_tokenizer": "sources.tokenizers",
    "ByteTokenizer": "sources.tokenizers",
    "HFTokenizer": "sources.tokenizers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"slipstream.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'slipstream.data' has no attribute {name!r}")
