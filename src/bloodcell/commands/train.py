"""``bloodcell train``: a registered model into a run folder, with the recommended recipe or the paper's."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bloodcell.choices import AUGMENTS, BALANCES, MIX_ALPHA, MIXES, OPTIMIZERS, RECIPE_SETTINGS, RECIPES, SCHEDULES
from bloodcell.commands.common import (
    add_checkpoint_arg,
    add_data_args,
    add_device_arg,
    add_precision_arg,
    add_threads_arg,
    fraction,
    fraction_below_one,
    non_negative_float,
    non_negative_int,
    parse_model_args,
    positive_float,
    positive_int,
    unit_interval,
)
from bloodcell.errors import BloodcellError

# Options whose default comes from --recipe (None on the command line = "the recipe's value").
RECIPE_OPTIONS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule", "augment",
                  "label_smoothing", "balance", "bn_momentum", "bn_recalibrate", "warmup_epochs", "ema", "mix",
                  "mix_alpha", "color_jitter", "scale_jitter")


def launch_processes(a: argparse.Namespace) -> int:
    """``--nproc N``: the same command under torchrun (one process per rank), minus ``--nproc``."""
    import subprocess

    argv, skip = [], False
    for x in a._argv:
        if skip:
            skip = False
        elif x == "--nproc":
            skip = True
        elif not x.startswith("--nproc="):
            argv.append(x)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
           "-m", "bloodcell", *argv]
    return subprocess.run(cmd).returncode


def cmd_train(a: argparse.Namespace) -> int:
    import os

    if a.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from bloodcell.machine import resolve_device

        if a.sync_bn and resolve_device(a.device).type != "cuda":  # say so before starting the processes
            raise BloodcellError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel); "
                                 "without it each process keeps its own BatchNorm statistics")
        return launch_processes(a)
    given = recipe_options_given(a)
    if a.config:
        cfg = config_with_options(a, given)
        out = Path(a.out) if a.out else Path("runs") / f"{cfg.model}_{Path(cfg.data).stem}{cfg.size}_seed{cfg.seed}"
        return _train_and_report(a, cfg, out, None)
    if a.resume:
        if not a.out:
            raise BloodcellError("--resume needs --out RUN_DIR (the run to continue)")
        extend = given.pop("epochs", None)
        _check_resume_options(Path(a.out), {**given, **_start_options(a)})
    cfg = options_config(a, {} if a.resume else given)
    data_tag = Path(a.data).stem if a.data.endswith(".npz") else a.data
    out = Path(a.out) if a.out else Path("runs") / f"{a.model}_{data_tag}{a.size}_seed{a.seed}"
    return _train_and_report(a, cfg, out, extend if a.resume else None)


def recipe_options_given(a: argparse.Namespace) -> dict:
    """The recipe options given on the command line (the others come from --recipe)."""
    given = {k: getattr(a, k) for k in RECIPE_OPTIONS if getattr(a, k) is not None}
    return {**given, "normalize": True} if a.normalize else given


def options_config(a: argparse.Namespace, given: dict):
    """The TrainConfig of a new run from its options: --recipe's settings with ``given`` on top."""
    from bloodcell.training import preset_config

    return preset_config(
        a.recipe, model=a.model, model_args=parse_model_args(a.model_arg), data=a.data, size=a.size,
        data_dir=a.data_dir, seed=a.seed, train_limit=a.train_limit, threads=a.threads, precision=a.precision,
        device=a.device, sync_bn=a.sync_bn, pretrained=a.pretrained, init_from=a.init_from,
        **_distill_options(a), **given)


# Options with their own defaults that --config's file may set; given on the command line, they win over it.
CONFIG_OPTIONS = {"model": "--model", "data": "--data", "size": "--size", "data_dir": "--data-dir", "seed": "--seed",
                  "train_limit": "--train-limit", "threads": "--threads", "precision": "--precision",
                  "device": "--device", "sync_bn": "--sync-bn", "pretrained": "--pretrained",
                  "init_from": "--init-from", "teacher": "--teacher", "distill_alpha": "--distill-alpha",
                  "distill_temperature": "--distill-temperature"}


