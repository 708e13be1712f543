"""The kernels wing: optional fast backends that the model selects at load time.

What lives here: ``cpu`` (fused float32 inference kernels on packed tokens, C++ in ``cpu_kernels.cc``
compiled on first use, calling the BLAS NumPy ships). ``cpu.available()`` says whether they can run
here; when they cannot (not CPU, no compiler or BLAS, ``BGEM3_CPU_KERNELS=0``, training, fp16/bf16)
the model runs its plain MindSpore cells, which is the path Ascend and GPU always take.

May import: ``bgem3_lib.paths``, MindSpore, NumPy. Never another wing: the model calls the kernels,
the kernels know nothing of the model beyond the parameter tensors passed to them.
"""
