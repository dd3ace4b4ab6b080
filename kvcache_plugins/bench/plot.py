"""The benchmark's picture: score vs bandwidth, one panel per task and length, one line per method.

A *method* (a series) is a spec without its retention: ``q2c:0.25``, ``q2c:0.5`` and ``q2c:0.75`` are three points of
the line ``q2c``; ``q2c:0.25:global@construction`` belongs to ``q2c:global@construction``. Specs without a retention
(``full``, the quantization presets) are their own series. Every point carries its 95% interval as an error bar. The
full cache is a horizontal reference line with its interval as a band; quantization presets are squares, selections
applied after the prefill circles on solid lines, ``@construction`` selections triangles on dashed lines in the
colour of their post-hoc counterpart. One legend for the figure, no text on the axes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..specs import CacheSpec

_RETENTION = re.compile(r":(\d*\.?\d+)(?=$|[:+@])")
CONSTRUCTION = "@construction"
DODGE = 8.0  # points of bandwidth between the leftmost and rightmost series at one x


def series_name(spec: CacheSpec) -> str:
    """The line ``spec`` belongs to: its text without the retention (``'q2c:0.5+int8'`` -> ``'q2c+int8'``)."""
    if spec.retention is None:
        return spec.text
    return _RETENTION.sub("", spec.text, count=1)


def _style_key(series: str) -> str:
    """Series that share a colour: a selection and its ``@construction`` variant."""
    return series.removesuffix(CONSTRUCTION).replace(":global", "").replace(":layer", "")


def save_figure(draw: Callable[[], Any], path: Path, **savefig: Any) -> bool:
    """Write the figure ``draw()`` returns to ``path`` (at 120 dpi, matplotlib's Agg backend, no window); False,
    and nothing drawn, if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = draw()
    fig.savefig(path, dpi=120, **savefig)
    plt.close(fig)
    return True


def plot(rows: list[Any], path: Path) -> bool:
    """Write the picture of ``rows`` (bench ``Row`` objects) to ``path``; False if matplotlib is missing."""
    return save_figure(lambda: figure(rows), path, bbox_inches="tight")


def figure(rows: list[Any]) -> Any:
    """The matplotlib figure of ``rows``: a panel per (task, tokens), a line per series, one legend below."""
    import matplotlib.pyplot as plt
    panels = list(dict.fromkeys((r.task, r.tokens) for r in rows))
    series = list(dict.fromkeys(r.series or r.cache for r in rows))
    styles = list(dict.fromkeys(_style_key(s) for s in series if s != "full"))
    palette = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    colour = {k: palette[i % len(palette)] for i, k in enumerate(styles)}
    # one wide panel per row: the selectors crowd at the same few bandwidths and need the width to be told apart
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 4.2 * len(panels)), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, (task, tokens) in zip(axes.flat, panels):
        pts = [r for r in rows if (r.task, r.tokens) == (task, tokens)]
        names = list(dict.fromkeys(r.series or r.cache for r in pts if (r.series or r.cache) != "full"))
        # dodge: selections at the same share kept (every selector at 25%) get their own x, up to DODGE points of
        # bandwidth apart, so that their error bars stay visible; presets stay at their true bandwidth
        dodged = [s for s in names if any(r.retention is not None for r in pts if (r.series or r.cache) == s)]
        offset = dict.fromkeys(names, 0.0)
        offset.update({s: (i - (len(dodged) - 1) / 2) * DODGE / max(1, len(dodged) - 1) for i, s in enumerate(dodged)})
        for r in pts:
            if (r.series or r.cache) == "full":
                low, high = r.score_ci95 or (r.score, r.score)
                ax.axhspan(low, high, color="0.9", zorder=0)
                handles["full"] = ax.axhline(r.score, color="0.3", ls=":", lw=1.2, zorder=1,
                                             label="full (band: its 95% interval)")
        for name in names:
            line = sorted((r for r in pts if (r.series or r.cache) == name), key=lambda r: r.bandwidth)
            construction = name.endswith(CONSTRUCTION)
            selection = any(r.retention is not None for r in line)
            marker = "^" if construction else ("o" if selection else "s")
            x = [r.bandwidth * 100 + offset[name] for r in line]
            y = [r.score for r in line]
            err = [[r.score - (r.score_ci95 or [r.score])[0] for r in line],
                   [(r.score_ci95 or [0, r.score])[1] - r.score for r in line]]
            handles[name] = ax.errorbar(
                x, y, yerr=err, color=colour[_style_key(name)], marker=marker, ms=5, capsize=2, lw=1.3, elinewidth=1,
                ls="--" if construction else ("-" if selection else "none"), label=name,
            )
        n = pts[0].prompts if pts else 0
        ax.set_title(f"{task}, {tokens} tokens ({n} prompts)" if tokens else f"{task} ({n} prompts)")
        ax.set_xlabel(f"% bandwidth (bytes held / full cache in the model dtype); selections dodged by up to "
                      f"±{DODGE / 2:g}")
        ax.set_ylabel("score (error bars: 95% interval)")
        ax.set_xlim(0, 108)
        ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    # below the panels (bbox_inches="tight" keeps it in the file): never on top of a point or an axis label
    fig.legend(handles.values(), handles.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=8,
               frameon=False, title_fontsize=8,
               title="circles: selection after the prefill; triangles, dashed: @construction (during the prefill); "
                     "squares: quantization presets")
    return fig