def _distill_options(a: argparse.Namespace) -> dict:
    """--teacher and the distillation settings given (the others keep TrainConfig's defaults)."""
    out = {k: getattr(a, k) for k in ("teacher", "distill_alpha", "distill_temperature") if getattr(a, k) is not None}
    if "teacher" not in out and out and not a.config:
        raise BloodcellError(f"--{next(iter(out)).replace('_', '-')} sets how a teacher is distilled: give --teacher "
                             "RUN|ENSEMBLE as well")
    return out


def _start_options(a: argparse.Namespace) -> dict:
    """--pretrained / --init-from as given: with --resume they must match the run's (it does not start again)."""
    return {**({"pretrained": True} if a.pretrained else {}),
            **({"init_from": a.init_from} if a.init_from is not None else {}), **_distill_options(a)}


def given_on_command_line(argv: list[str], option: str) -> bool:
    return any(x == option or x.startswith(option + "=") for x in argv)  # the train parser allows no abbreviations


def config_with_options(a: argparse.Namespace, given: dict):
    """``--config FILE`` (a run's or a sweep's config.json) with the options given on the command line on top."""
    import dataclasses

    from bloodcell.training import TrainConfig

    if a.resume:
        raise BloodcellError("--config starts a new run from a saved config; --resume continues a run with its own")
    if given_on_command_line(getattr(a, "_argv", []), "--recipe"):
        raise BloodcellError("--config already holds every setting; --recipe would be ignored, so give one of them")
    base = TrainConfig.load(a.config)
    argv = getattr(a, "_argv", [])
    fields = {k: getattr(a, k) for k, opt in CONFIG_OPTIONS.items() if given_on_command_line(argv, opt)}
    if a.model_arg:
        fields["model_args"] = {**base.model_args, **parse_model_args(a.model_arg)}
    return dataclasses.replace(base, **fields, **given).validate("--config")


def _train_and_report(a: argparse.Namespace, cfg, out: Path, extend: int | None) -> int:
    import os

    from bloodcell.training import train

    try:
        summary = train(cfg, out, resume=a.resume, progress=sys.stderr.isatty(), extend_to=extend)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last finished epoch is saved in {out}; continue with "
              f"'bloodcell train --resume --out {out}'", file=sys.stderr)
        return 130
    if not summary:  # a rank other than 0 of a multi-process run: rank 0 reports
        return 0
    print(f"trained {summary['epochs']} epochs in {summary['total_seconds']:.0f}s on {summary['device']} "
          f"(first epoch {summary['first_epoch_seconds']:.1f}s); best val_acc {summary['best_val_acc']:.4f} "
          f"at epoch {summary['best_epoch']}")
    print(f"run folder: {out}")
    if a.evaluate and os.environ.get("RANK", "0") == "0":  # evaluation runs once, in rank 0
        from bloodcell.commands.evaluate import cmd_evaluate

        return cmd_evaluate(argparse.Namespace(run_dir=str(out), split="test", checkpoint=a.checkpoint, json=False,
                                               speed=False, device=a.device))
    return 0


def _check_resume_options(out: Path, given: dict) -> None:
    """A resumed run keeps its saved settings: an option that would change one is refused, not ignored."""
    from bloodcell.training import TrainConfig

    if not (out / "config.json").is_file():
        return  # train() says there is no run to resume
    saved = TrainConfig.load(out / "config.json").to_dict()
    for key, value in given.items():
        if saved.get(key) != value:
            raise BloodcellError(f"--resume continues {out} with its saved settings: --{key.replace('_', '-')} "
                                 f"{value} differs from the run's {saved.get(key)}")


def _recipe_default(key: str) -> str:
    rec, paper = RECIPE_SETTINGS["recommended"][key], RECIPE_SETTINGS["paper"][key]
    show = {None: "the paper's per model"}
    text = f"default: {show.get(rec, rec)}"
    return text + (f"; with --recipe paper: {show.get(paper, paper)}" if paper != rec else "")


