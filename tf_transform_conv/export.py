"""Deployment: the model rewrites, TFLite and SavedModel export, and the check against Keras.

A `TransformConv2D` that runs its *materialised* path gathers the full kernel
from the bases and then convolves; the TFLite converter constant-folds that
gather, so the `.tflite` file would hold the full dense kernel and be as large
as the `Conv2D` model's. Before converting, `export_tflite` therefore rebuilds
the model (same weights) with every `TransformConv2D` in the form that
`lowering.lowering_choice` picks (the rule, and the grouped form itself, live
in `tf_transform_conv.lowering`):

- `"grouped"` (the default where it applies): a 1x1 product convolution with
  the bases, then a grouped convolution that spreads each base's products to
  the filters built from it. Two CONV_2D operators that the XNNPACK delegate
  runs; the spread kernel is stored sparse.
- `"slices"`: the Keras factored path, a product then shifted slices and
  additions (about 100 operators per 3x3 layer).
- `"dense"`: a `Conv2D` holding the materialised kernel, where that is
  faster and hardly larger (a stem on few channels).

The first two store only the bases. This module holds:

- the model rewrites: `deployment_model(model, lowering)` returns the model
  `export_tflite` converts and `{layer name: (form, reason)}`;
  `factored_model(model)` the Keras factored rewrite (for SavedModel);
  `float32_model(model)` the float32 twin of a mixed-precision model;
- conversion: `export_tflite(model, path, quantization=None, ...)` writes a
  float32, dynamic-range, float16 or full-integer (int8) `.tflite` file and
  returns an `ExportResult`; `export_saved_model(model, path)` the factored
  rewrite, then `model.export`;
- running and checking files with the LiteRT interpreter: `run_tflite`,
  `verify_tflite(path, model, inputs, rtol=1e-4)` (compares with
  `model(inputs)`), `tflite_op_counts`.

Conversion goes through a SavedModel (`model.export` with a static input
signature, then `tf.lite.TFLiteConverter.from_saved_model`). With Keras 3.15
and TensorFlow 2.21, `TFLiteConverter.from_concrete_functions` on a
`tf.function` wrapping the model writes a file *without* the weights (they
stay resource variables that nothing initialises): it runs, and returns NaN.
"""

import collections
import dataclasses
import math
import os
import tempfile

import keras
import numpy as np

from tf_transform_conv import _compat
from tf_transform_conv import channel_order
from tf_transform_conv import lowering as lowering_lib
from tf_transform_conv._checks import check_bool
from tf_transform_conv._checks import check_positive_int
from tf_transform_conv.layers import TransformConv2D
from tf_transform_conv.rewrite import is_graph_model
from tf_transform_conv.rewrite import rewrite_model
from tf_transform_conv.unstructured import sparse_layers

__all__ = [
    "ExportResult",
    "QUANTIZATIONS",
    "TFLiteMismatchError",
    "VerifyResult",
    "export_saved_model",
    "export_tflite",
    "deployment_model",
    "factored_model",
    "float32_model",
    "run_tflite",
    "tflite_op_counts",
    "verify_tflite",
]

QUANTIZATIONS = (None, "dynamic", "float16", "int8")

# Bytes per stored parameter, as `export_tflite` counts `param_bytes`.
_BYTES_PER_PARAM = {None: 4, "float16": 2, "dynamic": 1, "int8": 1}

