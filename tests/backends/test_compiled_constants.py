"""The compiled modules' enums and limits against the Python tables (docs/design.md §3: no code copied by hand
between the languages).  Each module exports what csrc/include/zsnr defines (bindings.cpp ``export_constants``) and
the names of the step record's fields it reads; the Python side derives its codes from its own tables
(``coefficients.SAMPLER_KINDS``, ``parameterization.PREDICTIONS``, ``_validate.RESCALE_SPACES``) in
:mod:`zsnr_kernels.backends.call`, and the coefficient table's columns in :mod:`zsnr_kernels.backends.table`."""

from __future__ import annotations

import importlib.util

import pytest

from zsnr_kernels import coefficients as co
from zsnr_kernels.backends import call, cuda as _cuda, ext as _ext, table


def _modules():
    mods = []
    if _ext.available():
        mods.append(pytest.param(_ext.C, id="_C"))
    m = _cuda.module()
    mods.append(pytest.param(m, id="_C_cuda", marks=pytest.mark.skipif(m is None, reason="_C_cuda is not built")))
    return mods


@pytest.fixture(params=_modules())
def module(request):
    if request.param is None:
        pytest.skip("not built")
    return request.param


def test_step_record_fields(module):
    assert tuple(module.STEP_CALL_FIELDS) == call.StepCall._fields
    assert call.STEP_FIELDS == call.StepCall._fields[11:11 + len(call.STEP_FIELDS)]  # describe()'s, in place


def test_enums(module):
    assert dict(module.SAMPLER_KINDS) == call.SAMPLER_CODES == {k: i for i, k in enumerate(co.SAMPLER_KINDS)}
    assert dict(module.PREDICTIONS) == call.PREDICTION_CODES
    assert dict(module.RESCALE_SPACES) == call.SPACE_CODES
    assert dict(module.DTYPES) == {str(dtype).removeprefix("torch."): code for dtype, code in call.DTYPE_CODES.items()}
    errors = dict(module.STEP_ERRORS)
    assert (errors["needs_noise"], errors["needs_history"], errors["mixed_stages"], errors["bad_args"]) == (
        call.ERR_NEEDS_NOISE, call.ERR_NEEDS_HISTORY, call.ERR_MIXED_STAGES, call.ERR_BAD_ARGS)


def test_limits_and_table_columns(module):
    assert module.MAX_HISTORY == call.MAX_HISTORY
    assert module.NUM_COEFFS == table.NUM_COEFFS
    assert dict(module.COEFF_COLUMNS) == {name: getattr(table, name) for name in module.COEFF_COLUMNS}
    assert sorted(module.COEFF_COLUMNS.values()) == list(range(len(module.COEFF_COLUMNS)))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_read_the_same_table():
    from zsnr_kernels.backends.triton_kernels import combine

    assert combine.MAX_HIST == call.MAX_HISTORY
    assert combine.NUM_COEFFS == table.NUM_COEFFS
    for name in ("W", "P", "Q", "A", "B", "H0", "H1", "H2", "E", "GY", "GD", "U", "T", "PHI"):
        assert getattr(combine, "C_" + name).value == getattr(table, name)


def test_the_one_nan(module):
    """The NaN every backend stores (combine.h canonical_nan), as the Triton kernels write it: what float("nan")
    is in each storage format."""
    import torch

    _triton = pytest.importorskip("zsnr_kernels.backends.triton_kernels.combine")  # needs triton
    assert tuple(module.NAN_BITS) == (_triton.NAN_F32, _triton.NAN_BF16, _triton.NAN_F16)
    for dtype, bits, view in ((torch.float32, _triton.NAN_F32, torch.int32), (torch.bfloat16, _triton.NAN_BF16,
                                                                             torch.int16),
                              (torch.float16, _triton.NAN_F16, torch.int16)):
        assert torch.tensor(float("nan"), dtype=dtype).view(view).item() == bits
