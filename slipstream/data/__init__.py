"""The data plane: per-source loaders, a planner that mixes and balances, per-rank packing.

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
    "SourceLoader": "source_loader",
    "build_source_loaders": "source_loader",
    "Planner": "planner",
    "StepPlan": "planner",
    "Piece": "planner",
    "partition": "balance",
    "row_cost": "balance",
    "build_micro_batch": "constructor",
    "MixtureLoader": "loader",
    "StepBatch": "loader",
    "build_tokenizer": "tokenizers",
    "ByteTokenizer": "tokenizers",
    "HFTokenizer": "tokenizers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"slipstream.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'slipstream.data' has no attribute {name!r}")
