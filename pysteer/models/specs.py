"""Architecture specs: one data entry per ``config.model_type``.

An ``ArchSpec`` names the module paths pysteer needs (decoder layers, the attention output
projection, the MLP and its output projection) and the weight layout of the projections.
Head count and head_dim are read from the config and checked against the projection's weight.
Adding an architecture is adding one entry to ``ARCH_SPECS``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Where the sites of one architecture live.

    Attributes:
        layers: dotted path from the causal-LM module to the ``ModuleList`` of decoder layers.
        attn_out_proj: path, relative to a layer, of the attention output projection; its input is
            the ``attn.heads`` site (head-major ``[B, S, H*D]``), its output the ``attn.out`` site.
        mlp: path, relative to a layer, of the module whose output is the ``mlp.out`` site.
        mlp_out_proj: path, relative to a layer, of the MLP's last linear (for folding at ``mlp.out``).
        proj_layout: ``"linear"`` (weight ``[out, in]``) or ``"conv1d"`` (GPT-2 Conv1D, weight ``[in, out]``).
        heads_attr: config attributes tried in order for the number of attention heads.
        final_norm: path from the causal-LM module to the final norm (for early-stopped tracing).
        q_proj, k_proj, v_proj: paths, relative to a layer, of the query/key/value projections
            (the ``attn.q|k|v`` sites are their outputs); ``None`` where the architecture computes
            them in one fused projection.
        fused_qkv: the fused projection's path, named in the error for ``attn.q|k|v``.
        mlp_gate_proj, mlp_up_proj: paths, relative to a layer, of the MLP's gate and up (input)
            projections (the ``mlp.gate_proj.in|out`` / ``mlp.up_proj.in|out`` sites); ``None`` where
            the architecture has no such separate linear.
        fused_gate_up: the fused gate/up projection's path, named in the error for those sites.
    """

    layers: str
    attn_out_proj: str
    mlp: str
    mlp_out_proj: str
    proj_layout: str = "linear"
    heads_attr: tuple[str, ...] = ("num_attention_heads", "n_head")
    final_norm: str = "model.norm"
    q_proj: str | None = "self_attn.q_proj"
    k_proj: str | None = "self_attn.k_proj"
    v_proj: str | None = "self_attn.v_proj"
    fused_qkv: str | None = None
    mlp_gate_proj: str | None = None
    mlp_up_proj: str | None = None
    fused_gate_up: str | None = None


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    attn_out_proj="self_attn.o_proj",
    mlp="mlp",
    mlp_out_proj="mlp.down_proj",
    mlp_gate_proj="mlp.gate_proj",
    mlp_up_proj="mlp.up_proj",
)

ARCH_SPECS: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": dataclasses.replace(
        _LLAMA_LIKE,
        q_proj=None,
        k_proj=None,
        v_proj=None,
        fused_qkv="self_attn.qkv_proj",
        mlp_gate_proj=None,
        mlp_up_proj=None,
        fused_gate_up="mlp.gate_up_proj",
    ),
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "phi": ArchSpec(
        layers="model.layers",
        attn_out_proj="self_attn.dense",
        mlp="mlp",
        mlp_out_proj="mlp.fc2",
        final_norm="model.final_layernorm",
        mlp_up_proj="mlp.fc1",
    ),
    "gpt2": ArchSpec(
        layers="transformer.h",
        attn_out_proj="attn.c_proj",
        mlp="mlp",
        mlp_out_proj="mlp.c_proj",
        proj_layout="conv1d",
        final_norm="transformer.ln_f",
        q_proj=None,
        k_proj=None,
        v_proj=None,
        fused_qkv="attn.c_attn",
        mlp_up_proj="mlp.c_fc",
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers",
        attn_out_proj="attention.dense",
        mlp="mlp",
        mlp_out_proj="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        q_proj=None,
        k_proj=None,
        v_proj=None,
        fused_qkv="attention.query_key_value",
        mlp_up_proj="mlp.dense_h_to_4h",
    ),
    "opt": ArchSpec(
        layers="model.decoder.layers",
        attn_out_proj="self_attn.out_proj",
        mlp="fc2",
        mlp_out_proj="fc2",
        final_norm="model.decoder.final_layer_norm",
        mlp_up_proj="fc1",
    ),
}


class UnsupportedArchitecture(ValueError):
    """The model's ``config.model_type`` has no ``ArchSpec``."""


def get_spec(model: nn.Module) -> ArchSpec:
    """The spec for ``model`` (a Hugging Face causal LM), or a clear error listing supported types."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCH_SPECS:
        raise UnsupportedArchitecture(
            f"pysteer has no architecture spec for model_type={model_type!r}. Supported: "
            f"{', '.join(sorted(ARCH_SPECS))}. To add one, register an ArchSpec naming the decoder layers, "
            "the attention output projection, the MLP and its output projection: "
            "pysteer.models.ARCH_SPECS['<model_type>'] = ArchSpec(layers=..., attn_out_proj=..., mlp=..., mlp_out_proj=...)"
        )
    return ARCH_SPECS[model_type]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside wrappers that forward to it unchanged: a PEFT ``PeftModel``
    (its base model, LoRA layers and all) and a ``torch.compile`` ``OptimizedModule``."""
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)  # torch.compile(model)
        if inner is None and callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()  # peft.PeftModel
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner
    return model


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


@dataclass(frozen=True)
class ModelGeometry:
    """The sizes a model's sites have (``pysteer.models.sites.SITE_TABLE`` maps each kind to them).

    ``n_kv_heads`` is the key/value head count (grouped-query attention); ``d_mlp`` the width of the
    MLP's hidden layer (the input of its output projection).
    """

    n_layers: int
    n_heads: int
    head_dim: int
    d_model: int
    n_kv_heads: int = 0
    d_mlp: int = 0


def proj_weight_in_out(proj: nn.Module, layout: str) -> tuple[int, int]:
    """``(in_features, out_features)`` of a projection in either layout."""
    w = proj.weight
    return (w.shape[1], w.shape[0]) if layout == "linear" else (w.shape[0], w.shape[1])


def geometry(model: nn.Module, spec: ArchSpec | None = None) -> ModelGeometry:
    """Layer count, head count, head_dim and d_model, checked against the projection weights."""
    spec = spec or get_spec(model)
    layers = get_submodule(model, spec.layers)
    config = model.config
    n_heads = next((getattr(config, a) for a in spec.heads_attr if getattr(config, a, None)), None)
    if n_heads is None:
        raise UnsupportedArchitecture(f"cannot read the head count from config attributes {spec.heads_attr}")
    proj = get_submodule(layers[0], spec.attn_out_proj)
    in_f, out_f = proj_weight_in_out(proj, spec.proj_layout)
    if in_f % n_heads:
        raise UnsupportedArchitecture(
            f"attention output projection input {in_f} is not divisible by {n_heads} heads"
        )
    n_kv = next(
        (
            getattr(config, a)
            for a in ("num_key_value_heads", "multi_query_group_num")
            if getattr(config, a, None)
        ),
        n_heads,
    )
    d_mlp, _ = proj_weight_in_out(get_submodule(layers[0], spec.mlp_out_proj), spec.proj_layout)
    return ModelGeometry(
        n_layers=len(layers),
        n_heads=int(n_heads),
        head_dim=in_f // n_heads,
        d_model=out_f,
        n_kv_heads=int(n_kv),
        d_mlp=int(d_mlp),
    )


def layer_modules(model: nn.Module, spec: ArchSpec | None = None) -> torch.nn.ModuleList:
    spec = spec or get_spec(model)
    return get_submodule(model, spec.layers)
