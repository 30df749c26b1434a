"""training/loop.py, the loop both tasks share: under torchrun, a time budget that runs out
mid-epoch while one rank is slower and its clock runs ahead stops every rank at the same step;
every saved model folder holds the domain statistics of its own weights."""

import importlib
import json

import pytest
import torch

from captioner.caption.captioner import Captioner
from captioner.data.caption_data import load_coco_captions
from captioner.data.images import ImageTensors
from captioner.data.shapes import generate_split
from captioner.data.vqa_data import load_split, prepare
from captioner.domain import DomainStats, split_holdout
from captioner.vqa.answerer import Answerer
from tests.conftest import run_torchrun
from training import loop
from training.make_shapes import write_split

# Rank 1 sleeps in every loss (it reaches each collective last) and its clock runs 3x fast, so a
# rank deciding "out of time" alone would stop steps before rank 0 and leave it waiting in the
# next all-reduce for ever. The loop must take rank 0's decision on every rank.
SCRIPT = """\
import json, os, sys, time
from training import loop, {module} as task
rank = int(os.environ["RANK"])
if rank == 1:
    started, real = time.monotonic(), time.monotonic
    loop.time.monotonic = lambda: started + 3 * (real() - started)
    loss = task.{task}.loss
    def slow_loss(self, *args):
        time.sleep(0.15)
        return loss(self, *args)
    task.{task}.loss = slow_loss
argv = sys.argv[1:]
result = task.main(task.get_args_parser().parse_args(argv), argv)
with open(os.path.join(os.environ["OUT_DIR"], f"rank{{rank}}.json"), "w") as f:
    json.dump({{"step": result["step"], "epoch": result["epoch"],
               "sha": result["weights_sha256"]}}, f)
"""

COMMON = ["--input-size", "32", "--encoder-width", "4", "--batch-size", "2", "--warmup-steps", "2"]
COMMON += ["--no-progress", "--device", "cpu", "--epochs", "50", "--max-minutes", "0.05"]
TASKS = {
    "train_captioner": ("CaptionTask", ["--embed-dim", "8", "--hidden-dim", "8", "--references",
                                        "first", "--attention-dim", "8"]),
    "train_vqa": ("VQATask", ["--grid-size", "4", "--embed-dim", "8", "--hidden-dim", "8",
                              "--attention-dim", "8", "--fusion-dim", "8", "--val-split", "none"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_split(generate_split(24, seed=5, size=32), root / "train")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(TASKS))
def test_a_time_budget_stops_every_rank_at_the_same_step(shapes, tmp_path, module):
    task, extra = TASKS[module]
    script = tmp_path / "slow_rank.py"
    script.write_text(SCRIPT.format(module=module, task=task))
    out = tmp_path / "run"
    run_torchrun(script, ["--data", str(shapes), "--out", str(out), *COMMON, *extra], tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the same step, epoch and weights on both ranks
    steps_per_epoch = 24 // 2 // 2  # 24 samples, 12 per rank, 2 per step
    assert 0 < ranks[0]["step"] < 50 * steps_per_epoch  # the budget ended the run
    trainer = json.loads((out / "last" / "trainer.json").read_text())
    assert (trainer["step"], trainer["epoch"]) == (ranks[0]["step"], ranks[0]["epoch"])
    assert trainer["batch_in_epoch"] == ranks[0]["step"] - ranks[0]["epoch"] * steps_per_epoch


# -- the domain statistics of every saved folder ------------------------------------------------

SINGLE = ["--input-size", "32", "--encoder-width", "4", "--batch-size", "8", "--warmup-steps", "2"]
SINGLE += ["--no-progress", "--device", "cpu", "--epochs", "2"]


def _train(module: str, shapes, out, *extra: str) -> None:
    task = importlib.import_module(f"training.{module}")
    argv = ["--data", str(shapes), "--out", str(out), *SINGLE, *TASKS[module][1], *extra]
    task.main(task.get_args_parser().parse_args(argv), argv)


def _training_images(module: str, shapes) -> ImageTensors:
    """The training images in the order the task holds them."""
    if module == "train_vqa":
        return prepare(load_split(shapes, "train"), 32).images
    records = load_coco_captions(shapes / "train" / "captions.json", shapes / "train" / "images")
    return ImageTensors([r.path for r in records.records], 32)


@pytest.mark.parametrize(
    ("module", "extra", "description"),
    [
        ("train_captioner", [], None),  # the encoder trains: statistics of each save's weights
        (
            "train_vqa",
            ["--fine-tune-blocks", "0", "--domain-description", "tiny scenes"],
            "tiny scenes",
        ),
    ],
)
def test_every_saved_folder_holds_domain_statistics_of_its_own_weights(
    shapes, tmp_path, module, extra, description
):
    out = tmp_path / "run"
    _train(module, shapes, out, *extra)
    images = _training_images(module, shapes)
    fit, held = split_holdout(len(images), loop.DOMAIN_HOLDOUT, 2500, seed=0)
    for folder in (out / "best", out / "last"):
        model = (Captioner if module == "train_captioner" else Answerer).load(folder)
        with torch.inference_mode():
            pooled = model.model.encoder.eval()(images.batch(fit + held))[1]
        expected = DomainStats.fit(pooled[: len(fit)], pooled[len(fit) :], "x")
        torch.testing.assert_close(model.domain.mean, expected.mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            model.domain.covariance, expected.covariance, rtol=1e-3, atol=1e-5
        )
        assert model.domain.threshold == pytest.approx(expected.threshold, rel=1e-3)
        assert model.domain.description == (
            description or f"images like its training data ({shapes})"
        )
        assert (model.domain.info["fit_images"], model.domain.info["holdout_images"]) == (19, 5)


def test_domain_images_0_saves_no_statistics(shapes, tmp_path):
    _train("train_vqa", shapes, tmp_path / "run", "--domain-images", "0", "--epochs", "1")
    assert Answerer.load(tmp_path / "run" / "best").domain is None
    assert not (tmp_path / "run" / "last" / "domain.json").exists()
