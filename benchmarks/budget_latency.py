"""Latency budgets: does `plan_budget` deliver the LiteRT latency it was asked for?

For a model (default: CIFAR ResNet-56, 32x32x3, random weights after
`keras.utils.set_random_seed(0)`), in one run:

1. the dense model is exported (`export_tflite`, float32, batch 1) and its
   LiteRT latency measured (`knapsack.tflite_latency`, 1 thread);
2. every convertible `Conv2D` is measured alone, dense and as the
   `TransformConv2D` that `transform_model` fits with each base ratio of
   --ratios-options, in each lowering of --lowerings
   (`knapsack.LatencyTable`, cached in --cache);
3. for each latency budget of --budgets (fractions of the dense latency),
   alone and with each parameter budget of --params as a second part,
   `plan_budget` chooses each layer's option (multiple-choice knapsack,
   exact DP), `transform_model(budget=plan)` converts, and the model is
   exported with `lowering=plan.lowerings`;
4. the uniform twins `transform_model(base_ratio=r)` for r in --uniform
   (lowering "auto") are exported too;
5. every file is then timed again, interleaved (one loop of calls per file
   per round, the order rotating), and the table reports each file's
   latency and size relative to the dense file's from the same rounds, and
   for the budgeted models the measured latency against the budget
   (target: within 10%) and against the plan's prediction.

Value of an option (see `tf_transform_conv.budget`): the layer weight
(1 per layer here: random weights, no data) times `1 - e^2`, `e` the relative
reconstruction error of the fit.

Usage:
    python benchmarks/budget_latency.py                        # ResNet-56, budgets 0.8 0.9
    python benchmarks/budget_latency.py --model resnet18 --input-size 224 --budgets 0.5 0.87
"""

