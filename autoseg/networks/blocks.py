"""Building blocks of the U-Net family and the registries that name them.

Three registries map a name in the plan to a small factory:

- norms (``instance``, ``batch``): ``factory(ndim, channels) -> nn.Module``;
- nonlinearities (``leaky_relu``, ``relu``, ``gelu``): ``factory() -> nn.Module``;
- blocks, the architecture families (``plain``, ``residual`` here; ``attention``, ``multiscale``, ``dense``,
  ``convnext``, ``hybrid`` in :mod:`autoseg.networks.families`): a :class:`BlockType` whose ``build_stage``
  makes one encoder stage, with an optional gate on the skip connections and an optional bottleneck module.

Registering a name twice raises, and asking for an unknown name raises an error that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from torch import Tensor, nn

from autoseg.errors import ConfigError

__all__ = [
    "Registry",
    "BlockType",
    "LayerOps",
    "ConvNormAct",
    "BasicResidualBlock",
    "register_norm",
    "get_norm",
    "list_norms",
    "register_nonlin",
    "get_nonlin",
    "list_nonlins",
    "register_block",
    "get_block",
    "list_blocks",
]

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object. Duplicate names raise; unknown names raise :class:`ConfigError` listing the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ConfigError(f"{self.kind} {name!r} is already registered; choose another name")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries))
            raise ConfigError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)


NormFactory = Callable[[int, int], nn.Module]
NonlinFactory = Callable[[], nn.Module]

_NORMS: Registry[NormFactory] = Registry("norm")
_NONLINS: Registry[NonlinFactory] = Registry("nonlinearity")


def register_norm(name: str, factory: NormFactory) -> NormFactory:
    """Register ``factory(ndim, channels) -> nn.Module`` under ``name``."""
    return _NORMS.register(name, factory)


def get_norm(name: str) -> NormFactory:
    return _NORMS.get(name)


def list_norms() -> list[str]:
    return _NORMS.names()


def register_nonlin(name: str, factory: NonlinFactory) -> NonlinFactory:
    """Register ``factory() -> nn.Module`` under ``name``. An ``inplace`` attribute marks in-place modules."""
    return _NONLINS.register(name, factory)


def get_nonlin(name: str) -> NonlinFactory:
    return _NONLINS.get(name)


def list_nonlins() -> list[str]:
    return _NONLINS.names()


def _instance_norm(ndim: int, channels: int) -> nn.Module:
    cls = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[ndim]
    return cls(channels, eps=1e-5, affine=True)


def _batch_norm(ndim: int, channels: int) -> nn.Module:
    cls = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[ndim]
    return cls(channels, eps=1e-5)


register_norm("instance", _instance_norm)
register_norm("batch", _batch_norm)
register_nonlin("leaky_relu", lambda: nn.LeakyReLU(negative_slope=1e-2, inplace=True))
register_nonlin("relu", lambda: nn.ReLU(inplace=True))
register_nonlin("gelu", lambda: nn.GELU())


@dataclass(frozen=True)
class LayerOps:
    """The layer choices shared by a whole network: dimension, norm and nonlinearity names, conv bias."""

    ndim: int
    norm: str = "instance"
    nonlin: str = "leaky_relu"
    conv_bias: bool = True

    def conv(
        self,
        c_in: int,
        c_out: int,
        kernel: Sequence[int],
        stride: Sequence[int],
        bias: bool | None = None,
        *,
        dilation: Sequence[int] | None = None,
        groups: int = 1,
    ) -> nn.Module:
        """Convolution with 'same' padding (``dilation * (k - 1) // 2``)."""
        cls: Callable[..., nn.Module] = {2: nn.Conv2d, 3: nn.Conv3d}[self.ndim]
        dilation = tuple(dilation) if dilation is not None else (1,) * self.ndim
        padding = [d * (k - 1) // 2 for k, d in zip(kernel, dilation)]
        bias = self.conv_bias if bias is None else bias
        kw: dict[str, Any] = {"dilation": dilation} if any(d != 1 for d in dilation) else {}
        if groups != 1:
            kw["groups"] = groups
        return cls(c_in, c_out, tuple(kernel), tuple(stride), padding=tuple(padding), bias=bias, **kw)

    def transposed_conv(self, c_in: int, c_out: int, stride: Sequence[int]) -> nn.Module:
        """Upsampling by ``stride`` with kernel size = stride."""
        cls: Callable[..., nn.Module] = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[self.ndim]
        return cls(c_in, c_out, tuple(stride), tuple(stride), bias=self.conv_bias)

    def norm_layer(self, channels: int) -> nn.Module:
        return get_norm(self.norm)(self.ndim, channels)

    def nonlin_layer(self) -> nn.Module:
        return get_nonlin(self.nonlin)()


class ConvNormAct(nn.Module):
    """Convolution -> norm -> nonlinearity (the nonlinearity is skipped when ``act=False``)."""

    def __init__(
        self, ops: LayerOps, c_in: int, c_out: int, kernel: Sequence[int], stride: Sequence[int], act: bool = True
    ) -> None:
        super().__init__()
        self.conv = ops.conv(c_in, c_out, kernel, stride)
        self.norm = ops.norm_layer(c_out)
        self.act = ops.nonlin_layer() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class BasicResidualBlock(nn.Module):
    """Two convolutions plus a skip: ``act(norm(conv2(act(norm(conv1(x))))) + skip(x))``.

    The stride sits in the first convolution. When the shape changes, the skip average-pools by the stride and
    projects with a bias-free 1x1 convolution + norm when the channel count changes (ResNet-D, as nnU-Net's
    residual encoders).
    """

    def __init__(self, ops: LayerOps, c_in: int, c_out: int, kernel: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(ops, c_in, c_out, kernel, stride)
        self.conv2 = ConvNormAct(ops, c_out, c_out, kernel, [1] * ops.ndim, act=False)
        skip: list[nn.Module] = []
        if any(s != 1 for s in stride):
            pool: Callable[..., nn.Module] = {2: nn.AvgPool2d, 3: nn.AvgPool3d}[ops.ndim]
            skip.append(pool(tuple(stride), tuple(stride)))
        if c_in != c_out:
            skip += [ops.conv(c_in, c_out, [1] * ops.ndim, [1] * ops.ndim, bias=False), ops.norm_layer(c_out)]
        self.skip = nn.Sequential(*skip) if skip else nn.Identity()
        self.act = ops.nonlin_layer()

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        out += self.skip(x)
        return self.act(out)


StageBuilder = Callable[[LayerOps, int, int, Sequence[int], Sequence[int], int], nn.Module]
#: ``gate(ops, c_skip, c_gate) -> module``; the module's ``forward(skip, gate)`` returns the gated skip.
GateBuilder = Callable[[LayerOps, int, int], nn.Module]
#: ``bottleneck(ops, channels, kernel, token_grid) -> module`` applied to the last encoder stage's output.
BottleneckBuilder = Callable[[LayerOps, int, Sequence[int], Sequence[int] | None], nn.Module]


@dataclass(frozen=True)
class BlockType:
    """An architecture family: how encoder stages are built, plus optional skip gates and bottleneck.

    ``build_stage(ops, c_in, c_out, kernel, stride, n)`` returns one stage whose first layer applies ``stride``.
    ``stem``: a single conv-norm-nonlinearity (input channels -> first stage's features, stride 1) runs before the
    first stage. ``skip_gate`` gates every skip connection with the upsampled decoder features; ``bottleneck`` runs
    after the last encoder stage. ``encoder_blocks`` / ``decoder_convs``: the planner's default blocks per encoder
    stage (None: two) and convolutions per decoder stage. ``needs_tokens``: the bottleneck needs the plan's token
    grid (the bottleneck feature-map size), e.g. for a positional encoding.
    """

    build_stage: StageBuilder
    stem: bool = False
    skip_gate: GateBuilder | None = None
    bottleneck: BottleneckBuilder | None = None
    encoder_blocks: tuple[int, ...] | None = None
    decoder_convs: int = 2
    needs_tokens: bool = False


_BLOCKS: Registry[BlockType] = Registry("block")


def register_block(name: str, block: BlockType) -> BlockType:
    """Register an encoder block type under ``name`` (the plan's ``network.block``)."""
    return _BLOCKS.register(name, block)


def get_block(name: str) -> BlockType:
    return _BLOCKS.get(name)


def list_blocks() -> list[str]:
    return _BLOCKS.names()


def _plain_stage(ops: LayerOps, c_in: int, c_out: int, kernel: Sequence[int], stride: Sequence[int], n: int):
    ones = [1] * ops.ndim
    layers = [ConvNormAct(ops, c_in if i == 0 else c_out, c_out, kernel, stride if i == 0 else ones) for i in range(n)]
    return nn.Sequential(*layers)


def _residual_stage(ops: LayerOps, c_in: int, c_out: int, kernel: Sequence[int], stride: Sequence[int], n: int):
    ones = [1] * ops.ndim
    blocks = [
        BasicResidualBlock(ops, c_in if i == 0 else c_out, c_out, kernel, stride if i == 0 else ones) for i in range(n)
    ]
    return nn.Sequential(*blocks)


register_block("plain", BlockType(build_stage=_plain_stage))
#: Encoder blocks per stage of a residual U-Net (nnU-Net's ResEnc presets); plain U-Nets use two convolutions.
RESIDUAL_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6)

register_block(
    "residual",
    BlockType(build_stage=_residual_stage, stem=True, encoder_blocks=RESIDUAL_BLOCKS, decoder_convs=1),
)
