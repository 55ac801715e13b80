"""What each form of a layer adds to a `.tflite` file, per quantization.

`export_tflite` writes a `TransformConv2D` grouped, as slices or dense
(`export.lowering`); which is smallest depends on the quantization, because
the converter spends bytes per tensor and per output channel, not only per
weight:

- int8 weights carry a float32 scale and an int64 zero point per output
  channel (12 bytes), their bias is int32 with its own 12 bytes per channel,
  and every activation tensor carries a scale and a zero point; the
  grouped form's spread convolution pays 28 bytes per output channel (and
  per padded slot of a fitted assignment) on top of its `kh*kw` int8 values
  per filter (where a selection follows it, its kernel is normalized and
  both its scales and its bias's are written once: 4 bytes per channel),
  while its products, quantized with one scale
  (`export.product_scales`), pay only their `c_in` bytes per channel;
- sparse-encoded kernels (the grouped form's spread kernels, pruned kernels)
  store an index byte or two per nonzero, a segment per row, and, quantized,
  the per-channel scales again on the densified tensor: at half zeros an
  int8 kernel is larger sparse than dense;
- dynamic-range files quantize only weights of at least 1024 values
  (`DYNAMIC_MIN_ELEMENTS`) and cannot store a sparse kernel (XNNPACK fails to
  prepare the densified hybrid convolution, TF 2.21), so there the spread
  kernels are dense int8, `kh*kw` bytes per nonzero;
- float16 files store each constant in float16 beside a DEQUANTIZE operator
  and its float32 output.

`form_bytes(layer, form, quantization)` predicts the bytes a layer's form
adds to the file (its constants with their quantization parameters and
sparse indices, and its tensors and operators), so that `lowering="auto"`
can keep a compact form only where it is smaller than the dense form in the
file being written. The per-tensor, per-operator and per-table costs below were fitted (least
squares, TF 2.21) on the bytes files spend beyond their constants, names,
quantization parameters and sparse indices. `tests/test_quantized_export.py`
checks the predictions against files: the grouped file's bytes over the
dense file's are predicted within 2.0% (float32), 3.9% (float16), 5.9%
(int8) and 6.5% (dynamic range) of the dense file, the quantized ones
over-predicted (mostly a stride-2 layer's pixel phases), so that
`lowering="auto"` errs towards the dense form.

In int8 files the sparse constants' scales are written once
(`export.sparse_scales` drops the copy the converter gives a DENSIFY's
input), and `_File.weight` prices them so.
"""

import dataclasses

import keras
import numpy as np

from tf_transform_conv.export.grouped import GroupedTransformConv2D
from tf_transform_conv.export.grouped import fully_connected_products
from tf_transform_conv.layers.filter_basis_conv import FilterBasisConv2D
from tf_transform_conv.ops import families as families_lib

__all__ = [
    "DYNAMIC_MIN_ELEMENTS",
    "QUANTIZATIONS",
    "SPARSE_MIN_ZEROS",
    "WeightStats",
    "basis_conv_bytes",
    "conv_bytes",
    "default_product_op",
    "dense_conv_bytes",
    "form_bytes",
    "sparse_encoding_saving",
    "sparse_saving",
]

QUANTIZATIONS = (None, "dynamic", "float16", "int8")

# Dynamic-range quantization leaves weights with fewer values in float32.
DYNAMIC_MIN_ELEMENTS = 1024
# The converter's sparse encoding (`Optimize.EXPERIMENTAL_SPARSITY`) takes a
# constant with at least this share of zeros.
SPARSE_MIN_ZEROS = 0.3

# Fitted costs (bytes): see the module docstring.
_TENSOR = 32  # a tensor's table
_DIM = 3  # per dimension of its shape
_BUFFER = 39  # a constant's buffer table, vector header and alignment
_OPERATOR = 32  # an operator's table
_OPERATOR_IO = 10  # per input or output of an operator
_QUANT_TABLE = 20  # a tensor's quantization table
_QUANT_CHANNEL = 12  # per scale: a float32 scale and an int64 zero point
_SPARSE_TABLE = 153  # a sparse tensor's sparsity and dimension tables
# Tensor names: the converter's (fused op names) run to 30-130 characters.
_NAME_BASE = 32


_KERNEL_LAYERS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)


def _value_bytes(quantization):
    return {None: 4, "float16": 2, "dynamic": 1, "int8": 1}[quantization]


