"""JoLA: joint localisation and activation editing with HardConcrete head gates (Lai et al., 2025).

Every head's output ``z [D]`` at ``attn.heads`` becomes

    z <- (1 + g2 * m) * z + g1 * a

with learned vectors ``m, a [D]`` and two gates per head ``g1, g2 in [0, 1]`` drawn from HardConcrete
distributions (Louizos et al., 2018) with one ``log_alpha`` each, temperature ``0.33`` and stretch
``(-0.1, 1.1)``:

    training:  s = sigmoid((log u - log(1 - u) + log_alpha) / temperature),  u ~ U(0, 1)
    eval:      s = sigmoid(log_alpha)
    gate       = clamp(s * (1.1 - -0.1) + -0.1, 0, 1)

The loss is the task's cross-entropy plus ``lambda_l0`` times the expected fraction of open gates,
``mean(sigmoid(log_alpha - temperature * log(0.1 / 1.1)))``, the closed form of ``P(gate > 0)``.

Each layer's edit is a ``JolaGate`` intervention at ``attn.heads``. Training steers the model with
``pysteer.steer(..., trainable=True)``: every forward rebuilds the affine table ``M = 1 + g2 m``,
``A = g1 a`` from freshly sampled gates and the gradients are ``pysteer::affine_steer``'s backward. At
evaluation the gates are deterministic and most are exactly 0, so the edit is a per-head scale and
bias on a few heads: ``JolaResult.interventions()`` exports them as ``HeadScale`` + ``HeadBias``, which
``pysteer.steer(..., mode="fold")`` folds into ``o_proj`` (``W_o (m z + a) = (W_o diag(m)) z + W_o a``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..interventions import AffineTerms, HeadBias, HeadScale, _check_layer, intervention_kind
from ..models.sites import Site
from ..models.specs import ModelGeometry, geometry
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

TEMPERATURE = 0.33
STRETCH = (-0.1, 1.1)
PROMPT = "Text: {text}\nTopic:"

# ------------------------------------------------------------------------------------------------
# HardConcrete gates
# ------------------------------------------------------------------------------------------------


def hard_concrete_sample(
    log_alpha: Tensor, generator: torch.Generator | None = None, eps: float = 1e-6
) -> Tensor:
    """A stochastic gate per entry of ``log_alpha`` (training), differentiable in ``log_alpha``."""
    u = torch.rand(log_alpha.shape, generator=generator, device="cpu").to(log_alpha.device)
    u = u * (1 - 2 * eps) + eps
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / TEMPERATURE)
    low, high = STRETCH
    return (s * (high - low) + low).clamp(0.0, 1.0)


def hard_concrete_eval(log_alpha: Tensor) -> Tensor:
    """The deterministic gate used at evaluation: ``clamp(sigmoid(log_alpha) * 1.2 - 0.1, 0, 1)``.

    It is exactly 0 for ``log_alpha <= log(1/11)`` (about -2.40) and exactly 1 for ``log_alpha >= log(11)``.
    """
    low, high = STRETCH
    return (torch.sigmoid(log_alpha) * (high - low) + low).clamp(0.0, 1.0)


def expected_l0(log_alpha: Tensor) -> Tensor:
    """``P(gate > 0)`` per entry: ``sigmoid(log_alpha - temperature * log(-low / high))``."""
    low, high = STRETCH
    return torch.sigmoid(log_alpha - TEMPERATURE * math.log(-low / high))


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledText:
    """A text and its label word (answered as the next token after ``PROMPT``)."""

    text: str
    label: str


def load_topics(path: str | os.PathLike | None = None) -> list[LabelledText]:
    """The shipped topic task: 48 sentences about sports, food, music or weather (12 each)."""
    path = Path(path) if path is not None else data_path("topics.jsonl")
    out = []
    for n, row in enumerate(read_jsonl(path), start=1):
        if not {"text", "label"} <= set(row):
            raise ValueError(f"{path}:{n}: needs text and label")
        out.append(LabelledText(row["text"], row["label"]))
    return out


def split_examples(
    examples: Sequence[LabelledText], test_fraction: float = 0.33, seed: int = 0
) -> tuple[list[LabelledText], list[LabelledText]]:
    """A seeded split stratified by label."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in sorted({e.label for e in examples}):
        group = [e for e in examples if e.label == label]
        perm = torch.randperm(len(group), generator=g).tolist()
        n_test = max(1, round(test_fraction * len(group))) if len(group) > 1 else 0
        test += [group[i] for i in perm[:n_test]]
        train += [group[i] for i in perm[n_test:]]
    return train, test


