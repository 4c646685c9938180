"""The learnable matching network of ESCAPE (paper sec. 5.2; docs/method.md, "Matching network").

Novel keypoints (tokens from a second feature extractor) and the L
super-keypoints (learned tokens) attend to themselves and to each other for
``blocks`` rounds; their inner products are the scores of a log-domain optimal
transport with a dustbin row (escape_fast.ops.sinkhorn_log), whose output is
the soft assignment Q used by escape_prototypes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from escape_fast import ops


def sincos_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sine-cosine embedding [..., dim] of integer (or real) positions [...]."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angle = positions.to(torch.float32)[..., None] * freq
    return torch.cat((angle.sin(), angle.cos()), dim=-1)


class Attention(nn.Module):
    """Multi-head attention with pre-LayerNorm on queries and keys."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner)
        self.to_kv = nn.Linear(dim, 2 * inner)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.to_q(self.norm_q(x))
        k, v = self.to_kv(self.norm_kv(context)).chunk(2, dim=-1)

        def split(t):  # [b or 1, n, inner] -> [b, heads, n, head_dim]
            t = t.reshape(t.shape[0], -1, self.heads, self.head_dim).transpose(1, 2)
            return t.expand(b, -1, -1, -1)

        mask = None
        if key_valid is not None:
            # A query whose keys are all invalid would softmax over nothing: let
            # it attend to everything (its output is ignored downstream).
            usable = key_valid | ~key_valid.any(dim=1, keepdim=True)
            mask = usable[:, None, None, :]
        y = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class MatchingBlock(nn.Module):
    """Self-attention + FF on each side, then cross-attention both ways + FF.

    ``sk`` may come with batch 1 while it does not depend on the input yet
    (before the first cross-attention): its self-attention, the costliest
    part (L x L), then runs once for the whole batch, and it broadcasts as
    the keys of the keypoints' cross-attention.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, mlp: int):
        super().__init__()
        self.self_kp, self.self_sk = Attention(dim, heads, head_dim), Attention(dim, heads, head_dim)
        self.ff_kp1, self.ff_sk1 = FeedForward(dim, mlp), FeedForward(dim, mlp)
        self.cross_kp, self.cross_sk = Attention(dim, heads, head_dim), Attention(dim, heads, head_dim)
        self.ff_kp2, self.ff_sk2 = FeedForward(dim, mlp), FeedForward(dim, mlp)

    def forward(self, kp, sk, kp_valid):
        kp = kp + self.self_kp(kp, kp, kp_valid)
        kp = kp + self.ff_kp1(kp)
        sk = sk + self.self_sk(sk, sk, None)
        sk = sk + self.ff_sk1(sk)
        kp_new = kp + self.cross_kp(kp, sk, None)
        sk = sk.expand(kp.shape[0], -1, -1)
        sk_new = sk + self.cross_sk(sk, kp, kp_valid)
        return kp_new + self.ff_kp2(kp_new), sk_new + self.ff_sk2(sk_new)


class _Transport(nn.Module):
    """What every matching network shares: ``scores`` (defined by each) of
    keypoints against the L super-keypoints ``omega``, then the log-domain
    transport with the dustbin score ``bin_score``. Both embed keypoints and
    super-keypoints with LayerNorm-Linear-LayerNorm and stack ``blocks``
    of their own ``BLOCK``."""

    BLOCK: type[nn.Module]

    def __init__(self, num_super: int, dim: int = 256, blocks: int = 6, heads: int = 8, head_dim: int = 64,
                 mlp: int = 2048, grid: int = 64, iters: int = 50, backend: str = "auto"):
        super().__init__()
        self.dim, self.grid, self.iters, self.backend = dim, grid, iters, backend
        self.kp_embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.LayerNorm(dim))
        self.sk_embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.LayerNorm(dim))
        self.omega = nn.Parameter(torch.randn(num_super, dim) * 1e-3)
        self.blocks = nn.ModuleList(self.BLOCK(dim, heads, head_dim, mlp) for _ in range(blocks))
        self.bin_score = nn.Parameter(torch.tensor(1.0))

    @property
    def num_super(self) -> int:
        return self.omega.shape[0]

    def forward(self, features, keypoints, visible):
        """Log assignment [B, K + 1, L] for one shot (inputs [B, K, C], [B, K, 2], [B, K])."""
        s = self.scores(features, keypoints, visible)
        return ops.sinkhorn_log(s, self.bin_score, visible.bool(), self.iters, backend=self.backend)

    def assign_scores(self, scores, visible):
        """Multi-shot log assignment [B, K + 1, L] from per-shot scores [B, S, K, L].

        A shot's scores depend on that image alone, so an evaluation computes
        them once per distinct support instance and gathers them here for
        every support set that uses it.
        """
        fused, valid = ops.fuse_shot_scores(scores, visible)
        return ops.sinkhorn_log(fused, self.bin_score, valid, self.iters, backend=self.backend)


class MatchingNetwork(_Transport):
    """Scores and soft assignment of K keypoints to L super-keypoints.

    Args:
        num_super (int): L.
        dim (int): token width C (256).
        blocks, heads, head_dim, mlp: 6, 8, 64, 2048 in the paper.
        grid (int): heatmap side, for the geometric encoding of row * grid + col.
        iters (int): Sinkhorn iterations (50).
    """

    BLOCK = MatchingBlock

    def scores(self, features: torch.Tensor, keypoints: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Scores [B, K, L] from keypoint features [B, K, C], cells [B, K, 2] (x, y), visible [B, K]."""
        cell = keypoints.round().clamp(0, self.grid - 1)
        index = cell[..., 1] * self.grid + cell[..., 0]
        kp = self.kp_embed(features) + sincos_embedding(index, self.dim).to(features.dtype)
        kp = kp * visible[..., None].to(kp.dtype)  # invisible keypoints are 0 tokens
        z = torch.arange(self.num_super, device=features.device)
        sk = self.sk_embed(self.omega) + sincos_embedding(z, self.dim).to(self.omega.dtype)
        sk = sk[None]  # the same for every image until the first cross-attention
        for block in self.blocks:
            kp, sk = block(kp, sk, visible)
        return kp @ sk.transpose(1, 2) / math.sqrt(self.dim)


