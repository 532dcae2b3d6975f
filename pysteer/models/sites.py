"""Sites: named points of a model where interventions act and activations are traced.

| site                        | tensor                         | hook point                                       |
|-----------------------------|--------------------------------|--------------------------------------------------|
| ``embed``                   | ``[B, S, d_model]``            | output of the token embedding                    |
| ``layers.{i}.resid_pre``    | ``[B, S, d_model]``            | input of decoder layer i (its residual stream in)|
| ``layers.{i}.attn.q|k|v``   | ``[B, S, H*D]`` / ``[B, S, H_kv*D]`` head-major | outputs of the query/key/value projections (before rotary) |
| ``layers.{i}.attn.heads``   | ``[B, S, H*D]`` head-major     | input of the attention output projection         |
| ``layers.{i}.attn.out``     | ``[B, S, d_model]``            | output of that projection                        |
| ``layers.{i}.mlp.hidden``   | ``[B, S, d_mlp]``              | input of the MLP's output projection (neurons)   |
| ``layers.{i}.mlp.out``      | ``[B, S, d_model]``            | output of the MLP                                |
| ``layers.{i}.resid``        | ``[B, S, d_model]``            | output of the decoder layer (residual stream)    |
| ``layers.{i}.{linear}.in|out`` | input / output of a named linear | ``linear`` one of ``LINEARS``: ``mlp.gate_proj``, ``mlp.up_proj``, ``mlp.down_proj``, ``attn.o_proj`` |

Each kind is one row of ``SITE_TABLE``: which module (a path of the architecture's ``ArchSpec``), input
or output, and its ``(heads, head width)`` from the model's geometry. ``attn.q|k|v`` do not exist where
an architecture fuses the three projections (GPT-2, GPT-NeoX, Phi-3): resolving them says so.
``embed`` is the embedding module's output: Gemma (1, 2) multiplies it by sqrt(d_model) afterwards.

The linear sites name modules in the Llama nomenclature and find each architecture's own module in
its ``ArchSpec`` (``attn.o_proj`` is GPT-2's ``attn.c_proj``, ``mlp.up_proj`` its ``mlp.c_fc``, ...);
``mlp.gate_proj`` exists only on gated MLPs, and neither it nor ``mlp.up_proj`` where the two are one
fused linear (Phi-3). A weight delta (``pysteer.WeightDelta``) acts at a linear's ``out`` site and
reads the linear's input there (``SiteKind.with_input``).

On Gemma 2/3 ``attn.out`` and ``mlp.out`` are taken before the post-attention / post-feedforward norms
(they are the projections' outputs); ``resid`` is always what the layer hands to the next one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .specs import ArchSpec, ModelGeometry, geometry, get_spec, get_submodule

log = logging.getLogger("pysteer")


@dataclass(frozen=True)
class SiteKind:
    """One kind of site, as data.

    Attributes:
        module: the module, given the architecture spec: a path relative to the decoder layer
            (``""``: the layer itself), or ``EMBEDDING`` for the model's input embedding; ``None``
            where the architecture has no such module.
        pre: the tensor is the module's input (else its output).
        shape: ``(heads, head width)`` of the site tensor's last dim, from the geometry.
        fused: the fused module that computes this tensor where ``module`` is ``None`` (named in the error).
        with_input: an output site whose hook also hands the module's input to the interventions
            there (``TokenContext.site_input``): the output of a linear, where a weight delta reads it.
    """

    module: Callable[[ArchSpec], str | None]
    pre: bool
    shape: Callable[[ModelGeometry], tuple[int, int]]
    fused: Callable[[ArchSpec], str | None] = lambda spec: None
    with_input: bool = False


EMBEDDING = "<input embeddings>"


def _model_width(geo: ModelGeometry) -> tuple[int, int]:
    return 1, geo.d_model


def _qkv_fused(spec: ArchSpec) -> str | None:
    return spec.fused_qkv


def _mlp_width(geo: ModelGeometry) -> tuple[int, int]:
    return 1, geo.d_mlp


@dataclass(frozen=True)
class Linear:
    """A named linear of a decoder layer, as data: its module path, its input and output widths, and
    the fused module that replaces it on architectures without it."""

    module: Callable[[ArchSpec], str | None]
    in_shape: Callable[[ModelGeometry], tuple[int, int]]
    out_shape: Callable[[ModelGeometry], tuple[int, int]]
    fused: Callable[[ArchSpec], str | None] = lambda spec: None


LINEARS: dict[str, Linear] = {
    "mlp.gate_proj": Linear(lambda s: s.mlp_gate_proj, _model_width, _mlp_width, lambda s: s.fused_gate_up),
    "mlp.up_proj": Linear(lambda s: s.mlp_up_proj, _model_width, _mlp_width, lambda s: s.fused_gate_up),
    "mlp.down_proj": Linear(lambda s: s.mlp_out_proj, _mlp_width, _model_width),
    "attn.o_proj": Linear(lambda s: s.attn_out_proj, lambda g: (g.n_heads, g.head_dim), _model_width),
}


def _linear_sites() -> dict[str, SiteKind]:
    """``{linear}.in`` and ``{linear}.out`` for every entry of ``LINEARS``."""
    out = {}
    for name, lin in LINEARS.items():
        out[f"{name}.in"] = SiteKind(lin.module, pre=True, shape=lin.in_shape, fused=lin.fused)
        out[f"{name}.out"] = SiteKind(
            lin.module, pre=False, shape=lin.out_shape, fused=lin.fused, with_input=True
        )
    return out


SITE_TABLE: dict[str, SiteKind] = {
    "embed": SiteKind(lambda spec: EMBEDDING, pre=False, shape=_model_width),
    "resid_pre": SiteKind(lambda spec: "", pre=True, shape=_model_width),
    "attn.q": SiteKind(
        lambda spec: spec.q_proj, pre=False, shape=lambda g: (g.n_heads, g.head_dim), fused=_qkv_fused
    ),
    "attn.k": SiteKind(
        lambda spec: spec.k_proj, pre=False, shape=lambda g: (g.n_kv_heads, g.head_dim), fused=_qkv_fused
    ),
    "attn.v": SiteKind(
        lambda spec: spec.v_proj, pre=False, shape=lambda g: (g.n_kv_heads, g.head_dim), fused=_qkv_fused
    ),
    "attn.heads": SiteKind(
        lambda spec: spec.attn_out_proj, pre=True, shape=lambda g: (g.n_heads, g.head_dim)
    ),
    "attn.out": SiteKind(lambda spec: spec.attn_out_proj, pre=False, shape=_model_width),
    "mlp.hidden": SiteKind(lambda spec: spec.mlp_out_proj, pre=True, shape=lambda g: (1, g.d_mlp)),
    "mlp.out": SiteKind(lambda spec: spec.mlp, pre=False, shape=_model_width),
    "resid": SiteKind(lambda spec: "", pre=False, shape=_model_width),
    **_linear_sites(),
}
SITE_KINDS = tuple(SITE_TABLE)
LAYER_FREE_KINDS = ("embed",)  # sites named without a layer
_SITE_RE = re.compile(r"^(?:layers\.)?(\d+)\.(" + "|".join(re.escape(k) for k in SITE_KINDS) + r")$")


@dataclass(frozen=True, order=True)
class Site:
    """A site: ``layer`` is -1 for the layer-free kinds (``embed``)."""

    layer: int
    kind: str

    @property
    def name(self) -> str:
        return self.kind if self.kind in LAYER_FREE_KINDS else f"layers.{self.layer}.{self.kind}"

    def __str__(self) -> str:
        return self.name


def parse_site(site: str | Site) -> Site:
    """Parse ``"embed"`` or ``"layers.{i}.{kind}"`` (``kind`` in ``SITE_KINDS``); raises ``ValueError``."""
    if isinstance(site, Site):
        return site
    text = str(site).strip()
    if text in LAYER_FREE_KINDS:
        return Site(-1, text)
    m = _SITE_RE.match(text)
    if not m or m.group(2) in LAYER_FREE_KINDS:
        raise ValueError(
            f"unknown site {site!r}: expected 'embed' or 'layers.<i>.<kind>' with kind one of "
            f"{', '.join(k for k in SITE_KINDS if k not in LAYER_FREE_KINDS)}"
        )
    return Site(int(m.group(1)), m.group(2))


def site_shape(site: Site, geo: ModelGeometry) -> tuple[int, int]:
    """``(heads, head width)`` of ``site``'s last dim (``heads == 1`` for unheaded sites)."""
    return SITE_TABLE[site.kind].shape(geo)


