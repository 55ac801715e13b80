"""Budgets for `TransformConv2D`: how many bases, and which lowering, each layer gets.

A user names a budget relative to the dense model, `Budget(params=0.3)`,
`Budget(macs=0.5)` or `Budget(latency=0.8)`, and `plan_budget` chooses, for
every convertible `Conv2D`, one option: keep it dense, or convert it with
`n = round(r * filters)` bases for each base ratio `r` of
`Budget.base_ratios` (default 1/16, 1/8, 1/4, 1/2), and, under a latency
budget, each TFLite lowering of `Budget.lowerings` (`"grouped"`,
`"slices"`; `tf_transform_conv.export.lowering`). One option per layer under a
total cost is a multiple-choice knapsack
(`knapsack.solve_multiple_choice`), solved exactly by dynamic programming
over the discretised cost (`Budget.method="exact"`, the default) or
greedily.

The *value* of an option is how much of the layer's function it keeps,
measured on the dense kernel and weighted by the layer's importance:

    value(layer, option) = I_layer * (1 - e_option ** 2)

where `e` is the relative reconstruction error `||W - W_rec||_F / ||W||_F`
of fitting the layer's kernel with the option's bases
(`ops.assignment.fit_assignment`, the fit `transform_model` makes; 0 for
the dense option) and `I_layer` is the layer's first-order importance, the
sum over its filters of `sum |w * dL/dw|` on data
(`saliency.filter_importance`;
1 for every layer when no data is given). So the knapsack minimises the
importance-weighted squared reconstruction error under the budget.

The *cost* of an option is that of the layer as the reconstruction builds
it, in its own family (a learned family's operator parameters included):
its parameters (`cost.parameter_formula`), its
multiply-adds on the factored path (`TransformConv2D.cost`: the base
products plus a learned family's second stage; a dense option costs the
`Conv2D`'s), or its latency measured alone in LiteRT (`export.LatencyTable`,
batch 1, one thread by default). The budget covers the whole model: the
layers no option touches are a fixed cost (for latency, the dense model's
measured latency less its convolutions' measured latencies, i.e. every
other operator and the interpreter's overhead; when the convolutions
measured alone add up to more than the whole model, as when each
single-layer file's per-call overhead or a busy machine inflates them, every
measured latency is scaled by `dense / sum` and the fixed cost is 0, so that
the all-dense plan predicts the dense latency).

`transform_model(model, budget=...)` and `prune_model(model, schedule,
budget=...)` take a `Budget` (planned there, without data) or a
`BudgetPlan` from `plan_budget` (planned with data); both answer
`resolve(model, reconstruction, layers)`, which is all the verbs ask of
them. Export with
`export_tflite(model, path, lowering=plan.lowerings)` to write each layer
in the lowering the plan chose.
"""

import dataclasses
import os
import tempfile

import numpy as np

from tf_transform_conv import _compat
from tf_transform_conv._checks import is_number
from tf_transform_conv.convert import transform_conv_from_conv2d
from tf_transform_conv.cost import layer_cost
from tf_transform_conv.cost import model_cost
from tf_transform_conv.cost import parameter_formula
from tf_transform_conv.export.latency import LatencyTable
from tf_transform_conv.export.latency import tflite_latency
from tf_transform_conv.export.lowering import LOWERINGS
from tf_transform_conv.export.tflite import export_tflite
from tf_transform_conv.graph.nodes import check_graph_model
from tf_transform_conv.graph.rewrite import select_layers
from tf_transform_conv.knapsack import solve_multiple_choice
from tf_transform_conv.ops import families as families_lib
from tf_transform_conv.reconstruction import Reconstruction
from tf_transform_conv.saliency import filter_importance

__all__ = [
    "Budget",
    "BudgetPlan",
    "LayerChoice",
    "plan_budget",
]

DEFAULT_RATIOS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
_KINDS = ("params", "macs", "latency")
_PRIMARY = ("latency", "macs", "params")


