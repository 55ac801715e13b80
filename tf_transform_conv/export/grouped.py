"""The *grouped* TFLite form of a `TransformConv2D`: two convolutions XNNPACK runs.

The Keras factored path (`implementation="factored"`) sums `kh * kw` shifted
slices of the product tensor `P = x @ B` per block of outputs. Lowered to
TFLite that is one STRIDED_SLICE and one ADD per tap and block: about 100
operators per layer, and at ~1.5 us of interpreter overhead per operator a
CIFAR ResNet-56 ran 3.3x slower than its dense twin.

The grouped form computes the same function with two convolutions, which
the XNNPACK delegate runs as two nodes:

1. the products `P`, a 1x1 convolution with the bases, its output channels
   laid out `(depth group, base, tap)`;
2. a grouped `kh x kw` convolution of `P` with one group per
   `(depth group, base)`: group `(k, b)` reads that base's `kh * kw` product
   channels and writes one channel per output filter built from base `b`
   (in depth group `k`), whose kernel holds, at tap `u` on the product
   channel of base tap `s`, the filter's scale times `S_o[u, s]`, the entry
   of its tap operator (`tf_transform_conv.ops.families`). For the discrete
   family that is the scale where the transform moves tap `s` to `u` and
   zero elsewhere (a one-tap shift's empty taps are zero); a learned family
   stores its operator's nonzero entries (one per tap for the scalar
   family, up to four for rotations and affine maps).

The second convolution's outputs are grouped by base. The export keeps that
order where it can (`channel_order`); where the layer's filter order is
needed it is restored by a reshape and transpose under the default
assignment (block `j` holds every base under transform `j`), and otherwise
(padded slots of an uneven assignment, or the outputs of `depth_groups > 1`
summed) by a 1x1 convolution with a 0/1 kernel, which XNNPACK runs (a
GATHER would split the file into partitions); in int8 files (layers of
more than 64 filters: smaller ones need no selection there, see below)
that kernel holds each spread channel's gain instead, the spread kernel
normalized (`GroupedPlan.normalized_spread`). Bias and scale ride in the
second convolution.

The second kernel has `kh*kw` nonzeros per output filter among
`(kh*kw)**2`; `export_tflite` converts with TFLite's sparse weight encoding
so the file stores only those, and a DENSIFY operator rebuilds the kernel
once when the interpreter is prepared. int8 files write it with fewer,
wider groups (`GroupedPlan.for_quantization`): XNNPACK's int8 grouped
convolution takes about as long per group whatever the group's width, and
one group per base made int8 grouped layers 2.6-25x slower than their dense
twins. Up to 64 filters the spread is one group that writes the filters
themselves (`single_group`: no padded slots, depth groups summed in it, no
selection after it); wider layers put several bases' kernels on each
group's block diagonal (`spread_groups`).

Multiply-adds per output pixel: `kh*kw*c_in*base_filters` (products, as the
factored path) plus `(kh*kw)**2 * M * base_filters * depth_groups` for the
second convolution, where `M` is the most filters any base builds
(`filters / base_filters` under the default assignment), against
`kh*kw*c_in*filters` for `Conv2D`. The second term is `kh*kw / c_in` of the
dense cost: small for wide layers, not for 16-channel ones.

`GroupedTransformConv2D` is built from a `TransformConv2D` by `from_layer`,
for export only: it is written with `keras.ops` (a grouped `ops.conv`, which
TFLite converts to a grouped `CONV_2D` from either backend's export), holds
its kernels as constants and is not meant for training. Called directly it
computes the layer's output (tested eagerly and under XLA), but slowly on
CPU: keep the Keras layer for anything but conversion.
"""

import collections
import copy

import keras
import numpy as np
from keras import ops

from tf_transform_conv.layers.filter_basis_transform_conv import FilterBasisTransformConv2D
from tf_transform_conv.ops import transforms as transforms_lib

__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "HOMOGENEOUS_ACTIVATIONS",
    "INT8_SPREAD_GROUP_OUTPUTS",
    "PHASE_MAX_PRODUCT_FRACTION",
    "PRODUCT_OPS",
    "GroupedPlan",
    "GroupedTransformConv2D",
    "Phase",
    "fully_connected_products",
    "grouped_plan",
    "grouped_skip_reason",
    "merge_groups",
]


Phase = collections.namedtuple(
    "Phase", ["row", "col", "kernel_rows", "kernel_cols", "product_kernel", "spread_kernel"])
