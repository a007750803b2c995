from __future__ import annotations

import numpy as np
import pytest

from packager.errors import AccuracyError
from packager.optimize.evaluate import check_gate, compare, gate_failures, is_score_vector


def calls(array: np.ndarray) -> list[list[np.ndarray]]:
    return [[row[None, :]] for row in array]


def test_metrics_match_a_hand_computed_case() -> None:
    base = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0]])
    cand = base.copy()
    cand[2] = [0.0, 4.0, 3.0]  # top-1 changes from class 2 to class 1
    metrics = compare(calls(base), calls(cand), labels=np.array([0, 1, 2, 0]))
    assert metrics.samples == 4
    assert metrics.max_abs_error == pytest.approx(4.0)
    assert metrics.mean_abs_error == pytest.approx(4.0 / 12)
    assert metrics.top1_agreement == pytest.approx(0.75)
    expected_cos = (1 + 1 + 3 / 5 + 1) / 4  # row 2: dot 9 over |3| * |5|
    assert metrics.cosine_similarity == pytest.approx(expected_cos)
    assert metrics.baseline_accuracy == pytest.approx(1.0)
    assert metrics.accuracy == pytest.approx(0.75)
    assert metrics.accuracy_drop == pytest.approx(0.25)


def test_batched_outputs_count_rows_and_unlabelled_drop_is_changed_answers() -> None:
    base = np.eye(4)
    cand = np.eye(4)[[0, 1, 3, 3]]
    metrics = compare([[base]], [[cand]])
    assert metrics.samples == 4
    assert metrics.accuracy is None
    assert metrics.accuracy_drop == pytest.approx(0.25)


def test_gate_reports_both_numbers_and_passes_within_thresholds() -> None:
    base = np.eye(4)
    metrics = compare([[base]], [[np.eye(4)[[0, 1, 3, 3]]]])
    assert gate_failures(metrics, 0.25, 0.75) == ()
    check_gate(metrics, 0.3, 0.7, label="m")
    with pytest.raises(AccuracyError) as raised:
        check_gate(metrics, 0.1, 0.9, label="m.onnx as int8")
    line = raised.value.one_line()
    assert "25.00% > allowed 10.00%" in line and "75.00% < required 90.00%" in line
    assert "m.onnx as int8" in line and "\n" not in line
    assert raised.value.exit_code == 11


def test_reference_outputs_are_compared_with_the_baseline() -> None:
    base = np.array([[0.1, 0.9]])
    metrics = compare([[base]], [[base]], references=np.array([0.1, 0.8]))
    assert metrics.reference_max_abs_error == pytest.approx(0.1)
    assert metrics.max_abs_error == 0.0 and metrics.cosine_similarity == pytest.approx(1.0)


# --- every output ---------------------------------------------------------------------------------


def two_outputs(
    first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray]
) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """(baseline calls, candidate calls): one call per sample, two outputs each."""
    base = [[a[None], b[None]] for a, b in zip(first[0], second[0], strict=True)]
    cand = [[a[None], b[None]] for a, b in zip(first[1], second[1], strict=True)]
    return base, cand


def test_each_output_is_measured_and_a_ruined_second_output_fails_the_gate() -> None:
    rng = np.random.default_rng(0)
    scores = np.eye(4)[rng.integers(0, 4, 20)] * 5 + rng.normal(0, 0.1, (20, 4))
    feature = rng.normal(0, 1, (20, 2, 3))  # a [1, 2, 3] map per sample: not a score vector
    ruined = feature * 0.2 + rng.normal(0, 1, feature.shape)
    base, cand = two_outputs((scores, scores + 0.01), (feature, ruined))
    metrics = compare(base, cand, names=["scores", "features"])
    first, second = metrics.outputs
    assert (first.name, first.score_vector, first.top1_agreement) == ("scores", True, 1.0)
    assert (second.name, second.score_vector, second.top1_agreement) == ("features", False, None)
    expected_rel = np.linalg.norm(feature - ruined) / np.linalg.norm(feature)
    assert second.relative_error == pytest.approx(expected_rel)
    assert second.cosine_similarity < 0.5 and first.cosine_similarity > 0.999
    # The aggregate is the worst output, not the first.
    assert metrics.cosine_similarity == second.cosine_similarity
    assert metrics.max_abs_error == second.max_abs_error
    failures = gate_failures(metrics, 0.05, 0.95)
    assert failures and all("output 'features' (not a score vector)" in f for f in failures)
    assert any("relative error" in f and "> allowed 5.00%" in f for f in failures)
    assert any("cosine similarity" in f and "< required 0.9500" in f for f in failures)
    with pytest.raises(AccuracyError) as raised:
        check_gate(metrics, 0.05, 0.95, label="m.onnx as int8")
    assert "worst output 'features'" in raised.value.one_line()
    # The first output alone passes the same gate.
    alone = compare([[c[0]] for c in base], [[c[0]] for c in cand], names=["scores"])
    assert gate_failures(alone, 0.05, 0.95) == ()


def test_top1_applies_only_to_score_vectors() -> None:
    assert is_score_vector(np.zeros((1, 10), np.float32))
    assert is_score_vector(np.zeros((8, 1, 10), np.float32))
    assert is_score_vector(np.zeros(10, np.float32))
    assert not is_score_vector(np.zeros((1, 1), np.float32))  # one value: a regression
    assert not is_score_vector(np.zeros((1, 3, 8, 8), np.float32))  # a feature map
    assert not is_score_vector(np.zeros((1, 10), np.int64))  # class indices, not scores
    metrics = compare([[np.zeros((1, 3, 4, 4))]], [[np.ones((1, 3, 4, 4))]])
    assert metrics.top1_agreement is None and metrics.accuracy_drop is None
    assert metrics.outputs[0].judged_on == "cosine and relative error"


def test_labels_judge_the_first_score_vector_output_and_json_lists_every_output() -> None:
    feature = np.ones((3, 2, 2))
    scores = np.eye(3)
    base = [[f[None], s[None]] for f, s in zip(feature, scores, strict=True)]
    cand = [[f[None], s[None]] for f, s in zip(feature, scores[[0, 1, 0]], strict=True)]
    metrics = compare(base, cand, labels=np.array([0, 1, 2]), names=["map", "probs"])
    assert metrics.labelled_output == "probs"
    assert metrics.accuracy == pytest.approx(2 / 3) and metrics.baseline_accuracy == 1.0
    document = metrics.to_json()
    outputs = document["outputs"]
    assert isinstance(outputs, list)
    assert [o["name"] for o in outputs] == ["map", "probs"]
    assert [o["score_vector"] for o in outputs] == [False, True]
    failures = gate_failures(metrics, 0.05, None)
    assert failures == ("output 'probs': accuracy drop 33.33% > allowed 5.00%",)
