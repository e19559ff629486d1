"""Topology: where this process stands in its job, as one value. `train/distributed.py` builds
it once from the launcher (torchrun's variables); the data plane, the optimizer and the overlap
groups take it as an argument and read no launcher variable themselves. Used without the
trainer, build one by hand (`Topology(rank=r, world_size=w)`), as torchdata's samplers take a
rank and a world size.

Layout: tensor-parallel groups are consecutive ranks (rank = dp_rank * tp_size + tp_rank), so
they stay inside a node; a node holds `local_world_size` consecutive ranks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    rank: int = 0
    """This process among all of the job's."""
    world_size: int = 1
    local_rank: int = 0
    """This process among its node's."""
    local_world_size: int = 1
    """Processes per node (every node has as many)."""
    tp_size: int = 1
    """Tensor-parallel ranks per model replica."""
    run_id: str = ""
    """The launcher's name for this job (torchrun's run id): names what the job's ranks
    share on a machine (a local Ray's address, the data plane's store). Empty: none."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"topology: rank {self.rank} outside [0, {self.world_size})")
        if self.tp_size < 1 or self.world_size % self.tp_size:
            raise ValueError(
                f"topology: tp_size {self.tp_size} does not divide world_size {self.world_size}"
            )
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(
                f"topology: local rank {self.local_rank} outside [0, {self.local_world_size})"
            )

    @classmethod
    def data_parallel(cls, dp_rank: int, dp_size: int) -> Topology:
        """One process per data-parallel rank, no tensor parallelism, one process per node
        (what a data plane used on its own assumes)."""
        return cls(rank=dp_rank, world_size=dp_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def node_rank(self) -> int:
        return self.rank // self.local_world_size

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)

    @property
    def node_ranks(self) -> range:
        """The global ranks on this process's node."""
        first = self.node_rank * self.local_world_size
        return range(first, min(first + self.local_world_size, self.world_size))

    @property
    def dp_ranks_per_node(self) -> int:
        """Data-parallel ranks whose processes share this node (1 when a replica spans
        nodes)."""
        if self.local_world_size % self.tp_size:
            return 1
        return max(1, min(self.local_world_size // self.tp_size, self.dp_size))
