"""`captioner.domain`: fitting, scoring, the model-folder files, and the demo models' verdicts."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.caption.captioner import Captioner
from captioner.checkpoint import ModelDirError, load_tensors, save_tensors
from captioner.data.shapes import make_scene, render
from captioner.domain import DOMAIN_JSON, DOMAIN_TENSORS, DomainStats, ledoit_wolf, split_holdout
from captioner.image import preprocess_batch
from captioner.paths import MODELS_DIR
from captioner.vocab import Vocabulary
from captioner.vqa.answerer import Answerer
from tests.api_fixtures import save_tiny_captioner, save_tiny_vqa
from tests.conftest import ROOT, TINY_CAPTIONS, tiny_model

COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini" / "images"
DIM = 16  # tiny_encoder_config: small_cnn of width 4, 4 * 4 channels


def gaussian(n: int, dim: int = DIM, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    """(n, dim) samples with correlated features (a fixed random mixing of unit normals)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=torch.Generator().manual_seed(99)) / dim**0.5
    return torch.randn(n, dim, generator=g) @ (mixing + torch.eye(dim)) + 2.0 + shift


def scenes(seeds) -> list[Image.Image]:
    return [render(make_scene(seed)) for seed in seeds]


def tiny_stats(captioner: Captioner, description: str = "noise") -> DomainStats:
    """Statistics of a tiny model's pooled features on shapes scenes."""
    with torch.inference_mode():
        pooled = captioner.encode(captioner.preprocess(scenes(range(40)))).mean(dim=1)
    return DomainStats.fit(pooled[:30], pooled[30:], description, quantile=0.9)


# -- fitting and scoring ------------------------------------------------------------------------


def test_threshold_is_the_quantile_of_the_held_out_scores_and_new_samples_fall_below_it():
    stats = DomainStats.fit(gaussian(2000), gaussian(500, seed=1), "gaussians", quantile=0.99)
    held = stats.score(gaussian(500, seed=1))
    assert stats.threshold == pytest.approx(float(torch.quantile(held.double(), 0.99)), rel=1e-6)
    fresh = stats.score(gaussian(2000, seed=2))
    assert 0.85 < float(fresh.median()) < 1.1  # a typical image of the domain scores about 1
    assert float((fresh > stats.threshold).float().mean()) < 0.03
    assert stats.in_domain(stats.score(gaussian(50, seed=3, shift=3.0))) == [False] * 50
    assert stats.info["fit_images"] == 2000 and stats.info["holdout_images"] == 500


def test_fewer_images_than_dimensions_and_a_dead_feature_still_give_finite_scores():
    train = gaussian(6, dim=32)
    train[:, 5] = 0.0  # a channel that never fires on the training images
    stats = DomainStats.fit(train[:5], train[5:], "few")
    assert 0 < stats.info["shrinkage"] <= 1
    probe = train[5:].clone()
    probe[:, 5] = 1.0  # ... fires on this one
    scores = stats.score(torch.cat([train[5:], probe]))
    assert bool(torch.isfinite(scores).all())
    assert stats.in_domain(scores) == [True, False]


def test_ledoit_wolf_shrinks_towards_the_identity_only_as_far_as_the_data_allow():
    white = torch.randn(4000, 8, generator=torch.Generator().manual_seed(0))
    _, shrink_white = ledoit_wolf(white - white.mean(0))  # the truth is the target: shrink fully
    correlated = gaussian(4000, dim=8)
    cov, shrink_correlated = ledoit_wolf(correlated - correlated.mean(0))
    assert shrink_white > 0.9 and shrink_correlated < 0.05
    sample = torch.cov(correlated.double().T, correction=0)
    torch.testing.assert_close(cov, sample, rtol=0.1, atol=0.05)


@pytest.mark.parametrize(
    ("features", "holdout", "quantile", "needle"),
    [
        (gaussian(10), gaussian(5, dim=DIM + 1), 0.9, "dims"),
        (torch.full((10, DIM), float("nan")), gaussian(5), 0.9, "NaN"),
        (gaussian(10), gaussian(0), 0.9, "non-empty"),
        (gaussian(10), gaussian(5), 0.0, "quantile"),
    ],
)
def test_fit_refuses_bad_features_naming_them(features, holdout, quantile, needle):
    with pytest.raises(ValueError, match=needle):
        DomainStats.fit(features, holdout, "x", quantile=quantile)


def test_score_refuses_features_of_another_width():
    stats = DomainStats.fit(gaussian(20), gaussian(5), "x")
    with pytest.raises(ValueError, match=f"must be \\(B, {DIM}\\)"):
        stats.score(gaussian(3, dim=DIM + 2))


