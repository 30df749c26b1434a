"""The `captioner` command: caption images, ask a question about one, or serve the API.

It sits above both the library (`captioner/`) and the service (`api/`), so it lives here: the
library never imports the web app. Captions and answers print as the HTTP API returns them
(`CaptionResult.to_dict`, `AnswerResult.to_dict`), plus the image's path.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from captioner.paths import DEFAULT_CAPTION_MODEL, DEFAULT_VQA_MODEL
from captioner.results import AttentionFormat

FORMATS = [f.value for f in AttentionFormat]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    cap = sub.add_parser("caption", help="caption images; prints one JSON object per image")
    cap.add_argument("images", nargs="+", help="image files")
    cap.add_argument("--model", default=str(DEFAULT_CAPTION_MODEL), help="captioner model folder")
    cap.add_argument("--beam-size", type=int, default=3, help="beam width (1 = greedy)")
    cap.add_argument("--max-length", type=int, default=20, help="longest caption in words")
    cap.add_argument("--batch-size", type=int, default=16, help="images per batch")
    cap.add_argument(
        "--attention",
        nargs="?",
        choices=FORMATS,
        default="none",
        const="grid",
        help="per-word attention maps: grid (the default when the flag is given alone), png "
        "(heatmaps over the image) or none (the default)",
    )
    cap.add_argument("--device", default="cpu", help="cpu or cuda")
    cap.add_argument("--quantize", choices=["int8"], help="int8 LSTM and linear layers (CPU)")
    cap.add_argument(
        "--fuse-attention",
        action="store_true",
        help="the attention energy as one torch.compile'd loop (compiled at load, a few seconds; "
        "pays on CPUs where the eager tanh pass is slow; not with --quantize)",
    )

    ask = sub.add_parser("ask", help="answer a question about an image; prints JSON")
    ask.add_argument("image", help="image file")
    ask.add_argument("question", help="the question, e.g. 'what color is the circle?'")
    ask.add_argument("--model", default=str(DEFAULT_VQA_MODEL), help="VQA model folder")
    ask.add_argument("--top-k", type=int, default=3, help="how many answers to list")
    ask.add_argument(
        "--attention",
        choices=FORMATS,
        default="grid",
        help="each glimpse's attention map: grid (default), png (heatmaps over the image) or none",
    )
    ask.add_argument("--device", default="cpu", help="cpu or cuda")
    ask.add_argument("--quantize", choices=["int8"], help="int8 LSTM and linear layers (CPU)")

    export = sub.add_parser("export", help="write the models as ONNX graphs for CPU deployment")
    export.add_argument("--onnx", required=True, metavar="DIR", help="writes DIR/<model folder>/")
    export.add_argument("--caption-model", default=str(DEFAULT_CAPTION_MODEL), help="'' skips it")
    export.add_argument("--vqa-model", default=str(DEFAULT_VQA_MODEL), help="'' skips it")

    serve = sub.add_parser("serve", help="start the HTTP service (uvicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--caption-model", default=None, help="captioner folder (default: the demo model)"
    )
    serve.add_argument("--vqa-model", default=None, help="VQA folder (default: the demo model)")
    return parser


def caption_main(args: argparse.Namespace) -> int:
    from captioner.caption.captioner import Captioner
    from captioner.image import ImageError, load_image

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    captioner = Captioner.load(
        args.model, device=args.device, quantize=args.quantize, fuse_attention=args.fuse_attention
    )
    failed = 0
    for start in range(0, len(args.images), args.batch_size):
        paths, images = [], []
        for path in args.images[start : start + args.batch_size]:
            try:
                images.append(load_image(path))
                paths.append(path)
            except ImageError as exc:
                failed += 1
                print(f"captioner: skipping {path}: {exc}", file=sys.stderr)
        results = captioner.caption(images, beam_size=args.beam_size, max_length=args.max_length)
        for path, image, result in zip(paths, images, results, strict=True):
            print(json.dumps({"image": path, **result.to_dict(args.attention, image)}), flush=True)
    return 1 if failed else 0


def ask_main(args: argparse.Namespace) -> int:
    from captioner.image import load_image
    from captioner.vqa.answerer import Answerer

    answerer = Answerer.load(args.model, device=args.device, quantize=args.quantize)
    image = load_image(args.image)
    [result] = answerer.answer([image], [args.question.strip()], top_k=args.top_k)
    print(json.dumps({"image": args.image, **result.to_dict(args.attention, image)}))
    return 0


def export_main(args: argparse.Namespace) -> int:
    from captioner.onnx_export import export_models

    try:
        folders = export_models(args.onnx, args.caption_model or None, args.vqa_model or None)
    except ImportError as exc:  # the exporter's packages are an extra: captioner[onnx]
        print(f"captioner: error: {exc}; pip install 'captioner[onnx]'", file=sys.stderr)
        return 2
    for folder in folders:
        print(json.dumps({"onnx": str(folder), "manifest": str(folder / "manifest.json")}))
    return 0


def serve_main(args: argparse.Namespace) -> int:
    from .server import serve

    serve(
        host=args.host, port=args.port, caption_model=args.caption_model, vqa_model=args.vqa_model
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    run = {
        "caption": caption_main,
        "ask": ask_main,
        "export": export_main,
        "serve": serve_main,
    }[args.command]
    try:
        return run(args)
    except ValueError as exc:  # library errors name the bad value; no traceback for bad input
        print(f"captioner: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
