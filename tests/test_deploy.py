"""Export to an ONNX bundle and the torch-free runtime: parity, same answers as the run, bad bundles, int8 guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bloodcell.cli import main
from bloodcell.errors import BloodcellError
from bloodcell.inference import Classifier

REPO = Path(__file__).resolve().parents[1]
BIG = {"cnn", "inception", "resnet34", "vgg15", "se-vgg15", "cbam-vgg15", "sa-vgg15"}  # batch 2 in the export test


def export(run: Path, out: Path, *extra: str) -> int:
    return main(["export", str(run), "--out", str(out), *extra])


def one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("bloodcell: error: "), err
    return err[0]


def write_bundle_json(bundle: Path, edit) -> None:
    """Apply ``edit`` to bundle.json and re-sign it (its content digest), as a careful forger would."""
    from bloodcell.runtime.bundle import DIGEST_KEY, content_digest

    b = json.loads((bundle / "bundle.json").read_text())
    edit(b)
    b[DIGEST_KEY] = content_digest(b)
    (bundle / "bundle.json").write_text(json.dumps(b))


@pytest.fixture
def bundle(run, tmp_path) -> Path:
    out = tmp_path / "bundle"
    assert export(run, out) == 0
    return out


@pytest.fixture
def cells(image_tree, tmp_path) -> list[Path]:
    """A few synthetic JPEG/PNG cells, one unreadable file and a tiny image (which gets a warning)."""
    files = sorted(image_tree.rglob("*_00[0-3].*"))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.full((20, 30, 3), 180, np.uint8)).save(tiny)
    return [*files, bad, tiny]


# ---------------------------------------------------------------- export, parity, bundle.json, card
def test_export_writes_a_checked_bundle_with_parity_metrics_and_card(run, bundle, capsys):
    from bloodcell.data.store import load_dataset
    from bloodcell.runtime.bundle import content_digest, file_sha256

    b = json.loads((bundle / "bundle.json").read_text())
    clf = Classifier.from_run(run)
    assert b["class_names"] == clf.class_names and b["input_size"] == 28 == b["recipe"]["size"]
    assert b["recipe"]["crop"] == 200 and b["normalization"] is None and b["model"]["name"] == "se-cnn"
    assert b["model"]["params_keras"] > b["model"]["params_trainable"] > 0
    assert b["temperature"] is None and "abstention_threshold" in b and "ood" in b
    assert b["content_sha256"] == content_digest(b)
    assert b["models"]["fp32"]["sha256"] == file_sha256(bundle / "model.onnx") and "int8" not in b["models"]
    assert b["source"]["weights_sha256"] == file_sha256(run / "best.safetensors")
    p = b["parity"]["fp32"]
    assert p["data"] == "test" and p["n"] == 32 and p["top1_agreement"] == 1.0
    assert 0 <= p["max_abs_logit_diff"] <= p["tolerance"]
    # the recorded accuracy is the run's own on the test split (the same images through PyTorch)
    test = load_dataset("bloodmnist", 28)
    torch_acc = float((clf.predict_arrays(test.images["test"]).argmax(1) == test.labels["test"]).mean())
    assert b["test_metrics"]["accuracy"] == pytest.approx(torch_acc) and b["test_metrics"]["n"] == 32
    card = (bundle / "MODEL_CARD.md").read_text()
    for text in ("## Intended use", "Acevedo", "CC BY 4.0", "MedMNIST v2", "Scientific Data", "BloodMNIST-like",
                 "Most-confused class pairs", f"bloodcell export {run} --out {bundle}",
                 "bloodcell train --model se-cnn"):
        assert text in card, text
    for c in clf.class_names:
        assert f"| {c} |" in card
    assert f"{b['test_metrics']['accuracy']:.4f}" in card
    # the ONNX file takes a dynamic batch and is the model: its logits are PyTorch's for any batch size
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 3, 28, 28)
    with torch.no_grad():
        ref = clf.model(x).numpy()
    np.testing.assert_allclose(sess.run(None, {"images": x.numpy()})[0], ref, atol=1e-4)


def test_the_recorded_train_command_rebuilds_the_runs_config_whatever_the_defaults(run, bundle, monkeypatch):
    """bundle.json's train command writes every recipe setting out, so it still makes this model after the
    recommended recipe's defaults change (as they did between sessions)."""
    import shlex

    from bloodcell.choices import RECIPE_SETTINGS
    from bloodcell.cli import build_parser
    from bloodcell.commands.train import options_config, recipe_options_given
    from bloodcell.training import TrainConfig

    cmd = next(c for c in json.loads((bundle / "bundle.json").read_text())["commands"]
               if c.startswith("bloodcell train "))
    saved = TrainConfig.load(run / "config.json").to_dict()
    changed = {**RECIPE_SETTINGS["recommended"], "optimizer": "sgd", "lr": 0.05, "epochs": 7, "label_smoothing": 0.2,
               "warmup_epochs": 3}
    monkeypatch.setitem(RECIPE_SETTINGS, "recommended", changed)
    a = build_parser().parse_args(shlex.split(cmd)[1:])
    rebuilt = options_config(a, recipe_options_given(a)).to_dict()
    for key in RECIPE_SETTINGS["recommended"]:
        assert rebuilt[key] == saved[key], (key, cmd)


