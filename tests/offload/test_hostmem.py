"""Host buffers in huge pages: aligned, zeroed, counted, freed, and what the engine and
HostAdamW step on."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from slipstream.offload import hostmem
from slipstream.offload.host_adam import HostAdamW

needs_thp = pytest.mark.skipif(
    hostmem.thp_mode() in (None, "never"), reason="the OS offers no huge pages"
)
BIG = hostmem.HUGE_PAGE // 4 * 3  # fp32 elements: 6 MiB, three huge pages


def huge_kib_at(ptr: int) -> int:
    """AnonHugePages of the mapping that holds address `ptr` (from /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= ptr < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {ptr:#x}")


def test_mapped_buffers_are_aligned_zeroed_counted_and_freed():
    before = hostmem.live_bytes()
    t = hostmem.host_zeros(BIG)
    assert t.dtype == torch.float32 and t.shape == (BIG,)
    assert t.data_ptr() % hostmem.HUGE_PAGE == 0
    assert int(t.count_nonzero()) == 0
    assert hostmem.live_bytes() - before == BIG * 4
    view = t[10:20]  # a view keeps the mapping alive
    del t
    gc.collect()
    assert hostmem.live_bytes() - before == BIG * 4
    view.fill_(3.0)
    assert float(view.sum()) == 30.0
    del view
    gc.collect()
    assert hostmem.live_bytes() == before


def test_small_requests_use_torch():
    before = hostmem.live_bytes()
    small = hostmem.host_zeros(1000, torch.bfloat16)
    assert small.dtype == torch.bfloat16 and int(small.count_nonzero()) == 0
    assert hostmem.live_bytes() == before


@needs_thp
def test_buffers_land_in_huge_pages():
    t = hostmem.host_empty(BIG)
    t.fill_(1.0)  # touched: the kernel backs it now
    assert huge_kib_at(t.data_ptr()) >= 2048


@needs_thp
def test_host_adamw_moments_are_in_huge_pages_and_match_torch():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(BIG, generator=g)
    ref = p.clone().requires_grad_()
    ours = HostAdamW([p], lr=1e-2, weight_decay=0.1)
    theirs = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(BIG, generator=g)
        p.grad, ref.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(p, ref.detach(), rtol=1e-6, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        assert huge_kib_at(ours.state[p][key].data_ptr()) >= 2048
    # A loaded state is moved into huge pages too, and steps the same.
    again = HostAdamW([p.clone()], lr=1e-2, weight_decay=0.1)
    again.load_state_dict(ours.state_dict())
    moved = again.state[again.param_groups[0]["params"][0]]["exp_avg"]
    assert huge_kib_at(moved.data_ptr()) >= 2048
    torch.testing.assert_close(moved, ours.state[p]["exp_avg"], rtol=0, atol=0)


@needs_thp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_state_is_in_huge_pages(dtype):
    from slipstream.offload.engine import OffloadOptimizer

    model = torch.nn.Linear(1024, BIG // 1024, bias=False).to(dtype)
    groups = [{"params": list(model.parameters()), "weight_decay": 0.1}]
    opt = OffloadOptimizer(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    model(torch.randn(2, 1024, dtype=dtype)).float().square().sum().backward()
    opt.step()
    (b,) = opt.buckets
    st = opt.host.state[b.master]
    mapped = [b.master, opt.grads[0].buf, st["exp_avg"], st["exp_avg_sq"]]
    if dtype == torch.bfloat16:
        mapped.append(b.working)
    for t in mapped:
        assert huge_kib_at(t.data_ptr()) >= 2048
    opt.close()


def test_thp_mode_reads_the_bracketed_setting(tmp_path):
    setting = tmp_path / "enabled"
    for text, want in (
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always madvise [never]\n", "never"),
        ("garbled\n", None),
    ):
        setting.write_text(text)
        assert hostmem.thp_mode(setting) == want
    assert hostmem.thp_mode(tmp_path / "absent") is None


def test_a_kernel_without_huge_pages_is_named_once(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(hostmem, "THP_SETTING", setting)
    monkeypatch.setattr(hostmem, "_warned", [False])
    with pytest.warns(UserWarning, match="transparent huge pages are off"):
        a = hostmem.host_zeros(BIG)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning
        b = hostmem.host_zeros(BIG)
    assert a.shape == b.shape == (BIG,)
