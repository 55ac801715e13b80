"""Which form a `TransformConv2D` takes in a TFLite file: grouped, slices or dense.

The grouped form (`export.grouped`) is two convolutions; the *slices* form is
the Keras factored path, a product then `kh * kw` shifted slices and
additions (about 100 operators per layer); the *dense* form is a `Conv2D`
holding the materialised kernel, where that is faster and hardly larger (a
stem on few channels).

Which form `export_tflite` writes for a layer is decided here:
`lowering_choice(layer, lowering)` gives `(form, reason)` for `lowering` in
`LOWERINGS` (the `"auto"` rule, with its measured thresholds `AUTO_*` and
`LOWERING_VALUE_BYTES`, the file bytes per constant value the grouped form
adds), and `lowering_decision` the same with the `GroupedPlan` it built, which
`export.deployment_model` passes on to `GroupedTransformConv2D.from_layer`
so that each layer's plan is built once.
"""

import collections

from tf_transform_conv.export.file_bytes import QUANTIZATIONS
from tf_transform_conv.export.file_bytes import basis_conv_bytes
from tf_transform_conv.export.file_bytes import dense_conv_bytes
from tf_transform_conv.export.file_bytes import form_bytes
from tf_transform_conv.export.grouped import grouped_plan
from tf_transform_conv.export.grouped import grouped_skip_reason
from tf_transform_conv.ops import families as families_lib

__all__ = [
    "AUTO_BYTES_MARGIN",
    "AUTO_BYTES_MARGIN_FRACTION",
    "AUTO_DENSE_MAX_GROWTH",
    "AUTO_INT8_MIN_SAVING",
    "AUTO_MIN_GROUPED_SLOTS",
    "AUTO_SLICES_MIN_CHANNELS",
    "LOWERINGS",
    "LOWERING_VALUE_BYTES",
    "LoweringDecision",
    "basis_decision",
    "lowering_choice",
    "lowering_decision",
]

# An uneven assignment pads every base's group to the largest (`slots`); which
# form `export_tflite(lowering="auto")` writes is decided in one place,
# `lowering_choice` (below), whose docstring gives the measurements.

# LOWERING_VALUE_BYTES: bytes a `.tflite` file spends per constant value a
# lowering adds (`ExportResult.lowering_values`): 4 bytes for the value and,
# for the spread kernels, their sparse index. Measured with TF 2.21 on a
# float32 export (overhead = file bytes minus 4 bytes per parameter): the
# size test's model (`tests/test_export.py`) in the grouped form has 19,844
# bytes of overhead for 11 operators and 5,184 lowering values (4,608 spread
# nonzeros, 576 product-bias zeros), i.e. 3.4 bytes per value once the
# operators are paid; rounded up to 8. `lowering_choice` prices the grouped
# form's constants with it; the tests' file-size budget
# (`tests/tflite_util.py`) uses it too.
LOWERING_VALUE_BYTES = 8


LOWERINGS = ("auto", "grouped", "slices", "dense")
# The `lowering="auto"` rule; see `lowering_choice`.
AUTO_MIN_GROUPED_SLOTS = 4
AUTO_SLICES_MIN_CHANNELS = 32
AUTO_DENSE_MAX_GROWTH = 1.5
# `"auto"` keeps a compact form only where its predicted bytes
# (`export.file_bytes.form_bytes`, for the file's quantization) are below the
# dense form's by this margin: the predictions' error (see
# `tests/test_quantized_export.py`), so that a near tie goes dense, no larger.
AUTO_BYTES_MARGIN = 256
AUTO_BYTES_MARGIN_FRACTION = 0.05
# In int8 files a compact form must save at least this share of the dense
# form's bytes: there a grouped layer below a few hundred channels runs
# slower than its dense layer (1.5-4x measured at 16-128 channels, one
# layer; whole files 1.2-1.5x: `benchmarks/int8_spread.py`), so `"auto"`
# spends that time only where it buys a sixth or more of the layer's bytes.
AUTO_INT8_MIN_SAVING = 0.15


LoweringDecision = collections.namedtuple(
    "LoweringDecision", ["form", "reason", "plan", "form_bytes"])
LoweringDecision.__doc__ = """How one `TransformConv2D` is written (see `lowering_decision`).

Attributes:
    form: `"grouped"`, `"slices"` or `"dense"`.
    reason: str, why.
    plan: the layer's `GroupedPlan` where `form` is `"grouped"` and it was
        built here (pass it to `GroupedTransformConv2D.from_layer`), else None.
    form_bytes: dict, form -> the bytes it was predicted to add to the file
        (`export.file_bytes.form_bytes`): the written form and the dense
        form, and for `"auto"` every form it weighed.
"""


