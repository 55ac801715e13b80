"""The factored execution of `TransformConv2D`: products once, then cheap sums.

Output filter `o` (depth group `k`) is `S_{k,o} @ B[..., b_k(o)]` on the taps
(`tf_transform_conv.ops.families`), with `S = L @ Pi_t`: a learned operator `L`
after the discrete transform `t`. Convolution is linear, so

    y[..., o] = sum_k sum_u sum_w L_{k,o}[u, w] * P_k[shift_u, src_t(w), b_k(o)]

where `P_k = x_k @ B_k` holds the base convolution's per-tap products
(computed once, `kh * kw * base_filters` channels per depth group) and
`shift_u` reads `P` at the offset of output tap `u`. The discrete family has
`L = I` (one addition per tap), the scalar family a diagonal `L` (one
multiply-add per tap), the sampled and general families a full `L` (a
multiply-add per pair of taps that `Pi_t` keeps).

The product channel that output `o` reads through tap `w` is
`index[w, k, o]` (or -1 where `Pi_t` zeroes tap `w`). Outputs are laid out in
*segments* (see `SegmentPlan`): runs of outputs whose channels, at every tap,
are one contiguous slice of `P`, so each term is a slice that XLA fuses into
one loop. Assignments too scattered for that gather channels per tap instead.

Training goes through `dense_gradient`: the factored forward, with the
gradient of the equivalent dense convolution (`conv(x, W)` with the
materialised kernel) for the backward pass. That is what makes training
memory bounded: differentiating the shifted slices themselves materialises a
product-sized gradient per slice, which without XLA's fusion took 4-6 GB on
a small CNN (docs/benchmarks/train_cost.md).
"""

import numpy as np
import keras
from keras import ops

# Above this many slice terms per call, the additions gather channels with
# `take` per tap instead of slicing contiguous output segments.
MAX_SLICE_TERMS = 512


class Segment:
    """A run of outputs that reads one contiguous slice of `P` per (tap, group).

    Attributes:
        entries: dict `(w, k) -> start`: the segment's `i`-th output reads
            product channel `start + i` through tap `w` in group `k` (absent
            where the segment's transform zeroes tap `w`).
        width: int, the number of outputs.
        outputs: int array `(width,)`, the output filter at each position
            (one representative when identical outputs were merged).
    """

    def __init__(self, entries, width, outputs):
        self.entries = entries
        self.width = width
        self.outputs = np.asarray(outputs, np.int64)

    def output_slice(self):
        """`slice(first, last + 1)` when `outputs` is an ascending run, else None."""
        o = self.outputs
        if len(o) and np.array_equal(o, np.arange(o[0], o[0] + len(o))):
            return slice(int(o[0]), int(o[0]) + len(o))
        return None


class SegmentPlan:
    """How the factored sums lay out their outputs.

    Attributes:
        segments: list of `Segment`, in the order their sums are concatenated.
        output_index: int array mapping each output filter to its position in
            the concatenated segments, or None when that is the identity.
    """

    def __init__(self, segments, output_index):
        self.segments = segments
        self.output_index = output_index

    def num_slices(self):
        """Slices read, one per segment entry."""
        return sum(len(segment.entries) for segment in self.segments)


def plan_segments(index, merge_identical=True):
    """Plans the factored sums for `index` `(taps, groups, filters)`.

    Outputs are ordered so that runs of them read, at every tap and group,
    consecutive product channels (the default assignment: one segment per
    transform block, in filter order). With `merge_identical`, outputs
    reading exactly the same channels are computed once (discrete family
    without learned coefficients); a learned family has per-output
    coefficients, so every output is its own.
    """
    taps, groups, filters = index.shape
    columns = index.reshape(taps * groups, filters).T  # one row per output
    if merge_identical:
        unique, first, inverse = np.unique(
            columns, axis=0, return_index=True, return_inverse=True
        )
        inverse = inverse.reshape(-1)
    else:
        unique, first, inverse = columns, np.arange(filters), np.arange(filters)

    def signature(row):
        valid = row >= 0
        lead = int(row[valid][0]) if valid.any() else 0
        return tuple(np.where(valid, row - lead, -1).tolist()), lead

    # Group rows by signature (in order of first use, so the default
    # assignment keeps its order), then by leading channel.
    first_use = {}
    for o in range(filters):
        first_use.setdefault(signature(unique[inverse[o]])[0], o)

    def key(r):
        sig, lead = signature(unique[r])
        return first_use[sig], lead

    keyed = sorted(range(len(unique)), key=key)
    runs, position = [], np.empty(len(unique), np.int64)
    previous = None
    for slot, r in enumerate(keyed):
        sig, lead = signature(unique[r])
        if previous is not None and previous == (sig, lead - 1) and sig != (-1,) * len(sig):
            runs[-1][1].append(int(first[r]))
        else:
            entries = {
                divmod(col, groups): int(unique[r][col])
                for col in range(taps * groups)
                if unique[r][col] >= 0
            }
            runs.append((entries, [int(first[r])]))
        previous = (sig, lead)
        position[r] = slot
    output_index = position[inverse]
    if np.array_equal(output_index, np.arange(filters)):
        output_index = None
    segments = [Segment(entries, len(outputs), outputs) for entries, outputs in runs]
    return SegmentPlan(segments, output_index)


