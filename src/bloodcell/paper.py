"""The paper's own numbers (Gupta & van Es Ostos, Tables 2 and 3), as data, in one place.

Model modules describe architectures; suites and reports read the published results from here.
"""

from __future__ import annotations

# Table 2, rows 1..13: (conv blocks, max-pool after the last block, dense units, batch norm), then the paper's
# test accuracy and weighted F1 (two decimals, single run).
TABLE2: tuple[tuple[int, int, int, bool, float, float], ...] = (
    (3, 0, 0, False, 0.91, 0.91),
    (3, 1, 0, False, 0.91, 0.91),
    (4, 0, 0, False, 0.93, 0.93),
    (4, 1, 0, False, 0.87, 0.87),
    (4, 1, 0, True, 0.95, 0.95),
    (3, 0, 128, False, 0.92, 0.92),
    (3, 0, 256, False, 0.92, 0.92),
    (3, 1, 128, False, 0.91, 0.91),
    (3, 1, 256, False, 0.90, 0.91),
    (4, 0, 128, False, 0.93, 0.93),
    (4, 0, 256, False, 0.91, 0.91),
    (4, 1, 128, False, 0.92, 0.92),
    (4, 1, 256, False, 0.91, 0.91),
)

# Table 3 — model: accuracy, weighted F1, weighted precision, weighted recall, first-epoch seconds (Colab T4).
TABLE3: dict[str, tuple[float, float, float, float, int]] = {
    "cbam-vgg15": (0.9833, 0.9824, 0.9824, 0.9825, 45),
    "se-vgg15": (0.9828, 0.9821, 0.9822, 0.9822, 58),
    "se-cnn": (0.9792, 0.9819, 0.9819, 0.9819, 21),
    "cbam-cnn": (0.9792, 0.9786, 0.9786, 0.9787, 25),
    "sa-vgg15": (0.9784, 0.9763, 0.9763, 0.9763, 38),
    "sa-cnn": (0.9746, 0.9775, 0.9775, 0.9775, 18),
    "cnn": (0.9597, 0.9643, 0.9644, 0.9643, 67),
    "vgg": (0.9377, 0.9336, 0.9341, 0.9336, 23),
    "inception": (0.9290, 0.9293, 0.9299, 0.9293, 177),
    "resnet34": (0.8851, 0.8831, 0.8836, 0.8834, 44),
    "autoclassifier": (0.8413, 0.8519, 0.8529, 0.8515, 19),
}


def table2_result(row: int) -> dict:
    """The paper's accuracy and weighted F1 for Table 2 row ``row`` (1-based)."""
    *_, acc, f1 = TABLE2[row - 1]
    return {"accuracy": acc, "f1_weighted": f1}


def table3_result(model: str) -> dict:
    acc, f1, p, r, t = TABLE3[model]
    return {"accuracy": acc, "f1_weighted": f1, "precision_weighted": p, "recall_weighted": r,
            "first_epoch_seconds": t}


def paper_numbers(model: str) -> dict:
    """The paper's numbers for a registry model, for comparing arbitrary runs (empty when it has none)."""
    if model in TABLE3:
        return table3_result(model)
    if model.startswith("cnn-t2-"):
        return table2_result(int(model.rsplit("-", 1)[1]))
    return {}


# The best published BloodMNIST test accuracies by image size (mean, std over seeds or None, what it is), from
# paper-facts.md: MedMNIST v2 at 28 px (Google AutoML Vision), MedMNIST+ (Doerrich et al. 2024, ImageNet-pretrained,
# mean of 3 seeds) at 64, 128 and 224 px.
PUBLISHED_BEST: dict[int, tuple[float, float | None, str]] = {
    28: (0.966, None, "MedMNIST v2 best at 28 px (Google AutoML Vision)"),
    64: (0.9820, 0.0016, "MedMNIST+ best at 64 px (pretrained VGG16)"),
    128: (0.9890, None, "MedMNIST+ best at 128 px (pretrained DenseNet-121)"),
    224: (0.9902, 0.0014, "MedMNIST+ best at 224 px (pretrained DenseNet-121)"),
}
PAPER_SIZE = 64  # the paper's Table 3 was measured at 64x64
