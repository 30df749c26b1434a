"""The progress bar of every long loop (training, evaluation, folder captioning): tqdm, quiet when
`enabled` is False, resized with the terminal and gone once the loop ends."""

from __future__ import annotations

from collections.abc import Iterable

from tqdm import tqdm


def progress(iterable: Iterable, total: int | None = None, desc: str = "", enabled: bool = True):
    return tqdm(
        iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False
    )
