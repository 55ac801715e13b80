"""The accuracy frontier, offline on CPU: test accuracy against convolution parameters and latency.

On the ablation's task and network (`benchmarks/ablation.py`: cluttered
digits, four 3x3 convolutions 32-32-64-64 with batch norm), every method is
taken to the same shares of the dense network's convolution parameters
(1/2, 1/4, 1/8 and 1/16 by default) and scored on the test images; each
final model is exported to a float32 `.tflite` file (`export_tflite`,
default lowering) and, once every run has finished, timed in LiteRT at
batch 1 on one thread, one file after another. Methods:

    thin        the dense network with every width scaled by one factor so
                that its convolution parameters match the share (within 3%),
                trained from scratch: the network a user would otherwise
                train; the full-width network is the `dense` point
    thin-long   the same, trained twice the epochs: as long as `knapsack`
                trains in all
    ours        the package's recommended route (`tc.Reconstruction.
                recommended()`: the affine family with our selection),
                pruned while it trains from scratch, at the pruning rate
                whose stripped model has the share's parameters
    ours-scalar the same with the scalar family
    ours+kd     `ours` distilled from the seed's dense model
                (temperature 4, weight 0.9)
    thin+kd     the thin network distilled from the same teacher
    knapsack    structured removal: the seed's trained dense model, its
                channels removed by a 0/1 knapsack on Taylor importance
                (`knapsack_removal`) down to the share, then trained with
                inner distillation from the dense model; it trains twice
                the epochs in all (the dense model's, then its own)
    sp          unstructured magnitude pruning (`prune_low_magnitude`) to
                the share of nonzero weights
    ip          interspace pruning (`prune_interspace`, DCT basis) to the
                share of nonzero coefficients

Every other method trains from random initialisation for the same epochs
(Adam, cosine, batch 64, XLA), pruning over the first 40% of the steps.
Runs go to worker processes (`--workers`, one thread each). Writes JSON
(machine, versions, command, every run) and a PNG of both frontiers.

Usage:
    python benchmarks/frontier.py             # 2 seeds, every method, 3 epochs
    python benchmarks/frontier.py --quick     # 1 seed, thin and ours at 1/4, short
"""

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import numpy as np

import ablation  # noqa: E402  (benchmarks/ablation.py: the task, network and runs)
import common  # noqa: E402

METHODS = ("thin", "thin-long", "ours", "ours-scalar", "ours+kd", "thin+kd", "knapsack", "sp",
           "ip")
SHARES = (1 / 2, 1 / 4, 1 / 8, 1 / 16)
# Method -> the ablation row that runs it.
ROW = {"thin": "thin", "thin-long": "thin", "thin+kd": "thin+kd", "ours": "affine",
       "ours-scalar": "scalar", "ours+kd": "affine+kd", "knapsack": "knapsack+ikd", "sp": "sp",
       "ip": "ip-dct"}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "frontier.json"
QUICK_OUT = DEFAULT_OUT.with_name("frontier_quick.json")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to run (default: all; dense always runs)")
    parser.add_argument("--shares", nargs="+", type=float, default=list(SHARES),
                        help="shares of the dense convolution parameters (0.5 0.25 0.125 "
                        "0.0625)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per point (2)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per run (3)")
    parser.add_argument("--train-size", type=int, default=12800,
                        help="training images (12800)")
    parser.add_argument("--test-size", type=int, default=2000, help="test images (2000)")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes, one thread each (2)")
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 1 epoch of 3,200 images, thin and ours at 1/4; "
                        "writes frontier_quick.json")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (results/frontier.json, or frontier_quick.json)")
    parser.add_argument("--replot", action="store_true",
                        help="only report again (table, JSON summary, PNG) from the runs "
                        "saved in the JSON of --out")
    parser.add_argument("--retime", action="store_true",
                        help="only time the saved runs' .tflite files again (on a quiet "
                        "machine), then report as --replot")
    parser.add_argument("--add-to", action="store_true",
                        help="add this run's points (not its dense model) to the runs "
                        "already in the JSON of --out")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.train_size = 1, 1, 3200
        args.methods, args.shares = ["thin", "ours"], [0.25]
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    problems = []
    if args.seeds < 1 or args.epochs < 1 or args.workers < 1:
        problems.append("--seeds, --epochs and --workers must be >= 1")
    if args.train_size < ablation.BATCH or args.train_size % ablation.BATCH:
        problems.append(f"--train-size must be a positive multiple of {ablation.BATCH}")
    if any(not 0.01 <= s < 1 for s in args.shares):
        problems.append(f"--shares must be in [0.01, 1), got {args.shares}")
    if problems:
        parser.error("; ".join(problems))
    return args


