"""The command line: sample/schedule/train happy paths and one-line errors with exit code 2."""

import json

import numpy as np
from typer.testing import CliRunner

from tuner.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(res, text):
    assert res.exit_code == 2, res.output
    assert text in res.output
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_sample_writes_npz_and_png(tmp_path):
    res = run("sample", "--n", 6, "--schedule", "jacobi:segments=7,max_iters=7", "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
    data = np.load(tmp_path / "s.npz")
    assert data["x"].shape == (6, 1, 28, 28) and data["x"].dtype == np.float32
    assert list(data["labels"]) == [0, 1, 2, 3, 4, 5]
    assert json.loads(str(data["stats"]))["passes"] > 0
    assert (tmp_path / "s.png").stat().st_size > 0


def test_sample_with_noise_file_reproduces_across_schedules(tmp_path, model):
    z = np.random.default_rng(0).standard_normal((3, 49, 16)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    for name in ("sequential", "jacobi:segments=3"):
        assert run("sample", "--noise", tmp_path / "z.npy", "--schedule", name,
                   "--out", tmp_path / name.split(":")[0]).exit_code == 0
    a, b = (np.load(tmp_path / f"{n}.npz")["x"] for n in ("sequential", "jacobi"))
    assert np.abs(a - b).max() <= 1e-4


def test_schedule_show_prints_resolved_json():
    res = run("schedule", "show", "sejd:tol=0.2")
    assert res.exit_code == 0
    doc = json.loads(res.output)
    assert doc["blocks"][1]["tol"] == 0.2 and doc["fingerprint"]["weights_sha256"]


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    assert_user_error(run("sample", "--checkpoint", tmp_path / "none.pth", "--out", tmp_path / "o"),
                      "checkpoint not found")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.json").write_text('{"img_size": 28, "patch_size": 4}')
    assert_user_error(run("sample", "--checkpoint", tmp_path / "junk.pth", "--out", tmp_path / "o"),
                      "cannot read checkpoint")
    (tmp_path / "bad.json").write_text("{not json")
    assert_user_error(run("sample", "--schedule", tmp_path / "bad.json", "--out", tmp_path / "o"),
                      "malformed JSON")
    np.save(tmp_path / "z.npy", np.zeros((2, 10, 16), np.float32))
    assert_user_error(run("sample", "--noise", tmp_path / "z.npy", "--out", tmp_path / "o"),
                      "expected (N, 49, 16)")
    (tmp_path / "file").write_text("x")
    assert_user_error(run("sample", "--n", 2, "--out", tmp_path / "file" / "o"), "output folder")
    assert_user_error(run("sample", "--schedule", "jacobi:segments=99", "--out", tmp_path / "o"),
                      "exceeds the sequence length T=49")
    assert not (tmp_path / "o.npz").exists()


def test_failed_run_leaves_existing_result_untouched(tmp_path):
    out = tmp_path / "keep"
    assert run("sample", "--n", 2, "--out", out).exit_code == 0
    before = (tmp_path / "keep.npz").read_bytes()
    (tmp_path / "bad.json").write_text("[]")
    assert run("sample", "--schedule", tmp_path / "bad.json", "--out", out).exit_code == 2
    assert (tmp_path / "keep.npz").read_bytes() == before


def test_train_writes_loadable_checkpoint_and_resumes(tmp_path, mnist_npz):
    data = np.load(mnist_npz)
    np.savez(tmp_path / "tiny.npz", x_train=data["x_train"][:256], y_train=data["y_train"][:256])
    args = ["train", "--data", tmp_path / "tiny.npz", "--out", tmp_path / "m.pth", "--channels", 32,
            "--blocks", 2, "--layers", 1, "--head-dim", 16, "--batch", 16, "--warmup", 1, "--ckpt-every", 2]
    res = run(*args, "--steps", 2)
    assert res.exit_code == 0, res.output
    from tarflow.checkpoint import load_checkpoint

    m = load_checkpoint(tmp_path / "m.pth")
    assert m.cfg.channels == 32 and m.cfg.num_blocks == 2 and m.cfg.num_classes == 10
    assert json.loads((tmp_path / "m.json").read_text())["train"]["steps_done"] == 2
    res = run(*args, "--steps", 4, "--resume")
    assert res.exit_code == 0, res.output
    assert "resuming from step 2" in res.output
    assert json.loads((tmp_path / "m.json").read_text())["train"]["steps_done"] == 4
    # that 2 + 2 steps equal 4 steps, bit for bit, is tests/test_loading.py's resume test
