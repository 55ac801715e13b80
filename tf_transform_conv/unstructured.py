"""Unstructured magnitude pruning for Keras 3: standard (SP) and interspace (IP).

`MagnitudePruning` wraps a `Conv2D`, `Dense` or `DepthwiseConv2D` and zeroes
its smallest-magnitude kernel entries as tfmot's `prune_low_magnitude` does:
at every step where the schedule says to prune, the layer keeps the
`max(round(size * (1 - s)), 1)` largest `|w|` entries (ties at the threshold
kept), so its sparsity is the schedule's `s`; the layer computes with
`kernel * mask`, and the masked kernel is written back after every step, so
pruned weights stay zero whatever the optimizer does.

`InterspacePruning` (Wimmer, Mehnert, Condurache, "Interspace Pruning: Using
Adaptive Filter Representations to Improve Training of Sparse CNNs", CVPR
2022) wraps a `Conv2D` and writes every `kh x kw` filter in a trainable
*filter basis* `F` of `kh * kw` filters:

    W[:, :, c, o] = sum_j C[j, c, o] * F_j

(one basis per layer, or one per depth group of input channels). The
coefficients `C` are pruned by magnitude under the schedule, and the basis
and the surviving coefficients train together. The basis starts as the
standard basis (`C = W`, so IP starts exactly as SP) or as the orthonormal
2-D DCT. `strip_model` turns it into a `FilterBasisConv2D`, which keeps the
basis and the sparse coefficients and runs as a depthwise convolution of
every input channel with the basis filters followed by a convolution with
the coefficients that sums over channels and basis filters; `export_tflite`
stores those coefficients in TFLite's sparse encoding.

`InterspacePruning` also wraps a `TransformConv2D`, whose *bases* then live
in the filter basis (both savings stack); it strips to a
`FilterBasisTransformConv2D`, which `export_tflite` writes as the layer's
grouped form with the sparse coefficients in its product convolution and a
grouped 1x1 convolution with the basis after it.

Both wrappers are driven by the package's step callback
(`UpdateTransformPruningStep`, or `update_pruning_step` in a custom loop) and
schedules (tfmot's `PolynomialDecay` / `ConstantSparsity` as they are),
summarised by `TransformPruningSummaries` and stripped by `strip_model`.
"""

import keras
import numpy as np
from keras import ops

from tf_transform_conv import _compat
from tf_transform_conv._checks import check_choice
from tf_transform_conv._checks import check_positive_int
from tf_transform_conv.layers import TransformConv2D
from tf_transform_conv.pruning import _evaluate_schedule
from tf_transform_conv.pruning import check_schedule
from tf_transform_conv.pruning import check_step_callback
from tf_transform_conv.pruning import deserialize_schedule
from tf_transform_conv.pruning import serialize_schedule
from tf_transform_conv.rewrite import check_graph_model
from tf_transform_conv.rewrite import rewrite_model
from tf_transform_conv.rewrite import select_layers

__all__ = [
    "FilterBasisConv2D",
    "FilterBasisTransformConv2D",
    "InterspacePruning",
    "MagnitudePruning",
    "dct_basis",
    "magnitude_mask",
    "prune_interspace",
    "prune_low_magnitude",
    "sparse_layers",
]

BASES = ("standard", "dct")


# ----------------------------------------------------------------------------
# The arithmetic, free of Keras


def magnitude_mask(scores, sparsity):
    """The mask of tfmot's magnitude pruning: the largest `scores` kept to reach `sparsity`.

    Keeps `k = max(round(size * (1 - sparsity)), 1)` entries: every entry
    whose score is at least the `k`-th largest (so ties at the threshold
    are all kept, as in tfmot's `pruning_impl`).

    Args:
        scores: array of non-negative saliencies (`|w|`).
        sparsity: float in [0, 1).

    Returns:
        A float32 array of 0 and 1, shaped like `scores`.

    Example:

    >>> magnitude_mask(np.array([0.1, -3.0, 2.0, 0.5]) ** 2, 0.5)
    array([0., 1., 1., 0.], dtype=float32)
    """
    scores = np.asarray(scores, np.float32)
    k = max(int(np.round(np.float32(scores.size) * np.float32(1.0 - sparsity))), 1)
    k = min(k, scores.size)
    threshold = np.partition(scores.ravel(), scores.size - k)[scores.size - k]
    return (scores >= threshold).astype("float32")


def dct_basis(kernel_size):
    """The orthonormal 2-D DCT-II basis of `kh x kw` filters, `(kh * kw, kh * kw)`.

    Row `j` is basis filter `F_j` flattened in row-major `(h, w)` order;
    rows are orthonormal, so `C = F @ w` and `w = F.T @ C` for a flattened
    filter `w`.

    Example:

    >>> f = dct_basis((3, 3))
    >>> bool(np.allclose(f @ f.T, np.eye(9), atol=1e-6))
    True
    """
    def one(n):
        k, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        d = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
        d[0] /= np.sqrt(2.0)
        return d

    kh, kw = kernel_size
    return np.kron(one(kh), one(kw)).astype("float32")


