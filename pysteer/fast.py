"""The managed fast path: static KV cache, a compiled decode step, steering updated in place.

``pysteer.generate(model, inputs, steering=..., max_new_tokens=...)`` owns a static KV cache per
(batch bucket, cache-length bucket), runs the prefill eagerly and the decode step through
``torch.compile`` (CUDA graphs with ``"reduce-overhead"`` on GPU, plain inductor on CPU), pads
batches to buckets, and samples on the device. Everything the compiled step reads that can change
between calls is a fixed-address tensor updated in place: the steering tables, the per-row config
index, the position-rule encoding, the token, position and attention-mask buffers. So changing
strength, directions, positions or the per-request configs of a batch neither recompiles nor
re-records a CUDA graph; only a new bucket or a new steered site compiles.

Two things keep the compiled step lean: grouped-query models using ``sdpa`` attend per key/value
head during decode steps (``pysteer.models.attention``) instead of copying the cache per query
head, and sliding-window layers get full-length static buffers (their Python token counters would
otherwise recompile every step; the model's sliding mask still drops old tokens). Only the first
decode step of a call runs Dynamo's full guard check.

Sampling N answers per prompt (``num_return_sequences``) prefills each prompt once and copies its
KV cache to its N decode rows; every token comes with its log-probability. ``taps=`` records sites
at the last prompt token and the second-last generated token from inside the same forwards, and an
``abstain=`` probe scores the prefill's taps so that uncertain prompts are never decoded
(``pysteer.taps``).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
import types
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .interventions import finite_number, is_affine, is_intervention
from .models.attention import decode_attention
from .models.forward_args import cache_keyword
from .models.sites import Site
from .steering import SteeringHandle, reserve_tables, runtime, steer
from .taps import TAP_POSITIONS, TapRecorder, check_abstain, probe_scores, tap_sites

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LENGTH_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
STOP_CHECK_EVERY = 8  # decode steps between host checks of "every row finished" (each check syncs)


def _bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")


@dataclass
class GenerationResult:
    """Output of ``pysteer.generate``.

    Attributes:
        tokens: per request, the generated token ids (stop token included, nothing after it).
        texts: decoded ``tokens`` when a tokenizer is known, else None.
        prompt_tokens: per request, the prompt ids.
        seconds: wall time of prefill + decode.
        decode_seconds: wall time of the decode loop alone.
        steps: decode steps run.
        logprobs: per output row, the log-probability of each token in ``tokens`` under the
            distribution it was drawn from: the log-softmax of the logits after temperature, top-k
            and top-p (what Hugging Face's ``compute_transition_scores(..., normalize_logits=True)``
            returns from ``output_scores``, as the semantic-entropy reference code reads them);
            greedy: the log-softmax of the raw logits.
        samples_per_prompt: ``num_return_sequences``; output row ``r`` is sample ``r % N`` of
            prompt ``r // N`` (rows grouped per prompt, see ``groups``).
        abstained: per output row, whether the abstain gate skipped it (no tokens); all False
            without a gate.
        abstain_scores: per prompt, the gate's probe score (None without a gate).
        taps: ``{position: {site name: Tensor[rows, width]}}`` for the positions of
            ``pysteer.taps.TAP_POSITIONS`` (None without taps); abstained rows are NaN at
            ``"second_last_generated"``.
    """

    tokens: list[list[int]]
    texts: list[str] | None
    prompt_tokens: list[list[int]]
    seconds: float
    decode_seconds: float
    steps: int
    compile_seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    logprobs: list[list[float]] = field(default_factory=list)
    samples_per_prompt: int = 1
    abstained: list[bool] = field(default_factory=list)
    abstain_scores: list[float] | None = None
    taps: dict[str, dict[str, Tensor]] | None = None

    @property
    def tokens_per_second(self) -> float:
        n = sum(len(t) for t in self.tokens)
        return n / self.seconds if self.seconds > 0 else float("nan")

    def groups(self, attribute: str = "tokens") -> list[list]:
        """``attribute`` (``"tokens"``, ``"texts"``, ``"logprobs"``) split into one list of samples per prompt."""
        values, n = getattr(self, attribute), self.samples_per_prompt
        return [values[i : i + n] for i in range(0, len(values), n)]


class _CacheSlot:
    """One (batch bucket, cache-length bucket): its static KV cache, the fixed-address token,
    position and mask buffers its compiled decode step reads, and that compiled step."""

    def __init__(self, gen: FastGenerator, batch: int, length: int):
        model = gen.model
        dev = gen.device
        self.batch, self.length = batch, length
        self.cache = _make_static_cache(model, length)
        self.mask = torch.ones(batch, length, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.valid = torch.ones(batch, 1, dtype=torch.bool, device=dev)
        self.prompt_len = torch.zeros(batch, dtype=torch.long, device=dev)
        self.positions = (self.pos, self.valid, self.prompt_len)  # what decode steps supply to steering
        self.live = torch.ones(batch, 1, dtype=torch.bool, device=dev)  # rows still generating (taps)
        self.tap_buffers: list[Tensor] = []  # per tapped site [batch, width], see TapRecorder
        self.tap_sites: tuple[Site, ...] = ()
        self.compiled = False
        # Later decode steps of a call may skip Dynamo's full guard check only when nothing the
        # graph specialised on changes between steps.
        self.trusted_steps = _tensor_state_only(self.cache)
        self.fn = None  # compiled decode step (own code object), see FastGenerator._fresh_compiled_step
        self.code = None
        self.hooks = None  # the model's hook set when ``fn`` was made
        if dev.type == "cuda":
            for t in (self.mask, self.tokens, self.pos, self.valid, self.prompt_len, self.live):
                torch._dynamo.mark_static_address(t)

    def tap_buffers_for(self, recorder: TapRecorder, widths: list[int], dtype: torch.dtype) -> list[Tensor]:
        """Fixed-address decode buffers for the recorder's sites (made once per site set)."""
        if self.tap_sites != recorder.sites:
            dev = self.mask.device
            self.tap_buffers = [torch.zeros(self.batch, w, dtype=dtype, device=dev) for w in widths]
            if dev.type == "cuda":
                for t in self.tap_buffers:
                    torch._dynamo.mark_static_address(t)
            self.tap_sites = recorder.sites
        return self.tap_buffers


