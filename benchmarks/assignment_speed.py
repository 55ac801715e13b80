"""Speed of `fit_assignment` on one large dense kernel (numpy only, CPU).

Times `tf_transform_conv.ops.assignment.fit_assignment` on a random gaussian
kernel (default 3x3x512x512, the widest ResNet layer) at 75% sparsity
(128 bases) with the d4 transforms, for each criterion and number of depth
groups: one untimed warm-up, then the median (and min, max) of several runs.
Target: criterion="reconstruction", depth_groups=1 under 2 seconds on the
2-core development machine; it is printed as PASS/MISS.

Writes JSON (machine, versions, command, timestamp, config, rows) atomically.

Usage:
    python benchmarks/assignment_speed.py
    python benchmarks/assignment_speed.py --repeats 3 --groups 1
    python benchmarks/assignment_speed.py --profile     # also cProfile one fit
"""

import argparse
import cProfile
import datetime
import io
import os
import platform
import pstats
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py, beside this script)
import tf_transform_conv  # noqa: E402
from tf_transform_conv.ops.assignment import fit_assignment  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "assignment_speed.json"
TARGET_S = 2.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="3x3x512x512",
                        help="kernel shape kh x kw x c_in x filters (default 3x3x512x512)")
    parser.add_argument("--sparsity", type=float, default=0.75,
                        help="fraction of filters replaced (default 0.75: 128 of 512 kept)")
    parser.add_argument("--transforms", default="d4", help="preset or comma-separated names")
    parser.add_argument("--criteria", nargs="+", default=["reconstruction", "l1"],
                        choices=["reconstruction", "l1"])
    parser.add_argument("--groups", nargs="+", type=int, default=[1, 2],
                        help="depth_groups values (default 1 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="also print a cProfile of one reconstruction fit (g=1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    return parser.parse_args(argv)


def time_fit(kernel, base_filters, transforms, criterion, groups, repeats):
    kwargs = dict(transforms=transforms, depth_groups=groups, criterion=criterion)
    fit = fit_assignment(kernel, base_filters, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fit = fit_assignment(kernel, base_filters, **kwargs)
        times.append(time.perf_counter() - start)
    return times, fit


def profile_fit(kernel, base_filters, transforms):
    profiler = cProfile.Profile()
    profiler.enable()
    fit_assignment(kernel, base_filters, transforms=transforms)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(15)
    return out.getvalue()


def machine_info():
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return common.machine_info(load_average=load)


def versions():
    info = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tf_transform_conv": tf_transform_conv.__version__,
    }
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older numpy: no dict mode
        pass
    return info


def main(argv=None):
    args = parse_args(argv)
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    if len(shape) != 4:
        sys.exit(f"--shape needs kh x kw x c_in x filters; received {args.shape!r}")
    filters = shape[-1]
    base_filters = max(1, filters - round(args.sparsity * filters))
    transforms = args.transforms if "," not in args.transforms else args.transforms.split(",")
    kernel = np.random.default_rng(args.seed).normal(size=shape).astype(np.float32)

    print(f"fit_assignment on a {args.shape} kernel, {base_filters} of {filters} filters "
          f"kept, transforms={args.transforms}, median of {args.repeats} runs")
    header = f"{'criterion':<16}{'groups':>7}{'median s':>10}{'min s':>8}{'max s':>8}" \
             f"{'layer error':>13}"
    print(header)
    print("-" * len(header))
    rows = []
    for criterion in args.criteria:
        for groups in args.groups:
            times, fit = time_fit(kernel, base_filters, transforms, criterion, groups,
                                  args.repeats)
            row = {
                "criterion": criterion,
                "depth_groups": groups,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "times_s": times,
                "layer_error": fit.layer_error,
            }
            rows.append(row)
            print(f"{criterion:<16}{groups:>7}{row['median_s']:>10.3f}{row['min_s']:>8.3f}"
                  f"{row['max_s']:>8.3f}{row['layer_error']:>13.4f}")

    target_rows = [r for r in rows if r["criterion"] == "reconstruction" and r["depth_groups"] == 1]
    target = {"rule": f"criterion='reconstruction', depth_groups=1: median < {TARGET_S:g} s"}
    if target_rows:
        target["median_s"] = target_rows[0]["median_s"]
        target["status"] = "PASS" if target["median_s"] < TARGET_S else "MISS"
        print(f"target ({target['rule']}): {target['status']} ({target['median_s']:.3f} s)")
    else:
        target["status"] = None

    if args.profile:
        print(profile_fit(kernel, base_filters, transforms))

    payload = {
        "benchmark": "assignment_speed",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "machine": machine_info(),
        "versions": versions(),
        "config": {
            "shape": shape,
            "base_filters": base_filters,
            "sparsity": args.sparsity,
            "transforms": args.transforms,
            "repeats": args.repeats,
            "seed": args.seed,
            "dtype": "float32",
        },
        "rows": rows,
        "target": target,
    }
    common.write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