def _index_bytes(largest):
    return 1 if largest < 256 else 2 if largest < 65536 else 4


@dataclasses.dataclass(frozen=True)
class WeightStats:
    """What the bytes of a constant kernel depend on.

    Attributes:
        size: int, its values.
        nonzeros: int, its nonzero values.
        channels: int, its output channels (per-channel quantization).
        inner: int, the length of its last (TFLite) dimension, along which
            the sparse encoding stores indices.
        rank: int, its dimensions.
    """

    size: int
    nonzeros: int
    channels: int
    inner: int
    rank: int = 4

    @classmethod
    def of(cls, kernel):
        """Stats of a Keras-layout kernel: `(kh, kw, in, out)` or `(in, out)`."""
        kernel = np.asarray(kernel)
        return cls(int(kernel.size), int(np.count_nonzero(kernel)), int(kernel.shape[-1]),
                   int(kernel.shape[-2]), kernel.ndim)

    def zeros(self):
        """The share of zeros."""
        return 1.0 - self.nonzeros / self.size if self.size else 0.0


class _File:
    """Bytes of a piece of a `.tflite` file, added up part by part."""

    def __init__(self, quantization, sparse, name_bytes):
        self.quantization = quantization
        self.sparse = sparse
        self.name_bytes = name_bytes
        self.bytes = 0.0

    def tensor(self, rank=4, scales=0):
        """A tensor's table; `scales`: its quantization scales (0: none)."""
        self.bytes += _TENSOR + _DIM * rank + self.name_bytes
        if scales:
            self.bytes += _QUANT_TABLE + _QUANT_CHANNEL * scales

    def activation(self, rank=4):
        """A computed tensor (per-tensor quantized in int8 files)."""
        self.tensor(rank, 1 if self.quantization == "int8" else 0)

    def operator(self, inputs, outputs=1):
        self.bytes += _OPERATOR + _OPERATOR_IO * (inputs + outputs)

    def buffer(self, nbytes):
        self.bytes += _BUFFER + nbytes

    def index_constant(self, values):
        """An int32 constant (a shape, a permutation, slice bounds)."""
        self.buffer(4 * values)
        self.tensor(1)

    def _float16_dequantize(self, rank):
        self.operator(1)
        self.tensor(rank)

    def stored_sparse(self, stats, dense_only=False):
        """Whether the file stores this kernel sparse-encoded."""
        return (self.sparse and not dense_only and self.quantization != "dynamic"
                and stats.zeros() >= SPARSE_MIN_ZEROS)

    def weight(self, stats, dense_only=False, per_tensor=False, equal_scales=False):
        """A kernel, sparse-encoded where the file does that (then with its DENSIFY).

        `per_tensor`: a grouped form's product kernel, which int8 files
        quantize with one scale where it is stored dense
        (`export.product_scales`). `equal_scales`: a kernel whose channels
        all reach the same largest value (a normalized spread kernel), whose
        scales int8 files write once, stored sparse or dense.
        """
        q = self.quantization
        quantized = q == "int8" or (q == "dynamic" and stats.size >= DYNAMIC_MIN_ELEMENTS)
        scales = stats.channels if quantized else 0
        if equal_scales and q == "int8":
            scales = 1
        if self.stored_sparse(stats, dense_only):
            values = _value_bytes(q) * stats.nonzeros
            rows = stats.size // max(stats.inner, 1)
            indices = (stats.nonzeros * _index_bytes(stats.inner)
                       + (rows + 1) * _index_bytes(stats.nonzeros))
            self.buffer(values + indices)
            self.tensor(stats.rank)  # its scales dropped (`export.sparse_scales`)
            self.bytes += _SPARSE_TABLE
            self.operator(1)  # DENSIFY
            self.tensor(stats.rank, scales)
            if q == "float16":
                self._float16_dequantize(stats.rank)
            return
        width = _value_bytes(q) if quantized or q == "float16" else 4
        self.buffer(width * stats.size)
        self.tensor(stats.rank, 1 if per_tensor and q == "int8" else scales)
        if q == "float16":
            self._float16_dequantize(stats.rank)

    def bias(self, channels, per_tensor=False):
        """A convolution's bias (the converter gives one, of zeros, to a bias-less one);
        `per_tensor`: a product convolution's (`weight`)."""
        q = self.quantization
        if q == "int8":
            self.buffer(4 * channels)
            self.tensor(1, 1 if per_tensor else channels)
        elif q == "float16":
            self.buffer(2 * channels)
            self.tensor(1)
            self._float16_dequantize(1)
        else:
            self.buffer(4 * channels)
            self.tensor(1)

    def vector(self, channels):
        """A per-channel constant added or multiplied after a convolution."""
        q = self.quantization
        if q == "int8":
            self.buffer(channels)
            self.tensor(1, 1)
        else:
            self.bias(channels)


