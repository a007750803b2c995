from __future__ import annotations

import numpy as np
import pytest

from packager.errors import AccuracyError
from packager.optimize.evaluate import check_gate, compare, gate_failures


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
