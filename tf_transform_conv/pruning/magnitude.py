"""Unstructured magnitude pruning for Keras 3: `MagnitudePruning`, and the masked base it shares.

`MagnitudePruning` wraps a `Conv2D`, `Dense` or `DepthwiseConv2D` and zeroes
its smallest-magnitude kernel entries as tfmot's `prune_low_magnitude` does:
at every step where the schedule says to prune, the layer keeps the
`max(round(size * (1 - s)), 1)` largest `|w|` entries (ties at the threshold
kept), so its sparsity is the schedule's `s`; the layer computes with
`kernel * mask`, and the masked kernel is written back after every step, so
pruned weights stay zero whatever the optimizer does.

It also prunes in tfmot's structured patterns: whole blocks
(`block_size`, `block_pooling_type`: `ops.masks.block_magnitude_mask`) and
M-by-N groups (`sparsity_m_by_n`, e.g. 2:4: `ops.masks.m_by_n_mask`), and
wraps a custom layer that follows the `PrunableLayer` contract
(`pruning.prunable`), one mask per weight it names.

`MaskedPruning` is what it shares with `InterspacePruning`
(`pruning.interspace`): a mask over one weight, its update by magnitude and
its write-back.
"""

import keras
import numpy as np
from keras import ops

from tf_transform_conv._checks import is_int
from tf_transform_conv.cost import cost_terms
from tf_transform_conv.cost import kernel_nonzeros
from tf_transform_conv.cost import register_layer_cost
from tf_transform_conv.layers.transform_conv import TransformConv2D
from tf_transform_conv.ops.masks import block_magnitude_mask
from tf_transform_conv.ops.masks import m_by_n_mask
from tf_transform_conv.ops.masks import magnitude_mask
from tf_transform_conv.pruning.prunable import is_prunable_layer
from tf_transform_conv.pruning.wrapper import PruningWrapper

__all__ = [
    "BLOCK_POOLING_TYPES",
    "MagnitudePruning",
    "MaskedPruning",
    "bias_and_activation",
    "check_block_size",
    "check_m_by_n",
    "sp_skip_reason",
]

#: The block scores tfmot's block sparsity takes: the mean or the largest `|w|` of a block.
BLOCK_POOLING_TYPES = ("AVG", "MAX")

_BUILT_IN = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)


def sp_skip_reason(layer):
    """Why `MagnitudePruning` cannot wrap `layer` ("" when it can)."""
    if isinstance(layer, _BUILT_IN):
        if getattr(layer, "quantization_mode", None):
            return f"quantized layer ({layer.quantization_mode})"
        return ""
    if is_prunable_layer(layer):
        return ""
    return "not a Conv2D, DepthwiseConv2D or Dense, nor a PrunableLayer"


def check_block_size(block_size):
    """`block_size` as a tuple of two ints >= 1, or a ValueError naming it."""
    try:
        value = tuple(block_size)
    except TypeError:
        value = None
    if value is None or len(value) != 2 or not all(is_int(v) and v >= 1 for v in value):
        raise ValueError(
            "Invalid value for argument `block_size`. Expected a pair of ints >= 1 "
            f"(height, width), e.g. (1, 1) or (4, 1). Received block_size={block_size!r}."
        )
    return tuple(int(v) for v in value)


def check_m_by_n(sparsity_m_by_n):
    """`sparsity_m_by_n` as a tuple `(m, n)` with `0 < m < n`, None kept, or a ValueError."""
    if sparsity_m_by_n is None:
        return None
    try:
        value = tuple(sparsity_m_by_n)
    except TypeError:
        value = None
    if (value is None or len(value) != 2 or not all(is_int(v) for v in value)
            or not 0 < value[0] < value[1]):
        raise ValueError(
            "Invalid value for argument `sparsity_m_by_n`. Expected None or a pair of "
            "ints (m, n) with 0 < m < n: m zeros in every n consecutive weights, e.g. "
            f"(2, 4). Received sparsity_m_by_n={sparsity_m_by_n!r}."
        )
    return tuple(int(v) for v in value)


