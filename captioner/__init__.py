"""Image captioning (Show, Attend and Tell) and visual question answering in PyTorch.

    from captioner import Captioner, Answerer
    [caption] = Captioner.load("models/shapes-captioner").caption(["scene.png"])
    [answer] = Answerer.load("models/shapes-vqa").answer(["scene.png"], ["what color is it?"])

The layout follows the architecture: `caption/` (the captioning network, its attention, decoder
and searches, and `Captioner`, a loaded model folder), `vqa/` (the VQA network and `Answerer`),
`data/` (datasets on disk and the shapes world), `evaluation/` (scores), and at the top what both
tasks share: `image` (decoding and preprocessing), `encoder` (the CNNs), `vocab`, `checkpoint`
(model folders), `results` (what the models return, and its JSON) and `overlay`. Networks are
named `...Net`; the objects that load, run and save a model folder are named for what they do.
"""

__version__ = "0.1.0"

_PUBLIC = {
    "Captioner": "captioner.caption.captioner",
    "Answerer": "captioner.vqa.answerer",
    "CaptionResult": "captioner.results",
    "AnswerResult": "captioner.results",
    "AttentionFormat": "captioner.results",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    """The public classes, imported on first use so that `import captioner` stays cheap."""
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
