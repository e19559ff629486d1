"""Trainer: the loop. `fit` runs `train_step` until the end (or a stop signal), evaluating,
checkpointing and writing metrics as it goes; setup lives in `build.py`, the loss in `loss.py`,
evaluation in `evaluate.py`.

The loss of a step is the sum of token losses over all micro-batches and ranks divided by the
step's total number of targets, so a packed step weighs every token alike and N ranks give
the same loss and gradients as one process with the same global batch.

Seams: the optimizer is built by `build_optimizer` (the memory engine will plug in there, with
its host step and copies as their own timed phases); tensor-parallel layers live inside the
model (`slipstream.models`), so the loop does not change for them.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console

from slipstream.data.loader import MixtureLoader
from slipstream.profile import StepTimer, diagnose
from slipstream.train import checkpoint as ckpt
from slipstream.train.build import (
    autocast_dtype,
    build,
    build_parallel,
    sample,
    shard_model,
    write_run_files,
)
from slipstream.train.distributed import Dist, all_reduce_sum, init_distributed
from slipstream.train.evaluate import evaluate
from slipstream.train.loss import num_targets, token_losses
from slipstream.train.optim import clip_and_step, flush, lr_factor
from slipstream.train.progress import Progress, print_summary
from slipstream.train.signals import StopSignals

if TYPE_CHECKING:
    from slipstream.config import RunConfig


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False, console: Console | None = None):
        self.cfg = cfg
        self.d: Dist = init_distributed(cfg.train.device, cfg.parallel)
        self.console = console or Console()
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.out = Path(cfg.train.out_dir)
        self.built = build(cfg, self.d, self.out)
        self.model = self.built.model.to(self.d.device)
        # The whole model's costs, taken before its layers are split across ranks.
        self.attention_cost = self.model.attention_cost()
        self.flops_per_token = self.model.flops_per_token(cfg.data.seq_len)
        shard_model(self.model, cfg.parallel, self.d)
        self.optimizer, self.ddp, self._hook_times = build_parallel(self.model, cfg.optim, self.d)
        self.loader = self._loader("train")
        self.tokenizer = self.loader.tokenizer
        self.step = 0
        self.stop = False  # all ranks agreed to stop (a signal on any): checkpoint, then end
        self.signals = StopSignals(self._say_stopping)
        self.autocast = autocast_dtype(cfg.train.precision, self.d.device)
        if resume:
            self._resume()
        if self.d.is_main:
            resolved = self.built.resolved(self.d, self.loader.planner.attention_cost)
            write_run_files(self.out, cfg, resolved)

    def _loader(self, split: str) -> MixtureLoader:
        """This rank's loader of `split`; eval loaders start from the beginning each time.
        Neither plans past the steps it will give (`end_step`): no data work is wasted."""
        t = self.cfg.train
        return MixtureLoader(
            self.cfg.data,
            topology=self.d.topology,
            split=split,
            tokenizer=self.built.tokenizer,
            prefetch_steps=1 if split == "eval" else None,
            attention_cost=self.attention_cost,
            end_step=t.eval_steps if split == "eval" else (t.stop_at_step or t.steps),
        )

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.out)
        if path is None:
            raise ValueError(f"--resume: no checkpoint in {self.out}/checkpoints; run without it")
        state = ckpt.load_checkpoint(path, self.d, self.built.model_config.to_dict())
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["data"])
        self.step = state["meta"]["step"]
        if self.d.is_main:
            self.console.print(f"resumed from {path} at step {self.step}")

    def _say_stopping(self) -> None:
        if self.d.is_main:
            self.console.print("stopping after this step (again to abort)")

    # -- one step ---------------------------------------------------------------------------
    def train_step(self, timer: StepTimer) -> dict[str, float]:
        with timer.phase("data_wait"):
            batch = next(self.loader)
        with timer.phase("h2d"):
            mbs = [
                {k: v.to(self.d.device, non_blocking=True) for k, v in mb.items()}
                for mb in batch.micro_batches
            ]
        tp = self.d.tp_size  # tensor-parallel ranks hold the same batch: sums count it tp times
        with timer.phase("comm"):
            (total_targets,) = all_reduce_sum([float(sum(map(num_targets, mbs)))], self.d)
            total_targets /= tp
        # DDP averages gradients over data-parallel ranks; scaling by their number turns that
        # into the sum. fp16 under offload: the loss is scaled up so small gradients survive
        # (the engine unscales them on the host, or skips the step if they overflowed).
        loss_scale = getattr(self.optimizer, "loss_scale", 1.0)
        scale = self.d.dp_size / max(total_targets, 1.0) * loss_scale
        model = self.ddp or self.model
        lr = self.cfg.optim.lr * lr_factor(self.step, self.cfg.train.steps, self.cfg.optim)
        clip = self.cfg.optim.grad_clip or float("inf")
        loss_local = 0.0
        for i, mb in enumerate(mbs):
            last = i == len(mbs) - 1
            if last and hasattr(self.optimizer, "prepare_final_backward"):
                # Offload: without clipping, buckets are stepped on the host during backward.
                self.optimizer.prepare_final_backward(lr, clip)
            sync = nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                tp_before = self._tp_exposed_s()
                with timer.phase("forward"):
                    loss = token_losses(model, mb, self.autocast).sum() * scale
                # Tensor-parallel waits that overlap did not hide: exposed communication.
                tp_mid = self._tp_exposed_s()
                timer.move("forward", "comm", tp_mid - tp_before)
                with timer.phase("backward"):
                    self._hook_times.clear()
                    offload_before = getattr(self.optimizer, "offload_s", 0.0)
                    loss.backward()
                    end = time.perf_counter()
                timer.move("backward", "comm", self._tp_exposed_s() - tp_mid)
                # The offload engine's gradient copies ran inside backward: their own phase.
                offload_s = getattr(self.optimizer, "offload_s", 0.0) - offload_before
                timer.move("backward", "grad_offload", offload_s)
            loss_local += loss.item() / loss_scale / self.d.dp_size
        if self._hook_times:
            # Exposed communication: from the last gradient bucket handed to all-reduce (the
            # end of backward compute) to backward's return (all buckets reduced).
            timer.move("backward", "comm", end - max(self._hook_times))
        if hasattr(self.optimizer, "wait_grads"):
            with timer.phase("grad_offload"):  # gradient copies backward did not hide
                self.optimizer.wait_grads()
        plan = getattr(self.model, "tp_plan", None)
        if plan is not None:
            with timer.phase("comm"):  # norms that saw only this rank's rows
                plan.reduce_partial_grads()
        with timer.phase("optimizer"):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            grad_norm = clip_and_step(self.optimizer, self.model, clip)
            self.optimizer.zero_grad(set_to_none=True)
        with timer.phase("comm"):  # the stop flag rides along, so all ranks stop at one step
            loss_value, stop = all_reduce_sum([loss_local, float(self.signals.requested)], self.d)
            loss_value /= tp
        self.stop = stop > 0
        stats = batch.stats
        row = {
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": float(stats.num_tokens),
            "balance/max_over_mean": stats.imbalance,
            "balance/max_rank_cost": stats.max_rank_cost,
        }
        for src, n in zip(self.cfg.data.sources, stats.replicas or [], strict=False):
            row[f"data/replicas/{src.name}"] = float(n)
        return row

    def _tp_exposed_s(self) -> float:
        plan = getattr(self.model, "tp_plan", None)
        return plan.group.exposed_s if plan is not None else 0.0

    def evaluate(self) -> dict[str, float]:
        """Held-out loss and bits per byte, overall and per source (see evaluate.py)."""
        if self.cfg.data.holdout_fraction == 0 or self.cfg.train.eval_steps == 0:
            return {}
        flush(self.optimizer)
        with self._loader("eval") as loader:  # from its start: the same batches every time
            return evaluate(self.model, loader, self.cfg.train.eval_steps, self.d, self.autocast)

    # -- the run ----------------------------------------------------------------------------
    def save(self) -> None:
        flush(self.optimizer)  # the weights saved are those the optimizer state continues
        ckpt.save_checkpoint(
            self.out,
            self.step,
            self.d,
            self.cfg.train.keep_checkpoints,
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            data=self.loader.state_dict(),
            meta={"model": self.built.model_config.to_dict()},
        )

    def fit(self) -> list[dict]:
        cfg, d = self.cfg.train, self.d
        timer = StepTimer(d.device)
        history: list[dict] = []
        metrics = open(self.out / "metrics.jsonl", "a") if d.is_main else None  # noqa: SIM115
        flops = self.flops_per_token
        progress = Progress(
            self.console,
            cfg,
            start=self.step,
            enabled=d.is_main,
            flops_per_token=flops if d.device.type == "cuda" else 0.0,
            world_size=d.world_size,
        )
        t0 = time.perf_counter()
        try:
            with self.signals, progress:
                while self.step < (cfg.stop_at_step or cfg.steps) and not self.stop:
                    timer.start_step()
                    row = self.train_step(timer)
                    phases = timer.end_step()
                    self.step += 1
                    row = {"step": self.step, **row}
                    row.update({f"time/{k}_s": v for k, v in phases.items()})
                    row["tokens_per_s"] = row["tokens"] / phases["step"]
                    row["time/elapsed_s"] = time.perf_counter() - t0  # wall clock of the run
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        row.update(self.evaluate())
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save()
                    history.append(row)
                    if metrics:
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                    progress.update(row)
                if not cfg.checkpoint_every or self.step % cfg.checkpoint_every:
                    self.save()
        finally:
            if metrics:
                metrics.close()
            self.loader.close()
        if self.step == cfg.steps and not self.stop:
            self._finish(timer, history)
        elif d.is_main:
            self.console.print(f"stopped at step {self.step}; continue with --resume")
        return history

    def _finish(self, timer: StepTimer, history: list[dict]) -> None:
        """Samples (every tensor-parallel rank of the first replica takes part) and, on rank
        0, the summary."""
        if self.d.dp_rank != 0:
            return
        train = self.cfg.train
        samples = sample(
            self.model, self.tokenizer, train.sample_prompts, train.sample_tokens, train.seed
        )
        if not self.d.is_main:
            return
        shares = timer.shares()
        diagnosis = diagnose(shares) if shares else None
        print_summary(self.console, history, shares, diagnosis, samples, self.model)
        if diagnosis:
            summary = {"diagnosis": diagnosis.message, "lever": diagnosis.lever, "shares": shares}
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
