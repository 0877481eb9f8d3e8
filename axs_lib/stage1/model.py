"""A compact U-Net: 2 SAR channels in, 4 optical bands out, any tile size.

Three 2x down-samplings give a stride of 8; tiles whose sides are not a multiple of 8 (BigEarthNet
patches are 120 x 120) are padded by edge replication and the output is cropped back, so every
output pixel corresponds to an input pixel. GroupNorm instead of BatchNorm keeps the model
independent of batch composition at evaluation and free of running statistics.

Blocks (``block``): ``residual`` (the default) adds to each GroupNorm block a 1x1 convolution of
its input, not normalised again (`ResidualBlock`): GroupNorm removes each tile's mean from every
feature map, and with it the absolute backscatter level that tells calm water from vegetation.
In 3-fold cross-validation over the training scenes the residual U-Net was 15 % better in MAE
than a per-pixel network at the default schedule, the plain GroupNorm one (``groupnorm``, the
earlier blocks, kept so that older checkpoints load and resume) 4 % worse (benchmarks/README.md).

The output head (``head``), in both cases in the unit of the targets (reflectance normalised to
[0, 1]):

* ``linear`` (the default): the 1x1 head predicts each band *standardised* by the training
  targets' per-band mean and standard deviation, and the model returns ``head * std + mean``. The
  mean and std are buffers (``target_mean``, ``target_std``) set from the training tiles by
  `band_stats`, so a checkpoint carries them and a prediction needs nothing else. The trainer's
  loss divides errors by ``target_std`` (`axs_lib.stage1.losses.stage1_loss`), so every band
  weighs the same: measured on held-out places, a sigmoid over [0, 1] reflectance let the bright,
  high-variance NIR band (B8) take all the gradient and pinned the visible bands (B2, B3, B4) near
  their median. The head starts at small weights and zero bias, i.e. at each band's mean.
* ``sigmoid``: the earlier model, ``sigmoid(head)`` with the head's bias at ``logit(mean)`` (below).
  Kept so that checkpoints written before the linear head still load, predict and resume; their
  config has no ``head`` and counts as ``sigmoid``.

Members (``members``): the model can be K U-Nets of one configuration (`UNetMembers`), each from
its own initial weights, trained side by side on the same batches and predicting the mean of their
outputs. On places it never saw a single U-Net trained on a few dozen tiles can take a whole tile
for water or for land depending on its seed; the mean of independently started members hedges
where they disagree, as the mean of several runs does, in one run and one checkpoint. ``members``
1 is the plain `UNet` (its state dict, and every earlier checkpoint, unchanged).

Sigmoid output initialisation. With default weights the head's output is spread around sigmoid(0) = 0.5,
i.e. reflectance 5000 of 10000: far brighter than land (BigEarthNet bands average a few hundred
to a few thousand), so early sample pictures are white and early steps are spent just learning the
mean. `init_output_bias` (or ``UNet(..., output_bias=means)``) instead scales the head's weights
down by `HEAD_WEIGHT_SCALE` and sets its bias to ``logit(mean)`` per band, so the untrained model
already predicts each band's mean. The means come from `band_means`: a deterministic, cheap
estimate over a bounded, evenly spaced sample of the training tiles, summed in float64 by numpy
(single-threaded, so the bits cannot depend on the thread count). Neither draws random numbers,
so a run's other random streams are untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

IN_CHANNELS = 2
OUT_CHANNELS = 4
DEPTH = 3
STRIDE = 2**DEPTH
HEAD_WEIGHT_SCALE = 0.1  # head weights after `init_output_bias`: output starts near the mean, not pinned to it
HEADS = ("linear", "sigmoid")
MIN_STD = 1e-3  # reflectance 0.001: a band flatter than this is standardised by this instead
BAND_MEAN_TILES = 64  # tiles sampled by `band_means`: about 1 M pixels per band at 120 x 120
MEAN_CLAMP = 1e-4  # means kept in [1e-4, 1 - 1e-4] so that their logit is finite


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.GroupNorm(min(8, cout), cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.GroupNorm(min(8, cout), cout),
        nn.SiLU(),
    )


class ResidualBlock(nn.Module):
    """`_block` plus a 1x1 convolution of the block's input, summed and not normalised again.

    GroupNorm takes each tile's mean out of every feature map, so in a plain GroupNorm U-Net a
    tile that is all -25 dB (calm water) and one that is all -10 dB (vegetation) reach the head
    alike, and the model has to tell them apart from texture alone. The shortcut carries the
    absolute backscatter level past every normalisation to the head.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = _block(cin, cout)
        self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


