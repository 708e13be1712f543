"""Which slice of a corpus this process encodes: ``(rank, world_size)`` from ``--shard i/n`` or the launcher.

Corpus encoding is embarrassingly parallel, so scale-out needs no collective communication: every
process encodes its own batches and writes them to the shared encoding cache, and rank 0 merges
the parts (see :mod:`bgem3_lib.evaluation.corpus_cache`). The shard is taken, in this order of precedence, from

1. an explicit ``--shard i/n`` (``parse_shard("1/4") == (1, 4)``);
2. MindSpore's ``msrun`` launcher. In MindSpore 2.7 (``mindspore/parallel/cluster/process_entity/_api.py``)
   ``msrun`` exports to every worker ``MS_ROLE=MS_WORKER``, ``MS_WORKER_NUM`` and ``RANK_SIZE``
   (= ``--worker_num``), ``DEVICE_ID`` (= the local rank on its node) and - when all workers run on one
   node or ``--node_rank`` is given - ``RANK_ID`` / ``MS_NODE_ID`` (= the global rank). It also runs the
   same command once more as the *scheduler* (``MS_ROLE=MS_SCHED``, ``RANK_ID=0``); that process must
   not do rank 0's work, so :func:`shard_from_env` reports it and the CLI exits at once;
3. a rank-table launch that only sets ``RANK_ID`` and ``RANK_SIZE``;
4. otherwise a single process, ``(0, 1)``.

>>> parse_shard("0/2")
(0, 2)
>>> shard_from_env({"MS_ROLE": "MS_WORKER", "RANK_ID": "3", "RANK_SIZE": "8"})
(3, 8)
>>> shard_from_env({})
(0, 1)
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

SCHEDULER = "MS_SCHED"


def check_shard(shard) -> tuple[int, int]:
    """Validate a ``(rank, world_size)`` pair: ``0 <= rank < world_size``."""
    if (not isinstance(shard, (tuple, list)) or len(shard) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in shard)):
        raise ValueError(f"shard must be a (rank, world_size) pair of ints, got {shard!r}")
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard {rank}/{world}: need world size >= 1 and 0 <= rank < world size")
    return int(rank), int(world)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``; ValueError naming the expected form otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if m is None:
        raise ValueError(f"--shard must look like 'i/n' (e.g. 0/4), got {text!r}")
    return check_shard((int(m.group(1)), int(m.group(2))))


def is_msrun_scheduler(env: Mapping[str, str] | None = None) -> bool:
    """True in the extra scheduler process ``msrun`` starts; it has no encoding work."""
    env = os.environ if env is None else env
    return env.get("MS_ROLE") == SCHEDULER


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            if not str(value).lstrip("-").isdigit():
                raise ValueError(f"environment variable {name}={value!r} is not an integer")
            return int(value)
    return None


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` set by ``msrun`` or a rank table; ``(0, 1)`` when not launched so."""
    env = os.environ if env is None else env
    world = _int(env, "RANK_SIZE", "MS_WORKER_NUM")
    if world is None or world <= 1:
        return 0, 1
    rank = _int(env, "RANK_ID", "MS_NODE_ID")
    if rank is None:
        raise ValueError(f"launched with {world} workers but this process has no RANK_ID: with msrun on "
                         "several nodes pass --node_rank to each node's msrun (or use --shard i/n)")
    return check_shard((rank, world))


def resolve_shard(shard: str | tuple[int, int] | None, env: Mapping[str, str] | None = None
                  ) -> tuple[int, int]:
    """An explicit ``shard`` ("i/n" or a pair) if given, else :func:`shard_from_env`."""
    if shard is None:
        return shard_from_env(env)
    if isinstance(shard, str):
        return parse_shard(shard)
    return check_shard(tuple(shard))
