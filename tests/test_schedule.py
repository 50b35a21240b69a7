"""StdPruningSchedule: when it prunes, with which q, serialization and bad input."""
import json
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tf_stdprune import StdPruningSchedule
from tf_stdprune.keras2.engine import keras
import tf_stdprune.keras2.wrapper  # noqa: F401,E402 (registers the schedule as a tfmot schedule)


def _expected(step, qualities, steps_per_iteration, begin_step=1, end_step=-1):
    """Reference, tfmot's numbering: prune at steps begin_step + k * steps_per_iteration
    (steps counted from 1, so begin_step 0 first prunes at steps_per_iteration), q of the
    k-th pruning."""
    pruning_steps = [s for s in range(1, step + 1) if s >= begin_step
                     and (s - begin_step) % steps_per_iteration == 0
                     and (end_step < 0 or s <= end_step)]
    prune = bool(pruning_steps) and pruning_steps[-1] == step
    done = len([s for s in range(1, step + 1) if s >= begin_step
                and (s - begin_step) % steps_per_iteration == 0])
    return prune, qualities[min(max(done - 1, 0), len(qualities) - 1)]


@pytest.mark.parametrize("qualities, spi, begin, end", [
    ([0.5, 0.75, 1.25], 3, 1, -1),
    ([0.4, 0.9], 5, 7, -1),
    ([1.0, 2.0, 3.0], 4, 2, 13),
    ([0.3], 1, 1, 4),
    ([0.2, 0.6], 4, 0, -1),
])
def test_prunes_at_first_step_of_each_iteration(qualities, spi, begin, end):
    schedule = StdPruningSchedule(qualities, spi, begin_step=begin, end_step=end)
    assert isinstance(schedule, tfmot.sparsity.keras.PruningSchedule)
    for step in range(1, 40):  # no call is step 0
        should_prune, q = schedule(tf.constant(step, tf.int64))
        expected_prune, expected_q = _expected(step, qualities, spi, begin, end)
        assert bool(should_prune) == expected_prune == schedule.should_prune(step), step
        if step >= schedule.first_step:
            assert schedule.quality(schedule.iteration(step)) == expected_q
            assert float(q) == np.float32(expected_q), step  # last quality repeats


def test_the_default_begin_step_prunes_at_the_first_call_of_every_iteration():
    """The procedure's iterations start at steps 1, E + 1, 2E + 1, ... by default."""
    schedule = StdPruningSchedule([0.5, 1.0], 10)
    assert [s for s in range(1, 41) if schedule.should_prune(s)] == [1, 11, 21, 31]
    assert [schedule.iteration(s) for s in (1, 10, 11, 31)] == [0, 0, 1, 3]


def test_inside_tf_function():
    schedule = StdPruningSchedule([0.5, 1.5], 2)
    call = tf.function(schedule)
    results = [(bool(p), float(q)) for p, q in (call(tf.constant(s, tf.int64)) for s in range(1, 7))]
    assert results == [(True, 0.5), (False, 0.5), (True, 1.5), (False, 1.5), (True, 1.5),
                       (False, 1.5)]


def test_callable_qualities():
    schedule = StdPruningSchedule(lambda i: 0.25 * tf.cast(i + 1, tf.float32), 3, begin_step=2)
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
        "qualities": [0.5, 1.0, 1.25], "steps_per_iteration": 4, "begin_step": 2, "end_step": 30,
        "numbering": "tfmot"}}
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


def test_a_configuration_without_numbering_prunes_at_the_steps_it_pruned_at_before():
    """Configurations saved when begin_step counted the optimizer steps before the first
    pruning load shifted by one, so a saved model keeps its pruning steps."""
    old = StdPruningSchedule.from_config({"class_name": "StdPruningSchedule", "config": {
        "qualities": [0.5], "steps_per_iteration": 4, "begin_step": 0, "end_step": 8}})
    assert (old.begin_step, old.end_step) == (1, 9)
    assert [s for s in range(1, 20) if old.should_prune(s)] == [1, 5, 9]


@pytest.mark.parametrize("begin, frequency, end", [(0, 1, -1), (0, 3, -1), (1, 3, -1), (2, 4, 19),
                                                   (5, 2, 12)])
def test_prunes_at_the_steps_a_tfmot_schedule_with_the_same_arguments_names(begin, frequency, end):
    """tfmot's ConstantSparsity and PolynomialDecay fire at begin_step + k * frequency (up to
    end_step); ours, given the same begin_step and end_step, at the same steps."""
    theirs = [tfmot.sparsity.keras.ConstantSparsity(0.5, begin, end_step=end, frequency=frequency),
              tfmot.sparsity.keras.PolynomialDecay(0.1, 0.5, begin, end if end > 0 else 40,
                                                    frequency=frequency)]
    ours = StdPruningSchedule([1.0], frequency, begin_step=begin, end_step=end)
    ours_steps = [s for s in range(1, 30) if ours.should_prune(s)]
    assert ours_steps == [s for s in range(1, 30) if bool(theirs[0](tf.constant(s, tf.int64))[0])]
    if end < 0:
        assert ours_steps == [s for s in range(1, 30)
                              if bool(theirs[1](tf.constant(s, tf.int64))[0])]