def lowering_choice(layer, lowering="auto", quantization=None):
    """`(form, reason)`: how `export_tflite` writes a built `TransformConv2D`.

    `form` is `"grouped"` (two convolutions; see `export.grouped`)
    or `"slices"` (the Keras factored path: a product, then shifted slices
    and additions), which store only the bases, or `"dense"` (the
    materialised kernel, as large as the `Conv2D`'s). `lowering="auto"` picks the form
    measured faster in the LiteRT interpreter
    (`benchmarks/tflite_lowering.py`, XNNPACK, batch 1; docs/benchmarks/tflite_lowering.md):

    - dense when the dense convolution does no more multiply-adds than the
      grouped form and takes at most `AUTO_DENSE_MAX_GROWTH` (1.5) times
      the grouped form's bytes in the file: few input channels, as
      in a stem (3 channels: the grouped form was 2.2x the dense
      MobileNetV2 at ratio 1/2, all of it the stem), where the spread
      convolution alone costs `kh*kw / c_in` of the dense layer;

    - grouped when each base builds at least `AUTO_MIN_GROUPED_SLOTS` (4)
      filters: its spread convolution then writes groups wide enough for
      XNNPACK's kernels (at ratio 1/4 grouped was 0.3-1.0x the slices'
      latency with 1 thread, and smaller);
    - with fewer (ratio 1/2: 2 per base), grouped only below
      `AUTO_SLICES_MIN_CHANNELS` (32) input channels per depth group; from
      32 channels up, 2-wide groups made it 1.0-1.6x the slices' latency;
    - always for the rotation, affine and general families, whose slices
      would multiply-add every pair of taps (about ten times the
      operators of the discrete family's);
    - grouped, whatever the padding, for a fitted (uneven or scattered)
      assignment, as `transform_model` and `strip_model` give: the spread
      convolution pads every base's group to the largest, which costs
      `kh*kw * padding` multiply-adds per filter and pixel (`padding`: its
      outputs over the filters), while the slices form needs a slice and an
      add per tap and *segment* of filters summed together, and a fitted
      assignment has many more segments than the default assignment's one
      per transform (19-25 against 2-8 at 64 channels). Measured
      (`benchmarks/tflite_lowering.py --assignments default fitted`,
      `benchmarks/results/tflite_lowering_fitted.json`: the assignments
      `fit_assignment` gives random 16-128-channel kernels with d4 at
      ratios 1/2, 1/4 and 1/8, padding 1.25-2.5x): slices took 128-839
      operators against grouped's 4 and were 1.2-3.2x the grouped file's
      latency with 1 thread, 2.6-11x with 2, and 1.5-6.2x its bytes (a
      14x14x256 check at 1/2, padding 2.0: 30 operators, 1.6x). The former
      limit (slices above 2x padding) left a converted 5-layer CNN
      (64-128 channels, 1/4) at 1.32x the bytes of its grouped export, with
      817 operators against 22. So the slices rule above (fewer than 4
      filters per base from 32 channels) applies only where the slices
      form has at most one segment per transform and depth group, as under
      the default assignment. Padding beyond the measured 2.5x is bounded
      only by the dense rule, which counts the padded multiply-adds
      (`_dense_instead`);
    - slices otherwise only when the layer's shape rules the grouped form
      out (`export.grouped.grouped_skip_reason`);
    - and whichever of these it picks, a compact form only where the file
      being written holds it in fewer bytes than the dense form
      (`export.file_bytes.form_bytes` for `quantization`, by
      `AUTO_BYTES_MARGIN` bytes and `AUTO_BYTES_MARGIN_FRACTION` of the
      dense form's): otherwise the other compact form where that is
      smaller, else dense. Quantized files spend bytes per output channel
      and per tensor that float32 files do not (int8: 28 bytes per
      channel of the spread convolution, padded slots included, where a
      filter's weights take `kh*kw` bytes), so a layer that is compact in
      float32 may not be in int8: a pruned model's 16-64-channel layers at
      ratio 1/2 took up to 1.9x their dense layers' bytes in int8 and 2x
      in dynamic range (with one scale per product kernel, a 32-channel
      layer at 1/2 grouped still made its file 2% larger than dense; with
      its padded spread kernel normalized to one scale too, 1 kB smaller);
    - in int8 files, a compact form only where it saves at least
      `AUTO_INT8_MIN_SAVING` (15%) of the dense form's bytes: XNNPACK's
      int8 convolutions are fast enough that the grouped form, written as
      int8 files write it (`GroupedPlan.for_quantization`), still ran at
      1.5-4x a 16-128-channel dense layer's latency
      (`benchmarks/int8_spread.py`; whole files at 1/4: a 15k-parameter
      CNN 1.26x, a converted ResNet-56 1.34x, a ResNet-18 twin 1.58x the
      dense int8 file). A ResNet-56 converted at 1/4 keeps 34 layers
      grouped (saving 44-62% each) and its 16-channel stage dense; a
      stride-2 layer whose pixel phases save 11% is written dense.

    Args:
        layer: a built `TransformConv2D`.
        lowering: `"auto"`, `"grouped"`, `"slices"` or `"dense"`; the last
            three are taken as asked (`"grouped"` raises for a layer that
            cannot take it).
        quantization: the file's quantization (`export_tflite`'s
            `quantization`: None, `"dynamic"`, `"float16"` or `"int8"`),
            whose bytes `"auto"` weighs. Defaults to None (float32).
    """
    decision = lowering_decision(layer, lowering, quantization)
    return decision.form, decision.reason


