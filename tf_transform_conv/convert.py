"""Rewriting existing Keras models: one-shot conversion of `Conv2D` to `TransformConv2D`.

`transform_model` fits, for every chosen convolution, the bases and each other
filter's `(base, transform, scale)` to the layer's current weights
(`ops.assignment.fit_assignment`, as a `Reconstruction` says) and returns the
rewritten model, every other layer keeping its weights, with a per-layer
report. Then fine-tune. `transform_conv_from_conv2d` builds the
`TransformConv2D` that replaces one `Conv2D` (conversion, stripping a
pruning wrapper, budgets).
"""

import dataclasses

import keras
import numpy as np

from tf_transform_conv import _compat
from tf_transform_conv._checks import is_number
from tf_transform_conv.cost import parameter_formula
from tf_transform_conv.graph.nodes import check_graph_model
from tf_transform_conv.graph.rewrite import rewrite_model
from tf_transform_conv.graph.rewrite import select_layers
from tf_transform_conv.graph.rewrite import unless_wrapped
from tf_transform_conv.layers.transform_conv import TransformConv2D
from tf_transform_conv.ops.assignment import allocate_globally
from tf_transform_conv.ops.assignment import kept_filters
from tf_transform_conv.recalibrate import recalibrate_batch_norm
from tf_transform_conv.reconstruction import CONVOLUTIONS
from tf_transform_conv.reconstruction import Reconstruction
from tf_transform_conv.saliency import filter_saliency

__all__ = [
    "LayerReport",
    "format_report",
    "nothing_rebuilt_error",
    "resolve_budget",
    "transform_conv_from_conv2d",
    "transform_model",
]


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """What `transform_model` did with one convolution.

    Attributes:
        name: the layer's name.
        class_name: its class.
        converted: whether it became a `TransformConv2D`.
        reason: why it was skipped (empty when converted).
        params_before, params_after: parameter counts (equal when skipped).
        base_filters: bases kept (None when skipped).
        error: `||W - W_rec||_F / ||W||_F` of the fitted kernel (None when skipped).
    """

    name: str
    class_name: str
    converted: bool
    reason: str
    params_before: int
    params_after: int
    base_filters: int = None
    error: float = None

    def to_dict(self):
        return dataclasses.asdict(self)


def format_report(report):
    """The report as a table, one line per convolution."""
    lines = [
        f"{'layer':<28} {'class':<16} {'params':>10} {'after':>10} {'bases':>6} "
        f"{'error':>7}  note"
    ]
    for r in report:
        lines.append(
            f"{r.name:<28} {r.class_name:<16} {r.params_before:>10,} {r.params_after:>10,} "
            f"{'' if r.base_filters is None else r.base_filters:>6} "
            f"{'' if r.error is None else f'{r.error:.4f}':>7}  {r.reason}"
        )
    before = sum(r.params_before for r in report)
    after = sum(r.params_after for r in report)
    lines.append(f"{'total (convolutions)':<45} {before:>10,} {after:>10,}")
    return "\n".join(lines)


