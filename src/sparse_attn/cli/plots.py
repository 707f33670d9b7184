"""Pictures for the CLI. matplotlib is optional (the `viz` extra) and imported here only.

We draw on a bare `matplotlib.figure.Figure` (Agg canvas) and never touch pyplot, so nothing
global changes and no display is needed.
"""

from __future__ import annotations

import textwrap

from .._extras import figure

def plot_compare(rows, env: dict, path: str) -> None:
    """Two panels of horizontal bars: time per call and peak memory per row."""
    names = [r.name for r in rows]
    times = [r.time_ms for r in rows]
    peaks = [(r.peak_memory_bytes or 0) / 2**20 for r in rows]
    colors = ["tab:gray" if r.kind == "dense" else "tab:blue" for r in rows]
    fig = figure(figsize=(11, 0.45 * len(rows) + 1.8), layout="constrained")
    ax_t, ax_m = fig.subplots(1, 2, sharey=True)
    y = list(range(len(rows)))
    ax_t.barh(y, times, color=colors)
    ax_t.set_yticks(y, names)
    ax_t.invert_yaxis()
    ax_t.set_xlabel("time per call (ms, median)")
    ax_m.barh(y, peaks, color=colors)
    ax_m.set_xlabel("peak memory of one call (MiB)")
    for ax, values, fmt in ((ax_t, times, "{:.1f}"), (ax_m, peaks, "{:.1f}")):
        for yi, val in zip(y, values):
            ax.annotate(fmt.format(val), (val, yi), xytext=(3, 0), textcoords="offset points", va="center",
                        fontsize=8)
        ax.margins(x=0.15)
        ax.grid(axis="x", alpha=0.3)
    q, kv = env["q_shape"], env["kv_shape"]
    fig.suptitle(f"N={q[2]}, B={q[0]}, Hq={q[1]}, Hkv={kv[1]}, D={q[3]}, {env['dtype']} on {env['device']} "
                 f"({env['device_name']}), torch {env['torch']}", fontsize=10)
    fig.savefig(path, dpi=120)


def plot_mask(mask, title: str, path: str, q_offset: int = 0) -> None:
    """The element mask [q_len, kv_len] as an image (black: allowed)."""
    q_len, kv_len = mask.shape
    side = 7.0
    aspect = q_len / max(kv_len, 1)
    fig = figure(figsize=(side, max(2.5, side * aspect) + 0.8), layout="constrained")
    ax = fig.subplots()
    ax.imshow(mask.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
              extent=(-0.5, kv_len - 0.5, q_offset + q_len - 0.5, q_offset - 0.5))
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=9)
    fig.savefig(path, dpi=120)
