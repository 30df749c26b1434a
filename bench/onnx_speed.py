"""onnxruntime against PyTorch on this CPU, for the demo models exported with `captioner export`.

    python bench/onnx_speed.py [--images 32] [--repeat 5] [--threads N]

Exports the demo captioner and VQA model to a temporary folder, then times, side by side (the
two alternate, best of --repeat): the captioner's encoder on a batch, its beam search (beam 3,
the library's search over the step graph for onnxruntime, `beam_search` for PyTorch), and the VQA
encoder and head. Both run on the same preprocessed shapes scenes, with the same thread count;
the captions must be identical. Last line: JSON with each part's ms for both and their ratios.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from captioner.caption.captioner import Captioner
from captioner.caption.search import beam_search
from captioner.data.shapes import generate_split, render
from captioner.onnx_export import OnnxCaptioner, export_answerer, export_captioner
from captioner.paths import DEFAULT_CAPTION_MODEL, DEFAULT_VQA_MODEL
from captioner.vqa.answerer import Answerer, encode_questions


def side_by_side(fns: dict, repeat: int) -> dict[str, float]:
    """ms of each fn: the best of `repeat` runs, the fns alternating."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], 1000 * (time.perf_counter() - t))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, threads {args.threads}")
    captioner = Captioner.load(DEFAULT_CAPTION_MODEL)
    answerer = Answerer.load(DEFAULT_VQA_MODEL)
    scenes = generate_split(args.images, seed=11)
    images = [render(s) for s in scenes]
    questions = [s.questions[0].question for s in scenes]
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        export_captioner(captioner, Path(tmp) / "cap")
        export_answerer(answerer, Path(tmp) / "vqa")
        print(f"export: {time.perf_counter() - started:.1f} s")
        onnx_cap = OnnxCaptioner(Path(tmp) / "cap", threads=args.threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        vqa_enc, vqa_head = (
            ort.InferenceSession(str(Path(tmp) / "vqa" / f), options)
            for f in ("encoder.onnx", "head.onnx")
        )
        pixels = captioner.preprocess(images)
        vqa_pixels = answerer.preprocess(images)
        ids = encode_questions(questions, answerer.question_vocab)
        with torch.inference_mode():
            features = captioner.encode(pixels)
            memory = answerer.encode(vqa_pixels)
            want = [h[0].tokens for h in beam_search(captioner.model.decoder, features, 3, 20)]
        got = [h.tokens for h in onnx_cap.search(pixels, 3, 20)]
        identical = sum(a == b for a, b in zip(got, want)) / len(want)

        def torch_search():
            with torch.inference_mode():
                return beam_search(captioner.model.decoder, features, 3, 20)

        def torch_vqa_head():
            with torch.inference_mode():
                return answerer.model.head_prepared(memory, ids)

        np_vqa, np_memory, np_ids = vqa_pixels.numpy(), memory.numpy(), ids.numpy()
        parts = {
            "caption_encoder": {
                "torch": lambda: captioner.encode(pixels),
                "onnx": lambda: onnx_cap.encode(pixels),
            },
            "caption_beam3": {
                "torch": torch_search,
                "onnx": lambda: beam_search(onnx_cap.decoder, features, 3, 20),
            },
            "vqa_encoder": {
                "torch": lambda: answerer.encode(vqa_pixels),
                "onnx": lambda: vqa_enc.run(None, {"images": np_vqa}),
            },
            "vqa_head": {
                "torch": torch_vqa_head,
                "onnx": lambda: vqa_head.run(None, {"memory": np_memory, "questions": np_ids}),
            },
        }
        for name, fns in parts.items():
            ms = side_by_side(fns, args.repeat)
            out[f"{name}_torch_ms"] = ms["torch"]
            out[f"{name}_onnx_ms"] = ms["onnx"]
            out[f"{name}_onnx_speedup"] = ms["torch"] / ms["onnx"]
            print(
                f"{name:>16} x {args.images}: torch {ms['torch']:7.1f} ms, onnxruntime "
                f"{ms['onnx']:7.1f} ms ({ms['torch'] / ms['onnx']:.2f}x)"
            )
    print(f"captions identical: {identical:.0%}")
    print(json.dumps({k: round(v, 3) for k, v in out.items()} | {"captions_identical": identical}))


if __name__ == "__main__":
    main()
