"""Fitting bases and `(base, transform, scale)` assignments to a dense kernel.

Given a trained `Conv2D` kernel `W` of shape `(kh, kw, c_in, F)`, choose `n`
of its filters to keep (the *bases*) and give every output `o` (and, with
`depth_groups=g`, every contiguous group `k` of its input channels) the kept
filter `b` and transform `t` that best reconstruct it, plus one scale per
output:

    cost(o, b, t) = min_a || W_o - a * T_t(W_b) ||^2
    a* = <W_o, T_t(W_b)> / ||T_t(W_b)||^2        (0 when T_t(W_b) = 0)

This module is the math only: plain numpy in, plain numpy out, no
TensorFlow or Keras. Pruning (`tf_transform_conv.pruning`) and conversion
(`tf_transform_conv.convert`) call it; the result plugs into `TransformConv2D(assignment=...)`.

How it stays fast. Every inner product `<W_o, T_t(W_b)>` is a sum over taps
`u` of `<W_o[u], W_b[src_t(u)]>` (the channels of one tap), so all of them,
for every transform, are sums of a few `F x F` *tap Gram blocks*
`X_u^T X_v` (`X_u` = the `(c_in/g, F)` slice of tap `u`). A block serves
`(u, v)` and, transposed, `(v, u)`: the eight d4 symmetries of a 3x3 kernel
need 21 distinct blocks, against 72 tap products for eight separate GEMMs
(when only a few candidates may stay bases, ordered blocks restricted to
their columns are cheaper, and are used instead).
The norms `||T_t(W_b)||^2` are sums of per-tap norms (shifts zero some taps,
so they differ per transform).
"""

import dataclasses
import math

import numpy as np

from tf_transform_conv._checks import is_int
from tf_transform_conv.ops import families as families_lib
from tf_transform_conv.ops import transforms as transforms_lib

#: The criteria that choose which filters stay bases.
CRITERIA = ("reconstruction", "l1", "magnitude", "taylor")
#: How each reconstructed filter gets its base: the best one, or the paper's `o mod n`.
ASSIGNMENTS = ("fit", "modulo")

# The tap Gram blocks are kept in memory only when they fit this budget
# (bytes); beyond it (large kernels with many filters) the inner products are
# computed with one GEMM per transform instead. Same result, more flops.
_GRAM_BLOCK_BUDGET = 256 << 20
# The lazy greedy refreshes this many candidates' gains per step at first.
_LAZY_WIDTH = 16
# The swap pass stops after this many swaps (it usually stops much earlier,
# when no swap lowers the cost), or when the best swap gains less than this
# fraction of the starting cost (about the kernel's squared norm): smaller
# gains are float32 rounding of the costs.
_MAX_SWAP_ROUNDS = 100
_SWAP_TOLERANCE = 1e-6
# With depth_groups > 1 the per-group choices and the shared scale are
# refined alternately at most this many rounds.
_MAX_SCALE_ROUNDS = 10


@dataclasses.dataclass(frozen=True, eq=False)
class AssignmentFit:
    """The result of `fit_assignment`: what a `TransformConv2D` needs, and how well it fits.

    The arrays are read-only. Base index `i` in `assignment` is the original
    filter `bases[i]`; `bases` is sorted ascending.

    Attributes:
        bases: int array `(n,)`, the original indices of the kept filters.
        assignment: int32 array `(depth_groups, F, 2)`: per group and output,
            `(base index into bases, transform index into transforms)`. Pass
            it as `TransformConv2D(assignment=...)`.
        scale: float32 array `(F,)`, one scale per output (1 for the bases,
            all ones when fitted with `scale=False`).
        transforms: tuple of transform names the transform indices refer to.
        base_kernel: float32 array `(kh, kw, c_in, n)`, `kernel[..., bases]`:
            the layer's `base_kernel`.
        errors: float64 array `(F,)`, the squared error
            `||W_o - reconstruct()[..., o]||^2` of each output filter.
        relative_errors: float64 array `(F,)`, `||W_o - rec_o|| / ||W_o||`
            (0 where `W_o` is zero).
        norms: float64 array `(F,)`, `||W_o||`, the fitted kernel's filter norms.
        transform_family: the family of the transforms (`"discrete"`, or a
            learned family of `tf_transform_conv.ops.families`).
        transform_params: float32 array `(depth_groups, F, p)`, each
            output's family parameters (`p = 0` for the discrete family);
            the kept filters hold the identity parameters.
        templates: bool array `(depth_groups, F)`: the kept filters, whose
            operator is the identity (`TransformConv2D(templates=...)`).
    """

    bases: np.ndarray
    assignment: np.ndarray
    scale: np.ndarray
    transforms: tuple
    base_kernel: np.ndarray
    errors: np.ndarray
    relative_errors: np.ndarray
    norms: np.ndarray
    transform_family: str = "discrete"
    transform_params: np.ndarray = None
    templates: np.ndarray = None

    def __repr__(self):
        return (
            f"AssignmentFit(filters={self.assignment.shape[1]}, bases={len(self.bases)}, "
            f"depth_groups={self.depth_groups}, transforms={self.transforms}, "
            + ("" if self.transform_family == "discrete"
               else f"transform_family={self.transform_family!r}, ")
            + f"layer_error={self.layer_error:.4g})"
        )

    @property
    def transform_weights(self):
        """The rows of `transform_params` a `TransformConv2D` learns: `(transformed, p)`.

        The non-template (group, filter) pairs in (group, filter) order: the
        layer's `transform` weight when built with `templates=self.templates`.
        """
        return self.transform_params[~self.templates]

    @property
    def depth_groups(self):
        """The number of input channel groups with their own assignment."""
        return self.assignment.shape[0]

    @property
    def layer_error(self):
        """`||W - W_rec||_F / ||W||_F` over the whole kernel (0 for a zero kernel)."""
        total = float(np.sqrt(np.sum(self.norms**2)))
        return float(np.sqrt(np.sum(self.errors)) / total) if total > 0 else 0.0

    def reconstruct(self):
        """The reconstructed dense kernel `(kh, kw, c_in, F)`, float32.

        `W[..., group k, o] = scale[o] * S_{k,o}(base_kernel[..., group k, b_k(o)])`
        with `S = L(transform_params) @ T_t` (`tf_transform_conv.ops.families`),
        built with numpy: the same kernel as
        `TransformConv2D.materialized_kernel()` for this base kernel,
        assignment, scale and transform parameters.
        """
        kernel = _transformed_bases(
            self.base_kernel.astype(np.float64), self.assignment, self.transforms
        )  # (g, F, taps, c_in / g)
        if self.transform_family != "discrete":
            kh, kw = self.base_kernel.shape[:2]
            operators = families_lib.operator(
                self.transform_family, self.transform_params, (kh, kw)
            )
            kernel = operators @ kernel
        return (_to_kernel(kernel, self.base_kernel.shape[:2]) * self.scale).astype(np.float32)


