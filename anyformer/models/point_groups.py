"""Grouping a point cloud into local patches: farthest-point sampling of centres and their
k nearest neighbours (the tokenization of Point-BERT, Yu et al. 2022, and Point-MAE, Pang et
al. 2022, after PointNet++, Qi et al. 2017). Plain batched torch on any device; no gradients.

Legend: `b` batch, `P` points per cloud, `G` groups (centres), `K` points per group.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_points(points: Tensor, need: int, what: str) -> None:
    """Raise ValueError unless `points` is a float (b, P, 3) tensor with P >= `need` (`what`
    says which setting needs them)."""
    if points.dim() != 3 or points.shape[-1] != 3:
        hint = "; for one cloud add a batch dimension (points[None])" if points.dim() == 2 and points.shape[-1] == 3 else ""
        raise ValueError(f"points must have shape (batch, points, 3), got {tuple(points.shape)}{hint}")
    if not points.is_floating_point():
        raise ValueError(f"points must hold float coordinates, got dtype {points.dtype}")
    if points.shape[1] < need:
        raise ValueError(
            f"the point clouds have {points.shape[1]} points, fewer than the {need} that {what} needs; "
            "give clouds with more points or lower that setting"
        )


def farthest_from_centroid(points: Tensor) -> Tensor:
    """(b, P, 3) -> (b,) index of each cloud's point farthest from its centroid: a start for
    farthest-point sampling that does not depend on the order of the points (up to exact ties)."""
    centroid = points.mean(1, keepdim=True)  # (b, 1, 3)
    return ((points - centroid) ** 2).sum(-1).argmax(-1)


@torch.no_grad()
def farthest_point_sample(points: Tensor, num_samples: int, start: Tensor | None = None) -> Tensor:
    """Greedy farthest-point sampling: (b, P, 3) -> (b, G) indices of `num_samples` distinct points.

    The first index is `start` ((b,) indices; default `farthest_from_centroid`); each next one is
    the point whose squared distance to the nearest point chosen so far is largest (the lowest
    index among exact ties, as `argmax` breaks them). Chosen points are never chosen again, so
    the indices are distinct even when a cloud has coincident points. Distances in fp32 (fp64
    for fp64 input)."""
    check_points(points, num_samples, f"sampling {num_samples} centres")
    pts = points if points.dtype == torch.float64 else points.float()
    b, n, _ = pts.shape
    rows = torch.arange(b, device=pts.device)
    chosen = torch.empty(b, num_samples, dtype=torch.long, device=pts.device)
    chosen[:, 0] = farthest_from_centroid(pts) if start is None else start
    nearest = torch.full((b, n), float("inf"), dtype=pts.dtype, device=pts.device)  # (b, P) to the chosen set
    for i in range(num_samples):
        last = pts[rows, chosen[:, i]]  # (b, 3)
        nearest = torch.minimum(nearest, ((pts - last[:, None]) ** 2).sum(-1))
        nearest[rows, chosen[:, i]] = -1.0  # never again
        if i + 1 < num_samples:
            chosen[:, i + 1] = nearest.argmax(-1)
    return chosen


@torch.no_grad()
def knn(points: Tensor, queries: Tensor, k: int) -> Tensor:
    """(b, P, 3) points and (b, G, 3) queries -> (b, G, K) indices of each query's `k` nearest
    points, nearest first (Euclidean, computed from coordinate differences, not the
    matrix-product shortcut, so equal distances stay equal)."""
    check_points(points, k, f"groups of {k} neighbours")
    dist = torch.cdist(queries.float(), points.float(), compute_mode="donot_use_mm_for_euclid_dist")  # (b, G, P)
    return dist.topk(k, dim=-1, largest=False, sorted=True).indices


def gather_points(points: Tensor, index: Tensor) -> Tensor:
    """(b, P, c) values and (b, ...) indices -> (b, ..., c): the values at those indices."""
    b, c = points.shape[0], points.shape[-1]
    flat = index.reshape(b, -1)  # (b, m)
    out = points.gather(1, flat[..., None].expand(-1, -1, c))  # (b, m, c)
    return out.reshape(*index.shape, c)


def group_points(points: Tensor, num_groups: int, group_size: int) -> tuple[Tensor, Tensor]:
    """Cut clouds into local patches: (b, P, 3) -> centres (b, G, 3) by farthest-point sampling
    and groups (b, G, K, 3), the K nearest points of each centre relative to it (nearest
    first; the centre itself, at the origin, among them). Gradients flow to the coordinates,
    not through the (discrete) choices."""
    centres = gather_points(points, farthest_point_sample(points, num_groups))  # (b, G, 3)
    neighbours = gather_points(points, knn(points, centres, group_size))  # (b, G, K, 3)
    return centres, neighbours - centres[:, :, None]
