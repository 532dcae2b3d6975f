"""Causal tracing (Meng et al., "Locating and Editing Factual Associations in GPT", ROME): which hidden
states carry a fact from the subject to the answer.

Three runs per prompt:

- clean: ``p(answer)`` of the unedited model;
- corrupted: Gaussian noise on the subject's token embeddings (``Noise`` at ``embed``, std
  ``3 sigma`` of subject-token embeddings by default), ``samples`` noise draws;
- restored, for every (layer, token): the corrupted run with the clean state put back at that one
  place (``Patch``): the residual stream after the layer (``kind="resid"``), or the MLP / attention
  output of ``window`` layers around it (``"mlp"`` / ``"attn"``, as ROME does for those).

The score of a cell is the restored ``p(answer)`` averaged over the noise draws (ROME's "indirect
effect" is that minus the corrupted probability). As in ROME's code, noise draw ``s`` is the same
for every cell, so cells differ only by what they restore.

Every (cell, noise draw) is one batch row with its own config (``handle.rows``), so a whole heatmap
runs in ``cells * samples / batch_size`` forwards instead of one forward per cell. Two exact
shortcuts cut the work further: a row restoring token ``t`` starts from the corrupted run's KV cache
of the tokens before ``t`` (they cannot see the restored state), and tokens before the subject,
which the noise never reaches, score the corrupted probability without a forward.
``per_cell=True`` runs ROME's way (one forward per cell, plain hooks) for comparison.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models import forward_args
from ..models.sites import install_site_hook, resolve_site
from ..models.specs import geometry, get_spec
from ..patching import Noise, Patch
from ..steering import steer
from ._common import heatmap_png, last_token_logits, model_device

KINDS = ("resid", "mlp", "attn")
_SITE = {"resid": "resid", "mlp": "mlp.out", "attn": "attn.out"}


@dataclass
class CausalTraceResult:
    """Scores of one prompt.

    Attributes:
        scores: ``[layers, tokens]`` restored ``p(answer)`` per cell (mean over noise draws).
        clean_prob: ``p(answer)`` of the clean run.
        corrupted_prob: ``p(answer)`` with the subject corrupted and nothing restored.
        tokens: the prompt's tokens as strings (the heatmap's axis).
        subject: ``(start, end)`` token span that was corrupted (end exclusive).
        answer: the answer token's string; ``answer_id`` its id.
        kind, window, noise_std, samples: how the trace was run.
    """

    scores: Tensor
    clean_prob: float
    corrupted_prob: float
    tokens: list[str]
    subject: tuple[int, int]
    answer: str
    answer_id: int
    kind: str
    window: int
    noise_std: float
    samples: int
    extra: dict = field(default_factory=dict)

    @property
    def indirect_effect(self) -> Tensor:
        """``scores - corrupted_prob``: how much restoring each cell brings the answer back."""
        return self.scores - self.corrupted_prob

    def best(self) -> tuple[int, int]:
        """``(layer, token)`` of the highest score."""
        idx = int(self.scores.argmax())
        return idx // self.scores.shape[1], idx % self.scores.shape[1]

    def draw(self, path: str | os.PathLike) -> Path:
        """Heatmap: layers (rows) x tokens (columns, subject marked with ``*``)."""
        s0, s1 = self.subject
        labels = [f"{t}*" if s0 <= i < s1 else t for i, t in enumerate(self.tokens)]
        what = {
            "resid": "hidden state",
            "mlp": f"MLP ({self.window} layers)",
            "attn": f"attention ({self.window} layers)",
        }
        return heatmap_png(
            self.scores,
            path,
            title=f"restored p({self.answer.strip()!r}) by {what[self.kind]}; clean {self.clean_prob:.3f}, corrupted {self.corrupted_prob:.3f}",
            xlabel="token",
            ylabel="layer",
            xticklabels=labels,
            yticklabels=[str(i) for i in range(self.scores.shape[0])],
            cmap={"resid": "Purples", "mlp": "Greens", "attn": "Reds"}[self.kind],
        )

    def to_json(self) -> dict:
        return {
            "scores": self.scores.tolist(),
            "clean_prob": self.clean_prob,
            "corrupted_prob": self.corrupted_prob,
            "tokens": self.tokens,
            "subject": list(self.subject),
            "answer": self.answer,
            "kind": self.kind,
            "window": self.window,
            "noise_std": self.noise_std,
            "samples": self.samples,
            **self.extra,
        }


def subject_span(tokenizer, ids: Sequence[int], subject: str) -> tuple[int, int]:
    """Token span ``(start, end)`` of the last occurrence of ``subject`` in the tokenised prompt."""
    pieces = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    text = pieces[-1]
    at = text.rfind(subject)
    if at < 0:
        raise ValueError(f"causal_trace: subject {subject!r} does not occur in the prompt {text!r}")
    end_char = at + len(subject)
    start = next(i for i, p in enumerate(pieces) if len(p) > at)
    end = next(i for i, p in enumerate(pieces) if len(p) >= end_char) + 1
    return start, end


def embedding_std(model: nn.Module, token_ids: Sequence[int]) -> float:
    """Standard deviation of the input embeddings of ``token_ids`` (ROME's noise unit)."""
    emb = model.get_input_embeddings()
    with torch.no_grad():
        return float(emb(torch.tensor(list(token_ids), device=emb.weight.device)).float().std())


def _cells_sites(kind: str, layer: int, n_layers: int, window: int) -> list[str]:
    if kind == "resid":
        return [f"layers.{layer}.resid"]
    lo = max(0, layer - window // 2)
    hi = min(n_layers, lo + window)
    lo = max(0, hi - window)
    return [f"layers.{j}.{_SITE[kind]}" for j in range(lo, hi)]


@torch.no_grad()
def _clean_states(
    model: nn.Module, ids: Tensor, kind: str, n_layers: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clean logits of the last token and each layer's state at every position (``[S, W]`` per site)."""
    spec = get_spec(model)
    states: dict[str, Tensor] = {}
    hooks = []
    for layer in range(n_layers):
        name = f"layers.{layer}.{_SITE[kind]}"
        resolved = resolve_site(model, name, spec)

        def grab(x: Tensor, name: str = name) -> None:
            states[name] = x.reshape(ids.shape[1], -1).detach().clone()

        hooks.append(install_site_hook(resolved, grab))
    try:
        logits = model(input_ids=ids).logits[0, -1]
    finally:
        for h in hooks:
            h.remove()
    return logits, states


def _prob(logits: Tensor, answer_id: int) -> Tensor:
    return torch.softmax(logits.float(), dim=-1)[..., answer_id]


@dataclass
class _Run:
    """What every restored run shares: the prompt, the clean states, the answer and the layout."""

    model: nn.Module
    ids: Tensor  # [1, S]
    states: dict[str, Tensor]  # site -> [S, W] clean state
    kind: str
    n_layers: int
    window: int
    answer_id: int

    def sites(self, layer: int) -> list[str]:
        return _cells_sites(self.kind, layer, self.n_layers, self.window)


@torch.no_grad()
def _corrupted_run(model: nn.Module, ids: Tensor, noises: list[Noise]):
    """The corrupted run, one row per noise draw: last-token logits ``[samples, V]`` and its KV cache."""
    with steer(model, {f"noise{s}": [n] for s, n in enumerate(noises)}, mode="dynamic") as handle:
        handle.rows([f"noise{s}" for s in range(len(noises))])
        out = model(input_ids=ids.expand(len(noises), ids.shape[1]), use_cache=True)
    cache = next(v for v in out.values() if hasattr(v, "get_seq_length"))  # found by type
    return out.logits[:, -1], cache


@torch.no_grad()
def _batched_scores(run: _Run, cells, noises: list[Noise], batch_size: int, corrupted_cache=None) -> Tensor:
    """Restored ``p(answer)`` per (cell, noise draw), many rows per forward, through per-request rows.

    Given the corrupted run's KV cache, cells are grouped by token ``t``: restoring at ``t``
    changes nothing before it, so the group's rows start from that cache of the first ``t`` tokens
    (one per noise draw) and compute only tokens ``t ..`` (about half the work)."""
    model, ids = run.model, run.ids
    S = ids.shape[1]
    samples = len(noises)
    by_token: dict[int, list[int]] = {}
    for c, (_, t) in enumerate(cells):
        by_token.setdefault(t if corrupted_cache is not None else 0, []).append(c)
    probs = torch.empty(len(cells), samples)
    for t0, members in sorted(by_token.items()):
        rows = [(c, s) for c in members for s in range(samples)]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            configs = {}
            for c, s in chunk:
                layer, t = cells[c]
                patches = [Patch(site, run.states[site][t], [t]) for site in run.sites(layer)]
                configs[f"{c}/{s}"] = [noises[s], *patches]
            kw = {}
            if t0 > 0:
                cache = copy.deepcopy(corrupted_cache)
                cache.crop(t0 - S)  # negative: drop the last S - t0 tokens (the one form every release takes)
                cache.batch_select_indices(torch.tensor([s for _, s in chunk], device=ids.device))
                kw = {forward_args.cache_keyword(model): cache, "use_cache": True}
            with steer(model, configs, mode="dynamic") as handle:
                handle.rows(list(configs))
                logits = last_token_logits(model, input_ids=ids[:, t0:].expand(len(chunk), S - t0), **kw)
            p = _prob(logits, run.answer_id).cpu()
            for (c, s), value in zip(chunk, p):
                probs[c, s] = value
    return probs.mean(-1)


@torch.no_grad()
def _per_cell_scores(run: _Run, cells, noise_values: Tensor, subject: tuple[int, int]) -> Tensor:
    """ROME's way (``trace_with_patch``): one forward per cell over a batch of the clean prompt and
    its noise draws, plain forward hooks, logits at every position."""
    model, ids, states = run.model, run.ids, run.states
    spec = get_spec(model)
    samples = noise_values.shape[0]
    s0, s1 = subject
    emb = model.get_input_embeddings()

    def corrupt(module, args, out):
        out = out.clone()
        out[1:, s0:s1] += noise_values.to(out)  # row 0 stays clean
        return out

    out = torch.empty(len(cells))
    noise_hook = emb.register_forward_hook(corrupt)
    try:
        for c, (layer, t) in enumerate(cells):
            hooks = []
            for site in run.sites(layer):
                value = states[site][t]

                def restore(x: Tensor, value: Tensor = value, t: int = t) -> Tensor:
                    x = x.clone()
                    x[1:, t] = value.reshape(x.shape[2:]).to(x)
                    return x

                hooks.append(install_site_hook(resolve_site(model, site, spec), restore))
            try:
                logits = model(input_ids=ids.expand(1 + samples, ids.shape[1])).logits[1:, -1]
            finally:
                for h in hooks:
                    h.remove()
            out[c] = _prob(logits, run.answer_id).mean().cpu()
    finally:
        noise_hook.remove()
    return out


def causal_trace(
    model: nn.Module,
    tokenizer,
    prompt: str,
    subject: str | tuple[int, int],
    answer: str | None = None,
    *,
    kind: str = "resid",
    window: int = 10,
    noise: float | None = None,
    samples: int = 10,
    batch_size: int = 64,
    layers: Sequence[int] | None = None,
    per_cell: bool = False,
    prefix_cache: bool = True,
    skip_unaffected: bool = True,
    seed: int = 0,
) -> CausalTraceResult:
    """Trace which (layer, token) states carry the answer of ``prompt`` (see the module docstring).

    Args:
        model, tokenizer: a Hugging Face causal LM and its tokenizer.
        prompt: the text whose next token is the answer.
        subject: the subject's text (its last occurrence in the prompt is corrupted) or a token span
            ``(start, end)``.
        answer: the answer's text (its first token is scored); default: the clean run's top token.
        kind: ``"resid"`` (hidden state after the layer), ``"mlp"`` or ``"attn"`` (outputs of
            ``window`` consecutive layers centred on the layer, as ROME restores them).
        noise: std of the embedding noise; default ``3 *`` the std of the subject tokens' embeddings.
        samples: noise draws per cell (their probabilities are averaged).
        batch_size: rows (cell x noise draw) per forward.
        layers: layers to trace (default: all).
        per_cell: one forward per cell with plain hooks, as ROME's code runs (for comparison).
        prefix_cache: batched cells restoring token ``t`` reuse the corrupted run's KV cache of the
            tokens before ``t`` (exact: those tokens do not see the restored state).
        skip_unaffected: tokens before the subject are never corrupted, so restoring them gives the
            corrupted probability without a forward (ROME's code runs them anyway).
        seed: seed of noise draw 0 (draw ``s`` uses ``seed + s``).
    """
    if kind not in KINDS:
        raise ValueError(f"causal_trace: kind must be one of {KINDS}, got {kind!r}")
    if samples < 1 or batch_size < 1 or window < 1:
        raise ValueError("causal_trace: samples, batch_size and window must be >= 1")
    geo = geometry(model)
    device = model_device(model)
    ids_list = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not ids_list:
        raise ValueError("causal_trace: the prompt has no tokens")
    span = tuple(subject) if not isinstance(subject, str) else subject_span(tokenizer, ids_list, subject)
    s0, s1 = int(span[0]), int(span[1])
    if not 0 <= s0 < s1 <= len(ids_list):
        raise ValueError(
            f"causal_trace: subject span {span} is not inside the prompt's {len(ids_list)} tokens"
        )
    layer_list = list(range(geo.n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layer_list if not 0 <= x < geo.n_layers]
    if bad:
        raise ValueError(f"causal_trace: layer {bad[0]} out of range, the model has {geo.n_layers} layers")
    ids = torch.tensor([ids_list], device=device)
    clean_logits, states = _clean_states(model, ids, kind, geo.n_layers)
    if answer is None:
        answer_id = int(clean_logits.argmax())
        answer = tokenizer.decode([answer_id])
    else:
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not answer_ids:
            raise ValueError(f"causal_trace: answer {answer!r} has no tokens")
        answer_id = int(answer_ids[0])
    std = float(noise) if noise is not None else 3 * embedding_std(model, ids_list[s0:s1])
    positions = list(range(s0, s1))
    noises = [Noise("embed", std, positions, seed=seed + s) for s in range(samples)]
    noise_values = torch.stack([n.values_for(len(positions), geo.d_model) for n in noises])  # [samples, n, d]
    corrupted_logits, corrupted_cache = _corrupted_run(model, ids, noises)
    corrupted = float(_prob(corrupted_logits, answer_id).mean())
    cells = [(layer, t) for layer in layer_list for t in range(len(ids_list))]
    run = _Run(model, ids, states, kind, geo.n_layers, window, answer_id)
    if per_cell:
        flat = _per_cell_scores(run, cells, noise_values, (s0, s1))
    else:
        # A token before the subject sees no noise (attention is causal), so its clean and corrupted
        # states are the same and restoring it is the corrupted run: no forward needed.
        live = (
            [c for c, (_, t) in enumerate(cells) if t >= s0] if skip_unaffected else list(range(len(cells)))
        )
        flat = torch.full((len(cells),), corrupted)
        cache = corrupted_cache if prefix_cache else None
        flat[live] = _batched_scores(run, [cells[c] for c in live], noises, batch_size, cache)
    return CausalTraceResult(
        scores=flat.reshape(len(layer_list), len(ids_list)),
        clean_prob=float(_prob(clean_logits, answer_id)),
        corrupted_prob=corrupted,
        tokens=[tokenizer.decode([i]) for i in ids_list],
        subject=(s0, s1),
        answer=answer,
        answer_id=answer_id,
        kind=kind,
        window=window if kind != "resid" else 1,
        noise_std=std,
        samples=samples,
        extra={"layers": layer_list},
    )