def fit_assignment(
    kernel,
    base_filters,
    transforms="d4",
    depth_groups=1,
    scale=True,
    criterion="reconstruction",
    candidates=None,
    transform_family="discrete",
    scores=None,
    assign="fit",
):
    """Chooses base filters and a `(base, transform, scale)` for every output of a kernel.

    Keeps `base_filters` of the kernel's filters as they are (each is its own
    base under `identity`, scale 1, in every depth group) and reconstructs
    every other output filter `o`, in every input channel group `k`, as
    `scale[o] * T_t(W_b)` with the kept `b` and transform `t` of least cost
    `min_a ||W_o,k - a * T_t(W_b,k)||^2`. With `depth_groups > 1` the layer
    has one scale per output, so after the per-group choices the scale is
    refitted jointly by least squares over all groups,
    `a = sum_k <W_o,k, T W_b,k> / sum_k ||T W_b,k||^2`, alternating with
    re-choosing each group's `(base, transform)` for that scale until no
    choice changes (each step lowers the error or leaves it; this makes the
    groups agree when two kept filters are scaled copies of each other).

    Which filters stay bases is the `criterion`:

    - `"l1"`: the `base_filters` filters of largest L1 norm (Li et al.,
      "Pruning Filters for Efficient ConvNets", ICLR 2017).
    - `"magnitude"`: the filters of largest L2 norm (the paper's saliency).
    - `"taylor"`: the filters of largest `scores` (the first-order
      saliency `|sum(w * dL/dw)|` per filter, accumulated by the caller over
      batches: `pruning.taylor_scores`).
    - `"reconstruction"`: greedy facility location on the per-group costs:
      start with every filter reconstructed as zero (with `scale=False`,
      where zero is not available, from its worst pairing), repeatedly keep
      the candidate that lowers the total cost most (a kept filter costs 0),
      then swap kept and unkept filters while a swap lowers the cost. The
      resulting fit is compared with the `"l1"` set's fit and the one of
      lower total squared error is returned, so `"reconstruction"` is never
      worse than `"l1"`. Greedy facility location is a heuristic, with no
      guarantee of finding an exact set: on kernels built exactly from `n`
      random bases the tests recover one when each output draws all its
      depth groups from one base, but it often fails when outputs mix bases
      across groups (a mixed filter then covers as much as a true base).

    Cost: `kh*kw*(kh*kw+1)/2` or fewer `F x F x c_in/g` GEMMs (21 for d4 on
    3x3), then at most `O(g * F * F)` per greedy step or swap: about 0.3 s
    for a 3x3x512x512 kernel with 128 bases on two CPU cores
    (`benchmarks/assignment_speed.py`).

    Args:
        kernel: array `(kh, kw, c_in, F)`, a dense `Conv2D` kernel (Keras
            layout).
        base_filters: int in `[1, F]`, the number of filters to keep.
        transforms: a preset (`"d4"` (default), `"rotations"`, `"flips"`,
            `"shifts"`, `"all"`) or a list of transform names; must include
            `"identity"` (the kept filters use it).
        depth_groups: int dividing `c_in`, the number of contiguous input
            channel groups with their own `(base, transform)`. Defaults to 1.
        scale: bool. When True (default) each output gets its
            least-squares scale; when False every scale is 1.
        criterion: `"reconstruction"` (default), `"l1"`, `"magnitude"` or
            `"taylor"` (see above).
        candidates: optional sequence of distinct filter indices allowed to
            stay bases (at least `base_filters` of them); by default every
            filter. Pruning passes the current bases, since a filter once
            replaced stays replaced.
        scores: float array `(F,)`, the saliency `criterion="taylor"` ranks
            by (required there, refused elsewhere).
        assign: `"fit"` (default): every reconstructed output takes its
            best kept filter; `"modulo"`: output `o` takes the kept filter
            `bases[o % base_filters]` (the paper's fixed mapping), with its
            best transform and scale for that base.
        transform_family: `"discrete"` (default) or a learned family
            (`"scalar"`, `"rotation"`, `"affine"`, `"general"`). The bases
            and each output's `(base, transform)` are chosen as above; then
            every reconstructed (group, output) gets the family parameters
            of its least-squares fit (`families.fit`) on top of its discrete
            transform. The scalar, rotation and general families carry their
            own amplitude, so their reconstructed outputs get scale 1; the
            affine family keeps a scale, refitted after the matrices.

    Returns:
        An `AssignmentFit` with `bases`, `assignment`, `scale`,
        `transforms`, `base_kernel`, per-filter `errors` and
        `relative_errors`, `layer_error` and `reconstruct()`.

    Raises:
        ValueError: if `kernel` is not 4-D or not finite, `base_filters` is
            not in `[1, F]`, `criterion` is unknown, `depth_groups` does not
            divide `c_in`, `candidates` holds indices out of range, repeats or
            fewer than `base_filters` indices, or `transforms` is invalid or
            lacks `"identity"`.

    Example:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> base = rng.normal(size=(3, 3, 4, 1))
    >>> kernel = np.concatenate(
    ...     [base, np.rot90(base, 1, axes=(0, 1)), -2.0 * base[::-1]], axis=-1)
    >>> fit = fit_assignment(kernel, base_filters=1, transforms="d4")
    >>> fit.bases.shape, fit.assignment.shape, fit.base_kernel.shape
    ((1,), (1, 3, 2), (3, 3, 4, 1))
    >>> fit.layer_error < 1e-6
    True
    """
    kernel64, n, names, g, cand = _validate(
        kernel, base_filters, transforms, depth_groups, criterion, candidates
    )
    families_lib.check_family(transform_family)
    scores = check_scores(scores, criterion, kernel64.shape[-1])
    if assign not in ASSIGNMENTS:
        raise ValueError(
            "Invalid value for argument `assign`. Expected one of "
            f"{list(ASSIGNMENTS)}. Received assign={assign!r}."
        )
    if transform_family != "discrete":
        # Choose the bases and pairings with every discrete transform the
        # family reproduces too (a learned rotation finds quarter turns of a
        # base even when `transforms` has none); those are then taken over
        # by the operator, starting from it.
        absorbed = families_lib.absorbed_transforms(transform_family, kernel64.shape[:2])
        extended = names + tuple(t for t in absorbed if t not in names)
        fit = fit_assignment(kernel64, n, extended, g, scale, criterion, candidates,
                             scores=scores, assign=assign)
        return _fit_learned(fit, kernel64, transform_family, bool(scale), names)
    kh, kw, c_in, filters = kernel64.shape
    identity = names.index("identity")
    tables = transforms_lib.tap_tables(names, (kh, kw))
    scale = bool(scale)

    # (g, taps, c_in / g, F): the layout of the tap Gram blocks.
    wg = kernel64.reshape(kh * kw, g, c_in // g, filters).transpose(1, 0, 2, 3)
    wg32 = np.ascontiguousarray(wg, dtype=np.float32)
    l1 = np.abs(kernel64).sum(axis=(0, 1, 2))

    # The shared-scale refinement (depth_groups > 1) reuses the inner products.
    keep_grams = scale and g > 1 and assign == "fit"
    l1_bases = np.sort(cand[np.argsort(-l1[cand], kind="stable")[:n]])
    ranked = {"l1": l1, "magnitude": np.sqrt(np.sum(kernel64**2, axis=(0, 1, 2))),
              "taylor": scores}
    if criterion in ("magnitude", "taylor"):
        top = np.sort(cand[np.argsort(-ranked[criterion][cand], kind="stable")[:n]])
        pairs = _pair_costs(wg32, tables, top, scale, keep_grams)
        return _finish(kernel64, wg, wg32, names, tables, identity, scale, top, *pairs,
                       assign=assign)
    if criterion == "l1" or n == len(cand):
        pairs = _pair_costs(wg32, tables, l1_bases, scale, keep_grams)
        return _finish(kernel64, wg, wg32, names, tables, identity, scale, l1_bases, *pairs,
                       assign=assign)

    cost, best, grams = _pair_costs(wg32, tables, cand, scale, keep_grams)
    picks = _swap_bases(cost, _greedy_bases(cost, n))
    fits = []
    for bases in (np.sort(cand[picks]), l1_bases):
        columns = np.searchsorted(cand, bases)
        fits.append(
            _finish(
                kernel64, wg, wg32, names, tables, identity, scale, bases,
                cost[..., columns], best[..., columns],
                None if grams is None else grams[..., columns], assign=assign,
            )
        )
    greedy, largest = fits
    return largest if largest.errors.sum() < greedy.errors.sum() else greedy


def kept_filters(filters, sparsity):
    """The number of bases kept at `sparsity`: `filters - floor(s * filters + 1/2)`, at least 1."""
    return max(1, filters - int(math.floor(sparsity * filters + 0.5)))


def allocate_globally(saliencies, target, minimum=1):
    """How many filters each layer keeps under one global ranking.

    The paper's allocation: every currently kept filter of every layer is
    ranked by its saliency, one threshold for all, so that `target` filters
    stay in all; each layer keeps at least `minimum` (or all it has, if
    fewer) and never more than it keeps now.

    Args:
        saliencies: list of float arrays, one per layer, a saliency per
            filter the layer keeps now (higher is more important).
        target: int, the filters to keep over all layers.
        minimum: int >= 1, the fewest a layer keeps, or one such int per
            layer.

    Returns:
        A list of ints, one per layer: `min(minimum, len(s)) <= n <= len(s)`,
        summing to `target` when the bounds allow it (else to the nearest
        bound).

    Example:

    >>> allocate_globally([np.array([5.0, 1.0, 0.5]), np.array([4.0, 3.0])], 3)
    [1, 2]
    >>> allocate_globally([np.array([5.0, 1.0, 0.5]), np.array([4.0, 3.0])], 3, minimum=2)
    [2, 2]
    """
    arrays = [np.asarray(v, np.float64).reshape(-1) for v in saliencies]
    minima = list(minimum) if isinstance(minimum, (list, tuple)) else [minimum] * len(arrays)
    if len(minima) != len(arrays) or any(
        not is_int(m) or m < 1 for m in minima
    ):
        raise ValueError(
            "Invalid value for argument `minimum`. Expected an int >= 1 or one per "
            f"layer ({len(arrays)}). Received minimum={minimum!r}."
        )
    floors = [min(int(m), len(a)) for m, a in zip(minima, arrays)]
    counts = list(floors)
    spare = int(target) - sum(floors)
    if spare <= 0:
        return counts
    # Beyond each layer's forced top `floor`, the rest compete globally.
    rest = []
    for layer, (values, floor) in enumerate(zip(arrays, floors)):
        order = np.argsort(-values, kind="stable")
        rest += [(-float(values[i]), layer, rank) for rank, i in enumerate(order[floor:])]
    rest.sort()
    for _, layer, _ in rest[:spare]:
        counts[layer] += 1
    return counts


def reconstruction_error(kernel, fit):
    """`||kernel - fit.reconstruct()||_F / ||kernel||_F` (0 for a zero kernel).

    Measures how well an `AssignmentFit` explains a kernel, for example the
    kernel it was fitted to after more training.

    Args:
        kernel: array of the fitted kernel's shape `(kh, kw, c_in, F)`.
        fit: an `AssignmentFit`.

    Returns:
        A float.

    Raises:
        ValueError: if the shapes differ.
    """
    kernel = np.asarray(kernel, np.float64)
    rec = fit.reconstruct()
    if kernel.shape != rec.shape:
        raise ValueError(
            f"Expected a kernel of the fit's shape {rec.shape}. Received a kernel "
            f"of shape {kernel.shape}."
        )
    total = np.linalg.norm(kernel)
    return float(np.linalg.norm(kernel - rec) / total) if total > 0 else 0.0


# ----------------------------------------------------------------------
# Validation


def _validate(kernel, base_filters, transforms, depth_groups, criterion, candidates):
    kernel = np.asarray(kernel)
    if kernel.ndim != 4:
        raise ValueError(
            "Expected `kernel` to be a 4-D array (kh, kw, c_in, filters). "
            f"Received a kernel of shape {kernel.shape}."
        )
    if kernel.dtype.kind not in "fiu":
        raise ValueError(f"Expected a real-valued `kernel`. Received dtype {kernel.dtype}.")
    kernel = kernel.astype(np.float64)
    if not np.isfinite(kernel).all():
        raise ValueError("Expected a finite `kernel`. Received a kernel with NaN or inf.")
    kh, kw, c_in, filters = kernel.shape
    if min(kernel.shape) < 1:
        raise ValueError(f"Expected a non-empty `kernel`. Received shape {kernel.shape}.")
    if not is_int(base_filters) or not 1 <= base_filters <= filters:
        raise ValueError(
            "Invalid value for argument `base_filters`. Expected an int in "
            f"[1, filters={filters}]. Received base_filters={base_filters!r}."
        )
    if criterion not in CRITERIA:
        raise ValueError(
            "Invalid value for argument `criterion`. Expected one of "
            f"{list(CRITERIA)}. Received criterion={criterion!r}."
        )
    if not is_int(depth_groups) or depth_groups < 1 or c_in % depth_groups:
        raise ValueError(
            "Invalid value for argument `depth_groups`. Expected a positive "
            f"int dividing the kernel's input channels c_in={c_in}. Received "
            f"depth_groups={depth_groups!r}."
        )
    names = transforms_lib.resolve_transforms(transforms, (kh, kw))
    if "identity" not in names:
        raise ValueError(
            "Expected `transforms` to include 'identity': kept filters are their "
            f"own base under identity. Received transforms={list(names)}."
        )
    if candidates is None:
        cand = np.arange(filters)
    else:
        cand = np.asarray(candidates)
        if cand.ndim != 1 or (cand.size and cand.dtype.kind not in "iu"):
            raise ValueError(
                "Expected `candidates` to be a sequence of filter indices. "
                f"Received candidates={candidates!r}."
            )
        cand = cand.astype(np.int64)
        if cand.size and (cand.min() < 0 or cand.max() >= filters):
            raise ValueError(
                f"Expected `candidates` in [0, filters={filters}). Received "
                f"indices in [{cand.min()}, {cand.max()}]."
            )
        if len(np.unique(cand)) != len(cand):
            raise ValueError(
                f"Expected distinct `candidates`. Received repeated indices "
                f"{sorted({int(c) for c in cand if (cand == c).sum() > 1})}."
            )
        if len(cand) < base_filters:
            raise ValueError(
                f"Expected at least base_filters={base_filters} `candidates`. "
                f"Received {len(cand)}."
            )
        cand = np.sort(cand)
    return kernel, int(base_filters), names, int(depth_groups), cand


def check_scores(scores, criterion, filters):
    if criterion != "taylor":
        if scores is not None:
            raise ValueError(
                "`scores` are the saliency criterion='taylor' ranks by. Received "
                f"scores with criterion={criterion!r}."
            )
        return None
    if scores is None:
        raise ValueError(
            "criterion='taylor' ranks filters by their first-order saliency: pass "
            "scores=, one per filter (pruning.taylor_scores accumulates them)."
        )
    scores = np.asarray(scores, np.float64)
    if scores.shape != (filters,) or not np.isfinite(scores).all():
        raise ValueError(
            f"Expected `scores` to be {filters} finite values, one per filter. "
            f"Received an array of shape {scores.shape}."
        )
    return scores


# ----------------------------------------------------------------------
# The math


def _transform_grams(wg, tables, cand):
    """Yields, per transform, the inner products `G[k, o, c] = <W_o,k, T_t(W_cand[c],k)>`.

    `G_t = sum_u X_u^T X_{src_t(u)}` over the taps `u` that `t` keeps, with
    `X_u` the `(c_in / g, F)` slice of tap `u`. The tap blocks are computed
    once and shared by every transform: either unordered full blocks
    `X_u^T X_v` (`u <= v`; `(v, u)` is the transpose), or, when the
    candidates are few, ordered blocks `X_u^T X_v[:, cand]`, whichever needs
    fewer multiply-adds. Beyond `_GRAM_BLOCK_BUDGET` bytes of blocks, one GEMM
    per transform.

    Args:
        wg: float32 `(g, taps, c_in / g, F)`.
        tables: int `(T, taps)` tap tables.
        cand: int `(m,)` candidate filters (the columns).

    Yields:
        float32 arrays `(g, F, m)`, one per table, in order.
    """
    g, _, cg, filters = wg.shape
    m = len(cand)
    everything = m == filters
    ordered = {(u, int(s)) for src in tables for u, s in enumerate(src) if s >= 0}
    unordered = {(min(u, v), max(u, v)) for u, v in ordered}
    full = len(unordered) * filters <= len(ordered) * m
    block_bytes = (len(unordered) * filters if full else len(ordered) * m) * g * filters * 4
    if block_bytes > _GRAM_BLOCK_BUDGET:
        for src in tables:
            valid = np.flatnonzero(src >= 0)
            left = wg[:, valid].reshape(g, len(valid) * cg, filters)
            right = wg[:, src[valid]]
            if not everything:
                right = right[..., cand]
            right = right.reshape(g, len(valid) * cg, m)
            yield np.matmul(left.transpose(0, 2, 1), right)
        return
    left = wg.transpose(0, 1, 3, 2)  # (g, taps, F, cg): X_u^T
    if full:
        blocks = {(u, v): np.matmul(left[:, u], wg[:, v]) for u, v in sorted(unordered)}
    else:
        right = wg if everything else np.ascontiguousarray(wg[..., cand])
        blocks = {(u, v): np.matmul(left[:, u], right[:, v]) for u, v in sorted(ordered)}
    for src in tables:
        total = np.zeros((g, filters, m), np.float32)
        for u, v in enumerate(src):
            v = int(v)
            if v < 0:
                continue
            if not full:
                total += blocks[(u, v)]
            elif u <= v:  # X_u^T X_v
                block = blocks[(u, v)]
                total += block if everything else block[..., cand]
            else:  # X_u^T X_v = (X_v^T X_u)^T
                block = blocks[(v, u)]
                total += (block if everything else block[:, cand]).transpose(0, 2, 1)
        yield total


def _pair_costs(wg, tables, cand, scale, keep_grams=False):
    """The cost of reconstructing each output, in each group, from each candidate.

    Args:
        wg: float32 `(g, taps, c_in / g, F)`.
        tables: int `(T, taps)` tap tables.
        cand: int `(m,)` candidate filter indices.
        scale: whether the scale is fitted (else fixed to 1).
        keep_grams: whether to also return the inner products (when they fit
            in `_GRAM_BLOCK_BUDGET` bytes).

    Returns:
        `(cost, best, grams)`: float32 `(g, F, m)`, the least cost over
        transforms of `min_a ||W_o,k - a T_t(W_c,k)||^2` (with `a = 1` when
        not `scale`; 0 where `o` is the candidate itself); int `(g, F, m)`,
        the transform reaching it (the first one on ties); and float32
        `(T, g, F, m)`, `<W_o,k, T_t(W_c,k)>`, or None.
    """
    g, filters = wg.shape[0], wg.shape[-1]
    tap_norms = np.einsum("gucf,gucf->guf", wg, wg, dtype=np.float64)  # (g, taps, F)
    own = tap_norms.sum(axis=1).astype(np.float32)[:, :, None]  # (g, F, 1): ||W_o,k||^2
    cand_norms = tap_norms[..., cand]
    cost = best = None
    keep_grams = keep_grams and len(tables) * g * filters * len(cand) * 4 <= _GRAM_BLOCK_BUDGET
    grams = np.empty((len(tables), g, filters, len(cand)), np.float32) if keep_grams else None
    for t, gram in enumerate(_transform_grams(wg, tables, cand)):
        if keep_grams:
            grams[t] = gram
        src = tables[t]
        norms = cand_norms[:, src[src >= 0]].sum(axis=1).astype(np.float32)[:, None, :]
        if scale:
            # ||W_o||^2 - <W_o, T W_b>^2 / ||T W_b||^2; a zero T W_b gives ||W_o||^2.
            safe = np.where(norms > 0, norms, np.inf).astype(np.float32)
            np.square(gram, out=gram)
            gram /= safe
            c = np.subtract(own, gram, out=gram)
        else:
            gram *= -2.0
            gram += own
            c = np.add(gram, norms, out=gram)
        if cost is None:
            cost, best = c, np.zeros(c.shape, np.int16)
        else:
            better = c < cost
            np.copyto(cost, c, where=better)
            best[better] = t
    np.maximum(cost, 0.0, out=cost)
    cost[:, cand, np.arange(len(cand))] = 0.0  # a kept filter is itself
    return cost, best, grams


def _greedy_bases(cost, n):
    """Greedy facility location: the positions (in the candidates) of `n` bases.

    Clients are the (group, output) pairs, facilities the candidates. Every
    client starts unserved (`_start_costs`); each step keeps the candidate
    whose addition lowers the total cost most.

    Lazy evaluation (Minoux's accelerated greedy): a candidate's gain can
    only shrink as bases are added, so stale gains are upper bounds. Each
    step refreshes the gains of the few candidates with the highest bounds
    (more if needed) and takes the best once it beats every other bound: the
    same picks as re-evaluating every candidate, at a fraction of the cost.
    """
    d = cost.reshape(-1, cost.shape[-1])  # (clients, m)
    m = d.shape[1]
    current = _start_costs(d)

    def gains(columns):
        diff = current[:, None] - d[:, columns]
        np.maximum(diff, 0.0, out=diff)
        return diff.sum(axis=0, dtype=np.float64)

    bound = gains(np.arange(m))
    picks = []
    for _ in range(n):
        width = _LAZY_WIDTH
        while True:
            width = min(width, m)
            top = np.argpartition(-bound, width - 1)[:width] if width < m else np.arange(m)
            top = top[np.isfinite(bound[top])]
            fresh = gains(top)
            bound[top] = fresh
            best = int(np.argmax(fresh))
            rest = np.delete(bound, top)
            if width == m or not len(rest) or fresh[best] >= rest.max():
                break
            width *= 4
        c = int(top[best])
        picks.append(c)
        bound[c] = -np.inf
        np.minimum(current, d[:, c], out=current)
    return np.array(picks, np.int64)


def _start_costs(d):
    """Each client's cost before any base is kept: its worst pairing.

    With scale every pairing costs at most `||W_o,k||^2` (the zero
    reconstruction), so the greedy picks are exactly those of starting from
    zero reconstructions; without scale zero is not available, and the worst
    pairing is the right start.
    """
    return d.max(axis=1)


def _swap_bases(cost, picks):
    """Swap-improvement pass: swaps a kept and an unkept candidate while that lowers the cost.

    Each round evaluates every (kept, unkept) swap at once from the clients'
    nearest and second-nearest kept filters (the FastPAM1 decomposition of
    Schubert & Rousseeuw, 2019) in `O(clients * candidates)`, and makes the
    best swap if it gains more than `_SWAP_TOLERANCE` of the starting cost;
    at most `_MAX_SWAP_ROUNDS` rounds.
    """
    d = cost.reshape(-1, cost.shape[-1])  # (clients, m)
    clients, m = d.shape
    n = len(picks)
    picks = picks.copy()
    if n == m:
        return picks
    start = _start_costs(d)
    # Gains below this are float32 rounding of the costs, not improvements.
    tolerance = _SWAP_TOLERANCE * float(start.sum(dtype=np.float64))
    rows = np.arange(clients)
    for _ in range(_MAX_SWAP_ROUNDS):
        kept = d[:, picks]  # (clients, n)
        nearest = np.argmin(kept, axis=1)
        d1 = kept[rows, nearest]
        if n > 1:
            d2 = np.minimum(np.partition(kept, 1, axis=1)[:, 1], start)
        else:
            d2 = start
        # Removing kept filter i sends its clients to their second nearest.
        removal = np.bincount(nearest, weights=d2 - d1, minlength=n)
        # Adding candidate c lowers every client to min(d_c, d1) ...
        shared = np.minimum(d - d1[:, None], 0.0).sum(axis=0, dtype=np.float64)
        # ... except that the clients of the removed i go to min(d_c, d2):
        # the correction, summed over each kept filter's clients.
        fix = np.minimum(d, d2[:, None]) - np.minimum(d, d1[:, None])
        fix -= (d2 - d1)[:, None]
        order = np.argsort(nearest, kind="stable")
        counts = np.bincount(nearest, minlength=n)
        owned = counts > 0
        correction = np.zeros((n, m))
        correction[owned] = np.add.reduceat(
            fix[order], (np.cumsum(counts) - counts)[owned], axis=0, dtype=np.float64
        )
        delta = removal[:, None] + shared[None, :] + correction  # (n, m)
        delta[:, picks] = np.inf
        i, c = np.unravel_index(np.argmin(delta), delta.shape)
        if not delta[i, c] < -tolerance:
            break
        picks[i] = c
    return picks


def _refine_shared_scale(wg32, tables, bases, base_of, trans_of, grams=None):
    """Per-group choices under one shared scale per output, by alternation.

    The per-group choices were made each with its own best scale, but the
    layer has one scale per output. Alternately refit the shared scale `a`
    by least squares over the groups and re-choose each group's
    `(base, transform)` for that `a` (cost `a^2 ||T W_b||^2 - 2 a <W_o, T W_b>`),
    keeping a choice unless another is strictly better. Neither step raises
    the total squared error, and it stops when no choice changes (or after
    `_MAX_SCALE_ROUNDS`). This matters when two kept filters are scaled
    copies: each group alone is indifferent between them, the shared scale
    is not. The kept filters keep their own choice.

    Args:
        wg32: float32 `(g, taps, c_in / g, F)`.
        tables: int `(T, taps)` tap tables.
        bases: sorted kept filter indices `(n,)`.
        base_of, trans_of: int `(g, F)`, the per-group choices.
        grams: optional float32 `(T, g, F, n)`, `<W_o,k, T_t(W_bases[i],k)>`;
            computed when not given.

    Returns:
        The refined `(base_of, trans_of)`, int arrays `(g, F)`.
    """
    g, filters = wg32.shape[0], wg32.shape[-1]
    n, count = len(bases), len(tables)
    # Inner products and norms for every (transform, kept base): choice t * n + b.
    if grams is None:
        grams = np.stack(list(_transform_grams(wg32, tables, bases)))  # (T, g, F, n)
    grams = grams.astype(np.float64).transpose(1, 2, 0, 3).reshape(g, filters, count * n)
    kept = wg32[..., bases]
    tap_norms = np.einsum("gucf,gucf->guf", kept, kept, dtype=np.float64)  # (g, taps, n)
    norms = np.stack([tap_norms[:, src[src >= 0]].sum(axis=1) for src in tables], axis=1)
    norms = norms.reshape(g, 1, count * n)
    group = np.arange(g)[:, None]
    choice = trans_of.astype(np.int64) * n + base_of
    for _ in range(_MAX_SCALE_ROUNDS):
        num = np.take_along_axis(grams, choice[..., None], axis=-1)[..., 0].sum(axis=0)
        den = norms[group, 0, choice].sum(axis=0)
        a = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)[None, :, None]
        cost = a * a * norms - 2.0 * a * grams  # (g, F, T * n)
        new = np.argmin(cost, axis=-1)
        better = np.take_along_axis(cost, new[..., None], axis=-1)[..., 0] < np.take_along_axis(
            cost, choice[..., None], axis=-1
        )[..., 0]
        better[:, bases] = False
        if not better.any():
            break
        choice = np.where(better, new, choice)
    return choice % n, choice // n


