"""All-gather + matmul: y = all_gather(x_shard) @ w, where every rank holds `m` rows of x.

Tile order (symmetric implementations): at step i, rank r puts its shard to rank r - i while
it computes on the shard of rank r + i, which is the one rank r + i is putting to it at that
very step; so each rank starts on its own shard at once and finds every later shard arriving
in the order it needs them. The result is checked against `reference` (one blocking
all-gather, then one matmul). Shapes: m rows per rank, K inner, N output columns.
"""

from __future__ import annotations

import contextlib

import torch

from slipstream.comm import all_gather_single
from slipstream.overlap.flags import DEFAULT_TIMEOUT_S, SignalTimeout
from slipstream.overlap.group import OverlapGroup


def all_gather_matmul(
    x_shard: torch.Tensor, w: torch.Tensor, group: OverlapGroup, return_gathered: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y [world * m, N], the gathered x [world * m, K] if asked). Every rank of the group
    calls this with the same shapes."""
    if x_shard.dim() != 2 or w.dim() != 2 or x_shard.shape[1] != w.shape[0]:
        raise ValueError(
            f"all_gather_matmul: x_shard {tuple(x_shard.shape)} @ w {tuple(w.shape)}: need "
            "[m, K] @ [K, N]"
        )
    if group.world_size == 1:
        return x_shard @ w, (x_shard if return_gathered else None)
    if group.impl == "reference":
        with group.exposed():
            gathered = all_gather(x_shard, group)
        return gathered @ w, (gathered if return_gathered else None)
    if group.impl == "collective":
        return _collective(x_shard, w, group, return_gathered)
    return _symmetric(x_shard.contiguous(), w, group, return_gathered)


def all_gather(x: torch.Tensor, group: OverlapGroup, async_op: bool = False):
    """Rows of every rank, rank-major, by one collective (and its work handle if async)."""
    out = x.new_empty((group.world_size * x.shape[0], *x.shape[1:]))
    work = all_gather_single(out, x.contiguous(), group=group.group, async_op=async_op)
    return (out, work) if async_op else out


def _collective(x_shard, w, group: OverlapGroup, return_gathered: bool):
    """Row chunks of the shard gathered asynchronously, all issued at once; the matmul of
    chunk c runs while chunks c+1... are in flight."""
    world, m = group.world_size, x_shard.shape[0]
    pieces = [p for p in torch.tensor_split(x_shard, min(group.chunks, max(m, 1))) if len(p)]
    pending = [all_gather(p, group, async_op=True) for p in pieces]
    y = x_shard.new_empty((world, m, w.shape[1]))
    gathered = x_shard.new_empty((world, m, x_shard.shape[1])) if return_gathered else None
    row = 0
    for piece, (out, work) in zip(pieces, pending):
        with group.exposed():
            work.wait()
        rows = slice(row, row + piece.shape[0])
        y[:, rows] = (out @ w).view(world, piece.shape[0], -1)
        if gathered is not None:
            gathered[:, rows] = out.view(world, piece.shape[0], -1)
        row += piece.shape[0]
    return y.view(world * m, -1), (gathered.view(world * m, -1) if return_gathered else None)


def _symmetric(x_shard, w, group: OverlapGroup, return_gathered: bool):
    """Each shard travels in row chunks, each with its own count on the shard's flag, so the
    consumer starts on a shard's first rows while the rest are in flight: only the last
    chunk's transfer is left exposed."""
    world, rank, m = group.world_size, group.rank, x_shard.shape[0]
    ws = group.workspace("ag", (world, m, x_shard.shape[1]), x_shard.dtype)
    epoch = ws.next_epoch()
    heap, chunks = ws.heap, group.row_chunks(m)
    base = (epoch - 1) * len(chunks)  # the flag counts chunks over all calls, never reset

    on_copy_stream = group.copy_stream(x_shard)

    def produce() -> None:
        with on_copy_stream():
            for i in range(1, world):
                dst = (rank - i) % world
                group.wait(ws, ws.ack + dst, epoch - 1)  # dst has read the last call's shard
                for c, rows in enumerate(chunks):
                    group.record("put_issued", dst, epoch)
                    piece = x_shard[rows]
                    group.link.send(piece.numel() * piece.element_size())
                    heap.put(dst, ws.buf, piece, index=(rank, rows))
                    # After the data (flags.py; on CUDA, stream order).
                    heap.signal(dst, ws.ready + rank, base + c + 1)
                    group.record("put_done", dst, epoch)

    sending = group.producer.submit(produce)
    try:
        if group.kernel == "triton":
            y = _consume_triton(x_shard, w, group, ws, base + len(chunks))
        else:
            y = _consume_torch(x_shard, w, group, ws, epoch, chunks)
        gathered = None
        if return_gathered:  # the buffer is reused by the next call: copy out
            gathered = heap.local(ws.buf).clone()
            gathered[rank] = x_shard
            gathered = gathered.view(world * m, -1)
        ws.acknowledge(rank, world)  # done reading every slot: producers may overwrite
    except BaseException:
        ws.abort()  # the producer stops too; its own error must not hide this one
        with contextlib.suppress(BaseException):
            sending.result()
        raise
    sending.result()
    return y, gathered


def _consume_torch(x_shard, w, group: OverlapGroup, ws, epoch: int, chunks) -> torch.Tensor:
    world, rank, m = group.world_size, group.rank, x_shard.shape[0]
    y = x_shard.new_empty((world * m, w.shape[1]))
    buf = ws.heap.local(ws.buf)
    base = (epoch - 1) * len(chunks)
    group.record("tile_start", rank, epoch)  # this rank's own shard: no wait, one matmul
    torch.matmul(x_shard, w, out=y[rank * m : (rank + 1) * m])
    group.record("tile_done", rank, epoch)
    for i in range(1, world):
        src = (rank + i) % world
        done = 0
        while done < len(chunks):
            # Wait for the next chunk, then take every chunk that has landed in one matmul:
            # small pieces only when the link is the bottleneck (they cost matmul efficiency).
            group.wait(ws, ws.ready + src, base + done + 1)
            have = min(len(chunks), ws.heap.value(ws.ready + src) - base)
            group.record("signal_seen", src, epoch)
            rows = slice(chunks[done].start, chunks[have - 1].stop)
            group.record("tile_start", src, epoch)
            out = y[src * m + rows.start : src * m + rows.stop]
            torch.matmul(buf[src, rows], w, out=out)
            group.record("tile_done", src, epoch)
            done = have
    return y


def _consume_triton(x_shard, w, group: OverlapGroup, ws, target: int) -> torch.Tensor:
    """The Triton consumer reads every shard from the buffer, waiting on each shard's flag
    (until it reaches `target`: all its chunks of this call) on the device, or in the
    interpreter; this rank's own shard goes in first."""
    from slipstream.overlap.kernels.consumer_gemm import consumer_gemm

    heap, rank = ws.heap, group.rank
    heap.put(rank, ws.buf, x_shard, index=rank)
    heap.signal(rank, ws.ready + rank, target)
    flags = heap.flag_tensor(ws.ready, group.world_size)
    buf = heap.local(ws.buf)
    timeout_s = group.timeout_s if group.timeout_s is not None else DEFAULT_TIMEOUT_S
    y, timed_out = consumer_gemm(buf.view(-1, buf.shape[-1]), w, flags, rank, target, timeout_s)
    if timed_out:
        raise SignalTimeout(
            f"rank {rank}: the consumer kernel gave up waiting on shard(s) {timed_out} (flag "
            f"target {target}); flags [shard, writer]: {flags.tolist()}"
        )
    return y