Phase.__doc__ = """One pixel phase of a stride-2 grouped layer (see `grouped_plan`).

Attributes:
    row, col: the phase, 0 or 1: the input pixels `(2i + row, 2j + col)`.
    kernel_rows, kernel_cols: the taps of the layer's kernel on this phase
        (rows `row, row + 2, ...`, columns likewise).
    product_kernel: `(1, 1, c_in / depth_groups, groups * len(taps))`: the
        base taps used on this phase, for every base.
    spread_kernel: `(kernel_rows, kernel_cols, len(taps), outputs)`.
"""


# Keras activations that act on each value alone (not softmax: it mixes the
# channels, and the padded slots of the spread convolution would join in).
ELEMENTWISE_ACTIVATIONS = frozenset(
    ["linear", "relu", "relu6", "elu", "selu", "gelu", "silu", "swish", "sigmoid",
     "hard_sigmoid", "hard_silu", "hard_swish", "tanh", "softplus", "softsign",
     "leaky_relu", "mish", "exponential"]
)


# Those that commute with a positive factor, f(a x) = a f(x): applied before
# the selection of a normalized spread convolution (`GroupedPlan.normalized_spread`).
HOMOGENEOUS_ACTIVATIONS = frozenset(["linear", "relu", "leaky_relu"])


# int8 files: XNNPACK's int8 grouped convolution (TF 2.21) takes about as
# long per group and pixel whatever the group's width (16 groups of 4
# channels as long as 16 groups of 16), and a spread convolution with one
# group per base (9 inputs, 2-8 outputs each) took 4-23x the dense layer's
# time (`benchmarks/int8_spread.py`). Merging bases into one group (a
# block-diagonal kernel: the zeros cost no bytes in the sparse encoding)
# trades those groups for multiply-adds: fastest measured, at every shape
# from 16 to 512 channels, where each group writes about this many channels
# (`GroupedPlan.int8_spread_groups`). A layer of at most this many filters
# is written as one group of the filters (`GroupedPlan.single_group`).
INT8_SPREAD_GROUP_OUTPUTS = 64