@dataclass(frozen=True)
class ResolvedSite:
    site: Site
    module: nn.Module
    pre: bool  # True: the tensor is the module's first positional input; False: its (first) output
    width: int  # last dim of the site tensor
    n_heads: int  # H of the [T, H, D] view (1 for unheaded sites)


def resolve_site(model: nn.Module, site: str | Site, spec: ArchSpec | None = None) -> ResolvedSite:
    """Find the module and hook point of ``site`` on ``model``; raises on unknown layers and on kinds
    the architecture does not have."""
    spec = spec or get_spec(model)
    s = parse_site(site)
    geo = geometry(model, spec)
    kind = SITE_TABLE[s.kind]
    path = kind.module(spec)
    if path is None:
        model_type = getattr(model.config, "model_type", "?")
        fused_path = kind.fused(spec)
        fused = f" (it computes it in one fused projection, {fused_path})" if fused_path else ""
        raise ValueError(f"site {s.name}: {model_type} has no separate {s.kind} tensor{fused}")
    H, D = kind.shape(geo)
    if path == EMBEDDING:
        return ResolvedSite(s, model.get_input_embeddings(), kind.pre, H * D, H)
    if not 0 <= s.layer < geo.n_layers:
        raise ValueError(f"site {s.name}: layer {s.layer} out of range, model has {geo.n_layers} layers")
    layer = get_submodule(model, spec.layers)[s.layer]
    return ResolvedSite(s, get_submodule(layer, path), kind.pre, H * D, H)


