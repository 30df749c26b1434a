"""Tiny real models built on the fly (CPU, seconds)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from captioner.caption.caption_net import CaptionNet
from captioner.data.shapes import generate_split
from captioner.encoder import EncoderConfig
from captioner.vocab import Vocabulary
from training.make_shapes import write_split

ROOT = Path(__file__).resolve().parent.parent

TINY_CAPTIONS = [
    "a small red circle to the left of a large blue square",
    "two green triangles",
    "a big yellow star above a small purple circle",
]


# train_captioner arguments for a tiny model that trains in seconds
TINY_TRAINING = ["--input-size", "32", "--encoder-width", "4", "--embed-dim", "16"]
TINY_TRAINING += ["--hidden-dim", "24", "--attention-dim", "12", "--batch-size", "16"]
TINY_TRAINING += ["--warmup-steps", "2", "--no-progress"]


def write_tiny_shapes(root: Path) -> Path:
    """A make_shapes-style folder of 32-pixel scenes: 24 in train/, 6 in val/."""
    write_split(generate_split(24, seed=5, size=32), root / "train")
    write_split(generate_split(6, seed=6, size=32, start_id=1000), root / "val")
    return root


def tiny_encoder_config(**overrides) -> EncoderConfig:
    args = dict(name="small_cnn", input_size=32, grid_size=4, width=4, fine_tune_blocks=3)
    args.update(overrides)
    return EncoderConfig(**args)


def tiny_model(vocab_size: int = 30, seed: int = 0, **decoder_args) -> CaptionNet:
    torch.manual_seed(seed)
    args = dict(embed_dim=16, hidden_dim=24, attention_dim=12, dropout=0.0)
    args.update(decoder_args)
    encoder_args = args.pop("encoder", {})
    return CaptionNet.build(tiny_encoder_config(**encoder_args), vocab_size=vocab_size, **args)


def scripted_model(vocab: Vocabulary, words: list[str], **decoder_args) -> CaptionNet:
    """A tiny real network whose every search writes `words` (distinct) and then `<end>`.

    Its weights are set, not trained: each of `<start>` and `words` gets its own one-hot
    embedding, and the output layer reads only the embedding of the previous word (the deep
    output's hidden-state and context terms are zeroed), scoring the word that follows it 30
    logits above the rest."""
    model = tiny_model(len(vocab), **decoder_args)
    decoder = model.decoder
    chain = [vocab.start_id, *(vocab.stoi[w] for w in words), vocab.end_id]
    if len(set(chain)) != len(chain) or len(chain) - 1 > decoder.config.embed_dim:
        raise ValueError(f"words must be distinct, at most embed_dim - 1, got {words}")
    with torch.no_grad():
        for layer in (decoder.out_h, decoder.out_z, decoder.out):
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()
        for k, (prev, nxt) in enumerate(zip(chain, chain[1:])):
            decoder.embedding.weight[prev] = torch.nn.functional.one_hot(
                torch.tensor(k), decoder.config.embed_dim
            ).float()
            decoder.out.weight[nxt, k] = 30.0
    return model


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request) -> Iterator[int]:
    """Run the test under this umask (process-wide), restored afterwards."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def assert_umask_modes(umask: int, *paths: Path) -> None:
    """Each of `paths` and everything under it has the mode a plain open()/mkdir() would give
    under `umask`: folders 0o777 & ~umask, files 0o666 & ~umask."""
    wrong = {}
    for root in paths:
        for p in [root, *sorted(root.rglob("*"))]:
            mode = stat.S_IMODE(p.lstat().st_mode)
            want = (0o777 if p.is_dir() else 0o666) & ~umask
            if mode != want:
                wrong[str(p)] = f"{mode:o} (want {want:o})"
    assert not wrong, f"modes under umask {umask:03o}: {wrong}"


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary.build(TINY_CAPTIONS)


@pytest.fixture
def captioner(vocab):
    from captioner.caption.captioner import Captioner

    return Captioner(tiny_model(len(vocab)), vocab, name="tiny", version="1")


def run_torchrun(script: Path, argv: list[str], out_dir: Path, timeout: float = 240) -> str:
    """Run `script argv` as 2 CPU processes under torchrun; returns its output, asserting exit 0.

    `--standalone` takes a free port of its own (`--master_port=0` leaves the workers waiting).
    The launcher gets its own session so that a time-out kills the workers too: they hold the
    output pipe open, and killing only the launcher would leave the test waiting on them.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OUT_DIR": str(out_dir), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*cmd, str(script), *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    assert proc.returncode == 0, output[-3000:]
    return output
