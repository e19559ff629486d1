"""Evaluation on held-out documents: mean loss per token and bits per byte, overall and per
source. Bits per byte (nats summed over targets / ln 2 / their UTF-8 bytes) does not depend on
the tokenizer, so runs with bytes, the demo BPE or a model's own tokenizer compare directly.
End-of-document targets carry no bytes and are left out of bits per byte (not of the loss)."""

from __future__ import annotations

import math

import numpy as np
import torch

from slipstream.data.batch import IGNORE_INDEX
from slipstream.data.loader import MixtureLoader
from slipstream.train.distributed import Dist, all_reduce_sum
from slipstream.train.loss import token_losses


@torch.no_grad()
def evaluate(
    model,
    loader: MixtureLoader,
    num_steps: int,
    d: Dist,
    autocast: torch.dtype | None,
) -> dict[str, float]:
    """`eval_loss`, `eval_bpb`, and per source `eval_loss/S`, `eval_bpb/S`, `eval_targets/S`
    over `num_steps` steps of `loader` (a fresh eval-split loader: the same documents every
    time)."""
    names = [s.name for s in loader.spec.sources]
    n = len(names)
    token_bytes = torch.from_numpy(np.asarray(loader.tokenizer.token_bytes()))
    # Per source: loss sum, target count, loss sum over targets with bytes, byte count.
    sums = torch.zeros(4, n, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for _ in range(num_steps):
            for mb in next(loader).micro_batches:
                losses = token_losses(model, {k: v.to(d.device) for k, v in mb.items()}, autocast)
                losses = losses.double().cpu()
                labels = mb["labels"].flatten()
                valid = labels != IGNORE_INDEX
                src, loss = mb["source_ids"].flatten()[valid], losses[valid]
                nbytes = token_bytes[labels[valid]].double()
                sums[0] += torch.bincount(src, weights=loss, minlength=n)
                sums[1] += torch.bincount(src, minlength=n).double()
                sums[2] += torch.bincount(src, weights=loss * (nbytes > 0), minlength=n)
                sums[3] += torch.bincount(src, weights=nbytes, minlength=n)
    finally:
        model.train(was_training)
    # Tensor-parallel ranks evaluate the same batch: the sum over all ranks counts it tp times.
    loss_sum, count, byte_loss, num_bytes = (
        torch.tensor(all_reduce_sum(sums.flatten().tolist(), d), dtype=torch.float64).view(4, n)
        / d.tp_size
    )
    out = {
        "eval_loss": float(loss_sum.sum() / max(float(count.sum()), 1.0)),
        "eval_bpb": float(byte_loss.sum() / math.log(2) / max(float(num_bytes.sum()), 1.0)),
    }
    for i, name in enumerate(names):
        if count[i]:
            out[f"eval_loss/{name}"] = float(loss_sum[i] / count[i])
            out[f"eval_targets/{name}"] = float(count[i])
        if num_bytes[i]:
            out[f"eval_bpb/{name}"] = float(byte_loss[i] / math.log(2) / num_bytes[i])
    return out