def transform_conv_from_conv2d(
    conv, base_kernel, assignment, transforms, scale=None,
    transform_family="discrete", templates=None, transform_weights=None,
):
    """The `TransformConv2D` replacing `conv`, and the weights to give it.

    Args:
        conv: the `Conv2D` being replaced (its bias, activation, padding, ...
            carry over).
        base_kernel: `(kh, kw, c_in, n)` array of bases.
        assignment: `(depth_groups, filters, 2)` table, base indices into
            `base_kernel`.
        transforms: the transform names the table indexes.
        scale: per-output scale `(filters,)`, or None for no scale.
        transform_family: the layer's family.
        templates: for a learned family, the `(depth_groups, filters)`
            outputs that learn no operator.
        transform_weights: for a learned family, the parameters of the other
            outputs, `(transformed, p)` in (group, filter) order.
    """
    assignment = np.asarray(assignment)
    learned = transform_family != "discrete"
    layer = TransformConv2D(
        conv.filters,
        conv.kernel_size,
        strides=conv.strides,
        padding=conv.padding,
        data_format=conv.data_format,
        dilation_rate=conv.dilation_rate,
        base_filters=base_kernel.shape[-1],
        transforms=list(transforms),
        assignment=assignment.tolist(),
        scale=scale is not None,
        depth_groups=assignment.shape[0],
        transform_family=transform_family,
        templates=np.asarray(templates).tolist() if learned else None,
        activation=conv.activation,
        use_bias=conv.use_bias,
        kernel_regularizer=conv.kernel_regularizer,
        bias_regularizer=conv.bias_regularizer,
        activity_regularizer=conv.activity_regularizer,
        kernel_constraint=conv.kernel_constraint,
        bias_constraint=conv.bias_constraint,
        name=conv.name,
        dtype=conv.dtype_policy,
    )
    weights = [np.asarray(base_kernel, "float32")]
    if scale is not None:
        weights.append(np.asarray(scale, "float32"))
    if conv.use_bias:
        weights.append(np.asarray(conv.bias))
    if learned and len(transform_weights):
        weights.append(np.asarray(transform_weights, "float32").T)  # the layer's (p, transformed)
    return layer, weights


def nothing_rebuilt_error(verb, did, model, reason):
    """The error of a verb that rebuilt no layer of `model`, with why it left each convolution.

    Args:
        verb: `"prune_model"` or `"transform_model"`.
        did: what it does to a layer (`"wrapped"`, `"converted"`).
        reason: `layer -> str`, why a layer is not eligible ("" when it is;
            `unless_wrapped` of the reconstruction's `skip_reason`).
    """
    left = {
        layer.name: reason(layer) or "not chosen by `layers`"
        for layer in _compat.layers_of(model)
        if isinstance(layer, CONVOLUTIONS)
    }
    return ValueError(
        f"{verb} {did} no layer of model '{model.name}': it takes the "
        "keras.layers.Conv2D layers with groups=1 and a kernel larger than 1x1 "
        "that `layers` chooses and that no wrapper holds already. "
        + (f"Its convolutions: {left}." if left else "It has no Conv2D layer.")
    )


def resolve_budget(budget, model, reconstruction, layers):
    """The `BudgetPlan` a verb's `budget` argument gives for `model`.

    A `budget.Budget` plans here (without data); a `budget.BudgetPlan` is
    checked against the model. Both answer `resolve(model, reconstruction,
    layers)`, so the verbs need not import the budget module, which builds
    on them.

    Raises:
        ValueError: for anything else.
    """
    resolve = getattr(budget, "resolve", None)
    if not callable(resolve):
        raise ValueError(
            "Invalid value for argument `budget`. Expected a Budget (e.g. Budget(params=0.3)) "
            f"or a BudgetPlan from plan_budget. Received budget={budget!r}."
        )
    return resolve(model, reconstruction, layers)


