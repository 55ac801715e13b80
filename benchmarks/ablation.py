"""Ablation, offline on CPU: does rebuilding pruned filters beat removing or zeroing them?

The task ("cluttered digits") is made here from scikit-learn's handwritten
digits, so nothing is downloaded: each 20x20 image holds one digit, zoomed
1.3-1.8x, rotated up to 30 degrees either way and placed at random, over two
zoomed 4x4 fragments of other digits and Gaussian noise (sigma 0.15). The
digits of the training and test images come from disjoint halves of the
1,797 originals. It is hard enough that width matters: the `quarter` row (half
the filters everywhere, a quarter of the convolution parameters) must trail
`dense` by at least 5 points.

The network: four 3x3 convolutions (32, 32, 64, 64 filters, no bias), each
with batch norm and ReLU, max-pools after the second and the fourth, global
average pooling and a 10-way `Dense`. Every row trains from random
initialisation for the same epochs on the same images (Adam, cosine decay,
batch 64, XLA), one seed per run; the pruning rows prune during training,
linearly (tfmot `PolynomialDecay`, power 1) from 0 to the row's rate over the
first 40% of the steps, every quarter epoch, as the paper does over its first
40 of 300 epochs (with `--lr-restart pruning`, their learning rate's cosine
starts again from its peak where the schedule ends). Rows, at pruning rates 0.7 and 0.9:

    thin            the equal-size baseline: the dense network with every
                    width scaled by one factor so that its convolution
                    parameters match (within 3%) the mean of the
                    `--thin-match` route's (scalar) at the rate, trained from
                    scratch for as many epochs as the longest route of the
                    run trains in all (a knapsack row: the dense model's
                    epochs, then its own). Every other row is also reported
                    as its difference from `thin` in points, paired by seed,
                    with the standard deviation of the differences
    thin-macs       the same, matched on the route's multiply-adds
    thin+kd         `thin` distilled from the dense model of the seed, the
                    baseline of the `+kd` rows
    removed         a thinner network (each layer keeps `kept_filters(F, rate)`)
    zeroed          magnitude filter pruning: the smallest-L2 filters of each
                    layer are zeroed and kept at zero (no reconstruction)
    discrete        prune_model, d4 transforms with a scale, our selection
                    (reconstruction criterion, fitted assignment, per layer)
    scalar          the paper's scalar family (per-tap multipliers), our selection
    rotation        learned rotations, our selection
    affine          learned affine maps, our selection
    general         a general 9x9 tap matrix per filter, our selection
    discrete+scalar the scalar family after a d4 transform, our selection
    paper           the scalar family with the paper's selection: one global
                    magnitude ranking (at least 2 bases per layer), `o mod n`
    hybrid-0.75     channels removed and filters rebuilt: the network with
                    every width x0.75 (24-24-48-48), pruned by the affine
                    route at the rate (bisected before training) that gives
                    it the affine row's convolution parameters at the
                    column's rate
    hybrid-0.6      the same at widths x0.6 (19-19-38-38)
    wide-1.5        the other way: the network with every width x1.5
                    (48-48-96-96), pruned harder by the affine route to the
                    affine row's convolution parameters at the column's rate
    budget          the affine route with bases allocated per layer: on the
                    seed's trained dense model, plan_budget (Taylor importance
                    of 16 batches, ratios 1/16-1/2 or dense) picks each
                    layer's bases to the affine row's convolution parameters
                    at the column's rate; the network then trains from
                    scratch, pruned to that plan by the rows' schedule
    split           the split between removing channels and rebuilding filters
                    chosen per layer: on the seed's trained dense model,
                    knapsack_removal (importances L2-normalised per layer)
                    first keeps half the convolution parameters, which sets
                    each layer's width; plan_budget then picks the bases of
                    that narrower model, as in `budget`
    fitted          the seed's trained dense model converted at the rate by
                    transform_model (the affine route's settings), its batch
                    norms recalibrated, each converted layer fitted to the
                    dense layer's outputs (`fit_outputs`) and recalibrated
                    again, then fine-tuned for the epochs (the same schedule)
    fitted-budget   the same, each layer converted to the `budget` row's plan
    ... +kd         the same, distilled from the dense model of the seed
                    (T = 4, weight 0.9 on the distillation term)
    ... +ikd        (affine, fitted, thin) the same distillation of the
                    logits plus inner distillation of the features
                    (InnerDistiller: the four batch norms' outputs, weight 1;
                    the thin network's through learned 1x1 projections)
    sp              unstructured magnitude pruning of the convolution kernels
                    (prune_low_magnitude; the rate is the weight sparsity)
    ip              interspace pruning (prune_interspace): filter-basis
                    coefficients pruned, standard basis at the start
    ip-dct          the same, the basis starting as the 2-D DCT
    tc              the network built from TransformConv2D layers (the scalar
                    family, a scale per filter), trained from scratch with
                    base ratio 1 - rate: the bases hold that share of the
                    convolution weights (rates 0.875, 0.9375, 0.96875 give
                    ratios 1/8, 1/16, 1/32)
    tc-ip           the same layers at base ratio 1/4, their bases in a filter
                    basis (prune_interspace, DCT start) whose coefficients are
                    pruned to 1 - 4 (1 - rate): as many nonzero base weights
                    as `tc` at that rate (both savings stacked)
    dafp            dependency-aware filter pruning: the full network trained
                    with DAFP's self-tuning L1 penalty on the batch-norm
                    scales (SparsityTuner, updated every quarter epoch, target
                    the `removed` row's channel share) for all but the last
                    epoch, then the channels of lowest importance removed
                    (remove_filters; one importance threshold, as a fraction
                    of each layer's maximum, found by bisection) down to the
                    `removed` row's convolution parameters, then the last
                    epoch trained without the penalty
    dafp-macs       the same, removed down to the `removed` row's multiply-adds
    knapsack+ikd    knapsack pruning (Aflalo et al.): the trained dense model of
                    the seed, its channels scored by `sum |w * dL/dw|` (16
                    batches), removed by a 0/1 knapsack (knapsack_removal,
                    exact DP) down to the `removed` row's parameters (whole
                    model), then trained the same epochs with inner
                    distillation from the dense model (InnerDistiller on the
                    four batch norms' outputs, weight 1)
    knapsack-macs+ikd  the same, down to the `removed` row's multiply-adds
    knapsack-l2+ikd the same as knapsack+ikd with each layer's importances
                    divided by their L2 norm (knapsack_removal(normalize="l2"))
    ours-knapsack   our layer from the trained dense model: plan_budget picks
                    each layer's bases (ratios 1/32-1/2 or dense; value: the
                    layer's Taylor importance x (1 - fit error^2)) at the
                    `removed` row's parameters, then prune_model(budget=plan)
                    trains the same epochs with the rows' schedule; where our
                    layer cannot get that small (every layer at its fewest
                    bases costs more), the cheapest plan, flagged
                    `feasible: false`
    ours-knapsack-macs  the same at the `removed` row's multiply-adds

and, once: `dense`, and `quarter`. `--task shapes` runs every row on a
second task instead, ten cluttered shapes (`cluttered_shapes`). One-shot rows (no training after the
conversion) take each seed's dense model through `transform_model` (d4 with
a scale; scalar) and score it as converted, after `recalibrate_batch_norm`
(20 batches of 64 training images), and after fitting each converted layer
to the dense layer's outputs on training images (`fit_outputs`: 200 Adam
steps per layer, then recalibrating again).

Runs go to worker processes (`--workers`, one thread each). Writes JSON
(machine, versions, command, every run) and a PNG beside it.

Usage:
    python benchmarks/ablation.py                      # 3 seeds, every row
    python benchmarks/ablation.py --quick              # 1 seed, a few rows, short
    python benchmarks/ablation.py --seeds 5 --rows dense removed scalar
    python benchmarks/ablation.py --rates 0.77 0.92 --no-one-shot \
        --rows dense thin thin+kd scalar scalar+kd    # at 1/4 and 1/10 of the parameters
    python benchmarks/ablation.py --epochs 12 --rates 0.77 --no-one-shot \
        --rows dense thin affine hybrid-0.75 hybrid-0.6   # remove channels or rebuild filters
    python benchmarks/ablation.py --epochs 12 --rates 0.77 --no-one-shot \
        --rows dense wide-1.5+kd thin+kd --thin-match wide-1.5+kd   # wider, pruned harder
    python benchmarks/ablation.py --epochs 12 --rates 0.77 --no-one-shot \
        --rows dense budget+kd split+kd thin+kd --thin-match budget+kd   # chosen per layer
    python benchmarks/ablation.py --epochs 12 --rates 0.77 --no-one-shot \
        --rows dense fitted+kd thin+kd --thin-match fitted+kd   # from the trained dense model
    python benchmarks/ablation.py --epochs 12 --rates 0.77 --no-one-shot \
        --rows dense affine+ikd thin+ikd --thin-match affine+ikd   # features distilled too
    python benchmarks/ablation.py --epochs 12 --rates 0.77 --no-one-shot --task shapes \
        --rows dense thin affine --lr-restart pruning  # the rate restarted where pruning ends
"""

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import numpy as np

