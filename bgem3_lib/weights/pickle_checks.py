"""Checks of an untrusted pickle, before and after :class:`~bgem3_lib.weights.safe_unpickle.RestrictedUnpickler`
builds anything: the one error family of checkpoint loading, an opcode walk that refuses what the C unpickler
would act on before any allow-list check runs (:func:`check_pickle`), and a walk of the result that refuses
cycles and deep nests (:func:`check_tree`).

>>> import io, pickle
>>> data = pickle.dumps({"w": [1, 2]}, protocol=4)
>>> check_pickle(io.BytesIO(data), len(data), "demo")           # a plain pickle passes
>>> check_tree({"w": [1, 2]})
"""
from __future__ import annotations

import pickle
import pickletools
import reprlib

MAX_NESTING = 100          # containers nested deeper than this are refused (torch writes < 20)

_brief = reprlib.Repr()
_brief.maxstring = _brief.maxother = 80
_brief.maxlong = 40


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: truncated, corrupt, unsupported or unsafe (the message names the file)."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint's pickle references a global outside the allow-list (it could run code)."""




class _BoundedReader:
    """File view for :func:`check_pickle`: never reads past ``end`` (length fields cannot force big reads)."""

    def __init__(self, f, end: int):
        self.f, self.end = f, end

    def tell(self) -> int:
        return self.f.tell()

    def read(self, n: int = -1) -> bytes:
        left = max(self.end - self.f.tell(), 0)
        return self.f.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.f.readline(max(self.end - self.f.tell(), 0))


class _Depth:
    """Nesting depth of one value on the simulated pickle stack (shared through the memo)."""

    __slots__ = ("d",)

    def __init__(self, d: int):
        self.d = d


_MARK = object()
_IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}


def check_pickle(f, end: int, source: str) -> None:
    """Walk one pickle's opcodes (from ``f``'s position, not past ``end``) without building anything.

    Refuses what the C unpickler would otherwise act on before any check of ours runs: EXT opcodes
    (UnsafeCheckpointError: the C unpickler takes a copyreg extension code it has seen before from a
    process-wide cache without calling ``find_class``, so the allow-list would be bypassed), length
    fields and frames longer than the bytes that are there (huge allocations), memo indices beyond
    the number of opcodes (a huge memo table), and values nested deeper than MAX_NESTING (the depth
    of each stack value is tracked conservatively; hashing a deeply nested tuple overflows the C
    stack). Errors are ``pickle.UnpicklingError`` or ``ValueError`` from ``pickletools``.
    """
    reader = _BoundedReader(f, end)
    stack: list = []
    memo: dict[int, _Depth] = {}

    def pop(name: str) -> _Depth:
        if not stack or stack[-1] is _MARK:
            raise pickle.UnpicklingError(f"unpickling stack underflow at {name}")
        return stack.pop()

    def to_mark(name: str) -> list[_Depth]:
        items = []
        while stack and stack[-1] is not _MARK:
            items.append(stack.pop())
        if not stack:
            raise pickle.UnpicklingError(f"{name} without a MARK")
        stack.pop()
        return items

    def deeper(items: list[_Depth]) -> int:
        d = 1 + max(x.d for x in items) if items else 0
        if d > MAX_NESTING:
            raise pickle.UnpicklingError(f"the pickle nests values deeper than {MAX_NESTING} levels")
        return d

    for count, (op, arg, _pos) in enumerate(pickletools.genops(reader), start=1):
        name = op.name
        if name == "STOP":
            pop(name)
            return
        if name == "MARK":
            stack.append(_MARK)
        elif name == "POP":
            if stack and stack[-1] is _MARK:
                stack.pop()
            else:
                pop(name)
        elif name == "DUP":
            stack.append(stack[-1] if stack and stack[-1] is not _MARK else pop(name))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            key = len(memo) if name == "MEMOIZE" else arg
            if not isinstance(key, int) or not 0 <= key <= count:
                raise pickle.UnpicklingError(f"memo index {_brief.repr(key)} out of range")
            memo[key] = stack[-1] if stack and stack[-1] is not _MARK else pop(name)
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise pickle.UnpicklingError(f"memo value {_brief.repr(arg)} not found")
            stack.append(memo[arg])
        elif name in ("EXT1", "EXT2", "EXT4"):
            raise UnsafeCheckpointError(
                f"refused copyreg extension code {arg} in {source}: extension codes can resolve globals "
                "without the allow-list check (torch.save never writes them)")
        elif name == "FRAME":
            if arg > end - reader.tell():
                raise pickle.UnpicklingError(f"frame of {arg} bytes runs past the end of the data")
        elif name in _IN_PLACE:            # mutates the container below its arguments
            items = to_mark(name) if "mark" in [s.name for s in op.stack_before] else \
                [pop(name) for _ in op.stack_before[1:]]
            target = pop(name)
            target.d = max(target.d, deeper(items))
            stack.append(target)
        else:
            before = [s.name for s in op.stack_before]
            items = to_mark(name) if "mark" in before else [pop(name) for _ in before]
            if op.stack_after:
                stack.append(_Depth(deeper(items)))
    raise pickle.UnpicklingError("pickle data ended before STOP")  # genops raises first; kept for safety


def _containers(x):
    if isinstance(x, dict):
        return [*x.keys(), *x.values()]
    if isinstance(x, (list, tuple, set, frozenset)):
        return list(x)
    return None


def check_tree(obj) -> None:
    """The unpickled object must be acyclic and at most MAX_NESTING containers deep (callers walk
    it recursively). In-place pickle opcodes on memoized containers can build deeper nests or
    cycles than :func:`check_pickle` sees; this walk is iterative and visits each container once."""
    if _containers(obj) is None:
        return
    height: dict[int, int] = {}                         # id -> height of a finished container
    on_path = {id(obj)}
    path = [[obj, iter(_containers(obj)), 0]]          # container, children left, tallest child
    while path:
        frame = path[-1]
        for child in frame[1]:
            kids = _containers(child)
            if kids is None:
                continue
            if id(child) in on_path:
                raise pickle.UnpicklingError("the pickle holds a reference cycle")
            if id(child) in height:
                frame[2] = max(frame[2], height[id(child)])
                if len(path) + height[id(child)] > MAX_NESTING:
                    break
                continue
            on_path.add(id(child))
            path.append([child, iter(kids), 0])
            break
        else:
            path.pop()
            on_path.discard(id(frame[0]))
            height[id(frame[0])] = frame[2] + 1
            if path:
                path[-1][2] = max(path[-1][2], frame[2] + 1)
        if len(path) > MAX_NESTING or (path and len(path) + path[-1][2] > MAX_NESTING):
            raise pickle.UnpicklingError(f"the pickle nests containers deeper than {MAX_NESTING} levels")
