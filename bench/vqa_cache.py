"""Five questions about one image against one question: the feature cache spares the encoder.

Each question is its own `VQAModel.answer` call, as each is its own request to `POST /vqa`. A trial
starts with an empty cache, so the first question always encodes the image; the next four find its
features by content. The same five questions with the cache cleared before each show what it saves.

    python bench/vqa_cache.py [--model models/shapes-vqa] [--repeat 15]

Without the demo model a stand-in of its architecture (small CNN at 128 px, random weights) is used:
the timing does not depend on the weights. Last line: {"five_vs_one": float, ...}.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import torch

from captioner.encoder import EncoderConfig
from captioner.paths import DEFAULT_VQA_MODEL
from captioner.shapes import make_scene, render
from captioner.vocab import Vocabulary
from captioner.vqa import VQAModel
from captioner.vqa_model import VQANet

QUESTIONS = [
    "what color is the circle?",
    "how many shapes are there?",
    "is there a square?",
    "what shape is left of the red shape?",
    "what color is the large shape?",
]


def stand_in() -> VQAModel:
    vocab = Vocabulary.build(QUESTIONS)
    answers = ["red", "blue", "one", "two", "yes", "no", "circle", "square"]
    encoder = EncoderConfig(name="small_cnn", input_size=128, width=32, fine_tune_blocks=3)
    net = VQANet.build(encoder, question_vocab_size=len(vocab), num_answers=len(answers))
    return VQAModel(net, vocab, answers, name="stand-in", version="0")


def trial(vqa: VQAModel, image: bytes, questions: list[str], clear_each: bool) -> float:
    vqa.cache.clear()
    t0 = time.perf_counter()
    for q in questions:
        if clear_each:
            vqa.cache.clear()
        vqa.answer([image], [q])
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_VQA_MODEL))
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args()
    torch.manual_seed(0)
    vqa = VQAModel.load(args.model) if Path(args.model, "config.json").is_file() else stand_in()
    buf = io.BytesIO()
    render(make_scene(seed=3, size=vqa.input_size)).save(buf, format="JPEG", quality=90)
    image = buf.getvalue()

    for _ in range(3):  # warm-up
        trial(vqa, image, QUESTIONS, clear_each=False)
    one, five, five_uncached = [], [], []
    for _ in range(args.repeat):  # interleaved, so drifting load hits all three alike
        one.append(trial(vqa, image, QUESTIONS[:1], clear_each=False))
        five.append(trial(vqa, image, QUESTIONS, clear_each=False))
        five_uncached.append(trial(vqa, image, QUESTIONS, clear_each=True))
    t1, t5, t5u = (statistics.median(x) * 1000 for x in (one, five, five_uncached))
    print(f"model: {vqa.name} ({vqa.input_size} px, grid {vqa.grid_hw[0]}x{vqa.grid_hw[1]})")
    print(f"one question:                {t1:8.2f} ms (median of {args.repeat})")
    print(f"five questions, cached:      {t5:8.2f} ms  ({t5 / t1:.2f}x one)")
    print(f"five questions, cache off:   {t5u:8.2f} ms  ({t5u / t1:.2f}x one)")
    print(
        json.dumps(
            {
                "five_vs_one": round(t5 / t1, 3),
                "five_uncached_vs_one": round(t5u / t1, 3),
                "one_ms": round(t1, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
