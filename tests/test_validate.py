"""validate.py: one definition of a valid argument, used by quantize, callbacks and the
compressed file."""
import math
import re

import numpy as np
import pytest

from tf_stdprune import validate

NOT_NUMBERS = [True, False, None, "1", [1], 1 + 0j]


@pytest.mark.parametrize("q, expected", [(0, 0.0), (0.5, 0.5), (np.float32(2.5), 2.5), (7, 7.0)])
def test_check_quality_returns_a_float_for_finite_non_negative_numbers(q, expected):
    result = validate.check_quality(q, "q")
    assert result == expected and type(result) is float


@pytest.mark.parametrize("q", [-0.1, math.inf, math.nan, *NOT_NUMBERS])
def test_check_quality_names_the_argument_and_the_value(q):
    with pytest.raises(ValueError, match=r"^layer_quality\['x'\] must be a finite number >= 0 "
                                         r".*got " + re.escape(repr(q)) + r"\.$"):
        validate.check_quality(q, "layer_quality['x']")


@pytest.mark.parametrize("value, minimum", [(0, 0), (3, 1), (np.int64(5), 5), (-1, -1)])
def test_check_int_accepts_integers_from_the_minimum(value, minimum):
    result = validate.check_int(value, "n", minimum)
    assert result == int(value) and type(result) is int


@pytest.mark.parametrize("value", [0, 2.0, np.float32(3), *NOT_NUMBERS])
def test_check_int_refuses_non_integers_bools_and_values_below_the_minimum(value):
    with pytest.raises(ValueError, match=r"^steps must be an integer >= 1 \(optimizer steps\), got "):
        validate.check_int(value, "steps", 1, "optimizer steps")


@pytest.mark.parametrize("value", [0, -1e-9, math.inf, math.nan, *NOT_NUMBERS])
def test_check_positive_refuses_zero_negative_non_finite_and_non_numbers(value):
    with pytest.raises(ValueError, match=r"^factor must be a finite number > 0 \(a drop\), got"):
        validate.check_positive(value, "factor", "a drop")
    assert validate.check_positive(1e-300, "factor") == 1e-300


def test_check_bits_accepts_1_to_max_bits_and_none_only_when_allowed():
    assert [validate.check_bits(b, "bits") for b in range(1, validate.MAX_BITS + 1)] == list(
        range(1, 13))
    assert validate.MAX_BITS == 12 and validate.check_bits(None, "bits") is None
    with pytest.raises(ValueError, match=r"^bits must be an integer in \[1, 12\], got None"):
        validate.check_bits(None, "bits", allow_none=False)


@pytest.mark.parametrize("bits", [0, 13, 4.0, True, "8", np.float64(3)])
def test_check_bits_refuses_out_of_range_floats_bools_and_strings(bits):
    with pytest.raises(ValueError, match=r"^conv_bits must be an integer in \[1, 12\] \(or None"):
        validate.check_bits(bits, "conv_bits")


@pytest.mark.parametrize("kwargs, message", [
    (dict(initial_lrs=True, epochs_per_iteration=2), r"initial_lrs must be a non-empty list"),
    (dict(initial_lrs="0.1", epochs_per_iteration=2), r"initial_lrs must be a non-empty list"),
    (dict(initial_lrs=[0.1, True], epochs_per_iteration=2), r"initial_lrs\[1\] must be a finite"),
    (dict(initial_lrs=0.1, epochs_per_iteration=True), r"epochs_per_iteration must be an integer"),
    (dict(initial_lrs=0.1, epochs_per_iteration=2, drops=None), r"drops must be a non-empty list"),
    (dict(initial_lrs=0.1, epochs_per_iteration=2, drops=(1.5,)), r"drops\[0\] must be an integer"),
])
def test_learning_rate_callback_arguments_get_messages_not_raw_errors(kwargs, message):
    from tf_stdprune.keras2.callbacks import IterationLearningRate

    with pytest.raises(ValueError, match=message):
        IterationLearningRate(**kwargs)
    callback = IterationLearningRate(np.array([0.1, 0.01]), 2, drops=())
    assert [callback.rate(e) for e in range(4)] == [0.1, 0.1, 0.01, 0.01]
