"""What a run reports of its model and machine (`tf_transform_conv.training.report`)."""

import keras

from tf_transform_conv import TransformConv2D
from tf_transform_conv.training.report import environment
from tf_transform_conv.training.report import layer_details


def test_layer_details_of_each_transform_conv_nested_included():
    inner = keras.Sequential([keras.Input((8, 8, 4)),
                              TransformConv2D(8, 3, base_filters=2, name="nested")],
                             name="block")
    model = keras.Sequential([keras.Input((8, 8, 3)),
                              TransformConv2D(4, 3, base_filters=1, padding="same", name="top"),
                              keras.layers.Conv2D(4, 1, name="plain"), inner])
    rows = layer_details(model)
    assert [(r["name"], r["filters"], r["base_filters"]) for r in rows] == \
        [("top", 4, 1), ("nested", 8, 2)]
    assert all(r["transform_family"] == "discrete" for r in rows)
    assert [len(r["transforms"]) for r in rows] == [4, 4]
    assert not any("reconstruction_error" in r or "tflite_lowering" in r for r in rows)
    rows = layer_details(model, conversion=[{"name": "top", "error": 0.25}],
                         lowerings={"top": "grouped"})
    assert [(r["reconstruction_error"], r["tflite_lowering"]) for r in rows] == \
        [(0.25, "grouped"), (None, None)]


def test_environment_names_the_machine_and_versions():
    found = environment()
    assert set(found) == {"machine", "versions"}
    assert found["versions"]["keras"] == keras.__version__
    assert keras.backend.backend() in found["versions"]
    assert found["machine"]["cpu_count"] >= 1