def _finish(kernel, wg, wg32, names, tables, identity, scale, bases, cost, best, grams,
            assign="fit"):
    """The `AssignmentFit` for kept filters `bases` (sorted original indices).

    Each (group, output) takes its least-cost (kept base, transform) from
    `cost` and `best` (`_pair_costs` restricted to the columns `bases`); the
    kept filters are their own base under identity with scale 1; the scale of
    the others is refitted over all groups at once (with `depth_groups > 1`
    alternating with the per-group choices, `_refine_shared_scale`), the
    final scale in float64.
    """
    filters, g, n = kernel.shape[-1], wg.shape[0], len(bases)
    group = np.arange(g)[:, None]
    if assign == "modulo":  # the paper's fixed mapping: output o -> kept filter o mod n
        base_of = np.broadcast_to(np.arange(filters) % n, (g, filters)).copy()
    else:
        base_of = np.argmin(cost, axis=-1)  # (g, F) index into bases
    trans_of = np.take_along_axis(best, base_of[..., None], axis=-1)[..., 0]
    base_of[:, bases] = np.arange(n)
    trans_of[:, bases] = identity
    if scale and g > 1 and assign == "fit":
        base_of, trans_of = _refine_shared_scale(wg32, tables, bases, base_of, trans_of, grams)
    assignment = np.stack([base_of, trans_of], axis=-1).astype(np.int32)

    outputs = np.ones(filters, np.float64)
    if scale:
        # Unscaled reconstruction T_t(W_b) per (group, output), float64.
        src = tables[trans_of]  # (g, F, taps)
        moved = wg[group[..., None], np.maximum(src, 0), :, bases[base_of][..., None]]
        moved = np.where((src >= 0)[..., None], moved, 0.0)  # (g, F, taps, cg)
        target = wg.transpose(0, 3, 1, 2)  # (g, F, taps, cg)
        num = np.einsum("gftc,gftc->f", target, moved)
        den = np.einsum("gftc,gftc->f", moved, moved)
        outputs = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
        outputs[bases] = 1.0
    base_kernel = kernel[..., bases].astype(np.float32)
    fit_scale = outputs.astype(np.float32)

    norms = np.sqrt(np.einsum("hwcf,hwcf->f", kernel, kernel))
    templates = np.zeros((g, filters), bool)
    templates[:, bases] = True
    partial = AssignmentFit(
        bases=bases,
        assignment=assignment,
        scale=fit_scale,
        transforms=tuple(names),
        base_kernel=base_kernel,
        errors=np.zeros(filters),
        relative_errors=np.zeros(filters),
        norms=norms,
        transform_params=np.zeros((g, filters, 0), np.float32),
        templates=templates,
    )
    residual = kernel - partial.reconstruct()
    errors = np.einsum("hwcf,hwcf->f", residual, residual)
    relative = np.where(norms > 0, np.sqrt(errors) / np.where(norms > 0, norms, 1.0), 0.0)
    arrays = dict(
        bases=bases.astype(np.int64),
        assignment=assignment,
        scale=fit_scale,
        base_kernel=base_kernel,
        errors=errors,
        relative_errors=relative,
        norms=norms,
        transform_params=partial.transform_params,
        templates=templates,
    )
    for value in arrays.values():
        value.flags.writeable = False
    return AssignmentFit(transforms=tuple(names), **arrays)


