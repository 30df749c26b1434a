"""Five questions about one image against one question: the feature cache spares the encoder.

Each question is its own `Answerer.answer` call, as each is its own request to `POST /vqa`. A trial
starts with an empty cache, so the first question always encodes the image; the next four find its
features by content. The same five questions with the cache cleared before each show what it saves.

    python bench/vqa_cache.py [--model models/shapes-vqa] [--repeat 15]
    python bench/vqa_cache.py --stand-in efficientnet_lite0   # the head on a photo encoder

What the cache can save is the encoder's share of one question: the demo model's 64 px CNN costs
about twice its question side (the LSTM and three glimpses), a photo encoder at 224 px many times
more. `--stand-in ENCODER` times the demo model's head on another encoder (random weights, built
without loading any: the timing does not depend on them) at `--input-size` (default 224; 128 for
small_cnn), e.g. what a COCO model would see; without the demo model folder the stand-in is the
small CNN. `cached_ms` is the median time of one question about an image already in the cache
(questions 2 to 5 of each cached trial), the figure to compare between models. Last line:
{"five_vs_one": float, ...}.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import torch

from captioner.data.shapes import make_scene, render
from captioner.encoder import ENCODERS, EncoderConfig
from captioner.paths import DEFAULT_VQA_MODEL
from captioner.vocab import Vocabulary
from captioner.vqa.answerer import Answerer
from captioner.vqa.vqa_net import VQANet

QUESTIONS = [
    "what color is the circle?",
    "how many objects are there?",
    "is there a square?",
    "what shape is left of the red shape?",
    "what color is the large shape?",
]


# The demo model's head (models/shapes-vqa/config.json), so a stand-in differs only in its encoder.
DEMO_HEAD = dict(
    glimpses=3, attention_dim=128, coords=True, count=True, question_attention=True, relative=True
)


def stand_in(encoder_name: str, input_size: int | None) -> Answerer:
    vocab = Vocabulary.build(QUESTIONS)
    answers = ["red", "blue", "one", "two", "yes", "no", "circle", "square"]
    size = input_size or (128 if encoder_name == "small_cnn" else 224)
    encoder = EncoderConfig(name=encoder_name, input_size=size)  # weights None: random
    net = VQANet.build(encoder, len(vocab), len(answers), **DEMO_HEAD)
    return Answerer(net, vocab, answers, name=f"stand-in ({encoder_name})", version="0")


def trial(vqa: Answerer, image: bytes, questions: list[str], clear_each: bool) -> list[float]:
    """Seconds each question took, asked one after another about `image`."""
    vqa.cache.clear()
    times = []
    for q in questions:
        if clear_each:
            vqa.cache.clear()
        t0 = time.perf_counter()
        vqa.answer([image], [q])
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_VQA_MODEL))
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--stand-in", choices=ENCODERS, help="time the demo head on this encoder")
    p.add_argument("--input-size", type=int, help="the stand-in's input side (default 224)")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.stand_in is None and Path(args.model, "config.json").is_file():
        vqa = Answerer.load(args.model)
    else:
        vqa = stand_in(args.stand_in or "small_cnn", args.input_size)
    buf = io.BytesIO()
    render(make_scene(seed=3, size=vqa.input_size)).save(buf, format="JPEG", quality=90)
    image = buf.getvalue()

    for _ in range(3):  # warm-up
        trial(vqa, image, QUESTIONS, clear_each=False)
    one, five, five_uncached, cached = [], [], [], []
    for _ in range(args.repeat):  # interleaved, so drifting load hits all three alike
        one.append(sum(trial(vqa, image, QUESTIONS[:1], clear_each=False)))
        times = trial(vqa, image, QUESTIONS, clear_each=False)
        five.append(sum(times))
        cached += times[1:]  # each question after the first finds the image's features
        five_uncached.append(sum(trial(vqa, image, QUESTIONS, clear_each=True)))
    t1, t5, t5u, tc = (statistics.median(x) * 1000 for x in (one, five, five_uncached, cached))
    print(f"model: {vqa.name} ({vqa.input_size} px, grid {vqa.grid_hw[0]}x{vqa.grid_hw[1]})")
    print(f"one question:                {t1:8.2f} ms (median of {args.repeat})")
    print(f"five questions, cached:      {t5:8.2f} ms  ({t5 / t1:.2f}x one)")
    print(f"five questions, cache off:   {t5u:8.2f} ms  ({t5u / t1:.2f}x one)")
    print(f"a cached question:           {tc:8.2f} ms (median of {len(cached)})")
    print(
        json.dumps(
            {
                "five_vs_one": round(t5 / t1, 3),
                "five_uncached_vs_one": round(t5u / t1, 3),
                "one_ms": round(t1, 2),
                "cached_ms": round(tc, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
