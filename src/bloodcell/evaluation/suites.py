"""The paper's experiments as data: which runs each suite trains, with which settings, and the paper's numbers.

A suite is a list of entries; an entry is a model with its training settings. ``bloodcell benchmark SUITE``
trains every entry for every seed into ``OUT/SUITE/ENTRY/seedN`` (an ordinary run folder) and tests the
checkpoint the paper tested: the last epoch's model (paper-facts: no early stopping, no best restore).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bloodcell.errors import BloodcellError
from bloodcell.models.cnn_ablation import TABLE2_ROWS

# What the paper's code ran (paper-facts.md): Adam 1e-3 (SGD 1e-3, momentum 0 for Inception and ResNet, which
# the registry's per-model default gives), batch 64, the compounding exponential schedule, pixels / 255, no
# augmentation, last-epoch model tested.
PAPER_SETTINGS = dict(batch_size=64, lr=1e-3, schedule="paper", augment="none", normalize=False, balance="none")

# A sound alternative where a paper setting starves training: Adam and a cosine schedule, nothing else changed.
SOUND_SETTINGS = dict(optimizer="adam", schedule="cosine")

TABLE3 = {  # model: accuracy, weighted F1, weighted precision, weighted recall, first-epoch seconds (Colab T4)
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
TABLE3_ORDER = ("cnn", "se-cnn", "sa-cnn", "cbam-cnn", "vgg", "se-vgg15", "sa-vgg15", "cbam-vgg15",
                "inception", "resnet34", "autoclassifier")
# Models whose paper setting is clearly harmful (plain SGD at 1e-3 under a schedule that stops after ~10 epochs).
SOUND_VARIANTS = ("resnet34", "inception")


def _table3_paper(model: str) -> dict:
    acc, f1, p, r, t = TABLE3[model]
    return {"accuracy": acc, "f1_weighted": f1, "precision_weighted": p, "recall_weighted": r,
            "first_epoch_seconds": t}


def _table2_paper(row: int) -> dict:
    result = TABLE2_ROWS[row - 1][4]  # e.g. "acc 0.91, F1 0.91"
    acc, f1 = (float(part.split()[1]) for part in result.split(", "))
    return {"accuracy": acc, "f1_weighted": f1}


@dataclass(frozen=True)
class Entry:
    """One row of a suite: a run folder name, its training settings and the paper's numbers for it."""

    name: str
    config: dict
    paper: dict = field(default_factory=dict)
    note: str = ""
    checkpoint: str = "last"


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    description: str
    entries: tuple[Entry, ...]
    paper_source: str

    def select(self, names: list[str] | None) -> list[Entry]:
        """The entries named (all when ``names`` is empty); unknown names are an error listing the known ones."""
        if not names:
            return list(self.entries)
        known = {e.name: e for e in self.entries}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise BloodcellError(f"suite {self.name} has no entry {', '.join(unknown)} (known: {', '.join(known)})")
        return [known[n] for n in names]


def _table2() -> Suite:
    entries = tuple(
        Entry(f"cnn-t2-{row}", dict(PAPER_SETTINGS, model=f"cnn-t2-{row}", epochs=10), _table2_paper(row))
        for row in range(1, len(TABLE2_ROWS) + 1)
    )
    return Suite("paper-table2", "Table 2: the CNN ablations",
                 "13 CNN configurations (3/4 conv blocks, last pool or not, dense 0/128/256, BN in row 5), "
                 "10 epochs, no augmentation, Adam 1e-3 with the paper's compounding schedule, last epoch tested.",
                 entries, "Table 2 (two decimals, single run)")


def _table3() -> Suite:
    entries = [Entry(m, dict(PAPER_SETTINGS, model=m, epochs=20), _table3_paper(m)) for m in TABLE3_ORDER]
    entries += [
        Entry(f"{m}-sound", dict(PAPER_SETTINGS, model=m, epochs=20, **SOUND_SETTINGS), {},
              note=f"{m} with Adam and a cosine schedule instead of the paper's plain SGD and compounding decay")
        for m in SOUND_VARIANTS
    ]
    return Suite("paper-table3", "Table 3: the architectures",
                 "The 11 models of Table 3 at the paper's settings: 20 epochs, Adam 1e-3 (plain SGD 1e-3 for "
                 "Inception and ResNet34), the compounding schedule, no augmentation, last epoch tested; plus "
                 "ResNet34 and Inception with a sound optimizer (Adam, cosine schedule).",
                 tuple(entries), "Table 3 (single run; time = first epoch on a Colab T4)")


OVERSAMPLING_MODEL = "cnn-t2-5"


def _oversampling() -> Suite:
    base = dict(PAPER_SETTINGS, model=OVERSAMPLING_MODEL, epochs=10)
    paper_cnn = "the paper's numbers are for its Table 3 CNN (stride-1 pools, 8.78M parameters)"
    entries = (
        Entry("as-is", dict(base), {"f1_weighted": 0.9643}, note=f"no balancing; {paper_cnn}, Fig. 3"),
        Entry("augment", dict(base, balance="augment"), {"f1_weighted": 0.9504},
              note=f"every class oversampled to the majority count with flips, rotation, shift and zoom; "
                   f"{paper_cnn}, Fig. 4"),
        Entry("smote", dict(base, balance="smote"), {},
              note="SMOTE (imbalanced-learn, random_state 42) to the majority count; the paper gives no number"),
        Entry("class-weight", dict(base, balance="class-weight"), {},
              note="beyond the paper: no new images, the loss weighs classes by n / (k * n_class)"),
    )
    return Suite("paper-oversampling", "Oversampling study",
                 f"The best Table 2 CNN ({OVERSAMPLING_MODEL}, row 5: 4 blocks, BN) on the training split as it is, "
                 "oversampled by augmentation, oversampled by SMOTE, and with a class-weighted loss; 10 epochs at "
                 "the paper's settings, last epoch tested.",
                 entries, "Section IV, Fig. 3 and 4 (weighted F1)")


SUITES: dict[str, Suite] = {s.name: s for s in (_table2(), _table3(), _oversampling())}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise BloodcellError(f"unknown suite '{name}' (known: {', '.join(SUITES)})")
    return SUITES[name]


def paper_numbers(model: str) -> dict:
    """The paper's numbers for a registry model, for comparing arbitrary runs (empty when it has none)."""
    if model in TABLE3:
        return _table3_paper(model)
    if model.startswith("cnn-t2-"):
        return _table2_paper(int(model.rsplit("-", 1)[1]))
    return {}
