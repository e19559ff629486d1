"""The `slipstream` command: parse arguments, build a config, call a pillar. A user mistake
(ValueError) prints one line naming the problem and the fix, never a traceback."""

from __future__ import annotations

import argparse
import gc
import os
import sys


def _data_prepare_demo(args: argparse.Namespace) -> None:
    from slipstream.tools.demo_corpus import prepare_demo

    prepare_demo(args.out_dir, args.spec_out, limit=args.limit)
    print(f"wrote {args.out_dir}/manifest.json and {args.spec_out}")


def _data_train_tokenizer(args: argparse.Namespace) -> None:
    from slipstream.data.spec import MixtureSpec
    from slipstream.tools.tokenizer import mixture_texts, train_bpe

    spec = MixtureSpec.from_toml(args.spec, args.set)
    tok = train_bpe(mixture_texts(spec, args.max_docs), args.out, args.vocab_size)
    rel = os.path.relpath(os.path.abspath(args.out), spec.base_dir)
    print(f'wrote {args.out} (vocab {tok.vocab_size:,}); in {args.spec} set tokenizer = "{rel}"')


def _data_preview(args: argparse.Namespace) -> None:
    from slipstream.data.spec import MixtureSpec
    from slipstream.tools.preview import print_preview, run_preview

    if args.steps < 1:
        raise ValueError(f"--steps: {args.steps} must be >= 1")
    if args.ranks < 1:
        raise ValueError(f"--ranks: {args.ranks} must be >= 1")
    spec = MixtureSpec.from_toml(args.spec, args.set)
    print_preview(spec, run_preview(spec, args.steps, args.ranks), args.ranks)


TRAIN_DESCRIPTION = """Train a model on a recipe: a TOML file with sections [model], [data],
[optim], [train] and [parallel]; a key left out takes its default. [data] holds the mixture,
or names a spec file (spec = "data/demo.toml") whose keys it may override. The defaults that
matter most (every key: docs/reference.md):

  [model]    kind = "gpt", n_layer = 4, n_head = 4, d_model = 256, max_seq_len = 1024
  [data]     tokenizer = "byte", seq_len = 512, micro_batch_size = 4, num_micro_batches = 1
  [optim]    lr = 3e-4, warmup_steps = 10, weight_decay = 0.1, offload = false
  [train]    steps = 100, out_dir = runs/<recipe name>, eval_every = 50,
             checkpoint_every = 50, loggers = ["jsonl"]
  [parallel] tp = 1 (data-parallel ranks: the processes torchrun starts / tp)

A path in a file is relative to that file's folder; on the command line, to the working
directory."""

# Exit statuses of `slipstream train` (also in its --help).
EXIT_FINISHED, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3
TRAIN_EPILOG = """exit status: 0 the run finished (or was already finished); 1 it failed (a rank
was lost: see its line); 2 a mistake in the recipe, the command or the run folder (one line
says which); 3 it stopped before train.steps (a signal, or train.stop_at_step) with a
checkpoint: continue with --resume (one process; under torchrun a stopped job exits 0, as
torchrun takes any other status for a failed worker); 130 interrupted by a second signal."""


def _train(args: argparse.Namespace) -> int:
    from slipstream.config import RunConfig
    from slipstream.train import Trainer
    from slipstream.train.distributed import shutdown

    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run and --overwrite replaces it: pass one")
    cfg = RunConfig.load(args.recipe, args.set)
    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    try:
        trainer.fit()
    finally:
        trainer.optimizer.close()  # its threads end before the process group does
        shutdown(trainer.d)
    finished, launched = trainer.finished, trainer.d.enabled
    # Free the trainer here, in this thread, while the interpreter is whole: DDP, its comm
    # hook's Python callbacks and the works they ran in go with it. Left to interpreter exit,
    # a gloo worker thread still releasing a Python object aborts the process ("terminate
    # called without an active exception"), more often the busier the machine.
    del trainer
    gc.collect()
    if finished or launched:
        # Under a launcher a worker's non-zero exit reads as a failure (torchrun restarts
        # or reports it): a stopped job exits 0 there, and says so in its last line.
        return EXIT_FINISHED
    return EXIT_STOPPED


