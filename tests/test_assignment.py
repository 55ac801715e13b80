"""assignment.py: fitting bases and (base, transform, scale) to a dense kernel.

The math is checked with plain numpy arrays against independent references
(`reference.py`'s transforms and `materialize`, `np.linalg.lstsq`, brute-force
loops); only `test_reconstruct_matches_layer_materialized_kernel` builds a
layer. Tolerances: exact recoveries are asserted at squared error <= 1e-10 of
each filter's squared norm (float32 scales and base kernel give ~1e-14);
float32 costs against float64 references at 1e-4 relative.
"""

import ast
import inspect
import re

import numpy as np
import pytest

import reference
from tf_transform_conv.ops import assignment as assignment_lib
from tf_transform_conv.ops import families
from tf_transform_conv.ops import transforms as transforms_lib
from tf_transform_conv.ops.assignment import AssignmentFit
from tf_transform_conv.ops.assignment import fit_assignment
from tf_transform_conv.ops.assignment import reconstruction_error

EXACT = 1e-10


def generated_kernel(rng, preset, depth_groups, n=5, filters=24, channels=8, scaled=True):
    """A kernel whose outputs are (scaled) transforms of `n` random gaussian bases.

    The bases themselves are `n` of the outputs (identity, scale 1) at random
    positions. Each other output draws one base and, per depth group, its own
    transform. (With a different base per group, a filter mixing two bases
    covers half of each base's outputs, as well as a true base does, and the
    greedy choice need not find an exact set.)

    Returns:
        `(kernel, true_bases, mapping, scale)` where `mapping[k, o]` is
        `(original filter index of the base, transform name)`.
    """
    names = transforms_lib.resolve_transforms(preset, 3)
    base = rng.normal(size=(3, 3, channels, n))
    table = np.stack(
        [
            np.broadcast_to(rng.integers(0, n, filters), (depth_groups, filters)),
            rng.integers(0, len(names), (depth_groups, filters)),
        ],
        axis=-1,
    )
    positions = rng.permutation(filters)[:n]
    table[:, positions, 0] = np.arange(n)
    table[:, positions, 1] = 0  # identity
    scale = rng.uniform(0.5, 2.0, filters) * rng.choice([-1.0, 1.0], filters)
    if not scaled:
        scale[:] = 1.0
    scale[positions] = 1.0
    kernel = reference.materialize(base, table, names, scale)
    mapping = [
        [(int(positions[table[k, o, 0]]), names[table[k, o, 1]]) for o in range(filters)]
        for k in range(depth_groups)
    ]
    return kernel, np.sort(positions), mapping, scale


def fit_mapping(fit):
    """`[k][o] = (original filter index of the base, transform name)` of a fit."""
    g, filters, _ = fit.assignment.shape
    return [
        [
            (int(fit.bases[fit.assignment[k, o, 0]]), fit.transforms[fit.assignment[k, o, 1]])
            for o in range(filters)
        ]
        for k in range(g)
    ]


def squared_relative_errors(fit):
    return fit.errors / np.maximum(fit.norms**2, 1e-300)


PRESETS = ("d4", "rotations", "flips", "shifts")


@pytest.mark.parametrize("scaled", [True, False], ids=["scale", "no_scale"])
@pytest.mark.parametrize("depth_groups", [1, 2])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_generated_kernel_exactly(seed, preset, depth_groups, scaled):
    rng = np.random.default_rng(seed)
    kernel, true_bases, mapping, scale = generated_kernel(rng, preset, depth_groups, scaled=scaled)
    fit = fit_assignment(kernel, 5, preset, depth_groups=depth_groups, scale=scaled)

    assert len(fit.bases) == 5 == len(set(fit.bases.tolist()))
    assert squared_relative_errors(fit).max() <= EXACT
    # One kept filter from each generating base's outputs.
    assert {mapping[0][b][0] for b in fit.bases.tolist()} == set(true_bases.tolist())
    np.testing.assert_allclose(fit.reconstruct(), kernel, rtol=0, atol=1e-5 * np.abs(kernel).max())
    # The fit may keep a transformed copy of a base instead of the base;
    # when it keeps the generating bases it must find the generating mapping.
    if set(fit.bases.tolist()) == set(true_bases.tolist()):
        assert fit_mapping(fit) == mapping
        np.testing.assert_allclose(fit.scale, scale, rtol=1e-6)


