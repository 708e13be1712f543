"""The evaluation wing: benchmarks and offline evaluation sets, the runner, and the corpus-encoding cache.

What lives here: ``benchmark_data`` (MIRACL, MKQA, BEIR-NQ readers for corpora a user supplies),
``offline_sets`` (TyDi and XQuAD sets built from ``../shared/data``), ``subsets`` (seeded sub-corpora),
``runner`` (``run_eval``: encode, search in each mode, score, write ``results.csv``),
``corpus_cache`` / ``encoding_store`` (encodings on disk, keyed by the model fingerprint) and
``distributed`` (corpus shards over ``msrun`` workers).

May import: ``model``, ``retrieval``, ``weights`` and the foundation modules; never ``training`` or
``analysis``.
"""
