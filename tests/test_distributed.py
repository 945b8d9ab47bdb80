"""`fid --workers 2` (torchrun, gloo on CPU) splits the sampling and gets the FID one process gets:
same noise, same batches, features gathered on rank 0 in order."""

import json
import os
import subprocess
import sys

import pytest

ARGS = ["fid", "--n", "48", "--batch", "16", "--schedule", "jacobi:segments=2,max_iters=4,tol=1e-3",
        "--noise-floor", "--json", "--device", "cpu"]


def fid_json(*extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # torchrun's default per process: same arithmetic
    env.pop("WORLD_SIZE", None)
    res = subprocess.run([sys.executable, "-m", "tuner", *ARGS, *extra], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def test_two_gloo_processes_give_the_fid_of_one():
    one, two = fid_json(), fid_json("--workers", "2")
    assert two["source"]["processes"] == 2 and one["source"]["processes"] == 1
    assert two["n"] == one["n"] == 48
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-6)
    assert two["noise_floor"]["values"] == pytest.approx(one["noise_floor"]["values"], rel=1e-6)
    for k in ("rmse_mean", "rmse_max", "feat_mean", "feat_spread"):
        assert two["proxy"][k] == pytest.approx(one["proxy"][k], rel=1e-6)
    assert two["proxy"]["n"] == 48