@pytest.mark.parametrize("depth_groups", [1, 2])
@pytest.mark.parametrize("preset", PRESETS)
def test_generating_mapping_recovered_from_generating_bases(preset, depth_groups):
    kernel, true_bases, mapping, scale = generated_kernel(
        np.random.default_rng(7), preset, depth_groups
    )
    for criterion in ("reconstruction", "l1"):
        fit = fit_assignment(
            kernel, 5, preset, depth_groups=depth_groups, criterion=criterion,
            candidates=true_bases[::-1],
        )
        np.testing.assert_array_equal(fit.bases, true_bases)
        assert fit_mapping(fit) == mapping
        np.testing.assert_allclose(fit.scale, scale, rtol=1e-6)
        assert squared_relative_errors(fit).max() <= EXACT


def test_scale_is_least_squares_closed_form():
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(3, 3, 6, 2))
    fit = fit_assignment(kernel, 1, "all", candidates=[0])
    names = fit.transforms
    target = kernel[..., 1].ravel()
    residuals, scales = [], []
    for name in names:
        moved = reference.TRANSFORMS[name](kernel[..., 0]).ravel()
        a, res, *_ = np.linalg.lstsq(moved[:, None], target, rcond=None)
        scales.append(a[0])
        residuals.append(float(np.sum((target - a[0] * moved) ** 2)))
    best = int(np.argmin(residuals))
    np.testing.assert_array_equal(fit.assignment[0, 1], [0, best])
    np.testing.assert_allclose(fit.scale[1], scales[best], rtol=1e-6)
    np.testing.assert_allclose(fit.errors[1], residuals[best], rtol=1e-5)
    assert fit.scale[0] == 1.0
    assert fit.errors[0] <= EXACT * fit.norms[0] ** 2  # only the float32 rounding of the base


def test_shared_scale_is_least_squares_over_groups():
    rng = np.random.default_rng(4)
    kernel = rng.normal(size=(3, 3, 8, 3))
    fit = fit_assignment(kernel, 2, "d4", depth_groups=4, candidates=[0, 2])
    names, groups = fit.transforms, [slice(2 * k, 2 * k + 2) for k in range(4)]

    def moved(k, b, t):
        return reference.TRANSFORMS[names[t]](kernel[:, :, groups[k], fit.bases[b]]).ravel()

    target = [kernel[:, :, groups[k], 1].ravel() for k in range(4)]
    chosen = [moved(k, *fit.assignment[k, 1]) for k in range(4)]
    a = np.linalg.lstsq(np.concatenate(chosen)[:, None], np.concatenate(target), rcond=None)[0][0]
    np.testing.assert_allclose(fit.scale[1], a, rtol=1e-6)
    # Under that shared scale no group can do better with another (base, transform).
    for k in range(4):
        costs = [np.sum((target[k] - a * moved(k, b, t)) ** 2)
                 for b in range(2) for t in range(len(names))]
        b, t = fit.assignment[k, 1]
        assert costs[b * len(names) + t] <= min(costs) * (1 + 1e-6)


def test_depth_groups_agree_on_scaled_copies():
    # Bases 0 and 1 are copies of B (1 = 2 * B), each perturbed in a different
    # group, and output 2 is 3 * rot90(B): group 0 alone prefers base 1 (its
    # exact copy there), group 1 base 0, with scales 1.5 and 3. One shared
    # scale needs one base in both groups; the fit finds that.
    rng = np.random.default_rng(19)
    b = rng.normal(size=(3, 3, 8))
    first, second = b.copy(), 2.0 * b
    first[..., :4] += 0.01 * rng.normal(size=(3, 3, 4))
    second[..., 4:] += 0.02 * rng.normal(size=(3, 3, 4))
    kernel = np.stack([first, second, 3.0 * np.rot90(b, 1, axes=(0, 1))], axis=-1)
    fit = fit_assignment(kernel, 2, "rotations", depth_groups=2, candidates=[0, 1])
    assert fit.assignment[0, 2, 0] == fit.assignment[1, 2, 0]
    assert fit.relative_errors[2] < 0.02
    # Each group on its own (then one least-squares scale) does far worse.
    independent = []
    for k, base in ((0, 1), (1, 0)):
        channels = slice(4 * k, 4 * k + 4)
        independent.append((np.rot90(kernel[:, :, channels, base], 1, axes=(0, 1)).ravel(),
                            kernel[:, :, channels, 2].ravel()))
    x = np.concatenate([m for m, _ in independent])
    y = np.concatenate([w for _, w in independent])
    a = x @ y / (x @ x)
    assert np.sum((y - a * x) ** 2) > 100 * fit.errors[2]