# --------------------------------------------------------------------------
# the authors' matching network (docs/authors.md): what their checkpoints hold
# --------------------------------------------------------------------------
def authors_sincos(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The authors' sine-cosine embedding [..., dim]: frequencies 10000^(-i / (dim/2 - 1)), i < dim/2
    (their divisor is one less than :func:`sincos_embedding`'s), all sines, then all cosines."""
    half = dim // 2
    # 1 / 10000^x rather than 10000^-x: a quarter of the float32 frequencies differ by an ulp otherwise
    freq = 1.0 / 10000.0 ** (torch.arange(half, device=positions.device, dtype=torch.float32) / (half - 1))
    angle = positions.to(torch.float32)[..., None] * freq
    return torch.cat((angle.sin(), angle.cos()), dim=-1)


def _heads(t: torch.Tensor, heads: int, batch: int) -> torch.Tensor:
    """[b or 1, n, heads * d] -> [batch, heads, n, d] (channel = head * d + i)."""
    t = t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
    return t.expand(batch, -1, -1, -1)


class AuthorsSelfAttention(nn.Module):
    """Pre-LayerNorm self-attention, one bias-free projection to q, k, v (in that order), no mask."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (_heads(t, self.heads, b) for t in self.to_qkv(self.norm(x)).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class AuthorsCrossAttention(nn.Module):
    """Cross-attention whose one LayerNorm is applied to the queries, the keys and the values alike."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, context):
        b = max(x.shape[0], context.shape[0])
        q = _heads(self.to_q(self.norm(x)), self.heads, b)
        k = _heads(self.to_k(self.norm(context)), self.heads, b)
        v = _heads(self.to_v(self.norm(context)), self.heads, b)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, x.shape[1], -1))


