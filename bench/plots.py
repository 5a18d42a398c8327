"""Quality against compute: perplexity / dense against the active fraction of the FFN, one panel per text.

Shared by the benchmarks that draw a frontier (`bench_router.py --plot`, untrained; `bench_quality.py --plot`,
untrained and trained). matplotlib is the `plot` extra (`pip install factorllm-ds[plot]`)."""

from __future__ import annotations

import re
from pathlib import Path

Series = dict[str, list[tuple[float, float]]]  # label -> [(active fraction, perplexity / dense)]


def plot_fractions(panels: list[tuple[str, Series]], title: str, path: Path) -> None:
    """One panel per (y label, series), side by side: a line per series, a dotted line at dense, log y. A label
    ending in a training budget (", untrained", ", 49,152 tokens") takes its model's colour, dotted when untrained;
    without one, static pruning is dashed and the oracle and the per-token limit dotted. Written to a temporary
    name, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.6), squeeze=False)
    colours: dict[str, str] = {}
    for ax, (ylabel, series) in zip(axes[0], panels):
        for label, points in series.items():
            points = sorted(set(points))
            model, budget = re.fullmatch(r"(.*?)(?:, (untrained|[\d,]+ tokens))?", label).groups()
            colour = colours.setdefault(model, f"C{len(colours) % 10}")
            if budget:
                style = ":" if budget == "untrained" else "-"
            else:
                style = "--" if "static" in label else ":" if "limit" in label or "oracle" in label else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", linestyle=style, color=colour,
                    markerfacecolor="none" if budget == "untrained" else colour, label=label)
        ax.axhline(1.0, color="gray", linestyle=":", label="dense")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel("active fraction of the FFN neurons per token")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
