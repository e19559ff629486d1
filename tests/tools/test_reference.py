"""docs/reference.md is generated from the configuration classes: it fails here when a default
or a field's docstring changed without the document (regenerate it with the line below)."""

from __future__ import annotations

import dataclasses

from slipstream.tools.reference import SECTIONS, SKIP, field_docs, render
from tests.conftest import ROOT

REGENERATE = "python -m slipstream.tools.reference > docs/reference.md"


def test_the_reference_is_the_code_s():
    on_disk = (ROOT / "docs" / "reference.md").read_text()
    assert on_disk == render(), f"docs/reference.md is out of date: run `{REGENERATE}`"


def test_every_key_is_documented():
    missing = [
        f"{title} {f.name}"
        for title, cls, _ in SECTIONS
        for f in dataclasses.fields(cls)
        if f.name not in SKIP.get(cls, ()) and not field_docs(cls).get(f.name)
    ]
    assert not missing, f"fields without a docstring: {missing}"


def test_train_help_shows_the_real_defaults():
    import re
    import tomllib

    from slipstream.cli import TRAIN_DESCRIPTION

    classes = {}
    for title, cls, _ in SECTIONS:
        classes.setdefault(title.strip("[]"), cls)
    checked = 0
    for section, body in re.findall(r"^  \[(\w+)\]\s+(.*(?:\n {13}.*)*)", TRAIN_DESCRIPTION, re.M):
        cls = classes[section]
        for key, value in re.findall(r"(\w+) = ((?:\[[^\]]*\])|[^,(\n]+)", body):
            try:
                shown = tomllib.loads(f"v = {value.strip()}")["v"]
            except tomllib.TOMLDecodeError:
                continue  # runs/<recipe name>: a rule, not a value
            field = {f.name: f for f in dataclasses.fields(cls)}[key]
            real = (
                field.default
                if field.default is not dataclasses.MISSING
                else field.default_factory()
            )
            assert shown == real, f"train --help says {section}.{key} = {shown!r}; it is {real!r}"
            checked += 1
    assert checked >= 15
