import pytest

from bgem3_lib.runtime import canonical_device, resolve_device_id


def test_canonical_device_names():
    assert canonical_device("ascend") == "Ascend"
    assert canonical_device("gpu") == "GPU"
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        canonical_device("tpu")


def test_device_id_from_msrun_env():
    assert resolve_device_id("Ascend", None, {"DEVICE_ID": "5"}) == 5
    assert resolve_device_id("GPU", 2, {"DEVICE_ID": "5"}) == 2        # explicit wins
    assert resolve_device_id("CPU", None, {"DEVICE_ID": "5"}) is None
    assert resolve_device_id("Ascend", None, {}) is None
    with pytest.raises(ValueError, match="DEVICE_ID must be"):
        resolve_device_id("Ascend", None, {"DEVICE_ID": "x"})
