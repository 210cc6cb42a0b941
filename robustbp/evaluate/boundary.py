"""Distance to the decision boundary by sampling on spheres (spectral paper §4.2.3, Fig. 4).

For a point x with predicted class c = argmax f(x), sample `n_samples` points uniformly on the
L2 sphere of radius r around x and ask whether some sample is classified differently from c;
the distance is the smallest such r, found by doubling r until a change is seen and then a
binary search. The same unit directions u₁..u_S ~ N(0, I)/‖·‖ are scaled to every radius (each
set x + r·uⱼ is uniform on its sphere); for a convex decision cell, such as a linear
classifier's, "some sample changes class" is then monotone in r and the search is exact for
the sampled directions.

The result is the distance along the best sampled direction, hence ≥ the true distance; with
S samples in d dimensions the gap shrinks as S grows and widens as d grows (in high dimension a
random direction is nearly orthogonal to the boundary's normal). Samples are not clipped to
[0, 1]: this is the distance in input space, as in the paper.
"""
from __future__ import annotations

import torch
from torch import nn

from robustbp.validation import check_images, check_nonnegative, check_positive_int


def boundary_distance(
    model: nn.Module,
    x: torch.Tensor,
    n_samples: int = 1000,
    initial_radius: float = 0.5,
    max_radius: float = 1e3,
    rel_tol: float = 1e-3,
    generator: torch.Generator | None = None,
    max_rows: int = 65536,
) -> torch.Tensor:
    """One boundary distance per point, shape (N,).

    x: (N, ...) images in [0, 1]. n_samples: points per sphere. The radius starts at
    `initial_radius` and doubles until some sample changes class (up to `max_radius`; points with
    no change there get inf); the binary search then stops when (r_hi - r_lo) ≤ rel_tol·r_hi and
    returns r_hi, the smallest radius seen to change class. `max_rows` bounds how many sampled
    points go through the model at once. The model is used as given (call it in eval mode).
    """
    check_images(x, "x")
    check_positive_int(n_samples, "n_samples")
    initial_radius = check_nonnegative(initial_radius, "initial_radius")
    max_radius = check_nonnegative(max_radius, "max_radius")
    rel_tol = check_nonnegative(rel_tol, "rel_tol")
    if initial_radius == 0 or rel_tol == 0 or max_radius < initial_radius:
        raise ValueError(
            "boundary_distance needs 0 < initial_radius <= max_radius and rel_tol > 0, got "
            f"initial_radius={initial_radius}, max_radius={max_radius}, rel_tol={rel_tol}"
        )
    points_per_chunk = max(1, max_rows // n_samples)
    distances = [
        _distance_chunk(
            model, x[i : i + points_per_chunk], n_samples, initial_radius, max_radius, rel_tol, generator
        )
        for i in range(0, x.shape[0], points_per_chunk)
    ]
    return torch.cat(distances)


def _distance_chunk(model, x, n_samples, initial_radius, max_radius, rel_tol, generator) -> torch.Tensor:
    n, shape = x.shape[0], x.shape[1:]
    device = generator.device if generator is not None else x.device
    directions = torch.randn((n, n_samples, *shape), generator=generator, device=device, dtype=x.dtype).to(x.device)
    directions = directions / directions.flatten(2).norm(dim=2).view(n, n_samples, *[1] * len(shape))
    with torch.no_grad():
        center_class = model(x).argmax(dim=1)

        def changes_class(radius: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
            """(n,) bool: for the active points, some x + r·uⱼ on the sphere of radius r is not
            classified as the center; False for the others (which are not evaluated)."""
            changed = torch.zeros(n, dtype=torch.bool, device=x.device)
            index = torch.nonzero(active).flatten()
            if len(index):
                scale = radius[index].view(-1, 1, *[1] * len(shape))
                samples = x[index].unsqueeze(1) + scale * directions[index]
                predicted = model(samples.reshape(-1, *shape)).argmax(dim=1).view(len(index), n_samples)
                changed[index] = (predicted != center_class[index].unsqueeze(1)).any(dim=1)
            return changed

        low = torch.zeros(n, dtype=x.dtype, device=x.device)
        high = torch.full((n,), initial_radius, dtype=x.dtype, device=x.device)
        found = changes_class(high, torch.ones(n, dtype=torch.bool, device=x.device))
        growing = ~found & (high < max_radius)
        while bool(growing.any()):
            low = torch.where(growing, high, low)
            high = torch.where(growing, (high * 2).clamp(max=max_radius), high)
            found = found | changes_class(high, growing)
            growing = ~found & (high < max_radius)
        searching = found & (high - low > rel_tol * high)
        while bool(searching.any()):
            middle = (low + high) / 2
            changed = changes_class(middle, searching)
            high = torch.where(searching & changed, middle, high)
            low = torch.where(searching & ~changed, middle, low)
            searching = found & (high - low > rel_tol * high)
        return torch.where(found, high, torch.full_like(high, float("inf")))
