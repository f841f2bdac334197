import subprocess
import sys

import pytest

from bloodcell.cli import build_parser, main

COMMANDS = [[], ["data"], ["data", "prepare"], ["data", "list"], ["data", "info"], ["models"], ["train"],
            ["evaluate"], ["predict"]]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: bloodcell" in out
    if cmd == ["train"]:
        for opt in ("--model", "--data", "--size", "--epochs", "--batch-size", "--seed", "--out", "--resume",
                    "--schedule", "--augment"):
            assert opt in out


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
