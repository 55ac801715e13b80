"""Schedules of the training recipes: learning rates on Keras's own, pruning on tfmot's.

`learning_rate_schedule` builds the three decays `examples/train.py` offers,
each with an optional linear warm-up, from Keras's built-in schedules:

- `"cosine"`: `keras.optimizers.schedules.CosineDecay`, whose own
  `warmup_target` / `warmup_steps` give the warm-up;
- `"step"`: `PiecewiseConstantDecay`, the rate divided by 10 at each
  boundary;
- `"linear-steps"`: `PiecewiseConstantDecay`, the rate at boundary `b`
  becoming `peak * (1 - b / total_steps)`: a staircase under the line from
  `peak` to 0.

Keras has no warm-up in front of a piecewise schedule, which the `imagenet`
preset needs (5 warm-up epochs, then 10x drops): `LinearWarmup` adds one
to any schedule. It is registered with Keras (package `tf_transform_conv`),
so a model saved with its optimizer loads with `keras.saving.load_model`
once `tf_transform_conv` is imported.

`pruning_schedule` places tfmot's `PolynomialDecay` (what `prune_model`
takes) by fractions of the training, and `CosineRestart` starts the cosine
decay again, from its peak, at the step where pruning ends: the rate the
network that pruning left trains on (measured in `benchmarks/ablation.py`,
its `--lr-restart`).
"""

import keras
from keras import ops

from tf_transform_conv._checks import is_int
from tf_transform_conv._checks import is_number

__all__ = ["CosineRestart", "LinearWarmup", "SCHEDULES", "learning_rate_schedule",
           "pruning_schedule"]

SCHEDULES = ("cosine", "step", "linear-steps")


def _check_steps(value, name, low=0):
    if not is_int(value) or value < low:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected an int >= {low}. "
            f"Received {name}={value!r}."
        )
    return int(value)


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """A linear warm-up in front of another learning-rate schedule.

    For the first `warmup_steps` steps the rate rises linearly from
    `initial_learning_rate` to the rate `schedule` has at step
    `warmup_steps`; from then on it is `schedule`'s. The ramp is the one
    `keras.optimizers.schedules.CosineDecay` uses for its own warm-up,
    `initial + (target - initial) * step / warmup_steps`, so every schedule
    of `learning_rate_schedule` warms up alike. `schedule` keeps its own
    step count: its boundaries are absolute steps, not shifted by the
    warm-up.

    Args:
        schedule: a `keras.optimizers.schedules.LearningRateSchedule` (or
            its config dict, as `keras.optimizers.schedules.serialize`
            writes it), the schedule after the warm-up.
        warmup_steps: int >= 0, the length of the warm-up in optimizer
            steps; 0 leaves `schedule` as it is.
        initial_learning_rate: float >= 0, the rate at step 0. Defaults to
            0.

    Returns:
        Called with the optimizer's step, the learning rate, a float32
        scalar tensor.

    Raises:
        ValueError: if `schedule` is not a `LearningRateSchedule`, or
            `warmup_steps` or `initial_learning_rate` is negative.

    Example:

    >>> import keras
    >>> drops = keras.optimizers.schedules.PiecewiseConstantDecay([99], [0.1, 0.01])
    >>> schedule = LinearWarmup(drops, warmup_steps=10)
    >>> [round(float(schedule(step)), 4) for step in (0, 5, 10, 99, 100)]
    [0.0, 0.05, 0.1, 0.1, 0.01]
    """

    def __init__(self, schedule, warmup_steps, initial_learning_rate=0.0):
        super().__init__()
        if isinstance(schedule, dict):
            schedule = keras.optimizers.schedules.deserialize(schedule)
        if not isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            raise ValueError(
                "Invalid value for argument `schedule`. Expected a "
                "keras.optimizers.schedules.LearningRateSchedule. "
                f"Received schedule={schedule!r}."
            )
        self.schedule = schedule
        self.warmup_steps = _check_steps(warmup_steps, "warmup_steps")
        if not is_number(initial_learning_rate) or initial_learning_rate < 0:
            raise ValueError(
                "Invalid value for argument `initial_learning_rate`. Expected a number "
                f">= 0. Received initial_learning_rate={initial_learning_rate!r}."
            )
        self.initial_learning_rate = float(initial_learning_rate)

    def __call__(self, step):
        after = ops.cast(self.schedule(step), "float32")
        if not self.warmup_steps:
            return after
        step = ops.cast(step, "float32")
        warmup_steps = float(self.warmup_steps)
        target = ops.cast(self.schedule(self.warmup_steps), "float32")
        initial = self.initial_learning_rate
        ramp = initial + (target - initial) * step / warmup_steps
        return ops.where(step < warmup_steps, ramp, after)

    def get_config(self):
        return {
            "schedule": keras.optimizers.schedules.serialize(self.schedule),
            "warmup_steps": self.warmup_steps,
            "initial_learning_rate": self.initial_learning_rate,
        }


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class CosineRestart(keras.optimizers.schedules.LearningRateSchedule):
    """A cosine decay that starts again from its peak at one step: where pruning ends.

    Before `restart_step` the rate is Keras's
    `CosineDecay(initial_learning_rate, decay_steps)`; from `restart_step`
    on, a second cosine decay from `initial_learning_rate` to 0 over the
    remaining `decay_steps - restart_step` steps. Pass the pruning
    schedule's last step (`end_step` of tfmot's `PolynomialDecay`): the
    network that pruning leaves then trains from the full rate, where a
    single decay would have spent part of it. Measured with the affine
    family pruned over the first 40% of 12 epochs to a quarter and a
    tenth of the convolution parameters (`benchmarks/ablation.py
    --lr-restart`, two tasks, 3 seeds), it added 0.2 to 1.45 points; a
    dense network of the same size, restarted at the same step, gained
    about as much. `restart_step=0` is the plain cosine decay.

    Args:
        initial_learning_rate: float > 0, the rate at step 0 and again at
            `restart_step`.
        decay_steps: int >= 1, the optimizer steps of the whole training;
            the rate reaches 0 there and stays 0.
        restart_step: int in `[0, decay_steps)`, the step where the second
            decay starts.

    Returns:
        Called with the optimizer's step, the learning rate, a float32
        scalar tensor.

    Raises:
        ValueError: for a rate that is not positive, or step counts that
            are not ints in range.

    Example:

    >>> schedule = CosineRestart(0.1, decay_steps=100, restart_step=40)
    >>> [round(float(schedule(step)), 4) for step in (0, 39, 40, 70, 100)]
    [0.1, 0.0669, 0.1, 0.05, 0.0]
    """

    def __init__(self, initial_learning_rate, decay_steps, restart_step):
        super().__init__()
        if not is_number(initial_learning_rate) or initial_learning_rate <= 0:
            raise ValueError(
                "Invalid value for argument `initial_learning_rate`. Expected a number "
                f"> 0. Received initial_learning_rate={initial_learning_rate!r}."
            )
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = _check_steps(decay_steps, "decay_steps", low=1)
        self.restart_step = _check_steps(restart_step, "restart_step")
        if self.restart_step >= self.decay_steps:
            raise ValueError(
                "Invalid value for argument `restart_step`. Expected an int below "
                f"decay_steps={self.decay_steps}. Received restart_step={restart_step!r}."
            )
        self._first = keras.optimizers.schedules.CosineDecay(
            self.initial_learning_rate, self.decay_steps)
        self._second = keras.optimizers.schedules.CosineDecay(
            self.initial_learning_rate, self.decay_steps - self.restart_step)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        restart = float(self.restart_step)
        first = ops.cast(self._first(step), "float32")
        second = ops.cast(self._second(ops.maximum(step - restart, 0.0)), "float32")
        return ops.where(step < restart, first, second)

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "restart_step": self.restart_step,
        }


