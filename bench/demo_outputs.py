"""The demo models' captions, answers and attention maps on a shapes split, dumped to a folder,
or two dumps compared: run it before and after a change that must keep the demo models' outputs.

    python -m training.make_shapes --out data/shapes-test --train 0 --val 0 --test 1000 --seed 7
    python bench/demo_outputs.py dump data/shapes-test/test /tmp/before
    ... change the code ...
    python bench/demo_outputs.py dump data/shapes-test/test /tmp/after
    python bench/demo_outputs.py compare /tmp/before /tmp/after

`compare` prints one JSON line (`results_identical`, `attention_maps_differing`) and exits 1 on
any difference. Uses only the public `Captioner.load(...).caption` and `Answerer.load(...).answer`
(beam 3, top 3), so a dump from an older commit compares too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def dump(split: Path, out: Path) -> None:
    import torch

    # One thread: with several, a loaded machine has given last-bit differences between two runs
    # of the same code (26 token log-probabilities 1e-7 apart), which would hide what a change did.
    torch.set_num_threads(1)
    try:
        from captioner import Answerer, Captioner
    except ImportError:  # a commit before the library's layout of issue 13
        from captioner.pipeline import Captioner

        from captioner.vqa import VQAModel as Answerer

    images = sorted((split / "images").glob("*.png"))
    captioner = Captioner.load(ROOT / "models" / "shapes-captioner")
    results: dict = {"captions": [], "answers": {}}
    arrays: dict[str, np.ndarray] = {}
    for start in range(0, len(images), 64):
        batch = images[start : start + 64]
        for path, r in zip(batch, captioner.caption([str(p) for p in batch], beam_size=3)):
            results["captions"].append([path.name, r.caption, r.tokens, r.token_logprobs])
            arrays[f"caption/{path.name}"] = r.attention
    questions = json.loads((split / "questions.json").read_text())["questions"]
    for name in ("shapes-vqa", "easy-vqa"):
        answerer = Answerer.load(ROOT / "models" / name)
        rows = []
        for start in range(0, len(questions), 256):
            chunk = questions[start : start + 256]
            paths = [str(split / "images" / f"{q['image_id']:012d}.png") for q in chunk]
            answers = answerer.answer(paths, [q["question"] for q in chunk], top_k=3)
            for q, r in zip(chunk, answers):
                rows.append(
                    [q["question_id"], r.answer, r.confidence, list(map(list, r.top_answers))]
                )
                arrays[f"{name}/{q['question_id']}"] = r.attention
        results["answers"][name] = rows
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results))
    np.savez_compressed(out / "attention.npz", **arrays)
    print(json.dumps({"captions": len(results["captions"]), "questions": len(questions)}))


def compare(a: Path, b: Path) -> int:
    ra, rb = (json.loads((x / "results.json").read_text()) for x in (a, b))
    na, nb = (np.load(x / "attention.npz") for x in (a, b))
    if sorted(na.files) != sorted(nb.files):
        print("the dumps hold attention maps for different images or questions")
        return 1
    differing = [k for k in na.files if not np.array_equal(na[k], nb[k])]
    print(
        json.dumps(
            {
                "captions": len(ra["captions"]),
                "questions": {k: len(v) for k, v in ra["answers"].items()},
                "results_identical": ra == rb,
                "attention_maps": len(na.files),
                "attention_maps_differing": len(differing),
            }
        )
    )
    return 0 if ra == rb and not differing else 1


if __name__ == "__main__":
    usage = "usage: demo_outputs.py dump SPLIT_DIR OUT_DIR | compare DIR_A DIR_B"
    if len(sys.argv) != 4 or sys.argv[1] not in ("dump", "compare"):
        sys.exit(usage)
    if sys.argv[1] == "dump":
        dump(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
