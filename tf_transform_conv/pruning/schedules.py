"""Pruning schedules: the contract, checking, saving, and the scaled schedule of budgets.

A schedule is any callable `schedule(step) -> (should_prune, sparsity)`:
tensorflow-model-optimization's `PolynomialDecay` and `ConstantSparsity` as
they are, a function, or an object with `__call__(self, step)` (as tfmot's
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

from tf_transform_conv._checks import is_number

__all__ = [
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
