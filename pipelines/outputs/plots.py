"""The PNG plots of a dataset card (matplotlib, Agg backend): one small function per figure, one shared style.

Every function takes plain numbers (already streamed from Parquet or read from stats.json), writes one PNG
and returns its file name, or None when there is nothing to draw.
"""

from __future__ import annotations

import os

import numpy as np

KEPT = "#2f6f9f"
REJECTED = "#d9823b"
OTHER = "#7a9a5a"
DPI = 120


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 12, "axes.titleweight": "bold",
                         "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
                         "grid.alpha": 0.3, "grid.linestyle": "-", "axes.axisbelow": True})
    return plt


def _save(fig, out_dir: str, name: str) -> str:
    plt = _plt()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return name


def _thousands(ax, axis: str = "x"):
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:,.0f}")
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(fmt)


def funnel(out_dir: str, stages: list[dict], name: str = "funnel.png", title: str = "Filtering funnel") -> str | None:
    """Horizontal bars, first stage on top: rows passed on (kept) and rows rejected per stage."""
    if not stages:
        return None
    plt = _plt()
    labels = [s["stage"] for s in stages]
    kept = np.array([s["out"] for s in stages], dtype=float)
    rej = np.array([s["rejected"] for s in stages], dtype=float)
    fig, ax = plt.subplots(figsize=(8, max(2.6, 0.55 * len(stages) + 1.6)))
    y = np.arange(len(stages))[::-1]
    ax.barh(y, kept, color=KEPT, label="passed on", height=0.6)
    ax.barh(y, rej, left=kept, color=REJECTED, label="rejected", height=0.6)
    top = max(float((kept + rej).max()), 1.0)
    for yi, k, r, s in zip(y, kept, rej, stages):
        text = f"{int(k):,} kept" + (f" · {int(r):,} rejected ({100 * r / (k + r):.1f}%)" if r else "")
        ax.text(k + r + top * 0.01, yi, text, va="center", fontsize=9)
    ax.set_yticks(y, labels)
    ax.set_xlim(0, top * 1.45)
    ax.grid(axis="y", visible=False)
    _thousands(ax)
    ax.set_xlabel("rows into the stage")
    ax.set_title(title, loc="left")
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)
    return _save(fig, out_dir, name)


def reasons(out_dir: str, counts: dict[str, int], name: str = "reject_reasons.png", top: int = 15) -> str | None:
    """Rejected rows per reason (largest first, at most `top`, the rest summed as 'other')."""
    if not counts:
        return None
    plt = _plt()
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    if len(items) > top:
        items = items[: top - 1] + [(f"{len(items) - top + 1} other reasons", sum(n for _, n in items[top - 1:]))]
    fig, ax = plt.subplots(figsize=(8, max(2.6, 0.42 * len(items) + 1.4)))
    y = np.arange(len(items))[::-1]
    values = [n for _, n in items]
    ax.barh(y, values, color=REJECTED, height=0.6)
    for yi, v in zip(y, values):
        ax.text(v + max(values) * 0.01, yi, f"{v:,}", va="center", fontsize=9)
    ax.set_yticks(y, [r for r, _ in items])
    ax.set_xlim(0, max(values) * 1.15)
    ax.grid(axis="y", visible=False)
    _thousands(ax)
    bracketed = any(r.endswith(")") for r, _ in items)
    ax.set_xlabel("rejects (rows; sub-items such as images for the stages in brackets)" if bracketed else "rejected rows")
    ax.set_title("Rejects by reason")
    return _save(fig, out_dir, name)


