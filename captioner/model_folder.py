"""What a loaded model folder (`Captioner`, `Answerer`) does alike on both sides: preprocess
images for its encoder, describe itself, and save itself with the side files and tensors its parts
add (vocabularies, card, domain statistics)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from captioner.checkpoint import save_model_dir
from captioner.image import ImageInput, as_images, preprocess_batch


class ModelFolder:
    """A mixin: subclasses give `config()`, `files(training)`, `model`, `training`, `card`,
    `domain` and `quantize`."""

    what = "a model"  # for messages

    @property
    def input_size(self) -> int:
        return self.model.encoder.config.input_size

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        return preprocess_batch(as_images(images), self.input_size)

    def folder_metadata(self) -> dict[str, Any]:
        """What `metadata()` says alike for both kinds: training data and figures, card, domain."""
        return {
            "training_data": self.training.get("data"),
            "metrics": self.training.get("metrics"),
            "card": self.card.to_dict(),
            "domain": None if self.domain is None else self.domain.summary(),
        }

    def tensor_files(self) -> dict[str, dict[str, torch.Tensor]]:
        """The `*.safetensors` files of a model folder besides the weights."""
        return self.domain.tensor_files() if self.domain is not None else {}

    def save(self, path: str | Path, training: dict | None = None) -> Path:
        """Write the model folder atomically; `training` replaces its training record."""
        if self.quantize is not None:
            raise ValueError(
                f"{self.what} loaded with quantize={self.quantize!r} cannot be saved: model "
                "folders hold float weights (save it loaded without quantize)"
            )
        return save_model_dir(
            path, self.config(), self.model.state_dict(), self.files(training), self.tensor_files()
        )
