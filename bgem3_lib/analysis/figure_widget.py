"""A matplotlib figure as an ``ipywidgets.Image``: live plots without ``ipywidgets.Output``.

Notebook controls (sliders, toggle buttons) redraw a figure. The usual way, drawing inside an
``Output`` widget, makes the executing client (nbclient, which Jupyter Book uses) echo every
captured output back to the kernel as comm messages on the shell channel, and in this project's
builds that traffic intermittently left nbclient waiting forever on an idle kernel. An ``Image``
widget holds the PNG bytes itself: redrawing sets one trait, nothing is captured, and the static
page embeds the last image with the widget state.

>>> import matplotlib; matplotlib.use("Agg")
>>> import matplotlib.pyplot as plt
>>> fig, ax = plt.subplots(figsize=(2, 1)); _ = ax.plot([0, 1])
>>> png_bytes(fig)[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
True
"""
from __future__ import annotations

import io
from typing import Callable

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_bytes(fig, dpi: int = 100) -> bytes:
    """The figure rendered to PNG (tight bounding box), then closed so it is not shown a second time."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def figure_image(draw: Callable[[], object], dpi: int = 100):
    """An ``ipywidgets.Image`` showing ``draw()``'s figure, and a ``refresh()`` that redraws it.

    ``draw`` takes no argument and returns a matplotlib figure (read the controls inside it).
    Call ``refresh`` from the controls' ``observe`` callbacks::

        image, refresh = figure_image(lambda: plot_for(slider.value))
        slider.observe(lambda _: refresh(), "value")
        display(widgets.VBox([slider, image]))
    """
    import ipywidgets as widgets

    image = widgets.Image(format="png")

    def refresh() -> None:
        fig = draw()
        if fig is None:
            raise ValueError("draw() must return a matplotlib figure, got None")
        image.value = png_bytes(fig, dpi)

    refresh()
    return image, refresh
