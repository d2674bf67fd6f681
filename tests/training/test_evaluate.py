"""In-process evaluation refuses what it cannot reproduce faithfully."""

from __future__ import annotations

import numpy as np
import pytest

from craft_adapter.artifact.adapter_file import AdapterError
from craft_adapter.artifact.synthetic import synthetic_adapter
from craft_adapter.training.evaluate import stand_in_vendor, vendor_equivalent


def test_a_sigmoid_adapter_has_no_in_process_stand_in() -> None:
    adapter = synthetic_adapter(4, logit_kind="independent_probabilities")
    with pytest.raises(AdapterError, match="--vendor"):
        stand_in_vendor(object(), adapter.logit_kind)  # refused before the backend is touched
    with pytest.raises(AdapterError, match="sigmoid"):
        vendor_equivalent(np.zeros((2, 4), np.float32), 100.0, adapter)


def test_probabilities_and_logits_adapters_have_stand_ins() -> None:
    cos = np.array([[0.2, 0.1, 0.0, -0.1]], np.float32)
    p = vendor_equivalent(100 * cos, 100.0, synthetic_adapter(4, logit_kind="probabilities"))
    assert p.shape == (1, 4) and abs(float(p.sum()) - 1) < 1e-5 and p.argmax() == 0
    logits = synthetic_adapter(4, logit_kind="logits")
    np.testing.assert_array_equal(vendor_equivalent(100 * cos, logits.logit_scale, logits), 100 * cos)