import argparse
import datetime
import fractions
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py, beside this script)
import tf_transform_conv as tc  # noqa: E402
from tf_transform_conv.budget import Budget  # noqa: E402
from tf_transform_conv.budget import plan_budget  # noqa: E402
from tf_transform_conv.export import LatencyTable  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet56", help="build_model name (resnet56)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="square input size (the model's default)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.9],
                        help="latency budgets, fractions of the dense latency (0.8 0.9)")
    parser.add_argument("--params", nargs="*", type=float, default=[0.45],
                        help="also plan each latency budget with this parameter budget as a "
                        "second part (0.45); none: latency alone only")
    parser.add_argument("--ratios-options", nargs="+", default=["1/16", "1/8", "1/4", "1/2"],
                        help="base ratios each layer may take (1/16 1/8 1/4 1/2)")
    parser.add_argument("--lowerings", nargs="+", default=["grouped", "slices"],
                        help="lowerings each layer may take (grouped slices)")
    parser.add_argument("--uniform", nargs="*", default=["1/4", "1/8"],
                        help="uniform base ratios to compare (1/4 1/8)")
    parser.add_argument("--threads", type=int, default=1, help="LiteRT threads (1)")
    parser.add_argument("--plan-dense", choices=["table", "model"], default="table",
                        help="the dense latency the plans take their budget from: the sum "
                        "of the table's dense layers ('table', default: measured in the same "
                        "conditions as the options, non-convolution operators counted as "
                        "free) or the whole dense model measured now ('model')")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (9)")
    parser.add_argument("--loop-seconds", type=float, default=0.2,
                        help="least duration of one timed loop (0.2)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="latency table cache (results/latency_table_MODEL.json)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (results/budget_latency_MODEL.json)")
    args = parser.parse_args(argv)
    args.cache = args.cache or RESULTS / f"latency_table_{args.model}.json"
    args.out = args.out or RESULTS / f"budget_latency_{args.model}.json"
    return args


def build(args):
    kwargs = {}
    if args.input_size:
        kwargs["input_shape"] = (args.input_size, args.input_size, 3)
    keras.utils.set_random_seed(0)
    return tc.build_model(args.model, **kwargs)


def export(model, folder, name, lowering="auto"):
    path = os.path.join(folder, f"{name}.tflite")
    result = tc.export_tflite(model, path, lowering=lowering)
    return path, result


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    dense = build(args)
    folder = tempfile.mkdtemp(prefix="budget-latency-")
    rows = []
    path, result = export(dense, folder, "dense")
    rows.append(dict(variant="dense", path=path, bytes=result.bytes,
                     params=int(tc.model_cost(dense).params)))
    dense_ms = tc.export.tflite_latency(path, args.threads, repeats=args.repeats,
                                          min_seconds=args.loop_seconds)
    print(f"dense: {dense_ms:.3f} ms, {result.bytes:,} bytes", flush=True)

    table = LatencyTable(args.cache, threads=args.threads)
    plan_dense = dense_ms
    if args.plan_dense == "table":
        shapes = tc.budget._input_shapes(dense)
        plan_dense = sum(
            table.layer_latency(layer, shapes[layer.name]) for layer in dense.layers
            if isinstance(layer, keras.layers.Conv2D)
            and not tc.reconstruction.skip_reason(layer, "d4"))
        print(f"dense convolutions in the table: {plan_dense:.3f} ms", flush=True)
    ratios = tuple(float(fractions.Fraction(r)) for r in args.ratios_options)
    infeasible = []
    budgets = [(fraction, None) for fraction in args.budgets] + [
        (fraction, params) for fraction in args.budgets for params in args.params]
    for fraction, params in budgets:
        budget = Budget(latency=fraction, params=params, base_ratios=ratios,
                        lowerings=tuple(args.lowerings), threads=args.threads)
        name = f"latency {fraction:g}" + (f" + params {params:g}" if params else "")
        t = time.perf_counter()
        try:
            plan = plan_budget(dense, budget, latency_table=table, dense_latency=plan_dense)
        except ValueError as error:  # below the cheapest choice: recorded, not exported
            print(f"{name}: {error}", flush=True)
            infeasible.append(dict(variant=name, budget=fraction, params_budget=params,
                                   error=str(error)))
            continue
        print(plan.summary(), flush=True)
        print(f"planned in {time.perf_counter() - t:.0f} s ({table.measured} layers measured "
              "so far)", flush=True)
        model, _ = tc.transform_model(dense, budget=plan)
        path, result = export(model, folder, name.replace(" ", "_"), plan.lowerings)
        rows.append(dict(variant=name, budget=fraction, params_budget=params, path=path,
                         bytes=result.bytes, params=int(tc.model_cost(model).params),
                         predicted_ms=plan.predicted_cost, target_ms=plan.target,
                         fixed_ms=plan.fixed_cost,
                         converted=len(plan.bases), layers=len(plan.choices),
                         plan=plan.to_dict(), op_counts=result.op_counts,
                         lowerings=sorted(set(plan.lowerings.values()))))
    for ratio in args.uniform:
        model, _ = tc.transform_model(dense, base_ratio=float(fractions.Fraction(ratio)))
        path, result = export(model, folder, f"uniform_{ratio.replace('/', '_')}")
        rows.append(dict(variant=f"uniform {ratio}", path=path, bytes=result.bytes,
                         params=int(tc.model_cost(model).params),
                         lowerings=sorted(set(result.lowerings.values())),
                         op_counts=result.op_counts))

    # Interleaved timing of every file, in this process only.
    timers = []
    for row in rows:
        runner = common.litert_runner(row["path"], args.threads, 0)
        timers.append(common.Timer(runner, args.loop_seconds, 3))
    common.run_rounds(timers, args.repeats)
    for row, timer in zip(rows, timers):
        row["ms"] = timer.median_ms
    reference = rows[0]
    for row in rows:
        row["latency_ratio"] = row["ms"] / reference["ms"]
        row["file_ratio"] = row["bytes"] / reference["bytes"]
        if "budget" in row:
            # The budget is a fraction of the dense latency measured in these rounds.
            row["latency_vs_budget"] = row["latency_ratio"] / row["budget"]
            row["latency_vs_prediction"] = row["ms"] / row["predicted_ms"]

    print()
    print(common.table(rows, [
        ("variant", 28, lambda r: r["variant"]),
        ("ms", 9, lambda r: f"{r['ms']:.3f}"),
        ("x dense", 8, lambda r: f"{r['latency_ratio']:.3f}"),
        ("vs budget", 10, lambda r: f"{r['latency_vs_budget']:.3f}" if "budget" in r else ""),
        ("vs plan", 8, lambda r: f"{r['latency_vs_prediction']:.3f}" if "budget" in r else ""),
        ("file x", 7, lambda r: f"{r['file_ratio']:.3f}"),
        ("params", 10, lambda r: f"{r['params']:,}"),
    ]))
    targets = {}
    for row in rows:
        if "budget" in row:
            targets[f"{row['variant']}: |latency / budget - 1| <= 0.10"] = abs(
                row["latency_vs_budget"] - 1)
            targets[f"{row['variant']}: latency <= 0.9x dense and file <= 0.45x"] = (
                row["latency_ratio"] <= 0.9 and row["file_ratio"] <= 0.45)
    print("\ntargets:")
    for name, value in targets.items():
        print(f"  {name}: {value}")
    for row in rows:
        row.pop("path")
    payload = {
        "benchmark": "budget_latency",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/budget_latency.py " + shlex.join(argv or sys.argv[1:]),
        "machine": common.tf_machine_info(),
        "versions": common.litert_versions(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dense_ms_before_planning": dense_ms,
        "plan_dense_ms": plan_dense,
        "minutes": (time.perf_counter() - started) / 60,
        "rows": rows,
        "infeasible": infeasible,
        "targets": targets,
    }
    common.write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