# ----------------------------------------------------------------------
# Learned families


def _transformed_bases(base_kernel, assignment, transforms):
    """`T_{t_k(o)}(B[..., group k, b_k(o)])` on flattened taps: `(g, F, taps, c_in / g)`."""
    kh, kw, c_in, n = base_kernel.shape
    g, filters, _ = assignment.shape
    tables = transforms_lib.tap_tables(transforms, (kh, kw))
    moved = np.stack([transforms_lib.apply_table(base_kernel, src) for src in tables])
    moved = moved.reshape(len(tables), kh * kw, g, c_in // g, n)
    b, t = assignment[..., 0], assignment[..., 1]
    group = np.arange(g)[:, None]
    return moved[t, :, group, :, b]  # (g, F, taps, c_in / g)


def _to_kernel(per_output, kernel_size):
    """`(g, F, taps, c_in / g)` -> the Keras kernel `(kh, kw, c_in, F)`."""
    g, filters, taps, cg = per_output.shape
    kh, kw = kernel_size
    return per_output.transpose(2, 0, 3, 1).reshape(kh, kw, g * cg, filters)


def _fit_learned(fit, kernel, family, scale, names):
    """The discrete `fit` with each reconstructed output's learned operator fitted.

    `fit` chose among `names` and the transforms the family absorbs (listed
    after `names`); a pairing through an absorbed transform becomes
    `identity` plus an operator fitted from that transform's parameters.
    Targets are the kernel's filters (per depth group), sources their
    discretely transformed bases. Families with an amplitude (scalar,
    rotation, general) fit the target itself and take scale 1; the affine
    family fits `target / scale` and then refits the shared scale.
    """
    kh, kw, c_in, filters = kernel.shape
    g = fit.depth_groups
    templates = np.zeros((g, filters), bool)
    templates[:, fit.bases] = True
    table = np.asarray(fit.assignment).copy()
    absorbed = table[..., 1] >= len(names)
    starts = np.tile(families_lib.identity_params(family, (kh, kw)).astype(np.float64),
                     (g, filters, 1))
    for k, o in zip(*np.nonzero(absorbed)):
        starts[k, o] = families_lib.absorbed_params(family, fit.transforms[table[k, o, 1]],
                                                    (kh, kw))
    table[..., 1] = np.where(absorbed, names.index("identity"), table[..., 1])
    fit = dataclasses.replace(fit, assignment=table.astype(np.int32), transforms=tuple(names))
    targets = kernel.reshape(kh * kw, g, c_in // g, filters).transpose(1, 3, 0, 2)
    sources = _transformed_bases(kernel[..., fit.bases], table, fit.transforms)
    amplitude = family != "affine"
    scale_of = np.asarray(fit.scale, np.float64).copy()
    if amplitude or not scale:
        divisor = np.ones(filters)
    else:
        divisor = np.where(scale_of != 0, scale_of, 1.0)
    learned = ~templates
    params = np.tile(
        families_lib.identity_params(family, (kh, kw)).astype(np.float64), (g, filters, 1)
    )
    if learned.any():
        fitted, _ = families_lib.fit(
            family,
            (targets / divisor[None, :, None, None])[learned],
            sources[learned],
            (kh, kw),
            starts=starts[learned],
        )
        params[learned] = fitted
    if scale and amplitude:
        scale_of[~templates.all(axis=0)] = 1.0
    elif scale:
        # One scale per output over its groups: a = sum <W, L S> / sum ||L S||^2.
        rebuilt = families_lib.operator(family, params, (kh, kw)) @ sources
        num = np.einsum("gftc,gftc->f", targets, rebuilt)
        den = np.einsum("gftc,gftc->f", rebuilt, rebuilt)
        refit = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
        scale_of = np.where(templates.all(axis=0), scale_of, refit)
    partial = dataclasses.replace(
        fit,
        scale=scale_of.astype(np.float32),
        transform_family=family,
        transform_params=params.astype(np.float32),
        templates=templates,
    )
    residual = kernel - partial.reconstruct().astype(np.float64)
    errors = np.einsum("hwcf,hwcf->f", residual, residual)
    norms = np.asarray(fit.norms)
    relative = np.where(norms > 0, np.sqrt(errors) / np.where(norms > 0, norms, 1.0), 0.0)
    arrays = dict(
        assignment=fit.assignment,
        scale=partial.scale,
        transform_params=partial.transform_params,
        templates=templates,
        errors=errors,
        relative_errors=relative,
    )
    for value in arrays.values():
        value.flags.writeable = False
    return dataclasses.replace(partial, **arrays)
