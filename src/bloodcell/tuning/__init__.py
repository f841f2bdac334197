"""Hyper-parameter sweeps on Optuna: a search space over the training config, a study whose trials are
ordinary run folders, and a summary of what the study found."""

from bloodcell.tuning.space import DEFAULT_SPACE, apply_params, load_space, sample_params
from bloodcell.tuning.study import StudyConfig, open_study, run_study
from bloodcell.tuning.summary import summarize_study

__all__ = ["DEFAULT_SPACE", "StudyConfig", "apply_params", "load_space", "open_study", "run_study",
           "sample_params", "summarize_study"]
