"""Recurrent caption decoder: LSTM (default), GRU or vanilla RNN, with or without soft attention.

With attention this is Show, Attend and Tell (Xu et al., 2015); without, the pooled image vector
conditions every step (a Show and Tell style baseline for comparison).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from captioner.caption.attention import SoftAttention, doubly_stochastic_penalty
from captioner.vocab import Vocabulary

CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}
HARD_INFERENCE = ("expected", "argmax")
BASELINE_DECAY = 0.9  # of the hard attention reward's moving average (Show, Attend and Tell 4.1)


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    feature_dim: int
    grid_cells: int
    embed_dim: int = 256
    # The word table's width when it is not embed_dim: pretrained vectors (captioner.word_vectors)
    # set it, and a linear map takes their rows to embed_dim, which is also the deep output
    # layer's width (see `out_h`), so 50-d vectors do not narrow what predicts the next word.
    # 0: the table is embed_dim wide.
    word_dim: int = 0
    hidden_dim: int = 512
    attention_dim: int = 256
    attention: bool = True
    cell: str = "lstm"
    num_layers: int = 1
    dropout: float = 0.5
    # A learned embedding per grid cell added to the features, so attention and words can use where
    # things are (spatial relations) even when the CNN's padding gives little position information.
    positional: bool = False
    # Weight of the doubly stochastic attention term (Show, Attend and Tell eq. 14, lambda).
    doubly_stochastic: float = 1.0
    pad_id: int = 0
    # Hard (stochastic) attention, Show, Attend and Tell section 4.1: in training each step reads
    # one cell sampled from the attention distribution, learned with REINFORCE (reward: the mean
    # log-likelihood of the caption's words, a moving-average baseline) plus an entropy bonus. At
    # inference the step reads the expected context ("expected", as soft attention does) or the
    # most likely cell ("argmax"). The maps returned are the distribution either way.
    hard_attention: bool = False
    hard_inference: str = "expected"
    entropy_weight: float = 0.01
    # The share of training captions whose steps read the expected context instead of their
    # sampled cell, drawn per caption ("with probability 0.5 for a given image, we set the
    # sampled attention location to its expected value", Show, Attend and Tell 4.1). Those
    # captions train the attention through the context, as soft attention does, and add nothing
    # to the REINFORCE term.
    hard_expected: float = 0.5
    # Steps the decoder takes before its first word: each attends and updates the state from the
    # <start> input, and writes nothing, so the first word (a count: "two small red circles")
    # can depend on more than one look at the image. Part of `init_state`, so every search,
    # self-critical sampling and the ONNX graphs run them.
    preview_steps: int = 0
    # Each step's LSTM also reads log(1 + sum_i sigmoid(e_ti)), the unnormalised mass of its
    # attention energies: alpha is a softmax, so the context is the same whether one or three
    # identical objects match what the step looks for, and a count word ("two small red
    # circles") has nothing to go on but the initial state. The VQA model's `count` feeds the
    # same mass to its classifier (Zhang, Hare and Pruegel-Bennett, 2018); the log keeps it on
    # the scale of the other inputs at any grid size.
    attention_mass: bool = False
    # Each step's LSTM also reads log(1 + sum_i sigmoid(s cos(w * z_t, w * a_i) + b)): how many
    # grid cells look like what the step attends (z_t, the expected context before the gate;
    # w (D), s and b learned, from 1, 10 and -7: cells within cosine 0.7 count). A second copy of
    # the attended object adds its cells, so the count word of "two small red circles" can see
    # the repeat; the attention mass above counts the cells that match the query instead, and
    # saturates (see the README).
    similarity_mass: bool = False
    # Transformer encoder layers (pre-norm self-attention over the grid cells, `refine_heads`
    # heads, a 2x-wide feed-forward) that refine the grid once per image before anything reads
    # it, as captioning models since AoANet (Huang et al. 2019) and the Meshed-Memory
    # Transformer do: each cell can look at every other, so an object's cells can tell that a
    # copy of it stands elsewhere ("two small red circles"), or where the other object lies.
    # Part of `memory`, so every search and the ONNX start graph run it. 0: none.
    refine_layers: int = 0
    refine_heads: int = 4

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        for name in (
            "vocab_size",
            "feature_dim",
            "grid_cells",
            "embed_dim",
            "hidden_dim",
            "num_layers",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.word_dim < 0:
            raise ValueError(f"word_dim must be >= 0 (0: embed_dim), got {self.word_dim}")
        if self.refine_layers < 0:
            raise ValueError(f"refine_layers must be >= 0, got {self.refine_layers}")
        if self.refine_layers and (self.refine_heads < 1 or self.feature_dim % self.refine_heads):
            raise ValueError(
                f"refine_heads must be >= 1 and divide feature_dim {self.feature_dim}, got "
                f"{self.refine_heads}"
            )
        if self.preview_steps < 0:
            raise ValueError(f"preview_steps must be >= 0, got {self.preview_steps}")
        if self.preview_steps and not self.attention:
            raise ValueError(
                "preview_steps needs attention=True (there is nothing else to look at)"
            )
        if self.attention and self.attention_dim < 1:
            raise ValueError(f"attention_dim must be >= 1, got {self.attention_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attention_mass and not self.attention:
            raise ValueError("attention_mass needs attention=True (it is the attention's mass)")
        if self.similarity_mass and not self.attention:
            raise ValueError("similarity_mass needs attention=True (it counts what is attended)")
        if self.hard_attention and not self.attention:
            raise ValueError("hard_attention needs attention=True")
        if not 0.0 <= self.hard_expected <= 1.0:
            raise ValueError(f"hard_expected must be in [0, 1], got {self.hard_expected}")
        if self.hard_inference not in HARD_INFERENCE:
            raise ValueError(
                f"hard_inference must be one of {HARD_INFERENCE}, got {self.hard_inference!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


State = tuple[list[torch.Tensor], list[torch.Tensor] | None]  # per layer: hidden, LSTM cell


class Memory:
    """What a decoder needs from the image for every step, computed once per image.

    It is held once per image however many rows of the state read it: with beam search, rows
    b*k .. b*k+k-1 (the k beams) all read image b (see `CaptionDecoder.step`).
    """

    def __init__(
        self, features: torch.Tensor, projected: torch.Tensor | None, pooled: torch.Tensor
    ):
        self.features = features  # (B, L, D)
        self.projected = projected  # (B, L, A) or None without attention
        self.pooled = pooled  # (B, D)

    def __len__(self) -> int:
        return self.features.shape[0]

    def index_select(self, index: torch.Tensor) -> Memory:
        pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        return Memory(pick(self.features), pick(self.projected), pick(self.pooled))

    def narrow(self, n: int) -> Memory:
        """The first n images, as views (no copy)."""
        pick = lambda t: None if t is None else t[:n]  # noqa: E731
        return Memory(pick(self.features), pick(self.projected), pick(self.pooled))


class CaptionDecoder(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        c = self.config = config
        words = c.word_dim or c.embed_dim
        self.embedding = nn.Embedding(c.vocab_size, words, padding_idx=c.pad_id)
        self.word_proj = nn.Linear(words, c.embed_dim, bias=False) if words != c.embed_dim else None
        self.position = (
            nn.Parameter(torch.zeros(c.grid_cells, c.feature_dim)) if c.positional else None
        )
        self.refine = None
        if c.refine_layers:
            layer = nn.TransformerEncoderLayer(
                c.feature_dim,
                c.refine_heads,
                dim_feedforward=2 * c.feature_dim,
                dropout=c.dropout,
                batch_first=True,
                norm_first=True,
            )
            self.refine = nn.TransformerEncoder(layer, c.refine_layers, enable_nested_tensor=False)
        self.attend = (
            SoftAttention(c.feature_dim, c.hidden_dim, c.attention_dim) if c.attention else None
        )
        # Gating scalar beta_t = sigmoid(f_beta(h_{t-1})) (Show, Attend and Tell Sec. 4.2.1).
        self.gate = nn.Linear(c.hidden_dim, c.feature_dim) if c.attention else None
        self.init_h = nn.Linear(c.feature_dim, c.hidden_dim * c.num_layers)
        self.init_c = (
            nn.Linear(c.feature_dim, c.hidden_dim * c.num_layers) if c.cell == "lstm" else None
        )
        cell = CELLS[c.cell]
        sizes = [c.embed_dim + c.feature_dim + c.attention_mass + c.similarity_mass]
        sizes += [c.hidden_dim] * (c.num_layers - 1)
        self.cells = nn.ModuleList(cell(size, c.hidden_dim) for size in sizes)
        self.dropout = nn.Dropout(c.dropout)
        # Deep output layer, Show, Attend and Tell eq. 7: p(y_t) ~ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t)).
        self.out_h = nn.Linear(c.hidden_dim, c.embed_dim)
        self.out_z = nn.Linear(c.feature_dim, c.embed_dim, bias=False)
        self.out = nn.Linear(c.embed_dim, c.vocab_size)
        if c.similarity_mass:  # w, s and b of the similarity mass
            self.similar_weight = nn.Parameter(torch.ones(c.feature_dim))
            self.similar_scale = nn.Parameter(torch.tensor(10.0))
            self.similar_bias = nn.Parameter(torch.tensor(-7.0))
        if c.hard_attention:  # the REINFORCE baseline: a moving average of the reward
            self.register_buffer("reward_baseline", torch.zeros(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embedding.weight[self.config.pad_id].zero_()
        if self.config.cell == "lstm":
            # Forget-gate bias 1 (Jozefowicz et al., 2015): gates are ordered input, forget, cell, output.
            h = self.config.hidden_dim
            for cell in self.cells:
                for bias in (cell.bias_ih, cell.bias_hh):
                    nn.init.zeros_(bias)
                    nn.init.constant_(bias[h : 2 * h], 0.5)  # the two biases add up to 1

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Word ids (...) -> their embeddings (..., embed_dim), through `word_proj` when the
        table is word_dim wide."""
        emb = self.embedding(tokens)
        return emb if self.word_proj is None else self.word_proj(emb)

    # -- per image -----------------------------------------------------------------------------
    def memory(self, features: torch.Tensor) -> Memory:
        """features (B, L, D) from the encoder -> what every step reads."""
        if features.dim() != 3 or features.shape[2] != self.config.feature_dim:
            raise ValueError(
                f"features must be (B, L, {self.config.feature_dim}), got {tuple(features.shape)}"
            )
        if self.position is not None:
            if features.shape[1] != self.config.grid_cells:
                raise ValueError(
                    f"expected {self.config.grid_cells} grid cells, got {features.shape[1]}"
                )
            features = features + self.position
        if self.refine is not None:
            features = self.refine(features)
        projected = self.attend.project(features) if self.attend is not None else None
        return Memory(features, projected, features.mean(dim=1))

    def init_state(self, memory: Memory) -> State:
        n, hdim = self.config.num_layers, self.config.hidden_dim
        h = torch.tanh(self.init_h(memory.pooled)).split(hdim, dim=1)
        c = torch.tanh(self.init_c(memory.pooled)).split(hdim, dim=1) if self.init_c else None
        state: State = list(h[:n]), (list(c[:n]) if c is not None else None)
        if self.config.preview_steps:
            # full_like keeps the batch size symbolic when the ONNX export traces this
            start = torch.full_like(memory.pooled[:, 0], Vocabulary.start_id, dtype=torch.long)
            for _ in range(self.config.preview_steps):
                state = self.step(memory, state, start)[2]
        return state

    # -- one step ------------------------------------------------------------------------------
    def step(
        self,
        memory: Memory,
        state: State,
        prev_tokens: torch.Tensor,
        cells: list[torch.Tensor] | None = None,
        read_expected: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, State]:
        """prev_tokens (R,) -> logits (R, V), attention (R, L) or None, new state; R = B*k rows.

        With B images in `memory`, rows b*k .. b*k+k-1 of the state and tokens are about image b:
        the k beams of a beam search read their image's memory, which is never copied per beam.
        Everywhere else k = 1 (one row per image). With hard attention the cell each row drew
        is appended to `cells` when given; in training, the rows where `read_expected` (R,) is
        true read the expected context instead (`DecoderConfig.hard_expected`).
        """
        hs, cs = state
        top = hs[-1]
        B, R = memory.features.shape[0], prev_tokens.shape[0]
        if B == 0 or R % B or top.shape[0] != R:
            raise ValueError(
                f"expected k rows of state and tokens per image ({B} images), got "
                f"{top.shape[0]} state rows and {R} tokens"
            )
        extra = []  # (R, 1) each: the masses the LSTM also reads
        if self.attend is not None:
            # context (R, D), alpha and energy (R, L)
            context, alpha, energy = self.attend(memory.features, memory.projected, top)
            if self.config.hard_attention:
                context = self._hard_context(memory.features, alpha, context, cells, read_expected)
            if self.config.attention_mass:
                extra.append(torch.log1p(torch.sigmoid(energy).sum(dim=1, keepdim=True)))
            if self.config.similarity_mass:
                extra.append(self._similarity_mass(memory.features, context))
            context = torch.sigmoid(self.gate(top)) * context
        else:
            context, alpha = memory.pooled, None  # (B, D)
            if R > B:
                context = context.repeat_interleave(R // B, dim=0)  # (R, D): small, D per row
        emb = self.embed(prev_tokens)  # (R, E)
        x = torch.cat([emb, context, *extra], dim=1)
        new_h, new_c = [], []
        for i, cell in enumerate(self.cells):
            if cs is not None:
                h, c = cell(x, (hs[i], cs[i]))
                new_c.append(c)
            else:
                h = cell(x, hs[i])
            new_h.append(h)
            x = self.dropout(h) if i < len(self.cells) - 1 else h
        deep = emb + self.out_h(self.dropout(x)) + self.out_z(context)
        logits = self.out(self.dropout(deep))  # (B, V)
        return logits, alpha, (new_h, new_c if cs is not None else None)

    def _similarity_mass(self, features: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """features (B, L, D), context (B*k, D) -> (B*k, 1): log(1 + the number of cells whose
        weighted cosine with the context passes the learned threshold, softly); row r is about
        image r // k, as in `step`."""
        B, L, D = features.shape
        keys = F.normalize(features * self.similar_weight, dim=2)  # (B, L, D)
        query = F.normalize(context * self.similar_weight, dim=1).view(B, -1, D)  # (B, k, D)
        cosine = torch.bmm(query, keys.transpose(1, 2)).reshape(-1, L)  # (B*k, L)
        near = torch.sigmoid(self.similar_scale * cosine + self.similar_bias)
        return torch.log1p(near.sum(dim=1, keepdim=True))

    def _hard_context(
        self,
        features: torch.Tensor,
        alpha: torch.Tensor,
        expected: torch.Tensor,
        cells: list[torch.Tensor] | None,
        read_expected: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The one cell a hard-attention step reads: sampled from alpha in training (except the
        `read_expected` rows, which keep the weighted sum), the most likely in evaluation with
        "argmax"; "expected" evaluation keeps the weighted sum."""
        if self.training:
            cell = torch.multinomial(alpha.detach().float(), 1).squeeze(1)  # (B,)
        elif self.config.hard_inference == "argmax":
            cell = alpha.argmax(dim=1)
        else:
            return expected
        if cells is not None:
            cells.append(cell)
        rows = torch.arange(len(alpha), device=alpha.device) // (len(alpha) // len(features))
        read = features[rows, cell]  # (R, D): row r reads its image r // k
        if self.training and read_expected is not None:
            read = torch.where(read_expected.unsqueeze(1), expected, read)
        return read

    # -- teacher forcing -----------------------------------------------------------------------
    def forward(
        self,
        features: torch.Tensor,
        captions: torch.Tensor,
        sample_prob: float = 0.0,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """features (N, L, D), captions (B, T) as `<start> w1 .. wn <end> <pad>..`; caption b is
        about image `image_index[b]` (default: N = B, one caption per image). The memory (refine
        layers, attention projection) is computed once per image, however many captions read it.

        Returns logits (B, T-1, V) predicting captions[:, 1:] (zeros at padded steps), the loss
        (cross-entropy over real tokens plus the doubly stochastic term), and attention (B, T-1, L).
        Each step runs only on the captions still going: they are sorted by length, so the live
        ones are a prefix of the batch and no computation is spent on padding. With
        `sample_prob` > 0 (scheduled sampling, Bengio et al., 2015) each input word after the first
        is, with that probability, the model's own previous prediction instead of the reference.
        """
        rows = features.shape[0] if image_index is None else len(image_index)
        if captions.dim() != 2 or captions.shape[0] != rows:
            raise ValueError(f"captions must be (B, T) with B={rows}, got {tuple(captions.shape)}")
        lengths = (captions != self.config.pad_id).sum(dim=1) - 1  # steps per caption
        if (lengths < 1).any():
            raise ValueError("every caption needs at least <start> and one more token")
        order = lengths.argsort(descending=True)
        inverse = order.argsort()
        captions, lengths = captions[order], lengths[order]
        memory = self.memory(features).index_select(
            order if image_index is None else image_index[order]
        )
        state = self.init_state(memory)
        B, steps = captions.shape[0], int(lengths[0])
        logits = features.new_zeros(B, steps, self.config.vocab_size)
        alphas = features.new_zeros(B, steps, memory.features.shape[1]) if self.attend else None
        live_counts = (
            lengths.unsqueeze(0) > torch.arange(steps, device=lengths.device).unsqueeze(1)
        ).sum(1)
        hard = self.config.hard_attention and self.training
        cells: list[torch.Tensor] | None = [] if hard else None
        # In length order, as the captions are: the live rows of each step are a prefix.
        read_expected = (
            torch.rand(B, device=captions.device) < self.config.hard_expected if hard else None
        )
        for t in range(steps):
            n = int(live_counts[t])
            if n < B and n < state[0][0].shape[0]:
                memory = memory.index_select(torch.arange(n, device=captions.device))
                state = (
                    [h[:n] for h in state[0]],
                    None if state[1] is None else [c[:n] for c in state[1]],
                )
            inputs = captions[:n, t]
            if sample_prob > 0 and t > 0:
                own = logits[:n, t - 1].detach().argmax(dim=1)
                inputs = torch.where(torch.rand(n, device=inputs.device) < sample_prob, own, inputs)
            step_logits, alpha, state = self.step(
                memory, state, inputs, cells, None if read_expected is None else read_expected[:n]
            )
            logits[:n, t] = step_logits
            if alphas is not None:
                alphas[:n, t] = alpha
        targets = captions[:, 1 : steps + 1]
        mask = (
            torch.arange(steps, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
        ).float()
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        ).view(B, steps)
        nll = loss * mask  # (B, steps)
        loss = nll.sum() / mask.sum()
        if alphas is not None and self.config.doubly_stochastic > 0:
            loss = loss + self.config.doubly_stochastic * doubly_stochastic_penalty(alphas, mask)
        if hard:
            loss = loss + self._reinforce(alphas, cells, nll, mask, ~read_expected)
        logits = logits[inverse]
        return logits, loss, (alphas[inverse] if alphas is not None else None)

    def _reinforce(
        self,
        alphas: torch.Tensor,
        cells: list[torch.Tensor],
        nll: torch.Tensor,
        mask: torch.Tensor,
        sampled: torch.Tensor,
    ) -> torch.Tensor:
        """Show, Attend and Tell eq. 12: the sampled cells' log-probabilities weighted by the reward
        (each caption's mean word log-likelihood) less the moving-average baseline, and the
        entropy bonus. alphas (B, T, L) and cells (one (n_t,) tensor per step, the live captions
        a prefix) in length order, as `forward` runs them; only the `sampled` (B,) captions, the
        ones that read their cells, have a policy term and move the baseline."""
        B, T, _ = alphas.shape
        chosen = torch.zeros(B, T, dtype=torch.long, device=alphas.device)
        for t, cell in enumerate(cells):
            chosen[: len(cell), t] = cell
        log_alpha = torch.log(alphas.gather(2, chosen.unsqueeze(2)).squeeze(2).clamp_min(1e-12))
        reward = -(nll.detach().sum(1) / mask.sum(1))  # (B,): mean log-likelihood per word
        advantage = (reward - self.reward_baseline).unsqueeze(1)
        policy = alphas.new_zeros(())
        if bool(sampled.any()):
            with torch.no_grad():
                self.reward_baseline.mul_(BASELINE_DECAY).add_(
                    (1 - BASELINE_DECAY) * reward[sampled].mean()
                )
            policy_mask = mask * sampled.unsqueeze(1)
            policy = -(advantage * log_alpha * policy_mask).sum() / policy_mask.sum()
        entropy = -(alphas * torch.log(alphas.clamp_min(1e-12))).sum(2)  # (B, T)
        bonus = (entropy * mask).sum() / mask.sum()
        return policy - self.config.entropy_weight * bonus