@dataclass
class _GenerateCall:
    """One ``generate``/``stream`` call: its prompts, cache slot, steering and stop rules (set by
    ``FastGenerator._start``), and what it produced (filled by ``FastGenerator._steps``, read by
    ``FastGenerator._result``).

    The prefill runs once per prompt in ``slot``; ``FastGenerator._fan_out`` then gives each decoded
    prompt ``samples`` rows (its prompt cache copied to them) and points ``slot`` at the decode slot.
    """

    prompts: list[list[int]]
    prompt_width: int  # S: the longest prompt, the left-padded width of the prefill
    slot: _CacheSlot
    handle: SteeringHandle | None
    max_new_tokens: int
    sampling: tuple  # (do_sample, temperature, top_p, top_k, generator): FastGenerator._sample's arguments
    stop_ids: Tensor
    text_stops: list[str]
    pad: int
    samples: int = 1  # num_return_sequences
    taps: list[Site] = field(default_factory=list)
    abstain: tuple | None = None  # (probe, threshold, probe sites)
    finished: Tensor | None = None  # [B] bool per decode row: the row has emitted a stop token
    source_rows: Tensor | None = None  # [B] prompt of each decode row (padding rows: the first one's)
    out_rows: list[int] = field(default_factory=list)  # output row of each real decode row
    scores: Tensor | None = None  # [n] abstain scores
    tokens: list[Tensor] = field(default_factory=list)  # one [B] tensor per step, prefill's first
    logprobs: list[Tensor] = field(default_factory=list)  # one [B] tensor per step
    steps: int = 0  # decode steps run
    t0: float = 0.0
    t_dec: float = 0.0
    seconds: float = 0.0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0

    @property
    def n(self) -> int:
        return len(self.prompts)

    @property
    def rows(self) -> int:
        """Real (decoded) rows of the decode batch."""
        return len(self.out_rows)

    def accept(self, tok: Tensor, logprob: Tensor) -> None:
        """Take a step's sampled tokens: stopped rows emit padding; feed them to the next step."""
        tok = torch.where(self.finished, self.pad, tok)
        self.finished |= torch.isin(tok, self.stop_ids)
        self.slot.tokens[:, 0].copy_(tok)
        self.slot.live.copy_(~self.finished[:, None])
        self.tokens.append(tok)
        self.logprobs.append(logprob)

    def host_tokens(self) -> list[int]:
        return [int(t) for t in self.tokens[-1][: self.rows].tolist()]

    def all_stopped(self, step: int) -> bool:
        """Every request has stopped; checked every ``STOP_CHECK_EVERY`` steps (each check syncs)."""
        return step % STOP_CHECK_EVERY == 0 and bool(self.finished[: self.rows].all())

    def finish(self, compile_seconds: float) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.decode_seconds = time.perf_counter() - self.t_dec
        self.compile_seconds = compile_seconds


def _make_static_cache(model: nn.Module, length: int):
    from transformers import StaticCache

    # The same signature from 4.57 (the oldest supported line) to the newest tested release; the
    # layers allocate on first use, so batch, device and dtype come from the prefill.
    cache = StaticCache(config=model.config, max_cache_len=length)
    # Sliding-window and chunked layers keep a Python int of tokens seen, which Dynamo specialises
    # on: every decode step would recompile. A full-length static layer with the model's own
    # sliding-window mask computes the same attention (the mask, not the buffer, drops old tokens)
    # and keeps all of its state in tensors.
    from transformers import cache_utils

    sliding = getattr(cache_utils, "StaticSlidingWindowLayer", None)
    for i, layer in enumerate(cache.layers):
        if sliding is not None and isinstance(layer, sliding):
            cache.layers[i] = cache_utils.StaticLayer(max_cache_len=length)
    return cache


def _share_prompt_cache(src, dst, source_rows: Tensor, width: int) -> None:
    """Copy the prompt keys and values (the first ``width`` positions) of rows ``source_rows`` of
    the static cache ``src`` into the rows of ``dst``: each prompt is prefilled once and its cache
    handed to its samples. Positions past the prompt need no clearing: every decode step writes its
    own position before attending to it, and the causal mask hides the later ones."""
    for s_layer, d_layer in zip(src.layers, dst.layers):
        if not d_layer.is_initialized:
            _allocate_layer(d_layer, s_layer, len(source_rows))
        d_layer.keys[:, :, :width].copy_(s_layer.keys[:, :, :width].index_select(0, source_rows))
        d_layer.values[:, :, :width].copy_(s_layer.values[:, :, :width].index_select(0, source_rows))
        if isinstance(getattr(d_layer, "cumulative_length", None), Tensor):  # transformers >= 5: tokens seen
            d_layer.cumulative_length.copy_(s_layer.cumulative_length)


