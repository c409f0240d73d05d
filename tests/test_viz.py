"""Tests for latentlens.viz: grids of any lens, side by side, rendered to PNG."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from latentlens import InterpretResult, interpret
from latentlens.viz import cell_label, compare_lenses, lens_grid, plot_result
from tests.tiny import SENTENCES, tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def result() -> InterpretResult:
    model, tok = tiny_causal_lm("gpt2"), tiny_tokenizer()
    return interpret(model, tok, SENTENCES[5], layers=[0, 1, 2, 3], lenses=["logit", "embedding"])


def _images(fig: Figure) -> list:
    return [im for ax in fig.axes for im in ax.get_images()]


def test_lens_grid_holds_the_top1_scores_and_words(result) -> None:
    fig = lens_grid(result, "embedding")
    assert isinstance(fig, Figure)
    (image,) = _images(fig)
    data = np.asarray(image.get_array())
    assert data.shape == (4, len(result.positions))  # layers x tokens
    np.testing.assert_allclose(data, result.top_scores("embedding").numpy(), rtol=1e-6)
    grid_ax = image.axes
    words = [t.get_text() for t in grid_ax.texts]
    assert len(words) == 4 * len(result.positions)
    assert words[: len(result.positions)] == [
        cell_label(w) for w in result.top_tokens("embedding")[0]
    ]
    assert [t.get_text() for t in grid_ax.get_yticklabels()] == ["0", "1", "2", "3"]
    assert grid_ax.get_title() == "embedding lens"
    with pytest.raises(KeyError):
        lens_grid(result, "latent")


def test_compare_lenses_and_png(result, tmp_path) -> None:
    fig = compare_lenses(result)
    assert [im.axes.get_title() for im in _images(fig)] == ["logit lens", "embedding lens"]
    path = tmp_path / "cmp.png"
    fig.savefig(path)
    png = np.asarray(Image.open(path).convert("RGB"))
    h, w, _ = png.shape
    assert w > 800 and h > 200 and w > h  # two grids side by side
    assert png.std() > 20  # not blank
    assert len(np.unique(png.reshape(-1, 3), axis=0)) > 50  # colours and text were drawn


def test_plot_from_result_and_from_json(result, tmp_path) -> None:
    fig = plot_result(result, tmp_path / "one.png", lens="logit")
    assert len(_images(fig)) == 1 and (tmp_path / "one.png").stat().st_size > 5000
    again = InterpretResult.from_dict(result.to_dict())
    fig2 = plot_result(again, tmp_path / "both.png")
    assert len(_images(fig2)) == 2
    png = np.asarray(Image.open(tmp_path / "both.png").convert("L"))
    assert png.min() < 50 and png.max() > 200


def test_cell_label() -> None:
    assert cell_label(" the") == "the"
    assert cell_label("\n") == "\\n"
    assert cell_label("   ") == "'   '"
    assert cell_label("") == "∅"
    assert cell_label("extraordinarily", max_chars=6) == "extra…"
