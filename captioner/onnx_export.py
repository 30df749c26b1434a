"""ONNX export for CPU deployment, and a runner that checks the exported graphs.

A captioner becomes three graphs, a VQA model two, each folder with a `manifest.json` (every
graph's inputs and outputs with their shapes, the vocabulary files, the preprocessing, the model's
name and version):

    captioner:  encoder.onnx        images (B, 3, S, S) -> features (B, L, D)
                decoder_start.onnx  features -> memory (grid with positions, its attention
                                    projection, pooled) and the initial state h, c (N, B, H)
                decoder_step.onnx   memory, tokens (B, K), h, c (N, B, K, H) -> logits (B, K, V),
                                    alpha (B, K, L), h, c: one word for K beams of each image
    VQA:        encoder.onnx        images -> memory (B, L, M) (`VQANet.prepare` included)
                head.onnx           memory, questions (B, T) word ids -> logits (B, A), alpha (B, G, L)

The search stays outside the graphs (beam search is a loop of host-side decisions): `OnnxCaptioner`
runs the library's own `beam_search` with the step graph in place of `CaptionDecoder.step`, under
onnxruntime, so exported captions can be checked against PyTorch's. `captioner export --onnx DIR`
is the command. Needs the `onnx` and `onnxscript` packages to export, `onnxruntime` to run.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from captioner.caption.captioner import Captioner
from captioner.caption.decoder import CaptionDecoder, DecoderConfig, Memory, State
from captioner.caption.search import Hypothesis, beam_search
from captioner.checkpoint import _replace_dir
from captioner.files import atomic_dir
from captioner.image import IMAGENET_MEAN, IMAGENET_STD
from captioner.vocab import Vocabulary
from captioner.vqa.answerer import ANSWERS, QUESTION_VOCAB, Answerer
from captioner.vqa.vqa_net import VQANet

MANIFEST, FORMAT_VERSION, OPSET = "manifest.json", 1, 18


# -- the graphs ------------------------------------------------------------------------------
class _Encoder(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.encoder = net.encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)[0]  # (B, L, D)


class _VQAEncoder(nn.Module):
    def __init__(self, net: VQANet):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.prepare(self.net.encoder(images)[0])  # (B, L, M)


class _VQAHead(nn.Module):
    def __init__(self, net: VQANet):
        super().__init__()
        self.net = net

    def forward(self, memory: torch.Tensor, questions: torch.Tensor):
        logits, alpha = self.net.head_prepared(memory, questions)
        return (logits,) if alpha is None else (logits, alpha)


def _memory_names(config: DecoderConfig) -> list[str]:
    return ["memory_features", "memory_projected"] if config.attention else ["memory_pooled"]


def _state_names(config: DecoderConfig) -> list[str]:
    return ["h", "c"] if config.cell == "lstm" else ["h"]


class _DecoderStart(nn.Module):
    def __init__(self, decoder: CaptionDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, features: torch.Tensor):
        memory = self.decoder.memory(features)
        hs, cs = self.decoder.init_state(memory)
        parts = [memory.features, memory.projected] if memory.projected is not None else []
        states = [torch.stack(hs)] + ([torch.stack(cs)] if cs is not None else [])
        return (*parts, memory.pooled, *states)  # memory, pooled, then (N, B, H) states


class _DecoderStep(nn.Module):
    """memory..., tokens (B, K), h[, c] (N, B, K, H) -> logits (B, K, V)[, alpha], h[, c]."""

    def __init__(self, decoder: CaptionDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, *inputs: torch.Tensor):
        c = self.decoder.config
        if c.attention:
            features, projected, tokens, *states = inputs
            memory = Memory(features, projected, features[:, 0])  # pooled unused with attention
        else:
            pooled, tokens, *states = inputs
            memory = Memory(pooled.unsqueeze(1), None, pooled)
        B, K = tokens.shape
        rows = [[s[i].reshape(B * K, -1) for i in range(c.num_layers)] for s in states]
        state = (rows[0], rows[1] if len(rows) > 1 else None)
        logits, alpha, (hs, cs) = self.decoder.step(memory, state, tokens.reshape(B * K))
        out = [logits.view(B, K, -1)] + ([alpha.view(B, K, -1)] if alpha is not None else [])
        out.append(torch.stack(hs).view(c.num_layers, B, K, -1))
        if cs is not None:
            out.append(torch.stack(cs).view(c.num_layers, B, K, -1))
        return tuple(out)


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    file: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic: list[dict[int, Any]],
    varargs: bool = False,
) -> None:
    shapes: Any = (tuple(dynamic),) if varargs else tuple(dynamic)
    with warnings.catch_warnings():
        # The exporter notes that an axis shared by several inputs (`batch`) is named once.
        warnings.filterwarnings("ignore", message=".*axis name", category=UserWarning)
        # nn.LSTM re-assigns its flat weight list while traced, and torch.export's own loop for
        # it calls a function slated for removal: notices about torch's code, not ours.
        warnings.filterwarnings("ignore", message="_check_is_size", category=FutureWarning)
        warnings.filterwarnings(
            "ignore", message=".*were assigned during export", category=UserWarning
        )
        program = torch.onnx.export(
            module.eval(),
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=shapes,
            verbose=False,
            external_data=False,
        )
    program.save(str(file), external_data=False)


def _describe(file: Path) -> dict[str, Any]:
    """A graph's inputs and outputs as the ONNX file declares them: name, shape, dtype."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(file), load_external_data=False).graph

    def info(values) -> list[dict[str, Any]]:
        return [
            {
                "name": v.name,
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
                "dtype": np.dtype(
                    helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
                ).name,
            }
            for v in values
        ]

    return {"file": file.name, "inputs": info(graph.input), "outputs": info(graph.output)}


