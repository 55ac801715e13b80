"""TFLite export: `export_tflite` writes a `.tflite` file that stores only the bases.

A `TransformConv2D` that runs its *materialised* path gathers the full kernel
from the bases and then convolves; the TFLite converter constant-folds that
gather, so the `.tflite` file would hold the full dense kernel and be as large
as the `Conv2D` model's. Before converting, `export_tflite` therefore rebuilds
the model (same weights) with every `TransformConv2D` in the form that
`lowering.lowering_choice` picks (`export.deploy.deployment_model`):

- `"grouped"` (the default where it applies): a 1x1 product convolution with
  the bases, then a grouped convolution that spreads each base's products to
  the filters built from it (`export.grouped`). Two CONV_2D operators that
  the XNNPACK delegate runs; the spread kernel is stored sparse.
- `"slices"`: the Keras factored path, a product then shifted slices and
  additions (about 100 operators per 3x3 layer).
- `"dense"`: a `Conv2D` holding the materialised kernel, where that is
  faster and hardly larger (a stem on few channels).

The first two store only the bases. `export_tflite(model, path,
quantization=None, ...)` writes a float32, dynamic-range, float16 or
full-integer (int8) file and returns an `ExportResult`; a model with mostly
zero weights (`sparse_layers`) is written in TFLite's sparse encoding.

Conversion goes through a SavedModel (`model.export` with a static input
signature, then `tf.lite.TFLiteConverter.from_saved_model`). With Keras 3.15
and TensorFlow 2.21, `TFLiteConverter.from_concrete_functions` on a
`tf.function` wrapping the model writes a file *without* the weights (they
stay resource variables that nothing initialises): it runs, and returns NaN.
"""

import dataclasses
import math
import os
import tempfile
import warnings

import keras
import numpy as np

from tf_transform_conv import _compat
from tf_transform_conv._checks import check_bool
from tf_transform_conv._checks import check_positive_int
from tf_transform_conv.cost import model_cost
from tf_transform_conv.export.checks import check_no_wrappers
from tf_transform_conv.export.checks import check_static_inputs
from tf_transform_conv.export.checks import check_writable
from tf_transform_conv.export.checks import inputs_struct
from tf_transform_conv.export.deploy import deploy
from tf_transform_conv.export.deploy import float32_model
from tf_transform_conv.export.deploy import lowering_per_layer
from tf_transform_conv.export.deploy import lowering_values
from tf_transform_conv.export.deploy import sparse_dense_as_convolutions
from tf_transform_conv.export.file_bytes import QUANTIZATIONS
from tf_transform_conv.export.file_bytes import SPARSE_MIN_ZEROS
from tf_transform_conv.export.file_bytes import sparse_encoding_saving
from tf_transform_conv.export.grouped import GroupedTransformConv2D
from tf_transform_conv.export.interpreter import tflite_op_counts
from tf_transform_conv.export.product_scales import collapse_equal_scales
from tf_transform_conv.export.product_scales import per_tensor_products
from tf_transform_conv.export.sparse_scales import drop_sparse_input_scales
from tf_transform_conv.layers.filter_basis_conv import FilterBasisConv2D
from tf_transform_conv.layers.filter_basis_transform_conv import FilterBasisTransformConv2D

__all__ = ["ExportResult", "QUANTIZATIONS", "SPARSE_FRACTION", "export_tflite", "sparse_layers"]

# Bytes per stored parameter, as `export_tflite` counts `param_bytes`.
_BYTES_PER_PARAM = {None: 4, "float16": 2, "dynamic": 1, "int8": 1}


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
        lowerings: dict, `TransformConv2D` name -> `"grouped"`, `"slices"`
            or `"dense"`: how each was written (see
            `lowering.lowering_choice`).
        lowering_values: int, constants the lowering adds besides the
            parameters (the grouped form's spread nonzeros and its
            product convolution's zero bias), counted before the
            converter deduplicates identical ones.
        lowering_bytes: dict, layer name -> {form: bytes}: what each form
            the export weighed for the layer was predicted to add to a file
            of this quantization (`export.file_bytes`), the written form and
            `"dense"` among them; `FilterBasisConv2D` layers too (forms
            `"basis"` and `"dense"`).
        larger_than_dense: tuple of the layer names written in a form
            predicted larger in this file than their dense form (only
            where `lowering` asked for that form; `export_tflite` then
            warns).
        sparse_encoding: bool, whether the file stores its sparse kernels
            in TFLite's sparse encoding (where that saves bytes in this
            quantization; never for dynamic range).
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
    lowering_bytes: dict = dataclasses.field(default_factory=dict)
    larger_than_dense: tuple = ()
    sparse_encoding: bool = False

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


def _input_signature(model, batch_size):
    import tensorflow as tf

    def spec(tensor):
        shape = (batch_size,) + tuple(tensor.shape)[1:]
        return tf.TensorSpec(shape, tf.as_dtype(tensor.dtype), name=getattr(tensor, "name", None))

    return [keras.tree.map_structure(spec, inputs_struct(model))]


