"""What pysteer reads from a Hugging Face forward call, found by type where a release can rename it.

transformers renames forward arguments between releases: 5.24 renamed the decoder's
``past_key_values`` to ``cache`` and stopped handing ``cache_position`` to the base model. A hook
that looked for the old names found neither, took every decode step of ``generate()`` for the
first forward of a new prompt, and steered the wrong tokens without an error. So:

- the KV cache is found **by type** among the call's arguments (any ``transformers`` ``Cache``, or
  an object with ``get_seq_length``), whatever the argument is called;
- the tokens already in the cache come from that cache, and ``cache_position`` is only a shortcut
  where a release still passes it;
- a call that shows a past (an attention mask longer than its input) but carries no cache pysteer
  recognises raises :class:`ForwardArgumentsError` naming the transformers version, instead of
  guessing 0;
- the few names that have never changed (``input_ids``, ``inputs_embeds``, ``attention_mask``) are
  read here and nowhere else, and ``tests/test_transformers_guard.py`` fails with a readable message
  when a release changes them.

The same module says which keyword a model's forward takes its cache under
(:func:`cache_keyword`), for the calls pysteer makes itself (the fast path).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

# Newest first: the keyword a causal LM's forward takes the KV cache under, per transformers line.
CACHE_KEYWORDS = ("cache", "past_key_values")


class ForwardArgumentsError(RuntimeError):
    """A forward call whose arguments pysteer cannot read (an unsupported transformers release)."""


def transformers_version() -> str:
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is a dependency
        return "not installed"
    return transformers.__version__


_CACHE_TYPES: tuple[type, ...] | None = None


def tested_transformers() -> tuple[str, str | None, bool | None]:
    """``(installed version, tested range, inside it)`` for transformers.

    The range is pysteer's own requirement on transformers (pyproject's ``dependencies``, read from
    the installed package's metadata), so it is stated once; ``None`` where pysteer runs from a tree
    that was never installed.
    """
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    installed = transformers_version()
    try:
        requirements = importlib.metadata.requires("pysteer") or []
    except importlib.metadata.PackageNotFoundError:
        return installed, None, None
    for line in requirements:
        req = Requirement(line)
        if req.name == "transformers" and not req.marker:
            spec = str(req.specifier)
            try:
                return installed, spec, req.specifier.contains(Version(installed), prereleases=True)
            except ValueError:
                return installed, spec, None
    return installed, None, None


def _cache_types() -> tuple[type, ...]:
    global _CACHE_TYPES
    if _CACHE_TYPES is None:
        try:
            from transformers.cache_utils import Cache

            _CACHE_TYPES = (Cache,)
        except ImportError:  # pragma: no cover - a transformers without cache classes
            _CACHE_TYPES = ()
    return _CACHE_TYPES


def _is_cache(value: Any) -> bool:
    if value is None or isinstance(value, (Tensor, bool, int, float, str)):
        return False
    return isinstance(value, _cache_types()) or callable(getattr(value, "get_seq_length", None))


def _is_legacy_cache(value: Any) -> bool:
    """The tuple-of-(key, value) cache of transformers 4.x: ``((k, v), ...)`` with k ``[B, KVH, S, D]``."""
    return (
        isinstance(value, (tuple, list))
        and len(value) > 0
        and isinstance(value[0], (tuple, list))
        and len(value[0]) >= 2
        and isinstance(value[0][0], Tensor)
        and value[0][0].dim() == 4
    )


def find_cache(args: tuple, kwargs: dict) -> Any | None:
    """The KV cache among a forward call's arguments, by type; ``None`` when the call carries none."""
    for value in list(kwargs.values()) + list(args):
        if _is_cache(value) or _is_legacy_cache(value):
            return value
    return None


def input_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    """``input_ids`` ``[B, S]`` or, failing that, ``inputs_embeds`` ``[B, S, d]`` of a forward call."""
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    return ids if isinstance(ids, Tensor) and ids.dim() >= 2 else None


def attention_mask_2d(args: tuple, kwargs: dict) -> Tensor | None:
    """The ``[B, past + S]`` padding mask of a forward call, when it got one (4-D masks are not read)."""
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
        mask = args[1]
    return mask if isinstance(mask, Tensor) and mask.dim() == 2 else None


def past_length(module: nn.Module, args: tuple, kwargs: dict, seq_len: int) -> int | Tensor:
    """Tokens already in the KV cache when this forward call starts.

    A Python int, or a 0-dim tensor for caches that count in tensors (static caches), so the caller
    neither synchronises with the device nor breaks a compiled graph.

    Raises:
        ForwardArgumentsError: the call's attention mask is longer than its input (so there is a
            past) but no argument is a cache pysteer recognises.
    """
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, Tensor) and cache_position.numel():
        return cache_position[0]
    cache = find_cache(args, kwargs)
    if cache is not None:
        if _is_legacy_cache(cache):
            return int(cache[0][0].shape[-2])
        return cache.get_seq_length()
    mask = attention_mask_2d(args, kwargs)
    if mask is not None and mask.shape[-1] > seq_len:
        raise ForwardArgumentsError(
            f"pysteer cannot tell how many tokens the KV cache holds in this forward call of "
            f"{type(module).__name__}: its attention mask covers {mask.shape[-1]} tokens for {seq_len} input "
            f"tokens, but none of its arguments ({', '.join(sorted(kwargs)) or 'none'}) is a cache pysteer "
            f"recognises. transformers {transformers_version()} may pass the cache in a way this pysteer "
            f"version does not know; `pysteer info` shows the tested transformers range."
        )
    return 0


def reports_hidden_states(module: nn.Module, kwargs: dict) -> bool:
    """Whether a decoder-stack forward call will return ``hidden_states`` (the keyword, else the
    model's config)."""
    flag = kwargs.get("output_hidden_states")
    if flag is None:
        flag = getattr(getattr(module, "config", None), "output_hidden_states", False)
    return bool(flag)


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache under (``cache`` since transformers 5.24).

    Raises:
        ForwardArgumentsError: the forward takes none of the known keywords.
    """
    params = inspect.signature(model.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise ForwardArgumentsError(
        f"{type(model).__name__}.forward takes its KV cache under none of {CACHE_KEYWORDS} "
        f"(transformers {transformers_version()}; it takes {', '.join(params)}); "
        "`pysteer info` shows the tested transformers range"
    )


__all__ = [
    "CACHE_KEYWORDS",
    "ForwardArgumentsError",
    "attention_mask_2d",
    "cache_keyword",
    "find_cache",
    "input_tensor",
    "past_length",
    "tested_transformers",
    "transformers_version",
]