def histogram(out_dir: str, name: str, values, title: str, xlabel: str, bins=30, log_x: bool = False,
              integer: bool = False, color: str = KEPT, threshold: float | None = None,
              threshold_label: str = "") -> str | None:
    """Histogram with the median marked; `integer` centres one bar per value when the range is small."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    lo, hi = float(values.min()), float(values.max())
    if integer and hi - lo <= 60:
        edges = np.arange(lo - 0.5, hi + 1.5, 1.0)
    elif log_x and lo > 0 and hi / lo > 20:
        edges = np.geomspace(lo, hi * 1.0001, bins + 1)
        _log_axis(ax, "x", hi / lo)
    elif hi == lo:
        edges = np.array([lo - 0.5, lo + 0.5])
    else:
        edges = bins
    ax.hist(values, bins=edges, color=color, edgecolor="white", linewidth=0.5)
    med = float(np.median(values))
    ax.axvline(med, color="black", lw=1, ls="--", label=f"median {_num(med)}")
    if threshold is not None:
        ax.axvline(threshold, color=REJECTED, lw=1.5, label=threshold_label or f"threshold {_num(threshold)}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.set_title(f"{title}  (n={values.size:,})")
    ax.legend(frameon=False)
    from matplotlib.ticker import MaxNLocator

    if integer:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, out_dir, name)


def binned(out_dir: str, name: str, edges: list[float], series: dict[str, list[int]], title: str, xlabel: str,
           threshold: float | None = None, threshold_label: str = "", mode: str = "stack") -> str | None:
    """Pre-binned counts (from stats.json counters). mode 'stack': series add up (web + synthetic captions);
    'overlay': later series are subsets of the first (kept within scored) and are drawn over it."""
    series = {k: v for k, v in series.items() if sum(v)}
    if not series or len(edges) < 2:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    edges = np.asarray(edges, dtype=float)
    width = np.diff(edges)
    colors = [KEPT, REJECTED, OTHER, "#8c6bb1"] if mode == "stack" else ["#b8cfe0", KEPT, OTHER, "#8c6bb1"]
    bottom = np.zeros(len(width))
    for i, (label, counts) in enumerate(series.items()):
        counts = np.asarray(counts, dtype=float)
        ax.bar(edges[:-1], counts, width=width, align="edge", bottom=bottom if mode == "stack" else None,
               color=colors[i % 4], edgecolor="white", linewidth=0.5, label=f"{label} ({int(counts.sum()):,})")
        if mode == "stack":
            bottom = bottom + counts
    if threshold is not None:
        ax.axvline(threshold, color="black", lw=1.2, ls="--", label=threshold_label or f"threshold {_num(threshold)}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend(frameon=False)
    return _save(fig, out_dir, name)


def bars(out_dir: str, name: str, counts: dict[str, int], title: str, xlabel: str = "rows", top: int = 15,
         color: str = KEPT) -> str | None:
    """Category counts as horizontal bars with share labels (largest first)."""
    if not counts:
        return None
    plt = _plt()
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    if len(items) > top:
        items = items[: top - 1] + [("other", sum(n for _, n in items[top - 1:]))]
    total = sum(counts.values())
    fig, ax = plt.subplots(figsize=(7, max(2.6, 0.42 * len(items) + 1.4)))
    y = np.arange(len(items))[::-1]
    values = [n for _, n in items]
    ax.barh(y, values, color=color, height=0.6)
    for yi, v in zip(y, values):
        ax.text(v + max(values) * 0.01, yi, f"{v:,} ({100 * v / total:.1f}%)", va="center", fontsize=9)
    ax.set_yticks(y, [str(k) for k, _ in items])
    ax.set_xlim(0, max(values) * 1.3)
    ax.grid(axis="y", visible=False)
    _thousands(ax)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _save(fig, out_dir, name)


def image_sizes(out_dir: str, widths, heights, name: str = "image_sizes.png", max_points: int = 20000) -> str | None:
    """Width against height (log axes) with the aspect-ratio 1 and 2 lines, and the shorter side's histogram."""
    w = np.asarray(widths, dtype=float)
    h = np.asarray(heights, dtype=float)
    ok = (w > 0) & (h > 0)
    w, h = w[ok], h[ok]
    if w.size == 0:
        return None
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    sizes, counts = np.unique(np.stack([w, h], axis=1), axis=0, return_counts=True)
    if sizes.shape[0] > max_points:  # many distinct sizes: a density plot
        a.hexbin(w, h, xscale="log", yscale="log", gridsize=40, bins="log", cmap="Blues", mincnt=1)
    else:  # marker area grows with the number of images of that exact size
        area = 12 + 240 * np.sqrt(counts / counts.max())
        a.scatter(sizes[:, 0], sizes[:, 1], s=area, alpha=0.55, color=KEPT, edgecolors="white", linewidths=0.5)
        top = int(np.argmax(counts))
        a.annotate(f"{int(sizes[top, 0])}x{int(sizes[top, 1])}: {int(counts[top]):,}", (sizes[top, 0], sizes[top, 1]),
                   xytext=(8, 8), textcoords="offset points", fontsize=9)
    lo, hi = min(w.min(), h.min()) * 0.8, max(w.max(), h.max()) * 1.25
    _log_axis(a, "x", hi / lo)
    _log_axis(a, "y", hi / lo)
    a.set_xlim(lo, hi)
    a.set_ylim(lo, hi)
    line = np.array([lo, hi])
    a.plot(line, line, color="gray", lw=0.8, ls=":", label="square")
    a.plot(line, line / 2, color=REJECTED, lw=0.8, ls="--", label="aspect 2:1")
    a.plot(line, line * 2, color=REJECTED, lw=0.8, ls="--")
    a.set_xlabel("width (px)")
    a.set_ylabel("height (px)")
    a.set_title(f"Image sizes (n={w.size:,})")
    a.legend(frameon=False, loc="upper left")
    short = np.minimum(w, h)
    b.hist(short, bins=30, color=KEPT, edgecolor="white", linewidth=0.5)
    med = float(np.median(short))
    b.axvline(med, color="black", lw=1, ls="--", label=f"median {med:,.0f} px")
    b.set_xlabel("shorter side (px)")
    b.set_ylabel("images")
    b.set_title("Shorter side")
    b.legend(frameon=False)
    return _save(fig, out_dir, name)


def _log_axis(ax, axis: str, span: float = 100.0):
    """Log scale with plain tick labels (100, 200, 500, 1,000) instead of powers of ten; denser ticks when the
    axis spans less than two decades (`span` = max / min)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if span >= 100 else (1.0, 2.0, 3.0, 5.0, 7.0)))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    target.set_minor_formatter(NullFormatter())


def _num(v: float) -> str:
    if abs(v) >= 100 or float(v).is_integer():
        return f"{v:,.0f}"
    return f"{v:.3g}"
