"""Where the demo models live: `models/` at the repository root (the package is installed editable)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"
DEFAULT_CAPTION_MODEL = MODELS_DIR / "shapes-captioner"
DEFAULT_VQA_MODEL = MODELS_DIR / "shapes-vqa"
