"""The precision policy of every stage (autoseg.devices): what ``auto`` chooses on each device."""

from __future__ import annotations

import pytest
import torch

from autoseg import devices
from autoseg.devices import autocast_dtype, inference_dtype, planned_precision, resolve_device, training_dtype
from autoseg.errors import ConfigError


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_inference_precision_follows_the_device(monkeypatch, native_bf16):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native_bf16)
    assert inference_dtype("auto", torch.device("cuda")) is torch.float16
    assert inference_dtype("auto", torch.device("cpu")) is (torch.bfloat16 if native_bf16 else None)
    # an explicit choice is kept whatever the hardware
    assert inference_dtype("fp32", torch.device("cuda")) is None
    assert inference_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert inference_dtype("fp16", torch.device("cuda")) is torch.float16


@pytest.mark.parametrize("bf16_gpu", [True, False])
def test_auto_training_precision_is_mixed_on_a_gpu_only(monkeypatch, bf16_gpu):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    assert training_dtype("auto", torch.device("cpu")) is None
    assert training_dtype("auto", torch.device("cuda")) is (torch.bfloat16 if bf16_gpu else torch.float16)
    assert training_dtype("fp16", torch.device("cpu")) is torch.float16
    # the planner's probes time what training with ``auto`` will run
    assert autocast_dtype(planned_precision("cpu")) is training_dtype("auto", torch.device("cpu"))
    assert planned_precision("cuda") == "bf16"


def test_unknown_precision_and_missing_cuda_are_refused(monkeypatch):
    with pytest.raises(ConfigError, match="choose one of"):
        inference_dtype("int8", torch.device("cpu"))
    with pytest.raises(ConfigError, match="choose one of"):
        training_dtype("half", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda:1")
