"""Train a captioner (Show, Attend and Tell or the no-attention baseline) on COCO-format captions.

    python -m training.make_shapes --out data/shapes --train 6000 --val 500 --test 0 --seed 1
    python -m training.train_captioner --data data/shapes --out runs/shapes --epochs 10
    torchrun --nproc_per_node=2 -m training.train_captioner --data data/shapes --out runs/ddp

The run folder gets `args.json`, `metrics.jsonl` (one line per validation), and the model folders
`best/` (highest validation metric) and `last/` (with optimizer state, for `--resume`).

`--resume` continues from `last/` with the run's own arguments (`--epochs`, `--patience` and
`--device` given again replace them; `--stop-after-steps`, `--max-minutes`, `--threads` and
`--no-progress` apply to this invocation only). After a kill it picks up the last complete
`last/` (saved every `--save-every` steps, on stopping and at each epoch end); a run killed before
its first save starts again from step 0. The loop itself is `training.loop`, shared with
`train_vqa`.

`--word-vectors glove-6b-50d` (or a GloVe / word2vec text file) starts the decoder's input word
embedding from pretrained vectors, row by row for the words of the caption vocabulary (which still
comes from the training captions); a linear map takes the vectors' width to `--embed-dim`.
`--freeze-vectors` keeps the rows as they are.

`--supervise-attention WEIGHT` (shapes data) adds attention correctness (Liu et al. 2017): for each
colour or shape word of a training caption, minus the log of its attention on the grid cells of
the objects it names, read from the training split's objects.json (`--train-objects`, by default
DATA/train/objects.json). Those are the cells `training.evaluate`'s grounding counts as right.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from captioner.caption.caption_net import CaptionNet
from captioner.caption.captioner import Captioner
from captioner.caption.decoder import HARD_INFERENCE
from captioner.caption.self_critical import BASELINES, SEARCHES, SelfCritical
from captioner.data.caption_data import (
    CaptionSet,
    drop_unreadable,
    encode_captions,
    load_coco_captions,
    load_karpathy,
)
from captioner.data.images import ImageTensors
from captioner.evaluation.caption_scores import caption_split, read_objects, score
from captioner.evaluation.cider import CiderD
from captioner.evaluation.grounding import attention_targets
from captioner.progress import progress
from captioner.vocab import Vocabulary
from captioner.word_vectors import init_embedding
from training import loop
from training.common import epoch_order, grouped_epoch_order, run_script

# DecoderConfig fields given by the command-line arguments of the same name
NET_ARGS = ("embed_dim", "hidden_dim", "attention_dim", "cell", "dropout", "positional")
NET_ARGS += ("hard_attention", "hard_inference", "hard_expected", "entropy_weight")
NET_ARGS += ("preview_steps", "attention_mass", "similarity_mass", "refine_layers", "refine_heads")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    groups = loop.add_common_args(p, grid_size=0, epochs=10, batch_unit="captions")
    data = groups["data"]
    data.add_argument("--data", help="a make_shapes-style folder: DATA/train and DATA/val")
    data.add_argument("--train-captions", help="COCO captions JSON for training")
    data.add_argument("--train-images", help="image folder for --train-captions")
    data.add_argument("--val-captions", help="COCO captions JSON for validation")
    data.add_argument("--val-images", help="image folder for --val-captions")
    data.add_argument("--val-objects", help="objects.json of the validation split (shapes data)")
    data.add_argument(
        "--train-objects",
        help="objects.json of the training split, for --supervise-attention (default with "
        "--data: DATA/train/objects.json)",
    )
    data.add_argument("--karpathy", help="Karpathy's dataset_coco.json (uses its train/val splits)")
    data.add_argument("--image-root", help="root of the image paths in --karpathy")
    data.add_argument(
        "--min-count", type=int, default=1, help="words seen fewer times become <unk>"
    )
    data.add_argument("--max-caption-tokens", type=int, default=24, help="longer captions are cut")
    data.add_argument(
        "--references",
        choices=("all", "first"),
        default="all",
        help="train on every reference or the first",
    )
    data.add_argument(
        "--group-by-image",
        action="store_true",
        help="keep each image's references together in the batches, so the encoder runs once "
        "per image instead of once per caption (a batch then holds ~batch-size/5 images)",
    )
    data.add_argument(
        "--val-limit", type=int, default=0, help="validate on at most this many images"
    )

    model = groups["model"]
    model.add_argument("--cell", choices=("lstm", "gru", "rnn"), default="lstm")
    model.add_argument("--layers", type=int, default=1)
    model.add_argument("--embed-dim", type=int, default=128)
    model.add_argument("--hidden-dim", type=int, default=256)
    model.add_argument("--attention-dim", type=int, default=128)
    model.add_argument("--no-attention", action="store_true", help="Show and Tell style baseline")
    model.add_argument(
        "--positional", action="store_true", help="learned position embedding per grid cell"
    )
    model.add_argument("--dropout", type=float, default=0.3)
    model.add_argument(
        "--alpha-c", type=float, default=1.0, help="doubly stochastic attention weight"
    )
    model.add_argument(
        "--preview-steps",
        type=int,
        default=0,
        help="attention steps the decoder takes before its first word (0: none)",
    )
    model.add_argument(
        "--attention-mass",
        action="store_true",
        help="each step also reads its attention energies' unnormalised mass, log(1 + sum of "
        "sigmoid(e)), so a count word can see how many cells match (the VQA model's --count)",
    )
    model.add_argument(
        "--similarity-mass",
        action="store_true",
        help="each step also reads how many grid cells look like what it attends (learned "
        "cosine threshold), so a count word can see a second copy of the attended object",
    )
    model.add_argument(
        "--refine-layers",
        type=int,
        default=0,
        help="transformer encoder layers (self-attention over the grid cells) between the CNN "
        "and the decoder, so each cell sees the others: a copy of an object, where the other "
        "object lies (0: none)",
    )
    model.add_argument(
        "--refine-heads", type=int, default=4, help="attention heads of each --refine-layers layer"
    )
    model.add_argument(
        "--supervise-attention",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="weight of the attention-correctness loss (Liu et al. 2017): each colour or shape "
        "word's attention drawn onto the objects it names, read from --train-objects; 0 = off",
    )
    model.add_argument(
        "--supervise-counts",
        action="store_true",
        help="with --supervise-attention: each count word ('a', 'two') is also drawn onto every "
        "object its phrase names, so the step that counts looks at all the copies (pair it "
        "with --attention-mass, which lets the step see how many cells it looks at)",
    )
    model.add_argument(
        "--count-each-copy",
        action="store_true",
        help="with --supervise-counts: a count word's term is the mean over the copies it "
        "counts of minus the log of the attention on that copy, so that attention on one copy "
        "alone no longer meets it",
    )
    model.add_argument(
        "--hard-attention",
        action="store_true",
        help="hard (stochastic) attention, Show, Attend and Tell 4.1: one sampled cell per word "
        "in training, learned with REINFORCE",
    )
    model.add_argument(
        "--hard-inference",
        choices=HARD_INFERENCE,
        default="expected",
        help="what a hard-attention model reads at inference: the expected context or the most "
        "likely cell",
    )
    model.add_argument(
        "--hard-expected",
        type=float,
        default=0.5,
        metavar="P",
        help="hard attention: the share of training captions that read the expected context "
        "instead of their sampled cells (Show, Attend and Tell 4.1 uses 0.5; 0: every caption "
        "samples)",
    )
    model.add_argument(
        "--entropy-weight", type=float, default=0.01, help="hard attention's entropy bonus"
    )

    groups["optimisation"].add_argument(
        "--scheduled-sampling",
        type=float,
        default=0.0,
        help="final probability of feeding the model's own word",
    )
    scst = p.add_argument_group(
        "self-critical training (Rennie et al. 2017): REINFORCE with the CIDEr-D of sampled "
        "captions, from a trained model; its CNN stays frozen"
    )
    scst.add_argument(
        "--scst-from",
        default=None,
        help="a captioner model folder to continue with self-critical training (the network "
        "and vocabulary are that folder's; the model arguments above are ignored)",
    )
    scst.add_argument(
        "--scst-samples", type=int, default=5, help="captions sampled (or beam-searched) per image"
    )
    scst.add_argument(
        "--scst-search",
        choices=SEARCHES,
        default="sample",
        help="sample: captions drawn from the model (the paper); beam: the --scst-samples best "
        "of a beam search that wide (Cornia et al. 2020), scored by their log-probabilities",
    )
    scst.add_argument(
        "--scst-baseline",
        choices=BASELINES,
        default="greedy",
        help="greedy: the CIDEr-D of the greedy caption (the paper); mean: of the other samples",
    )
    scst.add_argument("--scst-max-length", type=int, default=20, help="longest sampled caption")
    scst.add_argument(
        "--scst-xe-weight",
        type=float,
        default=0.0,
        help="also this times the cross-entropy of each image's first reference",
    )
    scst.add_argument(
        "--scst-weight",
        type=float,
        default=1.0,
        help="weight of the self-critical term; 0 (with --scst-xe-weight) samples nothing: "
        "cross-entropy alone on the same data with the same frozen CNN, the control that says "
        "what the reward adds",
    )
    run = groups["run"]
    run.add_argument("--early-stop-metric", default="CIDEr", help="CIDEr, Bleu_4 or scene_accuracy")
    run.add_argument("--val-beam-size", type=int, default=1)
    return p


def load_splits(args) -> tuple[CaptionSet, CaptionSet | None, Path | None]:
    if args.data:
        root = Path(args.data)
        args.train_captions = args.train_captions or str(root / "train" / "captions.json")
        args.train_images = args.train_images or str(root / "train" / "images")
        if (root / "val" / "captions.json").is_file():
            args.val_captions = args.val_captions or str(root / "val" / "captions.json")
            args.val_images = args.val_images or str(root / "val" / "images")
            if (root / "val" / "objects.json").is_file():
                args.val_objects = args.val_objects or str(root / "val" / "objects.json")
        if args.supervise_attention > 0 and (root / "train" / "objects.json").is_file():
            args.train_objects = args.train_objects or str(root / "train" / "objects.json")
    if args.karpathy:
        if not args.image_root:
            raise ValueError("--karpathy needs --image-root")
        return (
            load_karpathy(args.karpathy, args.image_root, "train"),
            load_karpathy(args.karpathy, args.image_root, "val"),
            None,
        )
    if not (args.train_captions and args.train_images):
        raise ValueError("give --data, --karpathy, or --train-captions with --train-images")
    train = load_coco_captions(args.train_captions, args.train_images)
    val = load_coco_captions(args.val_captions, args.val_images) if args.val_captions else None
    if val is not None and args.val_limit:
        val.records = val.records[: args.val_limit]
    return train, val, Path(args.val_objects) if args.val_objects else None


def caption_attention_targets(
    caption_ids: torch.Tensor,
    image_ids: list[int],
    objects: dict[int, list[dict[str, Any]]],
    vocab: Vocabulary,
    grid_hw: tuple[int, int],
    source: str | Path = "the objects",
    counts: bool = False,
    each_copy: bool = False,
) -> torch.Tensor:
    """(captions, T-1, cells) bool: for caption k (word ids `<start> ... <end> <pad>...`, about
    image `image_ids[k]`), the cells each predicted word should attend (`attention_targets`, with
    `counts` the count words' too, and with `each_copy` as uint8 bit sets, one bit per copy);
    `source` names the objects in the error for an image they lack."""
    ids = caption_ids[:, 1:]
    dtype = torch.uint8 if counts and each_copy else torch.bool
    out = torch.zeros(*ids.shape, grid_hw[0] * grid_hw[1], dtype=dtype)
    for k, image_id in enumerate(image_ids):
        if image_id not in objects:
            raise ValueError(f"image {image_id} has no objects in {source}")
        words = vocab.decode_tokens(ids[k].tolist())
        targets = attention_targets(words, objects[image_id], grid_hw, counts, each_copy)
        out[k, : len(words)] = torch.from_numpy(targets)
    return out


class CaptionTask(loop.Task):
    """Caption pairs (image, reference) in batches; each distinct image of a batch encoded once."""

    script, kind, side_files, rate_unit = "train_captioner", "captioner", ("vocab.json",), "img_s"

    def __init__(self, args: argparse.Namespace, d, show: bool):
        super().__init__(args, d, show)
        if args.supervise_attention < 0:
            raise ValueError(f"--supervise-attention must be >= 0, got {args.supervise_attention}")
        if args.supervise_attention > 0 and args.scst_from:
            raise ValueError(
                "--supervise-attention trains with cross-entropy: not with --scst-from"
            )
        if args.scst_from and (args.scst_weight < 0 or args.scst_xe_weight < 0):
            raise ValueError(
                f"--scst-weight and --scst-xe-weight must be >= 0, got {args.scst_weight} and "
                f"{args.scst_xe_weight}"
            )
        if args.scst_from and args.scst_weight == 0 and args.scst_xe_weight == 0:
            raise ValueError("--scst-weight 0 needs --scst-xe-weight > 0 (nothing to learn)")
        if args.supervise_counts and not args.supervise_attention > 0:
            raise ValueError("--supervise-counts needs --supervise-attention WEIGHT > 0")
        if args.count_each_copy and not args.supervise_counts:
            raise ValueError("--count-each-copy needs --supervise-counts")
        if args.supervise_attention > 0 and args.no_attention:
            raise ValueError("--supervise-attention needs attention: not with --no-attention")
        self.train_set, self.val_set, objects_file = load_splits(args)
        if len(self.train_set) == 0:
            raise ValueError("no training images found (check --train-captions / --train-images)")
        self.objects = read_objects(objects_file) if objects_file is not None else None
        if args.supervise_attention > 0 and not args.train_objects:
            raise ValueError(
                "--supervise-attention needs --train-objects (or --data with a train/objects.json)"
            )

    def build(self, side: dict[str, Any] | None) -> CaptionNet:
        args = self.args
        if args.scst_from:  # the folder's network and vocabulary; resume then loads its weights
            start = Captioner.load(args.scst_from)
            self.vocab = start.vocab
            args.input_size = start.input_size  # images are decoded at the folder's size
            for p in start.model.encoder.parameters():
                p.requires_grad_(False)
            return start.model
        if side is not None:
            self.vocab = Vocabulary.from_json(side["vocab.json"])
        else:
            self.vocab = Vocabulary.build(
                (c for r in self.train_set.records for c in r.captions), min_count=args.min_count
            )
        vectors = loop.load_word_vectors(args)
        net = CaptionNet.build(
            loop.encoder_config(args),
            vocab_size=len(self.vocab),
            pad_id=self.vocab.pad_id,
            attention=not args.no_attention,
            num_layers=args.layers,
            doubly_stochastic=args.alpha_c,
            word_dim=0 if vectors is None else vectors.dim,
            **{name: getattr(args, name) for name in NET_ARGS},
        )
        if vectors is not None:  # the caption vocabulary's rows; on --resume the saved ones win
            record = init_embedding(
                net.decoder.embedding, self.vocab.itos, vectors, args.freeze_vectors, args.seed
            )
            self.word_vectors = {**record, "vector_words": None}
        self.grid_hw = net.grid_hw
        return net

    def wrap(self, model: CaptionNet, name: str, version: str) -> Captioner:
        self.captioner = Captioner(
            model, self.vocab, name=name, version=version, device=self.d.device
        )
        return self.captioner

    def prepare(self) -> ImageTensors:
        args = self.args
        images = ImageTensors(
            [r.path for r in self.train_set.records],
            args.input_size,
            progress if self.show else None,
        )
        self.train_set = drop_unreadable(self.train_set, images)
        records = self.train_set.records
        per_image = 1 if args.references == "first" or args.scst_from else None
        self.pairs = [
            (i, j) for i, r in enumerate(records) for j in range(per_image or len(r.captions))
        ]
        self.groups: list[list[int]] = [[] for _ in records]  # each image's pair indices
        for k, (i, _) in enumerate(self.pairs):
            self.groups[i].append(k)
        texts = [records[i].captions[j] for i, j in self.pairs]
        self.caption_ids = encode_captions(texts, self.vocab, args.max_caption_tokens)
        self.attention_targets = None
        if args.supervise_attention > 0:
            self.attention_targets = caption_attention_targets(
                self.caption_ids,
                [records[i].image_id for i, _ in self.pairs],
                read_objects(args.train_objects),
                self.vocab,
                self.grid_hw,
                args.train_objects,
                counts=args.supervise_counts,
                each_copy=args.count_each_copy,
            )
        if args.scst_from:  # rewards against each image's references, idf from all of them
            refs = {
                i: [self.vocab.encode(c, add_special=False) for c in r.captions]
                for i, r in enumerate(records)
            }
            self.cider = CiderD(refs)
            self.rewards: list[float] = []
        self.val_images = None
        if self.val_set is not None and self.d.is_main:
            self.val_images = ImageTensors([r.path for r in self.val_set.records], args.input_size)
            self.val_set = drop_unreadable(self.val_set, self.val_images)
        return images

    def num_samples(self) -> int:
        return len(self.pairs)

    def epoch_order(self, epoch: int) -> list[int]:
        if self.args.group_by_image:
            return grouped_epoch_order(self.groups, self.args.seed, epoch, self.d)
        return epoch_order(len(self.pairs), self.args.seed, epoch, self.d)

    def batch(self, samples: list[int]) -> tuple[list[int], Any, int]:
        images, image_index = torch.unique(
            torch.tensor([self.pairs[k][0] for k in samples]), return_inverse=True
        )
        captions = self.caption_ids[samples]
        captions = captions[:, : int((captions != self.vocab.pad_id).sum(1).max())]
        targets = None
        if self.attention_targets is not None:
            targets = self.attention_targets[samples][:, : captions.shape[1] - 1]
        rows = images.tolist()
        return rows, (captions, image_index, rows, targets), len(samples)

    def objective(self, model: CaptionNet) -> torch.nn.Module:
        if not self.args.scst_from:
            return model
        args = self.args
        return SelfCritical(
            model,
            self.cider,
            samples=args.scst_samples,
            baseline=args.scst_baseline,
            max_length=args.scst_max_length,
            xe_weight=args.scst_xe_weight,
            search=args.scst_search,
            policy_weight=args.scst_weight,
        )

    def loss(self, net, inputs, payload, step: int, total_steps: int) -> torch.Tensor:
        captions, image_index, rows, targets = payload
        device = inputs.device
        if self.args.scst_from:
            loss, stats = net(inputs, rows, captions.to(device), image_index.to(device))
            if "reward" in stats:  # none without the self-critical term (--scst-weight 0)
                self.rewards.append(stats["reward"])
            return loss
        sample_prob = self.args.scheduled_sampling * min(1.0, step / max(1, total_steps))
        _, loss = net(
            inputs,
            captions.to(device),
            sample_prob,
            image_index.to(device),
            None if targets is None else targets.to(device),
            self.args.supervise_attention,
        )
        return loss

    def epoch_fields(self) -> dict[str, Any]:
        """The epoch's mean sampled reward (CIDEr-D) under self-critical training."""
        if not self.args.scst_from or not self.rewards:
            return {}
        mean, self.rewards = sum(self.rewards) / len(self.rewards), []
        return {"train_reward": mean}

    def validate(self, captioner: Captioner):
        """BLEU/CIDEr without Java (fast); on shapes data also object/scene accuracy and grounding:
        `training.evaluate`'s figures, with the project's tokenizer and no METEOR."""
        if self.val_images is None:
            return None
        results, _ = caption_split(
            captioner,
            self.val_set,
            beam_size=self.args.val_beam_size,
            batch_size=64,
            images=self.val_images,
        )
        objects = self.objects
        if objects is not None:
            objects = {k: v for k, v in objects.items() if k in results}
        metrics = score(
            captioner,
            results,
            self.val_set.references(),
            objects,
            meteor=False,
            ptb_tokenize=False,
        )
        metric = self.args.early_stop_metric
        if metrics.get(metric) is None:
            available = sorted(k for k, v in metrics.items() if v is not None)
            raise ValueError(f"--early-stop-metric {metric!r} is not among {available}")
        return metrics, metrics, metrics[metric]

    def data_record(self) -> dict[str, Any]:
        args = self.args
        return {
            "train": args.train_captions or args.karpathy,
            "train_images": len(self.train_set),
            "train_pairs": len(self.pairs),
            "val": args.val_captions,
            "skipped_missing": self.train_set.skipped_missing,
            "skipped_unreadable": len(self.train_set.skipped_unreadable),
        }


def main(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """Train; returns the final `step`, `epoch`, last validation `metrics`, `best` value,
    `weights_sha256` and `model`."""
    return loop.main(CaptionTask, args, argv)


if __name__ == "__main__":
    run_script(main, get_args_parser(), "train_captioner")
