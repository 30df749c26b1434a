"""The VQA network: question LSTM, question-guided attention over the image grid, answer classifier.

Following Show, Ask, Attend, and Answer (Kazemi and Elqursh, 2017): the image grid is
L2-normalised per cell, attention logits come from a 1x1 convolution (a per-cell linear layer) over
[features; tiled question] with a ReLU, a softmax over the cells per glimpse gives G maps, and the
G attended vectors are concatenated with the question vector and classified over the top training
answers. `attention=False` is the baseline: the question vector and the pooled image vector.

The question encoder reads the words left to right, or with `bidirectional` also right to left
(a second LSTM/GRU over each question reversed, Schuster and Paliwal, 1997): each word's state then
knows the words after it too ("the circle *left of the square*"), and the question vector is both
directions' summaries side by side (`question_dim` = 2 x hidden_dim), the width everything that
reads the question (word attention, glimpse queries, the classifier) takes. Its word embedding may
start from pretrained vectors (`captioner.word_vectors`), which then set `embed_dim`.

Two additions for the shapes world, both off by default: a learned position embedding per grid
cell (questions about spatial relations need to know where a glimpse looked), and `count=True`,
which also feeds the classifier each glimpse's unnormalised attention mass, sum_i sigmoid(e_i): a
softmax sums to 1 whatever the number of matching objects, so it cannot count on its own (Zhang,
Hare and Pruegel-Bennett, 2018, "Learning to Count Objects in Natural Images for VQA").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from captioner.encoder import Encoder, EncoderConfig

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


@dataclass(frozen=True)
class VQAConfig:
    question_vocab_size: int
    num_answers: int
    feature_dim: int
    grid_cells: int
    embed_dim: int = 128
    hidden_dim: int = 256  # question encoder, per direction
    cell: str = "lstm"
    bidirectional: bool = False  # also read each question right to left (question_dim = 2 x hidden)
    attention: bool = True
    glimpses: int = 2
    attention_dim: int = 256
    fusion_dim: int = 512
    positional: bool = False
    coords: bool = False
    count: bool = False
    stacked: bool = False
    question_attention: bool = False
    relative: bool = False
    normalize: bool = True  # L2-normalise each grid cell (Kazemi and Elqursh, Sec. 3.1)
    dropout: float = 0.2
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        for name in ("question_vocab_size", "num_answers", "feature_dim", "grid_cells"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("embed_dim", "hidden_dim", "fusion_dim", "glimpses", "attention_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def question_dim(self) -> int:
        """Width of the question vector and of each word's state: hidden_dim per direction."""
        return self.hidden_dim * (2 if self.bidirectional else 1)

    @property
    def question_encoder(self) -> str:
        """The encoder in a word: "lstm", "gru", "bilstm" or "bigru"."""
        return ("bi" if self.bidirectional else "") + self.cell

    @property
    def cell_dim(self) -> int:
        """Width of one grid cell as attention sees it: the features, plus (x, y) with `coords`."""
        return self.feature_dim + (2 if self.coords else 0)

    def to_dict(self) -> dict:
        return asdict(self)


