"""TarFlow (arXiv 2412.06329): a normalizing flow of causal-transformer blocks.

Each block is an affine autoregressive transform over a sequence of T patch tokens. In the
block's own token order (identity for even block index, flipped for odd), token t is mapped as

    z_t = (x_t - b_t(x_<t)) * exp(-a_t(x_<t)),   a_0 = b_0 = 0,

where (a_t, b_t) is the transformer's output at position t-1 (outputs are shifted by one token).
Parameter and buffer names follow the official TarFlow checkpoints key for key, so their `.pth`
state_dicts load unchanged.

The transformer is written once, in `MetaBlock.run`: training (`transform_params`), the eager
sampler (`MetaBlock.step`, K/V written by slice into a `KVCache`) and the static-buffer / CUDA-graph
solver (`tarflow.graphs`, K/V written by `index_copy_`) differ only in the `KVWriter` they pass,
so the three cannot drift apart numerically.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TarFlowConfig:
    img_size: int = 28
    in_channels: int = 1  # image channels; a token holds in_channels * patch_size**2 values
    patch_size: int = 4
    channels: int = 128  # transformer width
    num_blocks: int = 4  # flow blocks; token order alternates identity / flipped
    layers_per_block: int = 2  # transformer layers inside each flow block
    head_dim: int = 64  # not recoverable from a state_dict, hence stored in the sidecar
    expansion: int = 4  # MLP hidden = expansion * channels
    num_classes: int = 0  # 0 = unconditional (no class_embed parameter)
    nvp: bool = True  # True: affine (log-scale and shift); False: shift only

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    def to_dict(self) -> dict:
        return asdict(self)


def exp_fp32(a):
    """exp computed in float32 or wider (half-precision log-scales overflow), returned in a's dtype."""
    return torch.exp(a if a.dtype == torch.float64 else a.float()).type(a.dtype)


def shift_one(t):
    """Outputs at positions 0..T-2 become the parameters of tokens 1..T-1; token 0 gets zeros."""
    return torch.cat([torch.zeros_like(t[:, :1]), t[:, :-1]], dim=1)


def layer_norm(norm: nn.LayerNorm, x):
    """LayerNorm computed in at least float32 (keeps half-precision sampling stable)."""
    if x.dtype == torch.float64:
        return norm(x)
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(),
                        norm.eps).type(x.dtype)


class KVCache:
    """Preallocated keys/values for every layer of one flow block, written in place.

    Shape per layer: (batch, heads, T, head_dim). Samplers overwrite positions as tokens
    are (re)computed, so no tensor is ever concatenated inside a sampling loop.
    """

    def __init__(self, layers: int, batch: int, heads: int, T: int, head_dim: int,
                 device, dtype):
        shape = (layers, batch, heads, T, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)


# A KV writer stores one layer's keys and values of the span being run and says what the span's
# queries attend over: write_kv(layer, k, v) -> (keys, values, mask or None), k and v (B, H, L, d).
KVWriter = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]]


class Attention(nn.Module):
    def __init__(self, channels: int, head_dim: int):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"channels {channels} is not a multiple of head_dim {head_dim}")
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)  # output rows ordered q | k | v
        self.proj = nn.Linear(channels, channels)
        self.num_heads = channels // head_dim
        self.head_dim = head_dim

    def forward(self, x, write_kv, q_scale: torch.Tensor | None = None):
        """Causal self-attention of the span x (B, L, C).

        `write_kv(k, v)` stores the span's K/V wherever the caller keeps them and returns the keys,
        values and mask the queries see (training: the span's own K/V under the causal mask).
        `q_scale` (B, 1, 1, 1) multiplies the queries of selected rows: the attention temperature
        of the unconditional pass."""
        B, L, C = x.shape
        h = layer_norm(self.norm, x)
        q, k, v = self.qkv(h).view(B, L, 3 * self.num_heads, self.head_dim).transpose(1, 2).chunk(3, dim=1)
        k, v, mask = write_kv(k, v)
        if q_scale is not None:
            q = q * q_scale
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, d)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class MLP(nn.Module):
    def __init__(self, channels: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.main = nn.Sequential(
            nn.Linear(channels, channels * expansion),
            nn.GELU(),
            nn.Linear(channels * expansion, channels),
        )

    def forward(self, x):
        return self.main(layer_norm(self.norm, x))


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, expansion: int):
        super().__init__()
        self.attention = Attention(channels, head_dim)
        self.mlp = MLP(channels, expansion)

    def forward(self, x, write_kv, q_scale=None):
        x = x + self.attention(x, write_kv, q_scale)
        return x + self.mlp(x)


