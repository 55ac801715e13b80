"""Pruning schedules: the contract, checking, saving, and the scaled schedule of budgets.

A schedule is any callable `schedule(step) -> (should_prune, sparsity)`:
this module's `PolynomialDecay` and `ConstantSparsity` (tfmot's two
schedules, same arguments and arithmetic, without tfmot),
tensorflow-model-optimization's own as they are, a function, or an object with `__call__(self, step)` (as tfmot's
`PruningSchedule` subclasses have). `check_schedule` checks the callable,
`evaluate_schedule` what it returns, and `serialize_schedule` /
`deserialize_schedule` save it in a wrapper's config, as Keras saves custom
objects: tfmot's schedules and objects with `get_config` by their config,
other callables (functions, lambdas) by name, to be found again when the
file is loaded (`@keras.saving.register_keras_serializable()`, or
`load_model(..., custom_objects={name: schedule})`). Saving never fails on
a schedule, so it never leaves a file half-written.

tfmot itself is never imported at import time (importing it switches
`tf.keras` to legacy Keras for the whole process); its schedule objects are
accepted as they are and rebuilt lazily when a saved model is loaded.
"""

import importlib
import math
import warnings

import keras
import numpy as np

from tf_transform_conv._checks import is_int
from tf_transform_conv._checks import is_number

__all__ = [
    "ConstantSparsity",
    "PolynomialDecay",
    "ScaledSchedule",
    "check_schedule",
    "deserialize_schedule",
    "evaluate_schedule",
    "final_sparsity",
    "serialize_schedule",
]

_TFMOT_SCHEDULES = ("PolynomialDecay", "ConstantSparsity")
_TFMOT_SCHEDULE_MODULE = (
    "tensorflow_model_optimization.python.core.sparsity.keras.pruning_schedule"
)


def _is_tfmot(schedule):
    cls = type(schedule)
    return (cls.__module__.startswith("tensorflow_model_optimization")
            and cls.__name__ in _TFMOT_SCHEDULES)


def saved_by_name(schedule):
    """Whether `schedule` is saved by name (a callable with no config: a function, a lambda).

    Such a schedule is found again at load only if it is registered with
    Keras or passed in `custom_objects`.
    """
    return not (_is_tfmot(schedule) or hasattr(schedule, "get_config"))


def serialize_schedule(schedule):
    """A JSON-able config for a schedule; see `deserialize_schedule`.

    tfmot's `PolynomialDecay` and `ConstantSparsity` are saved by their
    config, an object with `get_config` as Keras saves custom objects (the
    class must be registered, or passed in `custom_objects` at load), and
    any other callable by name, with a warning when it is not registered
    (loading then needs `custom_objects={name: schedule}`).
    """
    if _is_tfmot(schedule):
        return {"tfmot": type(schedule).__name__,
                "config": schedule.get_config()["config"]}
    if hasattr(schedule, "get_config"):
        return {"keras": keras.saving.serialize_keras_object(schedule)}
    named = schedule if hasattr(schedule, "__name__") else type(schedule)
    name = keras.saving.get_registered_name(named)
    if keras.saving.get_registered_object(name) is not named:
        warnings.warn(
            f"The pruning schedule {schedule!r} is saved by its name, {name!r}: the file "
            f"loads with keras.saving.load_model(path, custom_objects={{{name!r}: "
            "schedule}). Register it (@keras.saving.register_keras_serializable()) or "
            "use tfmot's PolynomialDecay or ConstantSparsity to load it without.",
            stacklevel=3,
        )
    return {"by_name": name}


def deserialize_schedule(config):
    """Rebuilds a schedule saved by `serialize_schedule` (tfmot imported lazily).

    Raises:
        ValueError: for a schedule saved by name that is neither registered
            nor in the `custom_objects` of the load, naming what to pass.
    """
    if "tfmot" in config:
        name = config["tfmot"]
        if name not in _TFMOT_SCHEDULES:
            raise ValueError(
                f"Unknown tfmot schedule {name!r}; expected one of {list(_TFMOT_SCHEDULES)}."
            )
        module = importlib.import_module(_TFMOT_SCHEDULE_MODULE)
        return getattr(module, name)(**config["config"])
    if "by_name" in config:
        name = config["by_name"]
        schedule = keras.saving.get_registered_object(name)
        if schedule is None:
            raise ValueError(
                f"The pruning schedule {name!r} was saved by its name (a function or a "
                "callable without get_config): pass it when loading, "
                f"keras.saving.load_model(path, custom_objects={{{name!r}: schedule}}), "
                "or register it with @keras.saving.register_keras_serializable()."
            )
        return schedule
    return keras.saving.deserialize_keras_object(config["keras"])


