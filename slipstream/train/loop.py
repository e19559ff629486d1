"""Trainer: the spine. Each step takes this rank's micro-batches from the data plane, runs
forward and backward (gradient accumulation, DDP under torchrun), clips, steps AdamW on the
warm-up + cosine schedule, and times every phase. Evaluates on held-out documents, writes
metrics as JSON lines, checkpoints atomically, and ends with a sample and the step breakdown.

The loss of a step is the sum of token losses over all micro-batches and ranks divided by the
step's total number of targets, so a packed step weighs every token alike and N ranks give
the same loss and gradients as one process with the same global batch.
"""

from __future__ import annotations

import copy
import json
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from rich.console import Console

from slipstream.data.constructor import IGNORE_INDEX
from slipstream.data.loader import MixtureLoader
from slipstream.data.tokenizers import build_tokenizer
from slipstream.profile import StepTimer, diagnose
from slipstream.train import checkpoint as ckpt
from slipstream.train.distributed import Dist, all_reduce_sum, init_distributed
from slipstream.train.model import build_model
from slipstream.train.optim import build_optimizer, lr_factor
from slipstream.train.progress import Progress, print_summary

if TYPE_CHECKING:
    from slipstream.config import RunConfig


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The run: length, evaluation, checkpoints, device and precision."""

    steps: int = 100
    """Total optimizer steps; the learning-rate schedule spans them."""
    stop_at_step: int = 0
    """End this run after this step (0 = train.steps), with a checkpoint there; for jobs in
    time-limited slots. Continue with --resume."""
    out_dir: str = "runs/demo"
    """Metrics, the resolved config and checkpoints go here (relative to the working dir)."""
    seed: int = 0
    """Seeds the model's initialization (the data order has its own seed, data.seed)."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu` or `cuda`."""
    precision: str = "auto"
    """`auto` (bf16 autocast on CUDA with bf16, fp32 elsewhere), `fp32` or `bf16`."""
    num_threads: int = 0
    """torch CPU threads per process; 0 = torch's default (torchrun sets 1 per process)."""
    eval_every: int = 50
    """Evaluate on held-out documents every N steps (0 = never); needs data.holdout_fraction."""
    eval_steps: int = 2
    """Held-out steps per evaluation (the same ones each time)."""
    log_every: int = 10
    """Print a line every N steps when the output is not a terminal."""
    checkpoint_every: int = 50
    """Checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    sample_prompt: str = "def "
    sample_tokens: int = 120
    """Tokens generated at the end (0 = no sample)."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"train.steps: {self.steps} must be > 0")
        if not 0 <= self.stop_at_step <= self.steps:
            raise ValueError(f"train.stop_at_step: {self.stop_at_step} must be in [0, steps]")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.precision: {self.precision!r}; use auto, fp32 or bf16")
        if self.keep_checkpoints < 1:
            raise ValueError("train.keep_checkpoints: keep at least 1")
        for key in ("eval_every", "eval_steps", "log_every", "checkpoint_every", "num_threads"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}: must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False, console: Console | None = None):
        self.cfg = cfg
        self.d: Dist = init_distributed(cfg.train.device)
        self.console = console or Console()
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.out = Path(cfg.train.out_dir)
        self.model, self.spec = self._build_model_and_data()
        self.model.to(self.d.device)
        self.ddp = None
        if self.d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # broadcast_buffers off: the only buffers (RoPE tables) are the same everywhere.
            self.ddp = DDP(
                self.model,
                broadcast_buffers=False,
                device_ids=[self.d.device] if self.d.device.type == "cuda" else None,
            )
            self._hook_times: list[float] = []
            self.ddp.register_comm_hook(self._hook_times, _timed_allreduce)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.d.device)
        self.loader = MixtureLoader(self.spec, dp_rank=self.d.rank)
        self.tokenizer = self.loader.tokenizer
        self.step = 0
        self.stop = False  # a stop was requested (SIGINT / SIGTERM): checkpoint, then end
        self._stop_requested = False
        self.autocast = self._autocast_dtype()
        if resume:
            self._resume()
        if self.d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.json")

    # -- setup ------------------------------------------------------------------------------
    def _build_model_and_data(self):
        """The model and this rank's data spec, with the vocabulary made to agree."""
        cfg = self.cfg
        spec = copy.deepcopy(cfg.data)
        spec.dp_world_size = self.d.world_size  # each rank takes its balanced share
        torch.manual_seed(cfg.train.seed)
        if cfg.model.kind == "hf":
            model = build_model(cfg.model, cfg.recipe_dir)
            if spec.tokenizer == "model":  # the model brings its own tokenizer
                path = model.tokenizer_json(self.out / f"tokenizer.rank{self.d.rank}.json")
                spec.tokenizer = str(path.resolve())
            vocab, limit = (
                build_tokenizer(spec.tokenizer, spec.base_dir).vocab_size,
                model.vocab_size,
            )
        else:
            if spec.tokenizer == "model":
                raise ValueError(
                    "data.tokenizer: 'model' needs model.kind = 'hf'; use 'byte' "
                    "or a tokenizer JSON file"
                )
            vocab = build_tokenizer(spec.tokenizer, spec.base_dir).vocab_size
            if cfg.model.vocab_size == 0:
                cfg.model.vocab_size = vocab  # resolved here; saved with the run
            limit = cfg.model.vocab_size
            model = build_model(cfg.model, cfg.recipe_dir)
        if vocab > limit:
            raise ValueError(
                f"data.tokenizer: its vocabulary ({vocab}) is larger than the model's ({limit}); "
                "raise model.vocab_size or use the model's tokenizer (data.tokenizer = 'model')"
            )
        return model, spec

    def _autocast_dtype(self) -> torch.dtype | None:
        p = self.cfg.train.precision
        if p == "bf16" or (
            p == "auto" and self.d.device.type == "cuda" and torch.cuda.is_bf16_supported()
        ):
            return torch.bfloat16
        return None

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.out)
        if path is None:
            raise ValueError(f"--resume: no checkpoint in {self.out}/checkpoints; run without it")
        state = ckpt.load_checkpoint(path, self.d, self.cfg.model.to_dict())
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["data"])
        self.step = state["meta"]["step"]
        if self.d.is_main:
            self.console.print(f"resumed from {path} at step {self.step}")

    # -- one step ---------------------------------------------------------------------------
    def _token_losses(self, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of every position (0 where there is no target), flattened."""
        model = self.ddp or self.model
        ctx = (
            torch.autocast(self.d.device.type, dtype=self.autocast)
            if self.autocast
            else nullcontext()
        )
        with ctx:
            logits = model(
                mb["input_ids"],
                mb["position_ids"],
                mb["doc_ids"],
                mb["cu_seqlens"],
                int(mb["max_seqlen"]),
            )
        return F.cross_entropy(
            logits.float().flatten(0, 1),
            mb["labels"].flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )

    def train_step(self, timer: StepTimer) -> dict[str, float]:
        with timer.phase("data_wait"):
            batch = next(self.loader)
        with timer.phase("h2d"):
            mbs = [
                {k: v.to(self.d.device, non_blocking=True) for k, v in mb.items()}
                for mb in batch.micro_batches
            ]
        local_targets = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in mbs)
        with timer.phase("comm"):
            (num_targets,) = all_reduce_sum([float(local_targets)], self.d)
        # DDP averages gradients over ranks; scaling by world size turns that into the sum.
        scale = self.d.world_size / max(num_targets, 1.0)
        loss_local = 0.0
        for i, mb in enumerate(mbs):
            last = i == len(mbs) - 1
            sync = nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                with timer.phase("forward"):
                    loss = self._token_losses(mb).sum() * scale
                with timer.phase("backward"):
                    if self.ddp is not None and last:
                        self._hook_times.clear()
                    loss.backward()
                    end = time.perf_counter()
            loss_local += loss.item() / self.d.world_size
        if self.ddp is not None and self._hook_times:
            # Exposed communication: from the last gradient bucket handed to all-reduce (the
            # end of backward compute) to backward's return (all buckets reduced).
            timer.move("backward", "comm", end - max(self._hook_times))
        with timer.phase("optimizer"):
            factor = lr_factor(self.step, self.cfg.train.steps, self.cfg.optim)
            for group in self.optimizer.param_groups:
                group["lr"] = self.cfg.optim.lr * factor
            clip = self.cfg.optim.grad_clip or float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with timer.phase("comm"):  # the stop flag rides along, so all ranks stop at one step
            loss_value, stop = all_reduce_sum([loss_local, float(self._stop_requested)], self.d)
        self.stop = stop > 0
        return {
            "loss": loss_value,
            "lr": self.cfg.optim.lr * factor,
            "grad_norm": grad_norm,
            "tokens": float(batch.stats.num_tokens),
        }

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss on the held-out documents, overall and per source (`eval_loss/NAME`)."""
        if self.cfg.data.holdout_fraction == 0 or self.cfg.train.eval_steps == 0:
            return {}
        spec = copy.deepcopy(self.spec)
        spec.split, spec.backend.prefetch_steps = "eval", 1
        names = [s.name for s in spec.sources]
        sums = torch.zeros(len(names), dtype=torch.float64)
        counts = torch.zeros(len(names), dtype=torch.float64)
        self.model.eval()
        with MixtureLoader(spec, dp_rank=self.d.rank) as loader:  # from its start: same batches
            for _ in range(self.cfg.train.eval_steps):
                for mb in next(loader).micro_batches:
                    mb = {k: v.to(self.d.device) for k, v in mb.items()}
                    losses = self._token_losses(mb).double().cpu()
                    valid = (mb["labels"] != IGNORE_INDEX).flatten().cpu()
                    src = mb["source_ids"].flatten().cpu()[valid]
                    sums += torch.bincount(src, weights=losses[valid], minlength=len(names))
                    counts += torch.bincount(src, minlength=len(names)).double()
        self.model.train()
        totals = all_reduce_sum([*sums.tolist(), *counts.tolist()], self.d)
        sums_l, counts_l = totals[: len(names)], totals[len(names) :]
        out = {"eval_loss": sum(sums_l) / max(sum(counts_l), 1.0)}
        out.update({f"eval_loss/{n}": s / c for n, s, c in zip(names, sums_l, counts_l) if c})
        return out

    # -- the run ----------------------------------------------------------------------------
    def save(self) -> None:
        model = self.model.state_dict()
        ckpt.save_checkpoint(
            self.out,
            self.step,
            self.d,
            self.cfg.train.keep_checkpoints,
            model=model,
            optimizer=self.optimizer.state_dict(),
            data=self.loader.state_dict(),
            meta={"model": self.cfg.model.to_dict()},
        )

    def fit(self) -> list[dict]:
        cfg, d = self.cfg.train, self.d
        timer = StepTimer(d.device)
        history: list[dict] = []
        metrics = open(self.out / "metrics.jsonl", "a") if d.is_main else None  # noqa: SIM115
        flops = self.model.flops_per_token(self.spec.seq_len)
        progress = Progress(
            self.console,
            cfg,
            start=self.step,
            enabled=d.is_main,
            flops_per_token=flops if d.device.type == "cuda" else 0.0,
            world_size=d.world_size,
        )
        restore_signals = self._catch_stop_signals()
        try:
            with progress:
                while self.step < (cfg.stop_at_step or cfg.steps) and not self.stop:
                    timer.start_step()
                    row = self.train_step(timer)
                    phases = timer.end_step()
                    self.step += 1
                    row = {
                        "step": self.step,
                        **row,
                        **{f"time/{k}_s": v for k, v in phases.items()},
                    }
                    row["tokens_per_s"] = row["tokens"] / phases["step"]
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
            restore_signals()
            if metrics:
                metrics.close()
            self.loader.close()
        if d.is_main and self.step == cfg.steps and not self.stop:
            self._finish(timer, history)
        elif d.is_main:
            self.console.print(f"stopped at step {self.step}; continue with --resume")
        return history

    def _catch_stop_signals(self):
        """SIGINT / SIGTERM end the run at the next step boundary, with a checkpoint, so the
        saved state is always a whole step's; a second signal interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def request(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            if self.d.is_main:
                self.console.print("stopping after this step (again to abort)")

        for sig in previous:
            signal.signal(sig, request)
        return lambda: [signal.signal(sig, h) for sig, h in previous.items()]

    def _finish(self, timer: StepTimer, history: list[dict]) -> None:
        sample = ""
        if self.cfg.train.sample_tokens:
            prompt = self.cfg.train.sample_prompt
            ids = self.tokenizer.encode_batch([prompt])[0][:-1].tolist()  # no end-of-document
            self.model.eval()
            out = self.model.generate(ids, self.cfg.train.sample_tokens, seed=self.cfg.train.seed)
            sample = prompt + self.tokenizer.decode(out)
        shares = timer.shares()
        diagnosis = diagnose(shares) if shares else None
        print_summary(self.console, history, shares, diagnosis, sample, self.model)
        if diagnosis:
            summary = {"diagnosis": diagnosis.message, "lever": diagnosis.lever, "shares": shares}
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _timed_allreduce(times: list[float], bucket):
    """DDP comm hook: the default all-reduce (averaged), noting when each bucket is ready."""
    import torch.distributed as dist

    times.append(time.perf_counter())
    world = dist.get_world_size()
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0].div_(world))
