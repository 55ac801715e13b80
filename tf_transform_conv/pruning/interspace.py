"""Interspace pruning: `InterspacePruning` prunes the filter-basis coefficients of a convolution.

Wimmer, Mehnert, Condurache, "Interspace Pruning: Using Adaptive Filter
Representations to Improve Training of Sparse CNNs" (CVPR 2022): every
`kh x kw` filter is written in a trainable *filter basis* `F` of `kh * kw`
filters,

    W[:, :, c, o] = sum_j C[j, c, o] * F_j

(one basis per layer, or one per depth group of input channels). The
coefficients `C` are pruned by magnitude under the schedule, and the basis
and the surviving coefficients train together. The basis starts as the
standard basis (`C = W`, so IP starts exactly as standard magnitude pruning)
or as the orthonormal 2-D DCT. Stripped, a `Conv2D` becomes a
`FilterBasisConv2D` and a `TransformConv2D` (whose *bases* then live in the
filter basis, both savings stacking) a `FilterBasisTransformConv2D`.
"""

import math

import keras
import numpy as np
from keras import ops

from tf_transform_conv._checks import check_choice
from tf_transform_conv._checks import check_positive_int
from tf_transform_conv.cost import CostTerms
from tf_transform_conv.cost import conv2d_cost
from tf_transform_conv.cost import filter_basis_nonzeros
from tf_transform_conv.cost import register_layer_cost
from tf_transform_conv.cost import sparse_basis_terms
from tf_transform_conv.cost import transform_conv_cost
from tf_transform_conv.cost.core import image_dims
from tf_transform_conv.layers.filter_basis_conv import FilterBasisConv2D
from tf_transform_conv.layers.filter_basis_transform_conv import FilterBasisTransformConv2D
from tf_transform_conv.layers.transform_conv import TransformConv2D
from tf_transform_conv.ops.basis import BASES
from tf_transform_conv.ops.basis import combine_basis
from tf_transform_conv.ops.basis import initial_basis
from tf_transform_conv.pruning.magnitude import MaskedPruning
from tf_transform_conv.pruning.magnitude import bias_and_activation
from tf_transform_conv.pruning.magnitude import sp_skip_reason

__all__ = ["InterspacePruning", "ip_skip_reason"]


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


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class InterspacePruning(MaskedPruning):
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
        check_choice(basis, "basis", BASES)
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
        initial = initial_basis(self.basis, (kh, kw))
        self.basis_filters = self.add_weight(
            name="basis", shape=(self.depth_groups, taps, taps),
            initializer=keras.initializers.Constant(
                np.broadcast_to(initial, (self.depth_groups, taps, taps))
            ),
            trainable=True, dtype=weight.dtype,
        )
        self._build_mask()
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
        self.check_step_callback(training)
        filters = self.effective_kernel(self.compute_dtype)
        if isinstance(self.layer, TransformConv2D):
            return self.layer._call_with_bases(inputs, filters, training)
        y = self.layer.convolution_op(inputs, filters)
        return bias_and_activation(self.layer, y)

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


@register_layer_cost(InterspacePruning)
def _interspace_pruning_cost(wrapper, input_shape, output_shape):
    """The wrapped convolution (the dense kernel it convolves with) plus the basis,
    `groups * (kh * kw)^2` parameters; the coefficients' zeros left out of `nonzeros`."""
    basis = math.prod(wrapper.basis_filters.shape)
    inner = wrapper.layer
    if isinstance(inner, TransformConv2D):
        full = transform_conv_cost(inner, input_shape, output_shape)
        terms = CostTerms(full.params + basis, full.macs, dense_macs=full.dense_macs)
        if not wrapper.built:
            return terms
        nonzeros, nonzero_macs = filter_basis_nonzeros(
            inner, wrapper.coefficients, np.asarray(wrapper.basis_filters), terms.params,
            terms.macs, input_shape)
        return terms.replace(nonzeros=nonzeros, nonzero_macs=nonzero_macs)
    conv = conv2d_cost(inner, input_shape, output_shape)
    terms = conv.replace(params=conv.params + basis)
    if not wrapper.built:
        return terms
    oh, ow, _ = image_dims(inner, output_shape, what="output")
    return terms.replace(**sparse_basis_terms(
        terms.params, wrapper.coefficients, np.asarray(wrapper.basis_filters),
        wrapper.depth_groups, oh, ow))