import common  # noqa: E402  (benchmarks/common.py, beside this script)

WIDTHS = (32, 32, 64, 64)
SIZE = 20
RATES = (0.7, 0.9)
BATCH = 64
LEARNING_RATE = 3e-3
PRUNE_FRACTION = 0.4  # the schedule ends at this fraction of the training steps
LR_RESTARTS = ("none", "pruning", "all")
KD_TEMPERATURE, KD_WEIGHT = 4.0, 0.9
MIN_BASES_PAPER = 2
RECALIBRATE_BATCHES = 20
OUTPUT_FIT_STEPS = 200

# Row name -> prune_model options (None: not a prune_model row).
SELECTION_OURS = dict(criterion="reconstruction", allocation="per_layer", assign="fit")
SELECTION_PAPER = dict(criterion="magnitude", allocation="global", assign="modulo",
                       min_bases=MIN_BASES_PAPER)
PRUNED = {
    "discrete": dict(transforms="d4", transform_family="discrete", **SELECTION_OURS),
    "scalar": dict(transforms="identity", transform_family="scalar", **SELECTION_OURS),
    "rotation": dict(transforms="identity", transform_family="rotation", **SELECTION_OURS),
    "affine": dict(transforms="identity", transform_family="affine", **SELECTION_OURS),
    "discrete+scalar": dict(transforms="d4", transform_family="scalar", **SELECTION_OURS),
    "general": dict(transforms="identity", transform_family="general", **SELECTION_OURS),
    "paper": dict(transforms="identity", transform_family="scalar", **SELECTION_PAPER),
}
# Hybrid rows: row -> the factor on every width; the narrower (or wider) network
# is pruned by the affine route to the affine route's parameters at the column's rate.
HYBRID = {"hybrid-0.75": 0.75, "hybrid-0.6": 0.6, "wide-1.5": 1.5}
HYBRID_ROUTE = "affine"
# Allocated rows: row -> the share of the dense convolution parameters that a
# knapsack removal of channels keeps first (None: no removal). On the seed's
# trained dense model, plan_budget then gives each layer its bases (or leaves
# it dense) to the affine row's convolution parameters at the column's rate;
# the network at those widths trains from scratch, pruned by the affine route
# to that plan.
ALLOCATED = {"budget": None, "split": 0.5}
ALLOCATION_RATIOS = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 1 / 2)
# Rows converted from the seed's trained dense model by the affine route, then
# fine-tuned: row -> the allocated row whose bases it takes (None: every layer at the rate).
FITTED = {"fitted": None, "fitted-budget": "budget"}
KD_ROWS = ("removed+kd", "scalar+kd", "affine+kd", "paper+kd", "wide-1.5+kd", "budget+kd",
           "split+kd", "fitted+kd", "fitted-budget+kd", "thin+kd")
# Rows distilled from the logits and from the features of the seed's dense model.
INNER_KD_ROWS = ("affine+ikd", "fitted+ikd", "thin+ikd")
# The equal-size baselines: row -> the cost its widths match to the reference route's.
THIN = {"thin": "params", "thin-macs": "macs", "thin+kd": "params", "thin+ikd": "params"}
# The distilled thin rows, each the baseline of the routes distilled the same way
# (`+kd`, `+ikd`): row -> its mark in the report, and what it is.
DISTILLED_THIN = {
    "thin+kd": ("k", "the thin network distilled from the same teacher"),
    "thin+ikd": ("i", "the thin network distilled from the same teacher's logits and features"),
}
MARKS = {reference: mark for reference, (mark, _) in DISTILLED_THIN.items()}
THIN_TOLERANCE = 0.03  # the largest relative miss of a thin row's matched cost
# Unstructured rows: row -> None (prune_low_magnitude) or prune_interspace's basis.
UNSTRUCTURED = {"sp": None, "ip": "standard", "ip-dct": "dct"}
# Rows of TransformConv2D networks trained from scratch: row -> None (plain) or
# the initial filter basis its bases live in; tc-ip's base ratio.
TRANSFORM = {"tc": None, "tc-ip": "dct"}
TC_IP_RATIO = 1 / 4
# DAFP rows: row -> the cost its removal matches to the `removed` row's.
DAFP = {"dafp": "params", "dafp-macs": "macs"}
DAFP_STEP, DAFP_THRESHOLD = 5e-3, 0.02  # SparsityTuner's lambda step and training threshold
# Knapsack rows: row -> the cost matched to the `removed` row's.
KNAPSACK = {"knapsack+ikd": "params", "knapsack-macs+ikd": "macs", "knapsack-l2+ikd": "params"}
OURS_KNAPSACK = {"ours-knapsack": "params", "ours-knapsack-macs": "macs"}
KNAPSACK_RATIOS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
INNER_KD_LAYERS, INNER_KD_WEIGHT = ("bn0", "bn1", "bn2", "bn3"), 1.0
ROWS = ("dense", "quarter", "thin", "thin-macs", "removed", "zeroed", *PRUNED, *HYBRID,
        *ALLOCATED, *FITTED, *KD_ROWS, *INNER_KD_ROWS, *UNSTRUCTURED, *DAFP, *KNAPSACK,
        *OURS_KNAPSACK, *TRANSFORM)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ablation.json"
