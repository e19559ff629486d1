"""Two nodes: two `torchrun` launches on this machine (`--nnodes 2`, a c10d rendezvous on
127.0.0.1, 2 processes each) train as one job of 4 ranks and give the one-process losses;
each node's data machine group is that node's ranks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.test_train import ROOT, losses, reference_losses, write_recipe
from tests.overlap.ranks import free_port

__all__ = ["reference_losses"]


def launch(node_rank: int, port: int, recipe, *args: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=2", f"--node_rank={node_rank}", "--nproc_per_node=2",
        "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes",
        "-m", "slipstream", "train", str(recipe), *args,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_two_nodes_of_two_ranks_match_one_process(tmp_path, reference_losses):
    # 4 data-parallel ranks x 1 row: the one-process step's 4 rows (2 micro-batches of 2).
    recipe = write_recipe(tmp_path, micro_batch_size=1, num_micro_batches=1)
    run = tmp_path / "run"
    port = free_port()
    args = ("--set", f"train.out_dir='{run}'")
    nodes = [launch(n, port, recipe, *args) for n in (0, 1)]
    outs = []
    for p in nodes:
        try:
            outs.append(p.communicate(timeout=300))
        except subprocess.TimeoutExpired:
            for q in nodes:
                q.kill()
            raise
    for p, (_, err) in zip(nodes, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    # Each rank sums its rows' token losses; the sums meet in one all-reduce over 4 ranks
    # instead of one process's two micro-batches: the same tolerance as 2 ranks on one node.
    assert losses(run) == pytest.approx(reference_losses, rel=1e-6)
    resolved = json.loads((run / "resolved.json").read_text())
    assert resolved["topology"] == {"world_size": 4, "nodes": 2, "ranks_per_node": 2}
    assert resolved["data"]["machine_group"] == [0, 1]  # rank 0's node: ranks 0 and 1
