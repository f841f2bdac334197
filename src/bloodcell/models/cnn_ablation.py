"""The Table 2 CNN ablations: 3 or 4 conv blocks, pooling after the last block or not, a dense layer or not, BN or not.

Every row is a ``PaperCNN`` (conv blocks 32/64/128(/256), each Conv 3x3 + bias -> [BatchNorm] -> ReLU).

How "Maxpool 0/1" is read: max-pooling 2x2 stride 2 follows every conv block except the last, and the column
says whether the *last* block is pooled too (1) or not (0). The paper gives no more detail; we chose this
reading because (a) with no pooling at all (the other literal reading), 3 blocks at 64x64 would feed
64*64*128 = 524k features into Dense 256 (134M parameters), out of line with the small models the paper
discusses, and the Table 3 CNN shows that when the authors did avoid down-sampling they did it with
stride-1 pools, not by removing them; (b) the paper's comment "Without pooling, the model retains redundant
information, leading to overfitting and slower training" fits a model with one less 2x down-sampling, whose
flattened features are 4x larger. "Dense Units" 0 means Flatten -> Dense(classes); 128/256 add
Dense(units) + ReLU in between. Row 5 (marked *) is the only one with BatchNorm.
"""

from __future__ import annotations

from bloodcell.models.cnn import PaperCNN
from bloodcell.models.registry import register_model
from bloodcell.paper import TABLE2

WIDTHS = (32, 64, 128, 256)

for _row, (_layers, _pool, _dense, _bn, *_paper_result) in enumerate(TABLE2, start=1):
    register_model(
        f"cnn-t2-{_row}", PaperCNN, "cnn-table2",
        f"Table 2 row {_row}: layers {_layers}, maxpool {_pool}, dense {_dense}{', batch norm' if _bn else ''}",
        widths=WIDTHS[:_layers], pool="stride2", pool_last=bool(_pool), hidden=_dense, batch_norm=_bn,
    )
