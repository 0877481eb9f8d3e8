"""The U-Net's blocks: what the residual shortcut is for, shown on the smallest input that needs it."""

import pytest
import torch

from axs_lib.stage1.model import BLOCKS, UNet


def _uniform(level: float) -> torch.Tensor:
    """A 32 x 32 tile whose VV and VH are ``level`` everywhere (normalised backscatter)."""
    return torch.full((1, 2, 32, 32), level)


def _relative_difference(block: str) -> float:
    dark, bright = _outputs(block)
    return float((dark - bright).abs().mean() / dark.abs().mean())


def _outputs(block: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = UNet(width=8, dropout=0.0, block=block).eval()
    with torch.no_grad():
        model.head.weight.normal_()  # a head that passes its features on (a fresh head starts near the band means)
        return model(_uniform(0.3)), model(_uniform(0.6))  # about -25 dB (calm water) and -10 dB (vegetation)


def test_groupnorm_blocks_see_a_uniform_dark_tile_and_a_uniform_bright_one_alike():
    """The first convolution has no bias and GroupNorm divides out the scale: doubling the input
    changes nothing but GroupNorm's epsilon, so water and vegetation get the same prediction."""
    assert _relative_difference("groupnorm") < 0.01  # measured 0.002


def test_residual_blocks_carry_the_backscatter_level_to_the_output():
    assert _relative_difference("residual") > 0.05  # measured 0.11


@pytest.mark.parametrize("block", BLOCKS)
def test_every_block_type_keeps_the_tile_size(block):
    model = UNet(width=4, dropout=0.0, block=block).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 2, 30, 44)).shape == (2, 4, 30, 44)


def test_an_unknown_block_type_is_refused_by_name():
    with pytest.raises(ValueError, match="block must be one of"):
        UNet(width=4, block="batchnorm")


def test_members_predict_the_mean_of_their_own_predictions_in_eval_mode():
    from axs_lib.stage1.model import UNetMembers, build_unet

    torch.manual_seed(0)
    model = build_unet(3, width=4, dropout=0.0)
    assert isinstance(model, UNetMembers) and len(model.members) == 3
    sar = torch.rand(2, 2, 24, 24)
    with torch.no_grad():
        stacked = model.train()(sar)
        each = [member.eval()(sar) for member in model.members]
        mean = model.eval()(sar)
    assert stacked.shape == (3, 2, 4, 24, 24)
    assert all(torch.equal(stacked[k], each[k]) for k in range(3))
    assert not torch.equal(each[0], each[1])  # each member has its own initial weights
    assert torch.equal(mean, (each[0] + each[1] + each[2]) / 3)


def test_one_member_is_the_plain_unet_and_zero_members_are_refused():
    from axs_lib.stage1.model import build_unet

    assert type(build_unet(1, width=4)) is UNet
    with pytest.raises(ValueError, match="members must be >= 1"):
        build_unet(0, width=4)
