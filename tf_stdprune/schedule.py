"""`StdPruningSchedule`: when to prune, and with which quality parameter ``q``.

One *iteration* of the reference experiment's procedure is ``steps_per_iteration`` optimizer steps. The
schedule prunes once, at the first step of every iteration.

Steps are numbered as tfmot numbers them: the k-th training call of a wrapped layer is
step ``k`` (counted from 1; ``optimizer.iterations + 1`` while that call runs), so a tfmot
schedule and this one see the same step at the same call. ``begin_step`` and ``end_step``
mean exactly what they mean in tfmot's schedules (``ConstantSparsity``, ``PolynomialDecay``)::

    should_prune    = step >= begin_step and (end_step < 0 or step <= end_step)
                      and (step - begin_step) % steps_per_iteration == 0
    first_step      = begin_step if begin_step >= 1 else steps_per_iteration
    iteration(step) = (step - first_step) // steps_per_iteration
    q(step)         = qualities[min(iteration, len(qualities) - 1)]

so the first pruning is at step ``begin_step`` (at step ``steps_per_iteration`` for
``begin_step=0``, as in tfmot, since no call is step 0) and ``end_step`` is the last step
that may prune. The default ``begin_step=1`` prunes at the first call of every iteration:
steps ``1, E + 1, 2E + 1, ...`` for ``steps_per_iteration = E``. A configuration saved
before steps were numbered this way (no ``"numbering"`` key) is read with its
``begin_step``/``end_step`` shifted by one, so it prunes at the steps it did.

Once the list is exhausted **the last quality repeats** (as the reference experiment's learning-rate list
does); pass ``end_step`` to stop pruning instead. ``qualities`` may also be a callable of
the iteration index returning ``q``; such a schedule cannot be serialized.

The class depends on neither Keras nor tfmot: the tf_keras path calls it with tensors
(``__call__``, tfmot's schedule protocol, and registers it as a tfmot `PruningSchedule`),
the Keras 3 path asks `should_prune` and `quality` with Python integers.
"""
import numbers

from tf_stdprune.validate import MAX_QUALITY, check_int, check_quality  # noqa: F401

# Written into every configuration: begin_step/end_step are tfmot's step numbers.
NUMBERING = "tfmot"


class StdPruningSchedule:
    """Prune at the first step of every iteration with that iteration's quality ``q``.

    ``__call__(step)`` returns ``(should_prune, q)`` as TensorFlow tensors (bool, float32),
    the protocol of tfmot's schedules with ``q`` in place of the target sparsity;
    `should_prune` and `quality` answer the same for Python integers.

    Examples:
      >>> schedule = StdPruningSchedule([0.5, 1.0], steps_per_iteration=100)
      >>> [s for s in range(1, 401) if schedule.should_prune(s)], schedule.quality(3)
      ([1, 101, 201, 301], 1.0)
      >>> later = StdPruningSchedule([0.5], steps_per_iteration=100, begin_step=50)
      >>> [s for s in range(1, 401) if later.should_prune(s)]   # tfmot's begin_step
      [50, 150, 250, 350]
    """

    def __init__(self, qualities, steps_per_iteration, begin_step=1, end_step=-1):
        if callable(qualities):
            self._quality_fn = qualities
        else:
            qualities = [qualities] if isinstance(qualities, numbers.Real) else list(qualities)
            if not qualities:
                raise ValueError(
                    "qualities is empty: give at least one quality parameter q, e.g. [0.5, 1.0]."
                )
            qualities = [check_quality(q, f"qualities[{i}]") for i, q in enumerate(qualities)]
            self._quality_fn = None
        self.qualities = qualities
        self.steps_per_iteration = check_int(
            steps_per_iteration, "steps_per_iteration", 1,
            "optimizer steps in one prune + retrain iteration, e.g. epochs * steps_per_epoch")
        self.begin_step = check_int(begin_step, "begin_step", 0,
                                    "the first step that prunes, counted from 1 as in tfmot")
        self.end_step = check_int(end_step, "end_step", -1, "the last step that prunes, -1: never stop")
        if 0 <= self.end_step < self.begin_step:
            raise ValueError(f"end_step ({end_step}) must be -1 or >= begin_step ({begin_step}).")

    @property
    def first_step(self):
        """The first step that prunes (``begin_step``, or ``steps_per_iteration`` for 0)."""
        return self.begin_step if self.begin_step >= 1 else self.steps_per_iteration

    def iteration(self, step):
        """The iteration index of ``step`` (negative before the first pruning step)."""
        return (step - self.first_step) // self.steps_per_iteration

    def should_prune(self, step):
        """Whether the schedule prunes at the Python integer ``step`` (counted from 1)."""
        in_range = step >= self.begin_step and (self.end_step < 0 or step <= self.end_step)
        return in_range and (step - self.begin_step) % self.steps_per_iteration == 0

    def quality(self, iteration):
        """``q`` of an iteration index: a float for a Python integer, a float32 tensor for
        a TensorFlow tensor."""
        if isinstance(iteration, numbers.Integral):
            if self._quality_fn is not None:
                return check_quality(float(self._quality_fn(iteration)),
                                      f"qualities({iteration}) (the callable's q)")
            return self.qualities[min(max(iteration, 0), len(self.qualities) - 1)]
        import tensorflow as tf  # only the tf_keras path passes tensors

        if self._quality_fn is not None:
            return tf.cast(self._quality_fn(iteration), tf.float32)
        index = tf.clip_by_value(tf.cast(iteration, tf.int64), 0, len(self.qualities) - 1)
        return tf.gather(tf.constant(self.qualities, tf.float32), index)

    def __call__(self, step):
        import tensorflow as tf  # the tf_keras path's tensor protocol

        step = tf.cast(step, tf.int64)
        in_range = step >= self.begin_step
        if self.end_step >= 0:
            in_range = tf.logical_and(in_range, step <= self.end_step)
        on_turn = tf.equal(tf.math.floormod(step - self.begin_step, self.steps_per_iteration), 0)
        return tf.logical_and(in_range, on_turn), self.quality(self.iteration(step))

    def get_config(self):
        if self._quality_fn is not None:
            raise ValueError(
                "A StdPruningSchedule with callable qualities cannot be serialized; "
                "pass a list of qualities to save the model."
            )
        return {
            "class_name": self.__class__.__name__,
            "config": {
                "qualities": list(self.qualities),
                "steps_per_iteration": self.steps_per_iteration,
                "begin_step": self.begin_step,
                "end_step": self.end_step,
                "numbering": NUMBERING,
            },
        }

    @classmethod
    def from_config(cls, config):
        """Accepts ``get_config()``'s tfmot form ``{"class_name", "config"}`` or its ``config``;
        a configuration without ``"numbering"`` counted ``begin_step``/``end_step`` as
        optimizer steps taken before the call, and is shifted by one to prune where it did."""
        config = dict(config.get("config", config))
        if config.pop("numbering", None) != NUMBERING:
            config["begin_step"] = config.get("begin_step", 0) + 1
            if config.get("end_step", -1) >= 0:
                config["end_step"] += 1
        return cls(**config)
