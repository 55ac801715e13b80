"""Unstructured magnitude pruning for Keras 3: `MagnitudePruning`, and the masked base it shares.

`MagnitudePruning` wraps a `Conv2D`, `Dense` or `DepthwiseConv2D` and zeroes
its smallest-magnitude kernel entries as tfmot's `prune_low_magnitude` does:
at every step where the schedule says to prune, the layer keeps the
`max(round(size * (1 - s)), 1)` largest `|w|` entries (ties at the threshold
kept), so its sparsity is the schedule's `s`; the layer computes with
`kernel * mask`, and the masked kernel is written back after every step, so
pruned weights stay zero whatever the optimizer does.

`MaskedPruning` is what it shares with `InterspacePruning`
(`pruning.interspace`): a mask over one weight, its update by magnitude and
its write-back.
"""

import keras
import numpy as np
from keras import ops

from tf_transform_conv.cost import cost_terms
from tf_transform_conv.cost import kernel_nonzeros
from tf_transform_conv.cost import register_layer_cost
from tf_transform_conv.layers.transform_conv import TransformConv2D
from tf_transform_conv.ops.masks import magnitude_mask
from tf_transform_conv.pruning.wrapper import PruningWrapper

__all__ = ["MagnitudePruning", "MaskedPruning", "bias_and_activation", "sp_skip_reason"]


def sp_skip_reason(layer):
    """Why `MagnitudePruning` cannot wrap `layer` ("" when it can)."""
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                          keras.layers.Dense)):
        if getattr(layer, "quantization_mode", None):
            return f"quantized layer ({layer.quantization_mode})"
        return ""
    return "not a Conv2D, DepthwiseConv2D or Dense"


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
    """Standard unstructured magnitude pruning of a `Conv2D`, `DepthwiseConv2D` or `Dense`.

    The Keras 3 counterpart of tfmot's `prune_low_magnitude` wrapper: the
    layer computes with `kernel * mask`; at each step where the schedule
    says to prune (driven by `UpdateTransformPruningStep`), the mask keeps
    the `max(round(size * (1 - s)), 1)` largest-magnitude kernel entries
    (`ops.masks.magnitude_mask`), so the layer's sparsity is the schedule's `s`; after
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
        self._build_mask()

    def masked_kernel(self, dtype=None):
        """`kernel * mask`, in `dtype` (default: the kernel's)."""
        kernel = self.layer.kernel
        dtype = dtype or kernel.dtype
        return ops.cast(kernel, dtype) * ops.cast(self.mask, dtype)

    def call(self, inputs, training=None):
        self.check_step_callback(training)
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
        return bias_and_activation(layer, y)

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


@register_layer_cost(MagnitudePruning)
def _magnitude_pruning_cost(wrapper, input_shape, output_shape):
    """As its wrapped layer, with the masked kernel's zeros left out of `nonzeros`."""
    terms = cost_terms(wrapper.layer, input_shape, output_shape)
    if not wrapper.built:
        return terms
    return kernel_nonzeros(wrapper, terms, wrapper.masked_kernel())
