"""The modern families (torchvision/timm, issue 32), ``--pretrained`` from the libraries' caches or a one-line
error offline, and ``--init-from`` a run or weights file. Every registered model is also stepped, exported and
explained by the registry-wide tests in test_zoo.py, test_deploy.py and test_explain.py."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import synthetic_arrays
from safetensors.torch import load_file, save_file

from bloodcell.data.sources import prepare_from_npz
from bloodcell.errors import BloodcellError
from bloodcell.inference.weights import load_model
from bloodcell.models import count_params_keras, create_model, get_spec
from bloodcell.models.modern import TIMM, TORCHVISION, host_reachable
from bloodcell.training import TrainConfig, loop, train
from bloodcell.training.init_from import init_from

MODERN = [*TORCHVISION, *TIMM]
CONV_STEMS = [n for n in MODERN if n != "vit-tiny"]
QUIET = dict(log=lambda s: None)


class Payload:
    """An arbitrary object: a pickle holding it needs code to load, which ``weights_only`` refuses."""


def first_output_size(model: torch.nn.Module, module: torch.nn.Module, size: int) -> int:
    """Height of ``module``'s output when ``model`` sees one ``size`` px image."""
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.shape[-2]))
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, size, size))
    handle.remove()
    return seen[0]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "bloodcell", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(p: subprocess.CompletedProcess, *fragments: str) -> None:
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bloodcell: error:"), p.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# ---------------------------------------------------------------- the architectures
@pytest.mark.parametrize("size", [28, 64, 128])
@pytest.mark.parametrize("name", MODERN)
def test_every_modern_model_builds_and_gives_logits(name, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=8, input_size=size).eval()
    with torch.no_grad():
        logits = model(torch.rand(3, 3, size, size))
    assert logits.shape == (3, 8) and torch.isfinite(logits).all()
    assert count_params_keras(model) > 0


@pytest.mark.parametrize("name", CONV_STEMS)
def test_small_input_stems_keep_the_full_resolution(name):
    """Up to 64 px the first conv runs at stride 1 with its library weight shape; at 128 the library's stem stays."""
    small, large = create_model(name, input_size=64), create_model(name, input_size=128)
    conv_s = next(m for m in small.modules() if isinstance(m, torch.nn.Conv2d))
    conv_l = next(m for m in large.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv_s.stride == (1, 1) and conv_l.stride[0] >= 2
    assert conv_s.weight.shape == conv_l.weight.shape  # library weights still fit
    assert first_output_size(small, conv_s, 64) == 64
    assert first_output_size(large, conv_l, 128) < 128


def test_resnet18_drops_its_max_pool_for_small_inputs():
    small, large = create_model("resnet18", input_size=64), create_model("resnet18", input_size=128)
    assert isinstance(small.maxpool, torch.nn.Identity) and isinstance(large.maxpool, torch.nn.MaxPool2d)
    assert first_output_size(small, small.layer1, 64) == 64  # the first stage sees the whole image
    assert first_output_size(large, large.layer1, 128) == 32


@pytest.mark.parametrize("size,patch", [(28, 4), (32, 4), (64, 8), (128, 16), (224, 16)])
def test_vit_patch_size_follows_the_input(size, patch):
    model = create_model("vit-tiny", input_size=size)
    proj = model.patch_embed.proj
    assert proj.kernel_size == (patch, patch) and proj.stride == (patch, patch)
    assert first_output_size(model, proj, size) == size // patch


def test_models_lists_the_new_families_with_counts_and_flops():
    p = run_cli("models", "--json")
    assert p.returncode == 0, p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout)}
    for name in MODERN:
        r = rows[name]
        assert r["params_keras"] == count_params_keras(create_model(name, input_size=64)) > 0
        assert r["mflops_64"] > 0 and r["pretrained"] and r["optimizer"] in ("adam", "adamw")
    assert rows["se-cnn"]["params_keras"] == 466_632 and rows["se-cnn"]["pretrained"] is None


