"""The `tfconv` command.

    tfconv cost MODEL.keras [--json OUT.json]

prints a model's parameters and multiply-adds per layer (see
`tf_transform_conv.cost`).
"""

import argparse
import json
import os
import sys


def _cost(args):
    import keras

    import tf_transform_conv  # noqa: F401  (registers TransformConv2D)
    from tf_transform_conv.cost import model_cost

    if not os.path.isfile(args.model):
        raise SystemExit(f"tfconv cost: no such file: {args.model}")
    model = keras.saving.load_model(args.model, safe_mode=True, compile=False)
    cost = model_cost(model)
    cost.summary()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(cost.to_dict(), f, indent=2)
    return 0


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
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
