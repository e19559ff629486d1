"""`slipstream export RUN_DIR OUT_DIR`: a run's newest intact checkpoint as a Hugging Face model
folder (config.json, model.safetensors, the tokenizer's files) that `transformers` loads with
`AutoModelForCausalLM.from_pretrained(OUT_DIR)`, an inference engine serves, and
`model.kind = "hf"` trains further.

Slipstream's GPT is Llama-shaped (RoPE in the half-split layout, RMSNorm, SwiGLU, no biases),
so it is written as `LlamaForCausalLM`: q|k|v and gate|up, fused here, are split into Llama's
projections; a tied output layer is left to `tie_word_embeddings`. A run of `model.kind = "hf"`
is written as the model type it came from. Tensor-parallel slices are joined first (the
model's declared layout, inverted). The byte tokenizer is written as an equivalent
`tokenizers` byte-level vocabulary, so the exported tokenizer gives the same ids.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from slipstream.data.sources.tokenizers import EOS_TOKEN, build_tokenizer
from slipstream.train import checkpoint as ckpt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    dtype: str = "float32",
    tokenizer: str | None = None,
    overwrite: bool = False,
    say=print,
) -> Path:
    """Write the run's checkpoint (the newest intact one, or `step`) to `out_dir`; returns it."""
    run, out = Path(run_dir), Path(out_dir)
    if not (run / "resolved.json").is_file():
        raise ValueError(f"{run}: not a run folder (no resolved.json); give a train.out_dir")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    _claim(out, overwrite)
    resolved = ckpt.read_json(run / "resolved.json")
    folder, meta, state = _newest_intact(run, step, say)
    model = meta["model"]
    state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    tok_ref = tokenizer or resolved["data"]["tokenizer"]
    tok = build_tokenizer(tok_ref, Path.cwd())
    # Written into a folder beside `out` and moved in once whole: a failure on the way leaves
    # `out` as it was (an earlier export in it included).
    part = out.parent / f".{out.name}.partial"
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    try:
        if model.get("kind", "gpt") == "gpt":
            config, tensors = _llama(model, state, tok.eos_id, dtype)
        else:
            config, tensors = _hf(model, state, run, dtype)
        config.save_pretrained(part)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, part / "model.safetensors",
                  metadata={"format": "pt"})  # fmt: skip
        _save_tokenizer(tok_ref, part)
        (part / "slipstream.json").write_text(
            json.dumps({"run": str(run.resolve()), "checkpoint": str(folder), "step": meta["step"]})
            + "\n"
        )
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    out.mkdir(parents=True, exist_ok=True)
    for name in EXPORTED:  # an earlier export's files that this one does not write go too
        (out / name).unlink(missing_ok=True)
    for f in part.iterdir():
        os.replace(f, out / f.name)
    part.rmdir()
    return out


EXPORTED = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "slipstream.json")  # fmt: skip


def _claim(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file; name a folder for the exported model")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: not empty; name a new folder, or pass --overwrite")


def _newest_intact(run: Path, step: int | None, say) -> tuple[Path, dict, dict]:
    """The checkpoint's folder, meta and whole-model state (tensor-parallel slices joined)."""
    found = ckpt.checkpoints(run)
    if step is not None:
        found = [p for p in found if p.name == f"{ckpt.PREFIX}{step:08d}"]
        if not found:
            raise ValueError(f"--step: {run} has no checkpoint of step {step}")
    if not found:
        raise ValueError(f"{run}: no checkpoint (train with train.checkpoint_every, or to the end)")
    for folder in found:
        try:
            meta = ckpt.read_json(folder / "meta.json")
            tp = int(meta.get("tp", 1))
            names = [f"model.tp{r}.pt" for r in range(tp)] if tp > 1 else ["model.pt"]
            slices = [ckpt.safe_load(folder / n) for n in names]
        except ckpt.DamagedCheckpoint as e:
            say(f"{e}; trying an older checkpoint")
            continue
        return folder, meta, slices[0] if tp == 1 else _joined(slices, meta["model"])
    raise ValueError(f"{run}: every checkpoint is damaged; nothing to export")


