"""`tarflow` stands alone as a library: no front-end imports, no printing, no CLI flags in its
errors, progress through a callback, one pixel conversion, and one transformer step shared by the
eager and the static-buffer solver."""

import ast
import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from tarflow.data import UINT8_NAN, to_model_space, to_pixels, to_uint8
from tarflow.errors import UserError
from tarflow.graphs import StaticSolver
from tarflow.guidance import guide
from tarflow.io import atomic_write_text, read_json
from tarflow.model import TarFlowConfig
from tarflow.sampling import BlockSolver, make_noise, prior_latents
from tarflow.settings import SamplingRequest, SamplingSettings

from .conftest import CALIB, ROOT

PACKAGE = ROOT / "tarflow"
MODULES = sorted(PACKAGE.glob("*.py"))
FLAG = re.compile(r"(^|[\s(`'\"])--([a-z]|$)")


def _tree(path):
    return ast.parse(path.read_text(), filename=str(path))


def _imported(tree) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_the_library_imports_no_front_end_and_never_prints(path):
    tree = _tree(path)
    front = {n for n in _imported(tree) if n.split(".")[0] in ("rich", "tuner", "typer")}
    assert not front, f"{path.name} imports {front}"
    prints = [n.lineno for n in ast.walk(tree)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
    assert not prints, f"{path.name} prints at lines {prints}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_library_errors_name_settings_not_command_line_flags(path):
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "UserError":
            texts = [c.value for a in node.args for c in ast.walk(a)
                     if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            assert not any(FLAG.search(t) for t in texts), f"{path.name}:{node.lineno} {texts}"


def _raised(fn) -> UserError:
    with pytest.raises(UserError) as e:
        fn()
    return e.value


def test_user_error_carries_the_settings_it_is_about(model, tmp_path):
    """`setting` lists the parameters a message names, each spelt verbatim in it, so a front end
    can show them as its own flags; `UserError(msg)` alone still works."""
    from tarflow.checkpoint import infer_geometry
    from tarflow.schedule import builtin_schedule

    plain = UserError("plain")
    assert plain.setting is None and str(plain) == "plain"
    other = replace(builtin_schedule("sequential", model), fingerprint={"arch": {}, "weights_sha256": "0"})
    cases = {
        "dtype": lambda: SamplingRequest(dtype="float8").dtype_for(None),
        "noise_std,denoise": lambda: SamplingRequest(noise_std=0.1).resolve(),
        "denoise,noise_std": lambda: SamplingRequest(denoise=True).resolve(),
        "guidance": lambda: SamplingSettings(guidance=-1),
        "attn_temp": lambda: SamplingSettings(attn_temp=0),
        "labels": lambda: SamplingSettings(labels="a,b"),
        "force": lambda: other.check_fits(model),
        "img_size,patch_size": lambda: infer_geometry(5, 7),
    }
    for setting, fn in cases.items():
        e = _raised(fn)
        assert e.setting == setting, (setting, str(e))
        for name in setting.split(","):
            assert re.search(rf"(?<![\w-]){name}(?!\w)", str(e)), (name, str(e))
        assert not FLAG.search(str(e)), str(e)
    assert "force=True" in str(_raised(cases["force"]))


def test_train_reports_every_step_through_the_callback_and_prints_nothing(tmp_path, capsys):
    from tarflow.train import TrainConfig, train

    cal = np.load(CALIB)
    np.savez(tmp_path / "c.npz", x=cal["x"][:32], y=cal["y"][:32])
    cfg = TarFlowConfig(patch_size=7, channels=16, head_dim=8, num_blocks=2, layers_per_block=1, num_classes=10)
    calls = []
    train(tmp_path / "c.npz", tmp_path / "m.pth", cfg, TrainConfig(steps=2, batch=4, warmup=1, ckpt_every=1),
          progress=lambda step, total, m: calls.append((step, total, m)))
    assert [(s, t) for s, t, _ in calls] == [(1, 2), (2, 2)]
    for _, _, m in calls:
        assert {"loss", "bpd", "lr", "start", "elapsed", "saved"} <= set(m)
        assert math.isfinite(m["loss"]) and math.isfinite(m["bpd"]) and m["lr"] > 0
        assert m["start"] == 0 and m["saved"] is True
    assert (tmp_path / "m.pth").is_file() and (tmp_path / "m.train.pt").is_file()
    resumed = []
    train(tmp_path / "c.npz", tmp_path / "m.pth", cfg, TrainConfig(steps=3, batch=4, warmup=1, ckpt_every=5),
          resume=True, progress=lambda step, total, m: resumed.append((step, total, m["start"], m["saved"])))
    assert resumed == [(3, 3, 2, True)]  # continues the count; the last step always checkpoints
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_to_pixels_and_to_uint8_follow_the_stated_policy():
    x = torch.tensor([-1.0, 0.0, 1.0, -3.0, 2.5, float("inf"), float("-inf"), float("nan"), 0.002])
    px = to_pixels(x)
    assert px.dtype == torch.float32 and px.device.type == "cpu"
    assert px[:7].tolist() == [0.0, 127.5, 255.0, 0.0, 255.0, 255.0, 0.0]  # clipped, inf saturates
    assert math.isnan(px[7].item())  # NaN is kept for the caller's policy
    assert px[8].item() == pytest.approx(127.755, abs=1e-4)  # unquantised
    assert to_pixels(x, torch.float64).dtype == torch.float64
    u8 = to_uint8(x)
    assert u8.dtype == np.uint8
    assert u8.tolist() == [0, 128, 255, 0, 255, 255, 0, UINT8_NAN, 128]  # 127.5 rounds half to even
    grid = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    assert np.array_equal(to_uint8(to_model_space(grid)), grid)  # model space round-trips exactly


def test_io_helpers_round_trip_and_fail_as_one_line(tmp_path):
    atomic_write_text(tmp_path / "a" / "b.json", '{"k": [1, 2]}')
    assert read_json(tmp_path / "a" / "b.json", "a test file") == {"k": [1, 2]}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="bad.json: not a test file"):
        read_json(tmp_path / "bad.json", "a test file")


def test_guidance_mix_is_conditional_plus_w_times_the_difference():
    a, b = torch.tensor([[3.0], [1.0]]), torch.tensor([[-2.0], [0.0]])
    ga, gb = guide(a, b, torch.tensor(0.5))
    assert ga.tolist() == [[4.0]] and gb.tolist() == [[-3.0]]


def test_prior_latents_scale_the_noise_by_the_prior_std(model):
    noise = make_noise(2, model, 0)
    assert torch.equal(prior_latents(model, noise), noise * model.var.sqrt())


@pytest.mark.parametrize("settings", [SamplingSettings(), SamplingSettings(guidance=2.0, guidance_anneal=True,
                                                                           attn_temp=0.8)], ids=["g0", "guided"])
def test_static_step_equals_eager_step_float64(model64, settings):
    """The one transformer step, run with either K/V writer: same (a, b) for single-token steps
    and for a multi-token span after them, and the same K/V left in the caches."""
    block, n = model64.blocks[1], 3
    T = model64.cfg.num_patches
    x = make_noise(n, model64, 5).double()
    y = torch.tensor([2, -1, 7])
    eager = BlockSolver(block, y, n, settings, "cpu", torch.float64)
    static = StaticSolver(block, y, n, settings, "cpu", torch.float64)
    calls = [(i, 1) for i in range(5)] + [(5, 7), (12, T - 12)]
    for start, L in calls:
        for e, s in zip(eager.params(x[:, start:start + L], start), static.params(x[:, start:start + L], start)):
            assert e.shape == s.shape == (n, L, x.shape[2])
            assert (e - s).abs().max().item() <= 1e-9, (start, L)
    assert (eager.cache.k - static.cache.k).abs().max().item() <= 1e-12
    assert (eager.cache.v - static.cache.v).abs().max().item() <= 1e-12


def test_training_forward_and_sampling_step_share_the_transformer(model64):
    """transform_params (training) is the cached step over the whole sequence, shifted one token."""
    block = model64.blocks[0]
    x = make_noise(2, model64, 9).double()
    y = torch.tensor([4, 1])
    a, b = block.transform_params(x, y)
    cache = block.new_cache(2, "cpu", torch.float64)
    sa, sb = block.step(x, 0, cache, block.permute(block.pos_embed, 0), block.class_embedding(y, 2))
    assert torch.equal(a[:, 0], torch.zeros_like(a[:, 0])) and torch.equal(b[:, 0], torch.zeros_like(b[:, 0]))
    assert (a[:, 1:] - sa[:, :-1]).abs().max().item() <= 1e-12
    assert (b[:, 1:] - sb[:, :-1]).abs().max().item() <= 1e-12
