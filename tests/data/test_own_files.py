"""A user's own files as they come: folders, compressed JSON lines, a field of the wrong type,
more corrupt records than a run should accept; and nothing written beside them."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from slipstream.data import MixtureSpec, build_source_loaders
from tests.conftest import CACHE, make_docs

DOCS = make_docs(11, 40, 15)


def one_source(tmp_path, paths, **fields) -> list:
    """The loaders of a one-source mixture over `paths` (relative to tmp_path)."""
    raw = {
        "sources": [{"name": "mine", "paths": paths, "weight": 1.0, **fields}],
        "seq_len": 64,
        "micro_batch_size": 1,
        "num_micro_batches": 1,
    }
    return build_source_loaders(MixtureSpec.from_dict(raw, str(tmp_path)))


def jsonl_lines(docs) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()


def test_a_folder_stands_for_the_files_of_its_format_in_it_and_below(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "2024" / "deep").mkdir(parents=True)
    (corpus / "a.jsonl").write_bytes(jsonl_lines(DOCS[:10]))
    (corpus / "2024" / "b.jsonl").write_bytes(jsonl_lines(DOCS[10:25]))
    (corpus / "2024" / "deep" / "c.jsonl").write_bytes(jsonl_lines(DOCS[25:]))
    (corpus / "notes.txt").write_text("not a jsonl file, left out")
    (corpus / ".hidden.jsonl").write_text("{not json\n")  # hidden: left out
    (ldr,) = one_source(tmp_path, ["corpus"])
    assert ldr.num_docs == len(DOCS) and ldr.num_bad == 0
    # sorted by path: 2024/b, 2024/deep/c, a
    assert ldr.read_texts(range(ldr.num_docs)) == DOCS[10:25] + DOCS[25:] + DOCS[:10]


def test_a_folder_without_files_of_the_format_says_so(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("plain text")
    with pytest.raises(
        ValueError, match=r"the folder 'corpus' holds no \.jsonl/.*set the source's format"
    ):
        one_source(tmp_path, ["corpus"])
    (ldr,) = one_source(tmp_path, ["corpus"], format="text")
    assert ldr.read_texts([0]) == ["plain text"]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_compressed_json_lines_read_as_the_plain_file(tmp_path, suffix):
    (tmp_path / "plain.jsonl").write_bytes(jsonl_lines(DOCS))
    data = jsonl_lines(DOCS)
    packed = gzip.compress(data) if suffix.endswith("gz") else zstandard.compress(data)
    (tmp_path / f"packed{suffix}").write_bytes(packed)
    (plain,) = one_source(tmp_path, ["plain.jsonl"])
    (ldr,) = one_source(tmp_path, [f"packed{suffix}"])
    ids = list(range(len(DOCS)))[::-1]
    assert ldr.read_texts(ids) == plain.read_texts(ids)
    # A loader that finds the decompressed copy gone (another node, a cleared cache) makes it.
    ldr.close()
    for copy in (CACHE / "plain").glob(f"*packed{suffix[:-4]}"):
        copy.unlink()
    assert ldr.read_texts(ids[:3]) == DOCS[::-1][:3]


def test_a_damaged_compressed_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(jsonl_lines(DOCS))[:-40])
    with pytest.raises(ValueError, match=r"broken\.jsonl\.gz: cannot be decompressed"):
        one_source(tmp_path, ["broken.jsonl.gz"])


def test_nothing_is_written_beside_the_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_bytes(jsonl_lines(DOCS))
    (data / "b.jsonl.gz").write_bytes(gzip.compress(jsonl_lines(DOCS)))
    (ldr,) = one_source(tmp_path, ["data"])
    ldr.lengths()  # the token counts too
    assert sorted(p.name for p in data.iterdir()) == ["a.jsonl", "b.jsonl.gz"]
    assert len(list((CACHE / "index").glob("*-a.jsonl.slipidx.npz"))) >= 1


def test_a_text_field_of_another_type_is_named_as_such(tmp_path):
    (tmp_path / "n.jsonl").write_text("".join(json.dumps({"text": i}) + "\n" for i in range(5)))
    with pytest.raises(ValueError, match=r"n\.jsonl:1: field 'text' holds a int, not text"):
        one_source(tmp_path, ["n.jsonl"])
    pq.write_table(pa.table({"text": list(range(5))}), tmp_path / "n.parquet")
    with pytest.raises(ValueError, match=r"column 'text' holds int64, not text; set text_field"):
        one_source(tmp_path, ["n.parquet"], format="parquet")


def test_more_corrupt_records_than_the_source_allows_stop_the_run(tmp_path):
    lines = jsonl_lines(DOCS[:18]) + b"{not json\n" + b'{"body": "x"}\n'  # 2 of 20 corrupt
    (tmp_path / "a.jsonl").write_bytes(lines)
    with pytest.raises(ValueError) as err:
        one_source(tmp_path, ["a.jsonl"])
    said = str(err.value)
    assert "2 of 20 records are corrupt (10.0% > max_bad_fraction 0.05)" in said
    assert "a.jsonl:19: not valid JSON" in said and "raise sources.mine.max_bad_fraction" in said
    (ldr,) = one_source(tmp_path, ["a.jsonl"], max_bad_fraction=0.1)
    assert (ldr.num_docs, ldr.num_bad) == (18, 2)
