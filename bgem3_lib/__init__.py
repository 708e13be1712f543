"""bgem3_lib: BGE-M3 (M3-Embedding, arXiv 2402.03216) on MindSpore.

``from bgem3_lib import BGEM3`` (or ``BGEM3FlagModel``, FlagEmbedding's interface) — heavy modules
(MindSpore) load lazily, so the pure-NumPy
parts (file readers, metrics, data loaders) import without MindSpore.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["BGEM3", "BGEM3FlagModel", "M3Config", "__version__"]


def __getattr__(name):
    if name == "BGEM3":
        from .model.bgem3 import BGEM3
        return BGEM3
    if name == "BGEM3FlagModel":
        from .model.flag_model import BGEM3FlagModel
        return BGEM3FlagModel
    if name == "M3Config":
        from .model.config import M3Config
        return M3Config
    raise AttributeError(f"module 'bgem3_lib' has no attribute {name!r}")