class QuestionEncoder(nn.Module):
    """Word embedding + one-layer LSTM/GRU; the question vector is the state after its last word
    (bidirectional: beside the right-to-left state after its first word)."""

    def __init__(self, c: VQAConfig):
        super().__init__()
        self.pad_id, self.cell = c.pad_id, c.cell
        self.embedding = nn.Embedding(c.question_vocab_size, c.embed_dim, padding_idx=c.pad_id)
        self.rnn = CELLS[c.cell](c.embed_dim, c.hidden_dim, batch_first=True)
        # Right to left: its own RNN over each question reversed in place (words only, padding
        # kept at the end), so padding never reaches a word's state in either direction. Two
        # plain RNNs rather than nn.LSTM(bidirectional=True), whose reverse pass would start in
        # the padding unless the batch were packed (and packed sequences do not export to ONNX).
        self.rnn_back = (
            CELLS[c.cell](c.embed_dim, c.hidden_dim, batch_first=True) if c.bidirectional else None
        )
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, questions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """questions (Q, T), words first and <pad> after -> (question vector (Q, H'), the state
        at every word (Q, T, H'), word mask (Q, T)), H' = `question_dim`. Right padding never
        reaches a word's state."""
        mask = questions != self.pad_id  # (Q, T)
        lengths = mask.sum(dim=1)  # (Q,)
        exporting = torch.compiler.is_exporting()  # ONNX: no data-dependent check or shape
        if not exporting and bool((lengths == 0).any()):
            raise ValueError("every question needs at least one word")
        # Questions repeat a lot (templates, several images asked the same thing): run the RNN,
        # the costliest part of a training step on a CPU, once per distinct question.
        if not exporting and len(questions) > 1:
            unique, inverse = torch.unique(questions, dim=0, return_inverse=True)
            last, states = self._encode(unique, (unique != self.pad_id).sum(dim=1))  # (U, ...)
            last, states = last[inverse], states[inverse]  # (Q, H'), (Q, T, H')
        else:
            last, states = self._encode(questions, lengths)
        return last, states, mask

    def _encode(
        self, questions: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """questions (Q, T), lengths (Q,) -> (question vector (Q, H'), states (Q, T, H'))."""
        x = self.dropout(torch.tanh(self.embedding(questions)))  # (Q, T, E)
        if self._fused(questions, lengths):
            return self._encode_fused(x)
        states, _ = self.rnn(x)  # (Q, T, H)
        rows = torch.arange(questions.shape[0], device=states.device)
        last = states[rows, lengths - 1]  # (Q, H)
        if self.rnn_back is None:
            return last, states
        # Position t of a question of n words reads word n-1-t (t < n); padding stays in place.
        # The map is its own inverse, so it also puts the reverse states back in word order.
        t = torch.arange(questions.shape[1], device=questions.device).unsqueeze(0)  # (1, T)
        n = lengths.unsqueeze(1)  # (Q, 1)
        flip = torch.where(t < n, n - 1 - t, t)  # (Q, T)
        x_back = x.gather(1, flip.unsqueeze(2).expand(-1, -1, x.shape[2]))
        back, _ = self.rnn_back(x_back)  # (Q, T, H), reversed
        back = back.gather(1, flip.unsqueeze(2).expand(-1, -1, back.shape[2]))  # word order
        # The right-to-left summary is its state at the first word, after reading them all.
        return torch.cat([last, back[:, 0]], dim=1), torch.cat([states, back], dim=2)

    def _fused(self, questions: torch.Tensor, lengths: torch.Tensor) -> bool:
        """Whether `_encode_fused` gives `_encode`'s result: a bidirectional encoder at inference
        (plain LSTM/GRU weights, not int8 or exporting) on questions without padding."""
        return (
            self.rnn_back is not None
            and not self.training
            and type(self.rnn) is type(self.rnn_back) is CELLS[self.cell]
            and not torch.compiler.is_exporting()
            and bool((lengths == questions.shape[1]).all())
        )

    def _encode_fused(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`_encode` on questions without padding, both directions in one call of PyTorch's
        bidirectional RNN kernel (its reverse pass starts at the last word, which without padding
        is where `rnn_back` starts). On a 2-core CPU a question about a cached image took 1.77
        ms against 1.97 ms with the two calls (`cached_ms` of bench/vqa_cache.py)."""
        weights = [
            getattr(rnn, name)
            for rnn in (self.rnn, self.rnn_back)
            for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
        ]
        h0 = x.new_zeros(2, x.shape[0], self.rnn.hidden_size)
        if self.cell == "lstm":
            states = torch.lstm(x, (h0, h0), weights, True, 1, 0.0, False, True, True)[0]
        else:
            states = torch.gru(x, h0, weights, True, 1, 0.0, False, True, True)[0]
        hidden = self.rnn.hidden_size  # states (Q, T, 2H): left to right, then right to left
        return torch.cat([states[:, -1, :hidden], states[:, 0, hidden:]], dim=1), states


class WordAttention(nn.Module):
    """One summary of the question per glimpse: softmax over its words of w_g^T tanh(W h_t + U q).

    Question attention as in Lu et al. (2016), "Hierarchical Question-Image Co-Attention": a
    question about two objects ("is the red circle left of the blue square?") can send each glimpse
    the words of one object instead of squeezing both into one query vector.
    """

    def __init__(self, c: VQAConfig):
        super().__init__()
        self.state_proj = nn.Linear(c.question_dim, c.attention_dim, bias=False)
        self.question_proj = nn.Linear(c.question_dim, c.attention_dim)
        self.score = nn.Linear(c.attention_dim, c.glimpses)

    def forward(
        self, question: torch.Tensor, states: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        # question (Q, H'), states (Q, T, H'), mask (Q, T) -> one query per glimpse (Q, G, H')
        hidden = torch.tanh(self.state_proj(states) + self.question_proj(question).unsqueeze(1))
        logits = self.score(hidden).transpose(1, 2)  # (Q, G, T)
        logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
        return torch.bmm(torch.softmax(logits, dim=2), states)  # (Q, G, H)


class GlimpseAttention(nn.Module):
    """G softmax maps over the cells from ReLU(W_v v_i + W_q q) (a 1x1 conv over [v; tiled q]).

    With `stacked`, glimpse g's query is q plus what glimpses < g saw (u_g = u_{g-1} + W_r v~_g,
    the stacked attention of Yang et al., 2016), so a later glimpse can look relative to an earlier
    one ("the object to the left of the red circle"); otherwise the G glimpses are parallel. With
    `question_attention`, each glimpse starts from its own summary of the words (`WordAttention`).
    """

    def __init__(self, c: VQAConfig):
        super().__init__()
        self.feature_proj = nn.Linear(c.cell_dim, c.attention_dim, bias=False)
        self.question_proj = nn.Linear(c.question_dim, c.attention_dim)
        self.score = nn.Linear(c.attention_dim, c.glimpses)
        self.refine = (
            nn.Linear(c.cell_dim, c.question_dim) if c.stacked and c.glimpses > 1 else None
        )
        self.words = WordAttention(c) if c.question_attention else None
        # Glimpse g > 0 may also score each cell by its offset from where glimpse g-1 looked,
        # through a small question-weighted basis of offset features (w(u_g)^T ReLU(P [dx; dy])).
        self.offset_basis = nn.Linear(2, 32) if c.relative else None
        self.offset_query = nn.Linear(c.question_dim, 32) if c.relative else None

    def forward(
        self,
        features: torch.Tensor,
        projected: torch.Tensor,
        question: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        cell_xy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """features (Q, L, D), projected (Q, L, A) = feature_proj(features) computed once per image,
        question = QuestionEncoder's output -> (glimpses (Q, G, D), attention (Q, G, L),
        logits (Q, G, L))."""
        q = question[0]  # (Q, H')
        if self.refine is None and self.words is None and self.offset_basis is None:
            hidden = F.relu(projected + self.question_proj(q).unsqueeze(1))  # (Q, L, A)
            logits = self.score(hidden).transpose(1, 2)  # (Q, G, L)
            alpha = torch.softmax(logits, dim=2)
            return torch.bmm(alpha, features), alpha, logits
        G = self.score.out_features
        queries = (
            self.words(*question) if self.words is not None else q.unsqueeze(1).expand(-1, G, -1)
        )
        seen = torch.zeros_like(q)  # (Q, H'): what earlier glimpses saw, when stacked
        all_logits, glimpses = [], []
        for g in range(G):
            query = queries[:, g] + seen
            hidden = F.relu(projected + self.question_proj(query).unsqueeze(1))  # (Q, L, A)
            logits = F.linear(hidden, self.score.weight[g : g + 1], self.score.bias[g : g + 1])
            if self.offset_basis is not None and g > 0:
                centre = alpha @ cell_xy  # (Q, 2): where the previous glimpse looked
                offsets = F.relu(self.offset_basis(cell_xy - centre.unsqueeze(1)))  # (Q, L, 32)
                logits = logits + offsets @ self.offset_query(query).unsqueeze(2)  # (Q, L, 1)
            alpha = torch.softmax(logits.squeeze(2), dim=1)  # (Q, L)
            glimpse = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (Q, D)
            if self.refine is not None:
                seen = seen + self.refine(glimpse)
            all_logits.append(logits.squeeze(2))
            glimpses.append(glimpse)
        logits = torch.stack(all_logits, dim=1)  # (Q, G, L)
        return torch.stack(glimpses, dim=1), torch.softmax(logits, dim=2), logits


class VQANet(nn.Module):
    """`forward(images or features, questions, image_index, targets) -> (logits, loss)`."""

    def __init__(self, encoder_config: EncoderConfig, config: VQAConfig, load_weights: bool = True):
        super().__init__()
        self.encoder = Encoder(encoder_config, load_weights=load_weights)
        if config.feature_dim != self.encoder.feature_dim:
            raise ValueError(
                f"VQA feature_dim {config.feature_dim} does not match encoder "
                f"{encoder_config.name} output {self.encoder.feature_dim}"
            )
        if config.grid_cells != self.encoder.num_cells:
            raise ValueError(
                f"VQA grid_cells {config.grid_cells} does not match the encoder grid "
                f"{self.encoder.grid_hw}"
            )
        c = self.config = config
        self.question = QuestionEncoder(c)
        self.position = (
            nn.Parameter(torch.zeros(c.grid_cells, c.feature_dim)) if c.positional else None
        )
        self.attend = GlimpseAttention(c) if c.attention else None
        h, w = self.encoder.grid_hw
        ys, xs = torch.meshgrid(
            (torch.arange(h) + 0.5) / h * 2 - 1, (torch.arange(w) + 0.5) / w * 2 - 1, indexing="ij"
        )
        # Each cell's centre (x, y) in [-1, 1]; not saved with the weights: it follows from the grid.
        self.register_buffer("cell_xy", torch.stack([xs, ys], dim=2).flatten(0, 1), False)
        image_dim = c.glimpses * c.cell_dim if c.attention else c.cell_dim
        count_dim = c.glimpses if c.attention and c.count else 0
        self.classifier = nn.Sequential(
            nn.Dropout(c.dropout),
            nn.Linear(image_dim + count_dim + c.question_dim, c.fusion_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(c.dropout),
            nn.Linear(c.fusion_dim, c.num_answers),
        )

    @classmethod
    def build(
        cls, encoder_config: EncoderConfig, question_vocab_size: int, num_answers: int, **kwargs
    ) -> VQANet:
        """A network whose image-side sizes follow from the encoder (feature width, grid cells)."""
        probe = Encoder(encoder_config, load_weights=False)
        config = VQAConfig(
            question_vocab_size=question_vocab_size,
            num_answers=num_answers,
            feature_dim=probe.feature_dim,
            grid_cells=probe.num_cells,
            **kwargs,
        )
        return cls(encoder_config, config)

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.encoder.grid_hw

    def features(self, images_or_features: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) go through the encoder; grids (B, L, D) pass as they are."""
        return self.encoder.grid_of(images_or_features)

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder grids (B, L, D) -> what every question about those images reads (B, L, M):
        the cells as attention sees them (L2-normalised, positions added, coordinates appended)
        and, with attention, their projection for the glimpses, side by side. Computed once per
        image: the VQA feature cache holds this, so a cached image costs only the question."""
        c = self.config
        v = F.normalize(features, dim=2) if c.normalize else features  # (B, L, D)
        if self.position is not None:
            v = v + self.position
        if c.coords:
            xy = self.cell_xy.to(v.dtype).expand(v.shape[0], -1, -1)
            v = torch.cat([v, xy], dim=2)  # (B, L, D+2)
        if self.attend is None:
            return v
        return torch.cat([v, self.attend.feature_proj(v)], dim=2)  # (B, L, D(+2) + A)

    def head(
        self,
        features: torch.Tensor,
        questions: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """features (B, L, D), questions (Q, T) -> (logits (Q, A), attention (Q, G, L) or None).

        Question q is about image `image_index[q]` (default: one question per image), so several
        questions share one image's encoding and its attention projection.
        """
        return self.head_prepared(self.prepare(features), questions, image_index)

    def head_prepared(
        self,
        memory: torch.Tensor,
        questions: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As `head`, from `prepare(features)` (B, L, M)."""
        c = self.config
        width = c.cell_dim + (c.attention_dim if c.attention else 0)
        if memory.dim() != 3 or memory.shape[2] != width:
            raise ValueError(
                f"expected prepared image memory (B, L, {width}), got {tuple(memory.shape)}"
            )
        if image_index is None and questions.shape[0] != memory.shape[0]:
            raise ValueError(
                f"{len(questions)} questions for {len(memory)} images; pass image_index"
            )
        question = self.question(questions)
        q = question[0]  # (Q, H')
        if image_index is not None:
            memory = memory[image_index]  # (Q, L, M)
        v = memory[..., : c.cell_dim]
        if self.attend is None:
            image, alpha = v.mean(dim=1), None  # (Q, D)
        else:
            glimpses, alpha, logits = self.attend(
                v, memory[..., c.cell_dim :], question, self.cell_xy.to(v.dtype)
            )  # (Q, G, D|L)
            image = glimpses.flatten(1)  # (Q, G*D)
            if c.count:
                image = torch.cat([image, torch.sigmoid(logits).sum(dim=2)], dim=1)
        return self.classifier(torch.cat([image, q], dim=1)), alpha

    def forward(
        self,
        images_or_features: torch.Tensor,
        questions: torch.Tensor,
        image_index: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(logits (Q, A), loss)`; `targets` (Q, A) are soft answer scores, e.g. min(1, n/3).

        The loss is the cross-entropy against the targets normalised to sum 1 per question, so all
        10 human answers count; questions whose answers are all outside the vocabulary add nothing.
        """
        logits, _ = self.head(self.features(images_or_features), questions, image_index)
        loss = None if targets is None else soft_cross_entropy(logits, targets)
        return logits, loss


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over questions of -sum_a p_a log softmax(logits)_a, with p = targets / sum(targets)."""
    total = targets.sum(dim=1, keepdim=True)  # (Q, 1)
    weights = targets / total.clamp_min(1e-12)
    per_question = -(weights * torch.log_softmax(logits.float(), dim=1)).sum(dim=1)
    answered = (total.squeeze(1) > 0).float()
    return (per_question * answered).sum() / answered.sum().clamp_min(1.0)