_SCHEDULE_CONTRACT = (
    "a callable schedule(step) -> (should_prune, sparsity): tfmot's "
    "PolynomialDecay or ConstantSparsity, a function, or an object with "
    "__call__(self, step), as tfmot's PruningSchedule subclasses have"
)


def check_schedule(schedule):
    """Raises a ValueError unless `schedule` is callable as `schedule(step)`."""
    if callable(schedule):
        return
    hint = ""
    if callable(getattr(schedule, "schedule", None)):
        hint = (
            f" {type(schedule).__name__} has a `schedule` method but no `__call__`: "
            "name the method `__call__` (or add `__call__ = schedule` to the class)."
        )
    raise ValueError(
        f"Invalid value for argument `schedule`. Expected {_SCHEDULE_CONTRACT}. "
        f"Received schedule={schedule!r}.{hint}"
    )


def evaluate_schedule(schedule, step):
    """`(should_prune: bool, sparsity: float)` from `schedule(step)`, checked."""
    result = schedule(step)
    should_prune = sparsity = None
    if isinstance(result, (tuple, list)) and len(result) == 2:
        should_prune, sparsity = (np.asarray(value) for value in result)
    if (
        should_prune is None
        or should_prune.shape != () or should_prune.dtype != bool
        or sparsity.shape != () or sparsity.dtype.kind not in "fiu"
    ):
        raise ValueError(
            f"The pruning schedule {schedule!r} returned {result!r} at step {step}; "
            "expected a pair (should_prune: bool, sparsity: float in [0, 1)), as "
            "tfmot's schedules return."
        )
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(
            f"The pruning schedule returned sparsity={sparsity} at step {step}; "
            "expected a value in [0, 1)."
        )
    return bool(should_prune), sparsity


def final_sparsity(schedule):
    """The sparsity a schedule ends at (tfmot `PolynomialDecay` / `ConstantSparsity`, or an
    object with `final_sparsity` or `target_sparsity`), or None if unknown."""
    config = {}
    if hasattr(schedule, "get_config"):
        try:
            config = schedule.get_config()
        except Exception:  # noqa: BLE001 - a schedule without a usable config
            config = {}
        config = config.get("config", config)
    for key in ("final_sparsity", "target_sparsity"):
        value = config.get(key, getattr(schedule, key, None))
        if value is not None:
            return float(value)
    return None


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class ScaledSchedule:
    """A pruning schedule whose sparsities are another's times a factor.

    `prune_model(..., budget=...)` gives each wrapped layer the user's
    schedule scaled so that it ends at the layer's own sparsity
    (`factor = layer sparsity / schedule's final sparsity`): the schedule
    keeps its timing, the budget plan sets each layer's end point.

    Args:
        schedule: a pruning schedule (`schedule(step) -> (should_prune,
            sparsity)`), saveable as `serialize_schedule` requires.
        factor: float >= 0.
    """

    def __init__(self, schedule, factor):
        if isinstance(schedule, dict):
            schedule = deserialize_schedule(schedule)
        if not (is_number(factor) and factor >= 0 and math.isfinite(factor)):
            raise ValueError(
                f"Invalid value for argument `factor`. Expected a finite number >= 0. "
                f"Received factor={factor!r}."
            )
        self.schedule = schedule
        self.factor = float(factor)

    def __call__(self, step):
        should_prune, sparsity = self.schedule(step)
        sparsity = float(np.asarray(sparsity)) * self.factor
        return np.asarray(should_prune, dtype=bool), min(sparsity, 1.0 - 1e-9)

    def get_config(self):
        return {"schedule": serialize_schedule(self.schedule), "factor": self.factor}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _check_steps(begin_step, end_step, frequency, allow_open_end):
    if not (is_int(begin_step) and begin_step >= 0):
        raise ValueError(
            f"Invalid value for argument `begin_step`. Expected an int >= 0. "
            f"Received begin_step={begin_step!r}.")
    if not is_int(end_step) or (end_step != -1 or not allow_open_end) and end_step < begin_step:
        allowed = "-1 (no end) or an int >= begin_step" if allow_open_end else "an int >= begin_step"
        raise ValueError(
            f"Invalid value for argument `end_step`. Expected {allowed}. "
            f"Received end_step={end_step!r} (begin_step={begin_step!r}).")
    if not (is_int(frequency) and frequency > 0):
        raise ValueError(
            f"Invalid value for argument `frequency`. Expected an int > 0. "
            f"Received frequency={frequency!r}.")


def _check_sparsity(value, name):
    if not (is_number(value) and 0.0 <= value < 1.0):
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a number in [0, 1). "
            f"Received {name}={value!r}.")


def _prunes_at(step, begin_step, end_step, frequency):
    """tfmot's rule: from `begin_step` to `end_step` (-1: no end), every `frequency` steps."""
    step = int(np.asarray(step))
    in_range = step >= begin_step and (end_step < 0 or step <= end_step)
    return np.bool_(in_range and (step - begin_step) % frequency == 0)


