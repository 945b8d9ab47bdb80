from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "studies" / "mnist" / "model.pth"
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(1)  # tiny sequential ops: one thread is fastest and never oversubscribes


@pytest.fixture(scope="session")
def model():
    from tarflow.checkpoint import load_checkpoint

    return load_checkpoint(BUNDLED)


@pytest.fixture(scope="session")
def model64():
    from tarflow.checkpoint import load_checkpoint

    return load_checkpoint(BUNDLED, dtype=torch.float64)


CALIB = ROOT / "studies" / "mnist" / "calibration.npz"


@pytest.fixture()
def mnist_npz(tmp_path):
    """MNIST arrays: ../shared/data/mnist.npz, else the committed 256-image calibration sample
    standing in for both splits (a fresh clone has no ../shared)."""
    path = SHARED_DATA / "mnist.npz"
    if path.is_file():
        return path
    import numpy as np

    d = np.load(CALIB)
    out = tmp_path / "mnist_sample.npz"
    np.savez(out, x_train=d["x"], y_train=d["y"], x_test=d["x"], y_test=d["y"])
    return out


def run_cli(*args):
    """Invoke the command line in-process (arguments may be paths or numbers)."""
    from typer.testing import CliRunner

    from tuner.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(res, text):
    """Bad input: exit code 2 and one line `error: ...` naming the problem, no traceback."""
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and text in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


# The one tiny study every test that needs a study shares: the bundled model, guided and denoised,
# 6 trials (the seed schedules) at n = 16 (one batch), profiled on `tiny_calib` (4 images: 16 took
# 26 s of the study's 78 s on a quiet 2-core machine, 4 take 8 s, and the trials came out the same).
# Both constraints bind: tolerance 5 and the default drift limit 2/255, re-checked on 256 fresh
# samples (MIN_DRIFT_VERIFY_N, the least a drift limit allows). Measured on this study: the other
# seeds move FID by < 0.01 and no sample by more than 0.02/255 (the winner 0.11/255 on the fresh
# samples); the `jacobi` seed (4 segments of 6 passes) moves FID by 52 and a sample by 42/255, so
# it must end infeasible. --prune-rmse 50 lets that seed (warm-up mean drift 21/255) reach the
# constraints instead of being stopped by the cheap warm-up screen (default 12). --retime-rounds 1:
# the closing re-timing is a figure for people, not a constraint (3 rounds took 16 s of the 58).
TINY_TOLERANCE, TINY_MAX_DRIFT = 5.0, 2.0
TINY_STUDY_ARGS = ["--trials", "6", "--n", "16", "--batch", "16", "--verify-n", "256",
                   "--max-drift", f"{TINY_MAX_DRIFT:g}", "--tolerance", f"{TINY_TOLERANCE:g}", "--prune-rmse", "50",
                   "--device", "cpu", "--guidance", "1.5", "--denoise", "--retime-rounds", "1"]


def with_args(args, **over):
    """`args` with some options replaced (`trials=8` sets --trials 8; `verify_n` -> --verify-n)."""
    out = list(args)
    for key, value in over.items():
        flag = "--" + key.replace("_", "-")
        out[out.index(flag) + 1] = str(value)
    return out


@pytest.fixture(scope="session")
def tiny_calib(tmp_path_factory):
    """The 4 calibration images every small study in the tests profiles: the profile's convergence
    curves, most of its cost, run on every image (a full profile takes minutes)."""
    import numpy as np

    path = tmp_path_factory.mktemp("tiny") / "calib.npz"
    cal = np.load(CALIB)
    np.savez(path, x=cal["x"][:4], y=cal["y"][:4])
    return path


@pytest.fixture(scope="session")
def tiny_study(tiny_calib):
    """The shared tiny study (TINY_STUDY_ARGS), in the folder beside `tiny_calib`. Tests must not
    change it: one that resumes or adds trials works on a copy."""
    out = tiny_calib.parent / "study"
    res = run_cli("tune", *TINY_STUDY_ARGS, "--data", tiny_calib, "--out", out)
    assert res.exit_code == 0, res.output
    return out, res.output


@pytest.fixture(scope="session")
def plain_profile(tiny_calib, tmp_path_factory):
    """The block profile of `tiny_calib` under the default sampling settings (no guidance), measured
    once by `tarflow-tuner profile`. Studies sampled with those settings (recovery, workers,
    constraints) copy it into STUDY/profile and start with --resume ("join or create"), which
    reuses a study's profile, instead of each measuring the same one again."""
    out = tmp_path_factory.mktemp("plain") / "profile"
    res = run_cli("profile", "--data", tiny_calib, "--n", 4, "--device", "cpu", "--out", out)
    assert res.exit_code == 0, res.output
    assert (out / "profile.json").is_file()
    return out


def study_with_profile(profile, out):
    """A study folder `out` holding a copy of `profile`, for a tune started with --resume."""
    import shutil

    shutil.copytree(profile, out / "profile")
    return out


# `pytest` runs on two processes (pyproject: -n 2, pytest-xdist), each with its own session
# fixtures. A session fixture that takes long to build is built by one process only: every test
# that uses it goes to one group, which --dist loadgroup hands to a single process. The tests
# that start PostgreSQL servers and worker processes share another, so they never run beside one
# another (their timing bounds assume a machine no busier than one other test makes it).
GROUPS = {"tiny_study": "tiny-study", "postgres_url": "postgres", "server": "postgres"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the markers
def pytest_collection_modifyitems(config, items):
    grouped = set()
    for item in items:
        group = next((g for name, g in GROUPS.items() if name in getattr(item, "fixturenames", ())), None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
            grouped.add(item.nodeid)
    # the long groups first, so that the short tests fill in beside them rather than after them
    items.sort(key=lambda item: item.nodeid not in grouped)
