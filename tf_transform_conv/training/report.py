"""What a training run reports about its model and its machine, for `results.json`.

`layer_details` describes each `TransformConv2D` of the trained model (its
bases and transforms, the conversion's fitting error, how the `.tflite`
file writes it), `environment` the machine and the library versions.
"""

import os
import platform

import keras
import numpy as np

from tf_transform_conv import _compat
from tf_transform_conv.layers import TransformConv2D

__all__ = ["environment", "layer_details"]


def layer_details(model, conversion=None, lowerings=None):
    """A dict per `TransformConv2D` of `model`, nested models included, in layer order.

    Each holds the layer's `name`, `filters`, `base_filters`,
    `transform_family` and `transforms`; with `conversion` also its
    `reconstruction_error` at the conversion (None for a layer the report
    does not name), and with `lowerings` its `tflite_lowering`.

    Args:
        model: a `keras.Model`.
        conversion: the report of `transform_model`, as dicts with `name`
            and `error` (`[layer.to_dict() for layer in report]`), or None.
        lowerings: `{layer name: lowering}`, as `export_tflite`'s result
            has them (`ExportResult.lowerings`), or None.

    Returns:
        A list of dicts, JSON-ready.

    Example:

    >>> import keras
    >>> from tf_transform_conv import TransformConv2D
    >>> model = keras.Sequential([keras.Input((8, 8, 3)),
    ...                           TransformConv2D(8, 3, base_filters=2, name="tc")])
    >>> [(row["name"], row["filters"], row["base_filters"]) for row in layer_details(model)]
    [('tc', 8, 2)]
    """
    errors = {row["name"]: row["error"] for row in conversion or ()}
    details = []
    for layer in _compat.layers_of(model):
        if not isinstance(layer, TransformConv2D):
            continue
        row = {"name": layer.name, "filters": layer.filters, "base_filters": layer.base_filters,
               "transform_family": layer.transform_family, "transforms": list(layer.transforms)}
        if conversion is not None:
            row["reconstruction_error"] = errors.get(layer.name)
        if lowerings is not None:
            row["tflite_lowering"] = lowerings.get(layer.name)
        details.append(row)
    return details


def environment():
    """The machine and versions a run used: `{"machine": {...}, "versions": {...}}`.

    `machine` holds the platform string and the CPU count, `versions` those
    of Python, Keras, its backend's library and numpy.

    Example:

    >>> sorted(environment()["versions"])[:2]
    ['keras', 'numpy']
    """
    backend = keras.backend.backend()
    versions = {"python": platform.python_version(), "keras": keras.__version__,
                "numpy": np.__version__}
    if backend == "tensorflow":
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    elif backend == "jax":
        import jax

        versions["jax"] = jax.__version__
    return {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
            "versions": versions}