def test_without_scale_every_scale_is_one():
    kernel = np.random.default_rng(5).normal(size=(3, 3, 4, 10))
    fit = fit_assignment(kernel, 3, "rotations", depth_groups=2, scale=False)
    np.testing.assert_array_equal(fit.scale, np.ones(10, np.float32))
    # With a fixed scale of 1 each output takes the least-cost pairing.
    for k in range(2):
        channels = slice(2 * k, 2 * k + 2)
        for o in range(10):
            costs = [
                np.sum((kernel[:, :, channels, o]
                        - reference.TRANSFORMS[name](kernel[:, :, channels, base])) ** 2)
                for base in fit.bases
                for name in fit.transforms
            ]
            b, t = fit.assignment[k, o]
            assert costs[b * len(fit.transforms) + t] <= min(costs) + 1e-5


@pytest.mark.parametrize("scale", [True, False], ids=["scale", "no_scale"])
@pytest.mark.parametrize("depth_groups", [1, 2])
@pytest.mark.parametrize(
    "shape, n, preset",
    [
        ((3, 3, 8, 16), 4, "d4"),
        ((3, 3, 16, 32), 8, "all"),
        ((5, 5, 4, 12), 3, "rotations"),
        ((3, 5, 6, 10), 5, "flips"),
        ((1, 3, 4, 9), 2, "shifts"),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_never_worse_than_l1(seed, shape, n, preset, depth_groups, scale):
    kernel = np.random.default_rng(seed).normal(size=shape) * np.linspace(0.2, 2.0, shape[-1])
    kwargs = dict(transforms=preset, depth_groups=depth_groups, scale=scale)
    greedy = fit_assignment(kernel, n, criterion="reconstruction", **kwargs)
    l1 = fit_assignment(kernel, n, criterion="l1", **kwargs)
    assert greedy.errors.sum() <= l1.errors.sum() * (1 + 1e-12)


def test_reconstruction_beats_l1_on_redundant_large_filters():
    # The largest filters are rotations of one another: l1 keeps them all and
    # wastes its bases; reconstruction keeps one of them and the others.
    rng = np.random.default_rng(6)
    big = rng.normal(size=(3, 3, 8, 1)) * 10
    copies = [np.rot90(big, r, axes=(0, 1)) * (1 + 0.1 * r) for r in range(4)]
    small = rng.normal(size=(3, 3, 8, 4))
    kernel = np.concatenate(copies + [small], axis=-1)
    greedy = fit_assignment(kernel, 4, "rotations")
    l1 = fit_assignment(kernel, 4, "rotations", criterion="l1")
    np.testing.assert_array_equal(l1.bases, [0, 1, 2, 3])
    assert len(set(greedy.bases.tolist()) & {0, 1, 2, 3}) == 1
    assert greedy.errors.sum() < 0.5 * l1.errors.sum()


def test_l1_keeps_largest_l1_filters():
    rng = np.random.default_rng(8)
    kernel = rng.normal(size=(3, 3, 5, 12))
    l1 = np.abs(kernel).sum(axis=(0, 1, 2))
    fit = fit_assignment(kernel, 4, "d4", criterion="l1")
    np.testing.assert_array_equal(fit.bases, np.sort(np.argsort(-l1)[:4]))
    np.testing.assert_array_equal(fit.base_kernel, kernel[..., fit.bases].astype(np.float32))


@pytest.mark.parametrize("criterion", ["reconstruction", "l1"])
def test_candidates_restrict_the_bases(criterion):
    rng = np.random.default_rng(9)
    kernel = rng.normal(size=(3, 3, 6, 16))
    candidates = [14, 3, 8, 1, 11, 6]
    fit = fit_assignment(kernel, 3, "flips", criterion=criterion, candidates=candidates)
    assert set(fit.bases.tolist()) <= set(candidates)
    assert fit.bases.tolist() == sorted(fit.bases.tolist())
    if criterion == "l1":
        l1 = np.abs(kernel[..., candidates]).sum(axis=(0, 1, 2))
        np.testing.assert_array_equal(fit.bases, np.sort(np.array(candidates)[np.argsort(-l1)[:3]]))
    exact = fit_assignment(kernel, 4, "flips", criterion=criterion, candidates=[9, 2, 5, 0])
    np.testing.assert_array_equal(exact.bases, [0, 2, 5, 9])


def test_greedy_picks_the_kept_filters_that_reconstruct_best():
    # One cluster per base: the fit keeps one member of each cluster.
    rng = np.random.default_rng(10)
    bases = rng.normal(size=(3, 3, 8, 3))
    members = [
        transforms_lib.apply_transform(bases[..., [b]], name) * s
        for b in range(3)
        for name, s in (("identity", 1.0), ("rot90", -0.7), ("flip_h", 1.3), ("transpose", 2.0))
    ]
    kernel = np.concatenate(members, axis=-1)
    kernel += 1e-3 * rng.normal(size=kernel.shape)
    fit = fit_assignment(kernel, 3, "d4")
    assert sorted(b // 4 for b in fit.bases.tolist()) == [0, 1, 2]
    assert fit.layer_error < 1e-2


@pytest.mark.parametrize("depth_groups", [1, 3])
def test_errors_consistent_with_reconstruct(depth_groups):
    rng = np.random.default_rng(11)
    kernel = rng.normal(size=(3, 3, 6, 10))
    kernel[..., 4] = 0.0  # a zero filter: relative error 0, not NaN
    fit = fit_assignment(kernel, 3, "d4", depth_groups=depth_groups)
    residual = kernel - fit.reconstruct().astype(np.float64)
    errors = np.sum(residual**2, axis=(0, 1, 2))
    norms = np.sqrt(np.sum(kernel**2, axis=(0, 1, 2)))
    np.testing.assert_allclose(fit.errors, errors, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fit.norms, norms)
    expected = np.where(norms > 0, np.sqrt(errors) / np.where(norms > 0, norms, 1), 0.0)
    np.testing.assert_allclose(fit.relative_errors, expected)
    assert fit.relative_errors[4] == 0.0 and np.isfinite(fit.relative_errors).all()
    layer_error = np.linalg.norm(residual) / np.linalg.norm(kernel)
    np.testing.assert_allclose(fit.layer_error, layer_error)
    np.testing.assert_allclose(reconstruction_error(kernel, fit), layer_error)
    assert squared_relative_errors(fit)[fit.bases].max() <= EXACT


def test_fit_fields():
    kernel = np.random.default_rng(12).normal(size=(3, 3, 4, 8)).astype(np.float32)
    fit = fit_assignment(kernel, 3, "rotations", depth_groups=2)
    assert isinstance(fit, AssignmentFit)
    assert fit.transforms == ("identity", "rot90", "rot180", "rot270")
    assert fit.bases.shape == (3,) and np.all(np.diff(fit.bases) > 0)
    assert fit.assignment.shape == (2, 8, 2) and fit.assignment.dtype == np.int32
    assert fit.scale.shape == (8,) and fit.scale.dtype == np.float32
    assert fit.base_kernel.shape == (3, 3, 4, 3) and fit.base_kernel.dtype == np.float32
    assert fit.errors.shape == fit.relative_errors.shape == (8,)
    assert fit.depth_groups == 2
    # Kept filters: their own base, identity, scale 1, in every group.
    for i, b in enumerate(fit.bases):
        np.testing.assert_array_equal(fit.assignment[:, b], [[i, 0]] * 2)
        assert fit.scale[b] == 1.0
    assert fit.assignment[..., 0].max() < 3 and fit.assignment[..., 1].max() < 4
    for array in (fit.bases, fit.assignment, fit.scale, fit.base_kernel, fit.errors):
        assert not array.flags.writeable
    with pytest.raises(AttributeError):
        fit.scale = None
    assert repr(fit) == (
        "AssignmentFit(filters=8, bases=3, depth_groups=2, transforms=('identity', "
        f"'rot90', 'rot180', 'rot270'), layer_error={fit.layer_error:.4g})"
    )


def test_every_filter_kept_is_exact():
    kernel = np.random.default_rng(13).normal(size=(3, 3, 4, 6)).astype(np.float32)
    fit = fit_assignment(kernel, 6, "d4")
    np.testing.assert_array_equal(fit.bases, np.arange(6))
    assert fit.layer_error == 0.0


def test_non_square_kernel_with_flips_and_shifts():
    rng = np.random.default_rng(14)
    base = rng.normal(size=(3, 5, 4, 2))
    kernel = np.concatenate(
        [base, np.flip(base, axis=1) * 3.0, np.rot90(base, 2, axes=(0, 1)) * -0.5], axis=-1
    )
    fit = fit_assignment(kernel, 2, ["identity", "flip_h", "rot180", "shift_up"])
    assert squared_relative_errors(fit).max() <= EXACT


@pytest.mark.parametrize("case", ["blocks", "ordered_blocks", "one_gemm_per_transform"])
@pytest.mark.parametrize("scale", [True, False], ids=["scale", "no_scale"])
def test_pair_costs_match_brute_force(case, scale, monkeypatch):
    rng = np.random.default_rng(15)
    g, filters, cg = 2, 9, 3
    kernel = rng.normal(size=(3, 3, g * cg, filters)).astype(np.float32)
    kernel[..., 5] = 0.0
    names = transforms_lib.PRESETS["all"]
    tables = transforms_lib.tap_tables(names, 3)
    cand = np.arange(filters) if case == "blocks" else np.array([1, 5, 7])
    if case == "one_gemm_per_transform":
        monkeypatch.setattr(assignment_lib, "_GRAM_BLOCK_BUDGET", 0)
    wg = np.ascontiguousarray(kernel.reshape(9, g, cg, filters).transpose(1, 0, 2, 3))
    cost, best, grams = assignment_lib._pair_costs(wg, tables, cand, scale, keep_grams=True)

    expected = np.empty((g, filters, len(cand), len(names)))
    for k in range(g):
        channels = slice(k * cg, (k + 1) * cg)
        for o in range(filters):
            target = kernel[:, :, channels, o].astype(np.float64)
            for j, c in enumerate(cand):
                for t, name in enumerate(names):
                    moved = reference.TRANSFORMS[name](kernel[:, :, channels, c]).astype(np.float64)
                    norm = np.sum(moved**2)
                    a = (np.sum(target * moved) / norm if norm > 0 else 0.0) if scale else 1.0
                    expected[k, o, j, t] = np.sum((target - a * moved) ** 2)
                if o == c:
                    expected[k, o, j, :] = 0.0
    tolerance = 1e-4 * np.abs(expected).max()
    np.testing.assert_allclose(cost, expected.min(axis=-1), rtol=0, atol=tolerance)
    if grams is not None:
        inner = np.einsum(
            "hwkco,thwkcj->tkoj",
            kernel.reshape(3, 3, g, cg, filters).astype(np.float64),
            np.stack([
                reference.TRANSFORMS[name](kernel[..., cand]).reshape(3, 3, g, cg, len(cand))
                for name in names
            ]).astype(np.float64),
        )
        np.testing.assert_allclose(grams, inner, rtol=0, atol=1e-4 * np.abs(inner).max())
    chosen = np.take_along_axis(expected, best[..., None].astype(np.int64), axis=-1)[..., 0]
    np.testing.assert_allclose(chosen, expected.min(axis=-1), rtol=0, atol=tolerance)


def plain_greedy(d, n):
    """Greedy facility location, every gain re-evaluated at every step."""
    current, picks = d.max(axis=1), []
    for _ in range(n):
        gains = np.maximum(current[:, None] - d, 0.0).sum(axis=0)
        gains[picks] = -np.inf
        picks.append(int(np.argmax(gains)))
        current = np.minimum(current, d[:, picks[-1]])
    return picks


def total_cost(d, picks):
    return float(d[:, list(picks)].min(axis=1).sum())


@pytest.mark.parametrize("seed", range(5))
def test_lazy_greedy_matches_plain_greedy(seed):
    rng = np.random.default_rng(seed)
    # Clustered costs, so that gains change a lot between steps.
    d = rng.random((3, 60, 1)) * rng.random((1, 60, 50)) + rng.random((3, 60, 50))
    d = d.astype(np.float32)
    picks = assignment_lib._greedy_bases(d, 12)
    assert picks.tolist() == plain_greedy(d.reshape(-1, 50), 12)


@pytest.mark.parametrize("seed", range(5))
def test_swap_pass_reaches_a_local_optimum(seed):
    rng = np.random.default_rng(seed)
    d = rng.random((1, 40, 15)).astype(np.float32)
    flat = d.reshape(40, 15)
    start = [0, 1, 2, 3]  # a poor starting set
    picks = assignment_lib._swap_bases(d, np.array(start)).tolist()
    assert len(set(picks)) == 4
    assert total_cost(flat, picks) <= total_cost(flat, start)
    for i in range(4):
        for c in set(range(15)) - set(picks):
            swapped = picks[:i] + [c] + picks[i + 1:]
            assert total_cost(flat, swapped) >= total_cost(flat, picks) - 1e-4


def test_gram_paths_give_the_same_fit(monkeypatch):
    kernel = np.random.default_rng(16).normal(size=(3, 3, 8, 20))
    kwargs = dict(base_filters=6, transforms="all", depth_groups=2)
    blocks = fit_assignment(kernel, **kwargs)
    monkeypatch.setattr(assignment_lib, "_GRAM_BLOCK_BUDGET", 0)
    direct = fit_assignment(kernel, **kwargs)
    np.testing.assert_array_equal(blocks.bases, direct.bases)
    np.testing.assert_array_equal(blocks.assignment, direct.assignment)
    np.testing.assert_allclose(blocks.scale, direct.scale, rtol=1e-6)


@pytest.mark.parametrize(
    "preset, kernel_size, depth_groups",
    [("d4", (3, 3), 1), ("all", (3, 3), 2), ("flips", (3, 5), 4), ("shifts", (2, 3), 1)],
)
def test_reconstruct_matches_layer_materialized_kernel(preset, kernel_size, depth_groups):
    from tf_transform_conv.layers import TransformConv2D  # the only test that needs Keras

    kh, kw = kernel_size
    kernel = np.random.default_rng(17).normal(size=(kh, kw, 8, 12)).astype(np.float32)
    fit = fit_assignment(kernel, 4, preset, depth_groups=depth_groups)
    layer = TransformConv2D(
        12, (kh, kw), base_filters=4, transforms=list(fit.transforms),
        assignment=fit.assignment, depth_groups=depth_groups, scale=True, use_bias=False,
    )
    layer.build((None, 9, 9, 8))
    layer.base_kernel.assign(fit.base_kernel)
    layer.scale_weight.assign(fit.scale)
    np.testing.assert_allclose(
        np.asarray(layer.materialized_kernel()), fit.reconstruct(), rtol=0, atol=1e-5
    )


KERNEL = np.random.default_rng(18).normal(size=(3, 3, 6, 8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kernel=KERNEL[..., 0]),
         "Expected `kernel` to be a 4-D array (kh, kw, c_in, filters). "
         "Received a kernel of shape (3, 3, 6)."),
        (dict(kernel=np.where(KERNEL > 2, np.nan, KERNEL)), "Expected a finite `kernel`"),
        (dict(base_filters=0), "Expected an int in [1, filters=8]. Received base_filters=0."),
        (dict(base_filters=9), "Expected an int in [1, filters=8]. Received base_filters=9."),
        (dict(base_filters=2.0), "Received base_filters=2.0."),
        (dict(criterion="saliency"),
         "Expected one of ['reconstruction', 'l1', 'magnitude', 'taylor']. "
         "Received criterion='saliency'."),
        (dict(criterion="taylor"), "criterion='taylor' ranks filters by their first-order"),
        (dict(scores=np.ones(8)), "Received scores with criterion='reconstruction'"),
        (dict(criterion="taylor", scores=np.ones(7)),
         "Expected `scores` to be 8 finite values, one per filter. Received an array of "
         "shape (7,)."),
        (dict(assign="random"),
         "Expected one of ['fit', 'modulo']. Received assign='random'."),
        (dict(depth_groups=4),
         "dividing the kernel's input channels c_in=6. Received depth_groups=4."),
        (dict(depth_groups=0), "Received depth_groups=0."),
        (dict(candidates=[0, 3, 8]), "Expected `candidates` in [0, filters=8). "
         "Received indices in [0, 8]."),
        (dict(candidates=[-1, 3, 4]), "Received indices in [-1, 4]."),
        (dict(candidates=[1, 3, 1, 5]), "Expected distinct `candidates`. Received repeated "
         "indices [1]."),
        (dict(candidates=[1, 3]), "Expected at least base_filters=3 `candidates`. Received 2."),
        (dict(candidates=[[1, 2, 3]]), "Expected `candidates` to be a sequence of filter indices"),
        (dict(transforms=["rot90", "rot180"]), "Expected `transforms` to include 'identity'"),
        (dict(transforms="spin"), "Unknown transform 'spin'"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    arguments = dict(kernel=KERNEL, base_filters=3)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        fit_assignment(**arguments)


def test_reconstruction_error_checks_the_shape():
    fit = fit_assignment(KERNEL, 3)
    with pytest.raises(ValueError, match=re.escape("Expected a kernel of the fit's shape")):
        reconstruction_error(KERNEL[..., :4], fit)


def test_module_imports_numpy_only():
    tree = ast.parse(inspect.getsource(assignment_lib))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"dataclasses", "math", "numpy", "tf_transform_conv"}, imported


# ----------------------------------------------------------------------------
# Learned families


@pytest.mark.parametrize("depth_groups", [1, 2])
@pytest.mark.parametrize("family", ["scalar", "rotation", "affine", "general"])
def test_learned_fit_reconstructs_its_parameters_and_beats_discrete(family, depth_groups):
    rng = np.random.default_rng(21)
    kernel = rng.normal(size=(3, 3, 8, 16))
    fit = fit_assignment(kernel, 6, "d4", depth_groups=depth_groups, transform_family=family)
    discrete = fit_assignment(kernel, 6, "d4", depth_groups=depth_groups)
    assert fit.transforms == discrete.transforms
    if family in ("scalar", "rotation"):  # d4 already holds every transform they absorb
        np.testing.assert_array_equal(fit.bases, discrete.bases)
        np.testing.assert_array_equal(fit.assignment, discrete.assignment)
    expected = reference.materialize_learned(
        fit.base_kernel.astype(np.float64), fit.assignment, fit.transforms, family,
        fit.transform_params.astype(np.float64), fit.scale.astype(np.float64),
    )
    np.testing.assert_allclose(fit.reconstruct(), expected, atol=1e-5)
    assert fit.layer_error < discrete.layer_error
    # Kept filters are templates with the identity operator.
    assert fit.templates[:, fit.bases].all() and fit.templates.sum() == depth_groups * 6
    identity = families.identity_params(family, 3)
    np.testing.assert_array_equal(fit.transform_params[fit.templates], np.tile(identity, (depth_groups * 6, 1)))
    assert fit.transform_weights.shape == (depth_groups * 10, identity.size)


def test_scalar_fit_rebuilds_per_tap_multiples_exactly():
    """Every filter a per-tap multiple of one base: the scalar family rebuilds it."""
    rng = np.random.default_rng(22)
    base = rng.normal(size=(3, 3, 6, 1))
    multipliers = rng.uniform(0.5, 2.0, size=(3, 3, 1, 8))
    kernel = base * multipliers
    fit = fit_assignment(kernel, 1, "identity", transform_family="scalar")
    assert fit.layer_error < 1e-6
    assert fit_assignment(kernel, 1, "identity").layer_error > 0.05


@pytest.mark.parametrize("family", ["rotation", "affine", "general"])
def test_learned_family_takes_over_the_transforms_it_reproduces(family):
    """Quarter turns of one base, fitted with `transforms="identity"` only: the
    pairings are chosen through the rotations anyway, and the operator takes
    them over (starting from their angle or matrix)."""
    rng = np.random.default_rng(23)
    base = rng.normal(size=(3, 3, 5, 1))
    kernel = np.concatenate([np.rot90(base, r, axes=(0, 1)) for r in range(4)], axis=-1)
    fit = fit_assignment(kernel, 1, "identity", transform_family=family)
    assert fit.transforms == ("identity",)
    assert (fit.assignment[..., 1] == 0).all()
    assert fit.layer_error < 1e-6
    assert fit_assignment(kernel, 1, "identity", transform_family="scalar").layer_error > 0.1