def _allocate_layer(layer, like, batch: int) -> None:
    """Allocate a static cache layer for ``batch`` rows shaped like the layer ``like``."""
    k = like.keys[:1, :, :1].expand(batch, -1, -1, -1)
    v = like.values[:1, :, :1].expand(batch, -1, -1, -1)
    # transformers 4.57 takes the keys only; 5.x the keys and the values
    takes_values = len(inspect.signature(layer.lazy_initialization).parameters) >= 2
    layer.lazy_initialization(*((k, v) if takes_values else (k,)))


def _hook_signature(model: nn.Module) -> tuple:
    """The forward hooks on the model and its modules (keys are unique per registration)."""
    from torch.nn.modules import module as M

    sig = [tuple(M._global_forward_pre_hooks), tuple(M._global_forward_hooks)]
    for mod in model.modules():
        if mod._forward_pre_hooks or mod._forward_hooks:
            sig.append((id(mod), tuple(mod._forward_pre_hooks), tuple(mod._forward_hooks)))
    return tuple(sig)


def _tensor_state_only(cache) -> bool:
    """True when the cache's per-step state is all tensors (updated in place), none Python numbers."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return False
    from transformers.cache_utils import StaticLayer

    return all(type(layer) is StaticLayer for layer in layers)


class FastGenerator:
    """Owns the static caches and the compiled decode step of one model.

    Args:
        model: a Hugging Face causal LM (eval mode).
        tokenizer: optional; needed for text inputs, stop strings and decoded outputs.
        compile: ``"auto"`` (``"reduce-overhead"`` on CUDA, inductor ``"default"`` on CPU), a
            ``torch.compile`` mode, or ``False`` for an eager decode step (still static cache).
        progress: print compile progress and times to stderr.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        compile: str | bool = "auto",
        progress: bool = True,
        compile_backend: str = "inductor",
    ):
        if compile is not False and compile not in COMPILE_MODES:
            raise ValueError(f"compile must be False or one of {COMPILE_MODES}, got {compile!r}")
        self.model = model
        self.tokenizer = tokenizer
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if compile == "auto":
            compile = "reduce-overhead" if self.device.type == "cuda" else "default"
        self.compile_mode = compile
        self.progress = progress
        self.slots: dict[tuple[int, int], _CacheSlot] = {}
        self.compile_seconds: dict[tuple[int, int], float] = {}
        self._managed: SteeringHandle | None = None
        self._call_handle: SteeringHandle | None = None  # non-affine steering of the running call
        self._managed_sites: frozenset[Site] = frozenset()
        self._recorder: TapRecorder | None = None  # taps and the abstain gate, kept across calls
        fwd = inspect.signature(model.forward).parameters
        self._logits_kw = (
            {"logits_to_keep": 1}
            if "logits_to_keep" in fwd
            else {"num_logits_to_keep": 1}
            if "num_logits_to_keep" in fwd
            else {}
        )
        self._pass_cache_position = "cache_position" in fwd
        self._cache_kw = cache_keyword(model)  # "cache" since transformers 5.24, "past_key_values" before
        if compile:
            import torch._dynamo.config as dcfg

            # one graph per (batch, length) bucket; the default limit of 8 would silently fall back to eager
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dcfg, name):
                    setattr(dcfg, name, max(getattr(dcfg, name), 64))
            mode = None if compile == "default" or compile_backend != "inductor" else compile
            self._compile_kw = dict(backend=compile_backend, mode=mode, dynamic=False)

    # -- running decode steps ---------------------------------------------------------------------
    def _fresh_compiled_step(self, slot: _CacheSlot) -> None:
        """Give the slot a compiled decode step on a code object of its own.

        Dynamo caches graphs per code object; with one per slot (and per hook set, see ``stream``)
        the cache holds the graphs of this model and bucket only, so skipping the guard check on
        later steps can never pick another model's or an older hook set's graph.
        """
        f = FastGenerator._decode_step
        code = f.__code__.replace(co_name=f"_decode_step_b{slot.batch}_l{slot.length}")
        fn = types.FunctionType(code, f.__globals__, code.co_name, f.__defaults__, f.__closure__)
        slot.code = code
        slot.fn = torch.compile(types.MethodType(fn, self), **self._compile_kw)

    def _run_step(self, slot: _CacheSlot, args: tuple, trusted: bool = False) -> Tensor:
        with decode_attention(self.model):
            if not self.compile_mode:
                return self._decode_step(*args)
            import torch._dynamo.config as dcfg

            # Dynamo does not guard on module hooks by default, so steering attached after the
            # first compile would silently be skipped; with the guards, a new hook set recompiles.
            with dcfg.patch(skip_nnmodule_hook_guards=False):
                if not trusted:
                    return slot.fn(*args)
                # Later steps of one call: only the guards that tell this code object's graphs
                # apart run (the full check costs ~3 ms a step on CPU for a 30-layer model).
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return slot.fn(*args)

    def _trust_later_steps(self, slot: _CacheSlot) -> bool:
        """Whether the later steps of this call may skip the full guard check: the cache keeps its
        state in tensors and the slot's code object holds exactly one graph."""
        if not self.compile_mode or not slot.trusted_steps:
            return False
        try:
            from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        except ImportError:  # no way to count the graphs: keep the full check
            return False
        return len(_debug_get_cache_entry_list(slot.code)) == 1

    # -- the step that gets compiled -------------------------------------------------------------
    def _decode_step(
        self, tokens: Tensor, pos: Tensor, mask: Tensor, cache, cache_position: Tensor | None
    ) -> Tensor:
        kw = dict(self._logits_kw)
        kw[self._cache_kw] = cache
        if cache_position is not None:
            kw["cache_position"] = cache_position
        out = self.model(input_ids=tokens, position_ids=pos, attention_mask=mask, use_cache=True, **kw)
        return out.logits[:, -1, :]

    # -- steering -------------------------------------------------------------------------------
    def release(self) -> None:
        """Remove the steering and taps this generator attached to the model (the next steered or
        tapped call recompiles)."""
        if self._managed is not None:
            self._managed.remove()
            self._managed, self._managed_sites = None, frozenset()
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    def _ready_recorder(self, sites: list[Site]) -> TapRecorder | None:
        """The tap recorder covering ``sites``; a new site set replaces it (the decode step then
        recompiles once), a subset or no taps keeps it attached."""
        rec = self._recorder
        if not sites or (rec is not None and rec.covers(sites)):
            return rec
        if rec is not None:
            rec.remove()
            sites = list(dict.fromkeys([*rec.sites, *sites]))
        self._recorder = TapRecorder(self.model, sites)
        return self._recorder

    def _resolve_steering(self, steering, n: int, batch: int) -> SteeringHandle | None:
        """Return the handle to use and set its per-row configs for a batch of ``n`` (padded to ``batch``)."""
        if steering is None:
            if self._managed is not None:
                self._managed.rows([None] * batch)
            return self._managed
        if isinstance(steering, SteeringHandle):
            if steering.removed:
                raise RuntimeError("generate: the steering handle was removed")
            if steering.mode != "dynamic":
                return None  # folded steering lives in the weights
            return steering
        per_request = _per_request(steering, n)
        if any(not is_affine(iv) for cfg in per_request if cfg for iv in cfg):
            return self._steer_for_call(per_request, batch)
        sites = frozenset(iv.site for cfg in per_request if cfg for iv in cfg)
        if self._managed is None or not sites <= self._managed_sites or self._managed.removed:
            if self._managed is not None and not self._managed.removed:
                self._managed.remove()
            all_sites = sites | self._managed_sites
            self._managed = reserve_tables(self.model, sorted(all_sites), capacity=1 + max(BATCH_BUCKETS))
            self._managed_sites = frozenset(all_sites)
        self._managed.rows(list(per_request) + [None] * (batch - n))
        return self._managed

    def _steer_for_call(self, per_request: list, batch: int) -> SteeringHandle:
        """Steering with non-affine interventions (SAE edits, scalars): a handle for this call only,
        one config per distinct request config, removed when the call ends."""
        configs: dict[str, list] = {}
        names = []
        for cfg in per_request:
            if not cfg:
                names.append(None)
                continue
            key = next(
                (k for k, v in configs.items() if len(v) == len(cfg) and all(a is b for a, b in zip(v, cfg))),
                None,
            )
            if key is None:
                key = f"request{len(configs)}"
                configs[key] = list(cfg)
            names.append(key)
        handle = steer(self.model, configs, mode="dynamic")
        handle.rows(names + [None] * (batch - len(names)))
        self._call_handle = handle
        return handle

    # -- generation -------------------------------------------------------------------------------
    def _encode(self, inputs) -> list[list[int]]:
        if isinstance(inputs, Tensor):
            if inputs.dim() == 1:
                inputs = inputs[None]
            return [row.tolist() for row in inputs]
        if isinstance(inputs, str):
            inputs = [inputs]
        if inputs and isinstance(inputs[0], str):
            if self.tokenizer is None:
                raise ValueError("generate: text inputs need a tokenizer")
            rows = [self.tokenizer(t, add_special_tokens=True)["input_ids"] for t in inputs]
        else:
            rows = [list(map(int, r)) for r in inputs]
        if not rows:
            raise ValueError("generate: no prompts given")
        empty = [i for i, r in enumerate(rows) if not r]
        if empty:
            raise ValueError(
                f"generate: prompt {empty[0]} is empty (no tokens); every request needs a prompt"
            )
        return rows

    def _stop_ids(self, stop, ignore_eos: bool = False) -> list[int]:
        ids: list[int] = []
        eos = getattr(self.model.generation_config, "eos_token_id", None) or getattr(
            self.model.config, "eos_token_id", None
        )
        if not ignore_eos:
            ids += [eos] if isinstance(eos, int) else list(eos or [])
        for s in [stop] if isinstance(stop, (str, int)) else list(stop or []):
            if isinstance(s, int):
                ids.append(s)
            elif self.tokenizer is not None:
                enc = self.tokenizer(s, add_special_tokens=False)["input_ids"]
                if len(enc) == 1:
                    ids.append(enc[0])
        return sorted(set(ids))

    # -- one call: set up, prefill, decode steps, result ----------------------------------------
    def _slot(self, batch: int, length: int) -> _CacheSlot:
        slot = self.slots.get((batch, length))
        if slot is None:
            slot = self.slots[(batch, length)] = _CacheSlot(self, batch, length)
        return slot

    def _start(
        self,
        inputs,
        steering,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop=None,
        seed: int | None = None,
        ignore_eos: bool = False,
        num_return_sequences: int = 1,
        taps=None,
        abstain=None,
        threshold: float = 0.5,
    ) -> _GenerateCall:
        """Check the arguments, pick the prefill's cache slot and the steering handle of one call
        (the arguments of ``generate``)."""
        _check_sampling(max_new_tokens, do_sample, temperature, top_p, top_k)
        _check_samples(num_return_sequences, do_sample)
        sites = tap_sites(self.model, taps)
        gate = None
        if abstain is not None:
            gate = (abstain, float(threshold), check_abstain(self.model, abstain, threshold))
        prompts = self._encode(inputs)
        n = len(prompts)
        B = _bucket(n, BATCH_BUCKETS, "batch size")
        _bucket(n * num_return_sequences, BATCH_BUCKETS, "prompts x num_return_sequences")
        S = max(map(len, prompts))
        L = _bucket(S + max_new_tokens, LENGTH_BUCKETS, "prompt + new tokens")
        slot = self._slot(B, L)
        self._ready_recorder(list(dict.fromkeys([*sites, *(gate[2] if gate else [])])))
        stop_ids = torch.tensor(self._stop_ids(stop, ignore_eos) or [-1], device=self.device)
        stops = [stop] if isinstance(stop, (str, int)) else list(stop or [])
        # last: a handle steered for this call is removed by _steps, so nothing may raise after it
        handle = self._resolve_steering(steering, n, B)
        if (
            isinstance(steering, SteeringHandle)
            and handle is not None
            and handle.assigned_rows not in (None, n)
        ):
            raise ValueError(
                f"generate: the handle's rows() cover {handle.assigned_rows} requests, the batch has {n}"
            )
        rng = torch.Generator(device=self.device)
        if seed is not None:
            rng.manual_seed(seed)
        elif do_sample:
            rng.seed()
        return _GenerateCall(
            prompts=prompts,
            prompt_width=S,
            slot=slot,
            handle=handle,
            max_new_tokens=max_new_tokens,
            sampling=(do_sample, temperature, top_p, top_k, rng),
            stop_ids=stop_ids,
            text_stops=[s for s in stops if isinstance(s, str)],
            pad=int(getattr(self.tokenizer, "pad_token_id", None) or 0),
            samples=num_return_sequences,
            taps=sites,
            abstain=gate,
        )

    def _load_prompts(self, call: _GenerateCall) -> tuple[Tensor, Tensor]:
        """Left-pad the prompts into the slot (padding rows repeat the first request and are
        discarded); reset its cache. Returns the prompt ids and mask ``[B, S]``."""
        slot, prompts, n, S = call.slot, call.prompts, call.n, call.prompt_width
        ids = torch.full((slot.batch, S), call.pad, dtype=torch.long)
        for i in range(slot.batch):
            row = prompts[i if i < n else 0]
            ids[i, S - len(row) :] = torch.tensor(row)
        starts = torch.tensor([S - len(prompts[i if i < n else 0]) for i in range(slot.batch)])
        mask_prompt = (torch.arange(S)[None, :] >= starts[:, None]).long()
        ids, mask_prompt = ids.to(self.device), mask_prompt.to(self.device)
        slot.mask.fill_(1)
        slot.mask[:, :S].copy_(mask_prompt)
        slot.prompt_len.copy_(mask_prompt.sum(-1))
        slot.cache.reset()
        return ids, mask_prompt

    def _prefill(self, call: _GenerateCall, ids: Tensor, mask_prompt: Tensor, steering_runtime) -> Tensor:
        """The eager prompt forward, positions counted from each row's first real token; returns
        the last position's logits."""
        slot = call.slot
        pos_prefill = (mask_prompt.cumsum(-1) - 1).clamp_min(0)
        steering_runtime.supply_positions(pos_prefill, mask_prompt.bool(), slot.prompt_len)
        kw = dict(self._logits_kw)
        kw[self._cache_kw] = slot.cache
        if self._pass_cache_position:
            kw["cache_position"] = torch.arange(call.prompt_width, device=self.device)
        if self._recorder is not None:
            self._recorder.phase = "prefill"
        return self.model(
            input_ids=ids, position_ids=pos_prefill, attention_mask=slot.mask, use_cache=True, **kw
        ).logits[:, -1, :]

    def _gate(self, call: _GenerateCall) -> list[int]:
        """The prompts to decode: all of them, or those the abstain probe scores at most the threshold
        (the probe reads the prefill's last-prompt taps: no extra forward)."""
        if call.abstain is None:
            return list(range(call.n))
        probe, threshold, sites = call.abstain
        hidden = [self._recorder.prompt_state(site)[: call.n] for site in sites]
        call.scores = probe_scores(probe, hidden, call.n)
        return [p for p in range(call.n) if float(call.scores[p]) <= threshold]

    def _fan_out(self, call: _GenerateCall, decoded: list[int], mask_prompt: Tensor) -> bool:
        """Give each decoded prompt ``call.samples`` consecutive decode rows. When that changes the
        batch (samples, abstentions), the decode slot's rows get their prompt's cache, mask and
        length copied from the prefill slot: one prefill per prompt, not one per sample. Returns
        whether the rows changed (the decode slot may still be the prefill's bucket)."""
        N, pre = call.samples, call.slot
        call.out_rows = [p * N + j for p in decoded for j in range(N)]
        rows = [p for p in decoded for _ in range(N)]
        if rows == list(range(call.n)):  # one row per prompt, none skipped: decode where it was prefilled
            call.source_rows = torch.tensor(rows + [0] * (pre.batch - len(rows)), device=self.device)
        elif rows:
            dec = self._slot(_bucket(len(rows), BATCH_BUCKETS, "decode batch"), pre.length)
            source = torch.tensor(rows + [rows[0]] * (dec.batch - len(rows)), device=self.device)
            _share_prompt_cache(pre.cache, dec.cache, source, call.prompt_width)
            S = call.prompt_width
            dec.mask.fill_(1)
            dec.mask[:, :S].copy_(mask_prompt.index_select(0, source))
            dec.prompt_len.copy_(pre.prompt_len.index_select(0, source))
            call.slot, call.source_rows = dec, source
        call.finished = torch.zeros(call.slot.batch, dtype=torch.bool, device=self.device)
        if self._recorder is not None and rows:
            self._start_tap_decode(call)
        return rows != list(range(call.n))

    def _start_tap_decode(self, call: _GenerateCall) -> None:
        """Point the recorder at the decode slot's buffers, every row starting from its prompt's state."""
        rec = self._recorder
        widths = [rec.prompt_state(site).shape[-1] for site in rec.sites]
        buffers = call.slot.tap_buffers_for(rec, widths, rec.prompt_states[0].dtype)
        call.slot.live.fill_(True)
        rec.start_decode(call.slot.live, buffers, call.source_rows)

    def _ready_compiled_step(self, slot: _CacheSlot) -> None:
        """Before a call's decode steps: a new hook set compiles anyway; a fresh code object drops
        the old set's graphs."""
        if not self.compile_mode:
            return
        hooks = _hook_signature(self.model)
        if slot.fn is None or hooks != slot.hooks:
            self._fresh_compiled_step(slot)
            slot.compiled, slot.hooks = False, hooks

    def _decode_logits(self, call: _GenerateCall, step: int, trusted: bool) -> Tensor:
        """Run decode step ``step`` (1-based) on the slot's buffers; the first one of a slot compiles."""
        slot = call.slot
        slot.pos.copy_(slot.prompt_len[:, None] + (step - 1))
        S = call.prompt_width
        cache_position = (
            torch.full((1,), S + step - 1, device=self.device) if self._pass_cache_position else None
        )
        args = (slot.tokens, slot.pos, slot.mask, slot.cache, cache_position)
        if slot.compiled or not self.compile_mode:
            return self._run_step(slot, args, trusted=trusted)
        key = (slot.batch, slot.length)
        if self.progress:
            print(
                f"pysteer: compiling the decode step (batch {slot.batch}, cache {slot.length}, mode {self.compile_mode}) ...",
                file=sys.stderr,
                flush=True,
            )
        tc = time.perf_counter()
        logits = self._run_step(slot, args)
        self.compile_seconds[key] = time.perf_counter() - tc
        slot.compiled = True
        if self.progress:
            print(f"pysteer: compiled in {self.compile_seconds[key]:.1f} s", file=sys.stderr, flush=True)
        return logits

    def _steps(self, call: _GenerateCall, to_host: bool) -> Iterator[list[int] | None]:
        """Prefill, then decode steps until ``max_new_tokens`` or every request stopped; yields each
        step's tokens (on the host when ``to_host``, else None: no sync per step) and fills ``call``."""
        scope = contextlib.ExitStack()  # undone in `finally`: the user's rows(), positions
        ids, mask_prompt = self._load_prompts(call)
        steering_runtime = runtime(self.model)
        call.t0 = time.perf_counter()
        try:
            if call.handle is not None:
                scope.enter_context(call.handle.padded_rows(call.slot.batch))  # padding rows are not steered
            logits = self._prefill(call, ids, mask_prompt, steering_runtime)
            remapped = self._fan_out(call, self._gate(call), mask_prompt)
            if not call.out_rows:  # every prompt abstained: nothing to decode
                call.t_dec = time.perf_counter()
                call.finish(0.0)
                return
            if call.handle is not None and remapped:
                scope.enter_context(call.handle.padded_rows(call.slot.batch, call.source_rows[: call.rows]))
            call.accept(*self._sample(logits.index_select(0, call.source_rows), *call.sampling))
            yield call.host_tokens()
            steering_runtime.supply_positions(*call.slot.positions)
            call.t_dec = time.perf_counter()
            self._ready_compiled_step(call.slot)
            trusted = False
            for step in range(1, call.max_new_tokens):
                if call.all_stopped(step):
                    break
                logits = self._decode_logits(call, step, trusted)
                if step == 1:
                    trusted = self._trust_later_steps(call.slot)
                call.accept(*self._sample(logits, *call.sampling))
                call.steps += 1
                yield call.host_tokens() if to_host else None
            call.finish(self.compile_seconds.get((call.slot.batch, call.slot.length), 0.0))
        finally:
            steering_runtime.clear_positions()
            scope.close()
            if self._recorder is not None:
                self._recorder.phase = "prefill"
            if self._call_handle is not None:
                self._call_handle.remove()
                self._call_handle = None
            if self._managed is not None and call.handle is self._managed:
                # Between calls the managed handle stays attached (removing its hooks would force a
                # recompile next time) but steers nothing: one row 0, broadcast to any batch.
                self._managed.rows([None])

    @torch.no_grad()
    def stream(
        self,
        inputs,
        steering=None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop=None,
        seed: int | None = None,
        ignore_eos: bool = False,
        num_return_sequences: int = 1,
    ) -> Iterator[list[int | None]]:
        """Yield, per decode step, one new token per request (None once a request has stopped).

        In-place steering changes made between steps (``set_alpha``, ``update``, ``rows``,
        ``set_positions``) apply from the next step. Hooks attached or removed while a stream runs
        apply from the next call: only the first decode step of a call runs Dynamo's full guard check.
        With ``num_return_sequences`` N, each step yields N tokens per prompt (grouped per prompt).
        """
        call = self._start(
            inputs,
            steering,
            max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=stop,
            seed=seed,
            ignore_eos=ignore_eos,
            num_return_sequences=num_return_sequences,
        )
        yield from self._steps(call, to_host=True)

    @torch.no_grad()
    def generate(self, inputs, steering=None, max_new_tokens: int = 64, **kw) -> GenerationResult:
        """Generate for a batch of prompts (``kw``: the other arguments of ``stream``, and ``taps``,
        ``abstain``, ``threshold``); see ``pysteer.generate``."""
        call = self._start(inputs, steering, max_new_tokens, **kw)
        for _ in self._steps(call, to_host=False):
            pass
        return self._result(call)

    def _result(self, call: _GenerateCall) -> GenerationResult:
        """Cut each row after its first stop token; decode and cut texts at stop strings. Rows are
        grouped per prompt; abstained rows are empty."""
        stop_ids = set(call.stop_ids.tolist())
        n_out = call.n * call.samples
        tokens: list[list[int]] = [[] for _ in range(n_out)]
        logprobs: list[list[float]] = [[] for _ in range(n_out)]
        if call.out_rows:
            steps = torch.stack(call.tokens, 1)[: call.rows].tolist()
            scores = torch.stack(call.logprobs, 1)[: call.rows].float().tolist()
            for out, row, lp in zip(call.out_rows, steps, scores):
                cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
                tokens[out], logprobs[out] = row[:cut], lp[:cut]
        decoded = set(call.out_rows)
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
            for i, text in enumerate(texts):
                for s in call.text_stops:
                    if s in text:
                        texts[i] = text[: text.index(s)]
        return GenerationResult(
            tokens=tokens,
            texts=texts,
            prompt_tokens=call.prompts,
            seconds=call.seconds,
            decode_seconds=call.decode_seconds,
            steps=call.steps,
            compile_seconds=call.compile_seconds,
            logprobs=logprobs,
            samples_per_prompt=call.samples,
            abstained=[r not in decoded for r in range(n_out)],
            abstain_scores=None if call.scores is None else call.scores.tolist(),
            taps=self._tapped_states(call) if call.taps else None,
        )

    def _tapped_states(self, call: _GenerateCall) -> dict[str, dict[str, Tensor]]:
        """The call's taps per position and site, one row per output row (host, the model's dtype)."""
        rec, N = self._recorder, call.samples
        prompt_of_row = torch.arange(call.n * N, device=self.device) // N
        decoded = torch.tensor(call.out_rows, dtype=torch.long)
        out: dict[str, dict[str, Tensor]] = {pos: {} for pos in TAP_POSITIONS}
        for site in call.taps:
            i = rec.sites.index(site)
            last_prompt = rec.prompt_states[i].index_select(0, prompt_of_row).cpu()
            second_last = torch.full_like(last_prompt, float("nan"))
            if call.out_rows:
                second_last[decoded] = rec.latest[i][: call.rows].cpu()
            out["last_prompt"][site.name] = last_prompt
            out["second_last_generated"][site.name] = second_last
        return out

    @staticmethod
    def _sample(
        logits: Tensor, do_sample: bool, temperature: float, top_p: float, top_k: int, gen
    ) -> tuple[Tensor, Tensor]:
        """The next token per row and its log-probability under the distribution it was drawn from
        (temperature, then top-k, then top-p, as Hugging Face's warpers; greedy: the raw logits)."""
        logits = logits.float()
        if not do_sample:
            tok = logits.argmax(-1)
            return tok, _chosen_logprob(logits, tok)
        logits = logits / max(temperature, 1e-6)
        if top_k and top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(-1)
        tok = torch.multinomial(probs, 1, generator=gen)[:, 0]
        return tok, _chosen_logprob(logits, tok)