class TFLiteMismatchError(ValueError, AssertionError):
    """The `.tflite` file's outputs differ from the Keras model's by more than the tolerance.

    Both a `ValueError` and an `AssertionError`, so tests may expect either.
    """


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What `export_tflite` wrote.

    Attributes:
        path: str, the `.tflite` file.
        bytes: int, its size.
        quantization: None (float32), `"dynamic"`, `"float16"` or `"int8"`.
        params: int, the model's parameters as `cost.model_cost` counts them
            (`model.count_params()` for a subclassed model).
        param_bytes: int, `params` times the bytes a weight takes in the
            file: 4 for float32, 2 for float16, 1 for dynamic-range and
            int8 (their biases stay float32 or become int32, so the file's
            weight bytes are slightly above this for them).
        batch_size: int, the static batch dimension of the file's inputs.
        op_counts: dict, operator name -> count in the file (empty when
            the interpreter could not list them).
        lowerings: dict, `TransformConv2D` name -> `"grouped"` or
            `"slices"`: how each was written (see `lowering.lowering_choice`).
        lowering_values: int, constants the lowering adds besides the
            parameters (the grouped form's spread nonzeros and its
            product convolution's zero bias), counted before the
            converter deduplicates identical ones.
    """

    path: str
    bytes: int
    quantization: str
    params: int
    param_bytes: int
    batch_size: int
    op_counts: dict = dataclasses.field(default_factory=dict)
    lowerings: dict = dataclasses.field(default_factory=dict)
    lowering_values: int = 0

    @property
    def num_ops(self):
        """The number of operators in the file."""
        return sum(self.op_counts.values())

    @property
    def overhead_bytes(self):
        """`bytes - param_bytes`: what the file spends besides the weights."""
        return self.bytes - self.param_bytes

    def to_dict(self):
        """A JSON-serialisable dict of the fields."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """How closely a `.tflite` file reproduces the Keras model (see `verify_tflite`).

    Attributes:
        max_abs_diff: float, the largest `|tflite - keras|` over all outputs.
        max_rel_diff: float, the largest `|tflite - keras| / scale`, where
            `scale` is the largest `|keras|` of that output.
        output_scale: float, the largest `|keras|` over all outputs.
        samples: int, the number of samples compared.
    """

    max_abs_diff: float
    max_rel_diff: float
    output_scale: float
    samples: int

    def to_dict(self):
        """A JSON-serialisable dict of the fields."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------
# The rewrite


def _flat_inputs(model):
    return list(model.inputs)


def _inputs_struct(model):
    struct = getattr(model, "_inputs_struct", None)
    if struct is not None:
        return struct
    inputs = _flat_inputs(model)
    return inputs[0] if len(inputs) == 1 else inputs


def _check_no_wrappers(model, verb):
    from tf_transform_conv.pruning import TransformPruning

    wrappers = [
        layer.name
        for layer in _compat.layers_of(model)
        if isinstance(layer, TransformPruning) or getattr(layer, "is_scheduled_pruning", False)
    ]
    if wrappers:
        raise ValueError(
            f"{verb} needs a stripped model: this one still holds TransformPruning "
            f"wrappers {wrappers}, whose dense kernel would be exported; strip "
            "first: tf_transform_conv.strip_model(model), then export the result."
        )


def _unknown_input_dims(model):
    """`(name, shape)` of the model inputs with an unknown non-batch dimension."""
    if not getattr(model, "inputs", None):
        return [(model.name, None)]
    return [
        (getattr(t, "name", "?"), tuple(t.shape))
        for t in _flat_inputs(model)
        if any(d is None for d in tuple(t.shape)[1:])
    ]


def _check_static_inputs(model, verb):
    if not getattr(model, "built", False) or not getattr(model, "inputs", None):
        kind = (
            f"{type(model).__name__} is a subclassed model, which has no input "
            "signature to export"
            if model.built and not is_graph_model(model)
            else "the model is not built"
        )
        raise ValueError(
            f"{verb} needs a built model with known inputs; {kind}. Build it as a "
            "Functional model, or a Sequential model starting with "
            "keras.Input((H, W, C))."
        )
    unknown = _unknown_input_dims(model)
    if unknown:
        raise ValueError(
            f"{verb} needs fully known input dimensions apart from the batch "
            f"(the factored TransformConv2D path and the TFLite file have a fixed "
            f"size). Received inputs {unknown}. Rebuild the model on "
            "keras.Input((H, W, C)) at the deployment size and copy the weights "
            "(they do not depend on the spatial size), then export that model."
        )


def _needs_rewrite(model):
    return [
        layer.name
        for layer in _compat.layers_of(model)
        if isinstance(layer, TransformConv2D) and layer.implementation_used != "factored"
    ]


def factored_model(model):
    """The model with every `TransformConv2D` on its factored path, weights unchanged.

    Each `TransformConv2D` that does not already run factored at inference
    is replaced by one with the same configuration except
    `implementation="factored"` and the same weights (a clone made with
    `tf_transform_conv.rewrite.rewrite_model`; other layers keep their
    weights too). A model with nothing to rewrite is returned as it is.

    Args:
        model: a built Sequential or Functional model with fully known input
            dimensions apart from the batch.

    Returns:
        A model computing the same function (to float32 rounding).

    Raises:
        ValueError: if the model holds `TransformPruning` wrappers (strip it
            first), has inputs of unknown size, or is not a built Functional
            or Sequential model.
    """
    _check_no_wrappers(model, "factored_model")
    _check_static_inputs(model, "factored_model")
    return _factored(model)


def _factored(model):
    """`factored_model` on a checked model."""
    pending = _needs_rewrite(model)
    if not pending:
        return model
    if not is_graph_model(model):
        raise ValueError(
            f"{type(model).__name__} is a subclassed model, whose layers cannot be "
            f"rewritten; its TransformConv2D layers {pending} would export their "
            "materialised (dense) kernel. Construct them with "
            "implementation='factored' in the model's code, or build the model "
            "as a Functional or Sequential model."
        )

    def replace(layer):
        if isinstance(layer, TransformConv2D) and layer.implementation_used != "factored":
            config = layer.get_config()
            config["implementation"] = "factored"
            return type(layer).from_config(config), layer.get_weights()
        return None

    return rewrite_model(model, replace)


def deployment_model(model, lowering="auto", keep_order=True):
    """The model as `export_tflite` converts it, and the form each `TransformConv2D` took.

    Each `TransformConv2D` is replaced by its grouped form
    (`lowering.GroupedTransformConv2D`), its factored Keras path, or a
    `keras.layers.Conv2D` holding its materialised kernel, as
    `lowering.lowering_choice(layer, lowering)` says; other layers keep their
    weights. The compact forms store only the bases (and the transforms'
    entries). The result is for conversion (the grouped form runs TensorFlow
    ops and holds its kernels as constants), not for training or `.keras`
    files.

    Args:
        model: a built Sequential or Functional model, stripped of
            `TransformPruning` wrappers, with fully known input dimensions
            apart from the batch.
        lowering: `"auto"` (default), `"grouped"`, `"slices"` or `"dense"`
            for every layer, or a dict from `TransformConv2D` names to one
            of these (layers not named: `"auto"`).
        keep_order: bool (default True): run
            `channel_order.propagate_channel_order` on the result, so that
            grouped layers keep their base-major channel order through batch
            norm, activations and residual additions (no reorder operators)
            and batch norms fold into the convolutions before them. False
            keeps every layer's filter order, for comparisons.

    Returns:
        `(deployed, choices)`: the rewritten model, and a dict from each
        rewritten `TransformConv2D`'s name to `(form, reason)` as decided
        for it (`form`: `"grouped"`, `"slices"` or `"dense"`).

    Raises:
        ValueError: as `factored_model`, for an unknown `lowering` or layer
            name, or for `"grouped"` with a layer that cannot take it.
    """
    requested = _lowering_per_layer(model, lowering)
    check_bool(keep_order, "keep_order")
    _check_no_wrappers(model, "deployment_model")
    _check_static_inputs(model, "deployment_model")
    return _deploy(model, requested, keep_order)


def _deploy(model, requested, keep_order=True):
    """`deployment_model` on a model already checked (`_check_no_wrappers`,
    `_check_static_inputs`); `requested`: `layer -> lowering`."""
    layers = [
        layer
        for layer in _compat.layers_of(model)
        if isinstance(layer, TransformConv2D)
    ]
    if not layers:
        if keep_order and channel_order.rewrites(model):
            # A clone: the pass calls the layers it leaves unchanged.
            clone = rewrite_model(model, lambda layer: None)
            return channel_order.propagate_channel_order(clone)[0], {}
        return model, {}
    if not is_graph_model(model):
        # Raises the subclassed-model error unless every layer already runs factored.
        return _factored(model), {
            layer.name: ("slices", "a subclassed model: its layers already run factored")
            for layer in layers
        }
    choices = {}

    def replace(layer):
        if not isinstance(layer, TransformConv2D):
            return None
        form, reason, plan = lowering_lib.lowering_decision(layer, requested(layer))
        choices[layer.name] = (form, reason)
        if form == "grouped":
            return lowering_lib.GroupedTransformConv2D.from_layer(layer, plan=plan), None
        if form == "dense":
            return _dense_twin(layer)
        config = layer.get_config()
        config["implementation"] = "factored"
        return type(layer).from_config(config), layer.get_weights()

    deployed = rewrite_model(model, replace)
    if keep_order:
        deployed, _ = channel_order.propagate_channel_order(deployed)
    return deployed, choices


def _dense_twin(layer):
    """A `Conv2D` holding the layer's materialised kernel, and its weights."""
    conv = keras.layers.Conv2D(
        layer.filters,
        layer.kernel_size,
        strides=layer.strides,
        padding=layer.padding,
        data_format=layer.data_format,
        dilation_rate=layer.dilation_rate,
        activation=layer.activation,
        use_bias=layer.use_bias,
        name=layer.name,
        dtype=layer.dtype_policy,
    )
    weights = [np.asarray(keras.ops.convert_to_numpy(layer.materialized_kernel()))]
    if layer.bias is not None:
        weights.append(np.asarray(keras.ops.convert_to_numpy(layer.bias)))
    return conv, weights


def float32_model(model):
    """The model with every layer computing in float32, weights unchanged.

    A mixed-precision model (`"mixed_float16"`, `"mixed_bfloat16"`) keeps
    float32 variables but computes in 16 bits; the TFLite converter has no
    builtin float16/bfloat16 convolutions and fails on it. `export_tflite`
    converts this float32 twin instead (use `quantization="float16"` for a
    file with 16-bit weights). A model already in float32 is returned as is.
    """
    if all(
        layer.compute_dtype == "float32"
        for layer in _compat.layers_of(model)
        if not isinstance(layer, keras.layers.InputLayer)
    ):
        return model
    if not is_graph_model(model):
        raise ValueError(
            f"{type(model).__name__} is a subclassed mixed-precision model, whose "
            "layers cannot be rebuilt in float32 for export. Build it under "
            "keras.config.set_dtype_policy('float32'), copy the weights, and export that."
        )

    def replace(layer):
        if isinstance(layer, (keras.layers.InputLayer, keras.Model)):
            return None
        config = layer.get_config()
        if "dtype" not in config:
            return None
        config["dtype"] = "float32"
        return layer.__class__.from_config(config), layer.get_weights()

    return rewrite_model(model, replace)


def _lowering_per_layer(model, lowering):
    """`layer -> lowering` for `deployment_model`, after checking `lowering`."""

    def check(value, where):
        if value not in lowering_lib.LOWERINGS:
            raise ValueError(
                f"Invalid value{where} for argument `lowering`. Expected one of "
                f"{list(lowering_lib.LOWERINGS)} (or a dict from layer names to these). "
                f"Received {value!r}."
            )

    if not isinstance(lowering, dict):
        check(lowering, "")
        return lambda layer: lowering
    names = {
        layer.name
        for layer in _compat.layers_of(model)
        if isinstance(layer, TransformConv2D)
    }
    unknown = sorted(set(lowering) - names)
    if unknown:
        raise ValueError(
            f"`lowering` names layers that are not TransformConv2D layers of the "
            f"model: {unknown}. Its TransformConv2D layers: {sorted(names)}."
        )
    for name, value in lowering.items():
        check(value, f" for layer {name!r}")
    return lambda layer: lowering.get(layer.name, "auto")


def _lowering_values(deployed):
    return sum(
        layer.plan.stored_values()
        for layer in _compat.layers_of(deployed)
        if isinstance(layer, lowering_lib.GroupedTransformConv2D)
    )



# ----------------------------------------------------------------------------
# TFLite


def _check_writable(path, verb):
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(
            f"{verb} writes a file; {path!r} is a directory. Pass a file path "
            "such as 'model.tflite'."
        )
    folder = os.path.dirname(os.path.abspath(path))
    _check_folder(folder, path, verb)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tfconv-write-test-"):
            pass
    except OSError as e:
        raise ValueError(
            f"{verb} cannot write {path!r}: the folder {folder!r} is not writable "
            f"({e.strerror or e}). Pick a folder you can write to."
        ) from None
    return path


def _check_folder(folder, path, verb):
    if os.path.isdir(folder):
        return
    if os.path.exists(folder):
        raise ValueError(
            f"{verb} cannot write {path!r}: {folder!r} is a file, not a folder. "
            "Pick a path inside an existing folder."
        )
    raise ValueError(
        f"{verb} cannot write {path!r}: the folder {folder!r} does not exist. "
        "Create it first (os.makedirs(folder, exist_ok=True)) or pick another path."
    )


def _input_signature(model, batch_size):
    import tensorflow as tf

    def spec(tensor):
        shape = (batch_size,) + tuple(tensor.shape)[1:]
        return tf.TensorSpec(shape, tf.as_dtype(tensor.dtype), name=getattr(tensor, "name", None))

    return [keras.tree.map_structure(spec, _inputs_struct(model))]


def _representative_dataset(model, data, batch_size):
    """A TFLite `representative_dataset` callable for `data`."""
    if callable(data):
        return data
    tensors = keras.tree.flatten(_inputs_struct(model))
    shapes = [tuple(t.shape)[1:] for t in tensors]
    if len(tensors) > 1 and isinstance(data, (dict, list, tuple)):
        arrays = keras.tree.flatten(data)
    else:
        arrays = [data]
    arrays = [np.asarray(a, np.float32) for a in arrays]
    if len(arrays) != len(shapes):
        raise ValueError(
            f"`representative_data` must hold one array per model input "
            f"({len(shapes)}), structured like the model's inputs. Received "
            f"{len(arrays)} arrays."
        )
    for a, shape in zip(arrays, shapes):
        if a.ndim != len(shape) + 1 or tuple(a.shape[1:]) != shape:
            raise ValueError(
                "`representative_data` must be sample inputs of shape "
                f"(num_samples,) + {shape}. Received an array of shape {a.shape}."
            )
    n = arrays[0].shape[0]
    if n == 0 or any(a.shape[0] != n for a in arrays):
        raise ValueError(
            "`representative_data` needs at least one sample, the same number "
            f"for every input. Received {[a.shape[0] for a in arrays]} samples."
        )

    def sample(batch):
        # Several inputs: keyed by the signature's input names, which
        # `_input_signature` sets to the Keras input names.
        return batch if len(batch) == 1 else {t.name: b for t, b in zip(tensors, batch)}

    def dataset():
        for start in range(0, n - batch_size + 1, batch_size):
            yield sample([a[start : start + batch_size] for a in arrays])
        if n < batch_size:  # fewer samples than one batch: repeat them
            reps = math.ceil(batch_size / n)
            yield sample([np.concatenate([a] * reps)[:batch_size] for a in arrays])

    return dataset


def export_tflite(
    model,
    path,
    quantization=None,
    representative_data=None,
    batch_size=1,
    factored=True,
    lowering="auto",
    keep_order=True,
):
    """Writes `model` as a `.tflite` file that stores only the base filters.

    Every `TransformConv2D` is first switched to its factored path
    (`factored_model`): the converter would otherwise constant-fold the
    materialised kernel into the file, as large as a `Conv2D` model's. The
    file has a fixed input shape, the model's with batch `batch_size`.

    Args:
        model: a built Sequential or Functional Keras model, stripped of
            `TransformPruning` wrappers, with fully known input dimensions
            apart from the batch.
        path: str or path-like, the `.tflite` file to write (its folder must
            exist and be writable; checked before converting).
        quantization: None (float32, default), `"dynamic"` (dynamic-range:
            int8 weights, float activations), `"float16"` (float16 weights,
            computed in float32) or `"int8"` (full integer: int8 weights and
            activations, calibrated on `representative_data`; the file's
            inputs and outputs stay float32, with a quantize and a dequantize
            operator at the ends, so it is called like the float file).
        representative_data: for `"int8"` only: sample inputs, an array
            `(num_samples,) + input_shape` (for several inputs, a list or
            dict of such arrays structured like the model's inputs; a few
            hundred samples is typical), or a TFLite `representative_dataset`
            callable.
        batch_size: int, the static batch dimension of the file. Defaults
            to 1.
        factored: bool, whether to rewrite `TransformConv2D`s to a compact
            form (default). False converts the model as it is, for
            comparisons (a materialised layer then stores its dense kernel).
        lowering: how each `TransformConv2D` is written (see
            `lowering.lowering_choice`): `"auto"` (default: per layer, what measured
            fastest in LiteRT among the compact forms, or the dense kernel
            for a stem where that is no larger), `"grouped"`, `"slices"`,
            `"dense"` (the materialised kernel), or a dict from layer names
            to these (layers not named: `"auto"`).
        keep_order: bool (default True): let grouped layers keep their
            base-major channel order and fold batch norms into the
            convolutions (see `deployment_model`); False restores each
            layer's filter order after it, for comparisons.

    Returns:
        An `ExportResult` (path, bytes, quantization, params, param_bytes,
        batch_size, op_counts, lowerings, lowering_values).

    Raises:
        ValueError: for an unknown `quantization` or `lowering`, `"int8"` without
            `representative_data` (or `representative_data` with another
            quantization), a `batch_size` that is not a positive int, a
            `path` that cannot be written, a model holding `TransformPruning`
            wrappers, or inputs of unknown size.

    Example:

    >>> import os, tempfile
    >>> import keras, numpy as np
    >>> from tf_transform_conv import TransformConv2D
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 16)),
    ...     TransformConv2D(32, 3, base_filters=8, transforms="rotations", name="tc")])
    >>> path = os.path.join(tempfile.mkdtemp(), "m.tflite")
    >>> result = export_tflite(model, path)
    >>> result.params, result.param_bytes  # 3*3*16*8 + 32 bias, 4 bytes each
    (1184, 4736)
    >>> result.lowerings  # a 1x1 product, then a grouped spread convolution
    {'tc': 'grouped'}
    >>> result.op_counts["CONV_2D"], result.op_counts["DENSIFY"]
    (2, 1)
    >>> x = np.random.default_rng(0).normal(size=(3, 8, 8, 16)).astype("float32")
    >>> verify_tflite(path, model, x).max_rel_diff < 1e-4
    True
    """
    import tensorflow as tf

    verb = "export_tflite"
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            "Invalid value for argument `quantization`. Expected one of "
            f"{list(QUANTIZATIONS)}. Received quantization={quantization!r}."
        )
    if quantization == "int8" and representative_data is None:
        raise ValueError(
            "quantization='int8' (full integer) calibrates the activation ranges "
            "on sample inputs: pass representative_data= (an array of a few "
            "hundred inputs, shape (num_samples,) + input_shape), or use "
            "quantization='dynamic', which needs none."
        )
    if quantization != "int8" and representative_data is not None:
        raise ValueError(
            "`representative_data` is used only with quantization='int8'. "
            f"Received quantization={quantization!r}."
        )
    batch_size = check_positive_int(batch_size, "batch_size")
    check_bool(keep_order, "keep_order")
    path = _check_writable(path, verb)
    _check_no_wrappers(model, verb)
    _check_static_inputs(model, verb)
    params = _count_params(model)
    deployed = float32_model(model)
    lowerings = {}
    if factored:
        # `model` was checked above; its float32 twin has the same layers and inputs.
        deployed, choices = _deploy(
            deployed, _lowering_per_layer(deployed, lowering), keep_order)
        lowerings = {name: form for name, (form, _) in choices.items()}
    dataset = (
        _representative_dataset(model, representative_data, batch_size)
        if quantization == "int8"
        else None
    )

    with tempfile.TemporaryDirectory(prefix="tfconv-export-") as tmp:
        saved = os.path.join(tmp, "saved_model")
        deployed.export(
            saved, input_signature=_input_signature(deployed, batch_size), verbose=False
        )
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        optimizations = []
        if quantization is not None:
            optimizations.append(tf.lite.Optimize.DEFAULT)
        if quantization != "dynamic" and ("grouped" in lowerings.values()
                                          or sparse_layers(model)):
            # The grouped form's spread kernels are 1 - 1/(kh*kw) zeros:
            # stored sparse, densified once when the interpreter is prepared.
            # (Not with dynamic-range weights: XNNPACK then fails to prepare
            # the densified hybrid convolution, TF 2.21.) Likewise kernels
            # that are mostly zeros (unstructured pruning).
            optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
        converter.optimizations = optimizations
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        elif quantization == "int8":
            converter.representative_dataset = dataset
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        flatbuffer = converter.convert()

    with open(path, "wb") as f:
        f.write(flatbuffer)
    return ExportResult(
        path=path,
        bytes=len(flatbuffer),
        quantization=quantization,
        params=params,
        param_bytes=params * _BYTES_PER_PARAM[quantization],
        batch_size=batch_size,
        op_counts=tflite_op_counts(flatbuffer),
        lowerings=lowerings,
        lowering_values=_lowering_values(deployed),
    )


