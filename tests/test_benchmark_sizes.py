"""The equal-size comparisons of benchmarks/ablation.py and benchmarks/frontier.py.

Every accuracy the two scripts report is a difference from a thin network of
the same size: these tests check that the sizes really match (counted by the
package's own cost model on built Keras models) and that the differences are
paired as the reports say.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

import tf_transform_conv as tc
from tf_transform_conv import distill
from tf_transform_conv.distill import InnerDistiller
from tf_transform_conv.pruning.schedules import ConstantSparsity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ablation  # noqa: E402
import frontier  # noqa: E402


@pytest.mark.parametrize("widths", [ablation.WIDTHS, (16, 16, 32, 32), (3, 5, 7, 11)])
def test_widths_cost_counts_what_model_cost_counts_on_the_built_network(widths):
    model = ablation.cnn(widths, seed=0)
    cost = tc.model_cost(model)
    params, macs = ablation.widths_cost(widths)
    assert params == ablation.conv_params(model)
    assert macs == cost.macs - 10 * widths[-1]  # less the classifier's


@pytest.mark.parametrize("cost", ["params", "macs"])
@pytest.mark.parametrize("share", [0.5, 0.25, 0.125, 0.108, 0.0625])
def test_thin_widths_match_the_target_within_the_tolerance(share, cost):
    which = 0 if cost == "params" else 1
    target = share * ablation.widths_cost(ablation.WIDTHS)[which]
    widths, miss = ablation.thin_widths(target, cost)
    measured = ablation.widths_cost(widths)[which]
    assert miss == pytest.approx(abs(measured - target) / target)
    assert miss <= ablation.THIN_TOLERANCE
    # One factor scales every width: the ratios of the dense network stay.
    assert widths[0] == widths[1] and widths[2] == widths[3]
    assert abs(widths[2] - 2 * widths[0]) <= 1


def test_thin_rows_train_as_long_as_the_longest_route():
    assert ablation.total_epochs("scalar", 3) == 3
    assert ablation.total_epochs("knapsack+ikd", 3) == 6  # the dense model's epochs, then its own


def _run(row, seed, accuracy, rate=0.5):
    return dict(row=row, rate=rate, seed=seed, accuracy=accuracy, conv_params=1,
                dense_conv_params=4)


def test_versus_thin_pairs_each_route_with_the_same_seeds_thin_run():
    runs = [_run("thin", 0, 0.70), _run("thin", 1, 0.60), _run("thin", 2, 0.65),
            _run("scalar", 0, 0.72), _run("scalar", 1, 0.63), _run("scalar", 2, 0.66),
            _run("scalar+kd", 0, 0.75), _run("scalar+kd", 1, 0.66),
            _run("thin+kd", 0, 0.74), _run("thin+kd", 1, 0.60),
            _run("scalar", 0, 0.9, rate=0.9)]  # no thin run at 0.9
    versus = ablation.versus_thin(runs)
    mean, std, reference = versus[("scalar", 0.5)]
    assert reference == "thin"
    assert mean == pytest.approx(np.mean([2, 3, 1]))
    assert std == pytest.approx(np.std([2, 3, 1], ddof=1))
    # A distilled route against the thin network distilled from the same teacher.
    mean, std, reference = versus[("scalar+kd", 0.5)]
    assert (reference, mean) == ("thin+kd", pytest.approx(np.mean([1, 6])))
    assert ("scalar", 0.9) not in versus and ("thin", 0.5) not in versus
    assert versus[("thin+kd", 0.5)][2] == "thin"
    # Distilled from the features too: against the thin network distilled the same way.
    runs += [_run("thin+ikd", 0, 0.76), _run("affine+ikd", 0, 0.78)]
    versus = ablation.versus_thin(runs)
    mean, _, reference = versus[("affine+ikd", 0.5)]
    assert (reference, mean) == ("thin+ikd", pytest.approx(2.0))
    assert versus[("thin+ikd", 0.5)][2] == "thin"
    assert "(i: against thin+ikd" in ablation.report(runs, ["affine+ikd"], [0.5])[0]


def test_the_frontier_pairs_a_distilled_method_with_the_distilled_thin_network():
    def point(method, seed, accuracy):
        return dict(method=method, share=0.25, seed=seed, accuracy=accuracy, conv_params=1,
                    dense_conv_params=4, latency_ms=0.1, tflite_bytes=10, epochs=3)

    runs = [point("thin", 0, 0.70), point("thin", 1, 0.60),
            point("thin+kd", 0, 0.74), point("thin+kd", 1, 0.64),
            point("ours", 0, 0.73), point("ours", 1, 0.62),
            point("ours+kd", 0, 0.75), point("ours+kd", 1, 0.69)]
    rows = {row["method"]: row for row in frontier.summarize(runs)}
    assert rows["ours"]["versus"] == "thin"
    assert rows["ours"]["versus_thin_points"] == pytest.approx(2.5)
    assert rows["ours+kd"]["versus"] == "thin+kd"
    assert rows["ours+kd"]["versus_thin_points"] == pytest.approx(3.0)
    assert rows["ours+kd"]["versus_thin_std"] == pytest.approx(np.std([1, 5], ddof=1))
    assert rows["thin+kd"]["versus"] == "thin" and rows["thin"]["versus"] is None


def test_cluttered_shapes_is_a_balanced_ten_class_task_that_a_seed_repeats():
    x, y = ablation.cluttered_shapes(400, "train")
    again, labels = ablation.cluttered_shapes(400, "train")
    test, _ = ablation.cluttered_shapes(400, "test")
    assert x.shape == (400, ablation.SIZE, ablation.SIZE, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(x, again)
    np.testing.assert_array_equal(y, labels)
    assert not np.allclose(x, test)
    assert set(np.unique(y)) == set(range(len(ablation.SHAPES)))
    assert np.bincount(y).min() >= 20
    # Each class's mean image differs from every other's: the labels carry the shapes.
    means = np.stack([x[y == c].mean(axis=0) for c in range(len(ablation.SHAPES))])
    gaps = [np.abs(means[a] - means[b]).max() for a in range(10) for b in range(a)]
    assert min(gaps) > 0.05


def test_ours_rate_gives_the_share_of_the_dense_parameters():
    rate = frontier.ours_rate(0.25)
    dense = ablation.cnn(ablation.WIDTHS, 0)
    model = tc.prune_model(dense, lambda step: (True, rate),
                           tc.Reconstruction(scale=True, **ablation.PRUNED[frontier.ROW["ours"]]))
    tc.update_pruning_step(model, 0)
    stripped = tc.strip_model(model)
    share = ablation.conv_params(stripped) / ablation.conv_params(dense)
    assert any(isinstance(layer, tc.TransformConv2D) for layer in stripped.layers)
    assert share == pytest.approx(0.25, rel=0.1)


def test_the_measured_route_is_the_recommended_reconstruction():
    ours = tc.Reconstruction(scale=True, **ablation.PRUNED[frontier.ROW["ours"]])
    assert ours == tc.Reconstruction.recommended()


# A narrower network keeps more of its filters to reach the same size, a wider one fewer.
@pytest.mark.parametrize("row, widths, rates", [
    ("hybrid-0.75", [24, 24, 48, 48], (0, 0.77)),
    ("wide-1.5+kd", [48, 48, 96, 96], (0.77, 1)),
])
def test_a_hybrid_row_is_pruned_to_the_affine_rows_size_from_other_widths(row, widths, rates):
    settings = ablation.hybrid_settings(row, 0.77)
    assert settings["widths"] == widths
    assert rates[0] < settings["prune_rate"] < rates[1]
    target = ablation.pruned_params(ablation.WIDTHS, 0.77)
    reached = ablation.pruned_params(settings["widths"], settings["prune_rate"])
    assert reached == pytest.approx(target, rel=ablation.THIN_TOLERANCE)


def test_a_route_that_is_not_hybrid_has_no_hybrid_settings():
    assert ablation.hybrid_settings("affine", 0.77) == {}


# pruned_params counts once per tuple of bases kept: two rates that keep the same
# bases in every layer give what pruning at the second one gives.
def test_pruned_params_counts_once_per_tuple_of_kept_bases_and_that_is_exact(monkeypatch):
    widths, (first, second) = (8, 8, 16, 16), (0.76, 0.74)  # both keep 2, 2, 4, 4 bases
    monkeypatch.setattr(ablation, "_PRUNED_PARAMS", {})
    cached = ablation.pruned_params(widths, first)
    assert ablation.pruned_params(widths, second) == cached
    assert len(ablation._PRUNED_PARAMS) == 1
    ablation._PRUNED_PARAMS.clear()
    assert ablation.pruned_params(widths, second) == cached
    assert ablation.pruned_params(widths, 0.5) > cached  # another tuple: counted anew
    with pytest.raises(ValueError, match="allocates per layer; 'paper'"):
        ablation.pruned_params(widths, first, row="paper")


@pytest.fixture(scope="module")
def dense_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ablation") / "dense-0.keras"
    ablation.cnn(ablation.WIDTHS, 0).save(path)
    return str(path)


# The allocated rows are planned on the seed's dense model: `budget` keeps every channel,
# `split` first removes channels to half the parameters; both end at the affine row's size.
@pytest.mark.parametrize("row", ["budget+kd", "split"])
def test_an_allocated_row_is_planned_to_the_affine_rows_size(row, dense_file):
    x, y = ablation.cluttered_digits(256, "train")
    widths, plan = ablation.allocation(row, 0.77, dense_file, x, y)
    dense_params = ablation.widths_cost(ablation.WIDTHS)[0]
    if row == "budget+kd":
        assert widths == ablation.WIDTHS
    else:
        assert all(w <= d for w, d in zip(widths, ablation.WIDTHS)) and widths != ablation.WIDTHS
        assert ablation.widths_cost(widths)[0] == pytest.approx(dense_params / 2, rel=0.05)
    model = tc.prune_model(ablation.cnn(widths, 0), ConstantSparsity(0.77, 0),
                           tc.Reconstruction(scale=True, **ablation.PRUNED["affine"]),
                           budget=plan)
    tc.update_pruning_step(model, 0)
    stripped = tc.strip_model(model)
    bases = {l.name: l.base_filters for l in stripped.layers
             if isinstance(l, tc.TransformConv2D)}
    assert bases == plan.bases
    target = ablation.pruned_params(ablation.WIDTHS, 0.77)
    reached = ablation.conv_params(stripped)
    assert target * (1 - ablation.THIN_TOLERANCE) <= reached <= target


# The fitted rows start from the trained dense model, converted to the affine row's size:
# their thin network trains the dense model's epochs and theirs.
def test_a_fitted_row_starts_at_the_affine_rows_size_and_counts_the_dense_epochs(
        dense_file, monkeypatch):
    monkeypatch.setattr(ablation, "OUTPUT_FIT_STEPS", 2)
    x, y = ablation.cluttered_digits(256, "train")
    model = ablation.fitted("fitted+kd", dense_file, 0.77, x, y, seed=0)
    assert all(isinstance(model.get_layer(f"conv{i}"), tc.TransformConv2D) for i in range(4))
    target = ablation.pruned_params(ablation.WIDTHS, 0.77)
    assert ablation.conv_params(model) == target
    _, plan = ablation.allocation("budget", 0.77, dense_file, x, y)
    model = ablation.fitted("fitted-budget", dense_file, 0.77, x, y, seed=0)
    bases = {l.name: l.base_filters for l in model.layers if isinstance(l, tc.TransformConv2D)}
    assert bases == plan.bases
    assert target * (1 - ablation.THIN_TOLERANCE) <= ablation.conv_params(model) <= target
    for row in ("fitted", "fitted+kd", "fitted-budget+kd"):
        assert ablation.total_epochs(row, 12) == 24
    assert ablation.total_epochs("affine+kd", 12) == 12


def test_an_inner_distilled_row_trains_through_the_distiller_of_its_features(
        dense_file, monkeypatch):
    built = []

    class Recorded(InnerDistiller):
        def __init__(self, student, teacher, layers, **kwargs):
            built.append((student, layers, kwargs))
            super().__init__(student, teacher, layers, **kwargs)

    monkeypatch.setattr(distill, "InnerDistiller", Recorded)
    config = dict(train_size=64, test_size=64, epochs=1, rates=[0.77], prune_fraction=0.4,
                  one_shot=False, task="digits")
    result = ablation.run_one(dict(row="thin+ikd", rate=0.77, seed=0, config=config,
                                   teacher=dense_file, widths=[16, 16, 32, 32], target=16272,
                                   match_miss=0.0, matched_to="affine+ikd"))
    (student, layers, kwargs), = built
    assert layers == ["bn0", "bn1", "bn2", "bn3"]
    assert kwargs["output_weight"] == ablation.KD_WEIGHT
    # The thin student's own convolutions: the distiller's projections are not counted.
    assert result["conv_params"] == ablation.conv_params(student) == 16272
