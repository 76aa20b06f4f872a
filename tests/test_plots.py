"""Recipe figures: PNG and PDF, nothing clipped, legends in words, intervals shaded."""

from __future__ import annotations

import matplotlib.colors
import pandas as pd
import pytest
from PIL import Image

from superscopes import plots


def summary() -> pd.DataFrame:
    """A ``metrics.prompt_means`` table: a mean and its 95% interval per method and layer."""
    rows = []
    for i, method in enumerate(["patchscope", "logit_lens", "affine_lens"]):
        for layer in range(4):
            value = 0.2 * i + 0.1 * layer
            rows.append(
                {
                    "method": method,
                    "layer": layer,
                    "precision_at_1": value,
                    "ci_low": value - 0.05,
                    "ci_high": value + 0.05,
                    "n": 20,
                    "surprisal": 3.0 - layer,
                }
            )
    return pd.DataFrame(rows)


def test_save_writes_png_and_pdf_with_nothing_cut_off(tmp_path):
    """A note beside the axes (as a recipe writes a sample size) is kept: the image is
    cropped to everything drawn, not to the figure's size."""
    ax = plots.lines(summary(), "layer", "precision_at_1", hue="method", legend_out=True, title="a title")
    ax.annotate(
        "n = 20 prompts, 95% intervals over prompts", xy=(1.45, 0.5), xycoords="axes fraction", annotation_clip=False
    )
    width, _ = ax.figure.get_size_inches() * 120
    path = plots.save(ax, tmp_path / "figure.png")
    assert path.exists() and path.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    assert Image.open(path).size[0] > width  # widened to the note right of the legend


def test_legends_read_in_words_and_intervals_are_shaded_in_each_lines_colour():
    ax = plots.lines(summary(), "layer", "precision_at_1", hue="method")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Patchscope", "logit lens", "affine lens"]
    lines = {line.get_label(): line.get_color() for line in ax.get_lines() if not line.get_label().startswith("_")}
    bands = [c for c in ax.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")]
    assert len(bands) == 3
    band_colours = [matplotlib.colors.to_hex(b.get_facecolor()[0][:3]) for b in bands]
    assert band_colours == [matplotlib.colors.to_hex(c) for c in lines.values()]
    no_band = plots.lines(summary(), "layer", "surprisal", hue="method", band=None)
    assert not [c for c in no_band.collections if "Poly" in type(c).__name__]


def test_bars_legend_in_words():
    frame = pd.DataFrame({"task": ["a", "a"], "accuracy": [0.1, 0.2], "method": ["affine_lens", "some_method"]})
    ax = plots.bars(frame, "task", "accuracy", hue="method")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["affine lens", "some method"]


@pytest.mark.parametrize("recipe", ["token_identity", "inverse_scope"])
def test_recipe_figures_write_png_and_pdf(recipe, tmp_path):
    import importlib

    module = importlib.import_module(f"recipes.{recipe}")
    table = summary()
    if recipe == "inverse_scope":
        table = table.rename(columns={"method": "sampler", "precision_at_1": "consistency"})
        table["sampler"] = table["sampler"].map(
            {"patchscope": "generator", "logit_lens": "nearest", "affine_lens": "random"}
        )
        table["hypothesis"] = module.HYPOTHESES[0]
    path = module.plot(table, tmp_path / f"{recipe}.png", "title")
    assert path.exists() and path.with_suffix(".pdf").exists()
