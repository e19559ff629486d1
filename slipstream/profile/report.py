"""The doctor's report: a terminal summary (rich), a self-contained HTML page (matplotlib
charts inlined as SVG: no script, no network), and the comparison of two runs."""

from __future__ import annotations

import html
import io
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slipstream.profile.timeline import PHASES

PHASE_COLUMNS = (*PHASES, "other")
GIB = 2**30
COLORS = {
    "data_wait": "#d62728", "h2d": "#ff7f0e", "forward": "#1f77b4", "backward": "#17becf",
    "grad_offload": "#9467bd", "comm": "#e377c2", "optimizer": "#2ca02c", "other": "#7f7f7f",
}  # fmt: skip
SHORT = {
    "data_wait": "data",
    "h2d": "h2d",
    "forward": "fwd",
    "backward": "bwd",
    "grad_offload": "offl",
    "comm": "comm",
    "optimizer": "opt",
    "other": "other",
}
MARK = {"critical": "[bold red]critical[/]", "warning": "[yellow]warning[/]", "info": "info"}


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def gain_line(g: dict | None) -> str:
    if not g:
        return "gain: not predicted"
    what = "expected gain" if g["fraction"] >= 0 else "expected cost (what fitting takes)"
    return (f"{what}: {abs(g['fraction']):.0%} of the step ({_ms(g['step_s'])} -> "
            f"{_ms(g['predicted_step_s'])} ms, {g['speedup']:.2f}x; {g['confidence']} "
            f"confidence): {g['model']}")  # fmt: skip


def print_report(console: Console, report: dict) -> None:
    m = report["profile"]
    t = m["topology"]
    mfu = f", MFU {m['mfu']:.1%} ({m['peak_from']})" if m.get("mfu") else ""
    console.print(
        f"[bold]doctor[/]: {report['run']}: {m['steps_measured']} steps measured on "
        f"{t['world_size']} rank(s) (dp {t['dp_size']} x tp {t['tp_size']}), "
        f"{_ms(m['step_s'])} ms a step, {m['tokens_per_s']:,.0f} tokens/s{mfu}",
        soft_wrap=True,
    )
    table = Table(title="seconds per step by phase (median, ms)")
    table.add_column("rank", justify="right")
    for p in PHASE_COLUMNS:
        table.add_column(SHORT[p], justify="right")
    table.add_column("step", justify="right")
    table.add_column("score", justify="right")
    for r in m["ranks"]:
        table.add_row(str(r["rank"]), *[_ms(r["phases_s"][p]) for p in PHASE_COLUMNS],
                      _ms(r["step_s"]), f"{r['relative_score']:.2f}")  # fmt: skip
    console.print(table)
    console.print(memory_line(m) + data_line(m), markup=False, soft_wrap=True)
    for i, f in enumerate(report["findings"], 1):
        console.print(f"{i}. {MARK[f['severity']]} {html.escape(f['verdict'], quote=False)}",
                      soft_wrap=True)  # fmt: skip
        for line in f["lever"]:
            console.print(f"   lever: {line}", markup=False, soft_wrap=True)
        console.print(f"   {gain_line(f['gain'])}", markup=False, soft_wrap=True)
        if f["note"]:
            console.print(f"   note: {f['note']}", markup=False, soft_wrap=True)
    v = report.get("verify")
    if v and v.get("checked"):
        err = f"{v['error']:+.0%}" if v["error"] is not None else "n/a"
        console.print(
            f"verify: {' '.join(v['lever'])}: predicted {v['predicted_fraction']:.0%}, "
            f"measured {v['measured_fraction']:.0%} ({_ms(v['step_s_before'])} -> "
            f"{_ms(v['step_s_after'])} ms a step); the prediction's error {err}",
            markup=False, soft_wrap=True,
        )  # fmt: skip
    elif v:
        console.print(f"verify: not checked: {v['why']}", markup=False, soft_wrap=True)
    console.print(f"recording cost {m['overhead']:.3%} of the step", markup=False)


def memory_line(m: dict) -> str:
    gib, mem = GIB, m["memory"]
    parts = []
    if mem.get("device_capacity_bytes"):
        parts.append(f"device peak {mem['device_peak_bytes'] / gib:.2f} of "
                     f"{mem['device_capacity_bytes'] / gib:.1f} GiB")  # fmt: skip
    parts.append(f"host peak {mem['host_peak_bytes'] / gib:.2f} of "
                 f"{mem['host_capacity_bytes'] / gib:.1f} GiB (resident, the largest rank)")  # fmt: skip
    return "memory: " + "; ".join(parts)