class MaskedPruning(PruningWrapper):
    """A pruning wrapper with a magnitude mask over one weight (`pruned_weight`).

    At each pruning step the mask keeps the largest `scores` (`|w|` here;
    subclasses may weigh them) to reach the schedule's sparsity. The layer
    computes with `weight * mask`, the masked weight is written back after
    every step (`after_step`), and the weight's constraint keeps pruned
    entries zero inside the optimizer's own update. On TensorFlow the
    constraint reads the mask variable when the step runs; on JAX the
    optimizer's update cannot read another variable (the trainer takes the
    variables out of the model during `fit`), so the constraint holds the
    mask as a constant, and the step callback retraces the training step
    after each pruning step. Subclasses call `_build_mask()` in `build`,
    after `super().build`.
    """

    @property
    def pruned_weight(self):
        """The variable the mask applies to: the kernel (a `TransformConv2D`'s bases)."""
        if isinstance(self.layer, TransformConv2D):
            return self.layer.base_kernel
        return self.layer.kernel

    def _build_mask(self):
        self.mask = self.add_weight(
            name="mask", shape=self.pruned_weight.shape, initializer="ones",
            trainable=False, dtype=self.pruned_weight.dtype,
        )
        self._mask_now = np.ones(self.mask.shape, "float32")
        # The optimizer applies a variable's constraint after each update,
        # inside the compiled step: pruned entries stay exactly zero.
        kernel = self.pruned_weight
        inner = kernel.constraint

        def keep_pruned_zero(value):
            value = inner(value) if inner is not None else value
            return value * ops.cast(self._constraint_mask(), value.dtype)

        kernel.constraint = keep_pruned_zero

    def _constraint_mask(self):
        if keras.backend.backend() == "jax":
            return self._mask_now  # a constant of the traced step; see the class docstring
        return self.mask

    @property
    def sparsity(self):
        """The fraction of pruned entries (zeros of the mask)."""
        return float(np.mean(np.asarray(self.mask) == 0))

    def _scores(self):
        return np.abs(np.asarray(self.pruned_weight) * np.asarray(self.mask))

    def prune_to(self, sparsity, step=None, scores=None):
        """Keeps the largest-magnitude entries so that `sparsity` of them are zero."""
        mask = magnitude_mask(self._scores(), sparsity)
        self.mask.assign(mask)
        self.apply_mask()
        self.pruning_history.append({"step": step, "sparsity": float(sparsity)})

    def apply_mask(self):
        """Writes `weight * mask` back into the weight (pruned entries stay zero)."""
        kernel = self.pruned_weight
        kernel.assign(ops.cast(kernel * self.mask, kernel.dtype))
        self._mask_now = ops.convert_to_numpy(self.mask)

    def load_own_variables(self, store):
        super().load_own_variables(store)
        self._mask_now = ops.convert_to_numpy(self.mask)

    def after_step(self):
        self.apply_mask()