QUICK_OUT = DEFAULT_OUT.with_name("ablation_quick.json")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=None,
                        help="rows to run (default: all; dense always runs)")
    parser.add_argument("--rates", nargs="+", type=float, default=list(RATES),
                        help="pruning rates (0.7 0.9)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (3)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per run (3)")
    parser.add_argument("--train-size", type=int, default=12800,
                        help="training images (12800: 200 steps of 64 per epoch)")
    parser.add_argument("--test-size", type=int, default=2000, help="test images (2000)")
    parser.add_argument("--task", choices=sorted(TASKS), default="digits",
                        help="digits (cluttered digits, default) or shapes (the second task: "
                        "10 cluttered shapes)")
    parser.add_argument("--thin-match", choices=ROWS, default="scalar",
                        help="the route whose size the thin rows match at each rate "
                        "(scalar; the first route run at the rate if it is not run)")
    parser.add_argument("--prune-fraction", type=float, default=PRUNE_FRACTION,
                        help="share of the training steps over which the pruning "
                        f"schedule rises to the rate ({PRUNE_FRACTION})")
    parser.add_argument("--lr-restart", choices=LR_RESTARTS, default="none",
                        help="where the cosine learning rate starts again from its peak at "
                        "the step the pruning schedule ends (tc.training.CosineRestart): "
                        "none (default), pruning (the rows that prune during training), "
                        "all (every row from scratch, the thin ones included: the "
                        "restart's effect on networks that are not pruned)")
    parser.add_argument("--no-one-shot", action="store_true",
                        help="skip the one-shot conversions of each dense model")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes, one thread each (2)")
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 1 epoch, rows dense quarter removed "
                        "discrete scalar paper; writes ablation_quick.json")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (results/ablation.json, or ablation_quick.json)")
    parser.add_argument("--replot", action="store_true",
                        help="only report again (table, targets, JSON summary, PNG) from "
                        "the runs saved in the JSON of --out")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.train_size = 1, 1, 12800
        args.rows = args.rows or ["dense", "quarter", "thin", "removed", "discrete", "scalar",
                                  "paper"]
    args.rows = list(args.rows or ROWS)
    if "dense" not in args.rows:
        args.rows.insert(0, "dense")
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.replot:  # everything else comes from the JSON
        return args
    problems = []
    if args.seeds < 1 or args.epochs < 1 or args.workers < 1:
        problems.append("--seeds, --epochs and --workers must be >= 1")
    if args.train_size < BATCH or args.train_size % BATCH:
        problems.append(f"--train-size must be a positive multiple of {BATCH}")
    if not 0 < args.prune_fraction <= 1:
        problems.append(f"--prune-fraction must be in (0, 1], got {args.prune_fraction}")
    if args.thin_match in ("dense", "quarter", *THIN):
        problems.append(f"--thin-match must be a route, not {args.thin_match!r}")
    if any(not 0 < r < 1 for r in args.rates):
        problems.append(f"--rates must be in (0, 1), got {args.rates}")
    elif "tc" in args.rows:
        uneven = [r for r in args.rates if not all(
            _whole(w * (1 - r)) and _whole(1 / (1 - r)) for w in WIDTHS)]
        if uneven:
            problems.append(f"the tc row needs rates whose 1 - rate is 1/k of every width "
                            f"{WIDTHS} (e.g. 0.875 0.9375 0.96875), got {uneven}")
    if "tc-ip" in args.rows and any(r < 1 - TC_IP_RATIO for r in args.rates):
        problems.append(f"the tc-ip row needs rates >= {1 - TC_IP_RATIO} (its base ratio is "
                        f"{TC_IP_RATIO}), got {args.rates}")
    if problems:
        parser.error("; ".join(problems))
    return args


def route_reconstruction(row=HYBRID_ROUTE):
    """The `Reconstruction` that `row`'s route prunes with (a scale per filter)."""
    import tf_transform_conv as tc

    return tc.Reconstruction(scale=True, **PRUNED[row])


def undistilled(row):
    """The row trained without a teacher: `row` less its `+kd` or `+ikd`."""
    return row.removesuffix("+kd").removesuffix("+ikd")


def _whole(value):
    return abs(value - round(value)) < 1e-9


def widths_cost(widths):
    """`(params, macs)` of the network's convolutions at `widths`, counted from their shapes."""
    params = macs = 0
    channels, side = 1, SIZE
    for index, filters in enumerate(widths):
        params += 9 * channels * filters
        macs += 9 * channels * filters * side * side
        channels = filters
        if index in (1, 3):
            side //= 2
    return params, macs


def thin_widths(target, cost):
    """The widths, every one scaled by one factor, whose `cost` is nearest `target`.

    Returns `(widths, relative miss)`; `cost` is "params" or "macs".
    """
    which = 0 if cost == "params" else 1
    best = None
    for factor in np.linspace(0.02, 1.0, 981):
        widths = tuple(max(1, round(w * factor)) for w in WIDTHS)
        miss = abs(widths_cost(widths)[which] - target) / target
        if best is None or miss < best[1]:
            best = (widths, float(miss))
    return best


_PRUNED_PARAMS = {}  # (widths, bases kept per layer, row) -> pruned_params


def pruned_params(widths, rate, row=HYBRID_ROUTE):
    """Convolution parameters of the network at `widths` once `row`'s route prunes it to `rate`.

    The network is untrained, pruned at once and stripped. A route that
    allocates per layer keeps `kept_filters(w, rate)` bases of a layer of
    `w` filters, whatever the weights, and the count depends on nothing
    else: it is measured once per tuple of those (a bisection over the rate
    meets the same tuple again and again).
    """
    import tf_transform_conv as tc
    from tf_transform_conv.ops.assignment import kept_filters

    if PRUNED[row].get("allocation") != "per_layer":
        raise ValueError(f"pruned_params needs a route that allocates per layer; {row!r} "
                         f"allocates {PRUNED[row].get('allocation')!r}")
    key = (tuple(widths), tuple(kept_filters(w, rate) for w in widths), row)
    if key not in _PRUNED_PARAMS:
        model = tc.prune_model(cnn(widths, 0), lambda step: (True, rate),
                               route_reconstruction(row))
        tc.update_pruning_step(model, 0)
        _PRUNED_PARAMS[key] = conv_params(tc.strip_model(model))
    return _PRUNED_PARAMS[key]


def rate_for_params(widths, target, row=HYBRID_ROUTE):
    """The pruning rate (4 places) at which `pruned_params(widths, rate, row)` is nearest `target`.

    Found by bisection (the parameters fall as the rate grows).
    """
    low, high = 0.0, 0.99
    for _ in range(12):
        middle = (low + high) / 2
        low, high = (middle, high) if pruned_params(widths, middle, row) > target else (low, middle)
    low, high = round(low, 4), round(high, 4)
    misses = {rate: abs(pruned_params(widths, rate, row) - target) for rate in (low, high)}
    return min(misses, key=misses.get)


def hybrid_widths(row):
    return tuple(round(w * HYBRID[undistilled(row)]) for w in WIDTHS)


def allocation(row, rate, teacher, x, y):
    """An allocated row's widths and `BudgetPlan`, chosen on the trained dense model `teacher`.

    The plan keeps the affine row's convolution parameters at `rate` (at
    most; the knapsack stops below). Returns `(widths, plan)`.
    """
    import keras

    import tf_transform_conv as tc

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = keras.saving.load_model(teacher, compile=False)
    model.compile(loss=loss)
    target = pruned_params(WIDTHS, rate)
    importance = tc.saliency.filter_importance(model, (x, y), num_batches=16,
                                               batch_size=BATCH)
    keep = ALLOCATED[undistilled(row)]
    if keep is not None:
        others = tc.model_cost(model).params - conv_params(model)
        model, _ = tc.knapsack_removal(model, None, target=keep * conv_params(model) + others,
                                       cost="params", importance=importance, normalize="l2")
        model.compile(loss=loss)
        importance = tc.saliency.filter_importance(model, (x, y), num_batches=16,
                                                   batch_size=BATCH)
    widths = tuple(model.get_layer(f"conv{i}").filters for i in range(len(WIDTHS)))
    total = tc.model_cost(model).params
    fraction = (target + total - conv_params(model)) / total
    plan = tc.plan_budget(model, tc.Budget(params=fraction, base_ratios=ALLOCATION_RATIOS),
                          reconstruction=route_reconstruction(),
                          importance=importance)
    return widths, plan


def total_epochs(row, epochs):
    """Epochs a row's network trains in all: the knapsack and fitted rows start from a
    trained dense model."""
    from_dense = row in KNAPSACK or row in OURS_KNAPSACK or undistilled(row) in FITTED
    return 2 * epochs if from_dense else epochs


# ----------------------------------------------------------------------------
# The task


def _corner(patch, rng):
    """A random top-left corner that keeps `patch` inside the image."""
    return rng.integers(0, SIZE - patch.shape[0] + 1, 2)


