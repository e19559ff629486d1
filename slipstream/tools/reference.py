"""The recipe and mixture-spec reference (`docs/reference.md`), generated from the configuration
dataclasses: each key with its default and its field docstring. `python -m
slipstream.tools.reference > docs/reference.md` writes it; a test fails when the file and the
code disagree, so the reference never drifts from the defaults."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import sys
import textwrap

from slipstream.data.spec import BackendSpec, BalanceSpec, MixtureSpec, SourceSpec
from slipstream.models.config import GPTConfig, HFConfig
from slipstream.train.config import TrainConfig
from slipstream.train.distributed import ParallelConfig
from slipstream.train.optim import OptimConfig

HEADER = """# Configuration reference

Generated from the configuration classes by `python -m slipstream.tools.reference`; do not edit
(a test compares it with the code). A recipe is a TOML file with the sections below; a key
left out takes its default. Any key can be set on the command line: `--set
section.key=value` (`--set data.sources.0.weight=0.5` reaches a source of the spec). A path
written in a file is relative to that file's folder; a path on the command line to the
working directory.
"""

SECTIONS = [
    ("[model]", GPTConfig, 'Slipstream\'s GPT (`kind = "gpt"`, the default).'),
    ("[model]", HFConfig, 'A Hugging Face causal LM (`kind = "hf"`).'),
    (
        "[data]",
        MixtureSpec,
        "The mixture: a recipe's `[data]` table, or a spec file that "
        "`data.spec` names (its keys then override the file's).",
    ),  # fmt: skip
    ("[[data.sources]]", SourceSpec, "One per source (in a spec file: `[[sources]]`)."),
    ("[data.balance]", BalanceSpec, ""),
    ("[data.backend]", BackendSpec, ""),
    ("[optim]", OptimConfig, ""),
    ("[train]", TrainConfig, ""),
    ("[parallel]", ParallelConfig, ""),
]
SKIP = {MixtureSpec: {"sources", "balance", "backend", "base_dir"}}


def field_docs(cls) -> dict[str, str]:
    """Each field's docstring: the string literal right after its annotated assignment."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:] + [None], strict=True):
        named = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        if named and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = inspect.cleandoc(str(after.value.value))
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value is None:
        return "(unset)"
    if dataclasses.is_dataclass(value):
        return "(a table)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str | list | dict) else repr(value)


def render() -> str:
    out = [HEADER]
    for title, cls, note in SECTIONS:
        out += [f"## `{title}` ({cls.__name__})", ""]
        if note or cls.__doc__:
            out += [note or inspect.cleandoc(cls.__doc__).split("\n\n")[0], ""]
        out += ["| key | default | meaning |", "|---|---|---|"]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in SKIP.get(cls, ()):
                continue
            doc = " ".join(docs.get(f.name, "").split()).replace("|", "\\|")
            out.append(f"| `{f.name}` | `{_default(f)}` | {doc} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
