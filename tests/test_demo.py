"""End-to-end test of `examples/digits_demo.py` (`make demo`), in its quick mode."""

import importlib.util
import json
import numbers
import pathlib

import pytest

DEMO = pathlib.Path(__file__).resolve().parents[1] / "examples" / "digits_demo.py"


def load_demo():
    """Imports the script by path: `examples/` is not a package."""
    spec = importlib.util.spec_from_file_location("digits_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_demo_writes_results_and_round_trips_models(tmp_path):
    demo = load_demo()
    run_dir = tmp_path / "run"
    demo.main(["--quick", "--verbose", "0", "--run-dir", str(run_dir)])

    results = json.loads((run_dir / "results.json").read_text())
    rows = {row["model"]: row for row in results["rows"]}
    assert list(rows) == ["conv2d", "transform-1-2", "transform-1-4", "pruned-75"]
    assert not list(run_dir.glob("*.tmp")), "results.json was not written atomically"

    dense = rows["conv2d"]
    for name, row in rows.items():
        assert (run_dir / row["saved_model"]).is_file(), name
        assert row["reload_match"] is True, (name, row["reload_max_abs_diff"])
        assert isinstance(row["test_accuracy"], numbers.Real), name
        assert 0.0 <= row["test_accuracy"] <= 1.0, name
        assert row["train_seconds"] > 0, name
        if name != "conv2d":
            assert row["params"] < dense["params"], name
            assert row["macs"] <= row["dense_macs"] == dense["macs"], name

    # The stripped pruned model keeps a quarter of each 3x3 conv's filters.
    pruned = rows["pruned-75"]
    assert pruned["implementations"], "the stripped model holds no TransformConv2D"
    assert pruned["conv_params"] < 0.4 * dense["conv_params"]
