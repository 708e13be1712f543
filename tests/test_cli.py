"""``python -m bgem3_lib``: argument parsing, encode / eval commands, train delegation, msrun scheduler."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_m3 import tiny_model_dir

from bgem3_lib.cli import build_parser, main, read_texts
from bgem3_lib.evaluation.runner import COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def test_eval_arguments_parse():
    a = build_parser().parse_args(["eval", "--task", "tydi", "--model", "m3-small-base", "--modes", "dense,all",
                                   "--langs", "ar,de", "--out", "o", "--shard", "1/4", "--weights", "1,0.3,1",
                                   "--limit-queries", "5", "--max-length", "128", "--batch-size", "8"])
    assert (a.task, a.modes, a.langs, a.shard, a.weights) == ("tydi", ["dense", "all"], ["ar", "de"], (1, 4),
                                                              (1.0, 0.3, 1.0))
    assert (a.limit_queries, a.max_length, a.batch_size, a.device) == (5, 128, 8, None)   # None: $BGEM3_DEVICE


@pytest.mark.parametrize("extra", [["--task", "msmarco"], ["--shard", "4/4"], ["--weights", "1,2"],
                                   ["--weights", "a,b,c"], ["--batch-size", "0"], ["--weights", "nan,0.3,1"],
                                   ["--weights", "-1,0.3,1"], ["--weights", "0,0,0"], ["--modes", "dense,hybrid"]])
def test_bad_arguments_exit_with_usage(extra, capsys):
    args = ["eval", "--task", "tydi", "--model", "m", "--out", "o"] + extra
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


def test_library_errors_are_reported_not_raised(tmp_path, capsys):
    code = main(["eval", "--task", "tydi", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert code == 2 and "neither a model directory nor a known name" in capsys.readouterr().err


def test_train_command_runs_the_recipe_with_the_options_given(monkeypatch, tmp_path, capsys):
    from bgem3_lib.training import recipe
    calls = {}

    def fake_run(r, out, base):
        calls.update(steps=r.steps, sd=r.use_self_distill, out=out, base=base)
        return {"out": str(out), "seconds": 0, "examples": 0, "final_losses_mean_last20": {},
                "heldout_before": {}, "heldout_after": {}}
    monkeypatch.setattr(recipe, "run_m3_small", fake_run)
    assert main(["train", "--steps", "7", "--no-self-distill", "--out", str(tmp_path)]) == 0
    assert calls == {"steps": 7, "sd": False, "out": tmp_path, "base": "m3-small-base"}
    assert '"out"' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--steps", "0"])


def test_msrun_scheduler_process_exits_without_work(monkeypatch, capsys):
    monkeypatch.setenv("MS_ROLE", "MS_SCHED")
    assert main(["eval", "--task", "tydi", "--model", "does-not-matter", "--out", "x"]) == 0
    assert "scheduler" in capsys.readouterr().out


def test_read_texts_names_bad_lines(tmp_path):
    (tmp_path / "t.txt").write_text("one\n\nthree\n")
    with pytest.raises(ValueError, match="t.txt:2: empty text"):
        read_texts(tmp_path / "t.txt")
    (tmp_path / "t.jsonl").write_text('{"title": "T", "text": "body"}\n{"x": 1}\n')
    with pytest.raises(ValueError, match="t.jsonl:2: expected a JSON object with a 'text'"):
        read_texts(tmp_path / "t.jsonl")
    with pytest.raises(FileNotFoundError, match="input file not found"):
        read_texts(tmp_path / "missing.txt")


def test_encode_command_writes_npz(tmp_path):
    texts = "Hallo Welt\nBonjour le monde, ça va ?\n東京は日本の首都です\n"
    (tmp_path / "texts.txt").write_text(texts, encoding="utf-8")
    assert main(["encode", "--model", str(tiny_model_dir()), "--input", str(tmp_path / "texts.txt"),
                 "--out", str(tmp_path / "e.npz"), "--sparse", "--colbert", "--max-length", "32"]) == 0
    with np.load(tmp_path / "e.npz") as z:
        assert z["dense"].shape == (3, 32) and z["sparse_indptr"].shape == (4,)
        assert z["colbert_offsets"].shape == (4,) and z["colbert"].shape == (z["colbert_offsets"][-1], 32)
        np.testing.assert_allclose(np.linalg.norm(z["dense"], axis=1), 1.0, rtol=1e-5)


def test_input_lines_split_on_newline_only(tmp_path):
    """Form feed, group separators and U+2028 inside a line stay in it: 4 lines give 4 texts (not 7)."""
    f = tmp_path / "t.txt"
    f.write_bytes(b"first line\nsecond\x0cpage two\nthird \xe2\x80\xa8 sep\r\nfourth\x1dgroup\n")
    assert read_texts(f) == ["first line", "second\x0cpage two", "third \u2028 sep", "fourth\x1dgroup"]
    j = tmp_path / "t.jsonl"
    j.write_text('{"text": "a \u2028 b"}\n{"title": "T", "text": "c"}\n', encoding="utf-8")   # raw U+2028, valid JSON
    assert read_texts(j) == ["a \u2028 b", "T c"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\nfine\nbro\xffken\n")
    with pytest.raises(ValueError, match=r"bad.txt:3: invalid UTF-8 at byte offset 11"):
        read_texts(bad)


def test_encode_npz_records_lines_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    from bgem3_lib.evaluation import encoding_store
    src = tmp_path / "t.txt"
    src.write_bytes(b"first line\nsecond\x0cpage two\nthird \xe2\x80\xa8 sep\nfourth\x1dgroup\n")
    out = tmp_path / "e.npz"
    args = ["encode", "--model", str(tiny_model_dir()), "--input", str(src), "--out", str(out), "--max-length", "32"]
    assert main(args) == 0
    with np.load(out) as z:
        assert z["dense"].shape[0] == 4 and z["line_numbers"].tolist() == [1, 2, 3, 4]
    before = out.read_bytes()

    def disk_full(file, **arrays):                  # writes half a zip, then the disk is full
        if isinstance(file, (str, Path)):
            Path(file).write_bytes(b"PK\x03\x04 half")
        else:
            file.write(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(encoding_store.np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        encoding_store.encodings_to_npz({"dense_vecs": np.ones((1, 2), np.float32)}, out)
    assert out.read_bytes() == before and not list(tmp_path.glob(".e.npz.*.tmp"))  # intact, no temp file left


@pytest.mark.parametrize(("extra", "message"), [
    (["--langs", "sw,xx"], "unknown tydi language"),
    (["--out", "FILE"], "--out .*is an existing file"),
    (["--out", "FILE/sub"], "--out .*is not writable"),
    (["--cache", "FILE/cache"], "--cache .*is not writable"),
])
def test_eval_fails_fast_before_the_model_loads(tmp_path, capsys, extra, message):
    """A model path that does not exist would fail too: the checks above must come first."""
    (tmp_path / "FILE").write_text("x")
    args = ["eval", "--task", "tydi", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out")]
    args += [a.replace("FILE", str(tmp_path / "FILE")) for a in extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "neither a model directory" not in err, err


def test_encode_fails_fast_on_a_bad_out(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello\n")
    (tmp_path / "FILE").write_text("x")
    for out, message in ((tmp_path, "is a folder"), (tmp_path / "FILE" / "e.npz", "is an existing file, not a folder"),
                         (tmp_path / "FILE" / "sub" / "e.npz", "not writable")):
        assert main(["encode", "--model", str(tmp_path / "no-model"), "--input", str(tmp_path / "t.txt"),
                     "--out", str(out)]) == 2
        assert message in capsys.readouterr().err


def test_python_m_eval_in_a_subprocess(tmp_path):
    out = tmp_path / "res"
    env = {"PYTHONPATH": str(ROOT), "GLOG_v": "3", "BGEM3_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    if "BGEM3_DATA" in os.environ:                      # the data folder may live elsewhere than ../shared/data
        env["BGEM3_DATA"] = os.environ["BGEM3_DATA"]
    run = subprocess.run([sys.executable, "-m", "bgem3_lib", "eval", "--task", "xquad-longdoc", "--model",
                          str(tiny_model_dir()), "--modes", "dense,sparse,colbert,dense+sparse,all", "--langs", "en",
                          "--out", str(out), "--limit-queries", "2", "--max-length", "32", "--batch-size", "16"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    df = pd.read_csv(out / "results.csv")
    assert list(df.columns) == COLUMNS and len(df) == 5 * 4 and set(df["lang"]) == {"en"}
    assert "MLDR-style stand-in" in run.stdout and (tmp_path / "home" / "encodings").is_dir()


def _env(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "GLOG_v": "3", "BGEM3_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "1"}
    if "BGEM3_DATA" in os.environ:
        env["BGEM3_DATA"] = os.environ["BGEM3_DATA"]
    return env


def _encode_cmd(src, out, *extra):
    return [sys.executable, "-m", "bgem3_lib", "encode", "--model", str(tiny_model_dir()), "--input", str(src),
            "--out", str(out), "--max-length", "24", "--batch-size", "25", "--chunk-texts", "100", "--sparse",
            "--colbert", *extra]


def test_a_killed_encode_resumes_and_equals_an_uninterrupted_run(tmp_path):
    import signal
    import time
    words = ["alpha", "beta", "gamma", "delta", "Straße", "東京", "мир", "λόγος"]
    lines = [" ".join(words[(i * k) % 8] for k in range(1, 3 + i % 9)) + f" {i}" for i in range(3000)]
    src = tmp_path / "t.txt"
    src.write_text("\n".join(lines) + "\n")
    out, work = tmp_path / "e.npz", tmp_path / "e.npz.partial"
    p = subprocess.Popen(_encode_cmd(src, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(tmp_path), cwd=ROOT)
    deadline = time.monotonic() + 300
    while not (work / "chunk-00002").is_dir() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -9, "the encode finished before it could be killed"
    committed = len(list(work.glob("chunk-*")))
    assert 3 <= committed < 30 and not out.exists()                  # 30 chunks of 100 texts in all
    from bgem3_lib.paths import temp_tag
    half = tmp_path / f".e.npz.{temp_tag().rsplit('-', 1)[0]}-{p.pid}.x1y2.tmp"   # as if killed writing e.npz
    half.write_bytes(b"PK\x03\x04 half")
    rerun = subprocess.run(_encode_cmd(src, out), capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not half.exists()                                         # the dead writer's temporary is removed
    assert f"resumed at {100 * committed}" in rerun.stderr          # the progress bar starts where it stopped
    assert not work.exists()                                         # the work folder goes once .npz is stored
    clean = tmp_path / "clean.npz"
    run = subprocess.run(_encode_cmd(src, clean), capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    with np.load(out) as a, np.load(clean) as b:
        assert sorted(a.files) == sorted(b.files) and a["dense"].shape[0] == 3000
        for name in a.files:
            assert np.array_equal(a[name], b[name]), name            # 0.0 max difference, every array


def _hold_lock(path):
    code = (f"import time; from bgem3_lib.paths import file_lock\n"
            f"with file_lock({str(path)!r}, 'x'):\n    print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_to_the_same_out_fails_at_once(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello\n")
    out = tmp_path / "e.npz"
    holder = _hold_lock(tmp_path / ".e.npz.lock")                   # an encode writing e.npz right now
    try:
        assert main(["encode", "--model", str(tmp_path / "no-model"), "--input", str(tmp_path / "t.txt"),
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is in use by another process" in err and f":{holder.pid}" in err, err
    finally:
        holder.kill()
        holder.wait()
    holder = _hold_lock(tmp_path / "res" / ".eval.lock")             # an eval writing res/ right now
    try:
        assert main(["eval", "--task", "tydi", "--model", str(tmp_path / "no-model"), "--out",
                     str(tmp_path / "res")]) == 2
        err = capsys.readouterr().err
        assert "is in use by another process" in err and "neither a model directory" not in err, err
    finally:
        holder.kill()
        holder.wait()
