"""A bounded, thread-safe LRU cache of encoder features, keyed by image content and model identity.

Asking several questions about one image should cost one encoder pass: the VQA model and the
service look features up by `key_for(image_bytes, model_name, model_version)` before encoding.

    cache = FeatureCache(max_items=256)
    key = key_for(upload, "shapes-vqa", "1")
    features = cache.get(key)
    if features is None:
        features = encode(upload)
        cache.put(key, features)
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import torch


def key_for(image_bytes: bytes, model_name: str, model_version: str = "") -> str:
    """sha256 over the model's identity and the image's encoded bytes (not its decoded pixels)."""
    if not isinstance(image_bytes, (bytes, bytearray, memoryview)):
        raise TypeError(f"image_bytes must be bytes, got {type(image_bytes).__name__}")
    h = hashlib.sha256()
    # Length-prefixed identity, so ("ab", "c") and ("a", "bc") never share a key.
    for part in (model_name, model_version):
        raw = part.encode("utf-8")
        h.update(len(raw).to_bytes(8, "big"))
        h.update(raw)
    h.update(bytes(image_bytes))
    return h.hexdigest()


class FeatureCache:
    """Least-recently-used map from keys to feature tensors, holding at most `max_items`. A value
    may also be a tuple holding the tensor and what was computed with it (the answerer keeps each
    image's domain score with its features).

    `max_items=0` disables caching (every `get` misses, `put` stores nothing). All methods are
    safe to call from several threads; `hits` and `misses` count `get` outcomes.
    """

    def __init__(self, max_items: int = 256):
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 0:
            raise ValueError(f"max_items must be an int >= 0, got {max_items!r}")
        self.max_items = max_items
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any:
        with self._lock:
            features = self._items.get(key)
            if features is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return features

    def put(self, key: str, features: Any) -> None:
        if self.max_items == 0:
            return
        if isinstance(features, tuple):
            features = tuple(f.detach() if isinstance(f, torch.Tensor) else f for f in features)
        else:
            features = features.detach()
        with self._lock:
            self._items[key] = features
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.hits = self.misses = 0

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
