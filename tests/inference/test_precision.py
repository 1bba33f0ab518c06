"""Forward-pass precision of prediction: what ``auto`` chooses on each device."""

from __future__ import annotations

import pytest
import torch

from autoseg.errors import InferenceError
from autoseg.inference import predictor
from autoseg.inference.predictor import inference_dtype


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_precision_follows_the_device(monkeypatch, native_bf16):
    monkeypatch.setattr(predictor, "cpu_has_native_bf16", lambda: native_bf16)
    assert inference_dtype("auto", torch.device("cuda")) is torch.float16
    assert inference_dtype("auto", torch.device("cpu")) is (torch.bfloat16 if native_bf16 else None)
    # an explicit choice is kept whatever the hardware
    assert inference_dtype("fp32", torch.device("cuda")) is None
    assert inference_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert inference_dtype("fp16", torch.device("cuda")) is torch.float16


def test_unknown_precision_is_refused():
    with pytest.raises(InferenceError, match="choose one of"):
        inference_dtype("int8", torch.device("cpu"))