def _memory(args: argparse.Namespace) -> None:
    from slipstream.tools.memory import run_memory

    run_memory(args)


def _init(args: argparse.Namespace) -> None:
    from slipstream.tools.init import init_run

    recipe = init_run(
        args.name,
        args.data,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        text_field=args.text_field,
        force=args.force,
    )
    spec = recipe.with_name(f"{recipe.stem}.data.toml")
    print(f"wrote {recipe} and {spec}; train with: slipstream train {recipe}")


def _export(args: argparse.Namespace) -> None:
    from slipstream.tools.export import export_run

    out = export_run(
        args.run_dir,
        args.out_dir,
        step=args.step,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {out} (a Hugging Face model folder): load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}), or train it further "
        f'with model.kind = "hf", model.path = "{out}" and data.tokenizer = "model"'
    )


def _doctor(args: argparse.Namespace) -> None:
    from slipstream.tools.doctor import run_compare, run_doctor

    if args.target[0] == "compare":
        if len(args.target) != 3:
            raise ValueError("doctor compare: give two run folders (RUN_A RUN_B)")
        run_compare(args.target[1], args.target[2], args.device_gib)
        return
    if len(args.target) != 1:
        raise ValueError(f"doctor: one recipe or run folder, not {len(args.target)}")
    args.target = args.target[0]
    run_doctor(args)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slipstream")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slipstream", description=__doc__)
    p.add_argument("--version", action="version", version=f"slipstream {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_data, _add_train, _add_memory, _add_init, _add_export, _add_doctor):
        add(sub)
    return p


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="the data plane").add_subparsers(dest="verb", required=True)

    d = data.add_parser("prepare-demo", help="gather the demo corpus and write its mixture spec")
    d.add_argument("out_dir", nargs="?", default="data/demo")
    d.add_argument("--spec-out", default="recipes/data/demo.toml")
    d.add_argument("--limit", type=int, default=None, help="at most this many docs per source")
    d.set_defaults(func=_data_prepare_demo)

    t = data.add_parser("train-tokenizer", help="train a byte-level BPE on a mixture")
    t.add_argument("spec")
    t.add_argument("--out", default="data/demo/tokenizer.json")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--max-docs", type=int, default=20_000)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.set_defaults(func=_data_train_tokenizer)

    v = data.add_parser("preview", help="run the data plane and report mixture, packing, balance")
    v.add_argument("spec")
    v.add_argument("--steps", type=int, default=20)
    v.add_argument("--ranks", type=int, default=4, help="data-parallel ranks to balance across")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=_data_preview)


def _add_train(sub) -> None:
    tr = sub.add_parser(
        "train",
        help="train a model on a recipe (under torchrun for DDP)",
        description=TRAIN_DESCRIPTION,
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tr.add_argument(
        "recipe", help="a TOML recipe, e.g. recipes/demo.toml or one `slipstream init` wrote"
    )
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    tr.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in train.out_dir (its metrics and checkpoints)",
    )
    tr.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set train.steps=50",
    )
    tr.set_defaults(func=_train)


def _add_memory(sub) -> None:
    m = sub.add_parser("memory", help="device and host memory per strategy; what fits")
    m.add_argument("recipe", nargs="?", help="a recipe (GPT); or give --params etc.")
    m.add_argument("--params", type=float, help="parameters, e.g. 7e9")
    m.add_argument("--layers", type=int)
    m.add_argument("--hidden", type=int)
    m.add_argument("--vocab", type=int, default=50_257)
    m.add_argument("--seq-len", type=int, default=2048)
    m.add_argument("--micro-batch", type=int, default=1)
    m.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    m.add_argument("--ranks", type=int, default=1, help="data-parallel ranks")
    m.add_argument("--fp32", action="store_true", help="fp32 activations (default bf16)")
    m.add_argument("--device-gib", type=float, default=80.0)
    m.add_argument("--host-gib", type=float, default=256.0)
    m.add_argument("--device-tflops", type=float, default=400.0, help="sustained, bf16")
    m.add_argument("--link-gbps", type=float, default=25.0, help="host <-> device, GB/s")
    m.add_argument(
        "--host-gbps",
        default="here",
        help="the host's bandwidth for the AdamW pass, GB/s; 'here' measures this machine's",
    )
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    m.add_argument(
        "--trace-device",
        default="meta",
        help="a recipe's activations are counted by running its forward here: meta (no "
        "memory, no compute) or a real device such as cuda, whose own kernels are then "
        "counted exactly (one micro-batch must fit there)",
    )
    m.set_defaults(func=_memory)


