"""How a `TransformConv2D`'s outputs are laid out: bases, assignment, templates, index tables.

Plain numpy, resolved once at construction and build:

- `resolve_base_filters`: the number of bases from `base_filters`,
  `base_ratio` or the default layout;
- `default_assignment` / `resolve_assignment`: each output's `(base,
  transform)` per depth group;
- `template_outputs` / `resolve_templates`: the outputs whose operator a
  learned family keeps fixed (each base's own output);
- `index_tables`: the static gather indices of both execution paths.

Every check raises a `ValueError` naming the argument, what is allowed and
what was received.
"""

import dataclasses

import numpy as np

from tf_transform_conv._checks import is_int
from tf_transform_conv._checks import is_number
from tf_transform_conv.ops import factored as factored_lib
from tf_transform_conv.ops import transforms as transforms_lib


def default_assignment(filters, base_filters, num_transforms, depth_groups=1):
    """The default assignment: output `o` is base `o % n` under transform `(o // n) % T`.

    With `filters == base_filters * num_transforms` (what the discrete
    family needs), block `j` of outputs holds every base under transform
    `j`. A learned family may repeat the blocks (`filters` any multiple of
    `base_filters`): each repeat learns its own transforms.

    Returns:
        An int32 array `(depth_groups, filters, 2)` of `(base, transform)`.
    """
    if filters % base_filters:
        raise ValueError(
            "The default assignment needs filters to be a multiple of "
            f"base_filters. Received filters={filters} and base_filters={base_filters}."
        )
    o = np.arange(filters)
    table = np.stack([o % base_filters, (o // base_filters) % num_transforms], axis=-1)
    return np.broadcast_to(table, (depth_groups, filters, 2)).astype(np.int32)


def template_outputs(assignment, identity):
    """`(depth_groups, filters)` bool: which outputs are their base's template.

    In each depth group, the first output that takes base `b` under the
    `identity` transform (its index in the layer's transforms, or None) is
    `b`'s *template*: it is the base itself and learns no transform. Every
    other output is a transformed filter.
    """
    assignment = np.asarray(assignment)
    groups, filters, _ = assignment.shape
    mask = np.zeros((groups, filters), bool)
    if identity is None:
        return mask
    for k in range(groups):
        seen = set()
        for o in range(filters):
            b, t = (int(v) for v in assignment[k, o])
            if t == identity and b not in seen:
                seen.add(b)
                mask[k, o] = True
    return mask


def resolve_base_filters(filters, transforms, base_filters, base_ratio, assignment):
    """The number of bases: `base_filters`, or `base_ratio * filters`, or `filters / len(transforms)`."""
    if base_filters is not None and base_ratio is not None:
        raise ValueError(
            "Pass either `base_filters` or `base_ratio`, not both. Received "
            f"base_filters={base_filters} and base_ratio={base_ratio}."
        )
    if base_ratio is not None:
        if not is_number(base_ratio) or not 0 < base_ratio <= 1:
            raise ValueError(
                "Invalid value for argument `base_ratio`. Expected a number "
                f"in (0, 1]. Received base_ratio={base_ratio!r}."
            )
        exact = filters * float(base_ratio)
        base_filters = int(round(exact))
        if base_filters < 1 or abs(exact - base_filters) > 1e-6:
            raise ValueError(
                f"`base_ratio` * `filters` must be a whole number of base "
                f"filters. Received base_ratio={base_ratio} with "
                f"filters={filters} (= {exact:g} bases); pass "
                f"base_filters= instead."
            )
    elif base_filters is None:
        if assignment is not None:
            raise ValueError(
                "An explicit `assignment` needs the number of base filters: "
                "pass `base_filters` or `base_ratio`."
            )
        num = len(transforms)
        if filters % num:
            raise ValueError(
                f"The default assignment needs `filters` divisible by "
                f"len(transforms). Received filters={filters} and "
                f"{num} transforms {list(transforms)}; pass "
                f"base_filters and an explicit assignment, or other "
                f"transforms."
            )
        return filters // num
    if not is_int(base_filters) or not 1 <= base_filters <= filters:
        raise ValueError(
            "Invalid value for argument `base_filters`. Expected an int in "
            f"[1, filters={filters}]. Received "
            f"base_filters={base_filters!r}."
        )
    return int(base_filters)


def resolve_assignment(assignment, filters, base_filters, transforms, depth_groups, family):
    """The `(depth_groups, filters, 2)` int32 table, checked, or the default one."""
    g, f, n, t = depth_groups, filters, base_filters, len(transforms)
    if assignment is None:
        if family == "discrete" and f != n * t:
            raise ValueError(
                "The default assignment needs filters == base_filters * "
                f"len(transforms). Received filters={f}, base_filters={n} "
                f"and {t} transforms {list(transforms)} (= {n * t}). "
                "Choose base_filters=filters/len(transforms), other "
                "transforms, or pass an explicit assignment."
            )
        if f % n:
            raise ValueError(
                "The default assignment needs filters to be a multiple of "
                f"base_filters. Received filters={f} and base_filters={n}; "
                "pass an explicit assignment."
            )
        return default_assignment(f, n, t, g)
    table = np.asarray(assignment)
    if table.dtype.kind not in "iu" and table.size:
        raise ValueError(
            "Expected `assignment` to hold integers (base, transform) per "
            f"output. Received an array of dtype {table.dtype}."
        )
    if table.shape == (f, 2):
        table = np.broadcast_to(table, (g, f, 2))
    if table.shape != (g, f, 2):
        raise ValueError(
            f"Expected `assignment` of shape (filters, 2) = ({f}, 2) or "
            f"(depth_groups, filters, 2) = ({g}, {f}, 2). Received shape "
            f"{table.shape}."
        )
    bases, trans = table[..., 0], table[..., 1]
    if bases.min() < 0 or bases.max() >= n:
        raise ValueError(
            f"`assignment` base indices must lie in [0, base_filters={n}). "
            f"Received indices in [{bases.min()}, {bases.max()}]."
        )
    if trans.min() < 0 or trans.max() >= t:
        raise ValueError(
            f"`assignment` transform indices must lie in [0, {t}) for "
            f"transforms {list(transforms)}. Received indices in "
            f"[{trans.min()}, {trans.max()}]."
        )
    return table.astype(np.int32)


def resolve_templates(templates, assignment, transforms, family):
    """The `(depth_groups, filters)` template mask: given, or `template_outputs`.

    For the discrete family every output is a template (nothing is learned)
    and `templates` must be None.
    """
    g, f, _ = assignment.shape
    if family == "discrete":
        if templates is not None:
            raise ValueError(
                "`templates` applies to the learned transform families; the "
                "discrete family learns no transform. Received "
                f"transform_family='discrete' with templates={templates!r}."
            )
        return np.ones((g, f), bool)
    if templates is None:
        identity = transforms.index("identity") if "identity" in transforms else None
        return template_outputs(assignment, identity)
    mask = np.asarray(templates)
    if mask.dtype != bool:
        raise ValueError(
            "Expected `templates` to be booleans, one per output (or per "
            f"depth group and output). Received an array of dtype {mask.dtype}."
        )
    if mask.shape == (f,):
        mask = np.broadcast_to(mask, (g, f))
    if mask.shape != (g, f):
        raise ValueError(
            f"Expected `templates` of shape (filters,) = ({f},) or "
            f"(depth_groups, filters) = ({g}, {f}). Received shape {mask.shape}."
        )
    return mask.copy()


@dataclasses.dataclass(frozen=True)
class IndexTables:
    """The static gather indices of both execution paths.

    Attributes:
        tap_sources: `(g, f, taps)`: the base tap each output's discrete
            transform moves to tap `w` (-1 for zero).
        materialize: `(taps, g, f)`: rows of the `(taps * g * n + 1, c_in/g)`
            table of base taps (the last row zero) that build the kernel.
        factored: `(taps, g, f)`: the product channel each output reads
            through tap `w` (-1 for zero), channels laid out (group, tap, base).
        plan: the `factored.SegmentPlan` of the factored sums.
        param_rows: `(g * f,)`: each (group, output)'s column in
            `[identity, transform]` (0 for templates).
        param_runs: the (group, output) pairs in order as runs
            `(start, stop, column)`: templates (`column` None) or the
            transformed filters of `transform[:, column:column + stop - start]`;
            None when there are more than `MAX_PARAM_RUNS` runs.
    """

    tap_sources: np.ndarray
    materialize: np.ndarray
    factored: np.ndarray
    plan: factored_lib.SegmentPlan
    param_rows: np.ndarray
    param_runs: tuple


# Above this many runs of templates and transformed filters, a learned
# layer's parameters are gathered instead of concatenated from runs.
MAX_PARAM_RUNS = 32


def index_tables(assignment, transforms, kernel_size, base_filters, templates, merge_identical):
    """The `IndexTables` of a layer's layout."""
    kh, kw = kernel_size
    taps, n = kh * kw, base_filters
    g = assignment.shape[0]
    src = transforms_lib.tap_tables(transforms, kernel_size)  # (T, taps)
    bases, trans = assignment[..., 0], assignment[..., 1]  # (g, f)
    tap_sources = src[trans]  # (g, f, taps)
    src_of = np.transpose(tap_sources, (2, 0, 1))  # (taps, g, f)
    group = np.arange(g).reshape(1, g, 1)
    rows = (src_of * g + group) * n + bases[None]
    materialize = np.where(src_of >= 0, rows, taps * g * n).astype(np.int32)
    chans = (group * taps + src_of) * n + bases[None]
    factored = np.where(src_of >= 0, chans, -1).astype(np.int32)
    learned = (~templates).reshape(-1)
    runs, start = [], 0
    for stop in range(1, len(learned) + 1):
        if stop == len(learned) or learned[stop] != learned[start]:
            column = int(learned[:start].sum()) if learned[start] else None
            runs.append((start, stop, column))
            start = stop
    return IndexTables(
        tap_sources=tap_sources,
        materialize=materialize,
        factored=factored,
        plan=factored_lib.plan_segments(factored, merge_identical=merge_identical),
        param_rows=np.where(learned, np.cumsum(learned), 0).astype(np.int32),
        param_runs=tuple(runs) if len(runs) <= MAX_PARAM_RUNS else None,
    )