def cluttered_digits(count, split, seed=0):
    """`(images, labels)`: `count` 20x20x1 float32 images of `split` ("train" or "test")."""
    from scipy import ndimage
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(1234).permutation(len(digits.images))
    chosen = order[:len(order) // 2] if split == "train" else order[len(order) // 2:]
    sources, targets = digits.images[chosen] / 16.0, digits.target[chosen]
    rng = np.random.default_rng((seed, 0 if split == "train" else 1))
    images = np.zeros((count, SIZE, SIZE), np.float32)
    labels = np.zeros(count, np.int64)
    for i in range(count):
        canvas = images[i]
        for _ in range(2):  # fragments of other digits
            other = sources[rng.integers(len(sources))]
            r, c = rng.integers(0, 5, 2)
            patch = ndimage.zoom(other[r:r + 4, c:c + 4], 1.5, order=1)
            top, left = _corner(patch, rng)
            canvas[top:top + patch.shape[0], left:left + patch.shape[1]] += patch
        k = rng.integers(len(sources))
        labels[i] = targets[k]
        digit = ndimage.zoom(sources[k], rng.uniform(1.3, 1.8), order=1)
        digit = ndimage.rotate(digit, rng.uniform(-30, 30), reshape=False, order=1)
        top, left = _corner(digit, rng)
        window = canvas[top:top + digit.shape[0], left:left + digit.shape[1]]
        np.maximum(window, digit, out=window)
        canvas += rng.normal(0.0, 0.15, canvas.shape).astype(np.float32)
    return images[..., None], labels


SHAPES = ("disc", "ring", "square", "frame", "triangle", "plus", "cross", "equals", "ell", "tee")


def _shape_mask(name, u, v, radius, stroke):
    """Whether points `(u, v)` of a shape's own frame lie in shape `name` of `radius`."""
    r, box = np.hypot(u, v), np.maximum(abs(u), abs(v))
    bar = lambda a, b, half: (abs(a) < half) & (abs(b) < radius)  # noqa: E731
    if name == "disc":
        return r < radius
    if name == "ring":
        return (r < radius) & (r > radius - stroke)
    if name == "square":
        return box < 0.85 * radius
    if name == "frame":
        return (box < 0.85 * radius) & (box > 0.85 * radius - stroke)
    if name == "triangle":
        return (v > -0.5 * radius) & (np.sqrt(3) * abs(u) + v < radius)
    if name == "plus":
        return bar(u, v, stroke / 2) | bar(v, u, stroke / 2)
    if name == "cross":
        a, b = (u + v) / np.sqrt(2), (u - v) / np.sqrt(2)
        return bar(a, b, stroke / 2) | bar(b, a, stroke / 2)
    if name == "equals":
        return ((abs(v - 0.45 * radius) < stroke / 2) | (abs(v + 0.45 * radius) < stroke / 2)) \
            & (abs(u) < radius)
    if name == "ell":
        return (bar(u + radius - stroke / 2, v, stroke / 2)
                | ((abs(v + radius - stroke / 2) < stroke / 2) & (abs(u) < radius)))
    return bar(u, v, stroke / 2) | ((abs(v - radius + stroke / 2) < stroke / 2)
                                    & (abs(u) < radius))  # tee


def cluttered_shapes(count, split, seed=0):
    """`(images, labels)`: 20x20x1 images of one of 10 outlined or filled shapes.

    The second task: each shape (`SHAPES`) has a random radius (3-6 pixels),
    stroke (1-2), rotation (up to 20 degrees either way), brightness and
    place, drawn at twice the resolution and averaged down, over four random
    line segments and Gaussian noise (sigma 0.35). `split` only seeds it.
    """
    rng = np.random.default_rng((seed, 2 if split == "train" else 3))
    fine = (np.arange(2 * SIZE) + 0.5) / 2
    rows, cols = np.meshgrid(fine, fine, indexing="ij")
    images = np.zeros((count, SIZE, SIZE), np.float32)
    labels = rng.integers(0, len(SHAPES), count)
    for i in range(count):
        canvas = np.zeros((2 * SIZE, 2 * SIZE), np.float32)
        for _ in range(4):  # clutter: line segments
            (r0, c0), angle = rng.uniform(0, SIZE, 2), rng.uniform(0, np.pi)
            along = (rows - r0) * np.sin(angle) + (cols - c0) * np.cos(angle)
            across = (rows - r0) * np.cos(angle) - (cols - c0) * np.sin(angle)
            canvas += 0.7 * ((abs(across) < 0.6) & (abs(along) < rng.uniform(2, 5)))
        radius, stroke = rng.uniform(3, 6), rng.uniform(1, 2)
        centre = rng.uniform(radius, SIZE - radius, 2)
        angle = np.deg2rad(rng.uniform(-20, 20))
        dr, dc = rows - centre[0], cols - centre[1]
        u = dc * np.cos(angle) + dr * np.sin(angle)
        v = -(dr * np.cos(angle) - dc * np.sin(angle))  # up is +v
        shape = _shape_mask(SHAPES[labels[i]], u, v, radius, stroke)
        canvas = np.maximum(canvas, rng.uniform(0.6, 1.0) * shape)
        images[i] = canvas.reshape(SIZE, 2, SIZE, 2).mean(axis=(1, 3))
        images[i] += rng.normal(0.0, 0.35, (SIZE, SIZE)).astype(np.float32)
    return images[..., None], labels


TASKS = {"digits": cluttered_digits, "shapes": cluttered_shapes}


# ----------------------------------------------------------------------------
# Runs (in worker processes)


def _init_worker():
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def cnn(widths, seed, base_ratio=None):
    """The network; with `base_ratio`, its convolutions are `TransformConv2D`s (scalar family)."""
    import keras

    import tf_transform_conv as tc

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 1))
    x = inputs
    for index, filters in enumerate(widths):
        if base_ratio is None:
            conv = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                       name=f"conv{index}")
        else:
            conv = tc.TransformConv2D(
                filters, 3, padding="same", use_bias=False,
                base_filters=round(filters * base_ratio), transforms="identity",
                transform_family="scalar", scale=True, name=f"conv{index}")
        x = conv(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{index}")(x)
        x = keras.layers.ReLU()(x)
        if index in (1, 3):
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="head")(x))


def kd_loss(packed, logits):
    """`(1 - w) CE(y, s) + w T^2 KL(softmax(t/T) || softmax(s/T))`; `packed` = [one-hot y, t]."""
    from keras import ops

    labels, teacher = packed[:, :10], packed[:, 10:]
    t = KD_TEMPERATURE
    ce = ops.categorical_crossentropy(labels, logits, from_logits=True)
    p_teacher = ops.softmax(teacher / t)
    log_student = ops.log_softmax(logits / t)
    kl = ops.sum(p_teacher * (ops.log(ops.maximum(p_teacher, 1e-12)) - log_student), axis=-1)
    return ops.mean((1.0 - KD_WEIGHT) * ce + KD_WEIGHT * t * t * kl)


class MagnitudeZeroing:
    """Filter pruning without reconstruction: zeroes the smallest-L2 filters of each layer.

    A kernel constraint holds each layer's mask, so the optimizer keeps
    zeroed filters at zero inside the compiled step; `update(step)` follows
    the schedule (a zeroed filter stays zeroed).
    """

    def __init__(self, model, schedule):
        import keras

        self.schedule = schedule
        self.layers = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
        self.masks = []
        for layer in self.layers:
            mask = keras.Variable(np.ones(layer.filters, "float32"), trainable=False,
                                  name=f"{layer.name}_mask")
            layer.kernel.constraint = lambda w, m=mask: w * m
            self.masks.append(mask)

    def update(self, step):
        from tf_transform_conv.ops.assignment import kept_filters

        should, sparsity = self.schedule(step)
        if not bool(should):
            return
        for layer, mask in zip(self.layers, self.masks):
            alive = np.asarray(mask) > 0
            norms = np.sqrt((np.asarray(layer.kernel) ** 2).sum(axis=(0, 1, 2)))
            norms[~alive] = -1.0
            keep = min(kept_filters(layer.filters, float(sparsity)), int(alive.sum()))
            new = np.zeros(layer.filters, "float32")
            new[np.argsort(-norms, kind="stable")[:keep]] = 1.0
            mask.assign(new)
            layer.kernel.assign(np.asarray(layer.kernel) * new)


def conv_params(model):
    """Parameters of the convolutions (Conv2D or TransformConv2D) of a model."""
    return int(sum(l.count_params() for l in model.layers
                   if type(l).__name__ in ("Conv2D", "TransformConv2D")))


CONVOLUTIONS = ("Conv2D", "FilterBasisConv2D", "TransformConv2D", "FilterBasisTransformConv2D")


def nonzero_conv_params(model):
    """Nonzero weights of the convolutions of a model (bases, transforms, scales included)."""
    return int(sum(np.count_nonzero(np.asarray(w)) for l in model.layers
                   if type(l).__name__ in CONVOLUTIONS for w in l.weights))


