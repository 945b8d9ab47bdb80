"""Init `calibrated`: exact at tol 0 whatever the guess, carried by the schedule file, refused
in one line when it is missing, damaged or asked for where no numbers exist."""

import json

import pytest
import torch

from tarflow.errors import UserError
from tarflow.guess import CalibratedGuess
from tarflow.sampling import make_noise, sample
from tarflow.schedule import BlockPlan, Schedule, builtin_schedule, resolve_schedule
from tarflow.settings import SamplingSettings
from tuner.measure.profile import Profile, block_solutions, calibration_batch, run_profile

from .conftest import CALIB, run_cli

N = 4
GUIDES = [SamplingSettings(), SamplingSettings(guidance=2.0)]


def fitted(model, settings=SamplingSettings(), n=32):
    """The calibrated guess of every block, fitted as the profile does (own labels)."""
    x, y = calibration_batch(CALIB, n, 0, model)
    return {k: CalibratedGuess.fit(xs, z) for k, _, z, xs in block_solutions(model, x, y, settings)}


def calibrated(model, guesses, S=1, tol=0.0, frontier=False):
    T, B = model.cfg.num_patches, model.cfg.num_blocks
    if frontier:
        plans = [BlockPlan(k, 1, T, "calibrated", tol, mode="frontier", window=16) for k in range(B - 1, -1, -1)]
    else:
        plans = [BlockPlan(k, S, -(-T // S), "calibrated", tol) for k in range(B - 1, -1, -1)]
    return Schedule(tuple(plans), model.fingerprint, "calibrated", guesses=guesses)


@pytest.fixture(scope="module")
def guesses64(model64):
    return fitted(model64)


@pytest.mark.parametrize("guide", GUIDES, ids=["g0", "g2"])
def test_converged_calibrated_equals_sequential_float64(model64, guesses64, guide):
    """The guess only moves the start: a full budget at tol 0 is the sequential sampler."""
    noise, y = make_noise(N, model64, seed=3), torch.arange(N) % 10
    ref, _ = sample(model64, noise, builtin_schedule("sequential", model64), labels=y, settings=guide)
    for S, frontier in ((1, False), (3, False), (7, False), (1, True)):
        x, stats = sample(model64, noise, calibrated(model64, guesses64, S, frontier=frontier), labels=y,
                          settings=guide)
        assert (x - ref).abs().max().item() <= 1e-9, (S, frontier)
        assert not stats.fallbacks


def test_calibrated_guess_is_the_least_squares_line(model64):
    """offset + scale * z fits x* per position and channel: residual orthogonal to 1 and z."""
    x, y = calibration_batch(CALIB, 32, 0, model64)
    k, _, z, xs = next(iter(block_solutions(model64, x, y, SamplingSettings())))
    off, sc = CalibratedGuess.fit(xs, z).tensors("cpu", torch.float64)
    r = xs - (off + sc * z)
    assert r.mean(0).abs().max() < 1e-5 and (r * z).mean(0).abs().max() < 1e-5


def test_schedule_file_round_trips_and_samples_the_same(model, tmp_path):
    g = fitted(model)
    s = calibrated(model, g, S=2, tol=1e-3).with_provenance(note="x")
    s.save(tmp_path / "s.json")
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["schema_version"] == 4 and sorted(doc["guesses"]) == ["0", "1", "2", "3"]
    s2 = resolve_schedule(str(tmp_path / "s.json"), model)
    assert s2 == s and s2.guesses == g
    noise, y = make_noise(N, model, seed=5), torch.arange(N)
    a, sa = sample(model, noise, s, labels=y)
    b, sb = sample(model, noise, s2, labels=y)
    assert torch.equal(a, b) and sa.iters == sb.iters
    # only the blocks that use the guess keep it; without any the file stays version 3
    mixed = Schedule((BlockPlan(3, 1, 49, "calibrated"),) + builtin_schedule("jacobi", model).plans[1:],
                     model.fingerprint, guesses=g)
    assert list(mixed.guesses) == [3] and Schedule.from_json(mixed.to_json()) == mixed
    assert json.loads(builtin_schedule("jacobi:init=z", model).to_json())["schema_version"] == 3


def test_profile_fits_saves_and_loads_the_guesses(model, tmp_path):
    x, y = calibration_batch(CALIB, 16, 0, model)
    prof = run_profile(model, x, y, curve_n=4)
    assert sorted(prof.guesses) == [0, 1, 2, 3] and "igm_calibrated" in prof.blocks
    assert set(prof.curves.init) >= {"zeros", "z", "calibrated"}
    prof.save(tmp_path)
    assert Profile.load(tmp_path).guesses == prof.guesses


def one_line(e: UserError, *words):
    text = str(e)
    assert "\n" not in text and all(w in text for w in words), text


@pytest.mark.parametrize("make,words", [
    (lambda m: BlockPlan(0, 1, 1, init="ones"), ("unknown init 'ones'", "calibrated")),
    (lambda m: builtin_schedule("jacobi:init=calibrated", m), ("init 'calibrated'", "built-in")),
    (lambda m: builtin_schedule("frontier:init=calibrated", m), ("init 'calibrated'", "built-in")),
    (lambda m: Schedule((BlockPlan(3, 1, 49, "calibrated"),), m.fingerprint), ("block 3", "init 'calibrated'")),
])
def test_bad_init_is_a_one_line_error_naming_init(model, make, words):
    with pytest.raises(UserError) as e:
        make(model)
    one_line(e.value, *words)


def _file(model, tmp_path, edit):
    doc = calibrated(model, fitted(model, n=8)).to_dict()
    edit(doc)
    p = tmp_path / "s.json"
    p.write_text(json.dumps(doc))
    return p


@pytest.mark.parametrize("edit,words", [
    (lambda d: d.pop("guesses"), ("init 'calibrated'", "no calibrated guess")),
    (lambda d: d["guesses"].pop("2"), ("block 2", "init 'calibrated'")),
    (lambda d: d["guesses"]["3"].update(offset="%%%"), ("guesses.3.offset", "base64")),
    (lambda d: d["guesses"]["3"].update(scale=d["guesses"]["3"]["scale"][:64]), ("guesses.3.scale", "49x16")),
    (lambda d: d["guesses"]["3"].update(shape=[48, 16]), ("guesses.3.offset", "48x16")),
    (lambda d: d.update(schema_version=3), ("unknown top-level key(s) guesses",)),
    (lambda d: d["blocks"][0].update(init="Calibrated"), ("unknown init 'Calibrated'",)),
])
def test_damaged_calibrated_file_is_a_one_line_error(model, tmp_path, edit, words):
    p = _file(model, tmp_path, edit)
    with pytest.raises(UserError) as e:
        resolve_schedule(str(p), model)
    one_line(e.value, str(p), *words)


def test_guess_of_another_shape_does_not_fit(model, tmp_path):
    g = CalibratedGuess.fit(torch.zeros(2, 48, 16), torch.randn(2, 48, 16))
    s = Schedule((BlockPlan(3, 1, 49, "calibrated"),) + builtin_schedule("jacobi", model).plans[1:],
                 model.fingerprint, guesses={3: g})
    with pytest.raises(UserError) as e:
        s.check_fits(model)
    one_line(e.value, "calibrated guess of block 3 is 48x16", "49 tokens of 16")


def test_cli_bad_init_is_one_line_exit_2(tmp_path):
    res = run_cli("sample", "--n", 1, "--schedule", "jacobi:init=calibrated", "--out", tmp_path / "s")
    assert res.exit_code == 2 and res.output.startswith("error: ") and "init 'calibrated'" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "s.npz").exists()