def lowering_decision(layer, lowering="auto", quantization=None, keep_order=True):
    """`lowering_choice` with what it weighed: a `LoweringDecision`.

    Its `plan` is the layer's `GroupedPlan` when the form is `"grouped"`
    (pass it to `GroupedTransformConv2D.from_layer(layer, plan=plan)` so
    that it is built once), else None; its `form_bytes` the predicted bytes
    of the forms it priced, for `quantization`. `keep_order`: whether the
    channel-order pass runs on the model (`export_tflite`'s `keep_order`),
    which removes a grouped layer's reorder.
    """
    if lowering not in LOWERINGS:
        raise ValueError(
            "Invalid value for argument `lowering`. Expected one of "
            f"{list(LOWERINGS)}. Received lowering={lowering!r}."
        )
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            "Invalid value for argument `quantization`. Expected one of "
            f"{list(QUANTIZATIONS)}. Received quantization={quantization!r}."
        )
    skip = grouped_skip_reason(layer)
    if skip is not None and lowering == "grouped":
        raise ValueError(
            f"Layer {layer.name!r} cannot be written in the grouped form: {skip}. "
            "Use lowering='auto' (which falls back to 'slices') or 'slices'."
        )
    plan = grouped_plan(layer) if skip is None and lowering in ("auto", "grouped") else None

    def price(form):
        return form_bytes(layer, form, quantization, plan=plan, keep_order=keep_order)

    if lowering != "auto":
        priced = {form: price(form) for form in dict.fromkeys((lowering, "dense"))}
        return LoweringDecision(lowering, "requested", plan if lowering == "grouped" else None,
                                priced)
    priced = {"dense": price("dense")}
    if plan is not None:
        priced["grouped"] = price("grouped")
    form, reason = _preferred(layer, plan, skip)
    if form != "dense":
        form, reason = _no_larger_than_dense(layer, form, reason, plan, priced, price,
                                             quantization)
    return LoweringDecision(form, reason, plan if form == "grouped" else None, priced)