def ours_rate(share, row=None):
    """The pruning rate at which a route's stripped network has `share` of the dense parameters.

    `row` names the route's `ablation.PRUNED` settings (default: `ours`');
    found by bisection on an untrained network (`ablation.rate_for_params`).
    """
    target = share * ablation.conv_params(ablation.cnn(ablation.WIDTHS, 0))
    return ablation.rate_for_params(ablation.WIDTHS, target, row or ROW["ours"])


def tasks(args, config, teacher, workdir):
    """The runs: per share, each method's ablation row at its rate or matched widths."""
    out = [dict(row="dense", rate=None, seed=s, config=config, teacher=teacher[s],
                export=str(workdir / f"dense-{s}.tflite")) for s in range(args.seeds)]
    dense_params = ablation.widths_cost(ablation.WIDTHS)[0]
    rates = {}
    for share in args.shares:
        for method in args.methods:
            row = ROW[method]
            extra = {}
            if method in ("thin", "thin-long", "thin+kd"):
                widths, miss = ablation.thin_widths(share * dense_params, "params")
                epochs = 2 * args.epochs if method == "thin-long" else args.epochs
                extra = dict(widths=widths, target=share * dense_params, match_miss=miss,
                             matched_to=f"{share} of dense", epochs=epochs)
                rate = 1 - share
            elif method in ("ours", "ours-scalar", "ours+kd"):
                if (row, share) not in rates:
                    rates[(row, share)] = ours_rate(share, row.removesuffix("+kd"))
                rate = rates[(row, share)]
            elif method == "knapsack":
                rate, extra = 1 - share, dict(target=share * dense_params)
            else:  # sp, ip: the share of nonzero weights
                rate = 1 - share
            for s in range(args.seeds):
                out.append(dict(row=row, rate=rate, seed=s, config=config,
                                teacher=teacher[s], method=method, share=share,
                                export=str(workdir / f"{method}-{share}-{s}.tflite"),
                                **extra))
    return out


def run(task):
    result = ablation.run_one(task)
    result.update(method=task.get("method", "dense"), share=task.get("share", 1.0))
    return result


def time_files(runs):
    """Sets each run's `latency_ms`: its `.tflite` file in LiteRT, batch 1, one thread."""
    from tf_transform_conv.export.latency import tflite_latency

    for result in runs:
        result["latency_ms"] = tflite_latency(result["tflite"], threads=1, repeats=9)


def summarize(runs):
    """`[{method, share, accuracy, std, conv_params, latency_ms, ...}]`, means over seeds."""
    groups = {}
    for r in runs:
        groups.setdefault((r["method"], r["share"]), []).append(r)
    thin = {(r["method"], r["share"], r["seed"]): r["accuracy"] for r in runs
            if r["method"] in ("thin", "thin+kd")}
    out = []
    for (method, share), items in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        acc = np.array([i["accuracy"] for i in items])
        reference = ablation.thin_reference(method, {m for m, _, _ in thin})
        diffs = [100 * (i["accuracy"] - thin[(reference, share, i["seed"])]) for i in items
                 if (reference, share, i["seed"]) in thin and method != reference]
        out.append(dict(
            method=method, share=share, seeds=len(items), accuracy=float(acc.mean()),
            std=float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            conv_params=float(np.mean([i["conv_params"] for i in items])),
            conv_param_fraction=float(np.mean([i["conv_params"] / i["dense_conv_params"]
                                               for i in items])),
            latency_ms=float(np.mean([i["latency_ms"] for i in items])),
            tflite_bytes=int(np.mean([i["tflite_bytes"] for i in items])),
            epochs=int(items[0]["epochs"]), versus=reference if diffs else None,
            versus_thin_points=float(np.mean(diffs)) if diffs else None,
            versus_thin_std=(float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0)
            if diffs else None))
    return out


def report(summary):
    lines = [f"{'method':<10}{'share':>7}{'accuracy':>18}{'conv params':>13}"
             f"{'latency ms':>12}{'tflite kB':>11}{'epochs':>8}{'vs thin (points)':>19}"]
    for s in summary:
        versus = ("" if s["versus_thin_points"] is None
                  else f"{s['versus_thin_points']:+.1f} +- {s['versus_thin_std']:.1f}"
                  + (" k" if s["versus"] == "thin+kd" else ""))
        lines.append(f"{s['method']:<10}{s['share']:>7.4g}"
                     f"{s['accuracy']:>10.3f} +- {s['std']:.3f}{s['conv_params']:>13.0f}"
                     f"{s['latency_ms']:>12.3f}{s['tflite_bytes'] / 1000:>11.1f}"
                     f"{s['epochs']:>8}{versus:>19}")
    return "\n".join(lines)


