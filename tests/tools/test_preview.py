"""`slipstream data preview`'s numbers: proportions near target, balance beats both baselines."""

from __future__ import annotations

import numpy as np

from slipstream.data import MixtureSpec
from slipstream.tools.preview import run_preview
from tests.conftest import corpus_spec


def test_preview_reports_shares_near_target_and_balance_below_its_baselines(tmp_path):
    raw = corpus_spec(tmp_path, "jsonl", seq_len=256, micro_batch_size=4)
    raw["balance"] = {"method": "kk"}
    spec = MixtureSpec.from_dict(raw, base_dir=str(tmp_path))
    report = run_preview(spec, num_steps=12, num_ranks=4, show_progress=False)
    shares = report.docs / report.docs.sum()
    # Credit mixing keeps each source within one document of its target at every prefix.
    assert np.abs(shares - np.array(report.target)).max() <= 1.5 / report.docs.sum()
    assert report.imbalance <= report.imbalance_random and report.imbalance < 1.1
    assert report.imbalance <= report.imbalance_unbalanced
    assert report.tokens.sum() > 0 and report.tokens_per_s > 0
