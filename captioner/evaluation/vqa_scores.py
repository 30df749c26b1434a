"""A VQA model scored on a prepared split with the official VQA accuracy: what
`training.evaluate_vqa` writes and what training validates with.

    data = prepare(load_split("data/shapes", "test"), answerer.input_size)
    metrics = score(answerer, data)   # accuracy, per_answer_type, per_question_type, n
"""

from __future__ import annotations

from typing import Any

from captioner.data.vqa_data import PreparedSplit, VQASplit
from captioner.evaluation.vqa_accuracy import evaluate
from captioner.progress import progress
from captioner.vqa.answerer import Answerer


def annotations_of(split: VQASplit) -> list[dict]:
    """The split's questions as VQA v2 annotation records, as `vqa_accuracy.evaluate` reads them."""
    return [
        {
            "question_id": item.question_id,
            "answers": [{"answer": a} for a in item.answers],
            "answer_type": item.answer_type,
            "question_type": item.question_type,
        }
        for item in split.items
    ]


def predict(
    answerer: Answerer, data: PreparedSplit, batch_size: int = 64, show_progress: bool = False
) -> dict[int, str]:
    """Question id -> the model's answer, encoding each image once for all its questions."""
    predictions: dict[int, str] = {}
    rows = [r for r in range(data.num_images) if data.by_image[r]]
    starts = range(0, len(rows), batch_size)
    for start in progress(starts, len(starts), "evaluate", show_progress):
        image_rows = rows[start : start + batch_size]
        memory = answerer.encode(data.images.batch(image_rows, answerer.device))  # (B, L, M)
        items = [data.split.items[k] for r in image_rows for k in data.by_image[r]]
        local = [j for j, r in enumerate(image_rows) for _ in data.by_image[r]]
        answers = answerer.answer_features(
            memory, [item.question for item in items], top_k=1, image_index=local
        )
        for item, result in zip(items, answers, strict=True):
            predictions[item.question_id] = result.answer
    return predictions


def score(
    answerer: Answerer, data: PreparedSplit, batch_size: int = 64, show_progress: bool = False
) -> dict[str, Any]:
    """Official VQA accuracy on `data`: accuracy, per_answer_type, per_question_type, n."""
    if not data.split.items:
        raise ValueError("no questions to evaluate (every image missing or unreadable?)")
    return evaluate(predict(answerer, data, batch_size, show_progress), annotations_of(data.split))