@dataclasses.dataclass(frozen=True)
class Budget:
    """A cost budget relative to the dense model, and the options to meet it.

    Give one or two of `params`, `macs` or `latency`, each a fraction in
    (0, 1] of the dense model's: its parameter count, its multiply-adds,
    or its LiteRT latency (batch 1, `threads` threads) measured in the same
    run. With two (e.g. `Budget(latency=0.9, params=0.45)`: at most 0.9x
    the dense latency *and* 0.45x its parameters), the primary one (`kind`:
    latency before multiply-adds before parameters) is the knapsack's
    capacity, solved as for one budget, and the secondary one is met by
    Lagrangian relaxation: its cost, times a multiplier found by bisection
    (the smallest that meets it), is subtracted from every option's value.

    Args:
        params: float, the parameters kept relative to the dense model.
        macs: float, the multiply-adds kept (factored path).
        latency: float, the LiteRT latency relative to the dense model's.
        base_ratios: the base ratios each layer may take (`n =
            max(1, round(r * filters))`; ratios giving `n >= filters` are
            left out). Defaults to (1/16, 1/8, 1/4, 1/2).
        keep_dense: bool, whether a layer may stay a dense `Conv2D`.
            Defaults to True.
        lowerings: the TFLite forms a layer may take under a latency budget
            (`"grouped"`, `"slices"`, `"dense"`, `"auto"`; each measured).
            Defaults to ("grouped", "slices"). Ignored for the other budgets
            (their plans export with `"auto"`).
        method: `"exact"` (default) or `"greedy"`, as
            `knapsack.solve_multiple_choice`.
        threads: int, LiteRT threads for latency budgets. Defaults to 1.

    Raises:
        ValueError: for no budget or three, a budget outside (0, 1],
            empty or out-of-range ratios, an unknown lowering or method.

    Example:

    >>> Budget(params=0.3).kind, Budget(latency=0.8).fraction
    ('params', 0.8)
    """

    params: float = None
    macs: float = None
    latency: float = None
    base_ratios: tuple = DEFAULT_RATIOS
    keep_dense: bool = True
    lowerings: tuple = ("grouped", "slices")
    method: str = "exact"
    threads: int = 1

    def __post_init__(self):
        given = {k: getattr(self, k) for k in _KINDS if getattr(self, k) is not None}
        if not 1 <= len(given) <= 2:
            raise ValueError(
                "Pass one or two of `params`, `macs` or `latency` to Budget (fractions "
                f"of the dense model's). Received {given or 'none'}."
            )
        for kind, value in given.items():
            if not (is_number(value) and 0 < value <= 1):
                raise ValueError(
                    f"Invalid value for argument `{kind}`. Expected a fraction in (0, 1]. "
                    f"Received {kind}={value!r}."
                )
        ratios = tuple(self.base_ratios)
        if not ratios or not all(is_number(r) and 0 < r <= 1 for r in ratios):
            raise ValueError(
                "Invalid value for argument `base_ratios`. Expected a non-empty sequence "
                f"of numbers in (0, 1]. Received base_ratios={self.base_ratios!r}."
            )
        object.__setattr__(self, "base_ratios", ratios)
        lowerings = (self.lowerings,) if isinstance(self.lowerings, str) else tuple(
            self.lowerings)
        if not lowerings or any(l not in LOWERINGS for l in lowerings):
            raise ValueError(
                f"Invalid value for argument `lowerings`. Expected a non-empty sequence of "
                f"{list(LOWERINGS)}. Received lowerings={self.lowerings!r}."
            )
        object.__setattr__(self, "lowerings", lowerings)
        if self.method not in ("exact", "greedy"):
            raise ValueError(
                "Invalid value for argument `method`. Expected 'exact' or 'greedy'. "
                f"Received method={self.method!r}."
            )

    @property
    def kind(self):
        """The primary budget: `"latency"`, else `"macs"`, else `"params"`."""
        return next(k for k in _PRIMARY if getattr(self, k) is not None)

    @property
    def secondary(self):
        """The second budget's kind, or None."""
        return next((k for k in _PRIMARY if k != self.kind and getattr(self, k) is not None),
                    None)

    @property
    def fraction(self):
        """The budget as a fraction of the dense model's cost."""
        return float(getattr(self, self.kind))

    def resolve(self, model, reconstruction=None, layers=None):
        """The plan for `model`, made here without data (`plan_budget`).

        What `transform_model(..., budget=...)` and `prune_model(...,
        budget=...)` call.
        """
        return plan_budget(model, self, reconstruction=reconstruction, layers=layers)


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """One layer's chosen option.

    Attributes:
        name: the layer's name.
        bases: the bases kept, or None when the layer stays dense.
        lowering: its TFLite form (`"auto"` under a parameter or
            multiply-add budget), None when dense.
        error: the relative reconstruction error of the fit (0 when dense).
        value: the option's value (`I * (1 - error**2)`).
        cost: the option's cost (parameters, multiply-adds or ms).
        dense_cost: what the layer costs dense.
        filters: the layer's filters.
        costs: dict, the option's cost for each budget kind planned.
    """

    name: str
    bases: int
    lowering: str
    error: float
    value: float
    cost: float
    dense_cost: float
    filters: int
    costs: dict = None

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BudgetPlan:
    """What `plan_budget` chose: one option per convertible layer.

    Attributes:
        budget: the `Budget`.
        choices: list of `LayerChoice`, in model order.
        dense_cost: the dense model's cost (parameters, multiply-adds, or
            measured ms).
        target: the budget in those units (`fraction * dense_cost`).
        fixed_cost: the part of the cost no option changes.
        predicted_cost: `fixed_cost` plus the chosen options' costs (at most
            `target`).
        secondary: for a two-part budget, `{"kind", "dense_cost", "target",
            "predicted_cost", "multiplier"}` of the secondary one, else None.
    """

    budget: Budget
    choices: list
    dense_cost: float
    target: float
    fixed_cost: float
    predicted_cost: float
    secondary: dict = None

    @property
    def bases(self):
        """`{layer name: bases}` of the layers to convert."""
        return {c.name: c.bases for c in self.choices if c.bases is not None}

    @property
    def lowerings(self):
        """`{layer name: lowering}`, as `export_tflite(lowering=...)` takes."""
        return {c.name: c.lowering for c in self.choices if c.bases is not None}

    def resolve(self, model, reconstruction=None, layers=None):
        """This plan, checked against `model` (it must have every layer the plan names).

        What `transform_model(..., budget=...)` and `prune_model(...,
        budget=...)` call; `reconstruction` and `layers` were the planner's.
        """
        names = {l.name for l in _compat.layers_of(model)}
        missing = sorted(set(self.bases) - names)
        if missing:
            raise ValueError(
                f"The budget plan names layers {missing} that model '{model.name}' does "
                "not have: plan with the same model."
            )
        return self

    def summary(self):
        """The plan as a table, one line per layer."""
        lines = [f"{'layer':<28} {'filters':>7} {'bases':>6} {'lowering':>9} {'error':>7} "
                 f"{'cost':>12} {'dense':>12}"]
        for c in self.choices:
            lines.append(
                f"{c.name:<28} {c.filters:>7} {'dense' if c.bases is None else c.bases:>6} "
                f"{c.lowering or '':>9} {c.error:>7.4f} {c.cost:>12.6g} {c.dense_cost:>12.6g}")
        lines.append(
            f"{self.budget.kind}: predicted {self.predicted_cost:.6g} of target "
            f"{self.target:.6g} (dense {self.dense_cost:.6g}, fixed {self.fixed_cost:.6g})")
        if self.secondary:
            lines.append(
                f"{self.secondary['kind']}: predicted {self.secondary['predicted_cost']:.6g} "
                f"of target {self.secondary['target']:.6g} "
                f"(dense {self.secondary['dense_cost']:.6g})")
        return "\n".join(lines)

    def to_dict(self):
        return {
            "budget": {k: v for k, v in dataclasses.asdict(self.budget).items()},
            "choices": [c.to_dict() for c in self.choices],
            "dense_cost": self.dense_cost, "target": self.target,
            "fixed_cost": self.fixed_cost, "predicted_cost": self.predicted_cost,
            "secondary": self.secondary,
        }


