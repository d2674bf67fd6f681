"""The one zero-shot request/reply rule and the one score check, as every client and fake vendor uses them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from craft_adapter.vendors.faults import VendorError
from craft_adapter.vendors.replies import (
    PROBABILITY_SUM_TOLERANCE,
    check_answer,
    check_scores,
    parse_zero_shot,
    read_zero_shot_request,
    unit_rows,
    zero_shot_reply,
    zero_shot_request,
    zero_shot_scores,
)

LABELS = ["a", "b", "c"]


def reply(pairs: list[tuple[object, object]]) -> bytes:
    return json.dumps([{"label": lab, "score": s} for lab, s in pairs]).encode()


def test_a_complete_reply_is_read_in_label_order() -> None:
    got = parse_zero_shot(reply([("c", 0.5), ("a", 0.2), ("b", 0.3)]), LABELS)
    assert got.dtype == np.float32 and got.tolist() == pytest.approx([0.2, 0.3, 0.5])
    assert zero_shot_scores(json.loads(reply([("c", 0.5), ("a", 0.2), ("b", 0.3)])), LABELS).tolist() == got.tolist()


@pytest.mark.parametrize("body, message", [
    (reply([("a", 0.2), ("b", 0.3), ("c", 0.5)])[:-5], "not complete JSON"),
    (b'{"label": "a"}', "not a zero-shot list"),
    (reply([("a", 0.5), ("b", 0.5)]), "no score for classes ['c']"),
    (reply([("a", 0.2), ("b", 0.3), ("d", 0.5)]), "labels the adapter does not know ['d']"),
    (reply([("a", 0.2), ("a", 0.3), ("c", 0.5)]), "twice"),
    (reply([("a", "0.2"), ("b", 0.3), ("c", 0.5)]), "not a zero-shot list"),
    (reply([("a", True), ("b", 0.3), ("c", 0.5)]), "not a zero-shot list"),
    (reply([(1, 0.2), ("b", 0.3), ("c", 0.5)]), "not a zero-shot list"),
    (b'[{"label": "a", "score": NaN}, {"label": "b", "score": 0.5}, {"label": "c", "score": 0.5}]', "NaN"),
    (reply([("a", 0.4), ("b", 0.6), ("c", 0.6)]), "not probabilities"),  # sums to 1.6
    (reply([("a", 0.8), ("b", 1.2), ("c", 0.0)]), "not probabilities"),  # doubled: over 1
    (reply([("a", -0.1), ("b", 0.6), ("c", 0.5)]), "not probabilities"),
])
def test_partial_or_malformed_replies_are_refused_as_transient(body: bytes, message: str) -> None:
    with pytest.raises(VendorError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        parse_zero_shot(body, LABELS)
    assert e.value.transient  # a garbled reply may come out right on the next try


def test_the_sum_tolerance_allows_rounding_and_nothing_more() -> None:
    p = np.float32([0.2, 0.3, 0.5])
    rounded = reply([("a", 0.2004), ("b", 0.3004), ("c", 0.5001)])  # 4-decimal rounding, off by 9e-4
    assert parse_zero_shot(rounded, LABELS).sum() == pytest.approx(1, abs=PROBABILITY_SUM_TOLERANCE)
    with pytest.raises(VendorError, match="sum"):
        parse_zero_shot(reply(list(zip(LABELS, (p * 0.99).tolist(), strict=True))), LABELS)


def test_request_and_reply_builders_round_trip() -> None:
    body = json.loads(json.dumps(zero_shot_request("aGk=", LABELS, "a {} here")))
    assert body == {"inputs": "aGk=", "parameters": {"candidate_labels": LABELS, "hypothesis_template": "a {} here"}}
    request = read_zero_shot_request(body)
    assert (request.image_b64, request.labels, request.template) == ("aGk=", LABELS, "a {} here")
    answer = zero_shot_reply(LABELS, np.float32([0.3, 0.4, 0.3]))
    assert [e["label"] for e in answer] == ["b", "a", "c"]  # best first, ties in label order
    assert zero_shot_scores(answer, LABELS).tolist() == pytest.approx([0.3, 0.4, 0.3])
    no_template = read_zero_shot_request({"inputs": "x", "parameters": {"candidate_labels": ["a"]}})
    assert no_template.template == "This is a photo of {}."  # Hugging Face's default


@pytest.mark.parametrize("body, message", [
    ([1], "candidate_labels"),
    ({"inputs": "x", "parameters": {}}, "candidate_labels"),
    ({"inputs": "x", "parameters": {"candidate_labels": ["a", "a"]}}, "distinct"),
    ({"inputs": "x", "parameters": {"candidate_labels": ["a"], "hypothesis_template": "none"}}, "'{}'"),
    ({"inputs": 3, "parameters": {"candidate_labels": ["a"]}}, "base64"),
])
def test_bad_requests_are_refused(body: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_zero_shot_request(body)


def test_check_answer_shapes_finiteness_and_probability_range() -> None:
    np.testing.assert_array_equal(check_answer([0.2, 0.8], (2,), probabilities=True), np.float32([0.2, 0.8]))
    assert check_answer(np.zeros((3, 5)), (3, None)).shape == (3, 5)
    assert check_answer([1.0000005, 0.0], (2,), probabilities=True)[0] > 1  # float32 softmax slack
    for bad, shape, probs, message in (([0.2, np.nan], (2,), False, "NaN"), ([0.5, 1.5], (2,), True, r"\[0, 1\]"),
                                       ([1, 2, 3], (2,), False, "shape"), ("x", (1,), False, "numeric"),
                                       ([[1.0]], (1, 2), False, "shape")):
        with pytest.raises(VendorError, match=message) as e:
            check_answer(bad, shape, probabilities=probs)
        assert e.value.transient
    with pytest.raises(VendorError, match=r"NaN or inf scores for image\(s\) \[1\]"):
        check_scores([[0.0, 1.0], [np.inf, 0.0]], 2, 2)


def test_unit_rows() -> None:
    x = np.float32([[3, 4], [0, 0]])
    np.testing.assert_allclose(unit_rows(x), [[0.6, 0.8], [0, 0]])
    assert unit_rows([[[1.0, 0.0]]]).shape == (1, 1, 2) and unit_rows(x).dtype == np.float32


def test_a_score_of_1e400_is_a_clear_vendor_error_not_a_crash() -> None:
    from craft_adapter.vendors.faults import VendorError
    from craft_adapter.vendors.replies import parse_zero_shot

    body = b'[{"label": "a", "score": 1e400}, {"label": "b", "score": 0.0}]'  # JSON's 1e400 is inf in Python
    with pytest.raises(VendorError, match="inf") as refused:
        parse_zero_shot(body, ["a", "b"])
    assert refused.value.transient
