"""The analysis wing: what the book's chapters and the benchmarks need that is not the model.

What lives here: token inspection (``inspect_tokens``), the hybrid-weight simplex search
(``weight_search``), batching statistics (``batching_stats``), distillation reports (``distill_report``),
the long-document studies (``longdoc_eval``: pooling inside 512 positions; ``long_documents``: every mode on
whole articles with positions extended to 8192), the memory of a real training step on long passages
(``step_memory``), the throughput of the M3-small recipe's training step beside the same step in PyTorch
(``train_throughput``; its workers ``train_step_worker`` and ``torch_train_step``), the time and memory of
encoding one document of 512 to 8192 tokens beside FlagEmbedding (``long_cost``), the live-figure widget
(``figure_widget``), the explorers that recompute in the built book's pages (``static_widgets``), the runs
of the reference implementations in their own processes (``reference_runs``, ``torch_reference``;
``subprocess_jobs``: their subprocess calls and cached jobs; ``real_weight_runs`` on M3-small's real
encoder; ``onnx_reference``: the ONNX Runtime export, fp32 and int8), and the paper's numbers the chapters
quote, with their labels (``paper_numbers``; the tables' data in ``paper_tables``).

May import every other wing. Nothing outside ``analysis``, ``benchmarks``, ``notebooks`` (and the tests)
imports it.
"""