def _add_init(sub) -> None:
    i = sub.add_parser(
        "init",
        help="a recipe and mixture spec for your own files",
        description="Write NAME.toml (a recipe) and NAME.data.toml (its mixture spec: one "
        "source per --data, weighted by size), train a tokenizer on the data, and index and "
        "count it, so that `slipstream train NAME.toml` starts at once.",
    )
    i.add_argument("name", help="the run's name: NAME.toml, NAME.data.toml, runs/NAME")
    i.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="PATH",
        help="a file, folder or glob of documents (.jsonl[.gz|.zst], .parquet, .txt, .md); "
        "repeat for more sources",
    )
    i.add_argument(
        "--tokenizer",
        default="train",
        help="train (a BPE on the data, default), byte, or a tokenizers JSON file",
    )
    i.add_argument("--vocab-size", type=int, default=8192, help="of the trained tokenizer")
    i.add_argument("--text-field", default="text", help="the JSON field / parquet column")
    i.add_argument("--force", action="store_true", help="replace files of that name")
    i.set_defaults(func=_init)


def _add_export(sub) -> None:
    e = sub.add_parser(
        "export",
        help="a run's checkpoint as a Hugging Face model folder (transformers loads it)",
        description="Write RUN_DIR's newest intact checkpoint (or --step) to OUT_DIR as a "
        "Hugging Face model folder: config.json, model.safetensors and the tokenizer. "
        "Slipstream's GPT is written as LlamaForCausalLM.",
    )
    e.add_argument("run_dir", help="a run's folder (its train.out_dir)")
    e.add_argument("out_dir", help="the model folder to write (new or empty)")
    e.add_argument("--step", type=int, help="the checkpoint of this step (default: newest)")
    e.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    e.add_argument("--tokenizer", help="the tokenizer file, if it moved since the run")
    e.add_argument("--overwrite", action="store_true", help="replace an exported model there")
    e.set_defaults(func=_export)


def _add_doctor(sub) -> None:
    d = sub.add_parser(
        "doctor",
        help="name a run's bottleneck, the lever to pull and what it should gain",
        description="With a recipe: a short profiled run, then the diagnosis. With a run "
        "folder: the diagnosis of what that run recorded. `doctor compare RUN_A RUN_B`: what "
        "changed, phase by phase. Writes doctor.json and doctor.html into the run folder.",
    )
    d.add_argument("target", nargs="+", help="RECIPE, RUN_DIR, or compare RUN_A RUN_B")
    d.add_argument("--steps", type=int, default=30, help="profiled steps (default 30)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key for the profiled run")  # fmt: skip
    d.add_argument("--nproc", type=int, default=1, help="ranks (torchrun) of the profiled run")
    d.add_argument("--verify", action="store_true",
                   help="apply the top lever in a second run: predicted against measured")  # fmt: skip
    d.add_argument("--device-gib", type=float, default=None,
                   help="device memory to plan against (default: the device's own)")  # fmt: skip
    d.add_argument("--out", help="the profiled run's folder (default runs/doctor/<recipe>)")
    d.set_defaults(func=_doctor)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from slipstream.errors import PeerLost

    try:
        status = args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except PeerLost as e:  # a survivor's own line, not gloo's
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status or EXIT_FINISHED