def _joined(slices: list[dict], model: dict) -> dict:
    if model.get("kind", "gpt") != "gpt":
        raise ValueError(
            "export: a tensor-parallel checkpoint of model.kind = 'hf' cannot be joined here; "
            "train it with parallel.tp = 1 to export it"
        )
    from slipstream.models import GPT, GPTConfig
    from slipstream.overlap.layout import merge_slices

    with torch.device("meta"):  # the layout only: no memory for the weights
        layout = GPT(GPTConfig(**model)).tensor_parallel_layout()
    return merge_slices(slices, layout)


def _llama(model: dict, state: dict, eos_id: int, dtype: str):
    from transformers import LlamaConfig

    from slipstream.models import GPT, GPTConfig

    cfg = GPTConfig(**model)
    if cfg.mlp != "swiglu":
        raise ValueError(
            "export: model.mlp = 'gelu' has no Llama counterpart; only SwiGLU GPTs export"
        )
    with torch.device("meta"):
        hidden = GPT(cfg).blocks[0].mlp.down.in_features
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        head_dim=cfg.d_model // cfg.n_head,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=1e-6,  # models/gpt.py's RMSNorm
        rope_theta=cfg.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        torch_dtype=dtype,
    )
    t = {
        "model.embed_tokens.weight": state["embed.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    if not cfg.tie_embeddings:
        t["lm_head.weight"] = state["head.weight"]
    for i in range(cfg.n_layer):
        b, at = f"blocks.{i}", f"model.layers.{i}"
        q, k, v = state[f"{b}.attn.qkv.weight"].chunk(3, 0)
        gate, up = state[f"{b}.mlp.up.weight"].chunk(2, 0)
        t |= {
            f"{at}.input_layernorm.weight": state[f"{b}.norm1.weight"],
            f"{at}.self_attn.q_proj.weight": q,
            f"{at}.self_attn.k_proj.weight": k,
            f"{at}.self_attn.v_proj.weight": v,
            f"{at}.self_attn.o_proj.weight": state[f"{b}.attn.proj.weight"],
            f"{at}.post_attention_layernorm.weight": state[f"{b}.norm2.weight"],
            f"{at}.mlp.gate_proj.weight": gate,
            f"{at}.mlp.up_proj.weight": up,
            f"{at}.mlp.down_proj.weight": state[f"{b}.mlp.down.weight"],
        }
    return config, t


def _hf(model: dict, state: dict, run: Path, dtype: str):
    """A model.kind = 'hf' run: its own config, its weights as trained (the adapter holds the
    transformers model as `.model`)."""
    from transformers import AutoConfig

    from slipstream.models.hf import resolve_hf_path

    if model.get("config"):
        conf = dict(model["config"])
        config = AutoConfig.for_model(conf.pop("model_type", "llama"), **conf)
    else:
        base = ckpt.read_json(run / "config.json").get("recipe_dir") or "."
        kwargs = {"gguf_file": model["gguf_file"]} if model.get("gguf_file") else {}
        config = AutoConfig.from_pretrained(resolve_hf_path(model["path"], base), **kwargs)
    config.torch_dtype = dtype
    tensors = {k.removeprefix("model."): v for k, v in state.items()}
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    return config, tensors


def byte_tokenizer_json():
    """The byte tokenizer (UTF-8 bytes 0..255, the end of a document 256) as a `tokenizers`
    byte-level BPE with no merges: the same ids for every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's alphabet: each byte as a printable character (printable ASCII and
    Latin-1 as themselves, the rest shifted past 255), the mapping byte-level tokenizers use."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, shift = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + shift)
            shift += 1
    return out


def _save_tokenizer(ref: str, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    if ref == "byte":
        fast = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer_json())
    else:
        fast = PreTrainedTokenizerFast(tokenizer_file=os.fspath(Path(ref).expanduser()))
    fast.eos_token = fast.bos_token = EOS_TOKEN
    fast.save_pretrained(out)
