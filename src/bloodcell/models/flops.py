"""Forward FLOPs of a model, for ``bloodcell models`` and the frontier's cost axes."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, also counting the CPU's fused attention kernel (which torch leaves out): without it
    a ViT's attention products would count 0."""

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return FlopCounterMode(display=False, custom_mapping={op: cpu_sdpa} if op is not None else None)


def forward_mflops(model: nn.Module, size: int) -> float:
    """Millions of FLOPs (2 x multiply-adds) of one forward pass of one ``size`` x ``size`` image, in eval mode."""
    was_training = model.training
    model.eval()
    counter = flop_counter()
    try:
        with counter, torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        model.train(was_training)
    return round(counter.get_total_flops() / 1e6, 1)
