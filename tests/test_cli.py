import subprocess
import sys

import pytest

from bloodcell.cli import build_parser, main

COMMANDS = [[], ["data"], ["data", "prepare"], ["data", "list"], ["data", "info"], ["data", "audit"], ["models"],
            ["train"], ["evaluate"], ["predict"], ["explain"], ["errors"], ["review"], ["benchmark"],
            ["benchmark", "paper-table3"], ["benchmark", "compare"]]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: {' '.join(['bloodcell', *cmd])}" in " ".join(out.split())
    if cmd == ["train"]:
        for opt in ("--model", "--data", "--size", "--epochs", "--batch-size", "--seed", "--out", "--resume",
                    "--schedule", "--augment", "--recipe", "--device", "--precision"):
            assert opt in out
    if cmd and cmd[0] in ("train", "evaluate", "predict", "explain", "errors", "review") or cmd[1:] == ["compare"]:
        assert "--device {auto,cpu,cuda,mps}" in out


def test_help_imports_no_torch():
    code = ("import sys; from bloodcell.cli import build_parser; p = build_parser(); p.format_help(); "
            "print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "False"


def test_choice_lists_have_one_source():
    from bloodcell import choices
    from bloodcell.training.config import TrainConfig

    actions = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    for dest, values in (("schedule", choices.SCHEDULES), ("augment", choices.AUGMENTS),
                         ("precision", choices.PRECISIONS), ("device", choices.DEVICES),
                         ("optimizer", choices.OPTIMIZERS), ("size", choices.SIZES), ("recipe", choices.RECIPES)):
        assert tuple(actions[dest].choices) == tuple(values), dest
    with pytest.raises(Exception, match="precision 'fp8'"):
        TrainConfig(precision="fp8").validate()


def test_user_errors_are_one_line_without_traceback(tmp_path):
    cases = [
        ["train", "--model", "nope", "--data", "x"],
        ["data", "prepare", "--source", str(tmp_path / "missing")],
        ["evaluate", str(tmp_path)],
        ["data", "prepare", "--npz", str(tmp_path / "none.npz")],
    ]
    for args in cases:
        p = subprocess.run([sys.executable, "-m", "bloodcell", *args], capture_output=True, text=True)
        assert p.returncode == 2, (args, p.stderr)
        assert "Traceback" not in p.stderr
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("bloodcell: error:"), p.stderr


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "se-cnn" in out and "466,632" in out and "8,778,952" in out
    assert main(["models", "--json"]) == 0
    import json

    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["se-cnn"]["params_keras"] == 466_632


def test_data_commands(image_tree, tmp_path, capsys):
    assert main(["data", "prepare", "--source", str(image_tree), "--size", "28", "--crop", "80"]) == 0
    assert "dataset 'cells' at 28px prepared" in capsys.readouterr().out
    assert main(["data", "prepare", "--source", str(image_tree), "--size", "28", "--crop", "80"]) == 0
    assert "reused" in capsys.readouterr().out
    assert main(["data", "list"]) == 0
    assert "cells" in capsys.readouterr().out
    out = tmp_path / "info"
    assert main(["data", "info", "--data", "cells", "--size", "28", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "alpha" in text and "train" in text
    assert (out / "counts.md").read_text().startswith("# cells")
    assert (out / "class_distribution.png").stat().st_size > 1000 and (out / "samples.png").stat().st_size > 1000