def dafp_removal(model, tuner, rate, match):
    """`model` without its least important channels, at the `removed` row's cost `match`.

    One DAFP threshold (a fraction of each layer's largest importance) for
    every layer, the smallest that brings the convolution parameters
    (`match="params"`) or the model's multiply-adds (`"macs"`) down to the
    thinner `removed` network's, found by bisection.
    """
    import tf_transform_conv as tc
    from tf_transform_conv.saliency import dafp_importance
    from tf_transform_conv.structured import dafp_keep
    from tf_transform_conv.ops.assignment import kept_filters
    from tf_transform_conv.structured import removal_cost

    thinner = cnn(tuple(kept_filters(w, rate) for w in WIDTHS), 0)

    def measure(cost):
        if match == "macs":
            return cost.macs
        return sum(layer.params for layer in cost.layers if layer.class_name == "Conv2D")

    budget = measure(tc.model_cost(thinner))
    scores = dafp_importance(model)
    low, high = 0.0, float(np.nextafter(1.0, 0.0))
    for _ in range(40):
        middle = (low + high) / 2
        if measure(removal_cost(model, dafp_keep(model, middle, scores))) <= budget:
            high = middle
        else:
            low = middle
    keep = dafp_keep(model, high, scores)
    tuner.detach()
    return tc.remove_filters(model, keep) if keep else model, high, budget


def deployed(final, task):
    """`{}`, or with `task["export"]` (a `.tflite` path): the file written there and its bytes."""
    if not task.get("export"):
        return {}
    import tf_transform_conv as tc

    written = tc.export_tflite(final, task["export"])
    return dict(tflite=str(written.path), tflite_bytes=written.bytes)


def knapsack_run(task, x, y, x_test, y_test):
    """A knapsack row: from the seed's trained dense model, to the `removed` row's cost.

    `task["target"]`, where given, is the cost to reach instead.
    """
    import keras
    import tensorflow_model_optimization as tfmot

    import tf_transform_conv as tc
    from tf_transform_conv.ops.assignment import kept_filters
    from tf_transform_conv.distill import InnerDistiller

    row, rate, seed, cfg = task["row"], task["rate"], task["seed"], task["config"]
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    match = KNAPSACK.get(row) or OURS_KNAPSACK[row]
    steps_per_epoch = cfg["train_size"] // BATCH
    total = cfg["epochs"] * steps_per_epoch
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    teacher = keras.saving.load_model(task["teacher"], compile=False)
    teacher.compile(loss=loss)
    dense_cost = tc.model_cost(teacher)
    thinner = tc.model_cost(cnn(tuple(kept_filters(w, rate) for w in WIDTHS), seed))
    target = task.get("target") or (thinner.params if match == "params" else thinner.macs)
    importance = tc.saliency.filter_importance(teacher, (x, y), num_batches=16,
                                               batch_size=BATCH)
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
        LEARNING_RATE, total))
    extra = {}
    if row in KNAPSACK:
        student, removal = tc.knapsack_removal(
            teacher, None, target=target, cost=match, importance=importance,
            normalize="l2" if row == "knapsack-l2+ikd" else None)
        model = InnerDistiller(student, teacher, layers=list(INNER_KD_LAYERS),
                               weight=INNER_KD_WEIGHT)
        model.compile(optimizer=optimizer, loss=loss, jit_compile=True)
        model.fit(x, y, batch_size=BATCH, epochs=cfg["epochs"], verbose=0, shuffle=True)
        final = student
        extra["widths"] = [len(removal.keep[f"conv{i}"]) for i in range(len(WIDTHS))]
        extra["predicted_cost"] = removal.predicted_cost
    else:
        options = dict(base_ratios=KNAPSACK_RATIOS)
        fraction = target / (dense_cost.params if match == "params" else dense_cost.macs)
        try:
            plan = tc.plan_budget(teacher, tc.Budget(**{match: fraction}, **options),
                                  importance=importance)
            extra["feasible"] = True
        except ValueError:  # below the cheapest choice: every layer at its fewest bases
            plan = tc.plan_budget(teacher, tc.Budget(**{match: 1.0}, keep_dense=False,
                                                     base_ratios=(min(KNAPSACK_RATIOS),)))
            extra["feasible"] = False
        frequency = max(1, steps_per_epoch // 4)
        end = max(frequency, int(cfg["prune_fraction"] * total) // frequency * frequency)
        schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, rate, 0, end, power=1,
                                                        frequency=frequency)
        model = tc.prune_model(
            teacher,
            schedule,
            budget=plan,
            reconstruction=tc.Reconstruction(transforms="d4", scale=True),
        )
        model.compile(optimizer=optimizer, loss=loss, jit_compile=True)
        model.fit(x, y, batch_size=BATCH, epochs=cfg["epochs"], verbose=0, shuffle=True,
                  callbacks=[tc.UpdateTransformPruningStep()])
        final = tc.strip_model(model)
        extra["bases"] = [plan.bases.get(f"conv{i}") for i in range(len(WIDTHS))]
        extra["predicted_cost"] = plan.predicted_cost
    accuracy = float(np.mean(np.argmax(final.predict(x_test, batch_size=256, verbose=0), -1)
                             == y_test))
    final_cost = tc.model_cost(final)
    return dict(row=row, rate=rate, seed=seed, accuracy=accuracy,
                conv_params=conv_params(final), dense_conv_params=conv_params(teacher),
                params=int(final_cost.params), macs=int(final_cost.macs),
                target=int(target), match=match, epochs=total_epochs(row, cfg["epochs"]),
                seconds=time.perf_counter() - start, **deployed(final, task),
                **extra)


def run_one(task):
    """Trains and scores one (row, rate, seed); returns a result dict."""
    import keras
    import tensorflow_model_optimization as tfmot

    import tf_transform_conv as tc
    from tf_transform_conv.distill import InnerDistiller
    from tf_transform_conv.ops.assignment import kept_filters
    from tf_transform_conv.training import CosineRestart

    row, rate, seed, cfg = task["row"], task["rate"], task["seed"], task["config"]
    start = time.perf_counter()
    data = TASKS[cfg.get("task", "digits")]
    x, y = data(cfg["train_size"], "train")
    x_test, y_test = data(cfg["test_size"], "test")
    if row in KNAPSACK or row in OURS_KNAPSACK:
        return knapsack_run(task, x, y, x_test, y_test)
    epochs = task.get("epochs", cfg["epochs"])
    steps_per_epoch = cfg["train_size"] // BATCH
    total = epochs * steps_per_epoch
    base = undistilled(row)
    widths = WIDTHS
    plan, extra = None, {}
    if row in THIN or base in HYBRID:
        widths = tuple(task["widths"])
    elif base in ALLOCATED:
        widths, plan = allocation(row, rate, task["teacher"], x, y)
    elif base == "quarter":
        widths = tuple(w // 2 for w in WIDTHS)
    elif base == "removed":
        widths = tuple(kept_filters(w, rate) for w in WIDTHS)
    if base in TRANSFORM:
        model = cnn(widths, seed, base_ratio=1 - rate if base == "tc" else TC_IP_RATIO)
    elif base in FITTED:
        model = fitted(row, task["teacher"], rate, x, y, seed)
        extra["fitted_accuracy"] = float(np.mean(np.argmax(
            model.predict(x_test, batch_size=256, verbose=0), -1) == y_test))
    else:
        model = cnn(widths, seed)
    dense_params = conv_params(cnn(WIDTHS, seed))

    frequency = max(1, steps_per_epoch // 4)
    end = max(frequency, int(cfg["prune_fraction"] * total) // frequency * frequency)
    final_sparsity = task.get("prune_rate", rate) or 0.0
    if base == "tc-ip":  # the coefficients of the bases: tc's nonzero bases at this rate
        final_sparsity = 1 - (1 - rate) / TC_IP_RATIO
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, final_sparsity, 0, end, power=1,
                                                    frequency=frequency)
    callbacks, zeroing = [], None
    if base == "tc-ip":
        model = tc.prune_interspace(model, schedule, basis=TRANSFORM[base])
        callbacks.append(tc.UpdateTransformPruningStep())
    elif base in UNSTRUCTURED:
        if UNSTRUCTURED[base] is None:
            model = tc.prune_low_magnitude(model, schedule, layers=keras.layers.Conv2D)
        else:
            model = tc.prune_interspace(model, schedule, basis=UNSTRUCTURED[base])
        callbacks.append(tc.UpdateTransformPruningStep())
    elif base in PRUNED or base in HYBRID or base in ALLOCATED:
        reconstruction = route_reconstruction(base if base in PRUNED else HYBRID_ROUTE)
        model = tc.prune_model(model, schedule, reconstruction, budget=plan)
        callbacks.append(tc.UpdateTransformPruningStep())
    elif base == "zeroed":
        zeroing = MagnitudeZeroing(model, schedule)

        callbacks.append(keras.callbacks.LambdaCallback(
            on_train_batch_begin=lambda batch, logs: zeroing.update(next(steps))))
        steps = iter(range(total))

    targets, loss = y, keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trained = model  # what fits: the model, or a distiller around it
    if row.endswith("+kd"):
        teacher = keras.saving.load_model(task["teacher"], compile=False)
        logits = teacher.predict(x, batch_size=256, verbose=0)
        targets = np.concatenate([np.eye(10, dtype="float32")[y], logits], axis=1)
        loss = kd_loss
    elif row.endswith("+ikd"):
        teacher = keras.saving.load_model(task["teacher"], compile=False)
        trained = InnerDistiller(model, teacher, layers=list(INNER_KD_LAYERS),
                                 weight=INNER_KD_WEIGHT, output_weight=KD_WEIGHT,
                                 temperature=KD_TEMPERATURE)
    learning_rate = keras.optimizers.schedules.CosineDecay(LEARNING_RATE, total)
    restart = cfg.get("lr_restart", "none")
    prunes = (base in PRUNED or base in HYBRID or base in ALLOCATED or base in UNSTRUCTURED
              or base == "tc-ip")
    scheduled = prunes or base == "zeroed"  # the rows the pruning schedule drives
    if (restart == "all" and base not in DAFP) or (restart == "pruning" and scheduled):
        learning_rate = CosineRestart(LEARNING_RATE, total, end)
    trained.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, jit_compile=True)
    if base in DAFP:
        from tf_transform_conv.structured import SparsityTuner

        channels = sum(WIDTHS)
        kept = sum(kept_filters(w, rate) for w in WIDTHS)
        tuner = SparsityTuner(target=1 - kept / channels, step=DAFP_STEP,
                              threshold=DAFP_THRESHOLD, frequency=frequency)
        callbacks.append(tuner)
    if base in DAFP:  # with one epoch: penalty, removal, no training after it
        model.fit(x, targets, batch_size=BATCH, epochs=max(1, epochs - 1), verbose=0,
                  shuffle=True, callbacks=callbacks)
        model, fraction, budget = dafp_removal(model, tuner, rate, DAFP[base])
        if epochs > 1:
            decay = keras.optimizers.schedules.CosineDecay(LEARNING_RATE, total)
            model.compile(
                optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
                    float(decay(total - steps_per_epoch)), steps_per_epoch)),
                loss=loss, jit_compile=True,
            )
            model.fit(x, targets, batch_size=BATCH, epochs=1, verbose=0, shuffle=True)
    else:
        trained.fit(x, targets, batch_size=BATCH, epochs=epochs, verbose=0,
                    shuffle=True, callbacks=callbacks)
    final = tc.strip_model(model) if prunes else model
    accuracy = float(np.mean(np.argmax(final.predict(x_test, batch_size=256, verbose=0), -1)
                             == y_test))
    sparse = base in UNSTRUCTURED or base in TRANSFORM
    result = dict(row=row, rate=rate, seed=seed, accuracy=accuracy,
                  conv_params=(nonzero_conv_params(final) if sparse
                               else conv_params(final)), dense_conv_params=dense_params,
                  macs=int(tc.model_cost(final).macs), epochs=total_epochs(row, epochs),
                  seconds=time.perf_counter() - start, **deployed(final, task), **extra)
    if row in THIN:
        result.update(widths=list(widths), match=THIN[row], target=task["target"],
                      match_miss=task["match_miss"], matched_to=task["matched_to"])
    if base in HYBRID:
        result.update(widths=list(widths), prune_rate=final_sparsity)
    if plan is not None:
        result.update(widths=list(widths), bases={c.name: c.bases for c in plan.choices},
                      planned_params=int(plan.predicted_cost))
    if base in DAFP:
        result.update(dafp_fraction=fraction,
                      budget=int(budget), match=DAFP[base],
                      widths=[l.filters for l in final.layers if type(l).__name__ == "Conv2D"],
                      tuner=tuner.history)
    if zeroing is not None:
        alive = sum(int(np.asarray(m).sum()) for m in zeroing.masks)
        result["kept_filters"] = alive
    if row == "dense":
        final.save(task["teacher"])
        if cfg["one_shot"]:
            result["one_shot"] = one_shot(final, x, x_test, y_test, cfg["rates"])
    return result