def add_recipe_option_args(tr: argparse.ArgumentParser) -> None:
    """The options issue 32 measures by ablation (benchmarks/recipe_ablation.py); all off unless given."""
    tr.add_argument("--warmup-epochs", type=non_negative_float, default=None, metavar="N",
                    help="linear warm-up of the learning rate over the first N epochs (may be fractional), set per "
                         "step, not per epoch; the schedule's factor multiplies it, so after N epochs the schedule "
                         f"alone sets the rate ({_recipe_default('warmup_epochs')})")
    tr.add_argument("--ema", type=fraction_below_one, default=None, metavar="DECAY",
                    help="keep an exponential moving average of the weights and BatchNorm statistics, updated after "
                         "every step with this decay (e.g. 0.999); validation, best/last weights and so every later "
                         f"command use the average; 0 = off ({_recipe_default('ema')})")
    tr.add_argument("--mix", choices=MIXES, default=None,
                    help="mix each training image with another of its batch: 'mixup' blends the two, 'cutmix' "
                         "pastes a box of the other; the loss takes soft targets (class weights and label smoothing "
                         f"still apply); train_acc counts the image's own label ({_recipe_default('mix')})")
    tr.add_argument("--mix-alpha", type=positive_float, default=None, metavar="A",
                    help="the mixing weight is drawn per image from Beta(A, A) (default: "
                         + ", ".join(f"{k} {v:g}" for k, v in MIX_ALPHA.items()) + ")")
    tr.add_argument("--color-jitter", type=fraction, default=None, metavar="S",
                    help="colour/stain jitter of strength S in [0, 1] per training image: brightness, contrast and "
                         "saturation factors in 1 +- 0.4 S and a hue turn of up to +-0.1 S, drawn per image "
                         f"({_recipe_default('color_jitter')})")
    tr.add_argument("--scale-jitter", type=fraction_below_one, default=None, metavar="S",
                    help="random zoom of each training image by a factor in [1-S, 1+S] about its centre "
                         "(reflection padding when zoomed out); with --color-jitter applied after the flips of "
                         f"--augment, to training batches only ({_recipe_default('scale_jitter')})")


