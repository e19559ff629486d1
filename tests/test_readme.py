"""The README a newcomer reads: short, its file tree complete, every link alive (also in the
results index and the pillar READMEs)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "results" / "README.md",
        *sorted((ROOT / "slipstream").glob("*/README.md"))]  # fmt: skip


def test_the_readme_reads_in_five_minutes():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 220


def test_the_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    names = {p.name for p in (ROOT / "slipstream").rglob("*.py") if p.name != "__init__.py"}
    missing = sorted(n for n in names if n not in layout)
    assert not missing, f"README's layout does not name {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_to_a_file(doc):
    text = doc.read_text()
    links = re.findall(r"\]\(([^)#\s]+)\)", text)
    links += re.findall(r"`(benchmarks/results/[^`\s]+\.md)`", text)
    broken = []
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        base = ROOT if link.startswith("benchmarks/results/") and "`" not in link else doc.parent
        if not ((doc.parent / link).exists() or (ROOT / link).exists() or (base / link).exists()):
            broken.append(link)
    assert not broken, f"{doc.relative_to(ROOT)}: links to nothing: {broken}"


def test_a_clone_holds_no_links_and_no_data():
    """A symbolic link in the repository (`data -> /somewhere`) breaks `make demo` on every
    other machine; the corpus and runs are made, never committed."""
    import subprocess

    files = subprocess.run(
        ["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    links = [line.split("\t")[1] for line in files if line.startswith("120000")]
    assert links == []
    top = {line.split("\t")[1].split("/")[0] for line in files}
    assert not top & {"data", "runs", ".venv"}
