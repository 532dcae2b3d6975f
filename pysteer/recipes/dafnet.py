"""DAFNet (Zhang et al., "DAFNet: Dynamic Auxiliary Fusion for Sequential Model Editing", ACL
Findings 2024): an auxiliary network turns each edit's gradient signal into a low-rank weight delta,
attending over the edit's tokens and, causally, over the edits made before it.

Pieces, in the order an edit flows through them:

- ``capture_signals``: for each edit (prompt, new target) and each edited linear, the linear's input
  ``u`` and output gradient ``delta`` at the positions that predict the target's tokens, from one
  forward/backward of the *unedited* model (MEND-style; only the edited weights are made to need
  grad, so nothing else is differentiated).
- ``AuxNet`` (one per weight shape ``(in, out)``; the linears of one shape share it and are told
  apart by a per-linear scale/shift, the "mode"): ``[u, delta]`` per token goes through a running
  normalisation, then ``EditorLayer``s: intra-editing attention (pooling the edit's tokens into one
  representation and mixing it back), inter-editing causal attention from each edit to the per-layer
  cache of earlier edits' representations, a score attention whose weight on the edit itself gives
  the edit's update scale ``s`` (and ``1 - s`` the decay of what came before), a feed-forward block
  and the mode scale/shift. The output splits into ``x1 [tokens, in]`` and ``x2 [tokens, out]``:
  ``dW_new = x1^T (s x2) / tokens``, so ``dW <- prod(1 - s) dW - lr dW_new`` with a learned ``lr``
  per linear (the sign makes an untrained network's update a normalised gradient step).
- ``DAFNetEditor``: the networks, the learned ``lr``s, and the per-linear state of a sequence (cache
  and accumulated delta, a ``WeightDelta`` kept as exact factors).
- ``dafnet_train``: meta-training on the ``train`` split: sequences of edits drawn at random, their
  length growing on a curriculum up to ``max_sequence`` (the paper grows it when the smoothed loss
  stops improving; here on a fixed schedule, so a run's cost is known in advance); reliability,
  generality and locality (KL to the unedited model) losses with the paper's weights.
- ``sequential_edit``: one edit after another, each through the network with the cache of the
  earlier ones; the accumulated deltas are applied with ``pysteer.steer`` (folded into the weights
  by default) and the handle is returned: ``handle.remove()`` restores the model bit-exactly.

The update scales carry no gradient, as in the paper's code, so the score attention stays at its
initialisation. Keeping their gradient was measured worse (SmolLM2, down_proj of layers 27-29, 40
meta-training steps, sequences up to 10, same seed: mean reliability loss of the last 20 steps 2.44
vs 1.42, reliability after 10 edits 0.1 vs 0.3): from an empty cache the edit weights of a sequence
sum to one, so that gradient can only move weight from one edit of the sequence to another.
That sum of one is the paper's design and the main gap to the ablation in short meta-training: the
first edit's scale is 1 (it attends only to itself), and with the near-uniform score attention each
of n edits keeps about 1/n of its update, where the ablation keeps all of it. The two train alike
on single edits and part as sequences grow (same run, scales detached: reliability loss 0.43 vs
0.41 on single edits, 0.54 vs 0.24 on 2-3, 2.09 vs 0.43 on 4-10 edits).
Differences from the paper's code: the curriculum is a schedule (on purpose); training sequences
draw edits with replacement, and there is no gradient accumulation; the update is ``-lr dW_new``
(an untrained editor takes a normalised gradient step; the paper's code adds ``+lr``); with more
than one editor layer the scales are averaged over layers before the decay is applied (the paper's
code decays per layer, then averages; the same with the default single layer); the running
normalisation maps the very first single row to zero (the paper's code passes it through); and
linears are edited without a bias delta.
``inter_attention=False`` gives the ablation without inter-editing attention (MEND-like: every edit
adds with scale 1, nothing decays).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ._common import model_device
from .editing import EditRecord, target_nll, teacher_forced

# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class DAFNetConfig:
    """The editor's shape and training settings.

    Attributes:
        module_sites: the edited linears, ``"layers.{i}.{linear}"`` (e.g. the last MLPs' down projections).
        layers: ``EditorLayer``s per network.
        intra_dim: hidden width of the intra-editing attention.
        inter_dim, inter_heads: per-head width and heads of the inter-editing attention.
        score_dim, score_heads: the same for the update-scale attention.
        ffn_dim: feed-forward width.
        inter_attention: False for the ablation without inter-editing attention.
        init_edit_lr: initial learned step size of every linear's update.
    """

    module_sites: list[str]
    layers: int = 1
    intra_dim: int = 64
    inter_dim: int = 32
    inter_heads: int = 2
    score_dim: int = 32
    score_heads: int = 2
    ffn_dim: int = 128
    inter_attention: bool = True
    init_edit_lr: float = 1e-4

    def __post_init__(self) -> None:
        from ..weight_delta import parse_module_site

        if not self.module_sites:
            raise ValueError("DAFNetConfig: module_sites is empty; name the linears to edit")
        for s in self.module_sites:
            parse_module_site(s)
        for name in (
            "layers",
            "intra_dim",
            "inter_dim",
            "inter_heads",
            "score_dim",
            "score_heads",
            "ffn_dim",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DAFNetConfig: {name} must be a positive int, got {value!r}")
        if not (self.init_edit_lr > 0 and math.isfinite(self.init_edit_lr)):
            raise ValueError(
                f"DAFNetConfig: init_edit_lr must be a positive number, got {self.init_edit_lr!r}"
            )


@dataclass
class TrainConfig:
    """Meta-training settings (the loss weights are the paper's).

    Attributes:
        steps: optimiser steps.
        max_sequence: longest edit sequence of the curriculum (sequences longer than the training
            split repeat edits).
        curriculum_steps: steps over which the sequence length grows from 1 to ``max_sequence``
            (geometrically); afterwards lengths are drawn up to ``max_sequence``.
        loss_edits: edits of a sequence whose losses are computed per step (the paper's
            ``loss_sample_max_count``): the rest still shape the delta.
        lr, edit_lr_lr: Adam learning rates of the networks and of the per-linear step sizes.
        reliability, generality, locality: loss weights.
        seed: sampling seed.
    """

    steps: int = 200
    max_sequence: int = 100
    curriculum_steps: int = 150
    loss_edits: int = 4
    lr: float = 1e-4
    edit_lr_lr: float = 1e-5
    reliability: float = 0.1
    generality: float = 0.1
    locality: float = 0.2
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# gradient signals
# ---------------------------------------------------------------------------------------------


@dataclass
class EditSignal:
    """One edit's gradient signal at each edited linear: ``u [n, in]`` and ``delta [n, out]`` at the
    ``n`` positions that predict the new target's tokens."""

    u: list[Tensor]
    delta: list[Tensor]

    @property
    def tokens(self) -> int:
        return int(self.u[0].shape[0])


def capture_signals(
    model: nn.Module, tok, records: Sequence[EditRecord], module_sites: Sequence[str]
) -> list[EditSignal]:
    """The gradient signals of ``records`` (see the module docstring); the model is left as it was."""
    from ..models.sites import install_site_hook, resolve_site
    from ..weight_delta import parse_module_site

    if not records:
        return []
    resolved = []
    for name in module_sites:
        layer, linear = parse_module_site(name)
        resolved.append(resolve_site(model, f"layers.{layer}.{linear}.out"))
    inputs: list[Tensor] = [None] * len(resolved)  # type: ignore[list-item]
    outputs: list[Tensor] = [None] * len(resolved)  # type: ignore[list-item]

    def keeper(i):
        def keep(out: Tensor, inp: Tensor) -> None:
            inputs[i], outputs[i] = inp.detach(), out

        return keep

    batch = teacher_forced(
        tok, [r.prompt for r in records], [r.target_new for r in records], model_device(model)
    )
    weights = [r.module.weight for r in resolved]
    flags = [w.requires_grad for w in weights]
    hooks = [install_site_hook(r, keeper(i), with_input=True) for i, r in enumerate(resolved)]
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            per_token = nn.functional.cross_entropy(
                logits[batch.predict_at].float(), batch.labels[batch.predict_at], reduction="none"
            )
            counts = batch.predict_at.sum(1)
            owner = torch.arange(len(records), device=counts.device).repeat_interleave(counts)
            loss = (per_token / counts[owner].float()).sum()  # each edit's mean NLL: its own gradient
            grads = torch.autograd.grad(loss, outputs)
    finally:
        for h in hooks:
            h.remove()
        for w, f in zip(weights, flags, strict=True):
            w.requires_grad_(f)
    sel = batch.predict_at
    out = []
    for b in range(len(records)):
        out.append(
            EditSignal(
                u=[inputs[i][b][sel[b]].float() for i in range(len(resolved))],
                delta=[grads[i][b][sel[b]].float() for i in range(len(resolved))],
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# the auxiliary network
# ---------------------------------------------------------------------------------------------


class RunningNorm(nn.Module):
    """Normalise by the exact running mean and standard deviation of every row seen in training."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self._update(x.detach())
        if int(self.count) < 2:
            return x - self.mean
        return (x - self.mean) / (self.var.sqrt() + self.eps)

    @torch.no_grad()
    def _update(self, x: Tensor) -> None:
        n_old, n_new = int(self.count), x.shape[0]
        n = n_old + n_new
        mean_new = x.mean(0)
        delta = mean_new - self.mean
        mean = self.mean + delta * (n_new / n)
        m2 = self.var * max(n_old - 1, 0) + ((x - mean_new) ** 2).sum(0) + delta**2 * (n_old * n_new / n)
        self.mean.copy_(mean)
        if n > 1:
            self.var.copy_(m2 / (n - 1))
        self.count.fill_(n)


class IntraEditAttention(nn.Module):
    """Pool each edit's tokens into one representation (learned token weights) and return the
    transformed tokens too."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.value = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor, owner: Tensor, n_edits: int) -> tuple[Tensor, Tensor]:
        v = self.value(x)
        s = self.score(v).squeeze(-1)
        top = torch.full((n_edits,), -torch.inf, device=x.device).scatter_reduce(0, owner, s.detach(), "amax")
        w = (s - top[owner]).exp()  # a softmax over each edit's own tokens
        total = torch.zeros(n_edits, device=x.device).index_add(0, owner, w)
        w = w / total[owner]
        weighted = v * w[:, None]
        pooled = torch.zeros(n_edits, x.shape[1], device=x.device, dtype=x.dtype).index_add(
            0, owner, weighted
        )
        return weighted, pooled


class CausalEditAttention(nn.Module):
    """Multi-head attention from each new edit to the cache of earlier edits and the new edits up to
    itself; returns the mixed values, or (``scores=True``) the head-averaged attention weights."""

    def __init__(self, dim: int, heads: int, head_dim: int, scores: bool = False):
        super().__init__()
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, heads * head_dim)
        self.heads, self.head_dim, self.scores = heads, head_dim, scores
        if not scores:
            self.v = nn.Linear(dim, heads * head_dim)
            self.o = nn.Linear(heads * head_dim, dim)

    def forward(self, new: Tensor, keys: Tensor) -> Tensor:
        n, m = new.shape[0], keys.shape[0]
        past = m - n
        q = self.q(new).reshape(n, self.heads, self.head_dim).transpose(0, 1)
        k = self.k(keys).reshape(m, self.heads, self.head_dim).transpose(0, 1)
        allowed = torch.ones(n, m, dtype=torch.bool, device=new.device).tril(past)
        att = (q @ k.transpose(1, 2) / self.head_dim**0.5).masked_fill(~allowed, float("-inf")).softmax(-1)
        if self.scores:
            return att.mean(0)  # [n, m]
        v = self.v(keys).reshape(m, self.heads, self.head_dim).transpose(0, 1)
        return self.o((att @ v).transpose(0, 1).reshape(n, -1))


class EditorLayer(nn.Module):
    """One layer of the auxiliary network (see the module docstring)."""

    def __init__(self, dim: int, cfg: DAFNetConfig, n_modes: int):
        super().__init__()
        self.intra = IntraEditAttention(dim, cfg.intra_dim)
        self.inter = CausalEditAttention(dim, cfg.inter_heads, cfg.inter_dim) if cfg.inter_attention else None
        self.score = (
            CausalEditAttention(dim, cfg.score_heads, cfg.score_dim, scores=True)
            if cfg.inter_attention
            else None
        )
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.ReLU(), nn.Linear(cfg.ffn_dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.mode_scale = nn.Embedding(n_modes, dim)
        self.mode_shift = nn.Embedding(n_modes, dim)
        nn.init.ones_(self.mode_scale.weight)
        nn.init.zeros_(self.mode_shift.weight)

    def forward(
        self, x: Tensor, owner: Tensor, n_edits: int, cache: Tensor, mode: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``x [tokens, d]`` -> (new x, update scale per new edit ``[n_edits]``, new cache)."""
        mixed, pooled = self.intra(x, owner, n_edits)
        x = self.norms[0](x + mixed)
        keys = torch.cat([cache, pooled], 0)
        if self.inter is not None:
            x = self.norms[1](x + self.inter(pooled, keys)[owner])
            scale = self.score(pooled, keys).diagonal(cache.shape[0]).detach()
        else:
            scale = torch.ones(n_edits, device=x.device)
        x = self.norms[2](x + self.ffn(x))
        m = torch.tensor(mode, device=x.device)
        x = (x * self.mode_scale(m) + self.mode_shift(m)).clamp(min=0) + x
        return x, scale, keys.detach()


class AuxNet(nn.Module):
    """The network of one weight shape ``(in, out)``: ``[u, delta]`` per token -> ``(x1, x2)``."""

    def __init__(self, d_in: int, d_out: int, cfg: DAFNetConfig, n_modes: int):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.decays = cfg.inter_attention  # without it every edit adds with weight 1 and nothing decays
        self.norm = RunningNorm(d_in + d_out)
        self.layers = nn.ModuleList(EditorLayer(d_in + d_out, cfg, n_modes) for _ in range(cfg.layers))

    def forward(
        self, u: Tensor, delta: Tensor, lengths: Sequence[int], caches: list[Tensor], mode: int
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """``u [tokens, in]``, ``delta [tokens, out]`` of ``len(lengths)`` edits in order ->
        ``(x1 [tokens, in], x2 [tokens, out] scaled by each token's edit weight, decay of the
        earlier delta, new caches)``."""
        n = len(lengths)
        owner = torch.arange(n, device=u.device).repeat_interleave(
            torch.tensor(list(lengths), device=u.device)
        )
        x = self.norm(torch.cat([u, delta], -1))
        scales, new_caches = [], []
        for layer, cache in zip(self.layers, caches, strict=True):
            x, s, c = layer(x, owner, n, cache, mode)
            scales.append(s)
            new_caches.append(c)
        if self.decays:
            s = torch.stack(scales).mean(0)  # [n]: each new edit's share
            keep = torch.cumprod((1 - s).flip(0), 0).flip(0)  # keep[i] = prod_{j >= i} (1 - s_j)
            weight = torch.cat([s[:-1] * keep[1:], s[-1:]])  # later edits of the batch decay earlier ones
        else:
            weight, keep = torch.ones(n, device=u.device), torch.ones(1, device=u.device)
        per_token = (weight / torch.tensor(list(lengths), device=u.device, dtype=weight.dtype))[owner]
        x1, x2 = x.split([self.d_in, self.d_out], -1)
        return x1, x2 * per_token[:, None], keep[0], new_caches

    def empty_caches(self, device) -> list[Tensor]:
        return [torch.zeros(0, self.d_in + self.d_out, device=device) for _ in self.layers]


# ---------------------------------------------------------------------------------------------
# the editor
# ---------------------------------------------------------------------------------------------


def _shape_key(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


class DAFNetEditor(nn.Module):
    """The auxiliary networks (one per weight shape), the learned step sizes, and the state of the
    edit sequence in progress (per linear: the per-layer caches and the accumulated ``WeightDelta``)."""

    def __init__(self, cfg: DAFNetConfig, shapes: Sequence[tuple[int, int]]):
        super().__init__()
        if len(shapes) != len(cfg.module_sites):
            raise ValueError(f"DAFNetEditor: {len(shapes)} shapes for {len(cfg.module_sites)} module sites")
        self.cfg = cfg
        self.shapes = [tuple(int(v) for v in s) for s in shapes]
        keys = [_shape_key(s) for s in self.shapes]
        self.modes = [keys[:i].count(k) for i, k in enumerate(keys)]
        self.nets = nn.ModuleDict(
            {k: AuxNet(*s, cfg, keys.count(k)) for k, s in zip(keys, self.shapes, strict=True)}
        )
        self.edit_lrs = nn.Parameter(torch.full((len(shapes),), float(cfg.init_edit_lr)))
        self.reset()

    @classmethod
    def for_model(cls, model: nn.Module, cfg: DAFNetConfig) -> DAFNetEditor:
        """An untrained editor for ``model``'s linears named in ``cfg``."""
        from ..models.sites import SITE_TABLE, resolve_site
        from ..models.specs import geometry
        from ..weight_delta import parse_module_site

        geo = geometry(model)
        shapes = []
        for name in cfg.module_sites:
            layer, linear = parse_module_site(name)
            H, D = SITE_TABLE[f"{linear}.in"].shape(geo)
            shapes.append((H * D, resolve_site(model, f"layers.{layer}.{linear}.out").width))
        return cls(cfg, shapes).to(model_device(model))

    def reset(self) -> None:
        """Start a new edit sequence: empty caches, no delta."""
        self.caches: list[list[Tensor] | None] = [None] * len(self.shapes)
        self.deltas: list = [None] * len(self.shapes)

    def absorb(self, signals: Sequence[EditSignal]) -> None:
        """Edit with ``signals`` (in order, after every edit absorbed since ``reset``): each linear's
        delta becomes ``decay * delta - lr * x1^T x2`` (exact factors, rank growing by tokens)."""
        from ..weight_delta import WeightDelta

        if not signals:
            return
        lengths = [s.tokens for s in signals]
        for i, name in enumerate(self.cfg.module_sites):
            net = self.nets[_shape_key(self.shapes[i])]
            u = torch.cat([s.u[i] for s in signals])
            d = torch.cat([s.delta[i] for s in signals])
            caches = self.caches[i] if self.caches[i] is not None else net.empty_caches(u.device)
            x1, x2, keep, self.caches[i] = net(u, d, lengths, caches, self.modes[i])
            new = WeightDelta(name, x1.transpose(0, 1), -self.edit_lrs[i] * x2, 1.0)
            self.deltas[i] = new if self.deltas[i] is None else _decayed_sum(self.deltas[i], new, keep)

    def weight_deltas(self, rank: int | None = None) -> list:
        """The accumulated deltas as ``WeightDelta``s (compressed to ``rank`` when given)."""
        out = [d for d in self.deltas if d is not None]
        return [d.compress(min(rank, d.rank)) for d in out] if rank else out

    def save(self, path) -> Path:
        """Write the networks, step sizes and configuration to a safetensors file."""
        from .._files import write_safetensors

        meta = {"pysteer.dafnet": json.dumps({"config": dataclasses.asdict(self.cfg), "shapes": self.shapes})}
        return write_safetensors(dict(self.state_dict()), path, metadata=meta)

    @classmethod
    def load(cls, path, device=None) -> DAFNetEditor:
        """Read an editor written by ``save`` (safetensors; no pickle)."""
        from .._files import read_safetensors_doc

        tensors, doc = read_safetensors_doc(path, "pysteer.dafnet", "DAFNet editor checkpoint")
        if not isinstance(doc, dict) or "config" not in doc or "shapes" not in doc:
            raise ValueError(f"{path}: the 'pysteer.dafnet' metadata must hold 'config' and 'shapes'")
        editor = cls(DAFNetConfig(**doc["config"]), [tuple(s) for s in doc["shapes"]])
        missing, unexpected = editor.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: checkpoint does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return editor.to(device) if device is not None else editor


def _decayed_sum(old, new, keep: Tensor):
    """``keep * old + new`` as factors (``keep`` may carry a gradient, unlike ``accumulate``'s numbers)."""
    from ..weight_delta import WeightDelta

    (u1, v1), (u2, v2) = old.factors(), new.factors()
    return WeightDelta(old.module_site, torch.cat([u1, u2], 1), torch.cat([v1 * keep, v2], 0), 1.0)


# ---------------------------------------------------------------------------------------------
# applying, training, editing
# ---------------------------------------------------------------------------------------------


def _steer_deltas(model: nn.Module, deltas: Sequence, trainable: bool, mode: str = "auto"):
    import pysteer

    return pysteer.steer(model, list(deltas), trainable=trainable, mode="dynamic" if trainable else mode)


def clip_network_grads(editor: DAFNetEditor, max_norm: float = 100.0) -> Tensor:
    """Clip the networks' gradient norm, leaving the step sizes' gradient out (as the paper's code):
    the step sizes' gradient is far larger (about 1000 against 25 for the networks on SmolLM2 at
    initialisation) and would otherwise set the clip factor of every network parameter."""
    return torch.nn.utils.clip_grad_norm_(list(editor.nets.parameters()), max_norm)


def _locality_kl(model: nn.Module, batch, reference: Tensor) -> Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    ref = reference[real].float().log_softmax(-1)
    now = logits[real].float().log_softmax(-1)
    return nn.functional.kl_div(now, ref, log_target=True, reduction="batchmean")


def sequence_length(step: int, train: TrainConfig, rng: random.Random) -> int:
    """The curriculum: the longest allowed sequence grows geometrically from 1 to ``max_sequence``
    over ``curriculum_steps``; each step draws its length up to that."""
    frac = min(1.0, step / max(1, train.curriculum_steps))
    longest = max(1, round(train.max_sequence**frac))
    return rng.randint(1, longest)


def dafnet_train(
    model: nn.Module,
    tok,
    records: Sequence[EditRecord],
    cfg: DAFNetConfig,
    train: TrainConfig | None = None,
    editor: DAFNetEditor | None = None,
    checkpoint: str | None = None,
    progress: bool = True,
) -> tuple[DAFNetEditor, list[dict]]:
    """Meta-train a DAFNet editor on ``records`` (the ``train`` split); returns it and a per-step log.

    Every record's gradient signal is captured once from the unedited model (the editor always reads
    the unedited model's gradients). Each step draws a sequence of edits (curriculum), turns it into
    deltas in one causal pass, applies them through the low-rank op and takes an Adam step on
    ``reliability * NLL(new target | prompt) + generality * NLL(new target | paraphrase) +
    locality * KL(unedited || edited)`` over ``loss_edits`` edits of the sequence.
    """
    from tqdm.auto import tqdm

    train = train or TrainConfig()
    if not records:
        raise ValueError("dafnet_train: no training records")
    if train.steps < 1 or train.max_sequence < 1 or train.loss_edits < 1:
        raise ValueError("dafnet_train: steps, max_sequence and loss_edits must be >= 1")
    rng = random.Random(train.seed)
    torch.manual_seed(train.seed)
    editor = editor or DAFNetEditor.for_model(model, cfg)
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    signals = []
    for i in range(0, len(records), 8):
        signals += capture_signals(model, tok, records[i : i + 8], cfg.module_sites)
    opt = torch.optim.Adam(
        [
            {"params": [p for n, p in editor.named_parameters() if n != "edit_lrs"], "lr": train.lr},
            {"params": [editor.edit_lrs], "lr": train.edit_lr_lr},
        ]
    )
    log = []
    editor.train()
    dev = model_device(model)
    try:
        for step in tqdm(range(train.steps), desc="DAFNet meta-training", disable=not progress):
            n = sequence_length(step, train, rng)
            order = [rng.randrange(len(records)) for _ in range(n)]
            editor.reset()
            editor.absorb([signals[i] for i in order])
            chosen = [records[i] for i in rng.sample(order, min(train.loss_edits, n))]
            rel = teacher_forced(tok, [r.prompt for r in chosen], [r.target_new for r in chosen], dev)
            para = [(p, r.target_new) for r in chosen for p in r.paraphrases]
            gen = teacher_forced(tok, [p for p, _ in para], [t for _, t in para], dev)
            loc_pairs = [pair for r in chosen for pair in r.locality]
            loc = teacher_forced(tok, [p for p, _ in loc_pairs], [a for _, a in loc_pairs], dev)
            with torch.no_grad():
                reference = model(input_ids=loc.input_ids, attention_mask=loc.attention_mask).logits
            with _steer_deltas(model, editor.weight_deltas(), trainable=True):
                losses = {
                    "reliability": target_nll(model, rel),
                    "generality": target_nll(model, gen),
                    "locality": _locality_kl(model, loc, reference),
                }
            total = sum(getattr(train, k) * v for k, v in losses.items())
            opt.zero_grad(set_to_none=True)
            total.backward()
            clip_network_grads(editor)
            opt.step()
            log.append(
                {
                    "step": step,
                    "sequence": n,
                    "loss": total.item(),
                    **{k: v.item() for k, v in losses.items()},
                }
            )
        if checkpoint:
            editor.save(checkpoint)
    finally:
        editor.reset()
        editor.eval()
        for p, flag in saved:
            p.requires_grad_(flag)
    return editor, log


def sequential_edit(
    model: nn.Module,
    editor: DAFNetEditor,
    edits: Sequence[EditRecord],
    tok,
    rank: int | None = None,
    mode: str = "auto",
    progress: bool = True,
    on_edit=None,
):
    """Edit ``model`` with ``edits`` one after another; returns the steering handle of the
    accumulated weight deltas (folded into the weights unless ``mode="dynamic"``).

    Args:
        rank: compress each linear's delta to this rank (SVD) before applying it; None keeps it exact.
        on_edit: called as ``on_edit(k)`` after the k-th edit (1-based) is absorbed, before the deltas
            are applied (e.g. to time the editor).
    """
    from tqdm.auto import tqdm

    if not edits:
        raise ValueError("sequential_edit: no edits")
    editor.eval()
    editor.reset()
    with torch.no_grad():
        for k, record in enumerate(tqdm(edits, desc="sequential edits", disable=not progress), start=1):
            (signal,) = capture_signals(model, tok, [record], editor.cfg.module_sites)
            editor.absorb([signal])
            if on_edit is not None:
                on_edit(k)
    deltas = [d.compress(min(rank, d.rank)) if rank else d for d in editor.weight_deltas()]
    deltas = [type(d)(d.module_site, d.U.detach(), d.V.detach(), d.scale) for d in deltas]
    return _steer_deltas(model, deltas, trainable=False, mode=mode)


__all__ = [
    "AuxNet",
    "DAFNetConfig",
    "DAFNetEditor",
    "EditSignal",
    "TrainConfig",
    "capture_signals",
    "clip_network_grads",
    "dafnet_train",
    "sequential_edit",
]
