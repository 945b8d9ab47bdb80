"""Real users' checkpoints and data: official files with no sidecar, models in memory, bad files."""

import io
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from tarflow.checkpoint import as_tarflow, infer_geometry, load_checkpoint, parse_official_name
from tarflow.data import load_images
from tarflow.errors import UserError
from tarflow.model import TarFlow, TarFlowConfig
from tarflow.sampling import make_noise, sample
from tarflow.schedule import builtin_schedule
from tarflow.settings import SamplingSettings

from .conftest import BUNDLED, one_line_error, run_cli

run = run_cli


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """The bundled weights as a user would have them: a plain name, and an official name."""
    d = tmp_path_factory.mktemp("ckpt")
    shutil.copy(BUNDLED, d / "weights.pth")
    shutil.copy(BUNDLED, d / "mnist_model_4_128_4_2_0.1.pth")
    return d


def plain_inverse(model, noise, y, w):
    """The inverse written the obvious way: for every token, the full causal forward of the block
    over the whole sequence (no K/V cache), guided on both log-scale and shift."""
    x = noise.to(model.var.dtype) * model.var.sqrt()
    for block in reversed(model.blocks):
        z = block.permute(x)
        out = z.clone()
        for t in range(1, z.shape[1]):
            a, b = block.transform_params(out, y)
            if w:
                au, bu = block.transform_params(out, None)
                a, b = a + w * (a - au), b + w * (b - bu)
            out[:, t] = z[:, t] * torch.exp(a[:, t]) + b[:, t]
        x = block.permute(out)
    return model.unpatchify(x)


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_no_flags_needed_and_same_samples_as_with_sidecar(copies, guidance):
    ref = load_checkpoint(BUNDLED, dtype=torch.float64)
    settings = SamplingSettings(guidance=guidance)
    noise = make_noise(3, ref, 5)
    y = torch.tensor([2, 7, 1])
    x_ref, _ = sample(ref, noise, builtin_schedule("sequential", ref), labels=y, settings=settings)
    for name, source in (("weights.pth", "inferred"), ("mnist_model_4_128_4_2_0.1.pth", "name")):
        m = load_checkpoint(copies / name, dtype=torch.float64)
        assert m.meta["geometry_source"] == source and m.cfg == ref.cfg
        assert m.fingerprint == ref.fingerprint
        x, _ = sample(m, noise, builtin_schedule("sequential", m), labels=y, settings=settings)
        assert torch.equal(x, x_ref)
    m = load_checkpoint(copies / "weights.pth", dtype=torch.float64)
    with torch.no_grad():
        assert (plain_inverse(m, noise, y, guidance) - x_ref).abs().max().item() <= 1e-9