def plot(summary, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    dense = [s for s in summary if s["method"] == "dense"]
    for method in dict.fromkeys(s["method"] for s in summary if s["method"] != "dense"):
        points = sorted([s for s in summary if s["method"] == method] + dense,
                        key=lambda s: s["conv_params"])
        if method not in ("thin",):  # only the thin curve runs up to the dense point
            points = [p for p in points if p["method"] == method]
        style = dict(marker="o", lw=2.2 if method.startswith("ours") else 1.2,
                     ls="--" if method.startswith("thin") else "-")
        for ax, key in zip(axes, ("conv_params", "latency_ms")):
            ax.errorbar([p[key] for p in points], [p["accuracy"] for p in points],
                        yerr=[p["std"] for p in points], capsize=2, label=method, **style)
    for d in dense:
        for ax, key in zip(axes, ("conv_params", "latency_ms")):
            ax.plot(d[key], d["accuracy"], "k*", ms=12, label="dense")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("convolution parameters (nonzero for sp and ip)")
    axes[1].set_xlabel("LiteRT latency, batch 1, one thread (ms)")
    axes[0].set_ylabel("test accuracy (mean, std over seeds)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    common.save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    title = "Cluttered digits, 4-conv CNN: accuracy at equal size"
    if args.replot or args.retime:
        saved = json.loads(args.out.read_text())
        if args.retime:
            time_files(saved["runs"])
            saved["retimed"] = datetime.datetime.now().isoformat(timespec="seconds")
        saved["summary"] = summarize(saved["runs"])
        print(report(saved["summary"]))
        common.write_json(args.out, saved)
        plot(saved["summary"], args.out.with_suffix(".png"), title)
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
        return
    config = dict(train_size=args.train_size, test_size=args.test_size, epochs=args.epochs,
                  rates=[], prune_fraction=ablation.PRUNE_FRACTION, one_shot=False)
    workdir = Path(tempfile.mkdtemp(prefix="frontier-"))
    teacher = {seed: str(workdir / f"dense-{seed}.keras") for seed in range(args.seeds)}
    started = time.perf_counter()
    todo = tasks(args, config, teacher, workdir)
    first = [t for t in todo if t["row"] == "dense"]  # the teachers of kd and knapsack
    rest = [t for t in todo if t["row"] != "dense"]
    runs = []
    context = __import__("multiprocessing").get_context("spawn")
    with futures.ProcessPoolExecutor(args.workers, mp_context=context,
                                     initializer=ablation._init_worker) as pool:
        for batch in (first, rest):
            for result in pool.map(run, batch):
                runs.append(result)
                print(f"{result['method']} at {result['share']:.4g}, seed {result['seed']}: "
                      f"{result['accuracy']:.4f}, {result['conv_params']} conv params "
                      f"({result['seconds']:.0f} s)", flush=True)
    time_files(runs)  # after training, one file at a time: no training shares the cores
    minutes = (time.perf_counter() - started) / 60
    command = "python benchmarks/frontier.py " + shlex.join(argv or sys.argv[1:])
    earlier = {}
    if args.add_to:
        earlier = json.loads(args.out.read_text())
        runs = earlier["runs"] + [r for r in runs if r["method"] != "dense"]
    summary = summarize(runs)
    print("\n" + report(summary))
    print(f"\n{len(runs)} runs in {minutes:.1f} min on {args.workers} workers")

    import keras
    import tensorflow as tf

    payload = {
        "benchmark": "frontier",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command,
        "machine": common.machine_info(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "numpy": np.__version__},
        "config": {**config, "seeds": args.seeds, "shares": args.shares,
                   "methods": args.methods, "widths": ablation.WIDTHS,
                   "batch": ablation.BATCH, "learning_rate": ablation.LEARNING_RATE,
                   "workers": args.workers},
        "minutes": minutes,
        "summary": summary,
        "runs": runs,
    }
    if earlier:  # the runs of both commands, each command with its settings
        payload["earlier"] = [*earlier.get("earlier", []),
                              {k: earlier[k] for k in ("command", "date", "config", "minutes")}]
    common.write_json(args.out, payload)
    plot(summary, args.out.with_suffix(".png"), title)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
