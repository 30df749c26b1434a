"""The domain check: how unlike a model's training images an image looks to the model's encoder.

A model folder may hold `domain.safetensors` (the mean and a shrunk covariance of the pooled
encoder features of training images) and `domain.json` (the threshold, a plain-words description
of the training images, and how both were made). An image's `domain_score` is the Mahalanobis
distance of its pooled features (the grid's mean over cells, what `Encoder` returns as pooled)
from that mean, divided by sqrt(feature dims) so that a typical training image scores about 1;
it is `in_domain` when the score is at most the threshold, a high quantile of the scores of
held-out images of the model's own domain.

    stats = DomainStats.fit(train_pooled, holdout_pooled, "synthetic shapes-world scenes ...")
    scores = stats.score(grid.mean(dim=1))          # (B,) floats, higher = more unlike
    stats.save(folder)  /  DomainStats.load(folder, side_files, feature_dim=128)

The covariance is shrunk towards a multiple of the identity with the Ledoit-Wolf formula (Ledoit
and Wolf, "A well-conditioned estimator for large-dimensional covariance matrices", 2004), so it
stays invertible with fewer images than feature dimensions and with channels that are always zero
on the training images (a photo lighting such a channel gets a large score, as it should).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from captioner.checkpoint import ModelDirError, load_tensors, update_model_dir

DOMAIN_JSON, DOMAIN_TENSORS = "domain.json", "domain.safetensors"
FORMAT_VERSION = 1
METHOD = "mahalanobis"
FEATURE = "pooled encoder features (mean over grid cells)"
DEFAULT_QUANTILE = 0.995
# Floor of the covariance's eigenvalues, relative to its mean variance (and absolute, for the
# all-zero case): keeps the Cholesky factor finite for features that never vary.
RELATIVE_FLOOR, ABSOLUTE_FLOOR = 1e-6, 1e-12
MAX_SCORE = 1e30  # a non-finite score (never seen; features are finite) is reported as this
REQUIRED_JSON = ("format_version", "method", "feature_dim", "threshold", "description")


@dataclass(frozen=True, eq=False)
class DomainStats:
    """The statistics of one model's training images, with the threshold of its domain check."""

    mean: torch.Tensor  # (D,)
    covariance: torch.Tensor  # (D, D), symmetric positive definite
    threshold: float
    description: str
    info: dict[str, Any] = field(default_factory=dict)  # how they were made, for domain.json

    def __post_init__(self) -> None:
        mean, cov = self.mean, self.covariance
        if not (isinstance(mean, torch.Tensor) and mean.dim() == 1 and mean.numel() > 0):
            raise ValueError(f"mean must be a non-empty 1-d tensor, got {_shape(mean)}")
        d = mean.numel()
        if not (isinstance(cov, torch.Tensor) and tuple(cov.shape) == (d, d)):
            raise ValueError(f"covariance must be ({d}, {d}) to match the mean, got {_shape(cov)}")
        if not (mean.is_floating_point() and cov.is_floating_point()):
            raise ValueError(f"mean and covariance must be float, got {mean.dtype}, {cov.dtype}")
        if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(cov).all())):
            raise ValueError("mean and covariance must be finite (found NaN or inf)")
        if not torch.allclose(cov, cov.T, rtol=1e-4, atol=1e-6 * float(cov.diagonal().abs().max())):
            raise ValueError("covariance must be symmetric")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float):
            raise ValueError(f"threshold must be a number, got {self.threshold!r}")
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold must be finite and > 0, got {self.threshold!r}")
        if not isinstance(self.description, str) or not self.description.strip():
            raise ValueError(f"description must be a non-empty string, got {self.description!r}")
        chol, bad = torch.linalg.cholesky_ex(cov.detach().double().cpu())
        if int(bad):
            raise ValueError("covariance must be positive definite (its Cholesky factor failed)")
        # Whitening: z = (x - mean) @ L^-T, |z|^2 is the squared Mahalanobis distance. Kept as
        # x @ W - shift with the 1/sqrt(D) folded in: a request's score is two small ops.
        eye = torch.eye(d, dtype=torch.float64)
        whiten = torch.linalg.solve_triangular(chol, eye, upper=False).T / math.sqrt(d)  # (D, D)
        shift = mean.detach().double().cpu() @ whiten  # (D,)
        object.__setattr__(self, "_whiten", whiten.float().to(mean.device))
        object.__setattr__(self, "_shift", shift.float().to(mean.device))

    @property
    def feature_dim(self) -> int:
        return self.mean.numel()

    # -- fitting -----------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        holdout: torch.Tensor,
        description: str,
        quantile: float = DEFAULT_QUANTILE,
        info: Mapping[str, Any] | None = None,
    ) -> DomainStats:
        """Statistics of `features` (N, D), pooled features of training images, with the threshold
        at the `quantile` of the scores of `holdout` (M, D), other images of the same domain."""
        for name, x in (("features", features), ("holdout", holdout)):
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or len(x) == 0:
                raise ValueError(f"{name} must be a non-empty (N, D) tensor, got {_shape(x)}")
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} hold NaN or inf")
        if features.shape[1] != holdout.shape[1]:
            raise ValueError(
                f"features have {features.shape[1]} dims but holdout has {holdout.shape[1]}"
            )
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")
        x = features.detach().double().cpu()
        mean = x.mean(dim=0)
        covariance, shrinkage = ledoit_wolf(x - mean)
        unset = cls(mean.float(), covariance.float(), 1.0, description)  # threshold to be set
        scores = unset.score(holdout.detach().cpu())
        threshold = float(torch.quantile(scores.double(), quantile))
        record = {
            "quantile": quantile,
            "shrinkage": round(shrinkage, 6),
            "fit_images": len(features),
            "holdout_images": len(holdout),
            "holdout_scores": _summary(scores),
            **(info or {}),
        }
        return cls(unset.mean, unset.covariance, max(threshold, 1e-6), description, record)

    # -- scoring -----------------------------------------------------------------------------
    def score(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D) -> domain scores (B,) float32 on their device: the Mahalanobis
        distance from the training mean over sqrt(D); higher is more unlike the training images."""
        if pooled.dim() != 2 or pooled.shape[1] != self.feature_dim:
            raise ValueError(
                f"pooled features must be (B, {self.feature_dim}), got {_shape(pooled)}"
            )
        whiten, shift = self._whiten, self._shift
        if whiten.device != pooled.device:
            whiten, shift = whiten.to(pooled.device), shift.to(pooled.device)
        z = torch.addmm(shift, pooled.float(), whiten, beta=-1)  # (B, D): (x - mean) whitened
        return torch.linalg.vector_norm(z, dim=1)

    def scores(self, grid: torch.Tensor) -> list[float]:
        """Encoder grids (B, L, D) -> domain scores as floats (what a result carries); a
        non-finite one (never seen: features are finite) becomes MAX_SCORE, so JSON can hold it."""
        return [s if math.isfinite(s) else MAX_SCORE for s in self.score_grid(grid).tolist()]

    def score_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """Encoder grids (B, L, D) -> domain scores (B,): `score` of their mean over the cells."""
        if grid.dim() != 3:
            raise ValueError(f"grid features must be (B, L, D), got {_shape(grid)}")
        return self.score(grid.mean(dim=1))

    def in_domain(self, scores: torch.Tensor | Sequence[float]) -> list[bool]:
        return [float(s) <= self.threshold for s in scores]

    def to(self, device: str | torch.device) -> DomainStats:
        """These statistics with their tensors on `device` (where the model's features are)."""
        if self.mean.device == torch.device(device):
            return self
        return DomainStats(
            self.mean.to(device),
            self.covariance.to(device),
            self.threshold,
            self.description,
            self.info,
        )

    def summary(self) -> dict[str, Any]:
        """What a model's metadata says about its domain check."""
        return {"description": self.description, "method": METHOD, "threshold": self.threshold}

    # -- files -------------------------------------------------------------------------------
    def json(self) -> dict[str, Any]:
        """What `domain.json` holds."""
        return {
            "format_version": FORMAT_VERSION,
            "method": METHOD,
            "feature": FEATURE,
            "feature_dim": self.feature_dim,
            "threshold": self.threshold,
            "description": self.description,
            "score": "Mahalanobis distance of the pooled features from the training mean, over "
            "sqrt(feature_dim), with the Ledoit-Wolf shrunk covariance; in domain when <= threshold",
            **{k: v for k, v in self.info.items() if k not in REQUIRED_JSON},
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """What `domain.safetensors` holds."""
        return {"mean": self.mean.float().cpu(), "covariance": self.covariance.float().cpu()}

    def files(self) -> dict[str, Any]:
        """{DOMAIN_JSON: ...} for `save_model_dir`'s `files`."""
        return {DOMAIN_JSON: self.json()}

    def tensor_files(self) -> dict[str, dict[str, torch.Tensor]]:
        """{DOMAIN_TENSORS: ...} for `save_model_dir`'s `tensors`."""
        return {DOMAIN_TENSORS: self.tensors()}

    @classmethod
    def from_files(
        cls,
        data: Any,
        tensors: Mapping[str, torch.Tensor],
        where: str | Path = "",
        feature_dim: int | None = None,
    ) -> DomainStats:
        """Statistics from a parsed `domain.json` and the tensors of `domain.safetensors`;
        anything malformed is refused with a `ModelDirError` naming the file and the problem.
        `feature_dim`, when given, is the model's encoder's: statistics of another width are
        refused."""
        where = Path(where)
        json_file, tensor_file = where / DOMAIN_JSON, where / DOMAIN_TENSORS
        if not isinstance(data, dict):
            raise ModelDirError(f"{json_file} must hold a JSON object")
        missing = [k for k in REQUIRED_JSON if k not in data]
        if missing:
            raise ModelDirError(f"{json_file} is missing {', '.join(missing)}")
        if data["format_version"] != FORMAT_VERSION:
            raise ModelDirError(
                f"{json_file} has format_version {data['format_version']!r}; this code reads "
                f"{FORMAT_VERSION}"
            )
        if data["method"] != METHOD:
            raise ModelDirError(
                f"{json_file} has method {data['method']!r}; this code reads {METHOD!r}"
            )
        dim = data["feature_dim"]
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ModelDirError(f"{json_file}: feature_dim must be an int >= 1, got {dim!r}")
        if feature_dim is not None and dim != feature_dim:
            raise ModelDirError(
                f"{json_file}: feature_dim is {dim}, but the model's encoder gives {feature_dim}"
            )
        names = sorted(tensors)
        if names != ["covariance", "mean"]:
            raise ModelDirError(
                f"{tensor_file} must hold exactly 'covariance' and 'mean', got {names}"
            )
        mean, cov = tensors["mean"], tensors["covariance"]
        if tuple(mean.shape) != (dim,) or tuple(cov.shape) != (dim, dim):
            raise ModelDirError(
                f"{tensor_file}: mean is {tuple(mean.shape)} and covariance {tuple(cov.shape)}; "
                f"feature_dim {dim} in {DOMAIN_JSON} needs ({dim},) and ({dim}, {dim})"
            )
        info = {k: v for k, v in data.items() if k not in (*REQUIRED_JSON, "feature", "score")}
        try:
            return cls(mean, cov, data["threshold"], data["description"], info)
        except ValueError as exc:
            raise ModelDirError(f"{where}: the domain statistics are malformed: {exc}") from exc

    def save(self, folder: str | Path) -> None:
        """Add these statistics to an existing model folder, atomically (the folder is rewritten
        with `captioner.checkpoint.update_model_dir`)."""
        update_model_dir(folder, files=self.files(), tensors=self.tensor_files())


def attach(
    stats: DomainStats | None, feature_dim: int, device: str | torch.device
) -> DomainStats | None:
    """`stats` for a model whose encoder gives `feature_dim`-dim features on `device`: refused
    (ValueError) when the widths differ, moved to the device otherwise."""
    if stats is None:
        return None
    if stats.feature_dim != feature_dim:
        raise ValueError(
            f"domain statistics of {stats.feature_dim}-dim features do not fit an encoder of "
            f"{feature_dim}-dim features"
        )
    return stats.to(device)


def load_domain(
    folder: str | Path, side: Mapping[str, Any], feature_dim: int | None = None
) -> DomainStats | None:
    """The statistics of a model folder, or None when it has neither file; `side` is the folder's
    parsed JSON files (from `load_model_dir`). One file without the other is refused."""
    folder = Path(folder)
    has_json, has_tensors = DOMAIN_JSON in side, (folder / DOMAIN_TENSORS).is_file()
    if not has_json and not has_tensors:
        return None
    if not has_tensors:
        raise ModelDirError(f"{folder} has {DOMAIN_JSON} but no {DOMAIN_TENSORS}")
    if not has_json:
        raise ModelDirError(f"{folder} has {DOMAIN_TENSORS} but no {DOMAIN_JSON}")
    tensors = load_tensors(folder / DOMAIN_TENSORS)
    return DomainStats.from_files(side[DOMAIN_JSON], tensors, folder, feature_dim)


def ledoit_wolf(centered: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(covariance (D, D), shrinkage) of centred samples (N, D): the sample covariance shrunk
    towards mu * I (mu its mean variance) by the Ledoit-Wolf shrinkage (their Lemma 3.2 and
    Theorem 3.3, as scikit-learn's `ledoit_wolf_shrinkage` computes it)."""
    x = centered.double()
    n, d = x.shape
    sample = x.T @ x / n  # (D, D)
    mu = float(sample.diagonal().mean())
    x2 = x * x
    beta = float(((x2.T @ x2) / n - sample * sample).sum()) / (d * n)
    delta = float(((sample - mu * torch.eye(d, dtype=x.dtype)) ** 2).sum()) / d
    shrinkage = 0.0 if delta == 0 else min(max(beta, 0.0), delta) / delta
    if n == 1:
        shrinkage = 1.0  # one sample says nothing about the covariance
    covariance = (1 - shrinkage) * sample + shrinkage * mu * torch.eye(d, dtype=x.dtype)
    floor = max(RELATIVE_FLOOR * mu, ABSOLUTE_FLOOR)
    covariance = covariance + floor * torch.eye(d, dtype=x.dtype)
    return covariance, shrinkage


def sample_rows(n: int, limit: int, seed: int) -> list[int]:
    """At most `limit` of `n` rows, chosen at random with `seed` (its own generator: the global
    random state is left alone), in random order."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit!r}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:limit].tolist()


def split_holdout(
    n: int, holdout_share: float, limit: int, seed: int
) -> tuple[list[int], list[int]]:
    """Rows (fit, holdout) of `n` images: at most `limit` of them in all (`sample_rows`), a
    `holdout_share` of those held out (at least one, and at least one left to fit); each sorted."""
    if n < 2:
        raise ValueError(f"the domain statistics need at least 2 images, got {n}")
    if not 0 < holdout_share < 1:
        raise ValueError(f"holdout_share must be in (0, 1), got {holdout_share!r}")
    rows = sample_rows(n, max(2, limit), seed)
    held = min(len(rows) - 1, max(1, round(len(rows) * holdout_share)))
    return sorted(rows[held:]), sorted(rows[:held])


def _summary(scores: torch.Tensor) -> dict[str, float]:
    s = scores.double()
    points = {"min": 0.0, "median": 0.5, "p99": 0.99, "max": 1.0}
    return {k: round(float(torch.quantile(s, q)), 4) for k, q in points.items()}


def _shape(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