def _name_bytes(layer):
    return _NAME_BASE + 2 * len(layer.name)


def conv_bytes(stats, quantization=None, sparse=False, name_bytes=_NAME_BASE, bias=True):
    """Bytes a convolution (or fully-connected layer) with this kernel adds to a file.

    Its kernel (sparse-encoded when `sparse` and it has at least
    `SPARSE_MIN_ZEROS` zeros, except in dynamic-range files), its bias (the
    converter gives a convolution a bias of zeros when it has none, not a
    fully-connected layer: `bias=False`), its output tensor and its operator.
    """
    file = _File(quantization, sparse, name_bytes)
    file.weight(stats)
    if bias:
        file.bias(stats.channels)
    file.operator(3)
    file.activation()
    return int(round(file.bytes))


def sparse_saving(stats, quantization=None, name_bytes=_NAME_BASE):
    """Bytes the sparse encoding saves on this kernel (negative where it costs)."""
    dense = _File(quantization, False, name_bytes)
    dense.weight(stats)
    sparse = _File(quantization, True, name_bytes)
    sparse.weight(stats)
    return int(round(dense.bytes - sparse.bytes))


def form_bytes(layer, form, quantization=None, plan=None, product_op=None, keep_order=True,
               sparse=None):
    """Predicted bytes that `form` of a built `TransformConv2D` adds to a `.tflite` file.

    What the layer's constants take in a file of `quantization` (with their
    quantization scales and sparse indices), plus its tensors and operators;
    the input tensor is left out (every form reads it).

    Args:
        layer: a built `TransformConv2D`.
        form: `"grouped"`, `"slices"` or `"dense"`.
        quantization: one of `QUANTIZATIONS`.
        plan: the layer's `GroupedPlan` (for `"grouped"`; required there).
        product_op: how the grouped form writes its products
            (`export.grouped.PRODUCT_OPS`); None: what `export_tflite` uses
            for `quantization` (`"fully_connected"` in quantized files).
        keep_order: whether the channel-order pass removes the reorder of
            a default-assignment grouped layer (as `export_tflite` does by
            default).
        sparse: whether the file uses the sparse encoding (None: where the
            grouped form is written, as `export_tflite` does).

    Returns:
        int, bytes.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"Invalid value for argument `quantization`. Expected one of {list(QUANTIZATIONS)}. "
            f"Received quantization={quantization!r}."
        )
    names = _name_bytes(layer)
    if form == "dense":
        kernel = _dense_stats(layer)
        return conv_bytes(kernel, quantization, bool(sparse), names)
    if form == "slices":
        return _slices_bytes(layer, quantization, names)
    if form != "grouped":
        raise ValueError(
            "Invalid value for argument `form`. Expected one of ['grouped', 'slices', "
            f"'dense']. Received form={form!r}."
        )
    if plan is None:
        raise ValueError("form='grouped' needs the layer's `plan` (export.grouped.grouped_plan).")
    if product_op is None:
        product_op = default_product_op(quantization)
    file = _File(quantization, quantization != "dynamic" if sparse is None else sparse, names)
    _grouped(file, layer, plan, product_op, keep_order)
    return int(round(file.bytes))


def default_product_op(quantization):
    """How `export_tflite` writes the grouped form's products for `quantization`."""
    return "conv" if quantization is None else "fully_connected"


def _dense_stats(layer):
    kh, kw = layer.kernel_size
    channels = layer.base_kernel.shape[2]
    size = kh * kw * channels * layer.filters
    return WeightStats(size, size, layer.filters, channels)