# ----------------------------------------------------------------------------
# The two stages


def products(x, base, depth_groups):
    """`P = x @ B` per depth group, channels laid out `(group, tap, base)`.

    Args:
        x: `(batch, h, w, c_in)` channels-last input.
        base: `(kh, kw, c_in, n)` base kernel, in the compute dtype.
        depth_groups: int.
    """
    kh, kw, channels, n = base.shape
    taps, g = kh * kw, depth_groups
    cg = channels // g
    base = ops.reshape(base, (taps, g, cg, n))
    base = ops.reshape(ops.transpose(base, (1, 2, 0, 3)), (g, cg, taps * n))
    if g == 1:
        return ops.matmul(x, base[0])
    batch_shape = tuple(ops.shape(x)[:-1])
    out = ops.einsum("bhwgc,gcm->bhwgm", ops.reshape(x, batch_shape + (g, cg)), base)
    return ops.reshape(out, batch_shape + (g * taps * n,))


def shifted_window(tensor, u, kernel_size, strides, dilation_rate, output_size):
    """The view of `tensor` that output tap `u` (row-major) reads."""
    (_, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation_rate
    oh, ow = output_size
    i, j = divmod(u, kw)
    return tensor[
        :,
        i * dh : i * dh + (oh - 1) * sh + 1 : sh,
        j * dw : j * dw + (ow - 1) * sw + 1 : sw,
        :,
    ]


def segment_sums(windows, plan, coefficients=None, kind=None, scale=None, bias=None):
    """The concatenated sums of every segment.

    Each segment's sum is scaled and offset by its outputs' `scale` and
    `bias` before the concatenation: added after it, XLA fuses the bias into
    the sums' loop and runs it several times slower (measured on CPU). Pass
    them only when each position holds one output (`plan.output_index` is
    None): merged outputs share a position but not their scale and bias.

    Args:
        windows: the shifted views of `P`, one per tap.
        plan: a `SegmentPlan`.
        coefficients: None for the discrete family; filters last, so each
            term multiplies by a contiguous vector: for `kind="diagonal"` the
            per-tap multipliers `(groups, taps, filters)`, for
            `kind="dense"` the operators `L` as `(groups, taps_u, taps_w,
            filters)` (`families.coefficients`).
        scale: optional `(filters,)` tensor.
        bias: optional `(filters,)` tensor.
    """
    taps = len(windows)
    parts = []
    for segment in plan.segments:
        width = segment.width
        rows = _segment_coefficients(coefficients, segment)
        total = None
        for (w, k), start in segment.entries.items():
            if kind is None:
                terms = [windows[w][..., start : start + width]]
            elif kind == "diagonal":
                terms = [windows[w][..., start : start + width] * rows[k][w]]
            else:
                terms = [
                    windows[u][..., start : start + width] * rows[k][u, w]
                    for u in range(taps)
                ]
            for term in terms:
                total = term if total is None else total + term
        if total is None:  # every tap zeroed (shifts of a 1x1 kernel)
            total = ops.zeros(ops.shape(windows[0])[:-1] + (width,), windows[0].dtype)
        if scale is not None:
            total = total * _segment_vector(scale, segment)
        if bias is not None:
            total = total + _segment_vector(bias, segment)
        parts.append(total)
    return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)


def _segment_vector(vector, segment):
    span = segment.output_slice()
    return vector[span] if span is not None else ops.take(vector, segment.outputs, axis=0)