def fitted(row, teacher, rate, x, y, seed):
    """A fitted row's start: the trained dense model converted at `rate` (or to the
    allocated row's plan), recalibrated, fitted to the dense layers' outputs and
    recalibrated again."""
    import keras

    import tf_transform_conv as tc

    keras.utils.set_random_seed(seed)
    dense = keras.saving.load_model(teacher, compile=False)
    reconstruction = route_reconstruction()
    allocated = FITTED[undistilled(row)]
    if allocated is None:
        converted, _ = tc.transform_model(dense, sparsity=rate, reconstruction=reconstruction)
    else:
        _, plan = allocation(allocated, rate, teacher, x, y)
        converted, _ = tc.transform_model(dense, reconstruction=reconstruction, budget=plan)
    tc.recalibrate_batch_norm(converted, x, num_batches=RECALIBRATE_BATCHES, batch_size=BATCH)
    fit_outputs(dense, converted, x, steps=OUTPUT_FIT_STEPS, seed=seed)
    tc.recalibrate_batch_norm(converted, x, num_batches=RECALIBRATE_BATCHES, batch_size=BATCH)
    return converted


def one_shot(dense, x, x_test, y_test, rates):
    """Accuracy of `transform_model` conversions of `dense`, before any training.

    As converted (each kernel fitted to the dense kernel), after
    `recalibrate_batch_norm`, and after fitting each converted layer to the
    dense layer's outputs on data (`fit_outputs`, then recalibrating again).
    """
    import tf_transform_conv as tc

    def score(model):
        predicted = np.argmax(model.predict(x_test, batch_size=256, verbose=0), -1)
        return float(np.mean(predicted == y_test))

    rows = []
    for family, transforms in (("discrete", "d4"), ("scalar", "identity")):
        for rate in rates:
            converted, _ = tc.transform_model(
                dense,
                sparsity=rate,
                reconstruction=tc.Reconstruction(transforms=transforms, transform_family=family, scale=True),
            )
            before = score(converted)
            tc.recalibrate_batch_norm(converted, x, num_batches=RECALIBRATE_BATCHES,
                                      batch_size=BATCH)
            recalibrated = score(converted)
            fit_outputs(dense, converted, x)
            tc.recalibrate_batch_norm(converted, x, num_batches=RECALIBRATE_BATCHES,
                                      batch_size=BATCH)
            rows.append(dict(family=family, rate=rate, accuracy=before,
                             recalibrated=recalibrated, output_fit=score(converted)))
    return rows