def _initial_basis(basis, kernel_size):
    taps = kernel_size[0] * kernel_size[1]
    return np.eye(taps, dtype="float32") if basis == "standard" else dct_basis(kernel_size)


# ----------------------------------------------------------------------------
# The wrappers


def _check_basis(basis):
    check_choice(basis, "basis", BASES)


def sp_skip_reason(layer):
    """Why `MagnitudePruning` cannot wrap `layer` ("" when it can)."""
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                          keras.layers.Dense)):
        if getattr(layer, "quantization_mode", None):
            return f"quantized layer ({layer.quantization_mode})"
        return ""
    return "not a Conv2D, DepthwiseConv2D or Dense"


def ip_skip_reason(layer):
    """Why `InterspacePruning` cannot wrap `layer` ("" when it can)."""
    if isinstance(layer, FilterBasisTransformConv2D):
        return "its bases are already in a filter basis"
    if isinstance(layer, TransformConv2D):
        if tuple(layer.kernel_size) == (1, 1):
            return "1x1 kernel: its filter basis is one number"
        return ""
    if not isinstance(layer, keras.layers.Conv2D):
        return "not a Conv2D or TransformConv2D"
    if layer.groups != 1:
        return f"grouped convolution (groups={layer.groups}): not supported"
    if tuple(layer.kernel_size) == (1, 1):
        return "1x1 kernel: its filter basis is one number (use MagnitudePruning)"
    return sp_skip_reason(layer)


class _ScheduledMagnitudePruning(keras.layers.Wrapper):
    """What the two wrappers share: the schedule, the step, the mask and its update.

    The step callbacks of `tf_transform_conv.pruning` drive any layer with
    `is_scheduled_pruning = True` through `prune_to(sparsity, step)` and
    `apply_mask()`; `strip_model` calls `strip()`.
    """

    is_scheduled_pruning = True
    allocation = "per_layer"  # how the step callbacks prune it
    criterion = "magnitude"

    def __init__(self, layer, schedule, **kwargs):
        super().__init__(layer, **kwargs)
        if isinstance(schedule, dict):
            schedule = deserialize_schedule(schedule)
        check_schedule(schedule)
        self.schedule = schedule
        self.step_callback_attached = False
        self.pruning_history = []  # {"step", "sparsity"} per pruning step

    @property
    def pruned_weight(self):
        """The variable the mask applies to: the kernel (a `TransformConv2D`'s bases)."""
        if isinstance(self.layer, TransformConv2D):
            return self.layer.base_kernel
        return self.layer.kernel

    def _build_state(self, shape):
        self.pruning_step = self.add_weight(
            name="pruning_step", shape=(), dtype="int64", initializer="zeros",
            trainable=False,
        )
        self.pruning_step.assign(-1)
        self.mask = self.add_weight(
            name="mask", shape=shape, initializer="ones", trainable=False,
            dtype=self.pruned_weight.dtype,
        )
        # The optimizer applies a variable's constraint after each update,
        # inside the compiled step: pruned entries stay exactly zero.
        kernel = self.pruned_weight
        inner = kernel.constraint
        mask = self.mask

        def keep_pruned_zero(value):
            value = inner(value) if inner is not None else value
            return value * ops.cast(mask, value.dtype)

        kernel.constraint = keep_pruned_zero

    @property
    def sparsity(self):
        """The fraction of pruned entries (zeros of the mask)."""
        return float(np.mean(np.asarray(self.mask) == 0))

    def _scores(self):
        return np.abs(np.asarray(self.pruned_weight) * np.asarray(self.mask))

    def update(self, step, scores=None):
        """Runs the schedule at `step`; prunes when it says so. Returns whether it pruned."""
        should_prune, sparsity = _evaluate_schedule(self.schedule, step)
        if should_prune:
            self.prune_to(sparsity, step)
        self.apply_mask()
        self.pruning_step.assign(step)
        return should_prune

    def prune_to(self, sparsity, step=None, scores=None):
        """Keeps the largest-magnitude entries so that `sparsity` of them are zero."""
        mask = magnitude_mask(self._scores(), sparsity)
        self.mask.assign(mask)
        self.apply_mask()
        self.pruning_history.append({"step": step, "sparsity": float(sparsity)})

    def apply_mask(self):
        """Writes `kernel * mask` back into the kernel (pruned entries stay zero)."""
        kernel = self.pruned_weight
        kernel.assign(ops.cast(kernel * self.mask, kernel.dtype))

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config["schedule"] = serialize_schedule(self.schedule)
        return config