class MetaBlock(nn.Module):
    """One flow block: a causal transformer that predicts (log-scale, shift) for the next token."""

    attn_mask: torch.Tensor

    def __init__(self, cfg: TarFlowConfig, flip: bool):
        super().__init__()
        T, D, C = cfg.num_patches, cfg.token_dim, cfg.channels
        self.flip = flip
        self.nvp = cfg.nvp
        self.proj_in = nn.Linear(D, C)
        self.pos_embed = nn.Parameter(torch.randn(T, C) * 1e-2)
        if cfg.num_classes:
            self.class_embed = nn.Parameter(torch.randn(cfg.num_classes, 1, C) * 1e-2)
        else:
            self.class_embed = None
        self.attn_blocks = nn.ModuleList(
            AttentionBlock(C, cfg.head_dim, cfg.expansion) for _ in range(cfg.layers_per_block))
        self.proj_out = nn.Linear(C, 2 * D if cfg.nvp else D)
        self.proj_out.weight.data.zero_()  # start as the identity map
        self.register_buffer("attn_mask", torch.tril(torch.ones(T, T)))
        self.register_buffer("causal", torch.ones(T, T).tril().bool(), persistent=False)

    def permute(self, x, dim: int = 1):
        """Block token order <-> image token order (a flip is its own inverse)."""
        return x.flip(dim) if self.flip else x

    def class_embedding(self, y: torch.Tensor | None, batch: int):
        """Class embedding per row; label -1 (or y=None) means unconditional (mean embedding)."""
        if self.class_embed is None:
            return None
        mean = self.class_embed.mean(dim=0)  # (1, C)
        if y is None:
            return mean.expand(batch, 1, -1)
        y = y.long()  # uint8 labels (as MNIST stores them) would index as a boolean mask
        uncond = (y < 0).view(-1, 1, 1)
        return torch.where(uncond, mean, self.class_embed[y.clamp(min=0)])

    def split(self, out):
        """Output projection -> (log-scale a, shift b)."""
        if self.nvp:
            a, b = out.chunk(2, dim=-1)
            return a, b
        return torch.zeros_like(out), out

    def transform_params(self, x, y=None):
        """Block-order tokens x (B, T, D) -> (a, b) of every token, shifted so token 0 gets (0, 0)."""
        return self.run(x, self.permute(self.pos_embed, 0), self.class_embedding(y, x.shape[0]),
                        lambda i, k, v: (k, v, self.causal), shift=True)

    def run(self, x, pos, class_emb, write_kv: KVWriter, q_scale=None, shift: bool = False):
        """The transformer, written once for training and both samplers.

        x (B, L, D) block-order tokens, pos (L, C) their rows of the block-order position table,
        class_emb (B, 1, C) or None; `write_kv` (see KVWriter) decides where each layer's K/V go
        and what the queries see. Returns (a, b), each (B, L, D): position i holds the transform
        parameters of the token after x[:, i], or with `shift` those of x[:, i] itself (zeros at 0)."""
        h = self.proj_in(x) + pos
        if class_emb is not None:
            h = h + class_emb
        for i, layer in enumerate(self.attn_blocks):
            h = layer(h, partial(write_kv, i), q_scale)
        out = self.proj_out(h)
        return self.split(shift_one(out) if shift else out)

    def forward(self, x, y=None):
        """x (B, T, D) in image order -> (z in image order, mean log|det| per dimension)."""
        x = self.permute(x)
        a, b = self.transform_params(x, y)
        z = (x - b) * exp_fp32(-a)
        return self.permute(z), -a.mean(dim=[1, 2])

    def step(self, x_span, start: int, cache: KVCache, pos_embed, class_emb, q_scale=None):
        """Run the transformer on block-order tokens [start, start + L) against the cache.

        Returns (a, b), each (B, L, D): the transform parameters of tokens start+1 .. start+L.
        `pos_embed` is the block-order position table and `class_emb` (B, 1, C) or None. The
        span's K/V are written by slice and the queries read the cache up to start + L."""
        L = x_span.shape[1]
        # a single query sees every cached key: no mask, which lets SDPA take its fastest path
        mask = self.causal[start:start + L, :start + L] if L > 1 else None

        def write(i, k, v):
            k_buf, v_buf = cache.k[i], cache.v[i]
            k_buf[:, :, start:start + L] = k
            v_buf[:, :, start:start + L] = v
            return k_buf[:, :, :start + L], v_buf[:, :, :start + L], mask

        return self.run(x_span, pos_embed[start:start + L], class_emb, write, q_scale)

    def new_cache(self, batch: int, device, dtype) -> KVCache:
        att = self.attn_blocks[0].attention
        return KVCache(len(self.attn_blocks), batch, att.num_heads, self.attn_mask.shape[0],
                       att.head_dim, device, dtype)


