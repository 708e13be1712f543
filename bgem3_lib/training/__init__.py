"""The training wing: unified fine-tuning with self-knowledge distillation.

What lives here: ``losses`` (InfoNCE per mode, the integrated score, ``self_distill_loss``), ``fused_loss`` (the
unified loss as one host op with its backward written out, for CPU training),
``bucketing`` (length-bucketed batches and length chunks), ``data`` (MLQA training examples),
``train_model`` (the trainable network on the model's heads), ``batch_scores`` (its heads and scores on
the batch's packed tokens), ``optim`` (AdamW and the schedule),
``hidden_cache`` (cached states of frozen lower layers), ``trainer`` (the training loop),
``recipe`` (the M3-small recipe) and ``mlqa_validation`` (held-out MLQA metrics).

May import: ``model``, ``kernels``, ``retrieval``, ``weights`` and the foundation modules; never ``evaluation`` or
``analysis``.
"""
