"""The tuner from Python (tuner.api) and the profile's labels: a real image goes through a
class-conditional flow with its own label."""

import ast
import inspect
import json
import re

import numpy as np
import pytest
import torch

from tarflow.errors import UserError
from tarflow.schedule import Schedule
from tarflow.settings import SamplingSettings
from tuner import api
from tuner.measure import profile as profile_module
from tuner.measure.profile import OWN_LABELS, UNCOND
from tuner.search.summary import StudySummary

from .conftest import CALIB, ROOT, run_cli


@pytest.fixture()
def calib16(tmp_path):
    cal = np.load(CALIB)
    np.savez(tmp_path / "calib16.npz", x=cal["x"][:16], y=cal["y"][:16])
    return tmp_path / "calib16.npz", torch.from_numpy(cal["y"][:16].astype(np.int64))


@pytest.fixture()
def spy(monkeypatch):
    """Every (labels, [(k, x*)]) the profile computes x* with."""
    seen = []
    real = profile_module.block_solutions

    def recording(model, x, y, settings):
        seen.append((y, []))
        for k, block, z, x_star in real(model, x, y, settings):
            seen[-1][1].append((k, x_star))
            yield k, block, z, x_star

    monkeypatch.setattr(profile_module, "block_solutions", recording)
    return seen


def forward_inputs(model, x, y):
    """Each block's input in the forward pass of x with labels y, in that block's token order."""
    with torch.no_grad():
        _, outputs, _ = model(x, y)
    h = [model.patchify(x), *outputs]
    return [block.permute(h[k]) for k, block in enumerate(model.blocks)]


def test_the_profile_conditions_each_real_image_on_its_own_label(model, calib16, spy, tmp_path):
    """x* of every block is the forward pass of the images with their own labels (the bundled
    model is class-conditional and the calibration set labelled), not with the class-i-mod-K
    labels that samples get; profile.json says so."""
    data, own = calib16
    res = run_cli("profile", "--data", data, "--n", 16, "--curve-n", 2, "--out", tmp_path / "p")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p" / "profile.json").read_text())["meta"]["labels"] == OWN_LABELS
    (y, solved), = spy
    assert torch.equal(y.cpu(), own)
    x = torch.from_numpy(np.load(data)["x"][:, None]).float() / 127.5 - 1
    with_own, balanced = forward_inputs(model, x, own), forward_inputs(model, x, torch.arange(16) % 10)
    for k, x_star in solved:
        assert (x_star - with_own[k]).abs().max() <= 1e-4, k
        if k > 0:  # block 0's input is the image itself, whatever the label
            assert (x_star - balanced[k]).abs().max() > 1e-2, k


def test_profile_labels_unconditional_only_when_asked_or_missing(model, calib16, spy, tmp_path):
    data, _ = calib16
    prof = api.profile(model, data=data, curve_n=1, n=None, settings=SamplingSettings(labels="uncond"))
    assert prof.meta["labels"].startswith(UNCOND) and "asks" in prof.meta["labels"] and spy[-1][0] is None
    np.savez(tmp_path / "nolabels.npz", x=np.load(data)["x"])
    prof = api.profile(model, data=tmp_path / "nolabels.npz", curve_n=1, n=None)
    assert "has no labels" in prof.meta["labels"] and spy[-1][0] is None
    np.savez(tmp_path / "badlabels.npz", x=np.load(data)["x"], y=np.full(16, 12))
    with pytest.raises(UserError, match="label 12 is not a class") as e:
        api.profile(model, data=tmp_path / "badlabels.npz", n=None)
    assert e.value.setting == "labels" and len(spy) == 2


def test_tune_from_python_returns_the_summary_and_the_schedule(model, calib16, tmp_path):
    """A notebook's tune: profile once, tune with it; the study folder is the command line's."""
    from rich.progress import Progress

    data, _ = calib16
    settings = SamplingSettings(labels="random")
    prof = api.profile(model, data=data, n=None, curve_n=2, settings=settings)
    lines = []
    summary, schedule = api.tune(model, profile=prof, settings=settings, out=tmp_path / "study", trials=3,
                                 n=8, batch=8, verify_n=16, max_drift=None, tolerance=1000, log=lines.append,
                                 progress=Progress(disable=True))
    assert isinstance(summary, StudySummary) and isinstance(schedule, Schedule)
    assert summary.trials == 3 and summary.sampling == settings and summary.checkpoint is None
    assert schedule.to_dict() == Schedule.load(tmp_path / "study" / "schedule.json").to_dict()
    assert StudySummary.load(tmp_path / "study" / "summary.json").to_dict() == summary.to_dict()
    assert json.loads((tmp_path / "study" / "profile" / "profile.json").read_text())["meta"]["labels"] == OWN_LABELS
    assert (tmp_path / "study" / "report.html").stat().st_size > 0
    assert any(ln.startswith("sequential:") for ln in lines)
    with pytest.raises(UserError, match="already holds schedule.json") as e:
        api.tune(model, profile=prof, settings=settings, out=tmp_path / "study")
    assert "overwrite" in e.value.setting


def test_tune_refuses_before_any_work(model, calib16, tmp_path):
    data, _ = calib16
    prof = api.profile(model, data=data, n=None, curve_n=1)
    for kwargs, text in (({"settings": SamplingSettings(dtype="float64")}, "dtype 'float64'"),
                         ({"profile": prof, "settings": SamplingSettings(guidance=2.0)}, "other sampling settings"),
                         ({"modes": ("waves",)}, "modes must be"), ({"trials": 0}, "trials, batch"),
                         ({"solver": "fast"}, "solver must be one of"),
                         ({"settings": "fast"}, "SamplingSettings")):
        with pytest.raises(UserError, match=re.escape(text)):
            api.tune(model, data=data, out=tmp_path / "t", **kwargs)
    assert not (tmp_path / "t").exists()


def test_the_tune_command_profiles_real_images_with_their_own_labels(tiny_study):
    study, _ = tiny_study
    meta = json.loads((study / "profile" / "profile.json").read_text())["meta"]
    assert meta["labels"] == OWN_LABELS and meta["sampling"]["guidance"] == 1.5


def test_the_readme_calls_the_api_as_it_is():
    """Every profile(...) / tune(...) call the README shows binds to the functions' signatures."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### In your own code"):]
    section = section[:section.index("\n### ", 4)]
    calls = [node for block in re.findall(r"```python\n(.*?)```", section, re.S)
             for node in ast.walk(ast.parse(block)) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Name) and node.func.id in ("profile", "tune")]
    assert {c.func.id for c in calls} == {"profile", "tune"}
    for call in calls:
        inspect.signature(getattr(api, call.func.id)).bind(*call.args, **{k.arg: None for k in call.keywords})


def test_the_bundled_default_tunes_from_its_committed_profile(model, calib16):
    """`tarflow-tuner tune` on the bundled model, its calibration set and default settings would
    measure the committed profile again: it takes that one. Any other data or settings are
    profiled (a guided tune, a user's images)."""
    from tuner.api import _committed_profile, prepare
    from tuner.bundled import DEFAULT_CALIB, DEFAULT_PROFILE

    _, settings, _ = prepare(model, None)
    prof = _committed_profile(model, DEFAULT_CALIB, settings)
    assert prof is not None and prof.meta["n"] == 256 and prof.meta["fingerprint"] == model.fingerprint
    assert prof.meta["labels"] == OWN_LABELS and (DEFAULT_PROFILE / "profile.json").is_file()
    assert _committed_profile(model, calib16[0], settings) is None
    assert _committed_profile(model, DEFAULT_CALIB, SamplingSettings(guidance=1.5)) is None