def learning_rate_schedule(kind, peak, total_steps, warmup_steps=0, boundaries=()):
    """A learning-rate schedule of Keras's built-ins: cosine, step or linear steps.

    The rate warms up linearly from 0 to `peak` over `warmup_steps`, then
    decays:

    - `"cosine"`: to 0 at `total_steps`, along half a cosine
      (`keras.optimizers.schedules.CosineDecay`, warm-up included);
    - `"step"`: 10x at each of `boundaries`
      (`keras.optimizers.schedules.PiecewiseConstantDecay`);
    - `"linear-steps"`: at each boundary `b` to `peak * (1 - b / total_steps)`
      (`PiecewiseConstantDecay`).

    The piecewise schedules drop at the step equal to the boundary (the
    first step with the lower rate is `b`). With a warm-up they are wrapped
    in `LinearWarmup`, which ramps to the rate at the end of the warm-up.

    Args:
        kind: one of `"cosine"`, `"step"`, `"linear-steps"`.
        peak: float > 0, the rate after the warm-up.
        total_steps: int >= 1, the optimizer steps of the whole training.
        warmup_steps: int >= 0, the steps of the linear warm-up. Defaults
            to 0.
        boundaries: for `"step"` and `"linear-steps"`, a non-empty sequence
            of ints in `[0, total_steps]` (in any order; repeats drop the
            step rate once each): the steps where the rate drops. Ignored
            by `"cosine"`.

    Returns:
        A `keras.optimizers.schedules.LearningRateSchedule`: a built-in
        one, or a `LinearWarmup` around one.

    Raises:
        ValueError: for an unknown `kind`, a `peak` that is not positive,
            step counts that are not ints in range, or missing boundaries.

    Example:

    >>> schedule = learning_rate_schedule("step", 0.1, total_steps=100, boundaries=[50, 75])
    >>> [round(float(schedule(step)), 5) for step in (0, 49, 50, 75)]
    [0.1, 0.1, 0.01, 0.001]
    >>> type(learning_rate_schedule("cosine", 0.1, 100, warmup_steps=10)).__name__
    'CosineDecay'
    """
    if not isinstance(kind, str) or kind not in SCHEDULES:
        raise ValueError(
            f"Invalid value for argument `kind`. Expected one of {list(SCHEDULES)}. "
            f"Received kind={kind!r}."
        )
    if not is_number(peak) or peak <= 0:
        raise ValueError(
            f"Invalid value for argument `peak`. Expected a number > 0. Received peak={peak!r}."
        )
    peak = float(peak)
    total_steps = _check_steps(total_steps, "total_steps", low=1)
    warmup_steps = _check_steps(warmup_steps, "warmup_steps")
    if kind == "cosine":
        decay_steps = max(1, total_steps - warmup_steps)
        if not warmup_steps:
            return keras.optimizers.schedules.CosineDecay(peak, decay_steps)
        return keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps, warmup_target=peak, warmup_steps=warmup_steps)

    given = list(boundaries)
    if not given or any(not is_int(b) or not 0 <= b <= total_steps for b in given):
        raise ValueError(
            f"Invalid value for argument `boundaries`. Expected, for kind={kind!r}, a "
            f"non-empty list of ints in [0, total_steps={total_steps}]. "
            f"Received boundaries={boundaries!r}."
        )
    given = sorted(int(b) for b in given)
    if kind == "step":
        values = [peak * 0.1**k for k in range(len(given) + 1)]
    else:
        values = [peak] + [peak * (1.0 - b / total_steps) for b in given]
    # PiecewiseConstantDecay changes value after a boundary (step > b): b - 1
    # makes step b the first one at the new rate.
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [b - 1 for b in given], values)
    return LinearWarmup(schedule, warmup_steps) if warmup_steps else schedule