def test_flop_counter_counts_cpu_attention():
    """torch's counter leaves the CPU's fused attention kernel out; ``bloodcell models`` counts it."""
    from bloodcell.models.flops import flop_counter

    q = torch.rand(1, 3, 64, 32)
    counter = flop_counter()
    with counter, torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * (2 * 3 * 64 * 64 * 32)  # QK^T and AV, 2 FLOPs per multiply-add


@pytest.mark.parametrize("name", ["mobilenetv3-small", "vit-tiny"])
def test_one_epoch_of_training_at_28_px(name, tiny_npz, tmp_path):
    prepare_from_npz(tiny_npz)
    out = tmp_path / name
    summary = train(TrainConfig(model=name, data="bloodmnist", size=28, epochs=1, batch_size=32, threads=1), out,
                    **QUIET)
    assert summary["epochs"] == 1 and 0 <= summary["best_val_acc"] <= 1 and summary["init_from"] is None
    model, meta = load_model(out / "best.safetensors")
    assert meta["model"] == name and meta["model_args"] == {}
    with torch.no_grad():
        assert model(torch.rand(2, 3, 28, 28)).shape == (2, 8)


# ---------------------------------------------------------------- --pretrained
@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known (test)")

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """TORCH_HOME and the Hugging Face hub cache in empty folders of the test's own."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    return tmp_path


@pytest.mark.parametrize("name,where", [("resnet18", "TORCH_HOME"), ("mobilenetv3-small", "TORCH_HOME"),
                                        ("vit-tiny", "HF_HOME"), ("convnext-atto", "HF_HOME")])
def test_pretrained_offline_is_a_one_line_error_saying_where_to_put_the_weights(name, where, empty_caches,
                                                                                no_network):
    with pytest.raises(BloodcellError) as e:
        create_model(name, input_size=64, pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg and f"model '{name}'" in msg and "could not be downloaded" in msg and where in msg
    assert str(empty_caches) in msg  # the folder the file belongs in


def test_pretrained_offline_through_the_cli(tiny_npz, tmp_path):
    if host_reachable("https://download.pytorch.org/models/"):
        pytest.skip("this machine can download the weights")
    prepare_from_npz(tiny_npz)
    p = run_cli("train", "--model", "mobilenetv3-small", "--pretrained", "--data", "bloodmnist", "--size", "28",
                "--epochs", "1", "--threads", "1", "--out", str(tmp_path / "run"),
                env={"TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(p, "mobilenetv3-small", "could not be downloaded", "TORCH_HOME")


def test_pretrained_torchvision_weights_are_loaded_before_head_and_stem_change(empty_caches, no_network):
    """A state dict the test made, put where torchvision caches it, lands in the model: all but the new head."""
    import torchvision.models as tvm

    torch.manual_seed(123)
    ref = tvm.mobilenet_v3_small().state_dict()  # the ImageNet layout: 1000 classes, stride-2 stem
    url = tvm.MobileNet_V3_Small_Weights.DEFAULT.url
    cache = empty_caches / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(ref, cache / url.rsplit("/", 1)[-1])
    torch.manual_seed(0)
    model = create_model("mobilenetv3-small", num_classes=5, input_size=64, pretrained=True)
    got = model.state_dict()
    head = {"classifier.3.weight", "classifier.3.bias"}
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in set(ref) - head)
    assert got["classifier.3.weight"].shape == (5, 1024)
    assert model.features[0][0].stride == (1, 1)  # changed after loading; the weights kept their shape


def test_pretrained_timm_weights_come_from_the_hub_cache(empty_caches, no_network):
    """timm's own loader reads the test's file from the hub cache and resamples the 16 px patch embedding to 8 px."""
    import timm

    torch.manual_seed(123)
    ref = {k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224").state_dict().items()}
    repo = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").hf_hub_id
    folder = empty_caches / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file(ref, folder / "snapshots" / commit / "model.safetensors")
    model = create_model("vit-tiny", num_classes=8, input_size=64, pretrained=True)
    got = model.state_dict()
    blocks = [k for k in ref if k.startswith("blocks.")]
    assert blocks and all(torch.equal(got[k], ref[k]) for k in blocks)
    assert got["head.weight"].shape == (8, 192) and got["patch_embed.proj.weight"].shape == (192, 3, 8, 8)
    assert got["pos_embed"].shape == (1, 1 + 64, 192)


def test_pretrained_is_refused_for_models_without_library_weights():
    with pytest.raises(BloodcellError, match="model 'se-cnn' has no pretrained weights.*resnet18"):
        create_model("se-cnn", input_size=64, pretrained=True)
    assert get_spec("se-cnn").pretrained is None and get_spec("resnet18").pretrained


def test_pretrained_is_not_a_model_arg():
    """Among model_args it would be saved with the weights, and every later load would download them again."""
    with pytest.raises(BloodcellError, match="give --pretrained .*, not --model-arg pretrained"):
        TrainConfig(model="resnet18", model_args={"pretrained": True}).validate()


# ---------------------------------------------------------------- --init-from
def test_init_from_a_run_with_another_class_count_skips_only_the_head(run):
    """The helper the loop calls: before any training step every tensor but the head equals the source's."""
    source = load_file(run / "best.safetensors")
    torch.manual_seed(1)
    cfg = TrainConfig(model="se-cnn", data="bloodmnist", size=28, init_from=str(run))
    reports = []
    model, _ = loop.build_model_and_optimizer(cfg, 3, 28, torch.device("cpu"), on_init=reports.append)
    torch.manual_seed(1)
    fresh = create_model("se-cnn", num_classes=3, input_size=28).state_dict()
    got = model.state_dict()
    head = sorted(k for k in got if got[k].shape != source[k].shape)
    assert head and all(k.startswith("head.") for k in head)
    assert reports == [{"source": str(run / "best.safetensors"), "loaded": len(got) - len(head), "skipped": head,
                        "unused": len(head)}]
    assert all(torch.equal(got[k], source[k]) for k in got if k not in head)
    assert all(torch.equal(got[k], fresh[k]) for k in head)  # the head keeps its initialisation
    assert not torch.equal(got["features.0.0.0.weight"], fresh["features.0.0.0.weight"])


