"""How soon a streamed caption's words come, and whether streaming changes any caption.

    python -m training.make_shapes --out data/shapes-test --train 0 --val 0 --test 1000 --seed 7
    python bench/stream_words.py data/shapes-test/test

For the demo captioner on the split's images, per beam size (1, 3, 5), with a `Watch` on the
search (what `POST /caption/stream` uses): `identical` (share of captions equal, token for token,
to the search without a watch: a watched beam search commits to words every hypothesis that can
still win shares, and drops finished captions that score below every live beam and disagree),
`first_word_step` (mean decoder step after which the first word is told; a caption of n words
takes n + 1 steps), `words_before_done` (share of words told before their caption's last step)
and `caption_steps` (mean n + 1). Counts steps, not seconds: one JSON line per beam size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner import Captioner  # noqa: E402
from captioner.caption.search import Watch, beam_search  # noqa: E402


class StepCounter(Watch):
    """The decoder step after which each image's words were told."""

    def __init__(self, decoder):
        self.steps = 0
        self.told: dict[int, list[int]] = {}
        step = decoder.step

        def counting(*args):
            self.steps += 1
            return step(*args)

        decoder.step = counting

    def words(self, image, words):
        self.told.setdefault(image, []).extend(self.steps for _ in words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("split", type=Path, help="a split folder with images/*.png")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "shapes-captioner")
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    captioner = Captioner.load(args.model)
    decoder = captioner.model.decoder
    paths = sorted((args.split / "images").glob("*.png"))
    if not paths:
        raise SystemExit(f"no PNG images in {args.split / 'images'}")
    for beam_size in (1, 3, 5):
        same = words = early = first_sum = steps_sum = captions = 0
        for start in range(0, len(paths), args.batch):
            batch = [str(p) for p in paths[start : start + args.batch]]
            feats = captioner.encode(captioner.preprocess(batch))
            plain = beam_search(decoder, feats, beam_size, 20)
            counter = StepCounter(decoder)
            try:
                watched = beam_search(decoder, feats, beam_size, 20, watch=counter)
            finally:
                del decoder.step
            for i, (p, w) in enumerate(zip(plain, watched, strict=True)):
                tokens = w[0].tokens
                same += p[0].tokens == tokens
                done = len(tokens) + 1
                told = counter.told.get(i, [])
                captions += 1
                steps_sum += done
                if told:
                    first_sum += told[0]
                    words += len(told)
                    early += sum(step < done for step in told)
        line = {
            "beam_size": beam_size,
            "captions": captions,
            "identical": round(same / captions, 4),
            "first_word_step": round(first_sum / captions, 2),
            "caption_steps": round(steps_sum / captions, 2),
            "words_before_done": round(early / max(words, 1), 3),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
