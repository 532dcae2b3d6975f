"""Replay the frozen layers below a trainable edit instead of recomputing them.

Training an intervention at layer ``L`` of a frozen model (LoReFT, activation scalars, JoLA gates)
runs the same batches through the same layers ``0..L-1`` epoch after epoch, and their output never
changes. :class:`FrozenPrefix` keys each batch by the exact tensor arguments of the first layer
(the token embeddings, the mask, the positions), stores the output of layer ``L-1`` the first time,
and on a repeat makes the prefix layers return it without computing anything. Below a layer-15 edit
of a 30-layer model that removes half of the forward.

It replays only when doing so cannot change a result:

- every prefix parameter is frozen (``requires_grad=False``) and unchanged since the entry was
  stored (tensor version counters, so an in-place edit such as folding invalidates it);
- no dropout is active in the prefix;
- nothing observes the prefix: no forward hook or pre-hook on a prefix module (a trace, a steering
  site below ``L``), no global module hook. The one exception is a forward hook on the last prefix
  layer itself (a ``layers.{L-1}.resid`` steering site or trace): it runs on the replayed output,
  exactly as on the computed one;
- gradients are enabled (a training forward). Under ``torch.no_grad()``, as in ``generate()``, the
  prefix always runs, so a KV cache is always complete. A replayed training forward leaves the
  prefix layers' entries of its own KV cache empty: do not decode from it.

Otherwise the forward simply runs the prefix (and stores nothing). ``stats`` counts hits, misses and
bypasses; entries beyond ``max_bytes`` are evicted least recently used first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .models.specs import get_spec, get_submodule, unwrap_model

__all__ = ["FrozenPrefix"]

_SCALARS = (bool, int, float, str, type(None))


@dataclass
class _Entry:
    output: Tensor  # the last prefix layer's hidden-state output
    extras: list[tuple | None]  # per prefix layer: the non-hidden elements of its output, None for a tensor
    nbytes: int


def _fingerprint(h: hashlib.blake2b, value) -> None:
    """Feed ``value`` into ``h``: tensors by shape, dtype, device and bytes, sequences item by item,
    scalars by ``repr``; any other object (a KV cache) does not change what the prefix computes."""
    if isinstance(value, Tensor):
        t = value.detach()
        h.update(f"T{tuple(t.shape)}{t.dtype}{t.device.type}".encode())
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, (tuple, list)):
        h.update(f"S{len(value)}".encode())
        for v in value:
            _fingerprint(h, v)
    elif isinstance(value, _SCALARS):
        h.update(repr(value).encode())


def _transformers_collecting() -> bool:
    """Whether transformers (5.x) is recording per-layer outputs in this forward
    (``output_hidden_states`` / ``output_attentions``); True when that cannot be read."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return True
    collector = _active_collector.get()  # {} while a forward records nothing
    return collector is None or not isinstance(collector, dict) or bool(collector)


def _live_hooks(hooks) -> bool:
    """Whether any of a module's forward hooks can see the module's output. transformers 5 leaves
    its output-capturing hooks installed after an ``output_hidden_states`` call; they only act while
    it records, so they count only then."""
    foreign = [h for h in hooks.values() if not getattr(h, "__module__", "").startswith("transformers.")]
    return bool(foreign) or (len(foreign) < len(hooks) and _transformers_collecting())


