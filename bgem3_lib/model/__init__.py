"""The model wing: the M3 model on MindSpore, from a model name to vectors.

What lives here: ``config`` (``M3Config``), ``tokenization`` (the XLM-R tokenizer and text checks),
``encoder`` (XLM-RoBERTa / BERT as thin ``nn.Cell``s), ``heads`` (``dense_embedding``,
``sparse_embedding``, ``colbert_embedding`` and the projection cell), ``mcls`` (multiple-CLS pooling
for long texts), ``loading`` (a model name or directory resolved into config, weights and tokenizer),
``runtime`` (device selection), ``fingerprint`` (the one identity of a loaded model's weights),
``bgem3`` (the ``BGEM3`` facade: encode and ``compute_score``) and ``flag_model`` (``BGEM3FlagModel``,
FlagEmbedding's interface on ``BGEM3``).

May import: ``weights``, ``kernels``, ``retrieval`` and the foundation modules. ``BGEM3`` owns the
defaults (model max length, ``$BGEM3_DEVICE``) and passes resolved values to everything below it.
"""
