"""Trainer: the loop. `fit` runs `train_step` until the end (or a stop signal), evaluating,
checkpointing and writing metrics as it goes; setup lives in `build.py`, the loss in `loss.py`,
evaluation in `evaluate.py`.

The loss of a step is the sum of token losses over all micro-batches and ranks divided by the
step's total number of targets, so a packed step weighs every token alike and N ranks give
the same loss and gradients as one process with the same global batch.

Seams: the loop calls the step optimizer (`optim.py`: torch's AdamW or the memory engine), the
model's forward through `parallel.py` (tensor parallel applied from outside the model, DDP),
and the data loader; each reports the time it exposed through meters the step timer reads.
Nothing in the loop asks what kind of optimizer or model it has.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console

from slipstream.data.loader import MixtureLoader
from slipstream.errors import PeerLost
from slipstream.profile import StepTimer, run_finding
from slipstream.train import checkpoint as ckpt
from slipstream.train.build import autocast_dtype, build, sample, write_run_files
from slipstream.train.distributed import Dist, all_reduce_sum, init_distributed, is_peer_failure
from slipstream.train.evaluate import evaluate
from slipstream.train.loggers import Loggers
from slipstream.train.loss import num_targets, token_losses
from slipstream.train.optim import lr_factor
from slipstream.train.parallel import parallelize
from slipstream.train.progress import Progress, print_summary
from slipstream.train.recording import Recorder
from slipstream.train.report import lost_message, run_summary, say_resolved
from slipstream.train.stop import StopSignals

if TYPE_CHECKING:
    from slipstream.config import RunConfig


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        resume: bool = False,
        console: Console | None = None,
        overwrite: bool = False,
    ):
        """resume: continue the run in train.out_dir; overwrite: replace the run there (a
        folder holding a run is refused otherwise)."""
        self.cfg = cfg
        self.d: Dist = init_distributed(cfg.train.device, cfg.parallel)
        self.console = console or Console()
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.out = Path(cfg.train.out_dir)
        ckpt.claim_run_dir(self.out, resume, overwrite, self.d)
        self.built = build(cfg, self.d, self.out)
        self.model = self.built.model.to(self.d.device)
        # The whole model's costs, taken before its layers are split across ranks.
        self.attention_cost = self.model.attention_cost()
        self.flops_per_token = self.model.flops_per_token(cfg.data.seq_len)
        self.num_params = self.model.num_params()  # the whole model's, before any split
        self.parallel = parallelize(self.model, cfg.parallel, cfg.optim, self.d)
        self.optimizer = self.parallel.optimizer
        self.loader = self._loader("train")
        self._eval: tuple[MixtureLoader, dict] | None = None  # built at the first evaluation
        self.tokenizer = self.loader.tokenizer
        self.step = 0
        self.batch = None  # the step's data, while it trains
        self.recorder: Recorder | None = None  # what the doctor reads, from fit() on
        self.stop = False  # all ranks agreed to stop (a signal on any): checkpoint, then end
        self.signals = StopSignals(self._say_stopping)
        self.autocast = autocast_dtype(cfg.train.precision, self.d.device)
        if resume:
            self._resume()
        self.skipped = {  # corrupt records left out per source (on_error = "skip")
            src.name: int(n)
            for src, n in zip(cfg.data.sources, self.loader.backend.num_bad, strict=True)
        }
        if self.d.is_main:
            say_resolved(self.console, cfg, self.loader.backend.num_bad)
            resolved = self.built.resolved(
                self.d, self.loader.planner.attention_cost, self.loader.machine_group
            )
            resolved["num_params"] = self.num_params
            resolved["data_skipped"] = self.skipped
            if self.d.tp_size > 1:
                resolved["num_params_per_tp_rank"] = self.model.num_params()
            write_run_files(self.out, cfg, resolved)

    def _loader(self, split: str) -> MixtureLoader:
        """This rank's loader of `split`. Neither plans past the steps it will give
        (`end_step`): no data work is wasted."""
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
        """From the newest checkpoint every rank can read: a damaged one (a file missing,
        truncated or corrupt on any rank) is named, and the one before it is tried."""
        candidates = ckpt.checkpoints(self.out)
        if not candidates:
            raise ValueError(f"--resume: no checkpoint in {self.out}/checkpoints; run without it")
        damaged = []
        for path in candidates:
            try:
                self._load(path)
                error = None
            except ckpt.DamagedCheckpoint as e:
                error = e
            (bad,) = all_reduce_sum([float(error is not None)], self.d)  # all ranks agree
            if not bad:
                break
            damaged.append(str(error or f"{path}: damaged on another rank"))
            if self.d.is_main:
                self.console.print(  # no wrapping inside a path; no markup in it either
                    f"checkpoint damaged: {damaged[-1]}; trying an older one",
                    soft_wrap=True,
                    markup=False,
                )
        else:
            raise ValueError(
                f"--resume: every checkpoint in {self.out}/checkpoints is damaged "
                f"({'; '.join(damaged)}); start again with --overwrite"
            )
        if self.d.is_main:
            self.console.print(f"resumed from {path} at step {self.step}")

    def _load(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, self.d, self.built.model_config.to_dict())
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_parts(state["optimizer"])
        self.loader.load_state_dict(state["data"])
        self.step = state["meta"]["step"]

    def _say_stopping(self) -> None:
        if self.d.is_main:
            self.console.print("stopping after this step (again to abort)")

    # -- one step ---------------------------------------------------------------------------
    def train_step(self, timer: StepTimer) -> dict[str, float]:
        with timer.phase("data_wait"):
            batch = self.batch = next(self.loader)
        with timer.phase("h2d"):
            mbs = [
                {k: v.to(self.d.device, non_blocking=True) for k, v in mb.items()}
                for mb in batch.micro_batches
            ]
        tp = self.d.tp_size  # tensor-parallel ranks hold the same batch: sums count it tp times
        with timer.phase("comm"):
            (total_targets,) = all_reduce_sum([float(sum(map(num_targets, mbs)))], self.d)
            total_targets /= tp
        lr = self.cfg.optim.lr * lr_factor(self.step, self.cfg.train.steps, self.cfg.optim)
        loss_scale = self.optimizer.begin_step(lr)  # fp16: small gradients survive scaled up
        # DDP averages gradients over data-parallel ranks; scaling by their number turns that
        # into the sum.
        scale = self.d.dp_size / max(total_targets, 1.0) * loss_scale
        loss_local = 0.0
        for i, mb in enumerate(mbs):
            last = i == len(mbs) - 1
            with self.parallel.accumulating(last):
                with timer.phase("forward"):
                    loss = token_losses(self.parallel.module, mb, self.autocast).sum() * scale
                self.optimizer.before_backward(last)
                with timer.phase("backward"):
                    loss.backward()
            loss_local += loss.item() / loss_scale / self.d.dp_size
        with timer.phase("optimizer"):  # the meters sort out the waits it holds
            self.optimizer.finish_backward()  # what backward left in flight lands
            grad_norm = self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with timer.phase("comm"):  # the stop flag rides along, so all ranks stop at one step
            loss_value, stop = all_reduce_sum([loss_local, float(self.signals.requested)], self.d)
            loss_value /= tp
        self.stop = stop > 0
        return self._metrics(batch.stats, loss_value, lr, grad_norm)

    def _metrics(self, stats, loss: float, lr: float, grad_norm: float) -> dict[str, float]:
        row = {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": float(stats.num_tokens),
            "balance/max_over_mean": stats.imbalance,
            "balance/max_rank_cost": stats.max_rank_cost,
        }
        for src, n in zip(self.cfg.data.sources, stats.replicas or [], strict=False):
            row[f"data/replicas/{src.name}"] = float(n)
        row.update(self.optimizer.stats())
        return row

    def evaluate(self) -> dict[str, float]:
        """Held-out loss and bits per byte, overall and per source (see evaluate.py)."""
        if self.cfg.data.holdout_fraction == 0 or self.cfg.train.eval_steps == 0:
            return {}
        self.optimizer.flush()
        if self._eval is None:  # one loader and backend for every evaluation of the run
            loader = self._loader("eval")
            self._eval = (loader, loader.state_dict())
        loader, start = self._eval
        loader.load_state_dict(start)  # from its start: the same batches every time
        return evaluate(self.model, loader, self.cfg.train.eval_steps, self.d, self.autocast)

    # -- the run ----------------------------------------------------------------------------
    def save(self) -> None:
        if self.recorder is not None:
            self.recorder.write()
        self.optimizer.flush()  # the weights saved are those the optimizer state continues
        ckpt.save_checkpoint(
            self.out,
            self.step,
            self.d,
            self.cfg.train.keep_checkpoints,
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_parts(),
            data=self.loader.state_dict(),
            meta={"model": self.built.model_config.to_dict()},
        )

    @property
    def finished(self) -> bool:
        """Every step of train.steps is done (not stopped early by a signal or stop_at_step)."""
        return self.step >= self.cfg.train.steps

    def fit(self) -> list[dict]:
        cfg, d = self.cfg.train, self.d
        timer = StepTimer(d.device, meters=self.parallel.meters)
        history: list[dict] = []
        if self.finished:  # a finished run resumed: nothing to train
            if d.is_main:
                self.console.print(
                    f"the run in {self.out} finished at step {self.step} of {cfg.steps}; to "
                    f"train further, raise train.steps (--set train.steps={2 * cfg.steps}) "
                    "and --resume"
                )
            self.loader.close()
            return history
        metrics = self._loggers() if d.is_main else None
        model = {
            "num_params": self.num_params,
            "flops_per_token": self.flops_per_token,
            "attention_cost": self.attention_cost,
            "dtype": "bf16" if self.autocast == torch.bfloat16 else "fp32",
        }
        self.recorder = Recorder(
            self.out, d, self.loader.backend, cfg.trace_steps, self.step, model
        )
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
                try:  # inside: a stop signal while the survivor looks for its peers is ours
                    self._run_steps(timer, history, metrics, progress, t0)
                except RuntimeError as e:
                    if not is_peer_failure(e, d):
                        raise
                    raise PeerLost(lost_message(self.d, self.out, self.step, e)) from None
        finally:
            if metrics:
                metrics.close()
            self.recorder.close()
            self.loader.close()
            if self._eval is not None:
                self._eval[0].close()
        if self.step == cfg.steps and not self.stop:
            self._finish(timer, history)
        elif d.is_main:
            self.console.print(f"stopped at step {self.step}; continue with --resume")
        return history

    def _loggers(self) -> Loggers:
        t = self.cfg.train
        say = lambda line: self.console.print(line, markup=False, soft_wrap=True)  # noqa: E731
        return Loggers(
            t.loggers,
            self.out,
            start=self.step,
            config=self.cfg.to_dict(),
            project=t.wandb_project,
            say=say,
        )

    def _run_steps(self, timer: StepTimer, history: list, metrics, progress, t0: float) -> None:
        cfg = self.cfg.train
        while self.step < (cfg.stop_at_step or cfg.steps) and not self.stop:
            self.recorder.before_step(self.step, timer)
            timer.start_step()
            row = self.train_step(timer)
            phases = timer.end_step()
            self.recorder.after_step(self.step, phases, self.batch, row)
            self.step += 1
            row = {"step": self.step, **row}
            row.update({f"time/{k}_s": v for k, v in phases.items()})
            row["tokens_per_s"] = row["tokens"] / phases["step"]
            row["time/elapsed_s"] = time.perf_counter() - t0  # wall clock of the run
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                row.update(self.evaluate())
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save()
            if not history:  # the run's first record says what its data left out
                row.update({f"data/skipped/{k}": float(n) for k, n in self.skipped.items()})
            history.append(row)
            if metrics:
                metrics.log(row)
            progress.update(row)
        if not cfg.checkpoint_every or self.step % cfg.checkpoint_every:
            self.save()

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
        finding, shares = run_finding(self.recorder.body(), self.cfg.to_dict())
        per_rank = self.model.num_params() if self.d.tp_size > 1 else None
        print_summary(self.console, history, shares, finding, samples, self.num_params, per_rank)
        summary = run_summary(history, self.step, self.num_params, per_rank, self.out)
        summary["data_skipped"] = self.skipped
        summary.update(diagnosis=finding.verdict, lever=finding.lever, shares=shares,
                       gain=finding.gain.fraction if finding.gain else None)  # fmt: skip
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.console.print(
            f"metrics: {self.out / 'metrics.jsonl'}; checkpoint: {summary['checkpoint']}; "
            f"every rank's phases, findings and gains: slipstream doctor {self.out}",
            markup=False,
            soft_wrap=True,
        )