class FrozenPrefix:
    """Replay layers ``[0, upto)`` of ``model`` on batches seen before (a context manager).

    Args:
        model: a supported Hugging Face causal LM.
        upto: the first layer that runs normally; layers below it are replayed on a repeat.
        max_bytes: memory for stored outputs; least recently used entries are evicted.

    Raises:
        ValueError: ``upto`` is outside ``1..num_layers``, or a prefix parameter requires grad.
    """

    def __init__(self, model: nn.Module, upto: int, max_bytes: int = 2 << 30):
        model = unwrap_model(model)
        self.layers = get_submodule(model, get_spec(model).layers)
        if not isinstance(upto, int) or not 1 <= upto <= len(self.layers):
            raise ValueError(f"FrozenPrefix: upto={upto!r} must be a layer index in 1..{len(self.layers)}")
        self.upto = upto
        self.max_bytes = int(max_bytes)
        embed = model.get_input_embeddings()
        self.modules = [embed, *self.layers[:upto]]
        self.params = [p for m in self.modules for p in m.parameters()]
        trainable = [n for m in self.modules for n, p in m.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(
                f"FrozenPrefix: the layers below {upto} are not frozen ({len(trainable)} parameters require grad, "
                f"e.g. {trainable[0]!r}); freeze them (requires_grad_(False)) or start the prefix lower"
            )
        self.entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.bytes = 0
        self.stats = {"hits": 0, "misses": 0, "bypassed": 0}
        self._versions = self._param_versions()
        self._mode = "run"  # per forward: "run" (compute), "store" (compute and keep), "replay"
        self._key: bytes | None = None
        self._extras: list[tuple] = []
        self._entry: _Entry | None = None
        self._forwards: list = []  # the installed layer forwards (empty when not installed)
        self.install()

    # -- lifecycle -----------------------------------------------------------------------------
    def install(self) -> FrozenPrefix:
        if not self._forwards:
            self._forwards = [
                self._layer_forward(i, layer.forward) for i, layer in enumerate(self.layers[: self.upto])
            ]
            for layer, fn in zip(self.layers, self._forwards):
                layer.forward = fn  # an instance attribute: nothing class-level
        return self

    def remove(self) -> None:
        """Restore the layers' own forward and drop every stored output."""
        if self._forwards:
            for layer in self.layers[: self.upto]:
                del layer.forward
            self._forwards = []
        self.clear()

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def __enter__(self) -> FrozenPrefix:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- per forward ---------------------------------------------------------------------------
    def _param_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.params)

    def _observed(self) -> bool:
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return True
        if any(vars(layer).get("forward") is not fn for layer, fn in zip(self.layers, self._forwards)):
            return True  # something wrapped a prefix layer's forward (transformers 4.x output capture)
        last = self.layers[self.upto - 1]
        for top in self.modules:
            for m in top.modules():
                # forward hooks on the last prefix layer itself run on its replayed output (a
                # steering site at that layer's output, a trace of it); any other hook needs the
                # prefix computed
                if m._forward_pre_hooks or (m is not last and _live_hooks(m._forward_hooks)):
                    return True
                if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                    return True
        return any(p.requires_grad for p in self.params)

    def _begin(self, args, kwargs) -> None:
        """At layer 0: decide whether this forward replays, stores or just runs."""
        self._mode, self._key, self._entry, self._extras = "run", None, None, []
        if not torch.is_grad_enabled() or self._observed():
            self.stats["bypassed"] += 1
            return
        versions = self._param_versions()
        if versions != self._versions:  # a prefix weight changed in place: nothing stored is valid
            self.clear()
            self._versions = versions
        h = hashlib.blake2b(digest_size=20)
        _fingerprint(h, args)
        _fingerprint(h, sorted(kwargs.items(), key=lambda kv: kv[0]))
        self._key = h.digest()
        entry = self.entries.get(self._key)
        if entry is None:
            self._mode = "store"
            self.stats["misses"] += 1
        else:
            self.entries.move_to_end(self._key)
            self._mode, self._entry = "replay", entry
            self.stats["hits"] += 1

    def _layer_forward(self, i: int, forward):
        last = self.upto - 1

        def run(*args, **kwargs):
            if i == 0:
                self._begin(args, kwargs)
            if self._mode == "replay":
                hidden = (
                    self._entry.output.clone()
                    if i == last
                    else (args[0] if args else kwargs["hidden_states"])
                )
                extras = self._entry.extras[i]
                return (hidden, *extras) if extras is not None else hidden
            out = forward(*args, **kwargs)
            if self._mode == "store":
                self._record(i, out, last)
            return out

        return run

    def _record(self, i: int, out, last: int) -> None:
        if isinstance(out, Tensor):
            self._extras.append(None)
            hidden = out
        elif (
            isinstance(out, tuple)
            and out
            and isinstance(out[0], Tensor)
            and not any(isinstance(x, Tensor) for x in out[1:])
        ):
            self._extras.append(tuple(out[1:]))
            hidden = out[0]
        else:  # attention weights or another tensor beside the hidden state: do not store
            self._mode = "run"
            return
        if i == last:
            output = hidden.detach().clone()
            entry = _Entry(output, self._extras, output.numel() * output.element_size())
            self.entries[self._key] = entry
            self.bytes += entry.nbytes
            while self.bytes > self.max_bytes and len(self.entries) > 1:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.nbytes
            self._mode = "run"

    def __repr__(self) -> str:
        return (
            f"FrozenPrefix(upto={self.upto}, entries={len(self.entries)}, bytes={self.bytes}, "
            f"stats={self.stats})"
        )
