"""Distances between 2-D/low-D sample sets and a known Gaussian mixture: the yardsticks of the analytic tests."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from scipy.stats import chi2
from torch import Tensor

from stepdistill.teachers.gmm import GaussianMixture


def sliced_wasserstein2(x: Tensor, y: Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2: sqrt of the mean over random directions of the 1-D W2^2 (equal sample counts)."""
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein2 needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], num_projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px = (x.double().cpu() @ dirs).sort(dim=0).values
    py = (y.double().cpu() @ dirs).sort(dim=0).values
    return float(((px - py) ** 2).mean().sqrt())


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic; the true-vs-true floor is about 1/n)."""
    x, y = x.double().cpu(), y.double().cpu()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def nearest_mode(x: Tensor, mixture: GaussianMixture) -> Tensor:
    return torch.cdist(x.double().cpu(), mixture.means).argmin(dim=1)


def mode_histogram(x: Tensor, mixture: GaussianMixture, labels: Tensor | None = None) -> Tensor:
    """Normalized histogram of nearest modes; with labels, of (label, nearest mode) pairs."""
    k = mixture.means.shape[0]
    idx = nearest_mode(x, mixture)
    if labels is not None:
        idx = labels.cpu().long() * k + idx
        k = k * (int(labels.max()) + 1)
    return torch.bincount(idx, minlength=k).double() / len(idx)


def total_variation(p: Tensor, q: Tensor) -> float:
    n = max(len(p), len(q))
    p = torch.nn.functional.pad(p, (0, n - len(p)))
    q = torch.nn.functional.pad(q, (0, n - len(q)))
    return float(0.5 * (p - q).abs().sum())


def within_radius(x: Tensor, mixture: GaussianMixture, labels: Tensor | None = None,
                  quantile: float = 0.99) -> tuple[Tensor, Tensor]:
    """(inside [N] bool, component [N]): is a sample within the `quantile` chi-square radius of a component
    that has weight in its class, and which component is nearest among those."""
    x = x.double().cpu()
    radius = mixture.stds * float(chi2.ppf(quantile, mixture.dim)) ** 0.5  # [K]
    d = torch.cdist(x, mixture.means)  # [N, K]
    support = mixture.weights_for(labels.cpu() if labels is not None else None, len(x)) > 0
    d = torch.where(support, d, torch.inf)
    comp = d.argmin(dim=1)
    inside = d.gather(1, comp[:, None]).squeeze(1) <= radius[comp]
    return inside, comp


@dataclass
class MixtureReport:
    sw2: float
    energy: float
    precision: float
    coverage: float
    mode_tv: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def evaluate_against_mixture(x: Tensor, mixture: GaussianMixture, labels: Tensor | None = None,
                             reference: Tensor | None = None, seed: int = 0,
                             min_mode_share: float = 0.1) -> MixtureReport:
    """All metrics of samples x (with their class labels, if conditional) against the mixture.

    reference: samples to compare with for SW2 / energy distance / mode TV (defaults to fresh samples of the
    mixture with the same labels). precision: share of samples within the 99% radius of a component of their
    class. coverage: share of components whose in-radius count reaches `min_mode_share` of its expected count.
    """
    n = len(x)
    if reference is None:
        g = torch.Generator().manual_seed(seed + 12345)
        reference = mixture.sample(n, labels.cpu() if labels is not None else None, generator=g)
    inside, comp = within_radius(x, mixture, labels)
    expected = mixture.weights_for(labels.cpu() if labels is not None else None, n).sum(0)  # [K]
    counts = torch.bincount(comp[inside], minlength=len(expected)).double()
    coverage = float((counts >= min_mode_share * expected).double().mean())
    hist_labels = labels if mixture.conditional else None
    return MixtureReport(
        sw2=sliced_wasserstein2(x, reference, seed=seed),
        energy=energy_distance(x, reference),
        precision=float(inside.double().mean()),
        coverage=coverage,
        mode_tv=total_variation(mode_histogram(x, mixture, hist_labels), mode_histogram(reference, mixture, hist_labels)),
    )


@torch.no_grad()
def evaluate_generator(generator, n: int = 4096, seed: int = 0, num_steps: int | None = None,
                       reference: Tensor | None = None, labels: Tensor | None = None) -> MixtureReport:
    """Sample a student of a GMM teacher (uniform class labels unless given) and evaluate it."""
    teacher = generator.teacher
    g = torch.Generator().manual_seed(seed)
    if labels is None:
        labels = teacher.sample_conditions(n, generator=g)
    device = next(generator.parameters()).device
    noise = torch.randn((n, *teacher.sample_shape), generator=g).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        x = generator.sample(noise, teacher.encode(labels).to(device), num_steps).cpu()
    mixture = teacher.mixture
    return evaluate_against_mixture(x, mixture, labels if mixture.conditional else None, reference, seed=seed)
