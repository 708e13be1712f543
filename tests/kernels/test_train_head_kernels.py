"""The training heads' CPU kernels (``kernels.train.project_normalize_train``, ``maxsim_train``) against the
MindSpore cells they replace (``training.batch_scores.ProjectNormalize``, ``MaxSim``): outputs and gradients,
with rows where ``||z|| < eps``, ``input_grad`` off, a passage longer than one 512-row product, one-token
passages, and a bad span rejected."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from bgem3_lib.kernels import train as tk
from bgem3_lib.model.heads import _EPS
from bgem3_lib.training.batch_scores import MaxSim, ProjectNormalize

pytestmark = pytest.mark.skipif(not tk.available(), reason="fused CPU training kernels not available here")


def _rel(ours, ref) -> float:
    ours, ref = ours.asnumpy(), ref.asnumpy()
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.mark.parametrize("input_grad", [True, False])
def test_project_normalize_kernel_matches_the_cell(input_grad):
    rng = np.random.default_rng(0)
    t, h, d = 300, 40, 24                                    # 300 rows: several 128-row column-sum blocks
    x = rng.standard_normal((t, h)).astype(np.float32)
    x[7] *= 1e-14                # with a zero bias: 0 < ||z|| < eps, y = z / eps, no projection in the backward
    x[8] = 0.0                   # and z = 0
    w = Tensor((0.1 * rng.standard_normal((d, h))).astype(np.float32))
    b = np.zeros(d, np.float32)
    b[: d // 2] = 0.1 * rng.standard_normal(d // 2)
    x, b = Tensor(x), Tensor(b)
    b_zero_row = Tensor(np.zeros(d, np.float32))
    g = Tensor(rng.standard_normal((t, d)).astype(np.float32))
    cell = ProjectNormalize(input_grad=input_grad)
    for bias in (b, b_zero_row):
        ref, ours = cell(x, w, bias), tk.project_normalize_train(x, w, bias, _EPS, input_grad)
        assert ours[0].shape == (t, d) and ours[1].shape == (t, 1)
        assert _rel(ours[0], ref[0]) < 1e-6 and _rel(ours[1], ref[1]) < 1e-6
        grads = [ms.grad(lambda *a, f=f: (f(*a)[0] * g).sum(), (0, 1, 2))(x, w, bias)
                 for f in (cell, lambda *a: tk.project_normalize_train(*a, _EPS, input_grad))]
        for name, r, o in zip(("x", "weight", "bias"), *grads):
            if name == "x" and not input_grad:
                assert not o.asnumpy().any()
            else:
                assert _rel(o, r) < 1e-5, name
    assert not tk.project_normalize_train(x, w, b_zero_row, _EPS)[0].asnumpy()[8].any()


def _spans_and_slots(lengths, queries):
    first = np.r_[0, np.cumsum(lengths)[:-1]]
    spans = np.array([[first[j] + 1, lengths[j] - 1] for j in range(queries, len(lengths))], np.int32)
    slots = np.repeat(spans[:, :1], spans[:, 1].max(), 1)
    for j, (start, count) in enumerate(spans):
        slots[j, :count] = np.arange(start, start + count)
    return int(sum(lengths[:queries])), Tensor(spans), Tensor(slots)


def test_maxsim_kernel_matches_the_cell():
    rng = np.random.default_rng(1)
    lengths = [6, 3, 1 + 700, 2, 1 + 9, 1 + 130]               # 2 queries; passages of 700 (> 512), 1, 9, 130
    tq, spans, slots = _spans_and_slots(lengths, 2)
    p = Tensor(rng.standard_normal((sum(lengths), 16)).astype(np.float32))
    weights = Tensor(rng.standard_normal((tq, 4)).astype(np.float32))
    cell = MaxSim()
    ref, ours = cell(p[:tq], p, slots)[0], tk.maxsim_train(p[:tq], p, spans)
    assert ours.shape == (tq, 4) and _rel(ours, ref) < 1e-6
    g_ref = ms.grad(lambda a: (cell(a[:tq], a, slots)[0] * weights).sum())(p)
    g_ours = ms.grad(lambda a: (tk.maxsim_train(a[:tq], a, spans) * weights).sum())(p)
    assert _rel(g_ours, g_ref) < 1e-5


def test_maxsim_kernel_rejects_a_span_outside_the_rows():
    p = Tensor(np.ones((5, 4), np.float32))
    with pytest.raises(RuntimeError, match="m3t_maxsim_fwd"):
        tk.maxsim_train(p[:2], p, Tensor(np.array([[3, 3]], np.int32))).asnumpy()
