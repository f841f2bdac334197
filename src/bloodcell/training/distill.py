"""Knowledge distillation (Hinton et al. 2015): a student learns from the labels and from a fixed teacher's
softened probabilities. ``bloodcell train --teacher RUN|ENSEMBLE``; the loop only calls ``load_teacher`` once and
``distillation_loss`` per batch.

loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)); the
T^2 keeps the soft term's gradients on the scale of the hard one's as T changes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from bloodcell.data.recipe import Recipe
from bloodcell.errors import BloodcellError
from bloodcell.inference import Classifier
from bloodcell.inference.ensemble import same_normalization


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    s = F.log_softmax(student_logits.float() / temperature, -1)
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    return temperature**2 * F.kl_div(s, t, log_target=True, reduction="batchmean")


def distillation_loss(hard_loss: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                      alpha: float, temperature: float) -> torch.Tensor:
    """``hard_loss`` (the loop's cross-entropy, with its class weights and label smoothing) blended with the
    soft-target loss; alpha 0 is plain training."""
    if alpha == 0:
        return hard_loss
    return (1 - alpha) * hard_loss + alpha * soft_target_loss(student_logits, teacher_logits, temperature)


def teacher_logits(teacher: Classifier, images: torch.Tensor) -> torch.Tensor:
    """The teacher's logits of the (augmented) uint8 batch the student sees: eval mode, no gradients, fp32 even
    under the student's autocast. An ensemble's are the log of its combined probabilities."""
    teacher.model.eval()
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        return teacher.model(teacher.norm(images)).float()


def load_teacher(teacher: str | None, *, class_names: list[str], size: int, recipe: dict,
                 normalization: dict | None, device: torch.device) -> Classifier | None:
    """The teacher (a run's best weights, or an ensemble folder) through the inference core, on ``device``; its
    input must be the student's (classes, size, crop-resize recipe, normalisation) or it is refused in one line."""
    if teacher is None:
        return None
    if not Path(teacher).exists():
        raise BloodcellError(f"--teacher {teacher}: run folder, ensemble folder or weights file not found")
    with torch.random.fork_rng(devices=[]):  # building the teacher's model must not move the student's dropout RNG
        clf = Classifier.from_run(teacher, "best", device=device, calibrated=False)
    student = Recipe.from_dict(recipe, where="the training data").to_dict()
    for what, theirs, ours in (("class names", clf.class_names, class_names), ("input size", clf.input_size, size),
                               ("preprocessing recipe", clf.recipe.to_dict(), student)):
        if theirs != ours:
            raise BloodcellError(f"--teacher {teacher}: its {what} {theirs} differ from the student's {ours}; the "
                                 "teacher must see the same images and predict the same classes")
    if not same_normalization(clf.normalization, normalization):
        raise BloodcellError(f"--teacher {teacher}: its normalisation {clf.normalization} differs from the "
                             f"student's {normalization} (train the student with the teacher's --normalize setting "
                             "and training images)")
    for p in clf.model.parameters():
        p.requires_grad_(False)
    return clf


def summary(cfg) -> dict | None:
    """What metrics.json records about the distillation (None when the run had no teacher)."""
    if cfg.teacher is None:
        return None
    return {"teacher": cfg.teacher, "alpha": cfg.distill_alpha, "temperature": cfg.distill_temperature}