def _flat(config):
    """A schedule's config, flat (Keras' form) or nested as tfmot's `get_config` gives it."""
    return dict(config.get("config", config)) if "class_name" in config else dict(config)


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class ConstantSparsity:
    """tfmot's `ConstantSparsity` without tfmot: `target_sparsity` at every pruning step.

    Prunes at `begin_step` and every `frequency` steps after, up to
    `end_step` (-1: no end); the sparsity is always `target_sparsity`
    (as a float32, as tfmot returns it).

    Args:
        target_sparsity: float in [0, 1).
        begin_step: int >= 0.
        end_step: int >= begin_step, or -1 (default) for no end.
        frequency: int > 0. Defaults to 100.

    Example:

    >>> schedule = ConstantSparsity(0.5, begin_step=2, frequency=3)
    >>> [bool(schedule(step)[0]) for step in range(7)]
    [False, False, True, False, False, True, False]
    """

    def __init__(self, target_sparsity, begin_step, end_step=-1, frequency=100):
        _check_sparsity(target_sparsity, "target_sparsity")
        _check_steps(begin_step, end_step, frequency, allow_open_end=True)
        self.target_sparsity = float(target_sparsity)
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, frequency

    def __call__(self, step):
        return (_prunes_at(step, self.begin_step, self.end_step, self.frequency),
                np.float32(self.target_sparsity))

    def get_config(self):
        return {"target_sparsity": self.target_sparsity, "begin_step": self.begin_step,
                "end_step": self.end_step, "frequency": self.frequency}

    @classmethod
    def from_config(cls, config):
        return cls(**_flat(config))

    def __repr__(self):
        return f"ConstantSparsity({self.get_config()})"


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class PolynomialDecay:
    """tfmot's `PolynomialDecay` without tfmot: sparsity rising from `initial_` to `final_sparsity`.

    At step `t`, with `p = clip((t - begin_step) / (end_step - begin_step),
    0, 1)`, the sparsity is `final + (initial - final) * (1 - p) ** power`,
    computed in float32 as tfmot computes it; it prunes at `begin_step`
    and every `frequency` steps after, up to `end_step`. With `end_step ==
    begin_step` the sparsity is `final_sparsity` from `begin_step` on
    (tfmot's is NaN there).

    Args:
        initial_sparsity: float in [0, 1), the sparsity at `begin_step`.
        final_sparsity: float in [0, 1), the sparsity from `end_step` on.
        begin_step: int >= 0.
        end_step: int >= begin_step.
        power: the exponent. Defaults to 3.
        frequency: int > 0. Defaults to 100.

    Example:

    >>> schedule = PolynomialDecay(0.0, 0.8, begin_step=0, end_step=10, power=1, frequency=5)
    >>> [(bool(p), round(float(s), 2)) for p, s in map(schedule, (0, 5, 10, 15))]
    [(True, 0.0), (True, 0.4), (True, 0.8), (False, 0.8)]
    """

    def __init__(self, initial_sparsity, final_sparsity, begin_step, end_step, power=3,
                 frequency=100):
        _check_sparsity(initial_sparsity, "initial_sparsity")
        _check_sparsity(final_sparsity, "final_sparsity")
        _check_steps(begin_step, end_step, frequency, allow_open_end=False)
        if not is_number(power):
            raise ValueError(
                f"Invalid value for argument `power`. Expected a number. Received power={power!r}.")
        self.initial_sparsity = float(initial_sparsity)
        self.final_sparsity = float(final_sparsity)
        self.begin_step, self.end_step = begin_step, end_step
        self.power, self.frequency = power, frequency

    def __call__(self, step):
        step = int(np.asarray(step))
        span = np.float32(self.end_step - self.begin_step)
        if span == 0:  # tfmot divides 0 by 0 here (NaN); the schedule is at its end
            p = np.float32(1.0 if step >= self.begin_step else 0.0)
        else:
            p = np.float32(step - self.begin_step) / span
        p = np.float32(min(np.float32(1.0), max(np.float32(0.0), p)))
        sparsity = (np.float32(self.initial_sparsity - self.final_sparsity)
                    * np.power(np.float32(1.0) - p, np.float32(self.power))
                    + np.float32(self.final_sparsity))
        return (_prunes_at(step, self.begin_step, self.end_step, self.frequency),
                np.float32(sparsity))

    def get_config(self):
        return {"initial_sparsity": self.initial_sparsity,
                "final_sparsity": self.final_sparsity, "power": self.power,
                "begin_step": self.begin_step, "end_step": self.end_step,
                "frequency": self.frequency}

    @classmethod
    def from_config(cls, config):
        return cls(**_flat(config))

    def __repr__(self):
        return f"PolynomialDecay({self.get_config()})"
