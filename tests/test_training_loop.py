"""training/loop.py, the loop both tasks share: under torchrun, a time budget that runs out
mid-epoch while one rank is slower and its clock runs ahead stops every rank at the same step."""

import json

import pytest

from captioner.data.shapes import generate_split
from tests.conftest import run_torchrun
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
