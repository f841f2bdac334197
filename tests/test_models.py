"""The attention blocks and the registry's errors. Every registered model is built, counted and stepped in
tests/test_zoo.py."""

import pytest
import torch

from bloodcell.errors import BloodcellError
from bloodcell.models import create_model
from bloodcell.models.blocks import CBAM, ChannelAttention, SpatialAttention, SqueezeExcite


@pytest.mark.parametrize("make", [
    lambda: ChannelAttention(32), SpatialAttention, lambda: CBAM(32), lambda: SqueezeExcite(32),
])
def test_attention_blocks_keep_shape_and_are_differentiable(make):
    torch.manual_seed(0)
    block = make()
    x = torch.rand(2, 32, 9, 7, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    grads = [p.grad for p in block.parameters()]
    assert all(g is not None for g in grads)
    assert not grads or sum(g.abs().sum() for g in grads) > 0


def test_attention_parameter_counts():
    assert sum(p.numel() for p in ChannelAttention(64).parameters()) == 64 * 64 // 2  # paper's C^2/2
    assert sum(p.numel() for p in SpatialAttention().parameters()) == 98
    assert sum(p.numel() for p in SqueezeExcite(64).parameters()) == 64 * 4 + 4 + 4 * 64 + 64


def test_channel_attention_uses_separate_mlps():
    ca = ChannelAttention(16)
    assert ca.mlp_avg[0].weight.data_ptr() != ca.mlp_max[0].weight.data_ptr()


def test_unknown_model_is_a_clear_error():
    with pytest.raises(BloodcellError, match="unknown model 'nope'.*se-cnn"):
        create_model("nope")


def test_too_small_input_is_a_clear_error():
    with pytest.raises(BloodcellError, match="too small"):
        create_model("se-cnn", input_size=8)