def test_a_resumed_model_is_not_initialised_again(run):
    cfg = TrainConfig(model="se-cnn", data="bloodmnist", size=28, init_from=str(run))
    reports = []
    model, _ = loop.build_model_and_optimizer(cfg, 8, 28, torch.device("cpu"), fresh=False, on_init=reports.append)
    source = load_file(run / "best.safetensors")
    assert not reports and not torch.equal(model.state_dict()["features.0.0.0.weight"], source["features.0.0.0.weight"])


def test_init_from_a_bare_safetensors_file_trains_reports_and_survives_resume(tiny_npz, tmp_path):
    """A state dict without bloodcell metadata (5 classes) into an 8-class run; resume does not read it again."""
    prepare_from_npz(tiny_npz)
    torch.manual_seed(7)
    source = create_model("se-cnn", num_classes=5, input_size=28).state_dict()
    bare = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, bare)
    said = []
    out = tmp_path / "run"
    cfg = TrainConfig(model="se-cnn", data="bloodmnist", size=28, epochs=1, batch_size=32, threads=1,
                      init_from=str(bare))
    summary = train(cfg, out, log=said.append)
    head = ["head.2.bias", "head.2.weight"]
    assert summary["init_from"] == {"source": str(bare), "loaded": len(source) - 2, "skipped": head, "unused": 2}
    assert json.loads((out / "metrics.json").read_text())["training"]["init_from"] == summary["init_from"]
    assert any(s.startswith(f"initialised from {bare}: {len(source) - 2} of {len(source)} tensors loaded; "
                            "freshly initialised: head.2.bias, head.2.weight") for s in said)
    assert json.loads((out / "config.json").read_text())["init_from"] == str(bare)

    bare.unlink()  # a resumed run continues from its checkpoint: the source is not needed, nor re-applied
    summary = train(cfg, out, resume=True, extend_to=2, **QUIET)
    assert summary["epochs"] == 2 and summary["init_from"]["source"] == str(bare)