def data_line(m: dict) -> str:
    src = "; ".join(f"{x['name']} {x['ms_per_doc']:.2f} ms/doc" for x in m["sources"]
                    if x["ms_per_doc"] is not None)  # fmt: skip
    queue = (
        f", {m['queue_depth']:.0f} step(s) ready when asked"
        if m.get("queue_depth") is not None
        else ""
    )
    comm = (f"; gradient all-reduce ~{m['grad_allreduce_bytes'] / 2**20:,.1f} MiB per rank per step"
            if m.get("grad_allreduce_bytes") else "")  # fmt: skip
    return f"\ndata: {src}{queue}{comm}"


# -- HTML -----------------------------------------------------------------------------------
def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight",
                metadata={"Creator": None, "Date": None, "Format": None, "Type": None})  # fmt: skip
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # inline: no XML prolog


def charts(report: dict, steps: dict[int, dict[str, list[float]]]) -> dict[str, str]:
    """SVG charts: each rank's step timeline (stacked phases per step), the phase breakdown
    per rank, the data cost per source, memory per rank and, with a memory finding, per
    strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["profile"]
    out = {
        "timeline": _timeline(plt, m, steps),
        "phases": _phases(plt, m),
        "sources": _source_costs(plt, m),
        "memory_peaks": _memory_peaks(plt, m),
    }
    mem = next((f["why"] for f in report["findings"] if f["kind"] == "memory"), None)
    if mem and mem.get("planner"):
        out["memory"] = _strategies(plt, mem)
    return out


def _timeline(plt, m: dict, steps: dict) -> str:
    ranks = sorted(steps)
    fig, axes = plt.subplots(len(ranks), 1, figsize=(9, 1.8 * len(ranks) + 0.6), squeeze=False,
                             sharex=True)  # fmt: skip
    skip = m["steps_skipped"]
    for ax, r in zip(axes[:, 0], ranks, strict=True):
        cols = {k: v[skip:] for k, v in steps[r].items()}  # the measured steps
        bottom = [0.0] * len(cols["step"])
        for p in PHASE_COLUMNS:
            ys = [v * 1e3 for v in cols[f"{p}_s"]]
            ax.bar(cols["step"], ys, bottom=bottom, color=COLORS[p], label=p, width=0.9)
            bottom = [a + b for a, b in zip(bottom, ys, strict=True)]
        ax.set_ylabel(f"rank {r}\nms")
    axes[0, 0].legend(ncol=4, fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"step timeline per rank (the first {skip} steps left out: start-up)")
    return _svg(fig)


def _phases(plt, m: dict) -> str:
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(m["ranks"]) + 1.2))
    for i, r in enumerate(m["ranks"]):
        left = 0.0
        for p in PHASE_COLUMNS:
            w = r["phases_s"][p] * 1e3
            ax.barh(i, w, left=left, color=COLORS[p], label=p if i == 0 else None)
            left += w
    ax.set_yticks(range(len(m["ranks"])), [f"rank {r['rank']}" for r in m["ranks"]])
    ax.set_xlabel("ms per step (median)")
    ax.legend(ncol=8, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    ax.set_title("phases per rank")
    return _svg(fig)


def _source_costs(plt, m: dict) -> str:
    src = m["sources"]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(src) + 1.2))
    ax.barh([s["name"] for s in src], [s["busy_s_per_step"] * 1e3 for s in src], color="#d62728")
    ax.set_xlabel("loader ms per step")
    ax.set_title("data cost per source")
    return _svg(fig)


def _memory_peaks(plt, m: dict) -> str:
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(m["ranks"]) + 1.4))
    key = "device" if m["ranks"][0]["memory"].get("device_capacity_bytes") else "host"
    peaks = [r["memory"][f"{key}_peak_bytes"] / GIB for r in m["ranks"]]
    ax.barh([f"rank {r['rank']}" for r in m["ranks"]], peaks, color="#1f77b4")
    ax.axvline(m["ranks"][0]["memory"][f"{key}_capacity_bytes"] / GIB, color="black", ls="--",
               label="capacity")  # fmt: skip
    ax.set_xlabel(f"{key} memory peak, GiB" + (" (resident set)" if key == "host" else ""))
    ax.legend()
    ax.set_title("memory per rank")
    return _svg(fig)


def _strategies(plt, mem: dict) -> str:
    rows = mem["planner"]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    ax.barh([r["strategy"] for r in rows], [r["device_bytes"] / GIB for r in rows],
            color=["#2ca02c" if r["fits"] else "#d62728" for r in rows])  # fmt: skip
    ax.axvline(mem["capacity_bytes"] / GIB, color="black", ls="--", label="capacity")
    ax.set_xlabel("device GiB per rank (the memory planner)")
    ax.legend()
    ax.set_title("memory per strategy")
    return _svg(fig)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>slipstream doctor: {title}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 980px; color: #222; }}
h1 {{ font-size: 1.4em; }} table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 7px; text-align: right; }}
.finding {{ border-left: 5px solid #999; padding: 0.3em 0.9em; margin: 0.8em 0; }}
.critical {{ border-color: #d62728; }} .warning {{ border-color: #ff7f0e; }}
code {{ background: #f3f3f3; padding: 1px 4px; }} svg {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>slipstream doctor: {title}</h1>
<p>{summary}</p>
<h2>Findings</h2>
{findings}
{verify}
<h2>Phases</h2>
{table}
{charts}
</body></html>
"""


