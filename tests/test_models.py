import pytest
import torch

from bloodcell.errors import BloodcellError
from bloodcell.models import count_params_keras, count_params_trainable, create_model, list_models
from bloodcell.models.blocks import CBAM, ChannelAttention, SpatialAttention, SqueezeExcite

# Keras count_params() of the authors' models (../shared/reference/paper-facts.md).
PAPER_COUNTS = {"cnn": 8_778_952, "se-cnn": 466_632, "sa-cnn": 423_504, "cbam-cnn": 467_024}


@pytest.mark.parametrize("name,expected", PAPER_COUNTS.items())
def test_parameter_counts_match_the_paper(name, expected):
    model = create_model(name, input_size=64)
    assert count_params_keras(model) == expected
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert count_params_trainable(model) == expected - 2 * bn_channels


@pytest.mark.parametrize("name", ["se-cnn", "sa-cnn", "cbam-cnn"])
@pytest.mark.parametrize("size", [28, 64, 128])
def test_attention_cnns_build_at_all_sizes(name, size):
    model = create_model(name, input_size=size).eval()
    assert model(torch.rand(2, 3, size, size)).shape == (2, 8)


def test_models_take_a_training_step():
    # The CNN families only: tests/test_zoo.py takes one step with every registered model.
    for spec in [s for s in list_models() if s.family in ("cnn", "attention-cnn")]:
        model = create_model(spec.name, input_size=64).train()
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        before = [p.detach().clone() for p in model.parameters()]
        loss = torch.nn.functional.cross_entropy(model(torch.rand(4, 3, 64, 64)), torch.tensor([0, 1, 2, 7]))
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), spec.name


@pytest.mark.parametrize("block", [ChannelAttention(32), SpatialAttention(), CBAM(32), SqueezeExcite(32)])
def test_attention_blocks_keep_shape_and_are_differentiable(block):
    x = torch.rand(2, 32, 9, 7, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in block.parameters())


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