def _grouped(file, layer, plan, product_op, keep_order):
    """The grouped form's constants, tensors and operators (`export.grouped`)."""
    plan = plan.for_quantization(file.quantization)  # as `export.deployment_model` writes it
    outputs = plan.written_outputs()
    if plan.phases is not None:
        for kernel in plan.product_kernels():
            file.weight(WeightStats.of(kernel), per_tensor=True)
        if layer.padding == "same":
            file.index_constant(8)
            file.operator(2)
            file.activation()
        for phase in plan.phases:
            dense_product = not file.stored_sparse(WeightStats.of(phase.product_kernel))
            file.index_constant(4)  # slice bounds (the strides are shared)
            file.index_constant(4)
            file.operator(4)
            file.activation()
            file.bias(phase.product_kernel.shape[-1], per_tensor=dense_product)
            file.operator(3)
            file.activation()
            file.weight(WeightStats.of(plan.written_phase_spread(phase)))
            file.bias(outputs)
            file.operator(3)
            file.activation()
        file.index_constant(4)
        file.operator(2 * (len(plan.phases) - 1), len(plan.phases) - 1)  # the sums
        for _ in range(len(plan.phases) - 1):
            file.activation()
    else:
        product = WeightStats.of(plan.product_kernel)
        if product_op == "fully_connected" and fully_connected_products(plan):
            file.weight(product, dense_only=True, per_tensor=True)
            file.operator(3)
            file.activation(2)
            file.index_constant(4)  # RESHAPE back to (batch, rows, cols, channels)
            file.operator(2)
            file.activation()
        else:
            file.weight(product, per_tensor=True)
            file.bias(product.channels, per_tensor=not file.stored_sparse(product))
            file.operator(3)
            file.activation()
        if plan.basis_kernel is not None:
            basis = plan.basis_kernel
            shared = basis.shape[3] == basis.shape[2]
            if shared:  # applied to the products viewed as taps-wide rows
                file.index_constant(4)
                file.operator(2)
                file.activation()
            file.weight(WeightStats.of(basis))
            file.bias(basis.shape[3])
            file.operator(3)
            file.activation()
            if shared:
                file.index_constant(4)
                file.operator(2)
                file.activation()
        normalized = plan.normalized_spread()
        file.weight(WeightStats.of(plan.written_spread()[0]), equal_scales=normalized)
        file.bias(outputs, per_tensor=normalized)
        file.operator(3)
        file.activation()
    if plan.phases is not None and plan.spread_bias is not None:
        file.vector(outputs)
        file.operator(2)
        file.activation()
    if not plan.writes_filters():
        if not plan.selects():
            if not keep_order:
                file.index_constant(5)
                file.index_constant(5)
                file.index_constant(4)
                file.operator(2)
                file.operator(2)
                file.operator(2)
                file.activation()
                file.activation()
                file.activation()
        else:  # a 1x1 convolution with a 0/1 kernel picks the filters
            selection = WeightStats(outputs * layer.filters,
                                    layer.filters * plan.output_index.shape[0],
                                    layer.filters, outputs)
            file.weight(selection)
            file.bias(layer.filters)
            file.operator(3)
            file.activation()
    if layer.bias is not None and plan.spread_bias is None and plan.output_index.shape[0] > 1:
        file.vector(layer.filters)
        file.operator(2)
        file.activation()