def _bases_for(ratio, filters):
    return max(1, int(round(ratio * filters)))


def _input_shapes(model):
    """`{layer name: input shape without batch}` for single-input layers."""
    shapes = {}
    for layer in _compat.layers_of(model):
        for node in getattr(layer, "_inbound_nodes", []):
            tensors = node.input_tensors
            if len(tensors) == 1 and layer.name not in shapes:
                shapes[layer.name] = tuple(tensors[0].shape[1:])
    return shapes


def _dense_model_latency(model, threads, repeats=7, min_seconds=0.1):
    """The model's LiteRT latency (ms), exported as it is (float32, batch 1)."""
    with tempfile.TemporaryDirectory(prefix="tfconv-budget-") as folder:
        path = os.path.join(folder, "dense.tflite")
        export_tflite(model, path)
        return tflite_latency(path, threads, repeats, min_seconds)


def plan_budget(model, budget, data=None, reconstruction=None, layers=None,
                latency_table=None, dense_latency=None, num_batches=4, batch_size=32,
                importance=None):
    """Chooses each convertible `Conv2D`'s bases (and lowering) under a budget.

    See the module docstring for the options, their values and costs. Each
    option's fit is the one `transform_model` makes with the
    reconstruction's `transforms`, `scale` and `depth_groups` (the discrete
    family, fitted assignment and reconstruction criterion: the options are
    compared on that fit, whatever family the layers then train with).

    Args:
        model: a built Sequential or Functional model (a dense one: its
            `Conv2D`s are the candidates).
        budget: a `Budget`.
        data: optional labelled data `(x, y)` for the layers' importance
            (the model must then be compiled); without it every layer
            weighs 1.
        reconstruction: a `Reconstruction`, or None for its defaults.
        layers: as `transform_model`.
        latency_table: an `export.LatencyTable` for a latency budget
            (default: a new in-memory one).
        dense_latency: the dense model's LiteRT latency in ms, if already
            measured (else measured here for a latency budget).
        num_batches: batches of `data` the importance is summed over.
        batch_size: the size of those batches.
        importance: optional precomputed `saliency.filter_importance`.

    Returns:
        A `BudgetPlan`.

    Raises:
        ValueError: for something other than a `Budget`, a model with no
            convertible layer, or a budget below the cheapest choice.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((8, 8, 8)),
    ...     keras.layers.Conv2D(32, 3, name="a"), keras.layers.Conv2D(32, 3, name="b")])
    >>> plan = plan_budget(model, Budget(params=0.5))
    >>> plan.predicted_cost <= plan.target
    True
    """
    if not isinstance(budget, Budget):
        raise ValueError(
            "Invalid value for argument `budget`. Expected a tf_transform_conv.budget.Budget, "
            f"e.g. Budget(params=0.3). Received budget={budget!r}."
        )
    check_graph_model(model, "plan_budget")
    # The options are compared on the discrete fit `transform_model` makes.
    reconstruction = Reconstruction.get(reconstruction)
    family = reconstruction.transform_family
    fitting = reconstruction.replace(
        transform_family="discrete", criterion="reconstruction", assign="fit")
    kind = budget.kind
    chosen = select_layers(model, layers, fitting.skip_reason)
    convs = [l for l in _compat.layers_of(model) if l.name in chosen]
    if not convs:
        raise ValueError(
            f"plan_budget found no convertible Conv2D in model '{model.name}' (groups=1, "
            "kernel larger than 1x1, chosen by `layers`)."
        )
    shapes = _input_shapes(model)
    if kind == "latency" and latency_table is None:
        latency_table = LatencyTable(threads=budget.threads)
    if data is not None or importance is not None:
        if importance is None:
            importance = filter_importance(model, data, layers=[l.name for l in convs],
                                           num_batches=num_batches, batch_size=batch_size)
        weights = {l.name: float(np.sum(importance[l.name])) for l in convs}
    else:
        weights = {l.name: 1.0 for l in convs}

    kinds = [kind] + ([budget.secondary] if budget.secondary else [])

    def dense_costs(layer):
        out = {}
        if "latency" in kinds:
            out["latency"] = latency_table.layer_latency(layer, shapes[layer.name])
        entry = layer_cost(layer, shapes[layer.name])
        out["params"], out["macs"] = float(entry.params), float(entry.macs)
        return out

    options = []  # (layer, dense costs, [(bases, lowering, error, costs)])
    values = []
    for layer in convs:
        kernel = np.asarray(layer.kernel)
        filters = layer.filters
        layer_fitting = fitting.for_layer(layer)
        scale = fitting.scale
        weight = weights[layer.name]
        full = dense_costs(layer)
        layer_options = []
        if budget.keep_dense:
            layer_options.append((None, None, 0.0, full))
        for n in sorted({_bases_for(r, filters) for r in budget.base_ratios}):
            if n >= filters:
                continue
            fit = layer_fitting.fit(kernel, n)
            error = float(fit.layer_error)
            # Priced as the layer is built: in the family it trains with, whose
            # operators (one per output that is not a base) add to its cost.
            transformed = int((~fit.templates).sum()) if family != "discrete" else 0
            new, new_weights = transform_conv_from_conv2d(
                layer, fit.base_kernel, fit.assignment, fit.transforms,
                fit.scale if scale else None, family, fit.templates,
                np.tile(families_lib.identity_params(family, layer.kernel_size),
                        (transformed, 1)))
            paths = new.cost(shapes[layer.name])
            option = {
                "params": float(parameter_formula(
                    layer.kernel_size, kernel.shape[2], filters, n, scale, layer.use_bias,
                    family, transformed)),
                "macs": float(paths["factored_macs"] + paths["transform_macs"]),
            }
            if "latency" not in kinds:
                layer_options.append((n, "auto", error, option))
                continue
            new.build((None,) + tuple(shapes[layer.name]))
            new.set_weights(new_weights)
            for lowering in budget.lowerings:
                ms = latency_table.layer_latency(new, shapes[layer.name], lowering)
                layer_options.append((n, lowering, error, dict(option, latency=ms)))
        if not layer_options:
            raise ValueError(
                f"Layer '{layer.name}' ({filters} filters) has no option: keep_dense=False and "
                f"no ratio of {budget.base_ratios} gives fewer bases than filters."
            )
        options.append((layer, full, layer_options))
        values.append([weight * (1.0 - e * e) for _, _, e, _ in layer_options])

    total = model_cost(model)
    dense = {"params": float(total.params), "macs": float(total.macs)}
    if "latency" in kinds:
        dense["latency"] = float(dense_latency if dense_latency is not None
                                 else _dense_model_latency(model, budget.threads))
        measured = sum(full["latency"] for _, full, _ in options)
        if measured > dense["latency"]:
            # Each single-layer file pays the interpreter's per-call overhead, so the
            # layers alone can add up to more than the model: scale them to fit it.
            factor = dense["latency"] / measured
            for _, full, layer_options in options:
                unique = {id(c): c for c in [full] + [o[3] for o in layer_options]}
                for costs in unique.values():  # the dense option shares `full`
                    costs["latency"] *= factor
    fixed = {k: dense[k] - sum(full[k] for _, full, _ in options) for k in kinds}
    target = {k: float(getattr(budget, k)) * dense[k] for k in kinds}
    costs = {k: [[o[3][k] for o in opts] for _, _, opts in options] for k in kinds}
    for k in kinds:
        cheapest = fixed[k] + sum(min(c) for c in costs[k])
        if target[k] < cheapest:
            raise ValueError(
                f"The {k} budget {getattr(budget, k):g} x dense ({target[k]:.6g}) is below "
                f"the cheapest choice ({cheapest:.6g}: fixed cost {fixed[k]:.6g} plus each "
                "layer's cheapest option). Raise the budget or add smaller base ratios."
            )

    def solve(multiplier=0.0, secondary=None):
        adjusted = values if not multiplier else [
            [v - multiplier * c for v, c in zip(vs, cs)]
            for vs, cs in zip(values, costs[secondary])]
        return solve_multiple_choice(adjusted, costs[kind], target[kind] - fixed[kind],
                                     method=budget.method)

    def spent(picks, k):
        return fixed[k] + sum(c[j] for c, j in zip(costs[k], picks))

    picks, secondary = solve(), None
    if budget.secondary:
        k2 = budget.secondary
        multiplier = 0.0
        if spent(picks, k2) > target[k2]:
            # The smallest multiplier whose choice meets the secondary budget.
            high = sum(map(max, values)) / max(sum(map(max, costs[k2])), 1e-30) * 1e-3
            for _ in range(80):
                if spent(solve(high, k2), k2) <= target[k2]:
                    break
                high *= 2
            else:
                raise ValueError(
                    f"No choice meets both the {kind} and the {k2} budget; raise one.")
            low = 0.0
            for _ in range(40):
                middle = 0.5 * (low + high)
                if spent(solve(middle, k2), k2) <= target[k2]:
                    high = middle
                else:
                    low = middle
            multiplier, picks = high, solve(high, k2)
        secondary = {"kind": k2, "dense_cost": dense[k2], "target": target[k2],
                     "predicted_cost": spent(picks, k2), "multiplier": multiplier}
    choices = []
    for (layer, full, layer_options), value_list, pick in zip(options, values, picks):
        n, lowering, error, option = layer_options[pick]
        choices.append(LayerChoice(layer.name, n, lowering, error, value_list[pick],
                                   option[kind], full[kind], layer.filters,
                                   {k: option[k] for k in kinds}))
    return BudgetPlan(budget, choices, dense[kind], target[kind], fixed[kind],
                      spent(picks, kind), secondary)