def test_export_takes_the_runs_calibrated_temperature_and_its_error_analysis(run, tmp_path, monkeypatch):
    real = Classifier.from_run.__func__

    def calibrated(cls, *args, **kwargs):  # as if 'bloodcell calibrate' had fitted T = 1.7 for these weights
        clf = real(cls, *args, **kwargs)
        clf.calibration, clf.temperature = object(), 1.7
        return clf

    monkeypatch.setattr(Classifier, "from_run", classmethod(calibrated))
    (run / "errors_test").mkdir()
    (run / "errors_test" / "confused_pairs.csv").write_text(
        "true,predicted,count,share_of_true,example_indices,example_paths\nig,monocyte,3,0.75,1 2 3,\n")
    out = tmp_path / "b"
    assert export(run, out) == 0
    b = json.loads((out / "bundle.json").read_text())
    assert b["temperature"] == 1.7
    from bloodcell.runtime import load

    p = load(out)
    x = np.zeros((1, 3, 28, 28), np.uint8)
    z = p.logits(x) / 1.7
    e = np.exp(z - z.max())
    np.testing.assert_allclose(p.probabilities(x), e / e.sum(), rtol=1e-5)
    card = (out / "MODEL_CARD.md").read_text()
    assert "ig taken for monocyte 3x (75.0% of ig)" in card and "temperature: 1.7" in card


def test_export_refuses_bad_targets_and_a_missing_dataset(run, tmp_path, capsys, monkeypatch):
    assert export(run, run) == 2
    assert "is the run folder itself" in one_error_line(capsys)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert export(run, other) == 2
    assert "not a bundle folder" in one_error_line(capsys)
    assert (other / "keep.txt").read_text() == "mine"
    monkeypatch.setenv("BLOODCELL_DATA_DIR", str(tmp_path / "empty"))
    assert export(run, tmp_path / "b") == 2
    assert "parity is checked on the run's test split" in one_error_line(capsys)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.tmp-*"))


def test_re_export_replaces_an_older_bundle(run, bundle):
    (bundle / "model.int8.onnx").write_bytes(b"stale")  # a file the new export does not write
    assert export(run, bundle, "--checkpoint", "last") == 0
    b = json.loads((bundle / "bundle.json").read_text())
    assert b["source"]["checkpoint"] == "last" and not (bundle / "model.int8.onnx").exists()


# ---------------------------------------------------------------- every registered model
def _models():
    from bloodcell.models import list_models

    return [s.name for s in list_models()]


