"""What a loaded model folder (`Captioner`, `Answerer`) does alike on both sides: save itself,
with the side files and tensors its parts add (vocabularies, card, domain statistics)."""

from __future__ import annotations

from pathlib import Path

import torch

from captioner.checkpoint import save_model_dir


class ModelFolder:
    """A mixin: subclasses give `config()`, `files(training)`, `model`, `domain` and `quantize`."""

    what = "a model"  # for messages

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
