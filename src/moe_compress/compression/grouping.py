"""Expert groups for several cores per projection: k-means on what the experts compute, one core per group.

Data-free, an expert is its weights W_e flattened; with calibration statistics, its whitened weights W_e L_e
(M_e = L_e L_e^T), whose distances are the output differences on the inputs routed to it. Lloyd's iterations from a
seeded k-means++ start; groups never end empty (an emptied one takes the largest group's farthest member).
Shapes: E experts, out x in a projection's matrices, G groups.
"""

from __future__ import annotations

import torch

from moe_compress.fit import cholesky


def expert_features(W: torch.Tensor, metric: torch.Tensor | None = None) -> torch.Tensor:
    """[E, out*in]: each expert's weights, whitened by the Cholesky factor of its metric M [E, in, in] when given."""
    if metric is not None:
        W = W @ cholesky(metric).to(W.dtype)
    return W.flatten(1)


def kmeans(points: torch.Tensor, groups: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Group labels [E] in 0..groups-1 of `points` [E, d], every group non-empty; groups <= E."""
    E = points.shape[0]
    if not 1 <= groups <= E:
        raise ValueError(f"num_cores={groups} needs 1 <= num_cores <= the number of experts ({E})")
    generator = torch.Generator().manual_seed(seed)
    points = points.double()
    centroids = points[torch.randint(E, (1,), generator=generator)]
    for _ in range(1, groups):  # k-means++: next centroid drawn by squared distance to the nearest one
        distance = torch.cdist(points, centroids).min(1).values.square()
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        centroids = torch.cat([centroids, points[torch.multinomial(weights.float(), 1, generator=generator)]])
    labels = torch.cdist(points, centroids).argmin(1)
    for _ in range(iters):
        distance = torch.cdist(points, centroids)
        labels = distance.argmin(1)
        for g in range(groups):
            if not (labels == g).any():
                largest = torch.bincount(labels, minlength=groups).argmax()
                own = distance.gather(1, labels[:, None]).squeeze(1).masked_fill(labels != largest, -1)
                labels[own.argmax()] = g
        moved = torch.stack([points[labels == g].mean(0) for g in range(groups)])
        if torch.equal(moved, centroids):
            break
        centroids = moved
    return labels
