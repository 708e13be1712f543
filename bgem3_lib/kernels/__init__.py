"""The kernels wing: optional fast backends that the model selects at load time.

What lives here: ``cpu`` (fused float32 inference kernels on packed tokens, C++ in ``cpu_kernels.cc``
compiled on first use; linear products on AMX tiles as bfloat16 triples at float32 accuracy in
``gemm_bf16x3.h`` (the split and tile packing in ``bf16x3_split.h``) where the CPU has AMX-BF16, else on
AVX-512 registers in ``gemm_f32.h`` (weights packed once per call, or once per model by ``packed``
into ``packed_weights.h``'s registry), else the BLAS NumPy ships; attention on AMX the same way with an online
softmax in ``attention_bf16x3.h``, else register-tiled in ``kernels_common.h``) and ``int8`` (the same
sub-layers with int8 linear maps for ``BGEM3(dtype="int8")``: per-channel int8 weights, per-token uint8
activations, an AVX-512 VNNI GEMM in ``int8_kernels.cc``; helpers shared by both sources in
``kernels_common.h``, whose multi-MiB buffers come from ``block_cache.h``'s cache of mapped blocks, reused
from call to call), and ``train`` (one encoder layer's forward *and* backward on packed tokens as
differentiable ops, C++ in ``train_kernels.cc``, which the trainer uses for the layers above its hidden cache).
``maxsim`` (late-interaction ColBERT scores of each query against its own candidates, maxima in AVX-512
registers, C++ in ``maxsim_kernels.cc``; ``retrieval.index.colbert_rerank`` hands its work to it where it runs).
``blas_check`` says whether the BLAS under them runs this CPU's vector width (``python -m bgem3_lib info``).
``cpu.available()`` says whether they can run here; when they cannot (not CPU, no compiler or BLAS,
``BGEM3_CPU_KERNELS=0``, fp16/bf16) the model and the trainer run their plain MindSpore cells, which is
the path Ascend and GPU always take.

May import: ``bgem3_lib.paths``, MindSpore, NumPy. Never another wing: the model calls the kernels,
the kernels know nothing of the model beyond the parameter tensors passed to them.
"""
