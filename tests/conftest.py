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


# the one tiny study every test that needs a study shares: the bundled model, guided and denoised,
# 6 trials at n = 32 on a 16-image calibration set (a full profile takes minutes)
TINY_STUDY_ARGS = ["--trials", "6", "--n", "32", "--batch", "16", "--verify-n", "64", "--max-drift", "off", "--device", "cpu",
                   "--tolerance", "50", "--guidance", "1.5", "--denoise"]


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    import numpy as np

    d = tmp_path_factory.mktemp("tiny")
    cal = np.load(CALIB)
    np.savez(d / "calib.npz", x=cal["x"][:16], y=cal["y"][:16])
    res = run_cli("tune", *TINY_STUDY_ARGS, "--data", d / "calib.npz", "--out", d / "study")
    assert res.exit_code == 0, res.output
    return d / "study", res.output
