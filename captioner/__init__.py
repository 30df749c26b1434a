"""Image captioning (Show, Attend and Tell) and visual question answering in PyTorch."""

__version__ = "0.1.0"
