"""Progress bars that obey ``TQDM_DISABLE`` even where the caller asked for a bar.

tqdm reads ``TQDM_DISABLE`` only as the *default* of ``disable``; the library passes ``disable=``
explicitly (a bar only for long loops), which would override it. The book build sets
``TQDM_DISABLE=1`` so that no progress bar lands in an executed page; this wrapper makes that hold.

With ``TQDM_DISABLE=1`` in the environment, ``tqdm(range(3), disable=False).disable`` is ``True``.
"""
from __future__ import annotations

import os

from tqdm.auto import tqdm as _tqdm


def bars_disabled() -> bool:
    """True when the environment variable ``TQDM_DISABLE`` is set to a true value (``1``, ``true``, ``yes``)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in {"1", "true", "yes", "on"}


def tqdm(*args, **kwargs):
    """``tqdm.auto.tqdm`` with ``disable=True`` forced when :func:`bars_disabled`."""
    if bars_disabled():
        kwargs["disable"] = True
    return _tqdm(*args, **kwargs)
