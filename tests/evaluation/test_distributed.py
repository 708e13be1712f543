"""Shard selection: --shard i/n and the environment msrun sets."""
from __future__ import annotations

import pytest

from bgem3_lib.evaluation.distributed import is_msrun_scheduler, parse_shard, resolve_shard, shard_from_env


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1) and parse_shard(" 3 / 8 ") == (3, 8)
    for bad in ("2/2", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(ValueError, match="shard|i/n"):
            parse_shard(bad)


def test_msrun_environment():
    # what msrun exports to worker 5 of --worker_num=8 on one node (MindSpore 2.7 process_entity/_api.py)
    worker = {"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "8", "RANK_SIZE": "8", "RANK_ID": "5",
              "MS_NODE_ID": "5", "DEVICE_ID": "5"}
    assert shard_from_env(worker) == (5, 8)
    assert shard_from_env({"MS_WORKER_NUM": "4", "MS_NODE_ID": "2"}) == (2, 4)
    assert shard_from_env({}) == (0, 1) and shard_from_env({"RANK_SIZE": "1", "RANK_ID": "0"}) == (0, 1)
    assert is_msrun_scheduler({"MS_ROLE": "MS_SCHED"}) and not is_msrun_scheduler(worker)
    with pytest.raises(ValueError, match="--node_rank"):
        shard_from_env({"MS_ROLE": "MS_WORKER", "RANK_SIZE": "16"})
    with pytest.raises(ValueError, match="not an integer"):
        shard_from_env({"RANK_SIZE": "eight"})


def test_explicit_shard_wins_over_environment():
    env = {"RANK_SIZE": "8", "RANK_ID": "5"}
    assert resolve_shard("1/2", env) == (1, 2) and resolve_shard((0, 3), env) == (0, 3)
    assert resolve_shard(None, env) == (5, 8)