def weights_hash(state: dict) -> str:
    """sha256 over names and float32 values, so a float64 copy has the same fingerprint."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class TarFlow(nn.Module):
    var: torch.Tensor

    VAR_LR = 0.1  # running-average rate of the learned prior variance

    def __init__(self, cfg: TarFlowConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(MetaBlock(cfg, flip=bool(k % 2)) for k in range(cfg.num_blocks))
        self.register_buffer("var", torch.ones(cfg.num_patches, cfg.token_dim))
        self.meta: dict = {}  # where the checkpoint came from (sidecar, file name); set by loaders
        self._fp_cache: tuple[int, dict] | None = None

    @property
    def fingerprint(self) -> dict:
        """Architecture + sha256 of the weights: what a schedule file is checked against.

        Re-hashed only when a tensor was modified in place since the last call (tensor
        `_version` counters), so a model fresh from training and a loaded one agree. A dtype or
        device change keeps the fingerprint of the weights before it (see `_apply`), so a
        schedule tuned in float32 still fits the same weights cast to bfloat16."""
        if self._fp_cache is None or self._fp_cache[0] != self._weights_version():
            fp = {"arch": self.cfg.to_dict(), "weights_sha256": weights_hash(self.state_dict())}
            self._fp_cache = (self._weights_version(), fp)
        fp = self._fp_cache[1]
        return {"arch": dict(fp["arch"]), "weights_sha256": fp["weights_sha256"]}

    def _weights_version(self) -> int:
        return sum(t._version for t in self.state_dict().values())

    def _apply(self, fn, recurse=True):
        fp = self.fingerprint
        out = super()._apply(fn, recurse)
        self._fp_cache = (self._weights_version(), fp)
        return out

    def patchify(self, img):
        """(B, c, H, W) -> (B, T, c*p*p), tokens in raster order."""
        p = self.cfg.patch_size
        return F.unfold(img, p, stride=p).transpose(1, 2)

    def unpatchify(self, x):
        p, s = self.cfg.patch_size, self.cfg.img_size
        return F.fold(x.transpose(1, 2), (s, s), p, stride=p)

    def forward(self, img, y=None):
        """Image -> (latent tokens z, per-block outputs in image token order, summed log-det)."""
        x = self.patchify(img)
        outputs = []
        logdet = torch.zeros((), device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x, ld = block(x, y)
            logdet = logdet + ld
            outputs.append(x)
        return x, outputs, logdet

    def nll(self, z, logdet):
        """Mean negative log-likelihood per dimension (nats) under a standard-normal prior."""
        return 0.5 * z.pow(2).mean() + 0.5 * math.log(2 * math.pi) - logdet.mean()

    def update_prior(self, z):
        self.var.lerp_(z.detach().pow(2).mean(dim=0), self.VAR_LR)