def _chosen_logprob(scores: Tensor, tok: Tensor) -> Tensor:
    """``log_softmax(scores)[row, tok[row]]`` without materialising the full log-softmax."""
    return scores.gather(-1, tok[:, None])[:, 0] - scores.logsumexp(-1)


def _check_samples(num_return_sequences, do_sample: bool) -> None:
    """``num_return_sequences``: a positive integer; more than one needs sampling (as in HF's ``generate``,
    greedy rows of one prompt would all be equal)."""
    if (
        isinstance(num_return_sequences, bool)
        or not isinstance(num_return_sequences, int)
        or num_return_sequences < 1
    ):
        raise ValueError(
            f"num_return_sequences must be an integer of at least 1, got {num_return_sequences!r}"
        )
    if num_return_sequences > 1 and not do_sample:
        raise ValueError(
            f"num_return_sequences={num_return_sequences} needs do_sample=True: greedy decoding gives every sample the same tokens"
        )


def _check_sampling(max_new_tokens, do_sample, temperature, top_p, top_k) -> None:
    """Generation arguments, checked before anything runs (HF's ``generate`` refuses the same)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer of at least 1, got {max_new_tokens!r}")
    temperature = finite_number(temperature, "temperature")
    top_p = finite_number(top_p, "top_p")
    if do_sample and temperature <= 0:
        raise ValueError(
            f"temperature must be > 0 when sampling, got {temperature} (use do_sample=False for greedy)"
        )
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: no top-k), got {top_k!r}")


def _per_request(steering, n: int) -> list[list | None]:
    """Normalise ``steering`` (one config for all, or one per request) to a list of n configs."""
    if is_intervention(steering):
        return [[steering]] * n
    items = list(steering)
    if items and all(is_intervention(x) for x in items):
        if len(items) == n > 1:
            # handle.rows() reads such a list as one intervention per row; read as one config here it
            # would steer every prompt with all of them. Neither reading is safe to guess.
            raise ValueError(
                f"generate: steering is a flat list of {n} interventions for {n} prompts, which reads two ways; "
                f"pass [[iv] for iv in steering] for one intervention per prompt (as handle.rows does), "
                f"or [steering] * {n} for all of them on every prompt"
            )
        return [items] * n
    if len(items) != n:
        raise ValueError(f"generate: {len(items)} per-request configs for {n} prompts")
    out = []
    for x in items:
        if x is None:
            out.append(None)
        elif is_intervention(x):
            out.append([x])
        else:
            cfg = list(x)
            if not all(is_intervention(iv) for iv in cfg):
                raise TypeError("generate: per-request configs hold interventions (or None)")
            out.append(cfg)
    return out


_GENERATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_generator(
    model: nn.Module,
    tokenizer=None,
    compile: str | bool = "auto",
    progress: bool = True,
    compile_backend: str = "inductor",
) -> FastGenerator:
    """The model's ``FastGenerator`` for this compile mode (created once, reused across calls)."""
    per_model = _GENERATORS.setdefault(model, {})
    key = (compile, compile_backend)
    gen = per_model.get(key)
    if gen is None:
        gen = per_model[key] = FastGenerator(model, tokenizer, compile, progress, compile_backend)
    if tokenizer is not None:
        gen.tokenizer = tokenizer
    return gen


