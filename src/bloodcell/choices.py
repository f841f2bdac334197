"""Every choice list the CLI offers, in one torch-free module, so ``--help`` stays fast and lists cannot drift.

The training config, the device code and the CLI all read these tuples; nothing else spells them out.
"""

from __future__ import annotations

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)  # the MedMNIST(+) sizes
CHECKPOINTS = ("best", "last")
SCHEDULES = ("paper", "exp", "cosine", "constant")
AUGMENTS = ("none", "flip", "dihedral")
BALANCES = ("none", "augment", "smote", "class-weight")
OPTIMIZERS = ("adam", "adamw", "sgd")
MIXES = ("none", "mixup", "cutmix")  # batch mixing of image pairs with soft targets (train --mix)
MIX_ALPHA = {"mixup": 0.2, "cutmix": 1.0}  # the Beta(alpha, alpha) of each mix when --mix-alpha is not given
PRUNERS = ("median", "hyperband", "none")  # bloodcell tune
LAYOUTS = ("npz", "shards")  # data prepare --layout: one npz in memory, or memory-mapped shards on disk
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
RECIPES = ("recommended", "paper")
VOTES = ("soft", "majority")  # bloodcell ensemble --vote

# The training recipes. ``recommended`` is what ``bloodcell train`` and ``TrainConfig()`` train (TrainConfig's
# defaults are read from it); ``paper`` is the paper's own settings (paper-facts.md: Adam 1e-3, plain SGD for
# Inception and ResNet — optimizer None means the model's paper default —, batch 64, the compounding exponential
# schedule, pixels / 255, no augmentation, the models' Keras BatchNorm momentum), used by the paper's suites.
# bn_momentum is PyTorch's (the weight of each new batch in BatchNorm's running statistics); None keeps the
# model's own (Keras 0.99 = 0.01 for the paper's models, so slow that the first epochs validate on statistics
# that are still mostly the initial ones: validation accuracy 0.14 after epoch 1 although training is fine).
# bn_recalibrate > 0 recomputes every BatchNorm's statistics on that many training images before each validation
# (training/bn_recalibrate.py), which fixes that for any momentum; PyTorch's 0.1 alone made validation jump
# between epochs and tested 0.9816 against 0.9883 for the recalibration-free Keras momentum in make demo.
# The recommended recipe is what benchmarks/recipe_ablation.py supports (results/frontier/ablation-28.md, SE-CNN
# at 28 px, 2 seeds, one change at a time): TTA at evaluation (+0.004). AdamW (weight decay 0.05) and label
# smoothing 0.1 each gained about 0.002 at 28 px, but together only +0.001 (within the seed spread) and at 64 px
# the combination tested 0.9837 +- 0.0002 over 3 seeds against 0.9860 for this recipe on seed 0
# (docs/frontier.md), so they are not in it; warm-up, mixup, cutmix, colour and scale jitter lowered accuracy and
# EMA's gain was within the spread, so those stay off in both presets.
RECIPE_SETTINGS: dict[str, dict] = {
    "recommended": dict(epochs=20, batch_size=64, optimizer="adam", lr=1e-3, momentum=0.0, weight_decay=0.0,
                        schedule="cosine", augment="dihedral", normalize=False, label_smoothing=0.0, balance="none",
                        bn_momentum=None, bn_recalibrate=2048, warmup_epochs=0, ema=0.0, mix="none",
                        mix_alpha=None, color_jitter=0.0, scale_jitter=0.0),
    "paper": dict(epochs=20, batch_size=64, optimizer=None, lr=1e-3, momentum=0.0, weight_decay=0.0,
                  schedule="paper", augment="none", normalize=False, label_smoothing=0.0, balance="none",
                  bn_momentum=None, bn_recalibrate=0, warmup_epochs=0, ema=0.0, mix="none", mix_alpha=None,
                  color_jitter=0.0, scale_jitter=0.0),
}
assert tuple(RECIPE_SETTINGS) == RECIPES

# Trust (bloodcell.trust): test-time augmentation views (the training augmentations' groups), OOD scores,
# conformal nonconformity scores, and the image corruptions of ``evaluate --corruptions``.
TTA = ("none", "flip", "dihedral")
OOD_METHODS = ("msp", "energy", "mahalanobis", "knn")
CONFORMAL_METHODS = ("lac", "aps")
CORRUPTIONS = ("gaussian_blur", "defocus_blur", "gaussian_noise", "brightness_up", "brightness_down", "contrast_up",
               "contrast_down", "hue", "saturation", "jpeg", "rotation", "zoom_in", "zoom_out")