_HOOK_GUARDS_ON = False


def guard_hooks_in_compiled_graphs() -> None:
    """Make ``torch.compile`` see hooks added or removed after a model was compiled.

    By default Dynamo does not guard on module hooks: a model compiled before ``pysteer.steer``
    kept running its old graph, unsteered, and one compiled while steered kept steering after
    ``remove()``. The first time pysteer installs a hook it turns those guards on for the process
    and drops the graphs compiled without them (once), so every compiled model recompiles when its
    hooks change, and never again after that for an in-place change of strength or rows.
    """
    global _HOOK_GUARDS_ON
    if _HOOK_GUARDS_ON:
        return
    import torch._dynamo
    import torch._dynamo.config as dynamo_config

    if dynamo_config.skip_nnmodule_hook_guards:
        dynamo_config.skip_nnmodule_hook_guards = False
        torch._dynamo.reset()
        log.info(
            "pysteer: torch.compile now guards on module hooks (graphs compiled before were dropped once), "
            "so compiled models follow steering and tracing hooks as they are added and removed"
        )
    _HOOK_GUARDS_ON = True


def install_site_hook(
    resolved: ResolvedSite,
    fn: Callable[..., Tensor | None],
    *,
    prepend: bool = False,
    with_input: bool = False,
) -> RemovableHandle:
    """Run ``fn`` on the site tensor ``[B, S, width]``; a returned tensor replaces it.

    Per-instance module hooks (no class patching); ``torch.compile`` inlines them. Steering
    installs its hooks with ``prepend=True`` so that hooks added normally (tracing) see the
    steered tensor. With ``with_input=True`` (an output site), ``fn(output, module_input)`` also
    gets the module's first input: what a weight delta on a linear reads.
    """
    guard_hooks_in_compiled_graphs()
    if resolved.pre:

        def pre_hook(module, args, kwargs):
            # the site tensor is the first argument, positional or (a decoder layer's) hidden_states=
            if args:
                out = fn(args[0])
                return None if out is None else ((out, *args[1:]), kwargs)
            out = fn(kwargs["hidden_states"])
            return None if out is None else (args, {**kwargs, "hidden_states": out})

        return resolved.module.register_forward_pre_hook(pre_hook, prepend=prepend, with_kwargs=True)

    if with_input:

        def post_hook_with_input(module, args, kwargs, output):
            inp = args[0] if args else kwargs["hidden_states"]
            if isinstance(output, tuple):
                out = fn(output[0], inp)
                return None if out is None else (out, *output[1:])
            return fn(output, inp)

        return resolved.module.register_forward_hook(post_hook_with_input, prepend=prepend, with_kwargs=True)

    def post_hook(module, args, output):
        if isinstance(output, tuple):
            out = fn(output[0])
            return None if out is None else (out, *output[1:])
        out = fn(output)
        return out

    return resolved.module.register_forward_hook(post_hook, prepend=prepend)
