import json

import keras
import pytest

from tf_transform_conv import TransformConv2D
from tf_transform_conv import cli


def test_cost_command_prints_and_writes_json(tmp_path, capsys):
    model = keras.Sequential([
        keras.Input((8, 8, 4)),
        TransformConv2D(8, 3, transforms="rotations", padding="same", implementation="materialized"),
    ])
    path = tmp_path / "m.keras"
    model.save(path)
    assert cli.main(["cost", str(path), "--json", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    assert "Total params" in printed
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["params"] == 3 * 3 * 4 * 2 + 8
    assert data["macs"] == 8 * 8 * 3 * 3 * 4 * 8


def test_cost_command_missing_file(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["cost", str(tmp_path / "missing.keras")])


def test_analyze_command_finds_planted_redundancy(tmp_path, capsys):
    """Filters built as rotations of a few bases are rebuilt exactly; random ones are not."""
    import numpy as np

    rng = np.random.default_rng(0)
    bases = rng.normal(size=(3, 3, 4, 4))
    kernel = np.concatenate([np.rot90(bases, r, axes=(0, 1)) for r in range(4)], axis=-1)
    conv = keras.layers.Conv2D(16, 3, name="planted")
    model = keras.Sequential([keras.Input((8, 8, 4)), conv])
    conv.set_weights([kernel.astype("float32"), np.zeros(16, "float32")])
    path = tmp_path / "m.keras"
    model.save(path)
    assert cli.main(["analyze", str(path), "--out-dir", str(tmp_path), "--sparsities", "0.75"]) == 0
    assert "planted" in capsys.readouterr().out
    rows = json.loads((tmp_path / "analysis.json").read_text())["rows"]
    by_set = {r["transforms"]: r for r in rows}
    assert by_set["rotations"]["error"] < 1e-6
    assert by_set["rotations"]["random_error"] > 0.5
    assert by_set["flip_h"]["error"] > 0.1  # mirrors do not rebuild rotations
    # Learned families, fitted by least squares: a learned rotation of one
    # kept filter rebuilds every quarter turn; per-tap multipliers cannot.
    assert by_set["rotation"]["family"] == "rotation"
    assert by_set["rotation"]["error"] < 1e-6
    assert by_set["scalar"]["error"] > 0.1
    assert by_set["d4+scalar"]["error"] < 1e-6
    assert (tmp_path / "analysis.png").stat().st_size > 1000
