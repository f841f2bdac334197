"""SE-ResNet, the frontier design: within its parameter budgets, blocks start as the identity, bad shapes refused."""

import pytest
import torch

from bloodcell.errors import BloodcellError
from bloodcell.models import count_params_trainable, create_model
from bloodcell.models.se_resnet import SEBasicBlock, SEResNet


@pytest.mark.parametrize("name,budget", [("se-resnet", 500_000), ("se-resnet-slim", 100_000)])
def test_the_registered_designs_fit_the_issues_parameter_budgets(name, budget):
    # the global pool makes the count independent of the input size
    counts = {count_params_trainable(create_model(name, input_size=s)) for s in (28, 64, 128)}
    assert len(counts) == 1 and counts.pop() <= budget


def test_a_new_block_is_the_identity_on_nonnegative_input():
    torch.manual_seed(0)
    block = SEBasicBlock(16, 16).eval()
    x = torch.rand(2, 16, 8, 8)  # after a ReLU, so non-negative
    assert torch.equal(block(x), x)
    # a change of width goes through the 1x1 shortcut instead
    assert SEBasicBlock(16, 32)(x).shape == (2, 32, 8, 8)


def test_depth_adds_blocks_per_stage():
    model = SEResNet(widths=(8, 16), depths=(3, 1))
    assert [sum(isinstance(m, SEBasicBlock) for m in s) for s in model.stages] == [3, 1]


@pytest.mark.parametrize("kwargs,message", [
    (dict(widths=(8, 16), depths=(1,)), "one depth >= 1 per width"),
    (dict(widths=(8, 16), depths=(1, 0)), "one depth >= 1 per width"),
    (dict(widths=(8,) * 6, depths=(1,) * 6, input_size=28), "too small"),
    (dict(widths="16,32", depths=(1, 1)), "lists of integers"),  # --model-arg widths=16,32 without brackets
])
def test_bad_shapes_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SEResNet(**kwargs)


def test_the_registry_reports_a_bad_override_in_one_line():
    with pytest.raises(BloodcellError, match="cannot build model 'se-resnet'.*one depth"):
        create_model("se-resnet", depths=(1, 1))