def _manifest(kind: str, model: Any, input_size: int, grid_hw: tuple[int, int]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model": {"name": model.name, "version": model.version},
        "opset": OPSET,
        "preprocess": {
            "input_size": input_size,
            "layout": "NCHW float32 RGB: squashed to input_size x input_size (PIL bilinear, "
            "no crop), pixels / 255, then (x - mean) / std per channel",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "grid": list(grid_hw),
    }


@torch.no_grad()
def export_captioner(captioner: Captioner, out: str | Path) -> Path:
    """Write `captioner` to folder `out` (replaced atomically) as the three graphs above."""
    if captioner.quantize is not None:
        raise ValueError("export the float captioner: dynamic int8 layers do not export to ONNX")
    net, c = captioner.model.eval().cpu(), captioner.model.decoder.config
    size = captioner.input_size
    B, K, N, H = 2, 3, c.num_layers, c.hidden_dim
    batch, beams = torch.export.Dim("batch"), torch.export.Dim("beams")
    images = torch.randn(B, 3, size, size)
    features = net.encoder(images)[0]
    start_out = _DecoderStart(net.decoder)(features)
    memory_names, state_names = _memory_names(c), _state_names(c)
    memory = [start_out[0], start_out[1]] if c.attention else [start_out[-1 - len(state_names)]]
    states = [torch.randn(N, B, K, H) for _ in state_names]
    tokens = torch.randint(4, c.vocab_size, (B, K)) if c.vocab_size > 4 else torch.ones(B, K)
    step_out = ["logits"] + (["alpha"] if c.attention else []) + [f"{n}_out" for n in state_names]
    with atomic_dir(out, replace=_replace_dir) as tmp:  # a folder there is swapped out
        _export(
            _Encoder(net), (images,), tmp / "encoder.onnx", ["images"], ["features"], [{0: batch}]
        )
        _export(
            _DecoderStart(net.decoder),
            (features,),
            tmp / "decoder_start.onnx",
            ["features"],
            (["memory_features", "memory_projected"] if c.attention else [])
            + ["memory_pooled", *state_names],
            [{0: batch}],
        )
        _export(
            _DecoderStep(net.decoder),
            (*memory, tokens.long(), *states),
            tmp / "decoder_step.onnx",
            [*memory_names, "tokens", *state_names],
            step_out,
            [{0: batch}] * len(memory)
            + [{0: batch, 1: beams}]
            + [{1: batch, 2: beams}] * len(states),
            varargs=True,
        )
        (tmp / "vocab.json").write_text(json.dumps(captioner.vocab.to_json()), encoding="utf-8")
        manifest = _manifest("captioner", captioner, size, net.grid_hw)
        manifest.update(
            vocab="vocab.json",
            special_ids={
                "pad": Vocabulary.pad_id,
                "start": Vocabulary.start_id,
                "end": Vocabulary.end_id,
                "unk": Vocabulary.unk_id,
            },
            decoder=c.to_dict(),
            graphs={
                name: _describe(tmp / f"{name}.onnx")
                for name in ("encoder", "decoder_start", "decoder_step")
            },
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return Path(out)


@torch.no_grad()
def export_answerer(answerer: Answerer, out: str | Path) -> Path:
    """Write the VQA model to folder `out` (replaced atomically) as its two graphs."""
    if answerer.quantize is not None:
        raise ValueError("export the float VQA model: dynamic int8 layers do not export to ONNX")
    net, c = answerer.model.eval().cpu(), answerer.model.config
    size, B = answerer.input_size, 2
    batch, words = torch.export.Dim("batch"), torch.export.Dim("words")
    images = torch.randn(B, 3, size, size)
    memory = net.prepare(net.encoder(images)[0])
    questions = torch.randint(4, max(5, c.question_vocab_size), (B, 5)) % c.question_vocab_size
    questions[questions < 4] = Vocabulary.unk_id  # real words or <unk>: no question is empty
    outputs = ["logits", "alpha"] if c.attention else ["logits"]
    with atomic_dir(out, replace=_replace_dir) as tmp:  # a folder there is swapped out
        _export(
            _VQAEncoder(net), (images,), tmp / "encoder.onnx", ["images"], ["memory"], [{0: batch}]
        )
        _export(
            _VQAHead(net),
            (memory, questions),
            tmp / "head.onnx",
            ["memory", "questions"],
            outputs,
            [{0: batch}, {0: batch, 1: words}],
        )
        (tmp / QUESTION_VOCAB).write_text(
            json.dumps(answerer.question_vocab.to_json()), encoding="utf-8"
        )
        (tmp / ANSWERS).write_text(json.dumps({"answers": answerer.answers}), encoding="utf-8")
        manifest = _manifest("vqa", answerer, size, answerer.grid_hw)
        manifest.update(
            question_vocab=QUESTION_VOCAB,
            answers=ANSWERS,
            questions="word ids from question_vocab (lower-cased words, <unk> for others), "
            "padded on the right with <pad> (0)",
            vqa=c.to_dict(),
            graphs={name: _describe(tmp / f"{name}.onnx") for name in ("encoder", "head")},
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return Path(out)


# -- running the exported captioner ----------------------------------------------------------
def _session(file: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])


class OnnxDecoder:
    """The decoder interface `beam_search` and `greedy` use (`config`, `memory`, `init_state`,
    `step`), answered by the exported decoder_start and decoder_step graphs."""

    def __init__(self, folder: Path, manifest: dict[str, Any], threads: int | None = None):
        self.config = DecoderConfig(**manifest["decoder"])
        self.start = _session(folder / "decoder_start.onnx", threads)
        self.graph = _session(folder / "decoder_step.onnx", threads)
        self._initial: dict[int, State] = {}

    def memory(self, features: torch.Tensor) -> Memory:
        out = [torch.from_numpy(a) for a in self.start.run(None, {"features": _np(features)})]
        if self.config.attention:
            memory = Memory(out[0], out[1], out[2])
            states = out[3:]
        else:
            memory = Memory(out[0].unsqueeze(1), None, out[0])
            states = out[1:]
        self._initial = {
            id(memory): (list(states[0]), list(states[1]) if len(states) > 1 else None)
        }
        return memory

    def init_state(self, memory: Memory) -> State:
        return self._initial.pop(id(memory))

    def step(self, memory: Memory, state: State, prev_tokens: torch.Tensor):
        c = self.config
        B = memory.pooled.shape[0]
        K = prev_tokens.shape[0] // B
        feed = (
            {"memory_features": _np(memory.features), "memory_projected": _np(memory.projected)}
            if c.attention
            else {"memory_pooled": _np(memory.pooled)}
        )
        feed["tokens"] = _np(prev_tokens.view(B, K))
        for name, layers in zip(_state_names(c), (state[0], state[1])):
            feed[name] = _np(torch.stack(layers).view(c.num_layers, B, K, -1))
        out = iter(torch.from_numpy(a) for a in self.graph.run(None, feed))
        logits = next(out).view(B * K, -1)
        alpha = next(out).view(B * K, -1) if c.attention else None
        hs = list(next(out).view(c.num_layers, B * K, -1))
        cs = list(next(out).view(c.num_layers, B * K, -1)) if c.cell == "lstm" else None
        return logits, alpha, (hs, cs)


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy())


class OnnxCaptioner:
    """An exported captioner folder under onnxruntime: `encode(pixels)` and `search(...)`."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        vocab_file = self.folder / self.manifest["vocab"]
        self.vocab = Vocabulary.from_json(json.loads(vocab_file.read_text(encoding="utf-8")))
        self.encoder = _session(self.folder / "encoder.onnx", threads)
        self.decoder = OnnxDecoder(self.folder, self.manifest, threads)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, S, S) -> grid features (B, L, D)."""
        return torch.from_numpy(self.encoder.run(None, {"images": _np(pixels)})[0])

    def search(
        self, pixels: torch.Tensor, beam_size: int = 3, max_length: int = 20
    ) -> list[Hypothesis]:
        """The best caption per image, by the library's beam search over the step graph."""
        features = self.encode(pixels)
        return [h[0] for h in beam_search(self.decoder, features, beam_size, max_length)]


def export_models(
    out: str | Path,
    caption_model: str | Path | None,
    vqa_model: str | Path | None,
) -> list[Path]:
    """Export each given model folder to `out/<folder name>`; returns the folders written."""
    written = []
    if caption_model is not None:
        name = Path(caption_model).name
        written.append(export_captioner(Captioner.load(caption_model), Path(out) / name))
    if vqa_model is not None:
        name = Path(vqa_model).name
        written.append(export_answerer(Answerer.load(vqa_model), Path(out) / name))
    return written
