"""Registries of blocks, norms and nonlinearities."""

from __future__ import annotations

import pytest
from torch import nn

from autoseg.errors import ConfigError
from autoseg.networks import (
    BlockType,
    get_block,
    get_nonlin,
    get_norm,
    list_blocks,
    list_nonlins,
    list_norms,
    register_block,
    register_norm,
)


def test_builtin_names():
    assert {"plain", "residual"} <= set(list_blocks())
    assert {"instance", "batch"} <= set(list_norms())
    assert {"leaky_relu", "relu", "gelu"} <= set(list_nonlins())


def test_unknown_name_lists_the_valid_ones():
    valid = "attention, convnext, dense, hybrid, multiscale, plain, residual"
    with pytest.raises(ConfigError, match=f"unknown block 'unet3000'; valid names: {valid}"):
        get_block("unet3000")
    with pytest.raises(ConfigError, match="unknown norm 'group'.*batch, instance"):
        get_norm("group")


def test_duplicate_name_raises():
    with pytest.raises(ConfigError, match="already registered"):
        register_norm("instance", lambda ndim, c: nn.Identity())
    with pytest.raises(ConfigError, match="already registered"):
        register_block("plain", BlockType(build_stage=get_block("plain").build_stage))


def test_defaults_match_nnunet():
    norm = get_norm("instance")(3, 8)
    assert isinstance(norm, nn.InstanceNorm3d)
    assert norm.affine and norm.eps == 1e-5
    act = get_nonlin("leaky_relu")()
    assert isinstance(act, nn.LeakyReLU)
    assert act.negative_slope == 0.01 and act.inplace