def _count_params(model):
    from tf_transform_conv.cost import model_cost

    try:
        return int(model_cost(model).params)
    except ValueError:
        return int(model.count_params())


def _read_flatbuffer(path, verb):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(
            f"{verb}: no such file: {path!r}. Pass the path export_tflite wrote."
        )
    with open(path, "rb") as f:
        content = f.read()
    if len(content) < 8 or content[4:8] != b"TFL3":
        raise ValueError(
            f"{verb}: {path!r} is not a TFLite flatbuffer (bytes 4:8 are "
            f"{content[4:8]!r}, expected the identifier b'TFL3'). Pass a .tflite "
            "file written by export_tflite (or tf.lite.TFLiteConverter)."
        )
    return content


def _interpreter(content, num_threads=None, delegates=True):
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_litert.interpreter import OpResolverType

    kwargs = {"model_content": content, "num_threads": num_threads}
    if not delegates:
        kwargs["experimental_op_resolver_type"] = (
            OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    return Interpreter(**kwargs)


def tflite_op_counts(flatbuffer):
    """Operator name -> count in a `.tflite` file (bytes or path), before delegation.

    Returns an empty dict when the interpreter cannot list the operators.
    """
    if not isinstance(flatbuffer, (bytes, bytearray)):
        flatbuffer = _read_flatbuffer(flatbuffer, "tflite_op_counts")
    try:
        interpreter = _interpreter(bytes(flatbuffer), delegates=False)
        interpreter.allocate_tensors()
        details = interpreter._get_ops_details()
    except Exception:  # a private API: leave the counts out rather than fail
        return {}
    return dict(collections.Counter(op["op_name"] for op in details))


def _signature_order(names, prefix):
    """Signature names in output (or input) order.

    `prefix`, `prefix_1`, `prefix_2`, ... (how TensorFlow names positional
    arguments and outputs) by their index; other names sorted, as
    `keras.tree.flatten` orders a dict.
    """

    def index(name):
        if name == prefix:
            return 0
        tail = name[len(prefix) + 1 :] if name.startswith(prefix + "_") else ""
        return int(tail) if tail.isdigit() else None

    keys = [index(n) for n in names]
    if any(k is None for k in keys):
        return sorted(names)
    return [n for _, n in sorted(zip(keys, names))]


def _quantize(x, detail):
    scale, zero = detail["quantization"]
    if detail["dtype"] in (np.int8, np.uint8, np.int16) and scale:
        info = np.iinfo(detail["dtype"])
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(detail["dtype"])
    return x.astype(detail["dtype"])


def _dequantize(y, detail):
    scale, zero = detail["quantization"]
    if detail["dtype"] in (np.int8, np.uint8, np.int16) and scale:
        return (y.astype(np.float32) - zero) * scale
    return y.astype(np.float32)


def run_tflite(path, inputs, num_threads=None):
    """Runs a `.tflite` file on `inputs`, looping over the batch when the file's is smaller.

    A last batch smaller than the file's is padded with zeros (and those
    outputs dropped). Integer inputs and outputs (a file converted with
    int8 input/output types) are quantized and dequantized with the file's
    parameters; files from `export_tflite` take float32.

    Args:
        path: the `.tflite` file.
        inputs: an array (a file with one input), or a dict of arrays keyed
            by the file's input names (for files from `export_tflite`, the
            names of the model's `keras.Input`s), or a list of arrays in the
            file's signature order; every array with the same number of
            samples.
        num_threads: interpreter threads (None: the interpreter's default).

    Returns:
        A list of float32 arrays, one per output, in the model's (flattened)
        output order.

    Raises:
        ValueError: for a missing or non-TFLite file, and inputs that do not
            fit the file's.
    """
    content = _read_flatbuffer(path, "run_tflite")
    interpreter = _interpreter(content, num_threads=num_threads)
    signatures = interpreter.get_signature_list()
    if signatures:
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        in_names = _signature_order(list(runner.get_input_details()), "args_0")
        out_names = _signature_order(list(runner.get_output_details()), "output")
        in_details = [runner.get_input_details()[n] for n in in_names]
        out_details = [runner.get_output_details()[n] for n in out_names]

        def invoke(batch):
            result = runner(**dict(zip(in_names, batch)))
            return [result[n] for n in out_names]
    else:
        interpreter.allocate_tensors()
        in_details = interpreter.get_input_details()
        out_details = interpreter.get_output_details()
        in_names = [d["name"] for d in in_details]

        def invoke(batch):
            for detail, x in zip(in_details, batch):
                interpreter.set_tensor(detail["index"], x)
            interpreter.invoke()
            return [interpreter.get_tensor(d["index"]) for d in out_details]

    if isinstance(inputs, dict):
        if set(inputs) != set(in_names):
            raise ValueError(
                f"The file's inputs are named {sorted(in_names)}; received a dict "
                f"with keys {sorted(inputs)}."
            )
        arrays = [np.asarray(inputs[name]) for name in in_names]
    else:
        arrays = [np.asarray(a) for a in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
        if len(arrays) != len(in_details):
            raise ValueError(
                f"The file has {len(in_details)} inputs {in_names}; received "
                f"{len(arrays)} arrays."
            )
        if len(arrays) > 1 and not all(n.startswith("args_0") for n in in_names):
            raise ValueError(
                f"The file has several named inputs {in_names}: pass a dict of "
                "arrays keyed by these names (verify_tflite does this from the model)."
            )
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError(
            "Every input needs the same number of samples. Received "
            f"{[a.shape[0] for a in arrays]}."
        )
    file_batch = int(in_details[0]["shape"][0])
    for name, detail, a in zip(in_names, in_details, arrays):
        expected = tuple(int(d) for d in detail["shape"][1:])
        if expected != tuple(a.shape[1:]):
            raise ValueError(
                f"The file's input {name!r} has shape (batch,) + {expected}; "
                f"received an array of shape {a.shape}."
            )
    outputs = [[] for _ in out_details]
    for start in range(0, n, file_batch):
        batch = [a[start : start + file_batch] for a in arrays]
        short = file_batch - batch[0].shape[0]
        if short:
            batch = [np.concatenate([b, np.zeros((short,) + b.shape[1:], b.dtype)]) for b in batch]
        batch = [_quantize(np.asarray(b, np.float32), d) for b, d in zip(batch, in_details)]
        for i, (y, detail) in enumerate(zip(invoke(batch), out_details)):
            y = _dequantize(np.asarray(y), detail)
            outputs[i].append(y[: file_batch - short])
    return [np.concatenate(parts) for parts in outputs]


def _named_inputs(model, inputs):
    """`inputs` (structured like the model's inputs) as a dict keyed by input names."""
    tensors = keras.tree.flatten(_inputs_struct(model))
    if len(tensors) == 1 and not isinstance(inputs, (dict, list, tuple)):
        return {tensors[0].name: inputs}
    arrays = keras.tree.flatten(inputs)
    if len(arrays) != len(tensors):
        raise ValueError(
            f"The model has {len(tensors)} inputs; received {len(arrays)} arrays."
        )
    return {t.name: a for t, a in zip(tensors, arrays)}


def verify_tflite(path, model, inputs, rtol=1e-4, num_threads=None):
    """Checks that a `.tflite` file computes what the Keras model computes.

    Runs the file with the LiteRT interpreter on `inputs` (looping over the
    samples when the file's batch is smaller) and compares with
    `model(inputs, training=False)`, output by output. The difference that
    counts is relative to the output's scale: `max|tflite - keras| /
    max|keras|`. Float32 files agree to about 1e-6; float16 weights give
    about 1e-3; for dynamic-range and int8 files pass a looser `rtol`
    (or `float("inf")`, to only measure) or compare accuracy on real data.

    Args:
        path: the `.tflite` file.
        model: the Keras model it was exported from.
        inputs: what `model` takes: an array (one input), or a list or dict
            of arrays structured like the model's inputs.
        rtol: float, the largest relative difference accepted. Defaults to
            `1e-4` (float32).
        num_threads: interpreter threads (None: the interpreter's default).

    Returns:
        A `VerifyResult` (max_abs_diff, max_rel_diff, output_scale, samples).

    Raises:
        ValueError: if `path` is missing or not a TFLite flatbuffer (its
            bytes 4:8 are not `b"TFL3"`), or the inputs do not fit the file.
        TFLiteMismatchError: (a `ValueError` and an `AssertionError`) if
            the relative difference exceeds `rtol`, or is NaN.
    """
    content = _read_flatbuffer(path, "verify_tflite")
    signatures = _interpreter(content).get_signature_list()
    names = next(iter(signatures.values()))["inputs"] if signatures else []
    feed = inputs
    if len(names) > 1 and not all(n.startswith("args_0") for n in names):
        feed = _named_inputs(model, inputs)  # files from export_tflite
    got = run_tflite(path, feed, num_threads=num_threads)
    reference = model(inputs, training=False)
    reference = [np.asarray(keras.ops.convert_to_numpy(r), np.float32)
                 for r in keras.tree.flatten(reference)]
    if len(got) != len(reference) or any(g.shape != r.shape for g, r in zip(got, reference)):
        raise ValueError(
            "The file's outputs do not match the model's: file "
            f"{[g.shape for g in got]}, model {[r.shape for r in reference]}. "
            "Was the file exported from this model?"
        )
    max_abs, max_rel, scale_all = 0.0, 0.0, 0.0
    for g, r in zip(got, reference):
        diff = float(np.max(np.abs(g - r))) if g.size else 0.0
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        rel = diff / scale if scale > 0 else diff
        if math.isnan(diff):
            max_abs = max_rel = float("nan")
        elif not math.isnan(max_abs):
            max_abs, max_rel = max(max_abs, diff), max(max_rel, rel)
        scale_all = max(scale_all, scale)
    result = VerifyResult(max_abs, max_rel, scale_all, int(got[0].shape[0]) if got else 0)
    if not max_rel <= rtol:
        raise TFLiteMismatchError(
            f"The TFLite file {os.fspath(path)!r} differs from the Keras model: "
            f"max abs diff {max_abs:.3g}, max diff relative to the output scale "
            f"{max_rel:.3g} (output scale {scale_all:.3g}) > rtol={rtol:g}, over "
            f"{result.samples} samples. For a quantized file pass a looser rtol "
            "or compare accuracy on real data."
        )
    return result


# ----------------------------------------------------------------------------
# SavedModel


def export_saved_model(model, path):
    """Writes `model` as a TensorFlow SavedModel with factored `TransformConv2D`s.

    A thin wrapper: `factored_model(model).export(path)`. The SavedModel
    stores the variables (the bases) either way; the rewrite makes the
    serving graph run the factored path. Its `serve` endpoint takes a batch
    of any size. A model whose inputs have an unknown spatial size is
    exported as it is (its `TransformConv2D`s then run the path they chose
    at build, materialised for unknown sizes).

    Args:
        model: a built Sequential or Functional Keras model, stripped of
            `TransformPruning` wrappers.
        path: the SavedModel directory to write.

    Returns:
        `path`.

    Raises:
        ValueError: if the model holds `TransformPruning` wrappers, or
            `path`'s parent folder is missing or not writable.

    Load and serve it with `tf.saved_model.load(path).serve(x)`.
    """
    verb = "export_saved_model"
    path = os.fspath(path)
    _check_folder(os.path.dirname(os.path.abspath(path)), path, verb)
    _check_no_wrappers(model, verb)
    deployed = model if _unknown_input_dims(model) else factored_model(model)
    deployed.export(path, verbose=False)
    return path