def _segment_coefficients(coefficients, segment):
    """Per group, the coefficients of the segment's outputs, filters last (or None)."""
    if coefficients is None:
        return None
    span = segment.output_slice()
    groups = coefficients.shape[0]
    if span is not None:
        return [coefficients[k, ..., span] for k in range(groups)]
    return [ops.take(coefficients[k], segment.outputs, axis=-1) for k in range(groups)]


def gathered_sums(products, window, index, coefficients=None, kind=None):
    """Sum over taps and groups of `window(P, w)[..., index[w, k]]` (-1 reads zero), in filter order.

    The fallback for assignments too scattered for contiguous segments: one
    channel gather per (tap, group). For the dense kind, each gathered tensor
    is weighted into one accumulator per output tap `u` before any shift
    (`R_u = sum_w L[:, u, w] * P[index[w]]`, then `sum_u window(R_u, u)`):
    `kh*kw * groups` gathers instead of `(kh*kw)**2 * groups`, which
    compiled for minutes and took gigabytes.

    Args:
        products: the (padded) product tensor `P`.
        window: `window(tensor, u)`, the view of `tensor` that output tap `u`
            reads.
        index: int array `(taps, groups, filters)`.
        coefficients: as `segment_sums` takes them (filters last).
        kind: as `segment_sums` takes it.
    """
    taps, groups, filters = index.shape
    total = None
    accumulators = [None] * taps
    for w in range(taps):
        for k in range(groups):
            idx = index[w, k]
            if (idx < 0).all():
                continue
            mask = None
            if (idx < 0).any():
                mask = (idx >= 0).astype("float32")
            if kind == "dense":
                term = ops.take(products, np.maximum(idx, 0), axis=-1)
                if mask is not None:
                    term = term * ops.cast(mask, term.dtype)
                for u in range(taps):
                    part = term * coefficients[k, u, w]
                    accumulators[u] = part if accumulators[u] is None else accumulators[u] + part
                continue
            term = ops.take(window(products, w), np.maximum(idx, 0), axis=-1)
            if kind == "diagonal":
                term = term * coefficients[k, w]
            if mask is not None:
                term = term * ops.cast(mask, term.dtype)
            total = term if total is None else total + term
    for u, accumulator in enumerate(accumulators):
        if accumulator is not None:
            term = window(accumulator, u)
            total = term if total is None else total + term
    if total is None:  # every tap zeroed
        total = ops.zeros(ops.shape(window(products, 0))[:-1] + (filters,), products.dtype)
    return total


def slice_terms(plan, kind, taps):
    """How many slice terms `segment_sums` adds for `plan` and coefficient `kind`."""
    return plan.num_slices() * (taps if kind == "dense" else 1)


# ----------------------------------------------------------------------------
# Geometry and the whole forward pass

# The factored path pads the input before the products (no bounds checks in
# the additions) unless that grows the products by more than this factor; then
# it pads the products instead.
MAX_INPUT_PAD_GROWTH = 1.25


