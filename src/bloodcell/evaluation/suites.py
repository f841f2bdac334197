"""The paper's experiments as data: which runs each suite trains, with which settings, and the paper's numbers.

A suite is a list of entries; an entry is a model with its training settings. ``bloodcell benchmark SUITE``
trains every entry for every seed into ``OUT/SUITE/ENTRY/seedN`` (an ordinary run folder) and tests the
checkpoint the paper tested: the last epoch's model (paper-facts: no early stopping, no best restore).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bloodcell.errors import BloodcellError
from bloodcell.paper import TABLE2, table2_result, table3_result

# The paper's training settings are the ``paper`` preset (training.config.PRESETS), which ``entry_config`` puts
# under every entry; an entry names only what differs from it.

# A sound alternative where a paper setting starves training: Adam and a cosine schedule, nothing else changed.
SOUND_SETTINGS = dict(optimizer="adam", schedule="cosine")

TABLE3_ORDER = ("cnn", "se-cnn", "sa-cnn", "cbam-cnn", "vgg", "se-vgg15", "sa-vgg15", "cbam-vgg15",
                "inception", "resnet34", "autoclassifier")
# Models whose paper setting is clearly harmful (plain SGD at 1e-3 under a schedule that stops after ~10 epochs).
SOUND_VARIANTS = ("resnet34", "inception")


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
    recipe: str = "paper"  # the preset under every entry (training.config.PRESETS)
    per_size: bool = False  # runs at each --size go to their own folder, SUITE-SIZE (the frontier's 28/64/128)

    def folder(self, size: int) -> str:
        return f"{self.name}-{size}" if self.per_size else self.name

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
        Entry(f"cnn-t2-{row}", dict(model=f"cnn-t2-{row}", epochs=10), table2_result(row))
        for row in range(1, len(TABLE2) + 1)
    )
    return Suite("paper-table2", "Table 2: the CNN ablations",
                 "13 CNN configurations (3/4 conv blocks, last pool or not, dense 0/128/256, BN in row 5), "
                 "10 epochs, no augmentation, Adam 1e-3 with the paper's compounding schedule, last epoch tested.",
                 entries, "Table 2 (two decimals, single run)")


def _table3() -> Suite:
    entries = [Entry(m, dict(model=m, epochs=20), table3_result(m)) for m in TABLE3_ORDER]
    entries += [
        Entry(f"{m}-sound", dict(model=m, epochs=20, **SOUND_SETTINGS), {},
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
    base = dict(model=OVERSAMPLING_MODEL, epochs=10)
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


# Past the paper (issue 32): the efficient families, trained from scratch with the recommended recipe and tested
# on the best validation checkpoint, against parameters, FLOPs, inference time and training CPU time.
FRONTIER_MODELS = ("se-cnn-slim", "se-cnn", "se-resnet-slim", "se-resnet", "mobilenetv3-small", "mobilenetv3-large",
                   "efficientnet-b0", "regnety-400mf", "resnet18", "convnext-atto", "vit-tiny")


def _frontier() -> Suite:
    from bloodcell.choices import RECIPE_SETTINGS

    epochs = RECIPE_SETTINGS["recommended"]["epochs"]
    entries = tuple(Entry(m, dict(model=m, epochs=epochs), checkpoint="best") for m in FRONTIER_MODELS)
    return Suite("frontier", "The accuracy / efficiency frontier",
                 "Efficient families trained from scratch with the recommended recipe (train's defaults), best "
                 "validation checkpoint tested, at each --size in its own folder; with the paper's models and "
                 "the published MedMNIST+ results on the same axes.",
                 entries, "Table 3 (single run, the paper's settings); MedMNIST+ best published results",
                 recipe="recommended", per_size=True)


SUITES: dict[str, Suite] = {s.name: s for s in (_table2(), _table3(), _oversampling(), _frontier())}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise BloodcellError(f"unknown suite '{name}' (known: {', '.join(SUITES)})")
    return SUITES[name]