BLOCK_TYPES = {"residual": ResidualBlock, "groupnorm": _block}
BLOCKS = tuple(BLOCK_TYPES)


class UNet(nn.Module):
    """U-Net of ``width`` base channels (doubling per level) with dropout at the bottleneck.

    ``head`` is ``linear`` (standardised output; ``target_stats`` = (means, stds) per band from
    `band_stats`) or ``sigmoid`` (``output_bias`` = per-band means, see `init_output_bias`).
    """

    def __init__(self, width: int = 16, dropout: float = 0.1, output_bias: Sequence[float] | None = None,
                 head: str = "linear", target_stats: tuple[Sequence[float], Sequence[float]] | None = None,
                 block: str = "residual"):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if block not in BLOCK_TYPES:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        self.head_kind = head
        make = BLOCK_TYPES[block]
        widths = [width * 2**i for i in range(DEPTH + 1)]
        self.down = nn.ModuleList([make(IN_CHANNELS, widths[0])] + [make(widths[i], widths[i + 1]) for i in range(DEPTH)])
        self.dropout = nn.Dropout2d(dropout)
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(DEPTH))])
        self.merge = nn.ModuleList([make(2 * widths[i], widths[i]) for i in reversed(range(DEPTH))])
        self.head = nn.Conv2d(widths[0], OUT_CHANNELS, 1)
        if head == "linear":
            # buffers, not parameters: in the state dict (so in every checkpoint), never trained
            self.register_buffer("target_mean", torch.zeros(OUT_CHANNELS))
            self.register_buffer("target_std", torch.ones(OUT_CHANNELS))
            if output_bias is not None:
                raise ValueError("output_bias is for the sigmoid head; the linear head takes target_stats")
            if target_stats is not None:
                init_standardised_output(self, *target_stats)
        elif output_bias is not None:
            init_output_bias(self, output_bias)

    def forward(self, sar: torch.Tensor) -> torch.Tensor:
        h, w = sar.shape[-2:]
        pad_h, pad_w = (-h) % STRIDE, (-w) % STRIDE
        x = F.pad(sar, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else sar
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = self.dropout(skips.pop())
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        out = self.head(x)[..., :h, :w]
        if self.head_kind == "linear":
            return out * self.target_std[:, None, None] + self.target_mean[:, None, None]
        return torch.sigmoid(out)

    @property
    def band_scale(self) -> torch.Tensor | None:
        """Per-band divisor of the loss's errors: ``target_std`` for the linear head, None for sigmoid."""
        return self.target_std if self.head_kind == "linear" else None


class UNetMembers(nn.Module):
    """``count`` U-Nets built with the same arguments, one after the other (so each draws its own
    initial weights), in ``members``.

    In training mode ``forward`` returns every member's prediction, stacked (K, N, C, H, W), for a
    loss per member (`member_predictions`); in eval mode the mean of the members' predictions,
    summed in member order, so it is as deterministic as each member.
    """

    def __init__(self, count: int, **unet_kwargs):
        super().__init__()
        if count < 2:
            raise ValueError(f"UNetMembers needs at least 2 members, got {count}; build a UNet for one")
        self.members = nn.ModuleList([UNet(**unet_kwargs) for _ in range(count)])

    @property
    def band_scale(self) -> torch.Tensor | None:
        return self.members[0].band_scale

    def forward(self, sar: torch.Tensor) -> torch.Tensor:
        if self.training:
            return torch.stack([member(sar) for member in self.members])
        return mean_prediction(self.members, sar)


def mean_prediction(models, sar: torch.Tensor) -> torch.Tensor:
    """The mean of ``models``' predictions for ``sar``, summed in the order given (float, so the
    order is part of the result: fixed, it is as deterministic as each model)."""
    total = models[0](sar)
    for model in models[1:]:
        total = total + model(sar)
    return total / len(models)


def state_difference(model: nn.Module, state: dict) -> str | None:
    """The first key that ``state`` lacks, has in excess or holds in another shape than ``model``'s
    state dict; None when every key and shape fits."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    if got == expected:
        return None
    return (sorted(set(got) ^ set(expected)) or [k for k in expected if got[k] != expected[k]])[0]


def build_unet(members: int = 1, **unet_kwargs) -> UNet | UNetMembers:
    """The Stage-1 model: a `UNet`, or `UNetMembers` of ``members`` of them (each built from ``unet_kwargs``)."""
    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    return UNet(**unet_kwargs) if members == 1 else UNetMembers(members, **unet_kwargs)


def member_modules(model: nn.Module) -> list[nn.Module]:
    """The networks trained side by side in ``model``: its members, or the model itself."""
    return list(model.members) if isinstance(model, UNetMembers) else [model]


def member_predictions(model: nn.Module, pred: torch.Tensor) -> list[torch.Tensor]:
    """The training-mode output of ``model`` as one prediction per member."""
    return list(pred.unbind(0)) if isinstance(model, UNetMembers) else [pred]


def init_standardised_output(model: UNet, means: Sequence[float], stds: Sequence[float]) -> UNet:
    """Set the linear head's target statistics and start it at the means (small weights, zero bias)."""
    means, stds = [float(m) for m in means], [float(s) for s in stds]
    if len(means) != OUT_CHANNELS or len(stds) != OUT_CHANNELS or not all(math.isfinite(v) for v in means + stds):
        raise ValueError(f"need {OUT_CHANNELS} finite band means and stds, got {means!r}, {stds!r}")
    with torch.no_grad():
        model.target_mean.copy_(torch.tensor(means, dtype=torch.float64).to(model.target_mean.dtype))
        model.target_std.copy_(torch.tensor([max(s, MIN_STD) for s in stds], dtype=torch.float64).to(model.target_std.dtype))
        model.head.weight.mul_(HEAD_WEIGHT_SCALE)
        model.head.bias.zero_()
    return model


def init_output_bias(model: UNet, means: Sequence[float]) -> UNet:
    """Make ``model`` start by predicting ``means`` (per band, normalised to [0, 1]).

    The head's bias becomes ``logit(mean)`` (the inverse of the output sigmoid) and its weights are
    scaled by `HEAD_WEIGHT_SCALE`, small but not zero so gradients still reach the layers below.
    """
    means = [float(m) for m in means]
    if len(means) != OUT_CHANNELS or not all(math.isfinite(m) for m in means):
        raise ValueError(f"need {OUT_CHANNELS} finite band means, got {means!r}")
    clamped = [min(max(m, MEAN_CLAMP), 1.0 - MEAN_CLAMP) for m in means]
    logits = torch.tensor([math.log(m / (1.0 - m)) for m in clamped], dtype=torch.float64)
    with torch.no_grad():
        model.head.weight.mul_(HEAD_WEIGHT_SCALE)
        model.head.bias.copy_(logits.to(model.head.bias.dtype))
    return model


def band_means(dataset_or_refs, max_tiles: int = BAND_MEAN_TILES) -> tuple[float, ...] | None:
    """Per-band mean of the normalised optical targets over valid pixels, or None without any (`band_stats`)."""
    stats = band_stats(dataset_or_refs, max_tiles)
    return None if stats is None else stats[0]


def band_stats(dataset_or_refs, max_tiles: int = BAND_MEAN_TILES) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Per-band (means, standard deviations) of the normalised optical targets over valid pixels, or None.

    ``dataset_or_refs`` is a `axs_lib.data.TileDataset` (its un-augmented ``dataset[i]``) or a list
    of tile refs (read as an un-augmented TileDataset). At most ``max_tiles`` tiles are read, evenly
    spaced over the given order, so the estimate costs the same at 6 tiles or 500 000. Every valid
    pixel of the sample weighs the same; sums are float64 in numpy, so the result is the same bits
    on every run and machine thread count.
    """
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    dataset = dataset_or_refs
    if isinstance(dataset_or_refs, (list, tuple)):
        from axs_lib.data import TileDataset  # the one home of normalisation and the valid-pixel mask

        dataset = TileDataset(list(dataset_or_refs), seed=0, augment=False)
    n = len(dataset)
    if n == 0:
        return None
    indices = sorted({i * n // min(n, max_tiles) for i in range(min(n, max_tiles))})
    sums = np.zeros(OUT_CHANNELS, dtype=np.float64)
    squares = np.zeros(OUT_CHANNELS, dtype=np.float64)
    count = 0
    for index in indices:
        sample = dataset[index]
        optical = sample["optical"].numpy().astype(np.float64)  # (4, H, W), 0 at invalid pixels
        valid = sample["mask"].numpy()[0] > 0  # (H, W)
        sums += optical[:, valid].sum(axis=1)
        squares += (optical[:, valid] ** 2).sum(axis=1)
        count += int(valid.sum())
    if count == 0:
        return None
    means = sums / count
    stds = np.sqrt(np.maximum(squares / count - means**2, 0.0))
    return tuple(float(m) for m in means), tuple(float(s) for s in stds)
