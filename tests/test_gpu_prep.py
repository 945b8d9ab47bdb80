"""The GPU-box kit: studies/gpu/run.sh packs its results, tuner.scale measures and derives what
it says."""

import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from tests.conftest import ROOT



def check_scale(res: dict, dtype: str, batches: list[int]):
    """Shape, windows, positive timings, memory and derived figures of one tuner.scale result."""
    T = res["shape"]["T"]
    assert (T, res["shape"]["token_dim"], res["dtype"], res["complete"]) == (64, 48, dtype, True)
    assert res["windows"] == [8, 16, 32, 64]
    assert res["device_class"] == "cpu" and res["torch"] == torch.__version__
    assert [r["batch"] for r in res["batches"]] == batches
    for r in res["batches"]:
        assert [s["pos"] for s in r["step"]] == [0, T // 2, T - 1]
        assert {(j["window"], j["start"]) for j in r["jacobi"]} == {
            (L, s) for L in res["windows"] for s in (0, T - L)}
        times = [s["median_s"] for s in r["step"] + r["jacobi"]] + [
            r["block_forward"]["median_s"], r["model_forward"]["median_s"]]
        assert all(t > 0 for t in times)
        # 2 layers x batch x 2 heads x T x head 32, keys and values, per block; 2 blocks
        per_block = 2 * r["batch"] * 2 * T * 32 * 2 * (4 if dtype == "float32" else 2)
        assert r["kv_cache_bytes"] == {"per_block": per_block, "total": 2 * per_block}
        d = r["derived"]
        assert d["sequential_per_block_s"] == pytest.approx((T - 1) * r["step_median_s"])
        assert d["one_pass_bound_s"] == r["block_forward"]["median_s"]
        assert [x["window"] for x in d["pass_cost_ratio"]] == res["windows"]
        first = d["pass_cost_ratio"][0]
        assert first["ratio_start0"] == pytest.approx(r["jacobi"][0]["median_s"] / r["step_median_s"])
        assert all(x["ratio_start0"] > 0 and x["break_even_iters"] > 0 for x in d["pass_cost_ratio"])


def test_run_sh_scale_quick_packs_results(tmp_path):
    env = os.environ | {"OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", str(ROOT / "studies/gpu/run.sh"), "scale", "--device", "cpu", "--quick"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    with tarfile.open(tmp_path / "scale.tar.gz") as tar:
        names = set(tar.getnames())
        assert {"scale/steps.tsv", "scale/env.txt", "scale/scale_float32.json",
                "scale/scale_bfloat16.json"} <= names
        for dtype in ("float32", "bfloat16"):
            check_scale(json.load(tar.extractfile(f"scale/scale_{dtype}.json")), dtype, [1, 16, 64])
        steps = tar.extractfile("scale/steps.tsv").read().decode().split("\n")
    assert [s.split("\t")[:2] for s in steps if s] == [["scale_float32", "0"], ["scale_bfloat16", "0"]]
    again = subprocess.run(["bash", str(ROOT / "studies/gpu/run.sh"), "scale", "--device", "cpu", "--quick"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "already holds" in again.stderr


def test_scale_main_in_process(tmp_path, capsys):
    from tuner.scale import main

    out = tmp_path / "s.json"
    res = main(["--device", "cpu", "--dtype", "float32", "--quick", "--batches", "1,2", "--out", str(out)])
    check_scale(res, "float32", [1, 2])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert "pass L=8" in capsys.readouterr().out
    for bad, text in ((["--dtype", "float16"], "--dtype"), (["--batches", "1,x"], "--batches"),
                      (["--device", "tpu"], "--device")):
        with pytest.raises(SystemExit) as e:
            main(["--quick", "--out", str(out), *bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and text in err and len(err.strip().splitlines()) == 1


def test_the_mnist_cnn_fid_path_needs_no_clean_fid():
    """The GPU box lacks clean-fid: sampling, mnist-cnn features and FID must not import it."""
    code = ("import sys; from tarflow.checkpoint import load_checkpoint; from tarflow.sampling import make_noise, "
            "sample_batched; from tarflow.schedule import builtin_schedule; from tarflow.data import to_uint8; "
            "import tuner.cli, tuner.search, tuner.bench; from tuner.extractors import get_extractor; "
            "from tuner.fid import RefStats, default_ref_path, fid_against; "
            "m = load_checkpoint('studies/mnist/model.pth'); x, _ = sample_batched(m, builtin_schedule('sejd', m), "
            "make_noise(8, m, 0)); e = get_extractor('mnist-cnn'); "
            "print(fid_against(to_uint8(x), RefStats.load(default_ref_path('mnist-cnn')), e).fid); "
            "assert 'cleanfid' not in sys.modules, 'clean-fid imported'")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-1500:]