def fit_outputs(dense, converted, x, steps=OUTPUT_FIT_STEPS, learning_rate=1e-3, seed=0):
    """Fits each converted layer, in order, to the dense layer's outputs on data.

    For every `TransformConv2D` of `converted`: its input is what the
    converted network so far computes (inference mode), its target what the
    dense layer of the same name computes inside the dense network; Adam
    trains the layer's weights (bases, scales, transform parameters) on the
    mean squared difference, `steps` batches of `BATCH` training images.
    Later layers so learn to undo the errors of earlier ones.
    """
    import keras
    import tensorflow as tf

    def fitting_step(layer):
        source = keras.Model(converted.inputs, layer.input)
        target = keras.Model(dense.inputs, dense.get_layer(layer.name).output)
        optimizer = keras.optimizers.Adam(learning_rate)
        variables = layer.trainable_variables
        optimizer.build(variables)

        @tf.function(jit_compile=True)
        def step(batch):
            inputs, wanted = source(batch, training=False), target(batch, training=False)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(layer(inputs) - wanted))
            optimizer.apply(tape.gradient(loss, variables), variables)
            return loss

        return step

    rng = np.random.default_rng(seed)
    for layer in converted.layers:
        if type(layer).__name__ == "TransformConv2D":
            step = fitting_step(layer)
            for _ in range(steps):
                step(x[rng.integers(0, len(x), BATCH)])


# ----------------------------------------------------------------------------
# Report


def summarize(runs, rates):
    """`{(row, rate): (mean, std, n, conv_param_fraction)}` over seeds."""
    groups = {}
    for run in runs:
        groups.setdefault((run["row"], run["rate"]), []).append(run)
    out = {}
    for key, items in groups.items():
        acc = np.array([r["accuracy"] for r in items])
        fraction = np.mean([r["conv_params"] / r["dense_conv_params"] for r in items])
        out[key] = (float(acc.mean()), float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                    len(acc), float(fraction))
    return out


def thin_reference(row, ran):
    """The thin row `row` is compared with: the thin network distilled the same way
    (`thin+kd`, `thin+ikd`) for a distilled route, where it ran.

    `ran` holds the names of the rows that ran.
    """
    for reference in DISTILLED_THIN:
        suffix = reference.removeprefix("thin")
        if row != reference and row.endswith(suffix) and reference in ran:
            return reference
    return "thin"


def versus_thin(runs):
    """`{(row, rate): (mean, std, reference)}`: accuracy minus the thin row's, in points.

    Paired by seed (the same seed's thin run at the same rate); the
    standard deviation is over the seeds' differences.
    """
    thin = {(run["row"], run["rate"], run["seed"]): run["accuracy"] for run in runs
            if run["row"] in THIN}
    ran = {run["row"] for run in runs}
    groups = {}
    for run in runs:
        reference = thin_reference(run["row"], ran)
        key = (reference, run["rate"], run["seed"])
        if run["rate"] is not None and run["row"] != reference and key in thin:
            groups.setdefault((run["row"], run["rate"], reference), []).append(
                100 * (run["accuracy"] - thin[key]))
    return {(row, rate): (float(np.mean(d)), float(np.std(d, ddof=1)) if len(d) > 1 else 0.0,
                          reference)
            for (row, rate, reference), d in groups.items()}


def report(runs, rows, rates):
    summary = summarize(runs, rates)
    versus = versus_thin(runs)
    lines = [f"{'row':<18}" + "".join(f"{'rate ' + str(r):>42}" for r in rates),
             f"{'':<18}" + "".join(f"{'accuracy [conv params] vs thin (points)':>42}"
                                   for r in rates)]
    for row in rows:
        if row in ("dense", "quarter"):
            mean, std, n, fraction = summary[(row, None)]
            lines.append(f"{row:<18}{mean:>12.3f} +- {std:.3f} (conv params {fraction:.2f})")
            continue
        cells = []
        for rate in rates:
            if (row, rate) in summary:
                mean, std, n, fraction = summary[(row, rate)]
                cell = f"{mean:.3f} +- {std:.3f} [{fraction:.3f}]"
                if (row, rate) in versus:
                    diff, diff_std, reference = versus[(row, rate)]
                    cell += f" {diff:+5.1f} +- {diff_std:.1f}" + MARKS.get(reference, " ")
                cells.append(cell)
            else:
                cells.append("-")
        lines.append(f"{row:<18}" + "".join(f"{c:>42}" for c in cells))
    references = {v[2] for v in versus.values()}
    lines += [f"({mark}: against {reference}, {what})"
              for reference, (mark, what) in DISTILLED_THIN.items() if reference in references]
    return "\n".join(lines), summary, versus


def one_shot_report(runs):
    rows = [r for run in runs if run["row"] == "dense" for r in run.get("one_shot", [])]
    groups = {}
    for r in rows:
        groups.setdefault((r["family"], r["rate"]), []).append(r)
    lines = ["one-shot transform_model (no training), mean over seeds:",
             f"{'family':<10}{'rate':>6}{'as converted':>16}{'BN recalibrated':>18}"
             f"{'output fit':>12}"]
    table = []
    for (family, rate), items in sorted(groups.items()):
        means = {key: float(np.mean([i[key] for i in items]))
                 for key in ("accuracy", "recalibrated", "output_fit") if key in items[0]}
        lines.append(f"{family:<10}{rate:>6}{means['accuracy']:>16.3f}"
                     f"{means['recalibrated']:>18.3f}{means.get('output_fit', np.nan):>12.3f}")
        table.append(dict(family=family, rate=rate, seeds=len(items), **means))
    return "\n".join(lines), table


def targets(summary, rates, versus=None):
    """The issues' targets, evaluated on the measured means."""
    checks = {}
    for rate in rates:  # the best route no larger than the thin network (within tolerance)
        if ("thin", rate) not in summary:
            continue
        limit = summary[("thin", rate)][3] * (1 + THIN_TOLERANCE)
        routes = {row: v for (row, r), v in (versus or {}).items()
                  if r == rate and row not in THIN and summary[(row, rate)][3] <= limit}
        if routes:
            best = max(routes, key=lambda row: summary[(row, rate)][0])  # most accurate
            checks[f"best route of equal size ({best}) - {routes[best][2]} at {rate} "
                   ">= 1.5 points"] = routes[best][0]
            checks[f"dense - best route of equal size ({best}) at {rate}"] = \
                (summary[("dense", None)][0] - summary[(best, rate)][0]) * 100
    dense = summary[("dense", None)][0]
    if ("quarter", None) in summary:
        checks["dense - quarter >= 5 points"] = (dense - summary[("quarter", None)][0]) * 100
    high = max(rates)
    reconstruction = [r for r in (*PRUNED, "scalar+kd", "paper+kd") if (r, high) in summary]
    baselines = [summary[(b, high)][0] for b in ("zeroed", "removed") if (b, high) in summary]
    if reconstruction and baselines:
        margin = min(summary[(r, high)][0] for r in reconstruction) - max(baselines)
        checks[f"every reconstruction row - best of zeroed/removed at {high} >= 2 points"] = \
            margin * 100
    for family in ("rotation", "affine"):
        for rate in rates:
            if (family, rate) in summary and ("scalar", rate) in summary:
                checks[f"{family} - scalar at {rate} >= 0 points"] = \
                    (summary[(family, rate)][0] - summary[("scalar", rate)][0]) * 100
    for row in ("ip", "ip-dct"):
        for rate in rates:
            if (row, rate) in summary and ("sp", rate) in summary:
                checks[f"{row} - sp at {rate} >= {2 if rate >= 0.98 else 0} points"] = \
                    (summary[(row, rate)][0] - summary[("sp", rate)][0]) * 100
    for rate in rates:  # no target: whether stacking the filter basis helps
        if ("tc-ip", rate) in summary and ("tc", rate) in summary:
            checks[f"tc-ip - tc at {rate} (> 0: the filter basis helps)"] = \
                (summary[("tc-ip", rate)][0] - summary[("tc", rate)][0]) * 100
    low = min(rates)
    best = [summary[k][0] for k in summary if k[1] == low]
    if best:
        checks[f"dense - best row at {low} <= 1 point"] = (dense - max(best)) * 100
    return checks


TITLES = {"digits": "Cluttered digits", "shapes": "Cluttered shapes"}