# Slices: a fully-connected product, then per tap and segment a STRIDED_SLICE
# (two int32 bound constants) and an ADD, a concatenation, a scale and a bias.
def _slices_bytes(layer, quantization, names):
    kh, kw = layer.kernel_size
    taps = kh * kw
    channels = layer.base_kernel.shape[2]
    g = layer.depth_groups
    file = _File(quantization, False, names)
    n = layer.base_filters
    file.weight(WeightStats(channels * n * taps // g * g, channels * n * taps // g * g,
                            n * taps, channels // g), dense_only=True)
    file.operator(3)
    file.activation()
    plan = getattr(getattr(layer, "_tables", None), "plan", None)
    slices = plan.num_slices() if plan is not None else taps * len(layer.transforms) * g
    segments = len(plan.segments) if plan is not None else len(layer.transforms) * g
    if families_lib.coefficient_kind(layer.transform_family) == "dense":
        slices *= 12  # a multiply-add per pair of taps (measured 1,080 operators for 36 slices)
    for _ in range(slices):
        file.index_constant(4)
        file.index_constant(4)
        file.operator(4)
        file.activation()
    adds = max(slices - segments, 0)
    file.operator(2 * adds, adds)
    file.bytes += adds * (_TENSOR + 4 * _DIM + names
                          + (_QUANT_TABLE + _QUANT_CHANNEL if quantization == "int8" else 0))
    file.operator(segments + 1)  # concatenation
    file.activation()
    file.vector(layer.filters)  # scale
    file.vector(layer.filters)  # bias
    file.operator(2)
    file.operator(2)
    file.activation()
    file.activation()
    return int(round(file.bytes))


def basis_conv_bytes(layer, quantization=None, sparse=None):
    """Predicted bytes a `FilterBasisConv2D` adds to a file, in its own form.

    A depthwise convolution with the basis between two reshape-transposes,
    then a convolution with the coefficients (sparse-encoded, where the
    file uses the encoding: `sparse`, None for every quantization but
    dynamic range).
    """
    names = _name_bytes(layer)
    file = _File(quantization, quantization != "dynamic" if sparse is None else sparse, names)
    for values in (5, 5, 4):
        file.index_constant(values)
        file.operator(2)
        file.activation()
    basis = np.asarray(layer.basis)
    file.weight(WeightStats(basis.size, int(np.count_nonzero(basis)), basis.shape[-1] * basis.shape[-2],
                            basis.shape[-1] * basis.shape[-2]))
    file.bias(basis.shape[-1] * basis.shape[-2])
    file.operator(3)
    file.activation()
    for values in (6, 6, 4):
        file.index_constant(values)
        file.operator(2)
        file.activation()
    coefficients = np.asarray(layer.coefficients)  # (taps, c_in, filters)
    file.weight(WeightStats(coefficients.size, int(np.count_nonzero(coefficients)),
                            coefficients.shape[-1], coefficients.shape[1]))
    file.bias(coefficients.shape[-1])
    file.operator(3)
    file.activation()
    return int(round(file.bytes))


def dense_conv_bytes(layer, quantization=None, sparse=False):
    """Predicted bytes of a convolution holding `layer.materialized_kernel()` (a
    `TransformConv2D` or `FilterBasisConv2D`): its dense form."""
    kernel = np.asarray(layer.materialized_kernel())
    return conv_bytes(WeightStats.of(kernel), quantization, sparse, _name_bytes(layer))


def sparse_encoding_saving(layers, quantization=None):
    """Bytes the sparse encoding saves in a file holding `layers` (negative: it costs).

    Summed over the constants the converter would encode (at least
    `SPARSE_MIN_ZEROS` zeros): the kernels of `Conv2D`, `DepthwiseConv2D`
    and `Dense` layers, the coefficients of `FilterBasisConv2D`, and the
    grouped form's spread, selection and coefficient kernels. The encoding
    is one switch for the whole file (`Optimize.EXPERIMENTAL_SPARSITY`);
    dynamic-range files cannot use it (see the module docstring).
    """
    if quantization == "dynamic":
        return 0
    total = 0
    for stats in _encodable_constants(layers):
        if stats.zeros() >= SPARSE_MIN_ZEROS:
            total += sparse_saving(stats, quantization)
    return total


def _encodable_constants(layers):
    for layer in layers:
        yield from _layer_constants(layer)


def _layer_constants(layer):
    """WeightStats of a layer's kernels, as the converter sees them."""
    if isinstance(layer, GroupedTransformConv2D):
        plan = layer.plan
        if plan.phases is not None:
            for phase in plan.phases:
                yield WeightStats.of(plan.written_phase_spread(phase))
            for kernel in plan.product_kernels():
                yield WeightStats.of(kernel)
        else:
            yield WeightStats.of(plan.written_spread()[0])
            yield WeightStats.of(plan.product_kernel)
        if plan.basis_kernel is not None:
            yield WeightStats.of(plan.basis_kernel)
        if plan.selects():  # the 0/1 selection
            outputs, filters = plan.spread_outputs(), plan.output_index.shape[1]
            yield WeightStats(outputs * filters, filters * plan.output_index.shape[0], filters,
                              outputs)
    elif isinstance(layer, FilterBasisConv2D) and layer.built:
        c = np.asarray(layer.coefficients)  # (taps, c_in, filters)
        yield WeightStats(c.size, int(np.count_nonzero(c)), c.shape[-1], c.shape[1])
    elif isinstance(layer, _KERNEL_LAYERS) and layer.built:
        yield WeightStats.of(np.asarray(layer.kernel))
