"""File-backed weight arrays: a checkpoint's tensors mapped from disk instead of read into memory.

A tensor stored as plain bytes in a file (an uncompressed ``torch.save`` zip member, a safetensors data
block) can be an ``np.memmap`` of those bytes. Its pages enter the process only when something reads
them, and :func:`release` hands read pages back (they are re-read from the page cache on the next
access). So a loader can check every tensor for NaN and still end with only the weights the model
actually uses resident: the 250k-row word-embedding table of XLM-R (1 GB at BGE-M3's size) keeps just the
rows of the tokens that were encoded.

Arrays are mapped copy-on-write (``mode="c"``): writable in this process, the file never changes. A page
written in place is private from then on and must not be released (:func:`release` would drop the
write); the loaders release only right after their own read-only checks, before anyone can write. Writers of
checkpoints replace files atomically (a new file moved into place), so a process still mapping the old file
keeps reading the old bytes; rewriting a mapped file in place would change them under the reader.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "w.bin")
>>> np.arange(6, dtype="<f4").tofile(path)
>>> a = map_array(path, 8, np.float32, (2, 2))      # bytes 8..23: elements 2..5
>>> a.tolist(), is_mapped(a), is_mapped(np.zeros(2))
([[2.0, 3.0], [4.0, 5.0]], True, False)
>>> release(a); a.sum().item()                      # pages dropped, contents unchanged
14.0
"""
from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PAGE = mmap.PAGESIZE


def map_array(path: str | Path, offset: int, dtype, shape: Sequence[int]) -> np.memmap:
    """``prod(shape)`` elements of ``dtype`` at byte ``offset`` of ``path`` -> a copy-on-write memmap.

    Raises ValueError when the file is too short to hold them (a truncated checkpoint)."""
    dtype, shape = np.dtype(dtype), tuple(int(n) for n in shape)
    need = offset + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    size = os.path.getsize(path)
    if offset < 0 or need > size:
        raise ValueError(f"{path}: a tensor at bytes {offset}..{need} lies beyond the end of the file "
                         f"({size} bytes): the file is truncated")
    return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)


def _mapping(arr: np.ndarray):
    """(the mmap object under ``arr``, the byte position of ``arr``'s data in it), or None."""
    base = arr
    while base is not None and not isinstance(getattr(base, "_mmap", None), mmap.mmap):
        base = getattr(base, "base", None)
    if base is None or base._mmap.closed:
        return None
    start = np.frombuffer(base._mmap, dtype=np.uint8).ctypes.data
    return base._mmap, arr.ctypes.data - start


def is_mapped(arr: np.ndarray) -> bool:
    """True when ``arr``'s memory is a file mapping (:func:`map_array` or a view of one)."""
    return _mapping(np.asarray(arr) if not isinstance(arr, np.memmap) else arr) is not None


def release(arr: np.ndarray) -> None:
    """Drop the resident pages wholly inside a mapped, never-written ``arr`` (no-op for other arrays)."""
    found = _mapping(arr)
    if found is None or arr.nbytes == 0:
        return
    mm, pos = found
    first = -(-pos // PAGE) * PAGE                   # whole pages only: neighbours may still be in use
    last = (pos + arr.nbytes) // PAGE * PAGE
    if last > first:
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)
