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
