"""The retrieval wing: the paper's scores, the retrieval modes and their weights, search and metrics.

What lives here: ``modes`` (the one vocabulary of retrieval modes, the paper's weights per benchmark,
the one weight validator and score fusion), ``scoring`` (s_dense, s_lex, s_mul of one pair),
``index`` (dense/sparse indexes, ColBERT re-ranking, the one ``top_k``), ``retriever`` (the five-mode
hybrid retriever with the paper's candidate protocol), ``milvus_index`` / ``milvus_retriever`` (the same
protocol on a persistent Milvus collection) and ``metrics`` (trec_eval metrics, MKQA answer recall).

May import: the foundation modules (``bgem3_lib.paths``, ``bgem3_lib.progress``); NumPy, SciPy, faiss,
pytrec_eval, pymilvus. Never MindSpore and never the model: everything here works on encodings (NumPy arrays
and dicts), so the model's ``compute_score`` builds on it and a search service needs nothing else.
"""