def transform_model(
    model,
    base_ratio=None,
    sparsity=None,
    reconstruction=None,
    layers=None,
    recalibrate=None,
    recalibrate_batches=20,
    budget=None,
):
    """Rewrites the chosen `Conv2D`s of a model as fitted `TransformConv2D`s.

    Each chosen convolution keeps `n` of its filters as bases and every other
    filter becomes the transform of a base that reconstructs it best; every
    other layer keeps its weights. Works on Sequential and Functional models,
    nested models, skip connections and shared layers included. Depthwise and
    grouped convolutions and 1x1 kernels are skipped and reported.

    Args:
        model: a built Sequential or Functional model.
        base_ratio: `n / filters` (rounded, at least 1), or a dict from
            layer names to such ratios (only the named layers are then
            converted); give this, `sparsity` or `budget`.
        sparsity: the fraction of filters to reconstruct:
            `n = filters - floor(sparsity * filters + 1/2)`, at least 1.
        reconstruction: a `Reconstruction`, or None for its defaults: the
            transforms (must include `"identity"`), the family (each
            reconstructed filter's learned operator starts at its
            least-squares fit to the filter it replaces), the criterion
            (`"reconstruction"`, `"l1"` or `"magnitude"`; `"taylor"` needs
            gradients during training: `prune_model`), the assignment,
            scale and depth groups (1 for a layer whose input channels they
            do not divide, an RGB stem, as `conv_factory` does), and the
            allocation: `"per_layer"` (every chosen layer keeps its own `n`)
            or `"global"` (the chosen layers keep `n` filters in all, `n`
            from `sparsity` or `base_ratio` over their total, split by one
            ranking of their saliencies, `saliency.filter_saliency`, at
            least `min_bases` each, minus the layer's mean with
            `subtract_mean`).
        layers: None (every eligible convolution), names, a class, or a
            predicate `layer -> bool`.
        recalibrate: optional training inputs (arrays, `(x, y)`, a dataset
            or batches): the converted model's batch-norm statistics are
            then re-estimated from `recalibrate_batches` batches of them
            (`recalibrate_batch_norm`), since reconstructed filters shift
            their layers' outputs.
        recalibrate_batches: int >= 1. Defaults to 20.
        budget: instead of `base_ratio` / `sparsity`, a
            `budget.Budget` (e.g. `Budget(params=0.3)`, relative to this
            model; planned here without data) or a `budget.BudgetPlan` from
            `budget.plan_budget` (with data, and the lowerings to pass to
            `export_tflite(lowering=plan.lowerings)`): each layer gets the
            bases the plan chose, and layers it keeps dense stay `Conv2D`.
            Only with `allocation="per_layer"`.

    Returns:
        `(new_model, report)`: the report lists a `LayerReport` per
        convolution of the model, converted or skipped.

    Raises:
        ValueError: for not exactly one of `base_ratio` / `sparsity` /
            `budget`, a `base_ratio` dict naming no convertible layer, any
            argument of the wrong type or out of range (each message names
            it and what is allowed), something other than a built
            Sequential or Functional model (a path: load it with
            `keras.saving.load_model` first), a name in `layers` of a layer
            that cannot be converted (the message says why), and, without
            `budget`, when no layer gets converted (the message lists the
            model's convolutions and why each was left: as `prune_model`'s).

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((8, 8, 3)),
    ...                           keras.layers.Conv2D(16, 3, name="conv")])
    >>> new, report = transform_model(model, base_ratio=0.25)
    >>> type(new.get_layer("conv")).__name__, report[0].base_filters
    ('TransformConv2D', 4)
    """
    check_graph_model(model, "transform_model")
    reconstruction = Reconstruction.get(reconstruction)
    allocation, min_bases = reconstruction.allocation, reconstruction.min_bases
    if sum(v is not None for v in (base_ratio, sparsity, budget)) != 1:
        raise ValueError(
            "Pass exactly one of `base_ratio` or `sparsity` (or `budget`). Received "
            f"base_ratio={base_ratio}, sparsity={sparsity}, budget={budget}."
        )
    per_layer_ratio = None
    if budget is not None:
        if allocation != "per_layer":
            raise ValueError(
                "`budget` chooses each layer's bases itself: use allocation='per_layer'. "
                f"Received allocation={allocation!r}."
            )
        plan = resolve_budget(budget, model, reconstruction, layers)
        per_layer_ratio = {name: n for name, n in plan.bases.items()}  # bases, not ratios
        layers, base_ratio = sorted(per_layer_ratio) or (lambda layer: False), 1.0
    elif isinstance(base_ratio, dict):
        bad = {k: v for k, v in base_ratio.items()
               if not (isinstance(k, str) and is_number(v) and 0 < v <= 1)}
        if bad or not base_ratio:
            raise ValueError(
                "Invalid value for argument `base_ratio`. Expected a number in (0, 1] or a "
                "non-empty dict from layer names to such numbers. Received "
                f"base_ratio={base_ratio!r}."
            )
        if layers is not None or allocation != "per_layer":
            raise ValueError(
                "A `base_ratio` dict names the layers to convert and their ratios: leave "
                "`layers` None and `allocation='per_layer'`. Received "
                f"layers={layers!r}, allocation={allocation!r}."
            )
        per_layer_ratio = {
            name: lambda filters, r=r: max(1, int(round(r * filters)))
            for name, r in base_ratio.items()
        }
        layers, base_ratio = sorted(base_ratio), 1.0
    if base_ratio is not None and not (is_number(base_ratio) and 0 < base_ratio <= 1):
        raise ValueError(
            f"Expected base_ratio in (0, 1]. Received base_ratio={base_ratio!r}."
        )
    if sparsity is not None and not (is_number(sparsity) and 0 <= sparsity < 1):
        raise ValueError(f"Expected sparsity in [0, 1). Received sparsity={sparsity!r}.")
    if reconstruction.criterion == "taylor":
        raise ValueError(
            "criterion='taylor' ranks filters by gradients on data, which a one-shot "
            "conversion does not take: use prune_model(..., "
            "reconstruction=Reconstruction(criterion='taylor')) with "
            "UpdateTransformPruningStep(saliency_data=...), or 'magnitude'."
        )
    reason = unless_wrapped(model, reconstruction.skip_reason)
    chosen = select_layers(model, layers, reason)
    if budget is None:  # a budget's plan sets the bases itself
        reconstruction.warn_if_min_bases_keep_all(
            [layer for layer in _compat.layers_of(model) if layer.name in chosen],
            "transform_model")
    report = {}

    def bases_for(filters, name=None):
        if per_layer_ratio is not None and name in per_layer_ratio:
            count = per_layer_ratio[name]
            n = count(filters) if callable(count) else count
            return min(max(n, min_bases if budget is None else 1), filters)
        if sparsity is not None:
            n = kept_filters(filters, sparsity)
        else:
            n = max(1, int(round(base_ratio * filters)))
        return min(max(n, min_bases), filters)

    if allocation == "global":
        convs = [l for l in _compat.layers_of(model) if l.name in chosen]
        total = sum(l.filters for l in convs)
        counts = allocate_globally(
            [filter_saliency(np.asarray(l.kernel), reconstruction.criterion,
                             subtract_mean=reconstruction.subtract_mean)
             for l in convs],
            bases_for(total) if sparsity is not None else max(1, round(base_ratio * total)),
            min_bases,
        )
        allotted = {l.name: n for l, n in zip(convs, counts)}
    else:
        allotted = {}

    def replace(layer):
        if isinstance(layer, keras.layers.Wrapper) and isinstance(layer.layer, CONVOLUTIONS):
            layer = layer.layer  # reported as already wrapped, and left in its wrapper
        if not isinstance(layer, CONVOLUTIONS):
            return None
        before = layer.count_params()
        why = reason(layer)
        if not why and layer.name not in chosen:
            why = "not selected by `layers`"
        if why:
            report[layer.name] = LayerReport(
                layer.name, type(layer).__name__, False, why, before, before
            )
            return None
        kernel = np.asarray(layer.kernel)
        fit = reconstruction.for_layer(layer).fit(
            kernel, allotted.get(layer.name) or bases_for(layer.filters, layer.name))
        family, scale = reconstruction.transform_family, reconstruction.scale
        new, weights = transform_conv_from_conv2d(
            layer, fit.base_kernel, fit.assignment, fit.transforms,
            fit.scale if scale else None, family, fit.templates,
            fit.transform_weights,
        )
        after = parameter_formula(
            layer.kernel_size, kernel.shape[2], layer.filters, len(fit.bases),
            scale, layer.use_bias, family,
            int((~fit.templates).sum()) if family != "discrete" else 0,
        )
        report[layer.name] = LayerReport(
            layer.name, "Conv2D", True, "", before, after, len(fit.bases),
            float(fit.layer_error),
        )
        return new, weights

    new_model = rewrite_model(model, replace)
    if budget is None and not any(entry.converted for entry in report.values()):
        raise nothing_rebuilt_error("transform_model", "converted", model, reason)
    if recalibrate is not None:
        recalibrate_batch_norm(new_model, recalibrate, recalibrate_batches)
    ordered = [
        report[layer.name]
        for layer in _compat.layers_of(model)
        if layer.name in report
    ]
    return new_model, ordered