# ------------------------------------------------------------------------------------------------
# parameters, hooks, result
# ------------------------------------------------------------------------------------------------


@dataclass
class JolaResult:
    """Learned JoLA parameters for ``layers`` (``n = len(layers)``).

    Attributes:
        layers: decoder layers edited.
        log_alpha_add, log_alpha_mul: ``[n, H]`` gate parameters of ``g1`` (bias) and ``g2`` (scale).
        add, mul: ``[n, H, D]`` the bias ``a`` and scale offset ``m``.
        history: per-step ``loss``, ``ce``, ``l0`` and ``open`` (open evaluation gates).
        metrics: evaluation numbers (filled by the CLI / caller).
        config: hyper-parameters.
    """

    layers: list[int]
    log_alpha_add: Tensor
    log_alpha_mul: Tensor
    add: Tensor
    mul: Tensor
    history: dict[str, list[float]] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def gates(self) -> tuple[Tensor, Tensor]:
        """Evaluation gates ``(g1, g2)``, ``[n, H]`` each."""
        return hard_concrete_eval(self.log_alpha_add.detach()), hard_concrete_eval(
            self.log_alpha_mul.detach()
        )

    def n_open(self) -> int:
        g1, g2 = self.gates()
        return int((g1 > 0).sum() + (g2 > 0).sum())

    def n_gates(self) -> int:
        return 2 * self.log_alpha_add.numel()

    def interventions(self) -> list:
        """``HeadScale(1 + g2 m)`` then ``HeadBias(g1 a)`` for the heads with an open gate, per layer."""
        g1, g2 = self.gates()
        out: list = []
        for i, layer in enumerate(self.layers):
            mul_heads = [int(h) for h in (g2[i] > 0).nonzero().flatten()]
            add_heads = [int(h) for h in (g1[i] > 0).nonzero().flatten()]
            if mul_heads:
                scale = 1 + g2[i, mul_heads, None] * self.mul[i, mul_heads].detach()
                out.append(HeadScale(layer, head=mul_heads, scale=scale.float().cpu()))
            if add_heads:
                vec = g1[i, add_heads, None] * self.add[i, add_heads].detach()
                out.append(HeadBias(layer, head=add_heads, vector=vec.float().cpu()))
        return out

    def spec(self) -> SteeringSpec:
        meta = {
            "recipe": "jola",
            "open_gates": self.n_open(),
            "gates": self.n_gates(),
            "metrics": self.metrics,
            "config": self.config,
        }
        return SteeringSpec({"default": self.interventions()}, "all", meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Save the evaluated edit as a steering file (``pysteer.steer`` folds it by default)."""
        from ..io import save

        spec = self.spec()
        if not spec.configs["default"]:
            raise ValueError("every gate is closed: the edit is the identity, nothing to save")
        return save(spec, path)

    def draw(self, path: str | os.PathLike) -> Path:
        """Heatmap of the evaluation gates: layers x [g1 (bias) per head | g2 (scale) per head]."""
        g1, g2 = self.gates()
        H = g1.shape[1]
        return heatmap_png(
            torch.cat([g1, g2], dim=1),
            path,
            title=f"JoLA evaluation gates ({self.n_open()} of {self.n_gates()} open)",
            xlabel="bias gate g1 per head | scale gate g2 per head",
            ylabel="layer",
            xticklabels=[f"a{h}" for h in range(H)] + [f"m{h}" for h in range(H)],
            yticklabels=[str(layer) for layer in self.layers],
        )


@intervention_kind
@dataclass(eq=False)
class JolaGate:
    """The JoLA edit of one layer's heads: ``z <- (1 + g2 * mul) * z + g1 * add`` at ``attn.heads``.

    Args:
        layer: decoder layer.
        log_alpha_add, log_alpha_mul: ``[H]`` gate parameters of ``g1`` and ``g2``.
        add, mul: ``[H, D]``.
        sample: draw the gates from their HardConcrete distributions at every forward (training);
            False uses the deterministic evaluation gates.
        generator: random source of the samples (not saved).
    """

    layer: int
    log_alpha_add: Tensor
    log_alpha_mul: Tensor
    add: Tensor
    mul: Tensor
    sample: bool = False
    generator: torch.Generator | None = field(default=None, repr=False)
    trainable: ClassVar[tuple[str, ...]] = ("log_alpha_add", "log_alpha_mul", "add", "mul")

    @property
    def site(self) -> Site:
        return Site(int(self.layer), "attn.heads")

    def affine_terms(self, geo: ModelGeometry) -> AffineTerms:
        what = f"JolaGate(layer={self.layer})"
        _check_layer(self.layer, geo, what)
        H, D = geo.n_heads, geo.head_dim
        for name, shape in (
            ("log_alpha_add", (H,)),
            ("log_alpha_mul", (H,)),
            ("add", (H, D)),
            ("mul", (H, D)),
        ):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"{what}: {name} must be {list(shape)}, got {tuple(getattr(self, name).shape)}"
                )
        gate = (lambda la: hard_concrete_sample(la, self.generator)) if self.sample else hard_concrete_eval
        g1, g2 = gate(self.log_alpha_add), gate(self.log_alpha_mul)
        return AffineTerms(self.site, (1 + g2[:, None] * self.mul).float(), (g1[:, None] * self.add).float())

    def to_fields(self, put) -> dict:
        names = ("log_alpha_add", "log_alpha_mul", "add", "mul")
        return {"layer": self.layer, **{n: put(getattr(self, n), n) for n in names}}

    @classmethod
    def from_fields(cls, fields, get) -> JolaGate:
        names = {"layer", "log_alpha_add", "log_alpha_mul", "add", "mul"}
        if set(fields) != names:
            raise ValueError(f"JolaGate needs exactly the fields {sorted(names)}, got {sorted(fields)}")
        return cls(
            int(fields["layer"]),
            *(get(fields[n], n) for n in ("log_alpha_add", "log_alpha_mul", "add", "mul")),
        )


def gate_interventions(
    params: JolaResult, *, sample: bool = False, generator: torch.Generator | None = None
) -> list[JolaGate]:
    """One ``JolaGate`` per edited layer over views of ``params`` (gradients reach its tensors)."""
    return [
        JolaGate(
            layer,
            params.log_alpha_add[i],
            params.log_alpha_mul[i],
            params.add[i],
            params.mul[i],
            sample,
            generator,
        )
        for i, layer in enumerate(params.layers)
    ]


def steer_gates(
    model: nn.Module,
    params: JolaResult,
    *,
    training: bool,
    backend: str | None = None,
    generator: torch.Generator | None = None,
) -> SteeringHandle:
    """Steer ``model`` with the JoLA edit: sampled gates and a trainable handle when ``training``."""
    ivs = gate_interventions(params, sample=training, generator=generator)
    return steer(
        model, ivs, mode="dynamic", trainable=training, backend=training_backend(backend, model_device(model))
    )


def init_params(
    model: nn.Module, layers: Sequence[int] | None = None, init_log_alpha: float = 0.0
) -> JolaResult:
    """Zero edits (``a = m = 0``) with every gate at ``init_log_alpha``."""
    geo = geometry(model)
    layers = list(range(geo.n_layers)) if layers is None else [int(x) for x in layers]
    for layer in layers:
        if not 0 <= layer < geo.n_layers:
            raise ValueError(f"layer {layer} out of range, the model has {geo.n_layers} layers")
    if not layers:
        raise ValueError("no layers to edit")
    dev = model_device(model)
    n, H, D = len(layers), geo.n_heads, geo.head_dim
    return JolaResult(
        layers,
        torch.full((n, H), float(init_log_alpha), device=dev),
        torch.full((n, H), float(init_log_alpha), device=dev),
        torch.zeros(n, H, D, device=dev),
        torch.zeros(n, H, D, device=dev),
    )


# ------------------------------------------------------------------------------------------------
# training and evaluation
# ------------------------------------------------------------------------------------------------


def _encode(tokenizer, examples: Sequence[LabelledText], device, prompt: str):
    old = getattr(tokenizer, "padding_side", "left")
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer([prompt.format(text=e.text) for e in examples], return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old
    labels = torch.tensor([single_token_id(tokenizer, " " + e.label) for e in examples], device=device)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device), labels


def _logits(model, ids, mask) -> Tensor:
    return last_token_logits(model, input_ids=ids, attention_mask=mask, use_cache=False).float()


@torch.no_grad()
def evaluate_topics(
    model: nn.Module,
    tokenizer,
    examples: Sequence[LabelledText],
    params: JolaResult | None = None,
    *,
    prompt: str = PROMPT,
    batch_size: int = 16,
    backend: str | None = None,
) -> dict:
    """Cross-entropy of the label token and accuracy (label = argmax among the label words).

    ``params=None`` evaluates the unedited model; otherwise the evaluation gates are used.
    """
    device = model_device(model)
    labels = sorted({e.label for e in examples})
    label_ids = torch.tensor([single_token_id(tokenizer, " " + lab) for lab in labels], device=device)
    ces, correct = [], []
    handle = steer_gates(model, params, training=False, backend=backend) if params is not None else None
    try:
        for s in range(0, len(examples), batch_size):
            ids, mask, y = _encode(tokenizer, examples[s : s + batch_size], device, prompt)
            lg = _logits(model, ids, mask)
            ces.append(torch.nn.functional.cross_entropy(lg, y, reduction="none"))
            correct.append(label_ids[lg[:, label_ids].argmax(-1)] == y)
    finally:
        if handle is not None:
            handle.remove()
    return {
        "ce": float(torch.cat(ces).mean()),
        "accuracy": float(torch.cat(correct).float().mean()),
        "n": len(examples),
    }


def jola(
    model: nn.Module,
    tokenizer,
    examples: Sequence[LabelledText] | None = None,
    *,
    layers: Sequence[int] | None = None,
    steps: int = 60,
    lr: float = 1e-2,
    gate_lr: float = 0.1,
    lambda_l0: float = 1.0,
    batch_size: int = 8,
    init_log_alpha: float = 0.0,
    prompt: str = PROMPT,
    seed: int = 0,
    backend: str | None = None,
    png: str | os.PathLike | None = None,
    log_every: int = 0,
) -> JolaResult:
    """Train JoLA gates and edits on a label-word task.

    Args:
        model, tokenizer: a Hugging Face causal LM and its tokenizer (weights frozen during training).
        examples: training examples (default: the training split of ``load_topics()``).
        layers: decoder layers to edit (default: all).
        steps: Adam steps.
        lr: learning rate of the edit vectors ``a``, ``m``.
        gate_lr: learning rate of the gates' ``log_alpha`` (they must travel from ``init_log_alpha``
            to below -2.4 to close, so they get a larger step).
        lambda_l0: weight of the expected-L0 penalty (mean over gates).
        batch_size: examples per step.
        init_log_alpha: initial ``log_alpha`` of every gate (0: evaluation gate 0.5, ``P(open)`` 0.69).
        prompt: format string with ``{text}``; the label word is the next token.
        png: where to draw the evaluation gates (a loss curve goes next to it, ``*_loss.png``).
        log_every: print progress every this many steps (0: silent).

    Returns:
        ``JolaResult`` (use ``.save(path)`` for the steering file).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    if lambda_l0 < 0:
        raise ValueError(f"lambda_l0 must be >= 0, got {lambda_l0}")
    if examples is None:
        examples, _ = split_examples(load_topics())
    examples = list(examples)
    if not examples:
        raise ValueError("no training examples")
    device = model_device(model)
    params = init_params(model, layers, init_log_alpha)
    trainable = [params.log_alpha_add, params.log_alpha_mul, params.add, params.mul]
    for t in trainable:
        t.requires_grad_(True)
    opt = torch.optim.Adam(
        [
            {"params": [params.add, params.mul], "lr": lr},
            {"params": [params.log_alpha_add, params.log_alpha_mul], "lr": gate_lr},
        ]
    )
    g = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"loss": [], "ce": [], "l0": [], "open": []}
    saved = freeze(model)
    handle = steer_gates(model, params, training=True, backend=backend, generator=g)
    try:
        for step in range(steps):
            idx = torch.randperm(len(examples), generator=g)[:batch_size].tolist()
            ids, mask, y = _encode(tokenizer, [examples[i] for i in idx], device, prompt)
            opt.zero_grad()
            ce = torch.nn.functional.cross_entropy(_logits(model, ids, mask), y)
            l0 = torch.cat(
                [expected_l0(params.log_alpha_add).flatten(), expected_l0(params.log_alpha_mul).flatten()]
            ).mean()
            loss = ce + lambda_l0 * l0
            loss.backward()
            opt.step()
            history["loss"].append(loss.item())
            history["ce"].append(ce.item())
            history["l0"].append(l0.item())
            history["open"].append(float(params.n_open()))
            if log_every and (step % log_every == 0 or step == steps - 1):
                print(
                    f"step {step:4d}  loss {loss.item():.4f}  ce {ce.item():.4f}  "
                    f"E[L0] {l0.item():.3f}  open gates {params.n_open()}/{params.n_gates()}",
                    flush=True,
                )
    finally:
        handle.remove()
        unfreeze(saved)
    for t in trainable:
        t.requires_grad_(False)
    params.history = history
    params.config = {
        "layers": params.layers,
        "steps": steps,
        "lr": lr,
        "gate_lr": gate_lr,
        "lambda_l0": lambda_l0,
        "batch_size": batch_size,
        "init_log_alpha": init_log_alpha,
        "temperature": TEMPERATURE,
        "stretch": list(STRETCH),
        "prompt": prompt,
        "seed": seed,
        "n_train": len(examples),
    }
    if png is not None:
        params.draw(png)
        p = Path(png)
        curves_png(
            {"loss": history["loss"], "cross-entropy": history["ce"], "E[L0] (fraction open)": history["l0"]},
            p.with_name(p.stem + "_loss.png"),
            title="JoLA training",
            xlabel="step",
            ylabel="value",
        )
    return params


@torch.no_grad()
def fold_check(
    model: nn.Module, tokenizer, params: JolaResult, examples: Sequence[LabelledText], prompt: str = PROMPT
) -> dict:
    """Logits of the gated edit (``JolaGate``, evaluation gates) vs its export steered folded and dynamic.

    Returns:
        ``{"max_abs_diff_fold", "max_abs_diff_dynamic", "max_abs_logit"}`` over the examples' last tokens.
    """
    device = model_device(model)
    ids, mask, _ = _encode(tokenizer, list(examples), device, prompt)
    with steer_gates(model, params, training=False):
        hooked = _logits(model, ids, mask)
    spec = params.spec()
    with steer(model, spec, mode="fold"):
        folded = _logits(model, ids, mask)
    with steer(model, spec, mode="dynamic"):
        dynamic = _logits(model, ids, mask)
    return {
        "max_abs_diff_fold": float((folded - hooked).abs().max()),
        "max_abs_diff_dynamic": float((dynamic - hooked).abs().max()),
        "max_abs_logit": float(hooked.abs().max()),
    }
