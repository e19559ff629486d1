"""Matmul + reduce-scatter: out = reduce_scatter(x @ w) over rows, where every rank holds a
slice of the inner dimension (x [M, K_local], w [K_local, N]) and receives the sum of rows
[rank * m, (rank + 1) * m) of every rank's partial product, m = M / world.

Tile order (symmetric implementations): rank r computes the partial rows of rank r + 1 first,
writing them straight into r + 1's symmetric buffer, and hands the signal to its producer
thread (which raises it once the link has carried them, while the next tile computes), then
r + 2, ..., and its own rows last; it adds what it receives in the order it arrives (r - 1,
r - 2, ...), the order the pairing above sends them in.
"""

from __future__ import annotations

import contextlib

import torch

from slipstream.comm import reduce_scatter_single
from slipstream.overlap.group import OverlapGroup


def matmul_reduce_scatter(x: torch.Tensor, w: torch.Tensor, group: OverlapGroup) -> torch.Tensor:
    """[M / world, N]; M must divide by the group's world size."""
    world = group.world_size
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(
            f"matmul_reduce_scatter: x {tuple(x.shape)} @ w {tuple(w.shape)}: need [M, K] @ [K, N]"
        )
    if x.shape[0] % world:
        raise ValueError(
            f"matmul_reduce_scatter: {x.shape[0]} rows do not split over {world} ranks; pad the "
            "rows to a multiple of the tensor-parallel size"
        )
    if world == 1:
        return x @ w
    if group.impl == "reference":
        partial = x @ w
        with group.exposed():
            return _reduce_scatter(partial, group)
    if group.impl == "collective":
        return _collective(x, w, group)
    return _symmetric(x, w, group)


def _reduce_scatter(partial: torch.Tensor, group: OverlapGroup, async_op: bool = False):
    out = partial.new_empty((partial.shape[0] // group.world_size, *partial.shape[1:]))
    work = reduce_scatter_single(out, partial, group=group.group, async_op=async_op)
    return (out, work) if async_op else out


def _collective(x, w, group: OverlapGroup) -> torch.Tensor:
    """Column chunks: the reduce-scatter of chunk c runs while chunk c+1 is computed."""
    cols = [c for c in torch.tensor_split(torch.arange(w.shape[1]), group.chunks) if len(c)]
    pending = []
    for c in cols:
        partial = (x @ w[:, c[0] : c[-1] + 1]).contiguous()
        pending.append(_reduce_scatter(partial, group, async_op=True))
    for _, work in pending:
        with group.exposed():
            work.wait()
    return torch.cat([out for out, _ in pending], dim=1)


def _symmetric(x, w, group: OverlapGroup) -> torch.Tensor:
    """Partial rows are computed in growing row chunks straight into the destination rank's
    symmetric buffer (the matmul's output is the remote slot: no copy), each chunk then
    signalled by the producer thread after the link has carried it (a count per chunk on the
    sender's flag): the first signal follows a small matmul, and the last chunk travels while
    this rank computes its own rows. Two slots alternate by call, so a rank may write call
    k + 1 while a slower peer still sums call k."""
    world, rank = group.world_size, group.rank
    m = x.shape[0] // world
    ws = group.workspace("rs", (2, world, m, w.shape[1]), torch.result_type(x, w))
    epoch = ws.next_epoch()
    slot = epoch % 2
    heap, chunks = ws.heap, group.row_chunks(m, geometric=True)
    base = (epoch - 1) * len(chunks)  # the flag counts chunks over all calls, never reset

    def send(dst: int, c: int, nbytes: int, on_copy_stream) -> None:
        with on_copy_stream():
            group.record("put_issued", dst, epoch)
            group.link.send(nbytes)
            # After the data (flags.py; on CUDA, stream order after the matmul).
            heap.signal(dst, ws.ready + rank, base + c + 1)
            group.record("put_done", dst, epoch)

    sends = []
    try:
        for i in range(1, world):
            dst = (rank + i) % world
            group.wait(ws, ws.ack + dst, epoch - 2)  # dst has summed this slot's last call
            dest = heap.peer(dst, ws.buf)[slot, rank]
            for c, rows in enumerate(chunks):
                group.record("tile_start", dst, epoch)
                part = dest[rows]
                torch.matmul(x[dst * m + rows.start : dst * m + rows.stop], w, out=part)
                group.record("tile_done", dst, epoch)
                stream = group.copy_stream(part, owned=False)
                nbytes = part.numel() * part.element_size()
                sends.append(group.producer.submit(send, dst, c, nbytes, stream))
        group.record("tile_start", rank, epoch)
        out = x[rank * m : (rank + 1) * m] @ w
        group.record("tile_done", rank, epoch)
        buf = heap.local(ws.buf)[slot]
        for i in range(1, world):
            src = (rank - i) % world
            for c, rows in enumerate(chunks):
                group.wait(ws, ws.ready + src, base + c + 1)
                group.record("signal_seen", src, epoch)
                out[rows] += buf[src, rows]
        ws.acknowledge(rank, world)  # every slot summed: producers may overwrite
    except BaseException:
        ws.abort()  # the producer stops too; its own error must not hide this one
        for s in sends:
            with contextlib.suppress(BaseException):
                s.result()
        raise
    for s in sends:
        s.result()
    return out