class GroupedPlan:
    """The constant tensors of the grouped form of one layer (numpy, float32).

    Attributes:
        product_kernel: `(1, 1, c_in / depth_groups, depth_groups * n * taps)`,
            the 1x1 product convolution (grouped when `depth_groups > 1`).
        spread_kernel: `(kh, kw, taps, depth_groups * n * M)`, the grouped
            second convolution; `M = slots`.
        spread_bias: `(depth_groups * n * M,)` or None: the bias at each
            filter's slot when it can ride in the convolution (one depth
            group), else None (added after).
        output_index: `(depth_groups, filters)` int array: the channel of the
            second convolution's output that holds each filter, per depth
            group.
        transpose: `(n, M)` when `output_index` is the transpose of an
            `(n, M)` grid (the default assignment), else None.
        slots: int, `M`, the most filters that one base builds in one depth
            group.
        phases: list of `Phase` (a stride-2 layer computing its products
            per pixel phase) or None.
        basis_kernel: None, or for a layer whose bases live in a filter
            basis (`layers.FilterBasisTransformConv2D`) the 1x1
            convolution that turns the products with the coefficients into
            the products with the bases' taps (`product_kernel` then holds
            the coefficients): `(1, 1, taps, taps)` when one basis serves
            every base (applied to the products viewed as `taps`-wide
            channels, so the file stores it once), else
            `(1, 1, taps, depth_groups * n * taps)`, grouped, one group per
            depth group and base.
        normalize: bool, whether the layer writes its spread kernel
            normalized where it can (`normalized_spread`; int8 files, see
            `normalized`).
        spread_groups: int or None: the groups the spread convolution is
            written with (`written_spread`): None for one per depth group and
            base (`base_groups`), fewer in int8 files (`for_quantization`).
        single_group: bool, whether the spread convolution is written as
            one group that writes the filters themselves (`written_spread`):
            no padded slots, the depth groups summed in it, its outputs in
            `output_index`'s order and no selection after it (int8 files,
            up to `INT8_SPREAD_GROUP_OUTPUTS` filters).
    """

    def __init__(self, product_kernel, spread_kernel, spread_bias, output_index, transpose, slots,
                 phases=None, basis_kernel=None, normalize=False, spread_groups=None,
                 single_group=False):
        self.product_kernel = product_kernel
        self.spread_kernel = spread_kernel
        self.spread_bias = spread_bias
        self.output_index = output_index
        self.transpose = transpose
        self.slots = slots
        self.phases = phases
        self.basis_kernel = basis_kernel
        self.normalize = normalize
        self.spread_groups = spread_groups
        self.single_group = single_group

    def normalized(self):
        """This plan, its spread kernel written normalized where it can be
        (`normalized_spread`): the form of an int8 file. (A shallow copy: the
        kernels and pixel phases are shared, not built again.)"""
        plan = copy.copy(self)
        plan.normalize = True
        return plan

    def with_spread_groups(self, groups):
        """This plan, its spread convolution written with `groups` groups
        (a divisor of `base_groups()`; consecutive bases share a group, whose
        kernel is block-diagonal). A shallow copy."""
        bases = self.base_groups()
        if not isinstance(groups, int) or groups < 1 or bases % groups:
            raise ValueError(
                f"`groups` must be a positive divisor of the {bases} groups of one base "
                f"each. Received groups={groups!r}."
            )
        plan = copy.copy(self)
        plan.spread_groups = groups
        return plan

    def for_quantization(self, quantization):
        """This plan as a file of `quantization` writes it (None: float32).

        int8 files: up to `INT8_SPREAD_GROUP_OUTPUTS` filters, the spread
        convolution as one group writing the filters (`single_group`);
        more, the spread kernel `normalized` where it can be and its groups
        merged (`int8_spread_groups`). Other files: this plan.
        """
        if quantization != "int8":
            return self
        if self.output_index.shape[1] <= INT8_SPREAD_GROUP_OUTPUTS:
            plan = copy.copy(self)
            plan.single_group = True
            return plan
        return self.normalized().with_spread_groups(self.int8_spread_groups())

    def base_groups(self):
        """The spread convolution's groups of one base each: `depth_groups * n`."""
        return self.spread_outputs() // self.slots

    def int8_spread_groups(self):
        """The groups an int8 file writes the spread convolution with: the
        fewest, among the divisors of `base_groups()`, of which none writes
        more than `INT8_SPREAD_GROUP_OUTPUTS` channels (or one per base where
        a base alone writes more). Measured fastest from 16 to 512 channels
        at ratios 1/2 and 1/4 (`benchmarks/int8_spread.py`), against the
        narrower groups' per-group cost and the wider groups' multiply-adds.
        """
        bases = self.base_groups()
        least = -(-self.spread_outputs() // INT8_SPREAD_GROUP_OUTPUTS)
        for groups in range(least, bases + 1):
            if bases % groups == 0:
                return groups
        return bases

    def _written(self, kernel):
        """`kernel` (a spread kernel of one group per base) as the file holds
        it: with `spread_groups` groups, or as `single_group`."""
        if self.single_group:
            return self._single(kernel)
        if self.spread_groups is None:
            return kernel
        return merge_groups(kernel, self.base_groups(), self.spread_groups)

    def _single(self, kernel):
        """`kernel` (one group per base, padded slots) as one group writing the
        filters in `output_index`'s order, the depth groups summed."""
        kh, kw, width, _ = kernel.shape
        bases = self.base_groups()
        out = np.zeros((kh, kw, bases * width, self.output_index.shape[1]), kernel.dtype)
        for row in self.output_index:  # one per depth group
            for filter_, channel in enumerate(row):
                base = channel // self.slots
                out[:, :, base * width:(base + 1) * width, filter_] += kernel[..., channel]
        return out

    def written_outputs(self):
        """Channels the spread convolution writes in the file (`written_spread`)."""
        return self.output_index.shape[1] if self.single_group else self.spread_outputs()

    def writes_filters(self):
        """Whether the spread convolution writes the filters, in `output_index`'s
        order, with nothing after it (`identity`, or `single_group`)."""
        return self.single_group or self.identity

    def written_phase_spread(self, phase):
        """A pixel phase's spread kernel as the file holds it (groups merged, or
        `single_group`)."""
        return self._written(phase.spread_kernel)

    def with_kernels(self, product_kernel, spread_kernel, **changes):
        """A copy with new kernels (the phases' taken from them) and other fields changed."""
        fields = dict(
            spread_bias=self.spread_bias, output_index=self.output_index,
            transpose=self.transpose, slots=self.slots, basis_kernel=self.basis_kernel,
            normalize=self.normalize, spread_groups=self.spread_groups,
            single_group=self.single_group,
        )
        fields.update(changes)
        phases = None
        if self.phases is not None:
            phases = _phases(product_kernel, spread_kernel, self.spread_kernel.shape[0],
                             self.spread_kernel.shape[1], self.product_kernel.shape[-1]
                             // self.spread_kernel.shape[2])
        return GroupedPlan(product_kernel, spread_kernel, phases=phases, **fields)

    @property
    def identity(self):
        """Whether the second convolution's outputs are already in filter order."""
        g, f = self.output_index.shape
        return g == 1 and self.spread_kernel.shape[-1] == f and np.array_equal(
            self.output_index[0], np.arange(f)
        )

    def stored_values(self):
        """Constants this form adds besides the layer's parameters.

        The spread kernel's nonzeros and the zero bias the converter gives
        the product convolution (and the spread convolution, when the bias
        does not ride in it); a filter basis's 1x1 kernel and its zero bias.
        """
        values = int(np.count_nonzero(self.spread_kernel)) + self.product_kernel.shape[-1]
        if self.basis_kernel is not None:
            values += self.basis_kernel.size + self.basis_kernel.shape[-1]
        if self.phases is not None:
            # Each phase's product convolution has its own zero bias, and
            # phases reading different base taps store those taps' values
            # again (the converter stores identical kernels once).
            values += sum(phase.product_kernel.shape[-1] for phase in self.phases)
            values += sum(k.size for k in self.product_kernels()) - self.product_kernel.size
            values -= self.product_kernel.shape[-1]
        if self.spread_bias is None:
            values += self.spread_outputs()
        return values

    def product_kernels(self):
        """The distinct product kernels a file holds: `[product_kernel]`, or
        the pixel phases' (the converter stores identical kernels once)."""
        if self.phases is None:
            return [self.product_kernel]
        distinct = {}
        for phase in self.phases:
            kernel = phase.product_kernel
            distinct.setdefault((kernel.shape, kernel.tobytes()), kernel)
        return list(distinct.values())

    def product_taps(self):
        """Base taps multiplied per output pixel (per base and input channel):
        `kh*kw` at every input pixel, or the phases' when the layer has them."""
        if self.phases is None:
            return None
        groups = self.product_kernel.shape[-1] // self.spread_kernel.shape[2]
        return sum(phase.product_kernel.shape[-1] // groups for phase in self.phases)

    def spread_outputs(self):
        """Channels the second convolution writes (padded slots included)."""
        return self.spread_kernel.shape[-1]

    def selects(self):
        """Whether a 1x1 convolution picks the filters from the second
        convolution's outputs (padded slots, or depth groups summed)."""
        return not self.writes_filters() and self.transpose is None

    def normalized_spread(self):
        """Whether the grouped layer writes its spread kernel normalized.

        In a plan made `normalized`, where a selection follows the spread
        convolution (`selects`) and there are no pixel phases (whose spread
        kernels are summed before it): each of the spread convolution's
        output channels is divided by its largest absolute weight and the
        selection multiplies it back (`written_spread`). Every channel's
        weights then reach exactly 1, so an int8 file's per-channel scales
        are all equal and take one value
        (`export.product_scales.collapse_equal_scales`), with the same int8
        weights. (In other files it would only add a weight per padded slot.)
        """
        return self.normalize and self.phases is None and self.selects()

    def written_spread(self):
        """`(kernel, bias, gains)`: the spread convolution as the file holds it.

        Normalized (`normalized_spread`): each output channel divided by its
        largest absolute weight, `gains` (1 for a padded slot, which gets a
        1 at its first weight so that it too reaches 1; the selection gives
        it no weight), and the bias likewise. Else the plan's kernel and
        bias, and `gains` None. The kernel has `spread_groups` groups, or is
        `single_group` (its bias then in the filters' order).
        """
        if self.single_group:
            bias = None if self.spread_bias is None else \
                self.spread_bias[self.output_index[0]].astype(np.float32)
            return self._written(self.spread_kernel), bias, None
        if not self.normalized_spread():
            return self._written(self.spread_kernel), self.spread_bias, None
        outputs = self.spread_outputs()
        gains = np.abs(self.spread_kernel).reshape(-1, outputs).max(axis=0)
        gains = np.where(gains > 0, gains, 1.0).astype(np.float32)
        flat = (self.spread_kernel / gains).reshape(-1, outputs)
        flat[0, ~np.any(flat != 0, axis=0)] = 1.0
        kernel = flat.reshape(self.spread_kernel.shape).astype(np.float32)
        bias = None if self.spread_bias is None else (self.spread_bias / gains).astype(np.float32)
        return self._written(kernel), bias, gains


def merge_groups(kernel, groups, merged):
    """A grouped convolution's kernel with its groups merged, `merged` of them.

    `kernel`: `(kh, kw, width, outputs)`, `groups` groups (group `i` reads
    input channels `i * width ...` and writes outputs `i * outputs / groups
    ...`). Returns `(kh, kw, width * groups / merged, outputs)`: merged
    group `m` holds groups `m * k ... (m + 1) * k - 1` (`k = groups /
    merged`) on its block diagonal, zeros elsewhere; the same convolution.
    """
    kh, kw, width, outputs = kernel.shape
    if groups % merged or outputs % groups:
        raise ValueError(
            f"Cannot merge {groups} groups of a kernel with {outputs} outputs into "
            f"{merged}: both must divide evenly."
        )
    k, per = groups // merged, outputs // groups
    source = kernel.reshape(kh, kw, width, merged, k, per)
    out = np.zeros((kh, kw, k, width, merged, k, per), kernel.dtype)
    for member in range(k):
        out[:, :, member, :, :, member, :] = source[:, :, :, :, member, :]
    return out.reshape(kh, kw, k * width, outputs)


# How the stride-1 products are written: a 1x1 CONV_2D, or a FULLY_CONNECTED
# (without the zero bias the converter gives a convolution; see
# `GroupedTransformConv2D`).
PRODUCT_OPS = ("conv", "fully_connected")

# A stride-2 layer computes its products per pixel phase when that multiplies
# at most this fraction of what products at every input pixel do.
PHASE_MAX_PRODUCT_FRACTION = 0.75


def _phases(product_kernel, spread_kernel, kh, kw, groups):
    """The pixel phases of a stride-2 layer's kernels (None if they save too little)."""
    taps = kh * kw
    total = 0
    phases = []
    for row in (0, 1):
        for col in (0, 1):
            spread = spread_kernel[row::2, col::2]
            if spread.size == 0:
                continue
            used = np.flatnonzero(np.any(spread != 0, axis=(0, 1, 3)))
            if used.size == 0:
                continue
            channels = (np.arange(groups)[:, None] * taps + used[None, :]).reshape(-1)
            phases.append(Phase(row, col, spread.shape[0], spread.shape[1],
                                np.ascontiguousarray(product_kernel[..., channels]),
                                np.ascontiguousarray(spread[:, :, used, :])))
            total += used.size
    if total > PHASE_MAX_PRODUCT_FRACTION * 4 * taps:
        return None
    return phases


def grouped_skip_reason(layer):
    """Why `layer` cannot use the grouped form, or None if it can.

    The grouped form covers every configuration `TransformConv2D` accepts
    today (kernel sizes, strides or dilation, "valid"/"same", depth groups,
    scale, any assignment); the checks guard against configurations a
    future layer might add. It is exact whenever it applies.
    """
    if max(layer.strides) > 1 and max(layer.dilation_rate) > 1:  # the layer forbids it
        return "strides and dilation together"
    if layer.padding not in ("valid", "same"):
        return f"padding={layer.padding!r}"
    return None


def _filter_basis(layer):
    """`(basis_groups, taps, taps)` of a layer whose bases live in a filter basis, else None."""
    if not isinstance(layer, FilterBasisTransformConv2D):
        return None
    return np.asarray(keras.ops.convert_to_numpy(layer.basis_filters), np.float32)


def grouped_plan(layer):
    """The `GroupedPlan` of a built `TransformConv2D`, from its current weights."""
    kh, kw = layer.kernel_size
    taps, g, n, f = kh * kw, layer.depth_groups, layer.base_filters, layer.filters
    base = np.asarray(keras.ops.convert_to_numpy(layer.base_kernel), np.float32)
    basis = _filter_basis(layer)
    channels = base.shape[2]
    cg = channels // g
    scale = (
        np.ones(f, np.float32)
        if layer.scale_weight is None
        else np.asarray(keras.ops.convert_to_numpy(layer.scale_weight), np.float32)
    )
    assignment = layer.assignment  # (g, f, 2)
    src = transforms_lib.tap_tables(layer.transforms, layer.kernel_size)  # (T, taps)

    # Products: channel ((k * n + b) * taps + s) = x[group k] . base[tap s, :, b].
    product = base.reshape(taps, g, cg, n).transpose(2, 1, 3, 0)  # (cg, g, n, taps)
    product_kernel = product.reshape(1, 1, cg, g * n * taps)

    # Slots: the filters built from base b in group k, in filter order.
    slot = np.zeros((g, f), np.int64)
    counts = np.zeros((g, n), np.int64)
    for k in range(g):
        for o in range(f):
            b = assignment[k, o, 0]
            slot[k, o] = counts[k, b]
            counts[k, b] += 1
    slots = max(int(counts.max()), 1)
    output_index = (np.arange(g)[:, None] * n + assignment[..., 0]) * slots + slot

    spread = np.zeros((taps, taps, g * n * slots), np.float32)  # (u, s, out)
    if layer.transform_family == "discrete":
        for k in range(g):
            for o in range(f):
                sources = src[assignment[k, o, 1]]  # base tap landing on each tap u
                for u in np.flatnonzero(sources >= 0):
                    spread[u, sources[u], output_index[k, o]] = scale[o]
    else:
        # Output o reads base tap s through tap u with weight scale[o] * S_o[u, s].
        operators = np.asarray(keras.ops.convert_to_numpy(layer.transform_operators()))
        spread[:, :, output_index.reshape(-1)] = np.transpose(
            (operators * scale[None, :, None, None]).reshape(g * f, taps, taps), (1, 2, 0)
        )
    spread_kernel = spread.reshape(kh, kw, taps, g * n * slots)

    spread_bias = None
    if layer.bias is not None and g == 1:
        spread_bias = np.zeros(g * n * slots, np.float32)
        spread_bias[output_index[0]] = keras.ops.convert_to_numpy(layer.bias)

    transpose = None
    if g == 1 and n * slots == f:
        grid = (np.arange(f) % n) * slots + np.arange(f) // n
        if slots > 1 and n > 1 and np.array_equal(output_index[0], grid):
            transpose = (n, slots)
    # Bases in a filter basis: `base` above holds the coefficients C, so the
    # products are x . C[j]; base tap s is sum_j F[j, s] (x . C[j]), one
    # grouped 1x1 convolution per (depth group, base) with the basis group's
    # F. (Every tap then needs every coefficient's products: no pixel phases.)
    basis_kernel = None
    if basis is not None and basis.shape[0] == 1:
        basis_kernel = basis.reshape(1, 1, taps, taps)
    elif basis is not None:
        per_group = np.repeat(basis, g // basis.shape[0], axis=0)  # (g, j, s)
        basis_kernel = np.repeat(per_group, n, axis=0)  # (g * n, j, s)
        basis_kernel = basis_kernel.transpose(1, 0, 2).reshape(1, 1, taps, g * n * taps)
    # Stride 2: the taps on even and odd rows and columns read disjoint pixel
    # phases; each base tap is needed only on the phases its transforms move
    # it to (under rotations: corners, edges twice, centre: 13 of 36).
    phases = None
    if (tuple(layer.strides) == (2, 2) and tuple(layer.dilation_rate) == (1, 1)
            and layer.data_format == "channels_last" and basis is None):
        phases = _phases(product_kernel, spread_kernel, kh, kw, g * n)
    return GroupedPlan(
        product_kernel, spread_kernel, spread_bias, output_index.astype(np.int32),
        transpose, slots, phases=phases, basis_kernel=basis_kernel,
    )


def fully_connected_products(plan):
    """Whether `product_op="fully_connected"` writes `plan`'s products as a
    matrix product: one depth group, products at every pixel (no pixel
    phases) and dense bases (not a filter basis, whose sparse coefficients
    a fully-connected operator would read sparse, outside XNNPACK)."""
    return plan.phases is None and plan.basis_kernel is None and plan.output_index.shape[0] == 1


class GroupedTransformConv2D(keras.layers.Layer):
    """A `TransformConv2D` in the grouped form, for TFLite export (`keras.ops`: any backend).

    Build it with `GroupedTransformConv2D.from_layer(layer)`: it holds the
    layer's configuration and its `GroupedPlan` as constants. See the module
    docstring for the computation.
    """

    def __init__(self, filters, kernel_size, strides, padding, dilation_rate, data_format,
                 activation, bias, plan, product_op="conv", **kwargs):
        super().__init__(**kwargs)
        if product_op not in PRODUCT_OPS:
            raise ValueError(
                f"Invalid value for argument `product_op`. Expected one of {list(PRODUCT_OPS)}. "
                f"Received product_op={product_op!r}."
            )
        self.filters = filters
        self.kernel_size = tuple(kernel_size)
        self.strides = tuple(strides)
        self.padding = padding
        self.dilation_rate = tuple(dilation_rate)
        self.data_format = data_format
        self.activation = activation
        self._bias = bias
        self.plan = plan
        self.product_op = product_op

    @classmethod
    def from_layer(cls, layer, plan=None, product_op="conv", quantization=None):
        """The grouped form of a built `TransformConv2D` (its current weights).

        `plan`: the layer's `GroupedPlan` when the caller already built it
        (`lowering_decision` does), else None to build it here.
        `product_op`: how the products are written, one of `PRODUCT_OPS`
        (see `GroupedTransformConv2D`). `quantization`: the file's
        (`export_tflite`'s: None, `"dynamic"`, `"float16"` or `"int8"`),
        which picks how the spread convolution is written
        (`GroupedPlan.for_quantization`).
        """
        reason = grouped_skip_reason(layer)
        if reason is not None:
            raise ValueError(
                f"Layer {layer.name!r} cannot be written in the grouped form: {reason}."
            )
        if plan is None:
            plan = grouped_plan(layer)
        plan = plan.for_quantization(quantization)
        bias = None
        if layer.bias is not None and plan.spread_bias is None:
            bias = np.asarray(keras.ops.convert_to_numpy(layer.bias), np.float32)
        return cls(
            filters=layer.filters,
            kernel_size=layer.kernel_size,
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
            activation=layer.activation,
            bias=bias,
            plan=plan,
            product_op=product_op,
            name=layer.name,
            dtype=layer.dtype_policy,
        )

    def compute_output_shape(self, input_shape):
        def size(n, k, s, d):
            if n is None:
                return None
            span = (k - 1) * d + 1
            return -(-n // s) if self.padding == "same" else (n - span) // s + 1

        if self.data_format == "channels_last":
            b, h, w, _ = input_shape
        else:
            b, _, h, w = input_shape
        oh, ow = (
            size(n, k, s, d)
            for n, k, s, d in zip((h, w), self.kernel_size, self.strides, self.dilation_rate)
        )
        if self.data_format == "channels_last":
            return (b, oh, ow, self.filters)
        return (b, self.filters, oh, ow)

    def call(self, inputs):
        plan = self.plan
        dtype = inputs.dtype
        x = inputs
        if self.data_format == "channels_first":
            x = ops.transpose(x, (0, 2, 3, 1))
        spread, spread_bias, gains = plan.written_spread()
        if plan.phases is not None:
            y = self._phase_sum(x, dtype)
        else:
            products = self._products(x, dtype)
            if plan.basis_kernel is not None:
                products = self._tap_products(products, dtype)
            # Grouped (one group per base, or several bases per group in an
            # int8 file): the kernel's input depth is the group's width.
            y = ops.conv(
                products,
                ops.convert_to_tensor(spread, dtype),
                strides=self.strides,
                padding=self.padding,
                data_format="channels_last",
                dilation_rate=self.dilation_rate,
            )
        if spread_bias is not None:
            y = y + ops.convert_to_tensor(spread_bias, dtype)
        # An elementwise activation commutes with reordering the channels:
        # applied first, the converter fuses it into the convolution. On
        # normalized channels, only one that commutes with a positive scale.
        early = self._bias is None and self._elementwise_activation(
            HOMOGENEOUS_ACTIVATIONS if gains is not None else ELEMENTWISE_ACTIVATIONS)
        if early:
            y = self.activation(y)
        y = self._to_filter_order(y, gains)
        if self._bias is not None:
            y = y + ops.convert_to_tensor(self._bias, dtype)
        if self.data_format == "channels_first":
            y = ops.transpose(y, (0, 3, 1, 2))
        if self.activation is not None and not early:
            y = self.activation(y)
        return y

    def _products(self, x, dtype):
        """The stride-1 products `P` (channels_last `x`): a 1x1 convolution, or a
        matrix product where `product_op="fully_connected"` allows it."""
        kernel = self.plan.product_kernel
        if self.product_op == "fully_connected" and fully_connected_products(self.plan):
            # TFLite: FULLY_CONNECTED (no bias operand), then a RESHAPE.
            return ops.einsum("bhwc,cd->bhwd", x, ops.convert_to_tensor(kernel[0, 0], dtype))
        return ops.conv(x, ops.convert_to_tensor(kernel, dtype), 1, "valid",
                        data_format="channels_last")

    def _tap_products(self, products, dtype):
        """Products with the coefficients -> products with the bases' taps (filter basis)."""
        kernel = ops.convert_to_tensor(self.plan.basis_kernel, dtype)
        taps = kernel.shape[2]
        if kernel.shape[3] != taps:  # one basis per group of bases: grouped
            return ops.conv(products, kernel, 1, "valid", data_format="channels_last")
        # One basis for all: each (base, pixel) is a taps-wide row of one 1x1
        # convolution, so the file holds the basis once.
        batch, h, w, c = ops.shape(products)[0], products.shape[1], products.shape[2], \
            products.shape[3]
        rows = ops.reshape(products, (batch, h, w * (c // taps), taps))
        rows = ops.conv(rows, kernel, 1, "valid", data_format="channels_last")
        return ops.reshape(rows, (batch, h, w, c))

    def _phase_sum(self, x, dtype):
        """The stride-2 convolution as a sum over pixel phases (channels_last `x`).

        Phase `(r, c)`: a 1x1 product convolution with stride 2 of the
        input from pixel `(r, c)` on, with the base taps that phase uses,
        then a stride-1 grouped convolution with the phase's taps.
        """
        kh, kw = self.kernel_size
        height, width = x.shape[1], x.shape[2]
        if self.padding == "same":
            # TensorFlow's: the extra row or column at the bottom and right.
            rows, cols = -(-height // 2), -(-width // 2)
            pad_h = max((rows - 1) * 2 + kh - height, 0)
            pad_w = max((cols - 1) * 2 + kw - width, 0)
            x = ops.pad(x, [[0, 0], [pad_h // 2, pad_h - pad_h // 2],
                            [pad_w // 2, pad_w - pad_w // 2], [0, 0]])
            height, width = height + pad_h, width + pad_w
        out_h, out_w = (height - kh) // 2 + 1, (width - kw) // 2 + 1
        y = None
        for phase in self.plan.phases:
            rows = out_h + phase.kernel_rows - 1
            cols = out_w + phase.kernel_cols - 1
            part = x[:, phase.row: phase.row + 2 * rows - 1,
                     phase.col: phase.col + 2 * cols - 1, :]
            products = ops.conv(part, ops.convert_to_tensor(phase.product_kernel, dtype), 2,
                                "valid", data_format="channels_last")
            spread = ops.convert_to_tensor(self.plan.written_phase_spread(phase), dtype)
            term = ops.conv(products, spread, 1, "valid", data_format="channels_last")
            y = term if y is None else y + term
        return y

    def _elementwise_activation(self, names):
        if self.activation is None:
            return False
        try:
            name = keras.activations.serialize(self.activation)
        except ValueError:
            return False
        return isinstance(name, str) and name in names

    def _to_filter_order(self, y, gains=None):
        plan = self.plan
        if plan.writes_filters():
            return y
        if plan.transpose is not None:
            batch, h, w = ops.shape(y)[0], y.shape[1], y.shape[2]
            y = ops.transpose(ops.reshape(y, (batch, h, w) + plan.transpose), (0, 1, 2, 4, 3))
            return ops.reshape(y, (batch, h, w, self.filters))
        # A 1x1 convolution with a 0/1 kernel picks (and, over depth groups,
        # adds) each filter's channel: XNNPACK runs it, where a GATHER per
        # layer split a converted ResNet-56's file into 54 partitions (3.1x
        # the dense model's latency against 2.3x with the convolutions).
        # With a normalized spread kernel the selection holds each channel's gain.
        gains = np.ones(plan.spread_outputs(), np.float32) if gains is None else gains
        selection = np.zeros((1, 1, plan.spread_outputs(), self.filters), np.float32)
        for index in plan.output_index:
            selection[0, 0, index, np.arange(self.filters)] += gains[index]
        return ops.conv(y, ops.convert_to_tensor(selection, y.dtype), 1, "valid",
                        data_format="channels_last")