def write_html(report: dict, path: Path, steps: dict | None = None) -> Path:
    """One file, everything inline. `steps`: per rank, the recorded step columns (read from
    the run's records when not given)."""
    import json

    m = report["profile"]
    if steps is None:
        steps = {}
        for f in sorted((Path(report["run"]) / "profile").glob("rank-*.json")):
            rec = json.loads(f.read_text())
            steps[rec["rank"]] = rec["steps"]
    esc = html.escape
    findings = []
    for f in report["findings"]:
        levers = "".join(f"<li><code>{esc(x)}</code></li>" for x in f["lever"])
        note = f"<p>{esc(f['note'])}</p>" if f["note"] else ""
        findings.append(
            f'<div class="finding {f["severity"]}"><p><b>{esc(f["severity"])}</b>: '
            f"{esc(f['verdict'])}</p><ul>{levers}</ul><p>{esc(gain_line(f['gain']))}</p>"
            f"{note}</div>"
        )
    v = report.get("verify")
    verify = ""
    if v and v.get("checked"):
        verify = (f"<h2>Verified</h2><p><code>{esc(' '.join(v['lever']))}</code>: predicted "
                  f"{v['predicted_fraction']:.0%}, measured {v['measured_fraction']:.0%} of the "
                  f"step ({_ms(v['step_s_before'])} -> {_ms(v['step_s_after'])} ms)</p>")  # fmt: skip
    head = "".join(f"<th>{p}</th>" for p in ("rank", *PHASE_COLUMNS, "step", "score"))
    body = "".join(
        "<tr>"
        + f"<td>{r['rank']}</td>"
        + "".join(f"<td>{_ms(r['phases_s'][p])}</td>" for p in PHASE_COLUMNS)
        + f"<td>{_ms(r['step_s'])}</td><td>{r['relative_score']:.2f}</td></tr>"
        for r in m["ranks"]
    )
    table = f"<table><tr>{head}</tr>{body}</table><p>ms per step, median of the measured steps</p>"
    svgs = "".join(f"<figure>{svg}</figure>" for svg in charts(report, steps).values())
    mfu = f", MFU {m['mfu']:.1%}" if m.get("mfu") else ""
    summary = (f"{m['steps_measured']} steps measured on {m['topology']['world_size']} rank(s); "
               f"{_ms(m['step_s'])} ms a step, {m['tokens_per_s']:,.0f} tokens/s{mfu}. "
               f"{memory_line(m)}. {data_line(m).strip()}.")  # fmt: skip
    path.write_text(PAGE.format(title=esc(report["run"]), summary=esc(summary),
                                findings="".join(findings), verify=verify, table=table,
                                charts=svgs))  # fmt: skip
    return path


# -- compare --------------------------------------------------------------------------------
def print_compare(console: Console, a: dict, b: dict) -> dict:
    """What changed between two runs' reports, phase by phase (medians, rank 0)."""
    ma, mb = a["profile"], b["profile"]
    table = Table(title=f"{a['run']} -> {b['run']} (ms per step, rank 0)")
    for col in ("phase", "A", "B", "B - A", "B / A"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    out = {}
    pa, pb = ma["ranks"][0]["phases_s"], mb["ranks"][0]["phases_s"]
    for p in (*PHASE_COLUMNS, "step"):
        x = ma["step_s"] if p == "step" else pa[p]
        y = mb["step_s"] if p == "step" else pb[p]
        out[p] = {"a_s": x, "b_s": y, "delta_s": y - x}
        ratio = f"{y / x:.2f}" if x > 0 else "-"
        table.add_row(p, _ms(x), _ms(y), f"{(y - x) * 1e3:+.1f}", ratio)
    console.print(table)
    tps = (ma["tokens_per_s"], mb["tokens_per_s"])
    console.print(f"tokens/s {tps[0]:,.0f} -> {tps[1]:,.0f} ({tps[1] / tps[0]:.2f}x)"
                  if tps[0] else "", markup=False)  # fmt: skip
    ka = [f["kind"] for f in a["findings"] if f["severity"] != "info"]
    kb = [f["kind"] for f in b["findings"] if f["severity"] != "info"]
    gone, new = sorted(set(ka) - set(kb)), sorted(set(kb) - set(ka))
    console.print(f"findings gone: {', '.join(gone) or 'none'}; new: {', '.join(new) or 'none'}",
                  markup=False)  # fmt: skip
    return {"phases": out, "tokens_per_s": tps, "gone": gone, "new": new}
