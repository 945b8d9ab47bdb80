"""`sample`: output names kept whole, sampling in batches, the batch warning."""

import json

import numpy as np

from tarflow.schedule import builtin_schedule

from .conftest import one_line_error, run_cli


def test_batches_give_the_images_of_one_batch_in_one_file(tmp_path):
    """Same noise, same labels: batches of 3 over n = 7 (3 + 3 + 1) are the samples of one batch
    of 7. Up to float32 rounding only: the matrix products block differently per batch size."""
    res = run_cli("sample", "--n", 7, "--batch", 3, "--device", "cpu", "--out", tmp_path / "b3" / "s")
    assert res.exit_code == 0, res.output
    assert "in 3 batches of 3" in res.output and "may not be optimal" not in res.output
    assert sorted(p.name for p in (tmp_path / "b3").iterdir()) == ["s.npz", "s.png"]
    res = run_cli("sample", "--n", 7, "--batch", 7, "--device", "cpu", "--out", tmp_path / "b7" / "s")
    assert res.exit_code == 0, res.output
    b3, b7 = np.load(tmp_path / "b3" / "s.npz"), np.load(tmp_path / "b7" / "s.npz")
    assert b3["x"].shape == b7["x"].shape == (7, 1, 28, 28)
    assert np.abs(b3["x"] - b7["x"]).max() <= 1e-4
    assert b3["labels"].tolist() == b7["labels"].tolist() == list(range(7))
    stats = json.loads(str(b3["stats"]))
    assert stats["batch"] == 3 and stats["batches"] == 3 and [p["start"] for p in stats["per_batch"]] == [0, 3, 6]
    assert stats["passes"] == sum(p["passes"] for p in stats["per_batch"]) == 3 * json.loads(str(b7["stats"]))["passes"]


def test_out_names_keep_every_character(tmp_path):
    """`--out runs/s0.0` names a file s0.0, not s0 with a suffix; a trailing .npz names the pair."""
    assert run_cli("sample", "--n", 1, "--schedule", "sejd", "--out", tmp_path / "s0.0").exit_code == 0
    assert run_cli("sample", "--n", 1, "--schedule", "sejd", "--out", tmp_path / "t.npz").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0.0.npz", "s0.0.png", "t.npz", "t.png"]
    one_line_error(run_cli("sample", "--n", 1, "--out", "."), "names a folder")


def test_default_batch_is_the_tuned_one_and_only_another_warns(tmp_path, model):
    """A schedule remembers the batch and device it was tuned at: sampling there is silent and
    uses that batch; another batch is allowed, with one warning."""
    sched = builtin_schedule("sejd", model).with_provenance(device_class="cpu", batch=2)
    sched.save(tmp_path / "tuned.json")
    res = run_cli("sample", "--schedule", tmp_path / "tuned.json", "--n", 3, "--device", "cpu", "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    assert "in 2 batches of 2" in res.output and "warning" not in res.output
    res = run_cli("sample", "--schedule", tmp_path / "tuned.json", "--n", 3, "--batch", 3, "--device", "cpu",
                  "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
    warn = [ln for ln in res.output.splitlines() if "may not be optimal" in ln]
    assert len(warn) == 1 and "at batch 2" in warn[0] and "at batch 3" in warn[0]
    assert json.loads(str(np.load(tmp_path / "b.npz")["stats"]))["batches"] == 1