class AuthorsMatchingBlock(nn.Module):
    """Self-attention + FF on each side; then cross-attention both ways from
    the same inputs, each followed by an FF whose output is L2-normalized
    before its residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp: int):
        super().__init__()
        self.self_kp, self.self_sk = AuthorsSelfAttention(dim, heads, head_dim), AuthorsSelfAttention(dim, heads,
                                                                                                       head_dim)
        self.ff_kp1, self.ff_sk1 = FeedForward(dim, mlp), FeedForward(dim, mlp)
        self.cross_kp, self.cross_sk = AuthorsCrossAttention(dim, heads, head_dim), AuthorsCrossAttention(
            dim, heads, head_dim)
        self.ff_kp2, self.ff_sk2 = FeedForward(dim, mlp), FeedForward(dim, mlp)

    def forward(self, kp, sk):
        kp = kp + self.self_kp(kp)
        kp = kp + self.ff_kp1(kp)
        sk = sk + self.self_sk(sk)
        sk = sk + self.ff_sk1(sk)
        kp_new = kp + self.cross_kp(kp, sk)
        sk_new = sk + self.cross_sk(sk, kp)
        return (kp_new + F.normalize(self.ff_kp2(kp_new), dim=-1),
                sk_new + F.normalize(self.ff_sk2(sk_new), dim=-1))


class AuthorsMatchingNetwork(_Transport):
    """The matching network of the authors' code, computed as they do (docs/authors.md).

    Differences from :class:`MatchingNetwork`: a keypoint's position code is
    their sine-cosine of its rounded cell index plus 1 (0 for invisible
    keypoints) and the token itself is not zeroed; every image is padded to
    ``pad_to`` keypoints (68, MP-100's largest) and nothing is masked, so
    padded and invisible tokens take part in every attention; bias-free
    attention projections with their LayerNorms; the cross-attention FF
    outputs are L2-normalized; the super-keypoint tokens are scaled down
    together when their largest norm exceeds 100. Scores, fusion over shots
    and the transport (ops.sinkhorn_log) are the same.
    """

    NORM_CLAMP = 100.0

    BLOCK = AuthorsMatchingBlock

    def __init__(self, num_super: int, pad_to: int = 68, **sizes):
        super().__init__(num_super, **sizes)
        self.pad_to = pad_to

    def scores(self, features: torch.Tensor, keypoints: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Scores [B, K, L] from keypoint features [B, K, C] (zero where not
        visible), cells [B, K, 2] (x, y) and visible [B, K]."""
        b, k, _ = features.shape
        # Their loader brings every category to exactly pad_to keypoints, and every token takes
        # part in attention: rows past pad_to that no support has (a batch padded to a larger
        # category) are left out, or they would change every softmax.
        rows = k
        if k > self.pad_to and not visible[:, self.pad_to :].any():
            rows = self.pad_to
            features, keypoints, visible = features[:, :rows], keypoints[:, :rows], visible[:, :rows]
        pad = max(self.pad_to - rows, 0)
        # the cell of the rounded centre (their Gaussian target's argmax), clamped into the grid
        cell = torch.floor(keypoints + 0.5).clamp(0, self.grid - 1)
        code = authors_sincos(cell[..., 1] * self.grid + cell[..., 0], self.dim).to(features.dtype) + 1
        code = code * visible[..., None].to(code.dtype)
        feats = F.pad(features * visible[..., None].to(features.dtype), (0, 0, 0, pad))
        kp = self.kp_embed(feats) + F.pad(code, (0, 0, 0, pad))
        z = torch.arange(self.num_super, device=features.device)
        sk = (self.sk_embed(self.omega) + authors_sincos(z, self.dim).to(self.omega.dtype))[None]
        for block in self.blocks:
            kp, sk = block(kp, sk)
        sk = sk.expand(b, -1, -1)
        largest = sk.norm(dim=-1).amax(-1, keepdim=True)[..., None].detach()
        sk = sk / largest * largest.clamp_max(self.NORM_CLAMP)
        scores = (kp[:, :rows] @ sk.transpose(1, 2)) / math.sqrt(self.dim)
        return F.pad(scores, (0, 0, 0, k - rows))
