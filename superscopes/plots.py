"""Small seaborn helpers the recipes share: a figure grid, a heatmap, lines and bars per layer.

Every helper draws on an axes (``ax=None`` makes a one-panel figure) and returns it, so a
recipe composes panels with ``figure(n)`` and writes them with ``save`` (PNG and PDF, cropped
to what was drawn). Legends read in words (``words``: ``affine_lens`` -> "affine lens"), and
``lines`` shades each curve's interval where the table has one. The Agg backend is selected
on import: nothing here needs a display.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")


def figure(panels: int = 1, cols: int | None = None, size: tuple[float, float] = (5.5, 4.0)):
    """A figure with ``panels`` axes in a grid (``cols`` per row); returns (fig, flat list of axes)."""
    cols = cols or panels
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.set_visible(False)
    return fig, flat[:panels]


def _axes(ax):
    if ax is None:
        _, (ax,) = figure(1)
    return ax


def _label(ax, title: str | None, xlabel: str | None, ylabel: str | None) -> None:
    if title:
        width = max(30, int(ax.get_position().width * ax.figure.get_figwidth() * 11))
        ax.set_title(textwrap.fill(title, width), fontsize=10)
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)


# Legend entries the recipes' tables hold as identifiers, in words.
LEGEND_WORDS = {
    "patchscope": "Patchscope",
    "logit_lens": "logit lens",
    "affine_lens": "affine lens",
    "generator": "trained generator",
    "nearest": "nearest corpus inputs",
    "random": "random inputs",
}


def words(value):
    """A legend entry in words: ``LEGEND_WORDS``, else underscores as spaces (non-text unchanged)."""
    if not isinstance(value, str):
        return value
    return LEGEND_WORDS.get(value, value.replace("_", " "))


def _in_words(frame: pd.DataFrame, *columns: str | None) -> pd.DataFrame:
    return frame.assign(**{c: frame[c].map(words) for c in columns if c is not None})


def heatmap(
    table: pd.DataFrame,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    ax=None,
    label: str | None = None,
    fmt: str = ".2f",
    annot: bool = True,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
):
    """A wide table (index = rows, columns = x) as an annotated heatmap; ``label`` names the colour bar."""
    ax = _axes(ax)
    sns.heatmap(
        table,
        ax=ax,
        annot=annot,
        fmt=fmt,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        annot_kws={"fontsize": 7},
        cbar_kws={"label": label} if label else None,
    )
    _label(ax, title, xlabel, ylabel)
    return ax


def lines(
    frame: pd.DataFrame,
    x: str,
    y: str,
    hue: str | None = None,
    style: str | None = None,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    ax=None,
    errorbar=None,
    ylim: tuple[float, float] | None = None,
    legend_out: bool = False,
    band: tuple[str, str] | None = ("ci_low", "ci_high"),
):
    """One line per ``hue`` (and ``style``) of ``y`` against ``x`` (e.g. a score per layer), with markers;
    ``legend_out`` puts the legend right of the axes. ``band``: the columns of each point's
    interval, shaded in its line's colour when the table has them (default: the 95% intervals
    of ``metrics.prompt_means``)."""
    ax = _axes(ax)
    frame = _in_words(frame, hue, style)
    levels = list(dict.fromkeys(frame[hue])) if hue else [None]
    palette = dict(zip(levels, sns.color_palette(n_colors=len(levels))))
    sns.lineplot(
        data=frame,
        x=x,
        y=y,
        hue=hue,
        style=style,
        markers=True,
        dashes=style is not None,
        errorbar=errorbar,
        ax=ax,
        palette=palette if hue else None,
    )
    if band is not None and set(band) <= set(frame.columns):
        for level, part in frame.groupby(hue, sort=False) if hue else [(None, frame)]:
            part = part.sort_values(x)
            ax.fill_between(part[x], part[band[0]], part[band[1]], color=palette[level], alpha=0.15, lw=0)
    if ylim:
        ax.set_ylim(*ylim)
    _label(ax, title, xlabel if xlabel is not None else x, ylabel if ylabel is not None else y)
    if hue or style:
        if legend_out:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        else:
            ax.legend(fontsize=8)
    return ax


def bars(
    frame: pd.DataFrame,
    x: str,
    y: str,
    hue: str | None = None,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    ax=None,
    annotate: bool = False,
):
    """Grouped bars of ``y`` per ``x`` (e.g. successes per layer), one colour per ``hue``."""
    ax = _axes(ax)
    sns.barplot(data=_in_words(frame, hue), x=x, y=y, hue=hue, errorbar=None, ax=ax)
    if annotate:
        for container in ax.containers:
            ax.bar_label(container, fmt="%g", fontsize=7)
    _label(ax, title, xlabel if xlabel is not None else x, ylabel if ylabel is not None else y)
    if hue:
        ax.legend(fontsize=8)
    return ax


def save(fig_or_ax, path: str | Path, title: str | None = None) -> Path:
    """Write the figure as PNG and, beside it, PDF (vector), both cropped to everything drawn
    (no label or outside legend cut off); ``title``: an overall title above the panels.
    Closes the figure and returns the PNG's path."""
    fig = fig_or_ax.figure if hasattr(fig_or_ax, "figure") and not isinstance(fig_or_ax, plt.Figure) else fig_or_ax
    if title:
        width = max(40, int(fig.get_figwidth() * 13))
        fig.suptitle(textwrap.fill(title, width), fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    return path
