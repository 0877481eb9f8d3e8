"""The one bit-exact diff of nested values: NaN equals the same NaN, -0.0 is not 0.0, for python
floats, numpy arrays and tensors; and its three users (compare, verify, check_dataset) say so too."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from axs_lib import compare, verify
from axs_lib.bitdiff import first_difference, same_value

NAN = float("nan")


@pytest.mark.parametrize("make", [float, lambda x: torch.tensor([1.0, x]), lambda x: np.array([1.0, x], dtype=np.float32)],
                         ids=["python float", "tensor", "numpy array"])
def test_a_nan_equals_the_same_nan_and_negative_zero_differs_from_zero(make):
    assert same_value(make(NAN), make(NAN))
    assert first_difference({"w": [make(NAN)]}, {"w": [make(NAN)]}) is None
    assert not same_value(make(-0.0), make(0.0))
    found = first_difference({"w": [make(-0.0)]}, {"w": [make(0.0)]})
    assert found is not None and found.subscript == "['w'][0]" and found.dotted == "w[0]"


def test_the_first_difference_names_the_field_by_bits():
    nan = np.array([np.nan], dtype=np.float32)
    other_nan = nan.view(np.uint32) ^ np.uint32(1)  # another NaN payload: other bits
    assert first_difference({"a": [1, nan]}, {"a": [1, nan.copy()]}) is None
    assert first_difference({"a": [1, nan]}, {"a": [1, other_nan.view(np.float32)]}).subscript == "['a'][1]"
    bf16 = first_difference(torch.zeros(2, 2, dtype=torch.bfloat16), torch.eye(2, dtype=torch.bfloat16))
    assert bf16.detail.startswith("2 of 4 elements differ, first at (0, 0)") and (bf16.count, bf16.total) == (2, 4)
    shape = first_difference((torch.zeros(2), "x"), (torch.zeros(3), "x"))
    assert (shape.subscript, shape.detail) == ("[0]", "shape (2,) vs (3,)")
    assert first_difference({"a": 1}, {"b": 1}).detail.startswith("keys differ")
    assert first_difference([1], (1,)).detail == "type list vs tuple"
    assert first_difference({"m": {0: {"x": 1}}}, {"m": {0: {"x": 2}}}).dotted == "m.0.x"  # as iter_leaves names it


def test_verify_sees_nan_as_equal_and_negative_zero_as_a_difference():
    for make in (float, lambda x: torch.tensor([x, 1.0])):
        assert verify.first_difference({"m": {"w": make(NAN)}}, {"m": {"w": make(NAN)}}) is None
        found = verify.first_difference({"m": {"w": make(-0.0)}}, {"m": {"w": make(0.0)}})
        assert found is not None and found.startswith("m.w: ")
    assert verify.first_difference({"w": torch.tensor([-0.0, 1.0])}, {"w": torch.tensor([0.0, 1.0])}) == \
        "w: 1 of 2 elements differ, max abs diff 0.000e+00"


def test_compare_sees_nan_as_equal_and_negative_zero_as_a_difference():
    assert compare.same_value(NAN, NAN)
    assert not compare.same_value(-0.0, 0.0)
    assert compare.same_value(np.float32("nan"), np.float32("nan"))  # a numpy scalar by its bits too


def test_importing_the_diff_loads_neither_torch_nor_numpy():
    code = "import sys, axs_lib.bitdiff; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
