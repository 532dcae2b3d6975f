"""Shared pieces of the recipes: the training-time op call, token positions, data files, plots."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn

from .._backend import resolve_backend

DATA_PACKAGE = "pysteer.recipes"


def data_path(name: str) -> Path:
    """Path of a data file shipped in ``pysteer/recipes/data``."""
    path = Path(str(resources.files(DATA_PACKAGE).joinpath("data", name)))
    if not path.is_file():
        raise FileNotFoundError(f"recipe data file {name!r} not found at {path}")
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file; raises ``ValueError`` naming the first bad line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from err
    return rows


def training_backend(backend: str | None, device: torch.device) -> str:
    """The affine-op backend used by recipe training hooks (same precedence as ``pysteer.steer``)."""
    return resolve_backend(backend, device)


def op_affine(x: Tensor, rows: Tensor, M: Tensor, A: Tensor, backend: str) -> Tensor:
    """``x * M[rows] + A[rows]`` through the registered op ``pysteer::affine_steer``.

    Always the registered custom op (never the inline reference), so gradients for ``x``, ``M`` and
    ``A`` come from the op's own backward (``pysteer::affine_steer_backward``) on every backend.

    Args:
        x: ``[T, H, D]`` activations.
        rows: ``[T]`` int32 table row per token (0 leaves the token untouched).
        M, A: ``[C, H, D|1]`` tables.
        backend: ``"torch" | "triton" | "cuda"``.

    Returns:
        ``[T, H, D]``, ``x``'s dtype.
    """
    M = M.to(torch.float32).contiguous()
    A = A.to(torch.float32).contiguous()
    return torch.ops.pysteer.affine_steer(x, rows, M, A, backend)


def offsets_from_end(attention_mask: Tensor) -> Tensor:
    """Offset of every token from the end of its sequence: ``[B, S]`` long, -1 = last real token.

    Padding tokens get 0 (no real token has offset 0). Works for left or right padding.
    """
    m = attention_mask.to(torch.long)
    length = m.sum(-1, keepdim=True)
    pos = m.cumsum(-1) - 1  # position from the first real token
    return torch.where(m.bool(), pos - length, torch.zeros_like(pos))


def last_token_logits(model: nn.Module, **kwargs) -> Tensor:
    """Logits ``[B, V]`` of every row's last column, computing only that position where the model
    takes ``logits_to_keep``."""
    try:
        out = model(**kwargs, logits_to_keep=1)
    except TypeError:  # models without logits_to_keep
        out = model(**kwargs)
    return out.logits[:, -1]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def chat_text(tokenizer, prompt: str, chat: bool) -> str:
    """Wrap ``prompt`` in the tokenizer's chat template (when asked and the tokenizer has one)."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def single_token_id(tokenizer, word: str) -> int:
    """The id of ``word`` as one token (raises ``ValueError`` when it takes several)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(
            f"{word!r} is {len(ids)} tokens for this tokenizer; the recipe needs one-token answers"
        )
    return int(ids[0])


def freeze(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """Turn off ``requires_grad`` on every parameter; returns what to restore."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    return saved


def unfreeze(saved: Sequence[tuple[nn.Parameter, bool]]) -> None:
    for p, flag in saved:
        p.requires_grad_(flag)


def heatmap_png(
    values: Tensor,
    path: str | os.PathLike,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    xticklabels: Sequence[str] | None = None,
    yticklabels: Sequence[str] | None = None,
    cmap: str = "viridis",
    center: bool = False,
    marks: Sequence[tuple[int, int]] = (),
) -> Path:
    """Draw ``values [rows, cols]`` as a heatmap PNG (matplotlib, Agg backend; imported on use).

    ``center=True`` uses a diverging colour map symmetric around 0; ``marks`` outlines cells (row, col).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    v = values.detach().float().cpu().numpy()
    rows, cols = v.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.32 * cols + 2.5), max(3.0, 0.22 * rows + 1.5)))
    if center:
        lim = float(abs(v).max()) or 1.0
        im = ax.imshow(v, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    else:
        im = ax.imshow(v, aspect="auto", cmap=cmap, interpolation="nearest")
    for r, c in marks:
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xticklabels is not None:
        ax.set_xticks(range(cols))
        ax.set_xticklabels(list(xticklabels), rotation=90, fontsize=7)
    if yticklabels is not None:
        ax.set_yticks(range(rows))
        ax.set_yticklabels(list(yticklabels), fontsize=7)
    fig.colorbar(im, ax=ax)
    return save_png(fig, path)


def save_png(fig, path: str | os.PathLike) -> Path:
    """Lay out ``fig``, write it to ``path`` (parents made) at 110 dpi, close it; the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_png(
    curves: dict[str, Sequence[float]], path: str | os.PathLike, *, title: str, xlabel: str, ylabel: str
) -> Path:
    """Line plot of named curves (e.g. loss per step) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, ys in curves.items():
        ax.plot(range(len(ys)), list(ys), label=name)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return save_png(fig, path)


class TrainableEdit:
    """A trainable edit of a frozen model, as the recipes train and compare them: ``parameters()``,
    ``select(batch)`` before every forward, ``snapshot()`` / ``restore()``, ``close()``. The base
    class edits nothing (the zero-shot / base model)."""

    name = "zero_shot"

    def parameters(self) -> list[Tensor]:
        return []

    def select(self, batch: Sequence) -> None:
        pass

    def snapshot(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.parameters()]

    def restore(self, snap: Sequence[Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.parameters(), snap):
                p.copy_(s)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def frozen_prefix(self):
        """A ``FrozenPrefix`` for the frozen layers below the edit, or None (LoRA edits every layer)."""
        return None

    def close(self) -> None:
        pass


class LoraEdit(TrainableEdit):
    """LoRA (peft) on ``target_modules`` (default ``o_proj``; every layer unless ``layers`` is given),
    injected into the model in place and removed by ``close``.

    Raises:
        ImportError: peft is not installed (``pip install 'pysteer[lora]'``).
    """

    name = "lora"

    def __init__(
        self,
        model,
        r: int,
        alpha: float,
        layers: Sequence[int] | None,
        seed: int,
        target_modules: Sequence[str] = ("o_proj",),
    ):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            raise ImportError("LoRA needs peft: pip install 'pysteer[lora]' (or pip install peft)") from err

        torch.manual_seed(seed)
        cfg = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=list(target_modules),
            layers_to_transform=list(layers) if layers is not None else None,
            bias="none",
        )
        self.peft = get_peft_model(model, cfg)  # injects into ``model`` in place
        self.params = [p for n, p in self.peft.named_parameters() if "lora_" in n]
        for p in self.params:
            p.requires_grad_(True)

    def parameters(self) -> list[Tensor]:
        return self.params

    def close(self) -> None:
        self.peft.unload()  # puts the original modules back, unmerged