def generate(
    model: nn.Module,
    inputs,
    tokenizer=None,
    steering=None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop=None,
    seed: int | None = None,
    compile: str | bool = "auto",
    stream: bool = False,
    progress: bool = True,
    compile_backend: str = "inductor",
    ignore_eos: bool = False,
    num_return_sequences: int = 1,
    taps=None,
    abstain=None,
    threshold: float = 0.5,
):
    """Generate with a static KV cache and a compiled decode step, steering updated in place.

    Args:
        model: a Hugging Face causal LM.
        inputs: text(s) (needs ``tokenizer``), a ``[B, S]`` tensor, or lists of token ids.
        tokenizer: for text inputs, stop strings and decoded outputs.
        steering: None; a dynamic ``SteeringHandle`` (its configs and ``rows``); one config (an
            intervention, or a flat list of interventions whose length is not the number of prompts)
            for every request; or one entry per request, each None, an intervention or a list.
            A flat list of exactly one intervention per prompt is refused as ambiguous.
        max_new_tokens: tokens to generate per request.
        do_sample, temperature, top_p, top_k: sampling (on the device); greedy by default.
        stop: stop token id(s) or single-token string(s) besides EOS; multi-token strings cut the text.
        seed: sampling seed (reproducible on the same device).
        ignore_eos: keep generating past EOS (benchmarks; like ``min_new_tokens = max_new_tokens``).
        compile: ``"auto"``, a ``torch.compile`` mode, or False.
        stream: return an iterator yielding one token per request per step instead.
        progress: print compile progress to stderr.
        compile_backend: ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` compiles fast, for tests).
        num_return_sequences: samples per prompt (N > 1 needs ``do_sample``). Each prompt is
            prefilled once and its KV cache copied to its N rows; output rows are grouped per prompt.
        taps: sites to record while generating (``"all"``: every layer's ``resid``; or names like
            ``"layers.10.resid"``) at the last prompt token and the second-last generated token
            (``pysteer.taps``); returned in ``result.taps``. No second pass, no ``output_hidden_states``.
        abstain: a probe (``sites: list[str]``, ``__call__(list[Tensor[B, d]]) -> Tensor[B]`` in
            [0, 1]) run on the prefill's last-prompt states; prompts scoring above ``threshold`` are
            not decoded (``result.abstained``, ``result.abstain_scores``). Not with ``stream``.

    Returns:
        ``GenerationResult`` (or an iterator of token lists when ``stream=True``).
    """
    gen = get_generator(model, tokenizer, compile=compile, progress=progress, compile_backend=compile_backend)
    kw = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=stop,
        seed=seed,
        ignore_eos=ignore_eos,
        num_return_sequences=num_return_sequences,
    )
    if stream:
        if taps is not None or abstain is not None:
            raise ValueError("generate: taps= and abstain= return with the result; use stream=False")
        return gen.stream(inputs, steering=steering, **kw)
    return gen.generate(inputs, steering=steering, taps=taps, abstain=abstain, threshold=threshold, **kw)