def test_init_from_a_pt_state_dict_is_read_without_unpickling(tmp_path):
    model = create_model("se-cnn", num_classes=8, input_size=28)
    good = tmp_path / "weights.pt"
    torch.save(model.state_dict(), good)
    target = create_model("se-cnn", num_classes=8, input_size=28)
    assert init_from(target, good)["skipped"] == []
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), model.state_dict().values()))
    evil = tmp_path / "evil.pt"
    torch.save({"model": model.state_dict(), "extra": Payload()}, evil)
    with pytest.raises(BloodcellError, match="without unpickling code"):
        init_from(target, evil)


def test_init_from_weights_of_another_architecture_is_an_error(run):
    with pytest.raises(BloodcellError, match="none of its .* tensors matches"):
        init_from(create_model("mobilenetv3-small", input_size=28), run)


@pytest.mark.parametrize("case", ["missing", "not-safetensors", "text-file", "empty-run-folder"])
def test_bad_init_from_is_a_one_line_cli_error(case, tiny_npz, tmp_path):
    prepare_from_npz(tiny_npz)
    paths = {"missing": tmp_path / "nope.safetensors", "not-safetensors": tmp_path / "w.safetensors",
             "text-file": tmp_path / "notes.txt", "empty-run-folder": tmp_path / "empty"}
    paths["not-safetensors"].write_bytes(b"\x00\x01 definitely not a safetensors header")
    paths["text-file"].write_text("hello\n")
    paths["empty-run-folder"].mkdir()
    source = paths[case]
    p = run_cli("train", "--model", "se-cnn", "--data", "bloodmnist", "--size", "28", "--epochs", "1",
                "--threads", "1", "--init-from", str(source), "--out", str(tmp_path / "run"))
    assert_one_line_error(p, "--init-from", str(source))


def test_pretrained_for_a_paper_model_is_a_one_line_cli_error(tiny_npz, tmp_path):
    prepare_from_npz(tiny_npz)
    p = run_cli("train", "--model", "se-cnn", "--pretrained", "--data", "bloodmnist", "--size", "28",
                "--epochs", "1", "--threads", "1", "--out", str(tmp_path / "run"))
    assert_one_line_error(p, "model 'se-cnn' has no pretrained weights")


def test_init_from_with_another_class_count_through_a_full_run(run, tmp_path):
    """A 3-class dataset fine-tuned from the 8-class run: the run's head is skipped, the rest carried over."""
    npz = tmp_path / "three.npz"
    np.savez(npz, **synthetic_arrays({"train": 4, "val": 2, "test": 2}, size=28, k=3))
    prepare_from_npz(npz)
    cfg = TrainConfig(model="se-cnn", data="three", size=28, epochs=1, batch_size=16, threads=1,
                      init_from=str(run))
    summary = train(cfg, tmp_path / "three_run", **QUIET)
    assert summary["init_from"]["skipped"] == ["head.2.bias", "head.2.weight"]
    assert summary["class_names"] == [f"class_{i}" for i in range(3)]


def test_config_types_are_checked():
    with pytest.raises(BloodcellError, match="field 'pretrained' must be bool"):
        TrainConfig(pretrained="yes").validate()
    with pytest.raises(BloodcellError, match="field 'init_from' must be str/null"):
        TrainConfig(init_from=3).validate()
    with pytest.raises(BloodcellError, match="init_from must be a run folder"):
        TrainConfig(init_from=" ").validate()
    assert TrainConfig.from_dict({**TrainConfig().to_dict(), "pretrained": True}).pretrained is True


def test_the_stem_test_can_fail():
    """Guard for the stem test: a library model with its own stride-2 stem is seen as halving the image."""
    import torchvision.models as tvm

    model = tvm.mobilenet_v3_small(num_classes=8)
    assert first_output_size(model, model.features[0][0], 64) == 32


def test_timm_missing_is_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(BloodcellError, match=r"model 'vit-tiny' needs timm: pip install 'bloodcell\[models\]'"):
        create_model("vit-tiny", input_size=64)

