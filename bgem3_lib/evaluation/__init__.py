"""The evaluation wing: benchmarks and offline evaluation sets, the runner, and the corpus-encoding cache.

What lives here: ``benchmark_data`` (MIRACL, MKQA, BEIR-NQ readers for corpora a user supplies),
``offline_sets`` (TyDi and XQuAD sets built from ``../shared/data``), ``subsets`` (seeded sub-corpora),
``runner`` (``run_eval``: encode, search in each mode, score, write ``results.csv``),
``corpus_cache`` / ``encoding_store`` / ``resumable`` (encodings on disk, keyed by the model fingerprint,
committed in chunks so a killed run resumes), ``distributed`` (corpus shards over ``msrun`` workers),
``search_backend`` (search in memory or through a Milvus index) and ``significance`` (paired bootstrap
confidence intervals over queries).

May import: ``model``, ``retrieval``, ``weights`` and the foundation modules; never ``training`` or
``analysis``.
"""