def _finish(layer, y):
    """The bias and activation of `layer` on its pre-bias output `y`."""
    if layer.use_bias:
        bias = ops.cast(layer.bias, y.dtype)
        if getattr(layer, "data_format", "channels_last") == "channels_first":
            bias = ops.reshape(bias, (1, -1, 1, 1))
        y = y + bias
    if layer.activation is not None:
        y = layer.activation(y)
    return y


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class MagnitudePruning(_ScheduledMagnitudePruning):
    """Standard unstructured magnitude pruning of a `Conv2D`, `DepthwiseConv2D` or `Dense`.

    The Keras 3 counterpart of tfmot's `prune_low_magnitude` wrapper: the
    layer computes with `kernel * mask`; at each step where the schedule
    says to prune (driven by `UpdateTransformPruningStep`), the mask keeps
    the `max(round(size * (1 - s)), 1)` largest-magnitude kernel entries
    (`magnitude_mask`), so the layer's sparsity is the schedule's `s`; after
    every step the masked kernel is written back, so pruned weights stay
    zero through training. The step and the mask are non-trainable weights,
    saved with the model. Biases are not pruned.

    Args:
        layer: the `keras.layers.Conv2D` (any groups), `DepthwiseConv2D` or
            `Dense` to wrap.
        schedule: a callable `schedule(step) -> (should_prune, sparsity)`:
            tfmot's `PolynomialDecay` and `ConstantSparsity` as they are, a
            function, or an object with `__call__`.
        **kwargs: base layer arguments.

    Raises:
        ValueError: for another layer type or an invalid schedule.

    Example:

    >>> import keras, numpy as np
    >>> import tf_transform_conv as tc
    >>> dense = keras.layers.Dense(4, name="fc")
    >>> wrapper = tc.MagnitudePruning(dense, lambda step: (True, 0.75))
    >>> model = keras.Sequential([keras.Input((8,)), wrapper])
    >>> tc.update_pruning_step(model, 0)
    ['magnitude_pruning_fc']
    >>> wrapper.sparsity
    0.75
    """

    def __init__(self, layer, schedule, **kwargs):
        reason = sp_skip_reason(layer)
        if reason:
            raise ValueError(
                f"MagnitudePruning cannot wrap {type(layer).__name__} '{layer.name}': "
                f"{reason}. It wraps keras.layers.Conv2D, DepthwiseConv2D and Dense."
            )
        kwargs.setdefault("name", f"magnitude_pruning_{layer.name}")
        super().__init__(layer, schedule, **kwargs)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_state(self.layer.kernel.shape)

    def masked_kernel(self, dtype=None):
        """`kernel * mask`, in `dtype` (default: the kernel's)."""
        kernel = self.layer.kernel
        dtype = dtype or kernel.dtype
        return ops.cast(kernel, dtype) * ops.cast(self.mask, dtype)

    def call(self, inputs, training=None):
        check_step_callback(self, training)
        layer = self.layer
        kernel = self.masked_kernel(self.compute_dtype)
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            y = ops.depthwise_conv(
                inputs, kernel, strides=layer.strides, padding=layer.padding,
                dilation_rate=layer.dilation_rate, data_format=layer.data_format,
            )
        elif isinstance(layer, keras.layers.Conv2D):
            y = layer.convolution_op(inputs, kernel)
        else:
            y = ops.matmul(inputs, kernel)
        return _finish(layer, y)

    def strip(self):
        """The wrapped layer as a plain layer with the masked kernel: `(layer, weights)`.

        Build the layer, then `layer.set_weights(weights)`; `strip_model`
        does this for every wrapper of a model.
        """
        layer = self.layer.__class__.from_config(self.layer.get_config())
        weights = [np.asarray(w) for w in self.layer.weights]
        index = [id(w) for w in self.layer.weights].index(id(self.layer.kernel))
        weights[index] = np.asarray(self.masked_kernel())
        return layer, weights


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class InterspacePruning(_ScheduledMagnitudePruning):
    """Interspace pruning: prunes the filter-basis coefficients of a convolution by magnitude.

    Every filter is a combination of a trainable filter basis `F` of
    `kh * kw` filters, `W[:, :, c, o] = sum_j C[j, c, o] * F_j` (Wimmer,
    Mehnert, Condurache, "Interspace Pruning", CVPR 2022), one basis per
    layer or, with `depth_groups=g`, one per contiguous group of input
    channels. The wrapped layer's kernel variable holds the coefficients,
    read as `C = reshape(kernel, (kh * kw, c_in, filters))`: at build they
    are set to the coefficients of the layer's filters in the initial basis
    (so with `basis="dct"` the wrapped layer itself no longer computes its
    old filters; `prune_interspace` wraps copies).
    At each step where the schedule says to prune, the coefficients keep the
    `max(round(size * (1 - s)), 1)` largest `|C[j, c, o]| * ||F_j||` (the
    size of their contribution to the filter; `|C|` for an orthonormal
    basis); the basis and the surviving coefficients train together and
    pruned coefficients stay zero. With `basis="standard"` the layer starts
    exactly as `MagnitudePruning`.

    A `TransformConv2D` is wrapped the same way with its *bases* in the
    filter basis: its `base_kernel` holds the coefficients, the bases are
    `B[:, :, c, b] = sum_j C[j, c, b] * F_j`, and every output filter is
    its transform of a base as before, so both savings stack (the
    transforms' fewer bases and the coefficients' sparsity). Both of its
    execution paths run on those bases. Stripped, it becomes a
    `FilterBasisTransformConv2D`.

    Args:
        layer: the `keras.layers.Conv2D` (`groups=1`) or `TransformConv2D`
            to wrap, with a kernel larger than 1x1.
        schedule: a callable `schedule(step) -> (should_prune, sparsity)`,
            as for `MagnitudePruning`.
        basis: the initial basis: `"standard"` (default: the one-hot
            filters) or `"dct"` (the orthonormal 2-D DCT-II, `dct_basis`).
        depth_groups: int >= 1, dividing the input channels: the number of
            bases. Defaults to 1. For a `TransformConv2D` it must divide the
            layer's own `depth_groups` (each of its channel groups inside
            one basis group).
        **kwargs: base layer arguments.

    Raises:
        ValueError: for an invalid argument or a layer it cannot wrap.

    Example:

    >>> import keras, numpy as np
    >>> import tf_transform_conv as tc
    >>> conv = keras.layers.Conv2D(8, 3, padding="same")
    >>> wrapper = tc.InterspacePruning(conv, lambda step: (True, 0.9), basis="dct")
    >>> model = keras.Sequential([keras.Input((6, 6, 4)), wrapper])
    >>> _ = tc.update_pruning_step(model, 0)
    >>> round(wrapper.sparsity, 2), tuple(wrapper.basis_filters.shape)
    (0.9, (1, 9, 9))
    """

    def __init__(self, layer, schedule, basis="standard", depth_groups=1, **kwargs):
        reason = ip_skip_reason(layer)
        if reason:
            raise ValueError(
                f"InterspacePruning cannot wrap {type(layer).__name__} '{layer.name}': "
                f"{reason}. It wraps keras.layers.Conv2D layers with groups=1 and "
                "TransformConv2D layers, with a kernel larger than 1x1."
            )
        _check_basis(basis)
        self.depth_groups = check_positive_int(depth_groups, "depth_groups")
        if (isinstance(layer, TransformConv2D)
                and layer.depth_groups % self.depth_groups):
            raise ValueError(
                f"InterspacePruning of TransformConv2D '{layer.name}': depth_groups="
                f"{self.depth_groups} must divide the layer's depth_groups="
                f"{layer.depth_groups}, so that each of its channel groups lies in one "
                "basis group."
            )
        kwargs.setdefault("name", f"interspace_pruning_{layer.name}")
        super().__init__(layer, schedule, **kwargs)
        self.basis = basis

    def build(self, input_shape):
        super().build(input_shape)
        weight = self.pruned_weight
        kh, kw, channels, filters = weight.shape
        if channels % self.depth_groups:
            raise ValueError(
                f"The input channels ({channels}) of layer '{self.layer.name}' "
                f"must be divisible by depth_groups={self.depth_groups}."
            )
        taps = kh * kw
        initial = _initial_basis(self.basis, (kh, kw))
        self.basis_filters = self.add_weight(
            name="basis", shape=(self.depth_groups, taps, taps),
            initializer=keras.initializers.Constant(
                np.broadcast_to(initial, (self.depth_groups, taps, taps))
            ),
            trainable=True, dtype=weight.dtype,
        )
        self._build_state(weight.shape)
        # The kernel variable now holds the filters' coefficients in the basis.
        kernel = np.asarray(weight).reshape(taps, channels, filters)
        weight.assign(
            np.einsum("jt,tco->jco", initial, kernel).reshape(kh, kw, channels, filters)
        )

    @property
    def coefficients(self):
        """The masked coefficients `C * mask`, a numpy array `(kh * kw, c_in, filters)`.

        `filters` is the base count for a `TransformConv2D`.
        """
        kh, kw, channels, filters = self.pruned_weight.shape
        masked = np.asarray(self.pruned_weight) * np.asarray(self.mask)
        return masked.reshape(kh * kw, channels, filters)

    def _scores(self):
        kh, kw, channels, filters = self.pruned_weight.shape
        g = self.depth_groups
        norms = np.linalg.norm(np.asarray(self.basis_filters), axis=-1)  # (g, taps)
        c = self.coefficients.reshape(kh * kw, g, channels // g, filters)
        return (np.abs(c) * norms.T[:, :, None, None]).reshape(kh, kw, channels, filters)

    def effective_kernel(self, dtype=None):
        """The filters `W = sum_j C_j F_j`, `(kh, kw, c_in, filters)`.

        For a `TransformConv2D`, its bases `(kh, kw, c_in, base_filters)`.
        """
        weight = self.pruned_weight
        dtype = dtype or weight.dtype
        coefficients = ops.cast(weight, dtype) * ops.cast(self.mask, dtype)
        return combine_basis(self.basis_filters, coefficients, dtype)

    def call(self, inputs, training=None):
        check_step_callback(self, training)
        filters = self.effective_kernel(self.compute_dtype)
        if isinstance(self.layer, TransformConv2D):
            return self.layer._call_with_bases(inputs, filters, training)
        y = self.layer.convolution_op(inputs, filters)
        return _finish(self.layer, y)

    def strip(self):
        """The layer computing what this wrapper computes, with the sparse coefficients.

        A `FilterBasisConv2D` for a `Conv2D`, a `FilterBasisTransformConv2D`
        for a `TransformConv2D`. Returns `(layer, weights)`: build the
        layer, then `layer.set_weights(weights)`; `strip_model` does this
        for every wrapper of a model.
        """
        if isinstance(self.layer, TransformConv2D):
            return self._strip_transform_conv()
        conv = self.layer
        kh, kw, channels, filters = conv.kernel.shape
        layer = FilterBasisConv2D(
            filters, conv.kernel_size, strides=conv.strides, padding=conv.padding,
            data_format=conv.data_format, dilation_rate=conv.dilation_rate,
            activation=conv.activation, use_bias=conv.use_bias,
            depth_groups=self.depth_groups, name=conv.name, dtype=conv.dtype_policy,
        )
        weights = [FilterBasisConv2D.basis_to_depthwise(np.asarray(self.basis_filters),
                                                        (kh, kw)),
                   self.coefficients]
        if conv.use_bias:
            weights.append(np.asarray(conv.bias))
        return layer, weights

    def _strip_transform_conv(self):
        config = self.layer.get_config()
        config["basis_groups"] = self.depth_groups
        layer = FilterBasisTransformConv2D.from_config(config)
        coefficients = self.coefficients.reshape(self.pruned_weight.shape)
        weights = [coefficients if w is self.pruned_weight else np.asarray(w)
                   for w in self.layer.weights]
        return layer, weights + [np.asarray(self.basis_filters)]

    def get_config(self):
        config = super().get_config()
        config.update({"basis": self.basis, "depth_groups": self.depth_groups})
        return config


def combine_basis(basis, coefficients, dtype):
    """`sum_j C[j, c, o] * F_j` per basis group: the filters, `(kh, kw, c_in, n)`.

    Args:
        basis: `(groups, kh * kw, kh * kw)`, row `j` of group `g` the basis
            filter `F_j` of the `g`-th contiguous group of input channels,
            flattened in row-major `(h, w)` order.
        coefficients: `(kh, kw, c_in, n)`, read as `C = reshape(...,
            (kh * kw, c_in, n))`.
        dtype: the dtype to compute in.
    """
    kh, kw, channels, filters = coefficients.shape
    g = basis.shape[0]
    c = ops.reshape(ops.cast(coefficients, dtype), (kh * kw, g, channels // g, filters))
    w = ops.einsum("gjt,jgco->tgco", ops.cast(basis, dtype), c)
    return ops.reshape(w, (kh, kw, channels, filters))


# ----------------------------------------------------------------------------
# The stripped interspace layer


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class FilterBasisConv2D(keras.layers.Layer):
    """2D convolution whose filters are sparse combinations of a `kh x kw` filter basis.

    Computes what `keras.layers.Conv2D` computes with the kernel
    `W[:, :, c, o] = sum_j coefficients[j, c, o] * F_j`, where the basis
    `F` holds `kh * kw` filters (one basis per depth group of input
    channels), without ever forming `W`: every input channel is convolved
    with the basis filters (a depthwise convolution, strides, padding and
    dilation included), then the coefficients mix the `c_in * kh * kw`
    responses into the output filters: a 1x1 convolution, written as a
    `(1, kh * kw)` convolution with stride `(1, kh * kw)` over the responses
    laid side by side, so that its kernel rows are `c_in` wide. The
    coefficients are usually sparse (from `InterspacePruning`):
    `export_tflite` stores them in TFLite's sparse encoding (short `c_in`
    rows take 1-byte indices while `c_in < 256`), and the file never holds a
    dense kernel. The intermediate activation has `kh * kw` times the
    input's values.

    Args:
        filters: int, output channels.
        kernel_size: int or pair.
        strides, padding, data_format, dilation_rate, activation, use_bias:
            as `keras.layers.Conv2D`.
        depth_groups: int >= 1 dividing the input channels: the number of
            bases, one per contiguous group of input channels.
        basis_initializer, coefficient_initializer, bias_initializer:
            initializers (defaults: the standard basis, glorot uniform on
            the coefficients, zeros).

    Input shape:
        4D `(batch, rows, cols, c_in)` (`channels_first`: `(batch, c_in,
        rows, cols)`).

    Output shape:
        4D, as `Conv2D` with the same arguments.

    Example:

    >>> import keras, numpy as np
    >>> layer = FilterBasisConv2D(4, 3, padding="same")
    >>> y = layer(np.ones((2, 5, 5, 3), "float32"))
    >>> tuple(y.shape), tuple(layer.basis.shape), tuple(layer.coefficients.shape)
    ((2, 5, 5, 4), (3, 3, 1, 9), (9, 3, 4))
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        data_format=None,
        dilation_rate=(1, 1),
        activation=None,
        use_bias=True,
        depth_groups=1,
        basis_initializer=None,
        coefficient_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        # Conv2D normalises and checks the convolution arguments.
        reference = keras.layers.Conv2D(
            filters, kernel_size, strides=strides, padding=padding,
            data_format=data_format, dilation_rate=dilation_rate,
        )
        self.filters = reference.filters
        self.kernel_size = reference.kernel_size
        self.strides = reference.strides
        self.padding = reference.padding
        self.data_format = reference.data_format
        self.dilation_rate = reference.dilation_rate
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.depth_groups = check_positive_int(depth_groups, "depth_groups")
        self.basis_initializer = (
            None if basis_initializer is None else keras.initializers.get(basis_initializer)
        )
        self.coefficient_initializer = keras.initializers.get(coefficient_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self._reference = reference

    @staticmethod
    def basis_to_depthwise(basis, kernel_size):
        """`(g, kh * kw, kh * kw)` basis rows as a depthwise kernel `(kh, kw, g, kh * kw)`."""
        basis = np.asarray(basis)
        g, taps, _ = basis.shape
        return np.transpose(basis, (2, 0, 1)).reshape(*kernel_size, g, taps)

    def build(self, input_shape):
        axis = -1 if self.data_format == "channels_last" else 1
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(
                f"FilterBasisConv2D '{self.name}' needs a known number of input "
                f"channels. Received input_shape={input_shape}."
            )
        if channels % self.depth_groups:
            raise ValueError(
                f"The input channels ({channels}) of layer '{self.name}' must be "
                f"divisible by depth_groups={self.depth_groups}."
            )
        kh, kw = self.kernel_size
        taps = kh * kw
        initializer = self.basis_initializer or keras.initializers.Constant(
            self.basis_to_depthwise(
                np.broadcast_to(np.eye(taps, dtype="float32"),
                                (self.depth_groups, taps, taps)), (kh, kw))
        )
        self.basis = self.add_weight(
            name="basis", shape=(kh, kw, self.depth_groups, taps), initializer=initializer,
        )
        self.coefficients = self.add_weight(
            name="coefficients", shape=(taps, channels, self.filters),
            initializer=self.coefficient_initializer,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.filters,), initializer=self.bias_initializer
            )

    def materialized_kernel(self, dtype=None):
        """The equivalent `Conv2D` kernel `(kh, kw, c_in, filters)`."""
        dtype = dtype or self.basis.dtype
        taps, channels, filters = self.coefficients.shape
        # The depthwise kernel (kh, kw, g, j) holds basis filter j at its taps.
        rows = ops.transpose(ops.reshape(self.basis, (taps, self.depth_groups, taps)), (1, 2, 0))
        coefficients = ops.reshape(self.coefficients, (*self.kernel_size, channels, filters))
        return combine_basis(rows, coefficients, dtype)

    def call(self, inputs):
        x = inputs
        if self.data_format == "channels_first":
            x = ops.transpose(x, (0, 2, 3, 1))
        dtype = self.compute_dtype
        taps, channels, filters = self.coefficients.shape
        g = self.depth_groups
        shape = ops.shape(x)
        rows, cols = shape[1], shape[2]
        # Fold the channels of a group into the batch: one depthwise
        # convolution of g channels, each with its group's taps basis filters.
        x = ops.reshape(x, (-1, rows, cols, g, channels // g))
        x = ops.transpose(x, (0, 4, 1, 2, 3))
        x = ops.reshape(x, (-1, rows, cols, g))
        x = ops.depthwise_conv(
            x, ops.cast(self.basis, dtype), strides=self.strides, padding=self.padding,
            dilation_rate=self.dilation_rate, data_format="channels_last",
        )
        shape = ops.shape(x)
        out_rows, out_cols = shape[1], shape[2]
        # (batch * c / g, rows, cols, g * taps) -> (batch, rows, cols * taps, c):
        # each position's taps responses side by side, every channel in each.
        x = ops.reshape(x, (-1, channels // g, out_rows, out_cols, g, taps))
        x = ops.transpose(x, (0, 2, 3, 5, 4, 1))
        x = ops.reshape(x, (-1, out_rows, out_cols * taps, channels))
        kernel = ops.reshape(ops.cast(self.coefficients, dtype), (1, taps, channels, filters))
        y = ops.conv(x, kernel, strides=(1, taps), data_format="channels_last")
        if self.use_bias:
            y = y + ops.cast(self.bias, dtype)
        if self.data_format == "channels_first":
            y = ops.transpose(y, (0, 3, 1, 2))
        if self.activation is not None:
            y = self.activation(y)
        return y

    def compute_output_shape(self, input_shape):
        return self._reference.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "data_format": self.data_format,
            "dilation_rate": self.dilation_rate,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "depth_groups": self.depth_groups,
            "basis_initializer": None if self.basis_initializer is None
            else keras.initializers.serialize(self.basis_initializer),
            "coefficient_initializer": keras.initializers.serialize(
                self.coefficient_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        })
        return config


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class FilterBasisTransformConv2D(TransformConv2D):
    """A `TransformConv2D` whose bases are sparse combinations of a `kh x kw` filter basis.

    Computes what `TransformConv2D` computes with the bases
    `B[:, :, c, b] = sum_j C[j, c, b] * F_j`: `base_kernel` holds the
    coefficients, read as `C = reshape(base_kernel, (kh * kw, c_in,
    base_filters))`, and `basis_filters` the `kh * kw` basis filters `F`
    (one basis per contiguous group of input channels, `basis_groups` of
    them), both trainable. Every output filter is then its transform of a
    base, as in `TransformConv2D` (both execution paths, every family). It
    is what `strip_model` makes of an `InterspacePruning` wrapper of a
    `TransformConv2D`, whose coefficients are mostly zeros.

    `export_tflite` writes it in the grouped form with the coefficients as
    the product convolution (`C` instead of the bases, stored in TFLite's
    sparse encoding, never as a dense kernel), a grouped 1x1 convolution
    that turns each base's `kh * kw` coefficient products into its tap
    products with `F` (`kh * kw` multiply-adds per product), and the
    spread convolution as for `TransformConv2D`.

    Args:
        basis_groups: int >= 1 dividing `depth_groups`: the number of
            bases. Defaults to 1.
        basis_initializer: initializer of `basis_filters`
            `(basis_groups, kh * kw, kh * kw)`; defaults to the standard
            basis (`base_kernel` then holds the bases themselves).
        The other arguments as `TransformConv2D` (`kernel_initializer`
        initialises the coefficients).

    Example:

    >>> import numpy as np
    >>> layer = FilterBasisTransformConv2D(8, 3, base_filters=2, basis_groups=1)
    >>> _ = layer(np.zeros((1, 5, 5, 4), "float32"))
    >>> tuple(layer.base_kernel.shape), tuple(layer.basis_filters.shape)
    ((3, 3, 4, 2), (1, 9, 9))
    """

    def __init__(self, filters, kernel_size, basis_groups=1, basis_initializer=None,
                 **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self.basis_groups = check_positive_int(basis_groups, "basis_groups")
        if self.depth_groups % self.basis_groups:
            raise ValueError(
                f"basis_groups={self.basis_groups} must divide depth_groups="
                f"{self.depth_groups} in layer '{self.name}': each channel group of "
                "the transforms lies in one basis group."
            )
        self.basis_initializer = (
            None if basis_initializer is None else keras.initializers.get(basis_initializer)
        )

    def build(self, input_shape):
        super().build(input_shape)
        kh, kw = self.kernel_size
        taps = kh * kw
        self.basis_filters = self.add_weight(
            name="basis", shape=(self.basis_groups, taps, taps),
            initializer=self.basis_initializer or keras.initializers.Constant(
                np.broadcast_to(np.eye(taps, dtype="float32"),
                                (self.basis_groups, taps, taps))),
            trainable=True, dtype=self.dtype,
        )

    def _bases(self, dtype):
        return combine_basis(self.basis_filters, self.base_kernel, dtype)

    def get_config(self):
        config = super().get_config()
        config.update({
            "basis_groups": self.basis_groups,
            "basis_initializer": None if self.basis_initializer is None
            else keras.initializers.serialize(self.basis_initializer),
        })
        return config


# ----------------------------------------------------------------------------
# Model verbs


def _inside_wrappers(model):
    return {id(layer.layer) for layer in _compat.layers_of(model)
            if isinstance(layer, keras.layers.Wrapper)}


def _wrap_model(model, verb, layers, skip_reason, make, what):
    check_graph_model(model, verb)
    inside = _inside_wrappers(model)
    chosen = select_layers(
        model, layers, lambda l: id(l) not in inside and not skip_reason(l)
    )
    wrapped = []

    def replace(layer):
        if layer.name not in chosen:
            return None
        inner = layer.__class__.from_config(layer.get_config())
        inner.build(_input_shape_of(layer))
        inner.set_weights(layer.get_weights())
        wrapped.append(layer.name)
        return make(inner), None

    new_model = rewrite_model(model, replace)
    if not wrapped:
        raise ValueError(
            f"{verb} wrapped no layer of model '{model.name}': it wraps {what} that "
            "`layers` chooses (and that no wrapper holds already)."
        )
    return new_model


def _input_shape_of(layer):
    """The build shape of a built `Conv2D`, `DepthwiseConv2D`, `Dense` or `TransformConv2D`."""
    if isinstance(layer, TransformConv2D):
        # The spatial size too: the layer picks its execution path from it.
        return tuple(layer.get_build_config()["input_shape"])
    if isinstance(layer, keras.layers.Dense):
        return (None, layer.kernel.shape[0])
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        channels = layer.kernel.shape[2]
    else:
        channels = layer.kernel.shape[2] * layer.groups
    if layer.data_format == "channels_last":
        return (None, None, None, channels)
    return (None, channels, None, None)


def _to_prune(to_prune, verb):
    if isinstance(to_prune, keras.layers.Layer) and not isinstance(to_prune, keras.Model):
        return "layer"
    check_graph_model(to_prune, verb)
    return "model"


def prune_low_magnitude(to_prune, schedule, layers=None):
    """Standard unstructured magnitude pruning, tfmot's `prune_low_magnitude` for Keras 3.

    Args:
        to_prune: a layer (`Conv2D`, `DepthwiseConv2D` or `Dense`: returns
            its `MagnitudePruning` wrapper) or a built Sequential or
            Functional model (returns a new model in which the chosen layers
            are wrapped, with the same weights).
        schedule: a callable `schedule(step) -> (should_prune, sparsity)`:
            tfmot's `PolynomialDecay` / `ConstantSparsity` as they are, a
            function or an object with `__call__`.
        layers: for a model, which layers: None (every `Conv2D`,
            `DepthwiseConv2D` and `Dense`), a name or list of names, a layer
            class or a predicate `layer -> bool`.

    Returns:
        The wrapper, or the new model; train it with
        `UpdateTransformPruningStep` among the callbacks, then
        `strip_model` it.

    Raises:
        ValueError: for an invalid schedule or `layers`, a layer it cannot
            wrap, something other than a layer or a built graph model, or
            a model in which no layer gets wrapped.

    Example:

    >>> import keras, numpy as np
    >>> import tf_transform_conv as tc
    >>> model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3),
    ...                           keras.layers.Flatten(), keras.layers.Dense(3)])
    >>> pruned = tc.prune_low_magnitude(model, lambda step: (step == 0, 0.5))
    >>> pruned.compile("sgd", "mse")
    >>> x, y = np.ones((8, 6, 6, 2), "float32"), np.zeros((8, 3), "float32")
    >>> _ = pruned.fit(x, y, verbose=0, callbacks=[tc.UpdateTransformPruningStep()])
    >>> stripped = tc.strip_model(pruned)
    >>> [float(np.mean(l.kernel.numpy() == 0)) for l in stripped.layers if hasattr(l, "kernel")]
    [0.5, 0.5]
    """
    check_schedule(schedule)
    if _to_prune(to_prune, "prune_low_magnitude") == "layer":
        return MagnitudePruning(to_prune, schedule)
    return _wrap_model(
        to_prune, "prune_low_magnitude", layers, sp_skip_reason,
        lambda inner: MagnitudePruning(inner, schedule),
        "the keras.layers.Conv2D, DepthwiseConv2D and Dense layers",
    )


def prune_interspace(to_prune, schedule, basis="standard", depth_groups=1, layers=None):
    """Interspace pruning: wraps `Conv2D` layers in `InterspacePruning`.

    Args:
        to_prune: a `Conv2D` (returns its `InterspacePruning` wrapper) or a
            built Sequential or Functional model (returns a new model in
            which the chosen convolutions are wrapped, with the same
            weights). Layers with a 1x1 kernel have a one-element basis:
            prune them with `prune_low_magnitude` (`layers=`) if wanted.
        schedule: as `prune_low_magnitude`.
        basis: `"standard"` (default) or `"dct"`, the initial basis.
        depth_groups: int >= 1, bases per layer (one per contiguous group
            of input channels); 1 for a layer whose input channels it does
            not divide (an RGB stem), or, for a `TransformConv2D`, whose
            own `depth_groups` it does not divide.
        layers: which layers: None (every `Conv2D` with `groups=1` and
            every `TransformConv2D`, with a kernel larger than 1x1), names,
            a class or a predicate.

    Returns:
        The wrapper or the new model; train with
        `UpdateTransformPruningStep`, then `strip_model` (which gives
        `FilterBasisConv2D` layers, and `FilterBasisTransformConv2D` for
        the `TransformConv2D`s: their bases in the filter basis).

    Raises:
        ValueError: as `prune_low_magnitude`, or for an invalid `basis` or
            `depth_groups`.

    Example:

    >>> import keras
    >>> import tf_transform_conv as tc
    >>> model = keras.Sequential([keras.Input((6, 6, 4)), keras.layers.Conv2D(4, 3, name="c")])
    >>> pruned = tc.prune_interspace(model, lambda step: (True, 0.9), basis="dct")
    >>> [type(l).__name__ for l in pruned.layers]
    ['InterspacePruning']
    """
    check_schedule(schedule)
    _check_basis(basis)
    check_positive_int(depth_groups, "depth_groups")
    if _to_prune(to_prune, "prune_interspace") == "layer":
        return InterspacePruning(to_prune, schedule, basis=basis, depth_groups=depth_groups)

    def make(inner):
        if isinstance(inner, TransformConv2D):
            fits = inner.depth_groups % depth_groups == 0
        else:
            fits = inner.kernel.shape[2] % depth_groups == 0
        groups = depth_groups if fits else 1
        return InterspacePruning(inner, schedule, basis=basis, depth_groups=groups)

    return _wrap_model(
        to_prune, "prune_interspace", layers, ip_skip_reason, make,
        "the keras.layers.Conv2D layers with groups=1 and the TransformConv2D layers, "
        "with a kernel larger than 1x1",
    )


# ----------------------------------------------------------------------------
# Deployment


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