def pruning_schedule(total_steps, final_sparsity, begin=0.0, end=0.5, power=3.0,
                     frequency=None):
    """tfmot's `PolynomialDecay` pruning schedule, placed by fractions of the training.

    Sparsity rises from 0 at step `begin * (total_steps - 1)` to
    `final_sparsity` at step `end * (total_steps - 1)` along tfmot's
    polynomial (`power` 1 is linear, 3 tfmot's default), one pruning step
    every `frequency` steps. The end is moved back to the last pruning step
    (so that the last step prunes to `final_sparsity`); a schedule shorter
    than one interval prunes once, at step `begin + 1`. The schedule's
    `begin_step`, `end_step` and `frequency` say where it landed.
    `tensorflow_model_optimization` is imported here: it is an optional
    dependency, and importing it switches `tf.keras`.

    Args:
        total_steps: int >= 1, the optimizer steps of the whole training.
        final_sparsity: float in [0, 1), the fraction of filters pruned at
            the end.
        begin: float in [0, 1], where pruning starts. Defaults to 0.
        end: float in [begin, 1], where it reaches `final_sparsity`.
            Defaults to 0.5.
        power: float > 0, the polynomial's exponent. Defaults to 3.
        frequency: int >= 1, the steps between pruning steps (the steps of
            an epoch prune once per epoch), or None for about 20 pruning
            steps over the schedule. Defaults to None.

    Returns:
        A `tfmot.sparsity.keras.PolynomialDecay`, for `prune_model`.

    Raises:
        ValueError: for fractions out of order or out of range, or counts
            that are not positive ints.
    """
    total_steps = _check_steps(total_steps, "total_steps", low=1)
    if not is_number(final_sparsity) or not 0 <= final_sparsity < 1:
        raise ValueError(
            "Invalid value for argument `final_sparsity`. Expected a number in [0, 1). "
            f"Received final_sparsity={final_sparsity!r}."
        )
    if not (is_number(begin) and is_number(end) and 0 <= begin <= end <= 1):
        raise ValueError(
            "Invalid values for arguments `begin` and `end`. Expected numbers with "
            f"0 <= begin <= end <= 1. Received begin={begin!r}, end={end!r}."
        )
    if not is_number(power) or power <= 0:
        raise ValueError(
            f"Invalid value for argument `power`. Expected a number > 0. Received power={power!r}."
        )
    import tensorflow_model_optimization as tfmot

    begin_step = int(begin * (total_steps - 1))
    end_step = max(begin_step, int(end * (total_steps - 1)))
    if frequency is None:
        frequency = max(1, (end_step - begin_step) // 20)
    frequency = _check_steps(frequency, "frequency", low=1)
    end_step = begin_step + (end_step - begin_step) // frequency * frequency
    if end_step == begin_step:  # shorter than one pruning interval: prune once
        end_step, frequency = begin_step + 1, 1
    return tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=float(final_sparsity), begin_step=begin_step,
        end_step=end_step, power=float(power), frequency=frequency)
