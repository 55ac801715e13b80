"""The `tfconv` command.

    tfconv cost MODEL.keras [--json OUT.json]
    tfconv analyze MODEL.keras [--out-dir DIR] [--sparsities 0.25 0.5 0.75]

`cost` prints a model's parameters and multiply-adds per layer (see
`tf_transform_conv.cost`); `analyze` reports, per Conv2D layer, how well
its filters are reconstructed by each transform at a few sparsities, against
random filters of the same shape, and writes `analysis.json` and
`analysis.png` (see `tf_transform_conv.analyze`).
"""

import argparse
import json
import os
import sys


def _load(path, command):
    import keras

    import tf_transform_conv  # noqa: F401  (registers the package's layers)

    if not os.path.isfile(path):
        raise SystemExit(f"tfconv {command}: no such file: {path}")
    return keras.saving.load_model(path, safe_mode=True, compile=False)


def _cost(args):
    from tf_transform_conv.cost import model_cost

    cost = model_cost(_load(args.model, "cost"))
    cost.summary()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(cost.to_dict(), f, indent=2)
    return 0


def _analyze(args):
    from tf_transform_conv import analyze

    model = _load(args.model, "analyze")
    rows = analyze.analyze_model(model, sparsities=args.sparsities, seed=args.seed)
    if not rows:
        raise SystemExit(
            "tfconv analyze: the model has no Conv2D layer with groups=1 and a "
            "kernel larger than 1x1 to analyse."
        )
    print(analyze.format_rows(rows))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "analysis.json"), "w") as f:
        json.dump({"model": args.model, "rows": [r.to_dict() for r in rows]}, f, indent=2)
    analyze.plot_rows(rows, os.path.join(args.out_dir, "analysis.png"))
    print(f"wrote {args.out_dir}/analysis.json and analysis.png")
    return 0


def _sparsity(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {text}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="tfconv", description="Tools for compact CNNs built with TransformConv2D."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    cost = commands.add_parser(
        "cost", help="parameters and multiply-adds of a .keras model, per layer"
    )
    cost.add_argument("model", help="path to a .keras file")
    cost.add_argument("--json", help="also write the figures as JSON to this path")
    cost.set_defaults(run=_cost)
    analyze = commands.add_parser(
        "analyze", help="how well each Conv2D's filters are rebuilt by each transform"
    )
    analyze.add_argument("model", help="path to a .keras file")
    analyze.add_argument("--out-dir", default=".", help="where analysis.json/.png go (.)")
    analyze.add_argument(
        "--sparsities", type=_sparsity, nargs="+", default=[0.25, 0.5, 0.75],
        help="fractions of filters to reconstruct (0.25 0.5 0.75)",
    )
    analyze.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    analyze.set_defaults(run=_analyze)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
