"""StdPruningSchedule: when it prunes, with which q, serialization and bad input."""
import json
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tf_stdprune import StdPruningSchedule
from tf_stdprune.keras2.engine import keras


def _expected(step, qualities, steps_per_iteration, begin_step=0, end_step=-1):
    """Reference: step counts training calls from 1 (tfmot's numbering); prune at the call
    after begin_step + k * steps_per_iteration optimizer steps, q of iteration k."""
    taken = step - 1
    offset = taken - begin_step
    in_range = offset >= 0 and (end_step < 0 or taken <= end_step)
    prune = in_range and offset % steps_per_iteration == 0
    return prune, qualities[min(max(offset // steps_per_iteration, 0), len(qualities) - 1)]


@pytest.mark.parametrize("qualities, spi, begin, end", [
    ([0.5, 0.75, 1.25], 3, 0, -1),
    ([0.4, 0.9], 5, 7, -1),
    ([1.0, 2.0, 3.0], 4, 2, 13),
    ([0.3], 1, 0, 4),
])
def test_prunes_at_first_step_of_each_iteration(qualities, spi, begin, end):
    schedule = StdPruningSchedule(qualities, spi, begin_step=begin, end_step=end)
    assert isinstance(schedule, tfmot.sparsity.keras.PruningSchedule)
    for step in range(40):
        should_prune, q = schedule(tf.constant(step, tf.int64))
        expected_prune, expected_q = _expected(step, qualities, spi, begin, end)
        assert bool(should_prune) == expected_prune == schedule.should_prune(step), step
        if step - 1 >= begin:
            assert schedule.quality(schedule.iteration(step)) == expected_q
            assert float(q) == np.float32(expected_q), step  # last quality repeats


def test_inside_tf_function():
    schedule = StdPruningSchedule([0.5, 1.5], 2)
    call = tf.function(schedule)
    results = [(bool(p), float(q)) for p, q in (call(tf.constant(s, tf.int64)) for s in range(1, 7))]
    assert results == [(True, 0.5), (False, 0.5), (True, 1.5), (False, 1.5), (True, 1.5),
                       (False, 1.5)]


def test_callable_qualities():
    schedule = StdPruningSchedule(lambda i: 0.25 * tf.cast(i + 1, tf.float32), 3, begin_step=1)
    for step in range(2, 13):
        should_prune, q = schedule(step)
        assert bool(should_prune) == ((step - 2) % 3 == 0)
        assert float(q) == 0.25 * ((step - 2) // 3 + 1)
    with pytest.raises(ValueError, match="callable qualities cannot be serialized"):
        schedule.get_config()


def test_config_round_trip_and_keras_serialization():
    schedule = StdPruningSchedule((np.float32(0.5), 1, 1.25), np.int64(4), begin_step=2,
                                  end_step=30)
    config = schedule.get_config()
    json.dumps(config)  # plain JSON types, numpy scalars converted
    assert config == {"class_name": "StdPruningSchedule", "config": {
        "qualities": [0.5, 1.0, 1.25], "steps_per_iteration": 4, "begin_step": 2, "end_step": 30}}
    copies = [
        StdPruningSchedule.from_config(config),
        StdPruningSchedule.from_config(config["config"]),
        keras.utils.deserialize_keras_object(keras.utils.serialize_keras_object(schedule)),
        keras.utils.deserialize_keras_object(
            config, custom_objects={"StdPruningSchedule": StdPruningSchedule}),  # tfmot's way
    ]
    for copy in copies:
        assert type(copy) is StdPruningSchedule and copy.get_config() == config
        for step in range(35):
            assert [float(v) for v in copy(step)] == [float(v) for v in schedule(step)]


BAD = [
    (dict(qualities=[0.5, -0.1]), r"qualities\[1\]"),
    (dict(qualities=[math.nan]), r"qualities\[0\]"),
    (dict(qualities=[math.inf]), r"qualities\[0\]"),
    (dict(qualities=[1e39]), r"qualities\[0\]"),  # overflows the float32 threshold
    (dict(qualities=-1.0), r"qualities\[0\]"),
    (dict(qualities=["0.5"]), r"qualities\[0\]"),
    (dict(qualities=[True]), r"qualities\[0\]"),
    (dict(qualities=[]), "qualities is empty"),
    (dict(steps_per_iteration=0), "steps_per_iteration"),
    (dict(steps_per_iteration=-3), "steps_per_iteration"),
    (dict(steps_per_iteration=2.5), "steps_per_iteration"),
    (dict(steps_per_iteration="4"), "steps_per_iteration"),
    (dict(steps_per_iteration=None), "steps_per_iteration"),
    (dict(begin_step=-1), "begin_step"),
    (dict(begin_step=1.5), "begin_step"),
    (dict(end_step=-2), "end_step"),
    (dict(begin_step=5, end_step=3), "end_step"),
]


@pytest.mark.parametrize("kwargs, match", BAD)
def test_bad_input_raises_value_error_naming_argument(kwargs, match):
    arguments = dict(qualities=[0.5], steps_per_iteration=4)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        StdPruningSchedule(**arguments)


def test_a_callable_quality_returning_nan_or_overflowing_is_refused_for_python_steps():
    for bad in (math.nan, 1e39, -1.0):
        schedule = StdPruningSchedule(lambda i, bad=bad: bad, 3)
        with pytest.raises(ValueError, match="callable"):
            schedule.quality(0)


@pytest.mark.parametrize("begin, frequency", [(0, 1), (0, 3), (2, 4), (5, 2)])
def test_prunes_one_call_after_the_step_a_tfmot_schedule_with_the_same_arguments_names(
        begin, frequency):
    """tfmot's ConstantSparsity fires at steps begin + k * frequency, the last call of the
    previous period; ours at the call after, the first call of each iteration."""
    theirs = tfmot.sparsity.keras.ConstantSparsity(0.5, begin, frequency=frequency)
    ours = StdPruningSchedule([1.0], frequency, begin_step=begin)
    tfmot_steps = [s for s in range(0, 29) if bool(theirs(tf.constant(s, tf.int64))[0])]
    assert [s for s in range(1, 30) if ours.should_prune(s)] == [s + 1 for s in tfmot_steps]
