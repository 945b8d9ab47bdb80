"""Checkpoint layout (official TarFlow keys), loading errors, and the schedule file contract."""

import json
import re

import pytest
import torch

from tarflow.checkpoint import load_checkpoint, save_checkpoint
from tarflow.errors import UserError
from tarflow.schedule import Schedule, builtin_schedule, resolve_schedule

from .conftest import BUNDLED

OFFICIAL_PATTERNS = [
    r"var", r"blocks\.\d+\.(pos_embed|class_embed|attn_mask)",
    r"blocks\.\d+\.proj_(in|out)\.(weight|bias)",
    r"blocks\.\d+\.attn_blocks\.\d+\.attention\.(norm|qkv|proj)\.(weight|bias)",
    r"blocks\.\d+\.attn_blocks\.\d+\.mlp\.(norm|main\.0|main\.2)\.(weight|bias)",
]


def test_state_dict_uses_official_keys_and_shapes(model):
    sd = model.state_dict()
    for k in sd:
        assert any(re.fullmatch(p, k) for p in OFFICIAL_PATTERNS), k
    cfg = model.cfg
    C, D, T = cfg.channels, cfg.token_dim, cfg.num_patches
    assert sd["var"].shape == (T, D)
    assert sd["blocks.0.class_embed"].shape == (cfg.num_classes, 1, C)
    assert sd["blocks.0.attn_blocks.0.attention.qkv.weight"].shape == (3 * C, C)
    assert sd["blocks.0.proj_out.weight"].shape == (2 * D, C)
    assert torch.equal(sd["blocks.1.attn_mask"], torch.tril(torch.ones(T, T)))


def test_odd_blocks_see_flipped_tokens(model):
    """Block 1 is autoregressive in flipped order: changing the last token moves earlier outputs."""
    x = torch.randn(2, model.cfg.num_patches, model.cfg.token_dim)
    y = torch.tensor([1, 2])
    with torch.no_grad():
        z0, _ = model.blocks[1](x, y)
        x2 = x.clone()
        x2[:, -1] += 1.0
        z1, _ = model.blocks[1](x2, y)
        e0, _ = model.blocks[0](x, y)
        e1, _ = model.blocks[0](x2, y)
    assert (z1[:, :-1] - z0[:, :-1]).abs().max() > 1e-4  # flipped: last token conditions the rest
    assert (e1[:, :-1] - e0[:, :-1]).abs().max() == 0  # identity: last token conditions nothing


def test_uint8_labels_mean_classes_not_a_mask(model):
    """MNIST stores labels as uint8; they must pick class embeddings like int64 labels do."""
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    y = torch.tensor([3, 0, 9, 3])
    with torch.no_grad():
        z_long, _, ld_long = model(x, y)
        z_u8, _, ld_u8 = model(x, y.to(torch.uint8))
    assert torch.equal(z_long, z_u8) and torch.equal(ld_long, ld_u8)


def test_plain_state_dict_roundtrip_with_options(tmp_path, model):
    path = tmp_path / "official.pth"
    torch.save(model.state_dict(), path)  # no sidecar, as an official file
    assert load_checkpoint(path).cfg == model.cfg  # geometry inferred
    with pytest.raises(UserError, match="patch_size 7 does not fit token size 16"):
        load_checkpoint(path, img_size=28, patch_size=7)
    m2 = load_checkpoint(path, img_size=28, patch_size=4)
    assert m2.cfg == model.cfg and m2.fingerprint == model.fingerprint
    save_checkpoint(m2, tmp_path / "copy.pth")
    assert load_checkpoint(tmp_path / "copy.pth").fingerprint == model.fingerprint