def test_holdout_split_is_seeded_disjoint_and_capped():
    fit, held = split_holdout(100, 0.2, limit=50, seed=3)
    assert (len(fit), len(held)) == (40, 10) and not set(fit) & set(held)
    assert split_holdout(100, 0.2, limit=50, seed=3) == (fit, held)
    assert split_holdout(2, 0.2, limit=50, seed=0)[1] != []  # one held out, one to fit
    with pytest.raises(ValueError, match="at least 2 images"):
        split_holdout(1, 0.2, 10, 0)


# -- the model folder ----------------------------------------------------------------------------


def with_stats(tmp_path: Path) -> tuple[Path, Captioner]:
    folder = save_tiny_captioner(tmp_path / "cap")
    captioner = Captioner.load(folder)
    captioner.domain = tiny_stats(captioner, "noise and scenes")
    captioner.save(folder)
    return folder, captioner


def test_statistics_and_threshold_round_trip_through_the_model_folder(tmp_path):
    folder, captioner = with_stats(tmp_path)
    assert {DOMAIN_JSON, DOMAIN_TENSORS} <= {p.name for p in folder.iterdir()}
    loaded = Captioner.load(folder)
    torch.testing.assert_close(loaded.domain.mean, captioner.domain.mean, rtol=0, atol=0)
    torch.testing.assert_close(
        loaded.domain.covariance, captioner.domain.covariance, rtol=0, atol=0
    )
    assert loaded.domain.threshold == captioner.domain.threshold
    assert loaded.domain.description == "noise and scenes"
    assert loaded.domain.info["holdout_scores"] == captioner.domain.info["holdout_scores"]
    images = scenes([100, 101])
    a, b = captioner.caption(images), loaded.caption(images)
    assert [r.domain_score for r in a] == [r.domain_score for r in b]
    assert all(isinstance(r.in_domain, bool) for r in b)
    assert loaded.metadata()["domain"]["description"] == "noise and scenes"


def test_a_vqa_folder_round_trips_them_too(tmp_path):
    folder = save_tiny_vqa(tmp_path / "vqa")
    vqa = Answerer.load(folder)
    assert (
        vqa.domain is None and vqa.answer(scenes([1]), ["is there a square?"])[0].in_domain is None
    )
    with torch.inference_mode():
        grid = vqa.model.encoder(vqa.preprocess(scenes(range(20))))[0]
    DomainStats.fit(grid[:15].mean(1), grid[15:].mean(1), "scenes").save(folder)  # the tool's path
    loaded = Answerer.load(folder)
    [answer] = loaded.answer(scenes([1]), ["is there a square?"])
    memory, scores = loaded.encode_scored(loaded.preprocess(scenes([1])))
    assert answer.domain_score == scores[0] and isinstance(answer.in_domain, bool)


def test_adding_statistics_leaves_the_rest_of_the_folder_as_it_was(tmp_path):
    folder = save_tiny_captioner(tmp_path / "cap")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    captioner = Captioner.load(folder)
    tiny_stats(captioner).save(folder)
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(after) == set(before) | {DOMAIN_JSON, DOMAIN_TENSORS}
    assert all(after[name] == data for name, data in before.items())
    assert [p.name for p in tmp_path.iterdir()] == ["cap"]  # no temporary sibling left


def _rewrite_json(folder: Path, change) -> None:
    data = json.loads((folder / DOMAIN_JSON).read_text())
    change(data)
    (folder / DOMAIN_JSON).write_text(json.dumps(data))


def _rewrite_tensors(folder: Path, change) -> None:
    tensors = load_tensors(folder / DOMAIN_TENSORS)
    change(tensors)
    save_tensors(folder / DOMAIN_TENSORS, tensors)