def plot(summary, rows, rates, path, task="digits"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pruned_rows = [r for r in rows if r not in ("dense", "quarter")]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(rates)
    for i, rate in enumerate(rates):
        keys = [(r, rate) for r in pruned_rows]
        means = [summary[k][0] if k in summary else np.nan for k in keys]
        stds = [summary[k][1] if k in summary else 0 for k in keys]
        ax.bar(np.arange(len(pruned_rows)) + (i - (len(rates) - 1) / 2) * width, means, width,
               yerr=stds, capsize=2, label=f"pruning rate {rate}")
    dense = summary[("dense", None)][0]
    ax.axhline(dense, color="k", lw=1, label=f"dense {dense:.3f}")
    if ("quarter", None) in summary:
        quarter = summary[("quarter", None)][0]
        ax.axhline(quarter, color="gray", ls="--", lw=1,
                   label=f"half width (1/4 conv params) {quarter:.3f}")
    ax.set_xticks(np.arange(len(pruned_rows)))
    ax.set_xticklabels(pruned_rows, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (mean, std over seeds)")
    lows = [summary[k][0] for k in summary]
    ax.set_ylim(max(0.0, min(lows) - 0.08), min(1.0, max(lows) + 0.16))
    ax.set_title(f"{TITLES[task]}, 4-conv CNN: pruned filters removed, zeroed or rebuilt")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    common.save_figure(fig, path)


def hybrid_settings(row, rate):
    """A hybrid row's task settings at `rate`: its widths and its own pruning rate (else {})."""
    if undistilled(row) not in HYBRID:
        return {}
    widths = hybrid_widths(row)
    target = pruned_params(WIDTHS, rate)
    prune_rate = rate_for_params(widths, target)
    reached = pruned_params(widths, prune_rate)
    print(f"{row} at {rate}: widths {widths}, pruned at {prune_rate} to {reached} conv params "
          f"({HYBRID_ROUTE}: {target})", flush=True)
    if abs(reached - target) > THIN_TOLERANCE * target:  # e.g. narrower than the route's size
        print(f"warning: {row} at {rate} misses the {HYBRID_ROUTE} row's parameters by "
              f"{abs(reached - target) / target:.1%}", flush=True)
    return dict(widths=list(widths), prune_rate=prune_rate)


def thin_tasks(runs, rows, args, config, teacher, epochs):
    """The thin rows' runs: at each rate, widths matched to the reference route's mean cost.

    The reference is `--thin-match` where it ran at the rate, else the
    first route that did; with no route at all, the dense network's cost
    times `1 - rate`. Every thin row trains `epochs`, the most any route
    of this run trains in all (pretraining included).
    """
    dense = widths_cost(WIDTHS)
    tasks = []
    for rate in args.rates:
        at_rate = [run for run in runs if run["rate"] == rate]
        names = [args.thin_match] + [run["row"] for run in at_rate]
        reference = next((name for name in names
                          if any(run["row"] == name for run in at_rate)), None)
        matched = [run for run in at_rate if run["row"] == reference]
        for row in rows:
            cost = THIN[row]
            if matched:
                target = float(np.mean([run["conv_params" if cost == "params" else "macs"]
                                        for run in matched]))
            else:
                target = (1 - rate) * dense[0 if cost == "params" else 1]
            widths, miss = thin_widths(target, cost)
            if miss > THIN_TOLERANCE:
                print(f"warning: {row} at {rate} misses its {cost} target by {miss:.1%}")
            tasks += [dict(row=row, rate=rate, seed=s, config=config, teacher=teacher[s],
                           widths=widths, target=target, match_miss=miss,
                           matched_to=reference, epochs=epochs)
                      for s in range(args.seeds)]
    return tasks


def summary_json(summary, versus):
    return [dict(row=k[0], rate=k[1], mean=v[0], std=v[1], seeds=v[2],
                 conv_param_fraction=v[3],
                 **({} if k not in versus else dict(
                     versus_thin_points=versus[k][0], versus_thin_std=versus[k][1],
                     versus=versus[k][2])))
            for k, v in summary.items()]


def main(argv=None):
    args = parse_args(argv)
    if args.replot:  # the report again, from the runs saved in the JSON
        saved = json.loads(args.out.read_text())
        rates = saved["config"]["rates"]
        rows = list(dict.fromkeys(run["row"] for run in saved["runs"]))
        text, summary, versus = report(saved["runs"], rows, rates)
        checks = targets(summary, rates, versus)
        print(text + "\n\ntargets (points):")
        for name, value in checks.items():
            print(f"  {name}: {value:+.1f}")
        saved.update(summary=summary_json(summary, versus), targets_points=checks)
        common.write_json(args.out, saved)
        plot(summary, rows, rates, args.out.with_suffix(".png"),
             saved["config"].get("task", "digits"))
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
        return
    config = dict(train_size=args.train_size, test_size=args.test_size, epochs=args.epochs,
                  rates=args.rates, prune_fraction=args.prune_fraction,
                  lr_restart=args.lr_restart,
                  one_shot=not args.no_one_shot, task=args.task)
    workdir = Path(tempfile.mkdtemp(prefix="ablation-"))
    teacher = {seed: str(workdir / f"dense-{seed}.keras") for seed in range(args.seeds)}
    first = [dict(row="dense", rate=None, seed=s, config=config, teacher=teacher[s])
             for s in range(args.seeds)]
    if "quarter" in args.rows:
        first += [dict(row="quarter", rate=None, seed=s, config=config, teacher=None)
                  for s in range(args.seeds)]
    routes = [row for row in args.rows if row not in ("dense", "quarter", *THIN)]
    hybrid = {(row, rate): hybrid_settings(row, rate) for row in routes for rate in args.rates}
    rest = [dict(row=row, rate=rate, seed=s, config=config, teacher=teacher[s],
                 **hybrid[row, rate])
            for row in routes for rate in args.rates for s in range(args.seeds)]
    thin_rows = [row for row in args.rows if row in THIN]
    thin_epochs = max([total_epochs(row, args.epochs) for row in routes], default=args.epochs)
    started = time.perf_counter()
    runs = []
    context = __import__("multiprocessing").get_context("spawn")
    with futures.ProcessPoolExecutor(args.workers, mp_context=context,
                                     initializer=_init_worker) as pool:
        # The KD rows need the dense teachers; the thin rows, the routes' sizes.
        for batch in (first, rest, "thin"):
            if batch == "thin":
                batch = thin_tasks(runs, thin_rows, args, config, teacher, thin_epochs)
            for result in pool.map(run_one, batch):
                runs.append(result)
                rate = "" if result["rate"] is None else f" at {result['rate']}"
                print(f"{result['row']}{rate}, seed {result['seed']}: "
                      f"{result['accuracy']:.4f} ({result['seconds']:.0f} s)", flush=True)
    minutes = (time.perf_counter() - started) / 60
    text, summary, versus = report(runs, args.rows, args.rates)
    shot_text, shot_table = one_shot_report(runs)
    checks = targets(summary, args.rates, versus)
    print("\ntest accuracy, mean +- std over seeds [conv params / dense]:")
    print(text)
    print("\n" + shot_text)
    print("\ntargets (points):")
    for name, value in checks.items():
        print(f"  {name}: {value:+.1f}")
    print(f"\n{len(runs)} runs in {minutes:.1f} min on {args.workers} workers")

    import keras
    import tensorflow as tf

    payload = {
        "benchmark": "ablation",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/ablation.py " + shlex.join(argv or sys.argv[1:]),
        "machine": common.machine_info(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "numpy": np.__version__},
        "config": {**config, "seeds": args.seeds, "widths": WIDTHS, "batch": BATCH,
                   "thin_match": args.thin_match, "thin_epochs": thin_epochs,
                   "learning_rate": LEARNING_RATE,
                   "kd": [KD_TEMPERATURE, KD_WEIGHT], "min_bases_paper": MIN_BASES_PAPER,
                   "workers": args.workers},
        "minutes": minutes,
        "summary": summary_json(summary, versus),
        "one_shot": shot_table,
        "targets_points": checks,
        "runs": runs,
    }
    common.write_json(args.out, payload)
    plot(summary, args.rows, args.rates, args.out.with_suffix(".png"), args.task)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