def test_loading_bad_checkpoints_names_the_problem(tmp_path, model):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x80\x02garbage" * 10)
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(bad, img_size=28, patch_size=4)
    sd = dict(model.state_dict())
    del sd["blocks.2.attn_blocks.1.mlp.main.2.bias"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(UserError, match=r"missing key 'blocks\.2\.attn_blocks\.1\.mlp\.main\.2\.bias'"):
        load_checkpoint(tmp_path / "missing.pth", img_size=28, patch_size=4)
    sd = dict(model.state_dict()) | {"blocks.0.extra": torch.zeros(1)}
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(UserError, match="unexpected key 'blocks.0.extra'"):
        load_checkpoint(tmp_path / "extra.pth", img_size=28, patch_size=4)
    with pytest.raises(UserError, match="tokens"):
        load_checkpoint(BUNDLED, img_size=32, patch_size=4)


def test_schedule_json_roundtrip(model):
    s = builtin_schedule("jacobi:segments=3,max_iters=5,init=z,tol=0.01,anderson=2", model).with_provenance(note="x")
    s2 = Schedule.from_json(s.to_json())
    assert s2 == s and all(p.anderson == 2 for p in s2.plans)
    assert [p.block for p in s2.plans] == list(range(model.cfg.num_blocks - 1, -1, -1))
    assert json.loads(s.to_json())["schema_version"] == 3


def test_version_1_schedule_files_still_load(model):
    """Files written before the `anderson` field (e.g. the committed study) load as plain Jacobi."""
    d = builtin_schedule("jacobi:segments=2", model).to_dict()
    d["schema_version"] = 1
    for b in d["blocks"]:
        del b["anderson"]
    s = Schedule.from_dict(d)
    assert all(p.anderson == 0 for p in s.plans)
    study = resolve_schedule(str(BUNDLED.parent / "tune" / "schedule.json"), model)
    assert all(p.anderson == 0 for p in study.plans) and study.schema_version == 3  # upgraded on load


def _doc(model, **over):
    d = builtin_schedule("jacobi:segments=2", model).to_dict()
    d["blocks"] = [dict(b) for b in d["blocks"]]
    for k, v in over.items():
        if k.startswith("b0_"):
            d["blocks"][0][k[3:]] = v
        else:
            d[k] = v
    return d


@pytest.mark.parametrize("over,msg", [
    ({"schema_version": 99}, "unknown schema_version 99"),
    ({"b0_segments": 0}, "segments must be >= 1"),
    ({"b0_max_iters": 0}, "max_iters must be >= 1"),
    ({"b0_init": "random"}, "unknown init 'random'"),
    ({"b0_tol": -1}, "tol must be"),
    ({"b0_segments": 50}, "exceeds the sequence length T=49"),
    ({"b0_block": 0}, "expected 3"),
    ({"b0_anderson": 9}, "anderson must be 0"),
    ({"b0_anderson": 1.5}, "'anderson' must be an integer"),
    ({"b0_accel": 2}, "unknown key"),
])
def test_schedule_validation_messages(model, tmp_path, over, msg):
    p = tmp_path / "s.json"
    p.write_text(json.dumps(_doc(model, **over)))
    with pytest.raises(UserError, match=msg):
        resolve_schedule(str(p), model)


def test_schedule_refuses_wrong_block_count_malformed_json_and_other_models(model, tmp_path):
    d = _doc(model)
    d["blocks"] = d["blocks"][:3]
    (tmp_path / "short.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="has 3 blocks but the model has 4"):
        resolve_schedule(str(tmp_path / "short.json"), model)
    (tmp_path / "bad.json").write_text('{"schema_version": 1,')
    with pytest.raises(UserError, match="malformed JSON"):
        resolve_schedule(str(tmp_path / "bad.json"), model)
    d = _doc(model)
    d["fingerprint"]["weights_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="force=True"):
        resolve_schedule(str(tmp_path / "other.json"), model)
    assert resolve_schedule(str(tmp_path / "other.json"), model, force=True).plans


def test_builtin_schedules(model):
    T, B = model.cfg.num_patches, model.cfg.num_blocks
    seq = builtin_schedule("sequential", model)
    assert all(p.segments == T and p.max_iters == 1 for p in seq.plans)
    sejd = builtin_schedule("sejd:tol=0.5", model)
    assert sejd.plans[0].segments == T and sejd.plans[0].block == B - 1
    assert all(p.segments == 1 and p.tol == 0.5 for p in sejd.plans[1:])
    j = builtin_schedule("jacobi:segments=7", model)
    assert all(p.max_iters == 7 for p in j.plans)
    for bad, msg in [("jacobi:segmnts=2", "unknown parameter"), ("jacobi:segments=x", "not a int"),
                     ("warp", "unknown schedule")]:
        with pytest.raises(UserError, match=msg):
            builtin_schedule(bad, model)