MALFORMED = {
    "mean of the wrong shape": (
        lambda f: _rewrite_tensors(f, lambda t: t.update(mean=torch.zeros(DIM + 1))),
        "mean is \\(17,\\).*needs \\(16,\\)",
    ),
    "covariance of the wrong shape": (
        lambda f: _rewrite_tensors(f, lambda t: t.update(covariance=torch.eye(DIM)[:-1])),
        "covariance \\(15, 16\\)",
    ),
    "NaN in the covariance": (
        lambda f: _rewrite_tensors(f, lambda t: t["covariance"].__setitem__((0, 0), float("nan"))),
        "finite",
    ),
    "a covariance that is not positive definite": (
        lambda f: _rewrite_tensors(f, lambda t: t.update(covariance=-torch.eye(DIM))),
        "positive definite",
    ),
    "a tensor missing": (
        lambda f: _rewrite_tensors(f, lambda t: t.pop("covariance")),
        "exactly 'covariance' and 'mean'",
    ),
    "the threshold missing": (
        lambda f: _rewrite_json(f, lambda d: d.pop("threshold")),
        "missing threshold",
    ),
    "a NaN threshold": (
        lambda f: _rewrite_json(f, lambda d: d.update(threshold=float("nan"))),
        "threshold must be finite",
    ),
    "an empty description": (
        lambda f: _rewrite_json(f, lambda d: d.update(description=" ")),
        "description must be a non-empty string",
    ),
    "another feature width": (
        lambda f: _rewrite_json(f, lambda d: d.update(feature_dim=DIM * 2)),
        "feature_dim is 32, but the model's encoder gives 16",
    ),
    "an unknown method": (
        lambda f: _rewrite_json(f, lambda d: d.update(method="knn")),
        "method 'knn'",
    ),
    "bad JSON": (
        lambda f: (f / DOMAIN_JSON).write_text("{not json"),
        "domain.json is not valid JSON",
    ),
    "a JSON list": (lambda f: (f / DOMAIN_JSON).write_text("[1, 2]"), "must hold a JSON object"),
    "a tensors file that is not safetensors": (
        lambda f: (f / DOMAIN_TENSORS).write_bytes(b"\x00" * 64),
        "not a valid safetensors file",
    ),
    "domain.json alone": (
        lambda f: (f / DOMAIN_TENSORS).unlink(),
        "has domain.json but no domain.safetensors",
    ),
    "domain.safetensors alone": (
        lambda f: (f / DOMAIN_JSON).unlink(),
        "has domain.safetensors but no domain.json",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_statistics_are_refused_naming_the_problem(tmp_path, case):
    folder, _ = with_stats(tmp_path)
    spoil, needle = MALFORMED[case]
    spoil(folder)
    with pytest.raises(ModelDirError, match=needle):
        Captioner.load(folder)


def test_statistics_of_another_width_are_refused_when_attached():
    stats = DomainStats.fit(gaussian(20, dim=DIM + 4), gaussian(5, dim=DIM + 4), "x")
    vocab = Vocabulary.build(TINY_CAPTIONS)
    with pytest.raises(ValueError, match="20-dim features do not fit an encoder of 16-dim"):
        Captioner(tiny_model(len(vocab)), vocab, domain=stats)


# -- the demo models -------------------------------------------------------------------------------


def easy_vqa_images(n: int) -> list[Image.Image]:
    try:
        folder = Path(str(resources.files("easy_vqa") / "data" / "test" / "images"))
    except ModuleNotFoundError:
        pytest.skip("the easy-vqa package is not installed")
    return [Image.open(folder / f"{i}.png").convert("RGB") for i in range(n)]


def photos(n: int) -> list[Image.Image]:
    if not COCO_MINI.is_dir():
        pytest.skip(f"coco-mini not found at {COCO_MINI}")
    return [Image.open(p).convert("RGB") for p in sorted(COCO_MINI.glob("*.jpg"))[:n]]


@pytest.mark.parametrize("name", ["shapes-captioner", "shapes-vqa", "easy-vqa"])
def test_demo_models_find_their_own_images_in_domain_and_real_photos_not(name):
    folder = MODELS_DIR / name
    own = easy_vqa_images(6) if name == "easy-vqa" else scenes(range(1000, 1006))
    real = photos(6)
    if name == "shapes-captioner":
        model = Captioner.load(folder)
        results = model.caption(own + real, beam_size=1)
    else:
        model = Answerer.load(folder)
        results = model.answer(own + real, ["what color is the shape?"] * 12)
    assert model.domain is not None, f"{folder} has no domain statistics"
    assert "synthetic shapes-world" in model.domain.description or name == "easy-vqa"
    assert [r.in_domain for r in results] == [True] * 6 + [False] * 6, [
        round(r.domain_score, 3) for r in results
    ]
    assert min(r.domain_score for r in results[6:]) > 1.5 * model.domain.threshold
    batch = preprocess_batch(real[:1], model.input_size)  # the score of the model's own features
    with torch.inference_mode():
        grid = model.model.encoder(batch)[0]
    assert model.domain.score_grid(grid).item() == pytest.approx(results[6].domain_score, rel=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_demo_models_score_alike_on_cuda_and_cpu():
    images = scenes(range(3)) + photos(2)
    cpu, gpu = (Captioner.load(MODELS_DIR / "shapes-captioner", device=d) for d in ("cpu", "cuda"))
    a, b = cpu.caption(images, beam_size=1), gpu.caption(images, beam_size=1)
    assert [r.in_domain for r in a] == [r.in_domain for r in b]
    assert [r.domain_score for r in b] == pytest.approx([r.domain_score for r in a], rel=1e-3)
    cpu, gpu = (Answerer.load(MODELS_DIR / "shapes-vqa", device=d) for d in ("cpu", "cuda"))
    questions = ["what color is the circle?"] * len(images)
    a, b = cpu.answer(images, questions), gpu.answer(images, questions)
    assert [r.domain_score for r in b] == pytest.approx([r.domain_score for r in a], rel=1e-3)
