"""U-Net families: registered architectures (blocks), norms and nonlinearities; networks built from primitives or a
plan."""

from autoseg.networks import families  # noqa: F401  (registers the families beyond plain and residual)
from autoseg.networks.blocks import (
    BlockType,
    get_block,
    get_nonlin,
    get_norm,
    list_blocks,
    list_nonlins,
    list_norms,
    register_block,
    register_nonlin,
    register_norm,
)
from autoseg.networks.builder import build_network
from autoseg.networks.unet import UNet

__all__ = [
    "UNet",
    "build_network",
    "BlockType",
    "register_block",
    "get_block",
    "list_blocks",
    "register_norm",
    "get_norm",
    "list_norms",
    "register_nonlin",
    "get_nonlin",
    "list_nonlins",
]