def add_commands(sub) -> None:
    tr = sub.add_parser(
        "train", help="train a model into a run folder", allow_abbrev=False,  # --config tells given options
        description="Train a registered model. The run folder gets config.json (every setting, so the run can be "
        "repeated), history.csv, best and last weights (safetensors with metadata), state.pt for --resume, and "
        "metrics.json. The defaults are the recommended recipe (Adam 1e-3, batch 64, cosine schedule, dihedral "
        "augmentation, 20 epochs); --recipe paper gives the paper's settings, and any option given overrides "
        "the recipe. The run folder is locked while training: a second start on it is refused.")
    tr.add_argument("--config", metavar="FILE", default=None,
                    help="start from a saved config.json (a run's, or best_config.json of 'bloodcell tune'); "
                         "options given as well override its values")
    tr.add_argument("--model", default="se-cnn", help="registered model name, see 'bloodcell models' "
                    "(default: %(default)s)")
    tr.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                    help="override an argument of the model's builder, e.g. dropout=0.3 (repeatable; which "
                         "arguments a model takes is in its module under bloodcell/models)")
    tr.add_argument("--pretrained", action="store_true",
                    help="start from the library's ImageNet weights (torchvision/timm models, see 'bloodcell "
                         "models'; downloaded once into TORCH_HOME / HF_HOME, or put there by hand offline)")
    tr.add_argument("--init-from", metavar="RUN|FILE", default=None,
                    help="fine-tune: start from a run folder's best weights or a .safetensors (or .pt/.pth state "
                         "dict) file; only tensors whose names and shapes match are loaded, the rest (e.g. the head "
                         "for another class count) are reported in the log and metrics.json")
    tr.add_argument("--teacher", metavar="RUN|ENSEMBLE", default=None,
                    help="knowledge distillation: also learn the softened predictions of this run's best weights or "
                         "this ensemble folder on each (augmented) batch; its classes, size and preprocessing must "
                         "be the student's. See docs/ensembles.md")
    tr.add_argument("--distill-alpha", type=fraction, default=None, metavar="A",
                    help="with --teacher: loss = (1-A) * cross-entropy + A * T^2 * KL(teacher || student) "
                         "(default: 0.5)")
    tr.add_argument("--distill-temperature", type=positive_float, default=None, metavar="T",
                    help="with --teacher: both sides' logits are divided by T before the softmax (default: 4)")
    add_data_args(tr)
    tr.add_argument("--recipe", choices=RECIPES, default="recommended",
                    help="base settings: 'recommended', or 'paper' (Adam, or SGD for Inception/ResNet, the "
                         "paper's compounding schedule, no augmentation) (default: %(default)s)")
    tr.add_argument("--epochs", type=positive_int, default=None,
                    help=f"epochs ({_recipe_default('epochs')}; with --resume: more than the run's own extends it)")
    tr.add_argument("--batch-size", type=positive_int, default=None,
                    help=f"batch size ({_recipe_default('batch_size')})")
    tr.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and augmentation "
                    "(default: %(default)s)")
    tr.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help=f"optimizer ({_recipe_default('optimizer')}"
                    ": Adam, or plain SGD for Inception and ResNet)")
    tr.add_argument("--lr", type=positive_float, default=None, help=f"base learning rate ({_recipe_default('lr')})")
    tr.add_argument("--momentum", type=non_negative_float, default=None,
                    help=f"SGD momentum ({_recipe_default('momentum')})")
    tr.add_argument("--weight-decay", type=non_negative_float, default=None,
                    help=f"weight decay ({_recipe_default('weight_decay')})")
    tr.add_argument("--schedule", choices=SCHEDULES, default=None,
                    help="learning-rate schedule per epoch: 'paper' = the compounding decay the paper's code ran, "
                    "lr*exp(-0.05 e(e+1)); 'exp' = the intended lr*exp(-0.1 e); 'cosine' = half cosine to 0; "
                    f"'constant' ({_recipe_default('schedule')})")
    tr.add_argument("--augment", choices=AUGMENTS, default=None,
                    help="batch augmentation: random flips, or all 8 flips/90-degree turns "
                         f"({_recipe_default('augment')})")
    tr.add_argument("--balance", choices=BALANCES, default=None,
                    help="class balancing of the training split: oversample minority classes to the majority count "
                    "by augmentation (flips, rotation, shift, zoom, drawn from all their images) or SMOTE, or "
                    f"weigh the loss by inverse class frequency ({_recipe_default('balance')})")
    tr.add_argument("--normalize", action="store_true",
                    help="standardise by the training set's channel mean/std (default: only divide by 255)")
    tr.add_argument("--label-smoothing", type=non_negative_float, default=None,
                    help=f"label smoothing, below 1 ({_recipe_default('label_smoothing')})")
    add_recipe_option_args(tr)
    tr.add_argument("--bn-momentum", type=unit_interval, default=None,
                    help="every BatchNorm's running-statistics momentum, PyTorch's convention (default: the "
                         "model's own, Keras' 0.01 for the paper's models); a model argument of the same name takes "
                         "precedence")
    tr.add_argument("--bn-recalibrate", type=non_negative_int, default=None, metavar="N",
                    help="before each validation, recompute every BatchNorm's statistics on N training images, so "
                         "validation and the saved weights use the statistics of the current weights, right from "
                         f"the first epoch; 0 = off, the lagging running average ({_recipe_default('bn_recalibrate')})")
    tr.add_argument("--train-limit", type=positive_int, default=None,
                    help="train on a stratified subset of this many images (for quick checks)")
    add_threads_arg(tr)
    add_precision_arg(tr)
    add_device_arg(tr)
    tr.add_argument("--nproc", type=positive_int, default=1,
                    help="data-parallel processes (DistributedDataParallel: gloo on CPU, NCCL on CUDA), launched "
                         "with torchrun; same as 'torchrun --nproc-per-node N -m bloodcell train ...' "
                         "(default: %(default)s)")
    tr.add_argument("--sync-bn", action="store_true",
                    help="with several processes: BatchNorm statistics over all of them (CUDA only; default: each "
                         "process keeps its own)")
    tr.add_argument("--out", help="run folder (default: runs/MODEL_DATASIZE_seedSEED)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out where it stopped: after its last epoch, or inside an epoch "
                         "from the state saved every 5 min (its saved config is used)")
    tr.add_argument("--evaluate", action="store_true", help="evaluate on the test split when training ends")
    add_checkpoint_arg(tr, "evaluate with --evaluate")
    tr.set_defaults(func=cmd_train)