@pytest.mark.parametrize("name", _models())
def test_every_registered_model_exports_with_fp32_parity(name, tmp_path):
    import onnxruntime as ort

    from bloodcell.deploy.onnx_export import export_onnx, parity
    from bloodcell.models import create_model, get_spec

    spec = get_spec(name)
    size = 64 if spec.input_sizes is None or 64 in spec.input_sizes else spec.input_sizes[0]
    torch.manual_seed(0)
    model = create_model(name, num_classes=8, input_size=size).eval()
    export_onnx(model, tmp_path / "m.onnx", size, name=name)
    x = torch.rand(2 if name in BIG else 4, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), opts, providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy()})[0]
    p = parity(ref, got)
    assert p["ok"], p


def test_an_op_without_onnx_translation_is_a_one_line_error_naming_it(tmp_path):
    from bloodcell.deploy.onnx_export import export_onnx

    class Svd(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.svdvals(x).mean(dim=2)

    with pytest.raises(BloodcellError, match=r"cannot export model 'svd' to ONNX: operator aten\._linalg_svd") as e:
        export_onnx(Svd(), tmp_path / "m.onnx", 8, name="model 'svd'")
    assert "\n" not in str(e.value) and not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------- same answers as the run
def test_the_bundle_predicts_like_the_run(run, bundle, cells):
    from bloodcell.runtime import load

    ref = Classifier.from_run(run).predict_files(cells, top_k=3)
    for workers in (1, 2):
        got = load(bundle).predict_files(cells, top_k=3, workers=workers)
        assert [r.path for r in got] == [r.path for r in ref]
        for r, g in zip(ref, got):
            assert g.error == r.error and g.warnings == r.warnings
            if r.top is None:
                assert g.top is None
                continue
            assert [c for c, _ in g.top] == [c for c, _ in r.top]
            np.testing.assert_allclose([p for _, p in g.top], [p for _, p in r.top], atol=1e-5)
    assert sum(r.error is not None for r in ref) == 1 and any(r.warnings for r in ref)


def test_predict_cli_on_a_bundle_matches_the_run_and_reports_bad_files(run, bundle, cells, capsys, tmp_path):
    assert main(["predict", str(run), *map(str, cells), "--top-k", "2"]) == 0
    torch_out = capsys.readouterr().out.splitlines()
    out = tmp_path / "p.json"
    assert main(["predict", str(bundle), *map(str, cells), "--top-k", "2", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    onnx_out = cap.out.splitlines()
    assert "classified" in cap.err and len(onnx_out) == len(torch_out) + 1  # + "wrote p.json"

    def classes(lines):
        return [ln.split("\t")[:2] for ln in lines if "\t" in ln]

    assert classes(onnx_out) == classes(torch_out)
    assert any("\tERROR: not an image file PIL can read" in ln for ln in onnx_out)
    assert json.loads(out.read_text())[0]["top"][0]["class"] == classes(torch_out)[0][1]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    assert main(["predict", str(bundle), str(bad)]) == 1  # nothing could be read
    assert "ERROR:" in capsys.readouterr().out


def test_predict_run_with_the_onnx_engine_exports_once_and_follows_the_weights(run, cells, capsys):
    assert main(["predict", str(run), *map(str, cells[:3]), "--engine", "onnx"]) == 0
    cap = capsys.readouterr()
    cache = run / ".bundle-best"
    assert "exporting" in cap.err and (cache / "bundle.json").is_file()
    stamp = (cache / "bundle.json").stat().st_mtime_ns
    assert main(["predict", str(run), *map(str, cells[:3]), "--engine", "onnx"]) == 0
    again = capsys.readouterr()
    assert again.out == cap.out and "exporting" not in again.err
    assert (cache / "bundle.json").stat().st_mtime_ns == stamp  # re-used
    from bloodcell.inference.weights import load_model, save_weights

    model, meta = load_model(run / "best.safetensors")  # new weights (as after more training): rebuilt
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_weights(run / "best.safetensors", model, meta)
    assert main(["predict", str(run), *map(str, cells[:3]), "--engine", "onnx"]) == 0
    assert "exporting" in capsys.readouterr().err
    from bloodcell.runtime.bundle import file_sha256

    assert json.loads((cache / "bundle.json").read_text())["source"]["weights_sha256"] == file_sha256(
        run / "best.safetensors")


@pytest.mark.slow
def test_pbc_originals_and_prepared_images_give_the_same_classes_through_bundle_and_run(pbc, tmp_path):
    from bloodcell.data.images import load_rgb
    from bloodcell.data.recipe import Recipe, apply_recipe
    from bloodcell.deploy import export_bundle
    from bloodcell.inference.weights import save_weights
    from bloodcell.models import create_model
    from bloodcell.runtime import load

    classes = sorted(p.name for p in pbc.iterdir() if p.is_dir())
    torch.manual_seed(0)
    model = create_model("se-cnn", num_classes=len(classes), input_size=64).eval()
    weights = tmp_path / "se-cnn-64.safetensors"
    recipe = Recipe(64, 200)
    save_weights(weights, model, {"model": "se-cnn", "model_args": {}, "class_names": classes, "input_size": 64,
                                  "recipe": recipe.to_dict(), "normalization": None})
    b = export_bundle(weights, tmp_path / "bundle", parity_data="auto", log=lambda s: None)
    assert b["parity"]["fp32"]["data"] == "random" and b["test_metrics"] is None
    originals = [f for c in classes for f in sorted((pbc / c).glob("[!.]*.jpg"))[:2]]  # no hidden ._ files
    prepared = []
    for f in originals:
        prepared.append(tmp_path / f"{f.stem}.png")
        Image.fromarray(apply_recipe(load_rgb(f), recipe)).save(prepared[-1])
    runs = Classifier.from_run(weights, device="cpu")
    bundle = load(tmp_path / "bundle")
    top = {name: [r.top[0][0] for r in p.predict_files(files)]
           for name, p, files in (("run-orig", runs, originals), ("run-prep", runs, prepared),
                                  ("bundle-orig", bundle, originals), ("bundle-prep", bundle, prepared))}
    assert top["run-orig"] == top["run-prep"] == top["bundle-orig"] == top["bundle-prep"]


# ---------------------------------------------------------------- no torch on the runtime path
def test_the_runtime_path_never_imports_torch(bundle, cells, tmp_path):
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    marker = tmp_path / "torch-was-imported"
    (fake / "torch" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\nraise ImportError('torch is blocked by this test')\n")
    env = {**os.environ, "PYTHONPATH": str(fake)}
    img = str(cells[0])
    p = subprocess.run([sys.executable, "-m", "bloodcell", "predict", str(bundle), img], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(img + "\t") and not marker.exists()
    code = ("import sys; import bloodcell.runtime as r; res = r.load(sys.argv[1]).predict_files(sys.argv[2:]); "
            "assert res[0].top and res[-1].error, res; "
            "from bloodcell.cli import main; assert main(['predict', sys.argv[1], sys.argv[2]]) == 0; "
            "std = set(sys.stdlib_module_names); "
            "print(sorted(m for m in sys.modules if '.' not in m and m not in std and not m.startswith('_')))")
    p = subprocess.run([sys.executable, "-c", code, str(bundle), img, str(cells[-2])], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "['PIL', 'bloodcell', 'numpy', 'onnxruntime']"
    assert not marker.exists()
    # the check can fail: the same interpreter importing torch trips it
    p = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert p.returncode != 0 and marker.exists()


# ---------------------------------------------------------------- bad bundles: one line each
def _drop_model(b: Path) -> None:
    (b / "model.onnx").unlink()


def _edit_classes(b: Path) -> None:
    d = json.loads((b / "bundle.json").read_text())
    d["class_names"][0], d["class_names"][1] = d["class_names"][1], d["class_names"][0]
    (b / "bundle.json").write_text(json.dumps(d))


def _swap_model(b: Path) -> None:
    (b / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)


def _resigned_garbage(b: Path) -> None:
    from bloodcell.runtime.bundle import file_sha256

    (b / "model.onnx").write_bytes(b"this is not an ONNX file at all")
    write_bundle_json(b, lambda d: d["models"]["fp32"].update(sha256=file_sha256(b / "model.onnx")))


def _not_json(b: Path) -> None:
    (b / "bundle.json").write_text("{ not json")


def _resigned_bad_size(b: Path) -> None:
    write_bundle_json(b, lambda d: d.update(input_size=0))


def _resigned_wrong_classes(b: Path) -> None:
    write_bundle_json(b, lambda d: d.update(class_names=[*d["class_names"], "extra"]))


BAD_BUNDLES = {
    "missing model file": (_drop_model, "model file missing from the bundle"),
    "edited bundle.json": (_edit_classes, "content was changed after export"),
    "model file swapped": (_swap_model, "the file changed after export"),
    "model file not ONNX": (_resigned_garbage, "not a valid ONNX model"),
    "bundle.json not JSON": (_not_json, "not valid JSON"),
    "bad input size": (_resigned_bad_size, "'input_size' must be a positive integer"),
    "classes do not match the model": (_resigned_wrong_classes, "the model has 8 outputs but bundle.json names 9"),
}


@pytest.mark.parametrize("case", list(BAD_BUNDLES))
def test_a_bad_bundle_is_a_one_line_error(bundle, cells, case, capsys):
    from bloodcell.runtime import load

    spoil, message = BAD_BUNDLES[case]
    spoil(bundle)
    with pytest.raises(BloodcellError, match=message):
        load(bundle)
    assert main(["predict", str(bundle), str(cells[0])]) == 2
    assert message in one_error_line(capsys)


def test_wrong_engine_or_precision_for_a_target_is_a_one_line_error(run, bundle, cells, capsys):
    for args, message in (([str(bundle), "--engine", "torch"], "runs with --engine onnx"),
                          ([str(bundle), "--precision", "int8"], "has no int8 model"),
                          ([str(run), "--precision", "int8"], "--precision int8 runs an exported int8 model"),
                          ([str(bundle), "--device", "cuda"], "--engine onnx runs on the CPU")):
        assert main(["predict", args[0], str(cells[0]), *args[1:]]) == 2
        assert message in one_error_line(capsys)


def test_export_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for opt in ("--out", "--checkpoint", "--int8", "--calibration-images", "--force"):
        assert opt in out


# ---------------------------------------------------------------- int8 and its accuracy guard
def test_int8_export_records_agreement_and_runs_torch_free(run, tmp_path):
    from bloodcell.runtime import load

    out = tmp_path / "b8"
    assert export(run, out, "--int8", "--calibration-images", "64", "--force") == 0
    b = json.loads((out / "bundle.json").read_text())
    q, info = b["parity"]["int8"], b["quantization"]
    assert q["n"] == 32 and 0 <= q["top1_agreement_with_fp32"] <= 1 and q["written"]
    assert info["calibration_images"] == 64 and info["calibration_split"] == "train" and info["format"] == "QDQ"
    from bloodcell.deploy import LADDER

    assert info["keep_float"] in [list(c.keep_float) for c in LADDER] and info["chosen_on"] == "validation split"
    assert info["tried"][-1]["keep_float"] == info["keep_float"] and info["tried"][-1]["val_accuracy_fp32"] > 0
    assert (out / "model.int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size / 2
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    probs = load(out, precision="int8").predict_arrays(np.zeros((2, 28, 28, 3), np.uint8))
    assert probs.shape == (2, 8) and np.allclose(probs.sum(1), 1, atol=1e-5)


def _lossy_quantize(fp32, out, calibration, normalization, config):
    """A stand-in for quantization that loses accuracy: the fp32 model with the head's bias pushed to class 7."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(fp32))
    head = [n for n in m.graph.node if n.op_type == "Gemm"][-1]
    init = {i.name: i for i in m.graph.initializer}
    bias = numpy_helper.to_array(init[head.input[2]]).copy()
    bias[7] += 1e4
    init[head.input[2]].CopyFrom(numpy_helper.from_array(bias, head.input[2]))
    onnx.save(m, str(out))
    return {**config.to_dict(), "format": "QDQ", "weights": "int8", "calibration_images": len(calibration),
            "nodes_kept_fp32": []}


def test_an_int8_model_that_loses_accuracy_is_refused_unless_forced(run, tmp_path, monkeypatch, capsys):
    import bloodcell.deploy.bundle as deploy_bundle

    monkeypatch.setattr(deploy_bundle, "quantize", _lossy_quantize)
    out = tmp_path / "b"
    assert export(run, out, "--int8", "--calibration-images", "32") == 1
    err = capsys.readouterr().err
    b = json.loads((out / "bundle.json").read_text())
    q = b["parity"]["int8"]
    assert q["accuracy"] == pytest.approx(0.125) and q["accuracy_fp32"] > 0.125 + 0.003  # always class 7 of 8
    assert not q["written"] and "int8" not in b["models"] and not (out / "model.int8.onnx").exists()
    assert [t["keep_float"] for t in b["quantization"]["tried"]] == [[], ["attention"], ["attention", "head",
                                                                                         "first-conv"]]
    assert f"loses {q['accuracy_loss_points']:.2f} points of test accuracy" in err and "--force" in err
    assert (out / "model.onnx").is_file()  # the fp32 bundle is still usable
    assert export(run, out, "--int8", "--calibration-images", "32", "--force") == 0
    b = json.loads((out / "bundle.json").read_text())
    assert b["parity"]["int8"]["forced"] and "int8" in b["models"] and (out / "model.int8.onnx").is_file()
    assert "written anyway (--force)" in capsys.readouterr().err


def test_quantization_node_groups_find_the_attention_blocks(bundle):
    import onnx

    from bloodcell.deploy.quantize import QuantConfig, node_groups

    g = node_groups(onnx.load(str(bundle / "model.onnx")))
    assert len(g["attention-mul"]) == 4 and len(g["attention-mlp"]) == 4 * 2 * 3  # 4 blocks, 2 MLPs, 3 ops
    assert set(g["attention"]) == set().union(*(g[k] for k in ("attention-pool", "attention-mlp", "attention-gate",
                                                                "attention-mul")))
    assert len(g["head"]) == 1 and g["head"][0] not in g["attention"]
    with pytest.raises(BloodcellError, match="unknown node group 'attn'"):
        QuantConfig(keep_float=("attn",))


def test_int8_keeps_the_attention_in_fp32_when_quantizing_everything_loses_on_validation(run, tmp_path, monkeypatch):
    import bloodcell.deploy.bundle as deploy_bundle
    from bloodcell.deploy.quantize import quantize

    def attention_sensitive(fp32, out, calibration, normalization, config):
        if not config.keep_float:  # as if the attention gates could not take int8
            return _lossy_quantize(fp32, out, calibration, normalization, config)
        return quantize(fp32, out, calibration, normalization, config)

    monkeypatch.setattr(deploy_bundle, "quantize", attention_sensitive)
    out = tmp_path / "b"
    assert export(run, out, "--int8", "--calibration-images", "32", "--force") == 0
    info = json.loads((out / "bundle.json").read_text())["quantization"]
    assert info["keep_float"] == ["attention"] and len(info["nodes_kept_fp32"]) == 48  # 4 blocks x 12 nodes
    assert [t["keep_float"] for t in info["tried"]] == [[], ["attention"]]
    assert info["tried"][0]["val_loss_points"] > 0.3
