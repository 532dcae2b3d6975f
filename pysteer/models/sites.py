"""Sites: named points in a decoder layer where interventions act and activations are traced.

| site                  | tensor                      | hook point                                   |
|-----------------------|-----------------------------|----------------------------------------------|
| ``layers.{i}.attn.heads`` | ``[B, S, H*D]`` head-major | input of the attention output projection     |
| ``layers.{i}.attn.out``   | ``[B, S, d_model]``        | output of that projection                    |
| ``layers.{i}.mlp.out``    | ``[B, S, d_model]``        | output of the MLP                            |
| ``layers.{i}.resid``      | ``[B, S, d_model]``        | output of the decoder layer (residual stream)|

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

from .specs import ArchSpec, geometry, get_spec, get_submodule

log = logging.getLogger("pysteer")

SITE_KINDS = ("attn.heads", "attn.out", "mlp.out", "resid")
_SITE_RE = re.compile(r"^(?:layers\.)?(\d+)\.(attn\.heads|attn\.out|mlp\.out|resid)$")


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    kind: str

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{self.kind}"

    def __str__(self) -> str:
        return self.name


def parse_site(site: str | Site) -> Site:
    """Parse ``"layers.{i}.{kind}"`` (``kind`` in ``SITE_KINDS``); raises ``ValueError`` naming the problem."""
    if isinstance(site, Site):
        return site
    m = _SITE_RE.match(str(site).strip())
    if not m:
        raise ValueError(
            f"unknown site {site!r}: expected 'layers.<i>.<kind>' with kind one of {', '.join(SITE_KINDS)}"
        )
    return Site(int(m.group(1)), m.group(2))


@dataclass(frozen=True)
class ResolvedSite:
    site: Site
    module: nn.Module
    pre: bool  # True: the tensor is the module's first positional input; False: its (first) output
    width: int  # last dim of the site tensor
    n_heads: int  # H of the [T, H, D] view (1 for d_model sites)


def resolve_site(model: nn.Module, site: str | Site, spec: ArchSpec | None = None) -> ResolvedSite:
    """Find the module and hook point of ``site`` on ``model``; raises on unknown layers."""
    spec = spec or get_spec(model)
    s = parse_site(site)
    geo = geometry(model, spec)
    if not 0 <= s.layer < geo.n_layers:
        raise ValueError(f"site {s.name}: layer {s.layer} out of range, model has {geo.n_layers} layers")
    layer = get_submodule(model, spec.layers)[s.layer]
    if s.kind == "attn.heads":
        return ResolvedSite(s, get_submodule(layer, spec.attn_out_proj), True, geo.n_heads * geo.head_dim, geo.n_heads)
    if s.kind == "attn.out":
        return ResolvedSite(s, get_submodule(layer, spec.attn_out_proj), False, geo.d_model, 1)
    if s.kind == "mlp.out":
        return ResolvedSite(s, get_submodule(layer, spec.mlp), False, geo.d_model, 1)
    return ResolvedSite(s, layer, False, geo.d_model, 1)


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
    resolved: ResolvedSite, fn: Callable[[Tensor], Tensor | None], *, prepend: bool = False
) -> RemovableHandle:
    """Run ``fn`` on the site tensor ``[B, S, width]``; a returned tensor replaces it.

    Per-instance module hooks (no class patching); ``torch.compile`` inlines them. Steering
    installs its hooks with ``prepend=True`` so that hooks added normally (tracing) see the
    steered tensor.
    """
    guard_hooks_in_compiled_graphs()
    if resolved.pre:

        def pre_hook(module, args):
            out = fn(args[0])
            if out is None:
                return None
            return (out, *args[1:])

        return resolved.module.register_forward_pre_hook(pre_hook, prepend=prepend)

    def post_hook(module, args, output):
        if isinstance(output, tuple):
            out = fn(output[0])
            return None if out is None else (out, *output[1:])
        out = fn(output)
        return out

    return resolved.module.register_forward_hook(post_hook, prepend=prepend)