def bias_and_activation(layer, y):
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
class MagnitudePruning(MaskedPruning):
    """Magnitude pruning of a `Conv2D`, `DepthwiseConv2D`, `Dense` or `PrunableLayer`: tfmot's wrapper.

    The Keras 3 counterpart of tfmot's `prune_low_magnitude` wrapper: the
    layer computes with `kernel * mask`; at each step where the schedule
    says to prune (driven by `UpdateTransformPruningStep`), the mask keeps
    the `max(round(size * (1 - s)), 1)` largest-magnitude kernel entries
    (`ops.masks.magnitude_mask`), so the layer's sparsity is the schedule's `s`; after
    every step the masked kernel is written back, so pruned weights stay
    zero through training. The step and the mask are non-trainable weights,
    saved with the model. Biases are not pruned.

    Structured patterns, as tfmot's:

    - Blocks (`block_size` other than `(1, 1)`): the kernel, as a matrix,
      is pruned in whole `block_size` blocks ranked by their mean
      (`"AVG"`) or largest (`"MAX"`) `|w|`, to the schedule's sparsity of
      blocks (`ops.masks.block_magnitude_mask`). A `Dense` kernel is the
      matrix `(in, out)` (tfmot's only case: it refuses a 4-D kernel); a
      `Conv2D` kernel `(kh * kw * in, out)`, a `DepthwiseConv2D` kernel
      `(kh * kw, channels * multiplier)`.
    - M-by-N (`sparsity_m_by_n=(m, n)`): `m` zeros in every `n`
      consecutive weights along the input channels
      (`ops.masks.m_by_n_mask`). As in tfmot, the schedule's sparsity is
      not used: the mask is made once, at step 1, and kept.

    A custom layer that follows the `PrunableLayer` contract is pruned on
    each weight of `get_prunable_weights()` (each its own mask, block and
    M-by-N patterns on 2-D or 4-D weights), and computes with its own
    `call` on the masked weights.

    Args:
        layer: the `keras.layers.Conv2D` (any groups), `DepthwiseConv2D`,
            `Dense` or `PrunableLayer` to wrap.
        schedule: a callable `schedule(step) -> (should_prune, sparsity)`:
            `tf_transform_conv.sparsity.PolynomialDecay` /
            `ConstantSparsity`, tfmot's own as they are, a function, or an
            object with `__call__`.
        block_size: `(height, width)` of the blocks, ints >= 1. Defaults to
            `(1, 1)` (unstructured).
        block_pooling_type: `"AVG"` (default) or `"MAX"`.
        sparsity_m_by_n: None (default) or `(m, n)` with `0 < m < n`.
        **kwargs: base layer arguments.

    Raises:
        ValueError: for another layer type, an invalid schedule or pattern.

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

    def __init__(self, layer, schedule, block_size=(1, 1), block_pooling_type="AVG",
                 sparsity_m_by_n=None, **kwargs):
        reason = sp_skip_reason(layer)
        if reason:
            raise ValueError(
                f"MagnitudePruning cannot wrap {type(layer).__name__} '{layer.name}': "
                f"{reason}. It wraps keras.layers.Conv2D, DepthwiseConv2D and Dense, and "
                "layers with get_prunable_weights() (tf_transform_conv.sparsity.PrunableLayer)."
            )
        self.block_size = check_block_size(block_size)
        if block_pooling_type not in BLOCK_POOLING_TYPES:
            raise ValueError(
                "Invalid value for argument `block_pooling_type`. Expected one of "
                f"{list(BLOCK_POOLING_TYPES)}. Received "
                f"block_pooling_type={block_pooling_type!r}."
            )
        self.block_pooling_type = block_pooling_type
        self.sparsity_m_by_n = check_m_by_n(sparsity_m_by_n)
        if self.sparsity_m_by_n and self.block_size != (1, 1):
            raise ValueError(
                "`sparsity_m_by_n` and `block_size` are two patterns: pass one. Received "
                f"block_size={block_size!r}, sparsity_m_by_n={sparsity_m_by_n!r}."
            )
        kwargs.setdefault("name", f"magnitude_pruning_{layer.name}")
        super().__init__(layer, schedule, **kwargs)
        self.built_in = isinstance(layer, _BUILT_IN)

    @property
    def pruned_weights(self):
        """The variables the masks apply to: the kernel, or the `PrunableLayer`'s weights."""
        if self.built_in:
            return [self.layer.kernel]
        return list(self.layer.get_prunable_weights())

    @property
    def pruned_weight(self):
        """The first pruned variable (the kernel of a built-in layer)."""
        return self.pruned_weights[0]

    def build(self, input_shape):
        super().build(input_shape)
        weights = self.pruned_weights
        for weight in weights:
            if self.block_size != (1, 1) and len(weight.shape) not in (2, 4):
                raise ValueError(
                    f"Block sparsity takes 2-D and 4-D weights; '{weight.path}' of "
                    f"'{self.layer.name}' has shape {tuple(weight.shape)}."
                )
            if self.sparsity_m_by_n and len(weight.shape) not in (2, 4):
                raise ValueError(
                    f"M-by-N sparsity takes 2-D and 4-D weights; '{weight.path}' of "
                    f"'{self.layer.name}' has shape {tuple(weight.shape)}."
                )
        self.masks = []
        self._masks_now = []
        for index, weight in enumerate(weights):
            mask = self.add_weight(
                name="mask" if index == 0 else f"mask_{index}", shape=weight.shape,
                initializer="ones", trainable=False, dtype=weight.dtype,
            )
            self.masks.append(mask)
            self._masks_now.append(np.ones(mask.shape, "float32"))
            self._keep_zero(weight, index)
        self.mask = self.masks[0] if self.masks else None

    def _keep_zero(self, weight, index):
        # As MaskedPruning: the optimizer applies the constraint after each
        # update, inside the compiled step (on JAX with the mask as a constant).
        inner = weight.constraint

        def keep_pruned_zero(value):
            value = inner(value) if inner is not None else value
            if keras.backend.backend() == "jax":
                mask = self._masks_now[index]
            else:
                mask = self.masks[index]
            return value * ops.cast(mask, value.dtype)

        weight.constraint = keep_pruned_zero

    @property
    def sparsity(self):
        """The fraction of pruned entries over every pruned weight (zeros of the masks)."""
        sizes = [int(np.prod(m.shape)) for m in self.masks]
        if not sum(sizes):
            return 0.0
        zeros = sum(int(np.sum(np.asarray(m) == 0)) for m in self.masks)
        return float(zeros / sum(sizes))

    def decision(self, step):
        """`(should_prune, sparsity)` at `step`: the schedule's; for M-by-N, step 1 only, as tfmot."""
        if self.sparsity_m_by_n:
            m, n = self.sparsity_m_by_n
            return step == 1, m / n
        return super().decision(step)

    def _matrix_shape(self, weight):
        """The matrix a block pattern runs over (see the class docstring)."""
        shape = tuple(weight.shape)
        if len(shape) == 2:
            return shape
        if isinstance(self.layer, keras.layers.DepthwiseConv2D):
            return (shape[0] * shape[1], shape[2] * shape[3])
        return (int(np.prod(shape[:-1])), shape[-1])

    def _mask_of(self, weight, mask, sparsity):
        scores = np.abs(np.asarray(weight) * np.asarray(mask)).astype("float32")
        if self.sparsity_m_by_n:
            return m_by_n_mask(scores, self.sparsity_m_by_n)
        if self.block_size != (1, 1):
            matrix = scores.reshape(self._matrix_shape(weight))
            return block_magnitude_mask(
                matrix, sparsity, self.block_size, self.block_pooling_type,
            ).reshape(scores.shape)
        return magnitude_mask(scores, sparsity)

    def prune_to(self, sparsity, step=None, scores=None):
        """Remakes each mask in the wrapper's pattern to `sparsity`, then writes the zeros back."""
        for weight, mask in zip(self.pruned_weights, self.masks):
            mask.assign(self._mask_of(weight, mask, sparsity))
        self.apply_mask()
        self.pruning_history.append({"step": step, "sparsity": float(sparsity)})

    def apply_mask(self):
        """Writes `weight * mask` back into every pruned weight."""
        for index, (weight, mask) in enumerate(zip(self.pruned_weights, self.masks)):
            weight.assign(ops.cast(weight * mask, weight.dtype))
            self._masks_now[index] = ops.convert_to_numpy(mask)

    def load_own_variables(self, store):
        PruningWrapper.load_own_variables(self, store)
        self._masks_now = [ops.convert_to_numpy(m) for m in self.masks]

    def masked_kernel(self, dtype=None):
        """`kernel * mask`, in `dtype` (default: the kernel's); built-in layers."""
        kernel = self.layer.kernel
        dtype = dtype or kernel.dtype
        return ops.cast(kernel, dtype) * ops.cast(self.mask, dtype)

    def call(self, inputs, training=None):
        self.check_step_callback(training)
        layer = self.layer
        if not self.built_in:
            return layer(inputs, training=training)
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
        return bias_and_activation(layer, y)

    def compute_output_spec(self, *args, **kwargs):
        if self.built_in:
            return super().compute_output_spec(*args, **kwargs)
        # A custom layer may define no compute_output_shape: trace its own call.
        return self.layer.compute_output_spec(*args, **kwargs)

    def strip(self):
        """The wrapped layer as a plain layer with the masked weights: `(layer, weights)`.

        Build the layer, then `layer.set_weights(weights)`; `strip_model`
        does this for every wrapper of a model.
        """
        layer = self.layer.__class__.from_config(self.layer.get_config())
        weights = [np.asarray(w) for w in self.layer.weights]
        ids = [id(w) for w in self.layer.weights]
        for weight, mask in zip(self.pruned_weights, self.masks):
            index = ids.index(id(weight))
            weights[index] = np.asarray(weight) * np.asarray(mask)
        return layer, weights

    def get_config(self):
        config = super().get_config()
        config.update(block_size=list(self.block_size),
                      block_pooling_type=self.block_pooling_type,
                      sparsity_m_by_n=(list(self.sparsity_m_by_n)
                                       if self.sparsity_m_by_n else None))
        return config


@register_layer_cost(MagnitudePruning)
def _magnitude_pruning_cost(wrapper, input_shape, output_shape):
    """As its wrapped layer, with the masked kernel's zeros left out of `nonzeros`."""
    terms = cost_terms(wrapper.layer, input_shape, output_shape)
    if not wrapper.built or not wrapper.built_in:
        return terms
    return kernel_nonzeros(wrapper, terms, wrapper.masked_kernel())