class Geometry:
    """A layer's convolution geometry: kernel, strides, dilation, padding (channels last)."""

    def __init__(self, kernel_size, strides, dilation_rate, padding):
        self.kernel_size = tuple(kernel_size)
        self.strides = tuple(strides)
        self.dilation_rate = tuple(dilation_rate)
        self.padding = padding

    def output_size(self, h, w):
        """`(oh, ow)` as `Conv2D` computes them (None stays None)."""
        out = []
        for size, k, s, d in zip((h, w), self.kernel_size, self.strides, self.dilation_rate):
            if size is None:
                out.append(None)
            elif self.padding == "same":
                out.append(-(-size // s))
            else:
                out.append((size - (k - 1) * d - 1) // s + 1)
        return tuple(out)

    def padding_plan(self, h, w):
        """`((top, bottom), (left, right))`, and whether to pad the input (else the products)."""
        if self.padding == "valid":
            return ((0, 0), (0, 0)), False
        oh, ow = self.output_size(h, w)
        pads = []
        for size, out, k, s, d in zip(
            (h, w), (oh, ow), self.kernel_size, self.strides, self.dilation_rate
        ):
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        growth = (h + sum(pads[0])) * (w + sum(pads[1])) / (h * w)
        return tuple(pads), growth <= MAX_INPUT_PAD_GROWTH

    def window(self, tensor, u, output_size):
        """The view of `tensor` that output tap `u` reads."""
        return shifted_window(
            tensor, u, self.kernel_size, self.strides, self.dilation_rate, output_size
        )


def forward(x, base, tables, geometry, depth_groups, coefficients=None, kind=None,
            scale=None, bias=None):
    """The whole factored path on channels-last `x`: pad, products, sums.

    Args:
        x: `(batch, h, w, c_in)` with static `h` and `w`.
        base: `(kh, kw, c_in, n)` base kernel, compute dtype.
        tables: the layer's `layout.IndexTables` (`plan`, `factored`).
        geometry: a `Geometry`.
        depth_groups: int.
        coefficients: the learned operators, as `segment_sums` takes
            them, or None.
        kind: their kind, as `segment_sums` takes it, or None.
        scale: optional `(filters,)` tensor.
        bias: optional `(filters,)` tensor.
    """
    h, w = x.shape[1], x.shape[2]
    if h is None or w is None:
        raise ValueError(
            "The factored implementation needs static spatial dimensions; "
            f"received inputs of shape {x.shape}. Use "
            "implementation='materialized' for inputs of unknown size."
        )
    out_size = geometry.output_size(h, w)
    (pad_h, pad_w), pad_input = geometry.padding_plan(h, w)
    padded = any(pad_h + pad_w)
    if padded and pad_input:
        x = ops.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    p = products(x, base, depth_groups)
    if padded and not pad_input:
        p = ops.pad(p, ((0, 0), pad_h, pad_w, (0, 0)))

    def window(tensor, u):
        return geometry.window(tensor, u, out_size)

    plan = tables.plan
    taps = geometry.kernel_size[0] * geometry.kernel_size[1]
    if slice_terms(plan, kind, taps) <= MAX_SLICE_TERMS:
        windows = [window(p, u) for u in range(taps)]
        if plan.output_index is None:  # one output per position: scale and bias inside
            return segment_sums(windows, plan, coefficients, kind, scale, bias)
        out = segment_sums(windows, plan, coefficients, kind)
        out = ops.take(out, plan.output_index, axis=-1)
    else:
        out = gathered_sums(p, window, tables.factored, coefficients, kind)
    if scale is not None:
        out = out * scale
    if bias is not None:
        out = out + bias
    return out


# ----------------------------------------------------------------------------
# Training: the dense convolution's gradient


def supports_dense_gradient():
    """Whether the backend's custom gradients carry `dense_gradient` (TensorFlow, JAX)."""
    return keras.backend.backend() in ("tensorflow", "jax")


def dense_gradient(forward, x, kernel, extras, conv_kwargs, bias=False):
    """`forward(x, *extras)`, differentiated as `conv(x, kernel) (+ extras[-1])`.

    `forward` must compute exactly `ops.conv(x, kernel, **conv_kwargs)`,
    plus the bias `extras[-1]` when `bias` (the factored path of the layer
    whose materialised kernel is `kernel`). The backward pass is the dense
    convolution's: the input gradient and the kernel gradient (whose own
    backward reaches the bases and transform parameters through the
    kernel's construction), and the bias gradient; the other `extras` get
    zero gradients, since their contribution flows through `kernel`. The
    dense convolution's forward is not evaluated in compiled code: its
    output is unused by the gradient (TensorFlow prunes it from the graph,
    XLA and `jax.jit` remove it as dead code).
    """

    @ops.custom_gradient
    def run(x, kernel, *extras):
        y = forward(x, *extras)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            dx, dkernel = _conv_vjp(x, kernel, upstream, conv_kwargs)
            zeros = [ops.zeros_like(e) for e in extras]
            if bias:
                zeros[-1] = ops.sum(upstream, axis=(0, 1, 2))
            return (dx, dkernel, *zeros)

        return y, grad

    return run(x, kernel, *extras)


def _conv_vjp(x, kernel, upstream, conv_kwargs):
    if keras.backend.backend() == "jax":
        import jax

        _, vjp = jax.vjp(lambda a, b: ops.conv(a, b, **conv_kwargs), x, kernel)
        return vjp(upstream)
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = ops.conv(x, kernel, **conv_kwargs)
    dx, dkernel = tape.gradient(y, [x, kernel], output_gradients=upstream)
    return dx, dkernel
