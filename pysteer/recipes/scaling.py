"""Activation scaling (Stoehr et al., "Activation Scaling for Steering and Interpreting Language Models").

Learn one scalar per (site, layer, token position) that multiplies the activation at ``attn.out`` and
``mlp.out`` (or per head at ``attn.heads``) by ``(1 + beta * alpha)``, with ``beta = +1`` pushing the
model from the competing token to the target token and ``beta = -1`` the other way, by minimising

    Psi = E + lambda_F * F + lambda_M * ||alpha||_1

- effectiveness ``E = mean_beta relu(margin - beta * (logit[target] - logit[competitor]))`` at the
  last prompt token;
- faithfulness ``F = KL(p_unsteered || p_steered)`` over the vocabulary without the two answer tokens
  (both distributions renormalised), i.e. the other tokens keep their relative probabilities;
- minimality: the L1 norm of the learned parameters.

Three interventions share this objective (``method=``):

- ``"scalar"`` (ActivScalar): scalars ``alpha [sites, P]`` (``[sites, P, H]`` per head);
- ``"vector"`` (SteerVec baseline): additive vectors ``v [sites, P, W]``, ``x + beta * v``;
- ``"dynamic"`` (DynScalar): ``alpha = w . x / |x| + b`` per site, a function of the activation
  itself, so it applies at every position and transfers to prompts of other lengths.

Each method is an intervention kind (``pysteer.scalars``): ``ActivScalar``, ``SteerVec``,
``DynScalar``, one per site, in two configs ``"beta+1"`` and ``"beta-1"`` that share their tensors.
Training steers the model with ``pysteer.steer(..., trainable=True)`` and optimises
``handle.parameters()``: the tables are rebuilt from the parameters every forward and the gradients
are ``pysteer::affine_steer``'s own backward. The result is one steering file (``ScalingResult.save``)
that ``pysteer.steer``, ``pysteer.generate`` and ``pysteer generate --steer`` run as trained.

Positions. Prompts differ in length, so position ``k`` of the window means the ``k``-th token counted
back from the end of the prompt (``-1`` is the last prompt token); the window holds the last ``P`` tokens.
Generated tokens and earlier prompt tokens are left alone; DynScalar applies at every position.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .._files import write_safetensors
from ..models.sites import parse_site, resolve_site
from ..models.specs import geometry
from ..scalars import ActivScalar, DynScalar, SteerVec
from ..steering import SteeringHandle, SteeringSpec, steer
from ._common import (
    curves_png,
    data_path,
    freeze,
    heatmap_png,
    last_token_logits,
    model_device,
    read_jsonl,
    single_token_id,
    training_backend,
    unfreeze,
)

METHODS = ("scalar", "vector", "dynamic")
# Adam step per method. On SmolLM2 (40 steps, lambda_F 3) DynScalar at 0.05 reached 0.58 success with KL 5.0 on the
# held-out prompts, at 0.01 0.92 with KL 0.35; the scalars and vectors flip >= 0.92 at 0.05.
DEFAULT_LR = {"scalar": 0.05, "vector": 0.05, "dynamic": 0.01}
SCALING_FORMAT = "pysteer.scaling/1"

# ------------------------------------------------------------------------------------------------
# the task: "X is in" with a conflicting context sentence
# ------------------------------------------------------------------------------------------------

TEMPLATES = {
    "plain": "{city} is in {wrong}. {city} is in",
    "fact": "Fact: {city} is a city in {wrong}. {city} is in",
    "novel": "In a novel, {city} is in {wrong}. In reality, {city} is in",
}
# Prepended for the transfer test: the same question, more tokens before it.
LONG_PREFIX = "Here is a short quiz about the cities of the world and the countries they are in. "


@dataclass(frozen=True)
class ConflictPrompt:
    """A prompt and the two competing next tokens.

    Attributes:
        text: e.g. ``"Rome is in France. Rome is in"``.
        target: the token ``beta = +1`` promotes (with its leading space: ``" Italy"``).
        competitor: the token ``beta = -1`` promotes (``" France"``).
    """

    text: str
    target: str
    competitor: str


def load_country_conflicts(
    path: str | os.PathLike | None = None,
    templates: Sequence[str] = ("plain", "novel"),
    long: bool = False,
) -> list[ConflictPrompt]:
    """The country task: city, its country (target) and a conflicting country named in the context.

    Args:
        path: JSON lines with ``city``, ``country``, ``wrong`` (default: the shipped 40 cities).
        templates: names in ``TEMPLATES``; SmolLM2-135M mostly follows the memorised country in
            ``"plain"`` and the context in ``"novel"``, so the mix has both kinds of initial answer.
        long: prepend ``LONG_PREFIX`` (a longer prompt with the same question).
    """
    unknown = [t for t in templates if t not in TEMPLATES]
    if unknown or not templates:
        raise ValueError(f"unknown template(s) {unknown or templates}; known: {list(TEMPLATES)}")
    path = Path(path) if path is not None else data_path("country_conflicts.jsonl")
    out = []
    for t in templates:
        for n, row in enumerate(read_jsonl(path), start=1):
            if not {"city", "country", "wrong"} <= set(row):
                raise ValueError(f"{path}:{n}: needs city, country and wrong")
            text = TEMPLATES[t].format(city=row["city"], wrong=row["wrong"])
            out.append(
                ConflictPrompt((LONG_PREFIX if long else "") + text, " " + row["country"], " " + row["wrong"])
            )
    return out


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    input_ids: Tensor  # [B, S]
    attention_mask: Tensor  # [B, S]
    target: Tensor  # [B]
    competitor: Tensor  # [B]


def _encode(tokenizer, prompts: Sequence[ConflictPrompt], device) -> _Batch:
    if not prompts:
        raise ValueError("no prompts")
    old = getattr(tokenizer, "padding_side", "left")
    tokenizer.padding_side = "left"  # the last prompt token is the last column
    try:
        enc = tokenizer([p.text for p in prompts], return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old
    tgt = torch.tensor([single_token_id(tokenizer, p.target) for p in prompts])
    comp = torch.tensor([single_token_id(tokenizer, p.competitor) for p in prompts])
    if (tgt == comp).any():
        raise ValueError("a prompt has the same target and competitor token")
    return _Batch(
        enc["input_ids"].to(device), enc["attention_mask"].to(device), tgt.to(device), comp.to(device)
    )


def _last_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Logits ``[B, V]`` of the last prompt token (left padding: the last column), at least float32."""
    logits = last_token_logits(model, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


# ------------------------------------------------------------------------------------------------
# parameters and hooks
# ------------------------------------------------------------------------------------------------


def default_sites(model: nn.Module, heads: bool = False, layers: Sequence[int] | None = None) -> list[str]:
    """``attn.out`` and ``mlp.out`` of every layer (or ``attn.heads`` with ``heads=True``)."""
    geo = geometry(model)
    layers = range(geo.n_layers) if layers is None else layers
    kinds = ("attn.heads",) if heads else ("attn.out", "mlp.out")
    return [f"layers.{i}.{k}" for i in layers for k in kinds]


def interventions_of(method: str, sites: Sequence[str], params: dict[str, Tensor], beta: int) -> list:
    """One intervention per site from the stacked parameters (views: gradients reach ``params``)."""
    if method == "scalar":
        return [ActivScalar(site, params["alpha"][i], beta) for i, site in enumerate(sites)]
    if method == "vector":
        return [SteerVec(site, params["vector"][i], beta) for i, site in enumerate(sites)]
    return [DynScalar(site, params["weight"][i], params["bias"][i], beta) for i, site in enumerate(sites)]


def _configs(method: str, sites: Sequence[str], params: dict[str, Tensor]) -> dict[str, list]:
    return {_config(b): interventions_of(method, sites, params, b) for b in (1, -1)}


def _config(beta: int) -> str:
    return f"beta{beta:+d}"


def _steered_last_logits(
    handle: SteeringHandle, model: nn.Module, batch: _Batch, betas: Sequence[int]
) -> Tensor:
    """Last-token logits of the batch once per beta (rows ``beta`` major), each under its config."""
    B = batch.input_ids.shape[0]
    handle.rows([_config(b) for b in betas for _ in range(B)])
    ids = batch.input_ids.repeat(len(betas), 1)
    mask = batch.attention_mask.repeat(len(betas), 1)
    return _last_logits(model, ids, mask)


def _init_params(
    method: str, n_sites: int, P: int, widths: list[int], n_heads: list[int], device
) -> dict[str, Tensor]:
    if method == "scalar":
        H = n_heads[0]
        shape = (n_sites, P) if H == 1 else (n_sites, P, H)
        return {"alpha": torch.zeros(shape, device=device, requires_grad=True)}
    if len(set(widths)) != 1:
        raise ValueError(
            "vector / dynamic methods need sites of one width (use attn.out / mlp.out or attn.heads, not both)"
        )
    W = widths[0]
    if method == "vector":
        return {"vector": torch.zeros(n_sites, P, W, device=device, requires_grad=True)}
    return {
        "weight": torch.zeros(n_sites, W, device=device, requires_grad=True),
        "bias": torch.zeros(n_sites, device=device, requires_grad=True),
    }


# ------------------------------------------------------------------------------------------------
# objective
# ------------------------------------------------------------------------------------------------


def _other_logprobs(logits: Tensor, target: Tensor, competitor: Tensor) -> Tensor:
    """Log-probabilities over the vocabulary without the two answer tokens (renormalised)."""
    masked = logits.clone()
    idx = torch.arange(logits.shape[0], device=logits.device)
    masked[idx, target] = float("-inf")
    masked[idx, competitor] = float("-inf")
    return torch.log_softmax(masked, dim=-1)


def _kl(ref_logp: Tensor, logp: Tensor) -> Tensor:
    """``KL(ref || p)`` per row, ignoring the excluded (-inf) entries."""
    p = ref_logp.exp()
    terms = torch.where(torch.isfinite(ref_logp), p * (ref_logp - logp), torch.zeros_like(p))
    return terms.sum(-1)


def _l1(params: dict[str, Tensor | list[Tensor]]) -> Tensor:
    """L1 norm of the parameters (stacked tensors, or one tensor per site)."""
    return sum(t.abs().sum() for v in params.values() for t in (v if isinstance(v, list) else [v]))


def scaling_objective(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[ConflictPrompt],
    params: dict[str, Tensor],
    *,
    sites: Sequence[str],
    method: str = "scalar",
    window: int | None = None,
    betas: Sequence[int] = (1, -1),
    margin: float = 2.0,
    lambda_f: float = 1.0,
    lambda_m: float = 1e-3,
    backend: str | None = None,
    ref_logits: Tensor | None = None,
    handle: SteeringHandle | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``Psi`` for one batch of prompts with the given parameters (differentiable w.r.t. ``params``).

    Args:
        params: ``{"alpha": [sites, P(, H)]}``, ``{"vector": [sites, P, W]}`` or
            ``{"weight": [sites, W], "bias": [sites]}`` (or a list of per-site tensors per key).
        window: ``P``; checked against ``params`` when given.
        ref_logits: unsteered last-token logits ``[B, V]`` (computed here when None).
        handle: a trainable handle already steering the model with these parameters (the training
            loop keeps one); None steers the model for this call only.

    Returns:
        ``(psi, parts)`` with parts ``E``, ``F`` (means over prompts and betas), ``M`` (L1), and the
        steered logit differences ``ld [len(betas), B]``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    device = model_device(model)
    batch = _encode(tokenizer, prompts, device)
    B = batch.input_ids.shape[0]
    if ref_logits is None:
        with torch.no_grad():
            ref_logits = _last_logits(model, batch.input_ids, batch.attention_mask)
    if window is not None and method != "dynamic":
        key = "alpha" if method == "scalar" else "vector"
        if int(params[key][0].shape[0]) != window:
            raise ValueError(
                f"window={window} but the parameters hold {int(params[key][0].shape[0])} positions"
            )
    bt = torch.tensor(list(betas), dtype=torch.float32, device=device)
    own = handle is None
    if own:
        handle = steer(
            model, _configs(method, sites, params), trainable=True, backend=training_backend(backend, device)
        )
    try:
        logits = _steered_last_logits(handle, model, batch, betas)
    finally:
        if own:
            handle.remove()
    tgt = batch.target.repeat(len(betas))
    comp = batch.competitor.repeat(len(betas))
    idx = torch.arange(logits.shape[0], device=device)
    ld = logits[idx, tgt] - logits[idx, comp]
    E = torch.relu(margin - bt.repeat_interleave(B) * ld).mean()
    ref = _other_logprobs(ref_logits.repeat(len(betas), 1), tgt, comp)
    F = _kl(ref, _other_logprobs(logits, tgt, comp)).mean()
    M = _l1(params)
    psi = E + lambda_f * F + lambda_m * M
    return psi, {"E": E.detach(), "F": F.detach(), "M": M.detach(), "ld": ld.detach().reshape(len(betas), B)}


# ------------------------------------------------------------------------------------------------
# the result
# ------------------------------------------------------------------------------------------------


@dataclass
class ScalingResult:
    """A learned intervention.

    Attributes:
        method: ``"scalar" | "vector" | "dynamic"``.
        sites: site names, in parameter order.
        window: ``P``: window position ``k`` (0-based) is prompt offset ``k - P`` (-1 = last token);
            0 for ``"dynamic"``.
        params: see ``scaling_objective``; entries below ``zero_tol`` are exactly zero.
        betas: the directions trained.
        history: per-step ``psi``, ``E``, ``F``, ``M``.
        config: hyper-parameters.
    """

    method: str
    sites: list[str]
    window: int
    params: dict[str, Tensor]
    betas: list[int]
    history: dict[str, list[float]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def offsets(self) -> list[int]:
        """Prompt offsets of the window positions (``-P .. -1``)."""
        return list(range(-self.window, 0))

    def n_nonzero(self) -> int:
        """Learned parameters that are not exactly zero (minimality)."""
        return int(sum((p != 0).sum() for p in self.params.values()))

    def n_params(self) -> int:
        return int(sum(p.numel() for p in self.params.values()))

    def active(self) -> list[tuple[int, int]]:
        """``(site index, window position)`` pairs whose intervention is not the identity."""
        if self.method == "dynamic":
            raise ValueError("a dynamic scaler has no per-position table")
        p = self.params["alpha"] if self.method == "scalar" else self.params["vector"]
        nz = (p != 0).reshape(p.shape[0], p.shape[1], -1).any(-1)
        return [(int(i), int(k)) for i, k in nz.nonzero().tolist()]

    def interventions(self, beta: int = 1) -> list:
        """One ``ActivScalar`` / ``SteerVec`` / ``DynScalar`` per site whose parameters are not all zero."""
        if beta not in (1, -1):
            raise ValueError(f"beta must be +1 or -1, got {beta}")
        ivs = interventions_of(self.method, self.sites, self.params, beta)
        keep = [
            i for i in range(len(self.sites)) if any(bool((p[i] != 0).any()) for p in self.params.values())
        ]
        return [ivs[i] for i in keep]

    def spec(self) -> SteeringSpec:
        """Configs ``"beta+1"`` (the default) and ``"beta-1"``; positions ``"all"`` (the interventions
        select their own window)."""
        meta = {
            "recipe": "activation_scaling",
            "method": self.method,
            "window": self.window,
            "config": self.config,
        }
        return SteeringSpec(
            {_config(1): self.interventions(1), _config(-1): self.interventions(-1)}, "all", meta
        )

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write the result into ``directory``: ``steering.safetensors`` (``pysteer.steer`` /
        ``pysteer generate --steer`` run it; config ``"beta-1"`` for the other direction) and
        ``params.safetensors`` (all parameters and the configuration).

        Returns:
            ``[steering file]``; empty when every parameter is zero (nothing steers).
        """
        from ..io import save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": SCALING_FORMAT,
            "method": self.method,
            "sites": self.sites,
            "window": self.window,
            "betas": self.betas,
            "config": self.config,
        }
        write_safetensors(
            dict(self.params),
            directory / "params.safetensors",
            metadata={"pysteer.scaling": json.dumps(doc)},
        )
        spec = self.spec()
        if not spec.configs[_config(1)]:
            return []
        return [save(spec, directory / "steering.safetensors")]

    def draw(self, path: str | os.PathLike) -> Path:
        """Heatmap of the learned parameters: sites x prompt offsets (scalars, or vector norms)."""
        if self.method == "dynamic":
            w = self.params["weight"].detach()
            vals = torch.stack([self.params["bias"].detach(), w.norm(dim=-1)], dim=1)
            return heatmap_png(
                vals,
                path,
                title="DynScalar: bias and |w| per site",
                xlabel="",
                ylabel="site",
                xticklabels=["bias", "|w|"],
                yticklabels=_site_labels(self.sites),
                center=True,
            )
        if self.method == "scalar":
            a = self.params["alpha"].detach()
            if a.dim() == 3:  # per head: rows are (site, head)
                vals = a.permute(0, 2, 1).reshape(-1, a.shape[1])
                labels = [f"{lab} h{h}" for lab in _site_labels(self.sites) for h in range(a.shape[2])]
            else:
                vals, labels = a, _site_labels(self.sites)
            return heatmap_png(
                vals,
                path,
                title="ActivScalar: learned alpha (scale = 1 + beta*alpha)",
                xlabel="prompt position (from the end)",
                ylabel="site",
                xticklabels=[str(o) for o in self.offsets],
                yticklabels=labels,
                center=True,
            )
        vals = self.params["vector"].detach().norm(dim=-1)
        return heatmap_png(
            vals,
            path,
            title="SteerVec: |v| per site and position",
            xlabel="prompt position (from the end)",
            ylabel="site",
            xticklabels=[str(o) for o in self.offsets],
            yticklabels=_site_labels(self.sites),
        )


def _site_labels(sites: Sequence[str]) -> list[str]:
    out = []
    for s in sites:
        p = parse_site(s)
        out.append(f"L{p.layer} {p.kind.replace('.out', '')}")
    return out


def steer_files(model: nn.Module, paths: Sequence[str | os.PathLike], config: str | None = None) -> list:
    """Apply several steering files at once (e.g. the per-position files of ``ScalingResult.save``).

    Returns:
        The handles (remove each, or all with ``for h in handles: h.remove()``).
    """
    from .. import io, steering

    handles = []
    try:
        for p in paths:
            spec = io.load(p)
            if config is not None:
                if config not in spec.configs:
                    raise KeyError(f"{p}: no config {config!r} (has {list(spec.configs)})")
                spec.configs = {config: spec.configs[config]}
            handles.append(steering.steer(model, spec))
    except Exception:
        for h in handles:
            h.remove()
        raise
    return handles


# ------------------------------------------------------------------------------------------------
# training and evaluation
# ------------------------------------------------------------------------------------------------


def activation_scaling(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[ConflictPrompt] | None = None,
    *,
    method: str = "scalar",
    sites: Sequence[str] | None = None,
    heads: bool = False,
    layers: Sequence[int] | None = None,
    window: int | None = None,
    betas: Sequence[int] = (1, -1),
    margin: float = 2.0,
    lambda_f: float = 1.0,
    lambda_m: float = 1e-3,
    steps: int = 100,
    lr: float | None = None,
    batch_size: int = 16,
    zero_tol: float = 1e-2,
    seed: int = 0,
    backend: str | None = None,
    png: str | os.PathLike | None = None,
    log_every: int = 0,
) -> ScalingResult:
    """Learn an activation-scaling (or steering-vector, or DynScalar) intervention.

    Args:
        model, tokenizer: a Hugging Face causal LM and its tokenizer; the model's weights are frozen
            (their ``requires_grad`` is restored afterwards).
        prompts: training prompts (default: the shipped country task, ``load_country_conflicts()``).
        method: ``"scalar"`` (ActivScalar), ``"vector"`` (SteerVec) or ``"dynamic"`` (DynScalar).
        sites: site names (default ``attn.out`` and ``mlp.out`` of every layer in ``layers``, or
            ``attn.heads`` with ``heads=True``).
        window: ``P``, how many prompt positions (counted from the end) get their own parameters;
            default: the longest training prompt.
        betas: directions trained jointly: ``(1,)`` wrong -> right only, ``(1, -1)`` both.
        margin: logit-difference margin of the effectiveness hinge.
        lambda_f, lambda_m: weights of faithfulness (KL) and minimality (L1).
        steps, lr, batch_size: Adam steps, learning rate (default ``DEFAULT_LR[method]``), prompts per step.
        zero_tol: after training, parameters with ``|p| < zero_tol`` are set to exactly 0 (for vectors:
            whole vectors with ``|v|_inf < zero_tol``), so the saved steering is the minimal one.
        backend: affine-op backend (default: ``PYSTEER_BACKEND`` or automatic).
        png: where to draw the learned parameters.
        log_every: print the objective every this many steps (0: silent).

    Returns:
        ``ScalingResult``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not betas or any(b not in (1, -1) for b in betas) or len(set(betas)) != len(betas):
        raise ValueError(f"betas must be a non-empty subset of (1, -1), got {tuple(betas)}")
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    prompts = list(prompts) if prompts is not None else load_country_conflicts()
    lr = DEFAULT_LR[method] if lr is None else float(lr)
    device = model_device(model)
    sites = list(sites) if sites is not None else default_sites(model, heads=heads, layers=layers)
    parsed = [parse_site(s) for s in sites]
    kinds = {s.kind for s in parsed}
    if "resid" in kinds:
        raise ValueError("activation scaling acts on attn.out, mlp.out or attn.heads, not resid")
    if "attn.heads" in kinds and len(kinds) > 1:
        raise ValueError("per-head (attn.heads) sites cannot be mixed with attn.out / mlp.out in one run")
    geo = geometry(model)
    for s in parsed:
        resolve_site(model, s)  # raises on bad layers
    n_heads = [geo.n_heads if s.kind == "attn.heads" else 1 for s in parsed]
    widths = [geo.head_dim if s.kind == "attn.heads" else geo.d_model for s in parsed]
    if method == "dynamic" and "attn.heads" in kinds:
        widths = [geo.n_heads * geo.head_dim] * len(parsed)
    full = _encode(tokenizer, prompts, device)
    P = window if window is not None else int(full.attention_mask.sum(-1).max())
    if P < 1:
        raise ValueError(f"window must be >= 1, got {P}")
    if method == "dynamic":
        P = 0
    init = _init_params(method, len(parsed), P, widths, n_heads, device)
    leaves = {k: [t.detach().clone() for t in v] for k, v in init.items()}  # per site, shared by both betas
    # Unsteered logits once per prompt. A step's batch pads to its own length; RoPE is relative, so the
    # extra left padding changes these logits only at float rounding level.
    with torch.no_grad():
        ref_all = torch.cat(
            [
                _last_logits(
                    model, full.input_ids[i : i + batch_size], full.attention_mask[i : i + batch_size]
                )
                for i in range(0, len(prompts), batch_size)
            ]
        )
    g = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"psi": [], "E": [], "F": [], "M": []}
    saved = freeze(model)
    handle = steer(
        model, _configs(method, sites, leaves), trainable=True, backend=training_backend(backend, device)
    )
    opt = torch.optim.Adam(handle.parameters(), lr=lr)
    try:
        for step in range(steps):
            idx = torch.randperm(len(prompts), generator=g)[:batch_size].tolist()
            opt.zero_grad()
            psi, parts = scaling_objective(
                model,
                tokenizer,
                [prompts[i] for i in idx],
                leaves,
                sites=sites,
                method=method,
                betas=betas,
                margin=margin,
                lambda_f=lambda_f,
                lambda_m=lambda_m,
                ref_logits=ref_all[idx],
                handle=handle,
            )
            psi.backward()
            opt.step()
            history["psi"].append(psi.item())
            for k in ("E", "F", "M"):
                history[k].append(float(parts[k]))
            if log_every and (step % log_every == 0 or step == steps - 1):
                print(
                    f"step {step:4d}  psi {psi.item():.4f}  E {float(parts['E']):.4f}  "
                    f"F {float(parts['F']):.4f}  L1 {float(parts['M']):.3f}",
                    flush=True,
                )
    finally:
        handle.remove()
        unfreeze(saved)
    final = {k: torch.stack([t.detach() for t in v]) for k, v in leaves.items()}
    with torch.no_grad():
        if method == "vector":
            small = final["vector"].abs().amax(-1, keepdim=True) < zero_tol
            final["vector"] = torch.where(small, torch.zeros_like(final["vector"]), final["vector"])
        else:
            for k in final:
                final[k] = torch.where(final[k].abs() < zero_tol, torch.zeros_like(final[k]), final[k])
    config = {
        "method": method,
        "heads": heads,
        "window": P,
        "betas": list(betas),
        "margin": margin,
        "lambda_f": lambda_f,
        "lambda_m": lambda_m,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "zero_tol": zero_tol,
        "seed": seed,
        "n_prompts": len(prompts),
    }
    result = ScalingResult(method, sites, P, final, list(betas), history, config)
    if png is not None:
        result.draw(png)
    return result


@torch.no_grad()
def evaluate_scaling(
    model: nn.Module,
    tokenizer,
    result: ScalingResult | None,
    prompts: Sequence[ConflictPrompt],
    *,
    betas: Sequence[int] | None = None,
    batch_size: int = 16,
    backend: str | None = None,
) -> dict:
    """Effectiveness, faithfulness and minimality of ``result`` on ``prompts``.

    For each beta: ``success`` = fraction of prompts with ``beta * (logit[target] - logit[competitor]) > 0``
    after steering, ``flip_rate`` = the same among prompts where it was ``<= 0`` unsteered (``None`` when
    there are none), ``kl`` = mean ``KL(unsteered || steered)`` over the other tokens. Minimality:
    ``nonzero`` parameters of ``n_params``. ``result=None`` gives the unsteered numbers.
    """
    device = model_device(model)
    betas = list(betas) if betas is not None else (result.betas if result is not None else [1, -1])
    lds_ref, lds, kls = [], {b: [] for b in betas}, {b: [] for b in betas}
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        batch = _encode(tokenizer, chunk, device)
        ref = _last_logits(model, batch.input_ids, batch.attention_mask)
        idx = torch.arange(ref.shape[0], device=device)
        lds_ref.append(ref[idx, batch.target] - ref[idx, batch.competitor])
        if result is None:
            continue
        ref_other = _other_logprobs(ref, batch.target, batch.competitor)
        # the deployed form: the result's steering, as pysteer.steer runs a loaded file
        with steer(model, result.spec(), backend=training_backend(backend, device)) as handle:
            logits_all = _steered_last_logits(handle, model, batch, betas)
        for i, b in enumerate(betas):
            logits = logits_all[i * len(chunk) : (i + 1) * len(chunk)]
            lds[b].append(logits[idx, batch.target] - logits[idx, batch.competitor])
            kls[b].append(_kl(ref_other, _other_logprobs(logits, batch.target, batch.competitor)))
    ld_ref = torch.cat(lds_ref).cpu()
    out: dict = {"n_prompts": len(prompts), "unsteered_target_preferred": float((ld_ref > 0).float().mean())}
    if result is None:
        return out
    for b in betas:
        ld = torch.cat(lds[b]).cpu()
        before_wrong = (b * ld_ref) <= 0
        ok = (b * ld) > 0
        out[f"beta{b:+d}"] = {
            "success": float(ok.float().mean()),
            "flip_rate": float(ok[before_wrong].float().mean()) if before_wrong.any() else None,
            "n_to_flip": int(before_wrong.sum()),
            "kl": float(torch.cat(kls[b]).mean()),
            "mean_logit_diff": float(ld.mean()),
        }
    out["nonzero"] = result.n_nonzero()
    out["n_params"] = result.n_params()
    if result.method != "dynamic":
        out["active_site_positions"] = len(result.active())
    return out


def draw_history(results: dict[str, ScalingResult], path: str | os.PathLike) -> Path:
    """Objective per training step for several results (e.g. the three methods)."""
    return curves_png(
        {k: r.history["psi"] for k, r in results.items()},
        path,
        title="objective Psi per step",
        xlabel="step",
        ylabel="Psi",
    )
