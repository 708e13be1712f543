"""bgem3_lib.weights.checkpoint_io: load/save state dicts (.bin/.pt via the safe unpickler, .safetensors, .ckpt).

Files in the BAAI/bge-m3 layout are written by real torch in a subprocess, which also dumps the
expected arrays as ``.npy``; the test process never imports torch.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bgem3_lib.weights.checkpoint_io import check_shapes, load_state_dict, save_state_dict, strip_prefix
from bgem3_lib.weights.safe_unpickle import UnsafeCheckpointError

_SAVE_SCRIPT = r"""
import sys
import numpy as np, torch
from safetensors.torch import save_file
out = sys.argv[1]
g = torch.Generator().manual_seed(3)
def dump(tag, state):
    for k, v in state.items():
        v = v.detach()
        np.save(f"{out}/{tag}__{k}.npy", (v.float() if v.dtype == torch.bfloat16 else v).numpy())
enc = {"roberta.embeddings.word_embeddings.weight": torch.randn(10, 4, generator=g),
       "roberta.encoder.layer.0.attention.self.query.weight": torch.randn(4, 4, generator=g).t(),
       "roberta.pooler.dense.bias": torch.randn(4, generator=g)}
torch.save(enc, f"{out}/pytorch_model.bin"); dump("pytorch_model", enc)
torch.manual_seed(3)
for name, dim in (("colbert_linear", 4), ("sparse_linear", 1)):
    state = torch.nn.Linear(4, dim).half().state_dict()          # fp16, as on the hub
    torch.save(state, f"{out}/{name}.pt"); dump(name, state)
nested = {"model": {"w": torch.arange(6).reshape(2, 3)}, "epoch": 3}
torch.save(nested, f"{out}/nested.pth"); dump("nested", {"model.w": nested["model"]["w"]})
st = {"w": torch.randn(3, 5, generator=g).bfloat16(), "b": torch.randn(5, generator=g)}
save_file(st, f"{out}/bf16.safetensors"); dump("bf16", st)
"""


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub")
    subprocess.run([sys.executable, "-c", _SAVE_SCRIPT, str(out)], check=True, timeout=120)
    return out


def _refs(hub: Path, tag: str) -> dict[str, np.ndarray]:
    return {p.stem.split("__", 1)[1]: np.load(p) for p in sorted(hub.glob(f"{tag}__*.npy"))}


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "colbert_linear.pt", "sparse_linear.pt",
                                      "nested.pth", "bf16.safetensors"])
def test_load_matches_torch(hub_dir, filename):
    state = load_state_dict(hub_dir / filename)
    refs = _refs(hub_dir, filename.split(".")[0])
    assert set(state) == set(refs) and refs
    for k, ref in refs.items():
        assert state[k].dtype == ref.dtype and state[k].shape == ref.shape, k
        np.testing.assert_array_equal(state[k], ref, err_msg=k)


def test_hub_heads_stay_fp16_and_bf16_widens(hub_dir):
    assert load_state_dict(hub_dir / "colbert_linear.pt")["weight"].dtype == np.float16
    assert load_state_dict(hub_dir / "bf16.safetensors")["w"].dtype == np.float32


def test_strip_prefix_makes_prefixed_and_plain_keys_identical(hub_dir):
    prefixed = load_state_dict(hub_dir / "pytorch_model.bin")
    plain = {k[len("roberta."):]: v for k, v in prefixed.items()}
    assert all(not k.startswith("roberta.") for k in plain)
    for got in (strip_prefix(prefixed), strip_prefix(plain)):
        assert list(got) == list(plain)
        assert all(got[k] is plain[k] or np.array_equal(got[k], plain[k]) for k in plain)
    assert list(strip_prefix({"model.bert.x": 1, "y": 2})) == ["x", "y"]


def test_strip_prefix_collision():
    with pytest.raises(ValueError, match="collide.*'roberta.a'"):
        strip_prefix({"a": 1, "roberta.a": 2})


def _sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((3, 4)).astype(np.float32).T,          # non-contiguous input
            "h": rng.standard_normal(5).astype(np.float16),
            "ids": np.arange(-2, 4, dtype=np.int64), "mask": np.array([True, False, True])}


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_save_load_roundtrip(tmp_path, suffix):
    tensors = _sample()
    path = tmp_path / f"model{suffix}"
    save_state_dict(tensors, path)
    save_state_dict(tensors, path)                     # overwriting an existing file works too
    got = load_state_dict(path)
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary files left behind


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    import safetensors.numpy

    path = tmp_path / "model.safetensors"
    save_state_dict({"a": np.ones(3, np.float32)}, path)
    before = path.read_bytes()

    def half_write(tensors, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict({"a": np.zeros(3, np.float32)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="'b'.*list"):
        save_state_dict({"a": np.ones(2), "b": [1, 2]}, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="'o'.*object"):
        save_state_dict({"o": np.array([None])}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="suffix"):
        save_state_dict({"a": np.ones(2)}, tmp_path / "x.npz")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("cut", [5, -8])                # inside the header / inside the data
def test_truncated_safetensors(tmp_path, cut):
    path = tmp_path / "model.safetensors"
    save_state_dict({"a": np.arange(10, dtype=np.float32)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[:cut])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt"):
        load_state_dict(path)


def test_truncated_torch_zip(hub_dir, tmp_path):
    raw = (hub_dir / "pytorch_model.bin").read_bytes()
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"pytorch_model\.bin is truncated or corrupt"):
        load_state_dict(path)


def test_unsafe_bin_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"system in .*pytorch_model\.bin"):
        load_state_dict(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin", "colbert_linear.pt", "m.ckpt"])
def test_missing_file(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
        load_state_dict(tmp_path / name)


def test_unknown_suffix(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checkpoint suffix '.npz'"):
        load_state_dict(tmp_path / "weights.npz")


def test_check_shapes_names_tensor_and_both_shapes():
    state = {"a": np.zeros((2, 3)), "b": np.zeros(4)}
    check_shapes(state, {"a": (2, 3), "b": (4,)})
    with pytest.raises(ValueError) as err:
        check_shapes(state, {"a": (3, 2), "b": (4,), "c": (1,), "d": (2,)})
    msg = str(err.value)
    assert "a: expected (3, 2), found (2, 3)" in msg
    assert "missing keys: c, d" in msg and "b:" not in msg