def _representative_dataset(model, data, batch_size):
    """A TFLite `representative_dataset` callable for `data`."""
    if callable(data):
        return data
    tensors = keras.tree.flatten(inputs_struct(model))
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

    Every `TransformConv2D` is first rewritten in the form `lowering` picks
    (`export.deploy.deployment_model`: grouped, slices or, where that is no
    larger, dense): the converter would otherwise constant-fold the
    materialised kernel into the file, as large as a `Conv2D` model's. The
    file has a fixed input shape, the model's with batch `batch_size`.

    Args:
        model: a built Sequential or Functional Keras model, stripped of
            pruning wrappers (`strip_model`), with fully known input
            dimensions apart from the batch.
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
            `path` that cannot be written, a model holding pruning wrappers
            (any `PruningWrapper`), or inputs of unknown size.

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
    >>> from tf_transform_conv.export import verify_tflite
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
    path = check_writable(path, verb)
    check_no_wrappers(model, verb)
    check_static_inputs(model, verb)
    params = _count_params(model)
    deployed = float32_model(model)
    decisions = {}
    if factored:
        # `model` was checked above; its float32 twin has the same layers and inputs.
        deployed, decisions = deploy(
            deployed, lowering_per_layer(deployed, lowering), keep_order, quantization)
    lowerings = {name: d.form for name, d in decisions.items()}
    larger = tuple(
        name for name, d in decisions.items()
        if d.form != "dense" and d.form_bytes.get(d.form, 0) > d.form_bytes.get("dense", math.inf)
    )
    if larger:
        kind = "float32" if quantization is None else quantization
        warnings.warn(
            f"export_tflite: in this {kind} file the forms asked for layers "
            + ", ".join(f"{name!r} ({decisions[name].form}: "
                        f"{decisions[name].form_bytes[decisions[name].form]:,} bytes against "
                        f"{decisions[name].form_bytes['dense']:,} dense)" for name in larger)
            + " are predicted larger than the dense form; lowering='auto' writes a "
            "layer compact only where that is smaller.",
            stacklevel=2,
        )
    sparse = (quantization != "dynamic" and sparse_encoding_saving(
        _compat.layers_of(deployed), quantization) > 0)
    if sparse and quantization == "int8":
        # XNNPACK cannot prepare an int8 FULLY_CONNECTED with a densified kernel.
        deployed, _ = sparse_dense_as_convolutions(deployed, SPARSE_MIN_ZEROS)
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
        if sparse:
            # The grouped form's spread kernels are 1 - 1/(kh*kw) zeros:
            # stored sparse, densified once when the interpreter is prepared,
            # where that saves bytes (`file_bytes.sparse_encoding_saving`:
            # an int8 kernel half zeros is larger sparse). Not with
            # dynamic-range weights: XNNPACK then fails to prepare the
            # densified hybrid convolution, TF 2.21.
            optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
        converter.optimizations = optimizations
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        elif quantization == "int8":
            converter.representative_dataset = dataset
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        flatbuffer = converter.convert()
    if sparse and quantization == "int8":
        # The sparse constants' scales are written twice: drop the copy
        # DENSIFY does not read (`export.sparse_scales`).
        flatbuffer, _ = drop_sparse_input_scales(flatbuffer)
    if quantization == "int8":
        # One scale per product kernel instead of one per channel, and per
        # normalized spread kernel (`export.product_scales`).
        flatbuffer, _ = per_tensor_products(flatbuffer, _product_kernels(deployed))
        flatbuffer, _ = collapse_equal_scales(flatbuffer)

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
        lowering_values=lowering_values(deployed),
        lowering_bytes={name: dict(d.form_bytes) for name, d in decisions.items()},
        larger_than_dense=larger,
        sparse_encoding=sparse,
    )


def _product_kernels(model):
    """The product kernels of the grouped layers in `model` (a deployment model)."""
    kernels = []
    for layer in _compat.layers_of(model):
        if isinstance(layer, GroupedTransformConv2D):
            kernels.extend(layer.plan.product_kernels())
    return kernels


def _count_params(model):
    try:
        return int(model_cost(model).params)
    except ValueError:
        return int(model.count_params())


#: `export_tflite` writes the sparse encoding when a layer's main weight has this share of zeros.
SPARSE_FRACTION = 0.5


def sparse_layers(model, fraction=SPARSE_FRACTION):
    """The names of the layers whose main weight is at least `fraction` zeros.

    The main weight is the kernel of a `Conv2D`, `DepthwiseConv2D` or
    `Dense`, the coefficients of a `FilterBasisConv2D` and those of a
    `FilterBasisTransformConv2D` (its `base_kernel`). `export_tflite`
    stores a model with any such layer in TFLite's sparse encoding.

    Args:
        model: a Keras model.
        fraction: float in (0, 1]. Defaults to 0.5.

    Returns:
        A list of layer names.
    """
    found = []
    for layer in _compat.layers_of(model):
        if isinstance(layer, FilterBasisConv2D) and layer.built:
            weight = layer.coefficients
        elif isinstance(layer, FilterBasisTransformConv2D) and layer.built:
            weight = layer.base_kernel
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                                keras.layers.Dense)) and layer.built:
            weight = layer.kernel
        else:
            continue
        values = np.asarray(weight)
        if values.size and np.mean(values == 0) >= fraction:
            found.append(layer.name)
    return found