def test_official_name_supplies_noise_std_and_is_checked(copies, tmp_path):
    assert load_checkpoint(copies / "mnist_model_4_128_4_2_0.1.pth").meta["noise_std"] == 0.1
    assert load_checkpoint(copies / "weights.pth").meta["noise_std"] is None
    assert parse_official_name("afhq_model_8_768_8_8_0.07.pth") == {
        "data": "afhq", "patch_size": 8, "channels": 768, "num_blocks": 8, "layers_per_block": 8, "noise_std": 0.07}
    shutil.copy(BUNDLED, tmp_path / "mnist_model_4_128_4_2_uniform.pth")
    assert load_checkpoint(tmp_path / "mnist_model_4_128_4_2_uniform.pth").meta["noise_std"] is None
    one_line_error(run("sample", "--checkpoint", tmp_path / "mnist_model_4_128_4_2_uniform.pth", "--denoise",
                       "--n", 1, "--out", tmp_path / "s"), "--denoise needs --noise-std")
    res = run("sample", "--checkpoint", tmp_path / "mnist_model_4_128_4_2_uniform.pth", "--denoise",
              "--noise-std", "0.1", "--n", 1, "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
    for bad, text in (("mnist_model_4_128_4_3_0.1.pth", "says layers_per_block=3 but the weights have 2"),
                      ("mnist_model_4_256_4_2_0.1.pth", "says channels=256"),
                      ("mnist_model_2_128_4_2_0.1.pth", "says patch_size=2, which does not fit")):
        shutil.copy(BUNDLED, tmp_path / bad)
        one_line_error(run("sample", "--checkpoint", tmp_path / bad, "--n", 1, "--out", tmp_path / "o"), text)


@pytest.mark.parametrize("C,p,img", [(3, 2, 8), (1, 4, 16), (3, 8, 256), (1, 2, 28)])
def test_geometry_is_inferred_from_the_state_dict(tmp_path, C, p, img):
    assert infer_geometry(C * p * p, (img // p) ** 2) == {"in_channels": C, "patch_size": p, "img_size": img}
    if img > 32:
        return
    m = TarFlow(TarFlowConfig(img_size=img, in_channels=C, patch_size=p, channels=32, head_dim=16,
                              num_blocks=2, layers_per_block=1, num_classes=0))
    torch.save(m.state_dict(), tmp_path / "m.pth")
    loaded = load_checkpoint(tmp_path / "m.pth", head_dim=16)
    assert loaded.cfg == m.cfg and loaded.meta["geometry_source"] == "inferred"
    one_line_error(run("schedule", "show", "sequential", "--checkpoint", tmp_path / "m.pth"),
                   "head size 64 does not divide the width 32")


def test_a_sidecar_that_disagrees_with_the_weights_is_refused(tmp_path):
    shutil.copy(BUNDLED, tmp_path / "m.pth")
    (tmp_path / "m.json").write_text('{"img_size": 28, "patch_size": 4, "in_channels": 3}')
    with pytest.raises(UserError, match="in_channels=3 with patch_size 4 does not give token size 16"):
        load_checkpoint(tmp_path / "m.pth")
    (tmp_path / "m.json").write_text('{"img_size": 32, "patch_size": 4}')
    with pytest.raises(UserError, match="gives 64 tokens but .* has T=49"):
        load_checkpoint(tmp_path / "m.pth")
    assert load_checkpoint(tmp_path / "m.pth", img_size=28).cfg.img_size == 28  # options come first


class Foreign(torch.nn.Module):
    """Stands for the official code's model class: same keys, another class."""

    def __init__(self, state):
        super().__init__()
        inner = TarFlow(TarFlowConfig(num_classes=10))
        inner.load_state_dict(state)
        self.blocks, self.var = inner.blocks, torch.nn.Parameter(inner.var.clone(), requires_grad=False)


def test_models_in_memory(model):
    assert as_tarflow(model) is model
    from_dict = as_tarflow(model.state_dict())
    foreign = as_tarflow(Foreign(model.state_dict()))
    assert from_dict.fingerprint == foreign.fingerprint == model.fingerprint
    with pytest.raises(UserError, match="expected a TarFlow"):
        as_tarflow([1, 2])


def test_bad_checkpoints_are_one_line_errors_and_write_nothing(tmp_path):
    real = BUNDLED.read_bytes()
    buf = io.BytesIO()
    torch.save(torch.nn.Linear(3, 2).state_dict(), buf)
    cases = {"random.pth": (np.random.default_rng(0).bytes(4096), "cannot read checkpoint"),
             "truncated.pth": (real[:len(real) // 2], "cannot read checkpoint"),
             "empty.pth": (b"", "cannot read checkpoint"),
             "linear.pth": (buf.getvalue(), "does not match TarFlow"),
             "pickle.pth": (pickle.dumps(["not", "a", "state_dict"]), "cannot read checkpoint")}
    for name, (data, text) in cases.items():
        (tmp_path / name).write_bytes(data)
        one_line_error(run("sample", "--checkpoint", tmp_path / name, "--out", tmp_path / "s"), text)
        one_line_error(run("profile", "--checkpoint", tmp_path / name, "--out", tmp_path / "p"), text)
    one_line_error(run("sample", "--checkpoint", tmp_path / "missing.pth", "--out", tmp_path / "s"),
                   "checkpoint not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cases)


class Evil:
    def __reduce__(self):
        return (print, ("this ran from a file",))


def test_resume_state_is_loaded_without_running_code_and_resume_is_exact(tmp_path):
    from tarflow.train import TrainConfig, state_path, train

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", x_train=rng.integers(0, 256, (64, 8, 8), dtype=np.uint8),
             y_train=rng.integers(0, 3, 64))
    cfg = TarFlowConfig(img_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2,
                        layers_per_block=1, num_classes=3)
    tc = lambda n: TrainConfig(steps=n, batch=8, warmup=1, ckpt_every=2)  # noqa: E731
    straight = train(tmp_path / "x.npz", tmp_path / "a.pth", cfg, tc(4))
    train(tmp_path / "x.npz", tmp_path / "b.pth", cfg, tc(2))
    resumed = train(tmp_path / "x.npz", tmp_path / "b.pth", cfg, tc(4), resume=True)
    for k, v in straight.state_dict().items():  # 2 + 2 steps are the 4 steps, bit for bit
        assert torch.equal(v, resumed.state_dict()[k]), k
    st = torch.load(state_path(tmp_path / "b.pth"), weights_only=True)
    st["evil"] = Evil()
    torch.save(st, state_path(tmp_path / "b.pth"))
    res = run("train", "--data", tmp_path / "x.npz", "--out", tmp_path / "b.pth", "--resume", "--steps", 6,
              "--patch-size", 2, "--channels", 32, "--head-dim", 16, "--blocks", 2, "--layers", 1, "--classes", 3)
    one_line_error(res, "not a plain training state")
    assert "this ran from a file" not in res.output


def _png_folder(root, sizes, classes=("cat", "dog")):
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_with_class_subfolders(tmp_path):
    _png_folder(tmp_path / "data", [(40, 32), (32, 32), (32, 48)])
    u8, labels = load_images(tmp_path / "data", size=16)
    assert u8.shape == (6, 3, 16, 16) and u8.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    u8, _ = load_images(tmp_path / "data")  # sizes differ: centre crops resized to the smallest side
    assert u8.shape == (6, 3, 32, 32)
    (tmp_path / "data" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match="cannot read image .*broken.png"):
        load_images(tmp_path / "data")
    (tmp_path / "data" / "loose.png").write_bytes((tmp_path / "data" / "cat" / "0.png").read_bytes())
    with pytest.raises(UserError, match="both images and class sub-folders"):
        load_images(tmp_path / "data")


@pytest.mark.parametrize("arrays,text", [
    ({"x_train": np.zeros((4, 8, 8), np.float32)}, "must be uint8"),
    ({"x_train": np.zeros((4, 8, 9), np.uint8)}, "expected square images"),
    ({"x_train": np.zeros((4, 2, 8, 8), np.uint8)}, "expected square images"),
    ({"x_train": np.zeros((4, 8, 8), np.uint8), "y_train": np.zeros(3, np.int64)}, "must be 4 integer labels"),
    ({"x_train": np.zeros((4, 8, 8), np.uint8), "y_train": np.zeros(4, np.float32)}, "must be 4 integer labels"),
    ({"pixels": np.zeros((4, 8, 8), np.uint8)}, "has no image array"),
])
def test_bad_dataset_arrays(tmp_path, arrays, text):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(UserError, match=text):
        load_images(tmp_path / "d.npz")
    one_line_error(run("profile", "--data", tmp_path / "d.npz", "--out", tmp_path / "p"), text)
    assert not (tmp_path / "p" / "profile.csv").exists()


def test_a_folder_of_pngs_is_calibration_data_and_an_fid_reference(tmp_path):
    from PIL import Image

    from .conftest import CALIB

    d = np.load(CALIB)
    for i, (img, y) in enumerate(zip(d["x"][:40], d["y"][:40])):
        (tmp_path / "imgs" / f"digit{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "imgs" / f"digit{y}" / f"{i}.png")
    res = run_cli("profile", "--data", tmp_path / "imgs", "--n", 16, "--curve-n", 4, "--out", tmp_path / "p")
    assert res.exit_code == 0, res.output
    res = run_cli("fid-ref", "--data", tmp_path / "imgs", "--extractor", "mnist-cnn", "--out", tmp_path / "ref.npz")
    assert res.exit_code == 0, res.output
    assert "n=40" in res.output and "images 1x28x28" in res.output
    res = run_cli("fid", "--n", 20, "--ref", tmp_path / "ref.npz", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["ref"]["n"] == 40 and doc["ref"]["source"] == "imgs" and doc["fid"] > 0
    one_line_error(run_cli("fid-ref", "--data", tmp_path / "imgs", "--extractor", "mnist-cnn",
                           "--out", tmp_path / "ref.npz"), "already exists")


def test_an_image_folder_with_an_unreadable_file_is_one_line_and_writes_nothing(tmp_path):
    _png_folder(tmp_path / "data", [(32, 32), (32, 32)])
    (tmp_path / "data" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for args, made in ((["profile", "--data", tmp_path / "data", "--out", tmp_path / "p"], tmp_path / "p" / "profile.csv"),
                       (["fid-ref", "--data", tmp_path / "data", "--extractor", "mnist-cnn", "--out", tmp_path / "r.npz"],
                        tmp_path / "r.npz")):
        one_line_error(run(*args), "cannot read image")
        assert not made.exists()


@pytest.mark.parametrize("cmd", [["tune", "--trials", "1"], ["profile"], ["sample", "--n", "2"],
                                 ["fid-ref", "--data", "tests/data/mnist_sample.npz", "--extractor", "mnist-cnn"]])
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(tmp_path, cmd):
    (tmp_path / "file").write_text("a file, not a folder")
    target = tmp_path / "file" / ("r.npz" if cmd[0] == "fid-ref" else "out")
    res = run(*cmd, "--out", target)
    assert res.exit_code == 2 and res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1, res.output
    assert (tmp_path / "file").read_text() == "a file, not a folder"
