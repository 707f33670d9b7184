"""Online spherical k-means for the Routing Transformer (Roy, Saffar, Vaswani, Grangier 2021,
"Efficient Content-Based Sparse Attention with Routing Transformers", section 4.2).

Centroids live on the unit sphere; a vector is assigned to the centroid of largest cosine
similarity. `RoutingCentroids.update` does one mini-batch step with an exponential moving
average: each cluster's centroid moves toward the mean of the normalised vectors assigned to
it, mu <- normalise(decay * mu + (1 - decay) * mean). The paper writes the EMA with the sums of
the assigned queries and keys; the mean keeps the step size independent of how many tokens a
batch holds (as in lucidrains' routing-transformer), and a cluster that gets no vector keeps its
centroid. Centroids are learned by this EMA only, never by gradients (they are a buffer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._checks import check_int


class RoutingCentroids(torch.nn.Module):
    """k-means centroids [H, C, D] for routing attention, updated by EMA.

    Args:
        num_clusters: C.
        head_dim: D.
        num_heads: H, one set of centroids per head; 1 shares one set among all heads.
        decay: EMA decay in [0, 1) (0.999 as in the paper; lower moves faster).
        eps: guards the normalisation of zero vectors.
        generator: draws the initial centroids (normalised Gaussians); torch's global generator
            when None.
        device: where the centroids live.

    Use: pass the module (or its `centroids`) to `routing_attention(..., centroids=...)`; in
    training, call `update(x)` yourself (e.g. `update(torch.cat([q, k], dim=2))` with k's heads
    repeated under GQA; for a padded batch, `mask=torch.cat([real, real], dim=1)` so pad tokens
    do not move the centroids). `routing_attention` never changes the centroids.
    """

    def __init__(self, num_clusters, head_dim, num_heads=1, decay=0.999, eps=1e-6, generator=None, device=None):
        super().__init__()
        check_int("num_clusters", num_clusters, 1)
        check_int("head_dim", head_dim, 1)
        check_int("num_heads", num_heads, 1)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be a float in [0, 1), got {decay!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.decay = float(decay)
        self.eps = float(eps)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        init = torch.randn(num_heads, num_clusters, head_dim, generator=generator, device=gen_device)
        self.register_buffer("centroids", F.normalize(init, dim=-1, eps=self.eps).to(device))

    @property
    def num_heads(self):
        return self.centroids.shape[0]

    @property
    def num_clusters(self):
        return self.centroids.shape[1]

    @property
    def head_dim(self):
        return self.centroids.shape[2]

    def extra_repr(self):
        return f"num_clusters={self.num_clusters}, head_dim={self.head_dim}, num_heads={self.num_heads}, " \
               f"decay={self.decay}"

    def _per_head(self, x):
        """x [B, H, N, D] -> normalised float32 [H', T, D] matching the centroid heads."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"x must have shape (batch, heads, length, {self.head_dim}), got {tuple(x.shape)}")
        if x.shape[1] != self.num_heads and self.num_heads != 1:
            raise ValueError(f"x has {x.shape[1]} heads but the centroids have {self.num_heads} "
                             "(expected the same number, or centroids with num_heads=1)")
        if x.device != self.centroids.device:
            raise ValueError(f"x is on {x.device} but the centroids are on {self.centroids.device}")
        return self._flatten_heads(F.normalize(x.detach().float(), dim=-1, eps=self.eps))

    def _flatten_heads(self, x):
        """[B, H, N, E] -> [H', T, E], the token order `_as_bhn` undoes."""
        if self.num_heads == 1:
            return x.reshape(1, -1, x.shape[-1])  # every head's tokens feed the shared centroids
        return x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])

    def _mask_weights(self, mask, x):
        """bool mask [B, N] (True = a real token) -> float32 [H', T]: 1 for real tokens, 0 for pads."""
        bsz, heads, n, _ = x.shape
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor of shape ({bsz}, {n}) (True = a real token), got {got}")
        if tuple(mask.shape) != (bsz, n):
            raise ValueError(f"mask must have shape (batch, length) = ({bsz}, {n}) like x, got {tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
        return self._flatten_heads(mask[:, None, :, None].expand(bsz, heads, n, 1).float())[..., 0]

    def _nearest(self, xs):
        """[H', T, D] normalised -> [H', T] index of the most similar centroid."""
        return torch.matmul(xs, self.centroids.float().transpose(-1, -2)).argmax(dim=-1)

    def _as_bhn(self, nearest, shape):
        """[H', T] -> [B, H, N], undoing `_per_head`."""
        b, h, n, _ = shape
        if self.num_heads == 1:
            return nearest.reshape(b, h, n)
        return nearest.reshape(h, b, n).transpose(0, 1)

    @torch.no_grad()
    def assign(self, x):
        """Index of the nearest centroid (cosine) of each vector: x [B, H, N, D] -> int64 [B, H, N]."""
        return self._as_bhn(self._nearest(self._per_head(x)), x.shape)

    @torch.no_grad()
    def update(self, x, mask=None):
        """One mini-batch k-means step with EMA on x [B, H, N, D]; returns the assignments used
        ([B, H, N], made with the centroids before the step).

        mask: bool [B, N], True = a real token; only those move the centroids (pad tokens are
        still assigned in the result). None: every token counts."""
        xs = self._per_head(x)  # [H', T, D]
        nearest = self._nearest(xs)  # [H', T]
        heads, clusters, dim = self.centroids.shape
        if mask is None:
            weight = torch.ones_like(xs[..., 0])  # [H', T]
        else:
            weight = self._mask_weights(mask, x)
            xs = xs * weight.unsqueeze(-1)  # a pad adds nothing to its cluster's sum
        sums = torch.zeros(heads, clusters, dim, device=xs.device).scatter_add_(
            1, nearest.unsqueeze(-1).expand(-1, -1, dim), xs)  # [H, C, D]
        counts = torch.zeros(heads, clusters, device=xs.device).scatter_add_(1, nearest, weight)
        means = sums / counts.clamp(min=1).unsqueeze(-1)
        old = self.centroids.float()
        moved = F.normalize(self.decay * old + (1 - self.decay) * means, dim=-1, eps=self.eps)
        self.centroids.copy_(torch.where((counts > 0).unsqueeze(-1), moved, old))
        return self._as_bhn(nearest, x.shape)


def initial_centroids(keys, num_clusters, eps=1e-6):
    """Deterministic centroids from the data when none are given: the normalised keys at
    `num_clusters` evenly spaced positions (linspace over 0..N-1, rounded), per sequence and kv
    head. keys [B, Hkv, N, D] -> float32 [B, Hkv, C, D]."""
    n = keys.shape[2]
    positions = torch.linspace(0, n - 1, num_clusters, device=keys.device).round().long()
    return F.normalize(keys.detach().float()[:, :, positions], dim=-1, eps=eps)
