import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from bgem3_lib.analysis.figure_widget import PNG_MAGIC, figure_image, png_bytes  # noqa: E402


def _fig(n):
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot(range(n))
    return fig


def test_png_bytes_closes_the_figure():
    fig = _fig(3)
    data = png_bytes(fig)
    assert data.startswith(PNG_MAGIC)
    assert not plt.fignum_exists(fig.number)


def test_refresh_replaces_the_image():
    state = {"n": 2}
    image, refresh = figure_image(lambda: _fig(state["n"]))
    first = bytes(image.value)
    assert first.startswith(PNG_MAGIC)
    state["n"] = 7
    refresh()
    assert bytes(image.value).startswith(PNG_MAGIC) and bytes(image.value) != first


def test_draw_must_return_a_figure():
    with pytest.raises(ValueError, match="must return a matplotlib figure"):
        figure_image(lambda: None)
