"""The one place that picks MindSpore's device and execution mode.

``set_device("CPU" | "GPU" | "Ascend", device_id=0)``; ``BGEM3_DEVICE`` overrides the default.
"""
from __future__ import annotations

import os

import mindspore as ms

DEVICES = ("CPU", "GPU", "Ascend")


def set_device(device: str | None = None, device_id: int | None = None) -> str:
    device = device or os.environ.get("BGEM3_DEVICE", "CPU")
    canonical = {d.lower(): d for d in DEVICES}.get(str(device).lower())
    if canonical is None:
        raise ValueError(f"unknown device {device!r}; choose one of {DEVICES}")
    ms.set_device(canonical, device_id) if device_id is not None else ms.set_device(canonical)
    return canonical