def basis_decision(layer, quantization=None):
    """How `export_tflite` writes a built `FilterBasisConv2D`: a `LoweringDecision`.

    `"basis"`, its own form (a depthwise convolution with the basis, then
    the sparse coefficients), where that takes fewer bytes in a file of
    `quantization` than `"dense"`, a `Conv2D` holding its materialised
    kernel, by the margin `"auto"` asks of a `TransformConv2D`'s compact
    forms; else dense (also faster: one operator instead of eight). In
    dynamic-range files the coefficients cannot be stored sparse (see
    `export.file_bytes`), and there the basis form is larger.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            "Invalid value for argument `quantization`. Expected one of "
            f"{list(QUANTIZATIONS)}. Received quantization={quantization!r}."
        )
    priced = {"basis": basis_conv_bytes(layer, quantization),
              "dense": dense_conv_bytes(layer, quantization)}
    kind = {None: "a float32", "dynamic": "a dynamic-range", "float16": "a float16", "int8": "an int8"}[quantization]
    compare = (f"in {kind} file the basis form would take {priced['basis']:,} bytes against "
               f"the dense form's {priced['dense']:,}")
    if _smaller(priced, "basis"):
        return LoweringDecision("basis", compare, None, priced)
    return LoweringDecision("dense", compare, None, priced)


def _preferred(layer, plan, skip):
    """`(form, reason)`: the form measured fastest that stores the bases (or dense for a stem)."""
    if skip is not None:
        return "slices", skip
    if plan.basis_kernel is not None:
        return "grouped", (
            "bases in a filter basis: the grouped form stores the coefficients (sparse) "
            "and the basis, where the other forms would store dense bases or filters"
        )
    dense = _dense_instead(layer, plan)
    if dense is not None:
        return "dense", dense
    if families_lib.coefficient_kind(layer.transform_family) == "dense":
        return "grouped", (
            f"the {layer.transform_family} family as slices would add a multiply-add per "
            "pair of taps (about ten times the operators)"
        )
    padding = plan.spread_outputs() / (layer.filters * layer.depth_groups)
    channels = layer.base_kernel.shape[2] // layer.depth_groups
    segments, slices = _slices_plan(layer)
    # The default assignment's slices: one segment per transform (per depth group).
    few_segments = segments is not None and (
        segments <= len(layer.transforms) * layer.depth_groups)
    if not few_segments:
        return "grouped", (
            f"fitted assignment: up to {plan.slots} filters per base (the spread "
            f"convolution padded to {padding:.2f}x the filters); as slices it would sum "
            f"{segments if segments is not None else 'many'} segments"
            + (f" ({slices} shifted slices)" if slices is not None else "")
        )
    if plan.slots < AUTO_MIN_GROUPED_SLOTS and channels >= AUTO_SLICES_MIN_CHANNELS:
        return "slices", (
            f"{plan.slots} filters per base (< {AUTO_MIN_GROUPED_SLOTS}) with {channels} "
            f"input channels per group (>= {AUTO_SLICES_MIN_CHANNELS}): slices measured faster"
        )
    return "grouped", f"{plan.slots} filters per base, {channels} input channels per group"


def _smaller(priced, form, quantization=None):
    """Whether `form` is predicted smaller than the dense form by the margin
    (in int8 files, by `AUTO_INT8_MIN_SAVING` of it)."""
    dense = priced["dense"]
    fraction = AUTO_INT8_MIN_SAVING if quantization == "int8" else AUTO_BYTES_MARGIN_FRACTION
    margin = max(AUTO_BYTES_MARGIN, fraction * dense)
    return priced[form] + margin <= dense


def _no_larger_than_dense(layer, form, reason, plan, priced, price, quantization):
    """`(form, reason)`: `form` where its file bytes are below the dense form's, else
    the other compact form where that is (slices not for the dense-operator
    families), else dense."""
    if form not in priced:
        priced[form] = price(form)
    if _smaller(priced, form, quantization):
        return form, reason
    kind = {None: "a float32", "dynamic": "a dynamic-range", "float16": "a float16", "int8": "an int8"}[quantization]
    why = (f"in {kind} file the {form} form would take {priced[form]:,} bytes against "
           f"the dense form's {priced['dense']:,}")
    if quantization == "int8" and priced[form] < priced["dense"]:
        why += (f", saving {1 - priced[form] / priced['dense']:.0%}, less than the "
                f"{AUTO_INT8_MIN_SAVING:.0%} that pays for its latency (int8 compact layers "
                "run slower than dense ones)")
    other = "slices" if form == "grouped" else "grouped" if plan is not None else None
    dense_family = families_lib.coefficient_kind(layer.transform_family) == "dense"
    if other is not None and not (other == "slices" and dense_family):
        if other not in priced:
            priced[other] = price(other)
        if _smaller(priced, other, quantization):
            return other, f"{why}; the {other} form {priced[other]:,}"
    return "dense", why


def _slices_plan(layer):
    """`(segments, slices)` of the factored (slices) form of `layer`: its runs of
    filters summed together, and the shifted slices it reads (None, None if unknown)."""
    plan = getattr(getattr(layer, "_tables", None), "plan", None)
    if plan is None:
        return None, None
    return len(plan.segments), plan.num_slices()


def _dense_instead(layer, plan):
    """Why `"auto"` writes `layer` with its materialised kernel, or None.

    When the dense convolution does no more multiply-adds than the grouped
    form, and its float32 kernel takes at most `AUTO_DENSE_MAX_GROWTH` times
    the bytes of the grouped form's float32 constants: a layer with few
    input channels (a stem), where the grouped form is both slower and
    hardly smaller. (A speed rule; what each form takes in the file being
    written is weighed afterwards, `_no_larger_than_dense`.)
    """
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    taps, channels = kh * kw, layer.base_kernel.shape[2]
    # Per output pixel; the products are computed at every input pixel, and
    # each spread output reads `taps` product channels at `kh * kw` taps.
    dense_macs = taps * channels * layer.filters
    product_taps = plan.product_taps() or taps * sh * sw
    grouped_macs = (
        product_taps * channels * layer.base_filters + taps * taps * plan.spread_outputs()
    )
    dense_bytes = 4 * taps * channels * layer.filters
    grouped_bytes = (
        4 * taps * channels * layer.base_filters + LOWERING_VALUE_BYTES * plan.stored_values()
    )
    if dense_macs <= grouped_macs and dense_bytes <= AUTO_DENSE_MAX_GROWTH * grouped_bytes:
        return (
            f"the dense kernel needs {dense_macs / grouped_macs:.2f}x the grouped form's "
            f"multiply-adds and {dense_bytes / grouped_bytes:.2f}x its bytes "
            f"(limit {AUTO_DENSE_MAX_GROWTH:g}x)"
        )
    return None
