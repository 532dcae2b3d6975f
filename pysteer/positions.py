"""Which tokens a steering handle touches: position rules, their tensor encoding, and the row index
of every token of a forward.

Positions are counted from each sequence's first real token (``attention_mask.cumsum - 1``), so left
padding and the KV cache are handled: padding tokens are never steered, and a decode step knows
whether its token is in the prompt. A rule is encoded as tensors (``PositionTable``) so changing it
never recompiles a compiled model.

Per forward, ``forward_positions`` reads ``(pos [B, S], valid [B, S])`` from the forward's own
arguments (mask, cache), ``PromptLengths`` keeps each row's prompt length across decode steps, and
``token_rows`` turns a handle's per-request config rows and its rule into one table row per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .models import forward_args

# "last_prompt+generated" is ITI's rule (honest_llama edits the last position of every forward: with a
# KV cache, the last prompt token at the prefill and each generated token after it).
POSITION_RULES = ("all", "prompt", "generated", "last_prompt", "last_prompt+generated")
_EXPLICIT = len(POSITION_RULES)  # the code of a row given explicit positions
POSITION_SLOTS = 8  # explicit positions preallocated per row, so most changes are in place
_NO_POSITION = -(2**40)  # sentinel that matches no position, even after adding a prompt length

Positions = str | Sequence[int] | Sequence[Sequence[int]]


def check_positions(positions: Positions) -> None:
    """Raise unless ``positions`` is a rule name, a list of ints, or one list of ints per batch row."""
    if isinstance(positions, str):
        if positions not in POSITION_RULES:
            raise ValueError(
                f"unknown position rule {positions!r}; use one of {POSITION_RULES} or a list of positions"
            )
        return
    seq = list(positions)
    if not seq:
        raise ValueError("positions: empty list")
    if all(isinstance(p, int) for p in seq):
        return
    if all(
        isinstance(p, Sequence) and not isinstance(p, str) and all(isinstance(q, int) for q in p) for p in seq
    ):
        return
    raise ValueError("positions: expected a rule name, a list of ints, or one list of ints per batch row")


def max_positions(model: nn.Module) -> int | None:
    """The model's context length, when its config states one."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_position_range(positions: Positions, limit: int | None) -> None:
    """Explicit positions must be tokens the model can hold: a position past the context length
    (or further back than it) would steer nothing, silently."""
    if isinstance(positions, str) or limit is None:
        return
    flat = [p for q in positions for p in ([q] if isinstance(q, int) else q)]
    bad = [p for p in flat if not -limit <= p < limit]
    if bad:
        raise ValueError(
            f"positions: {bad[0]} is outside the model's {limit}-token context "
            f"(explicit positions are in [-{limit}, {limit}); negative ones count back from the prompt's end)"
        )


class PositionTable:
    """A position rule as tensors: ``code [R]`` holds a rule per batch row (R = 1 when shared): its
    index in ``POSITION_RULES`` (0 all, 1 prompt, 2 generated, 3 last prompt token, 4 last prompt token
    and every generated one), or ``_EXPLICIT`` for explicit positions listed in ``explicit [R, P]``
    (unused slots hold a sentinel that matches nothing; negative entries count back from the end of
    the prompt). ``set`` rewrites the tensors in place when the encoding keeps its shape."""

    def __init__(self, positions: Positions, device: torch.device):
        self.device = device
        self.code: Tensor | None = None
        self.explicit: Tensor | None = None
        self.set(positions)

    def set(self, positions: Positions) -> None:
        self.positions = positions
        if isinstance(positions, str):
            codes, lists = [POSITION_RULES.index(positions)], [[]]
        else:
            lists = (
                [list(positions)]
                if all(isinstance(q, int) for q in positions)
                else [list(q) for q in positions]
            )
            codes = [_EXPLICIT] * len(lists)
        width = max(POSITION_SLOTS, max(len(q) for q in lists))
        table = torch.full((len(lists), width), _NO_POSITION, dtype=torch.long)
        for i, q in enumerate(lists):
            table[i, : len(q)] = torch.tensor(q, dtype=torch.long)
        code = torch.tensor(codes, dtype=torch.long)
        if self.code is not None and self.code.shape == code.shape and self.explicit.shape == table.shape:
            self.code.copy_(code)  # in place: same tensors, no recompilation
            self.explicit.copy_(table)
        else:
            self.code = code.to(self.device)
            self.explicit = table.to(self.device)

    def selects(self, pos: Tensor, prompt_len: Tensor) -> Tensor:
        """``[B, S]`` bool: the tokens the rule selects (tensor ops only)."""
        B = pos.shape[0]
        code, plist = self.code, self.explicit
        if code.shape[0] not in (1, B):
            raise ValueError(
                f"pysteer: positions were given for {code.shape[0]} batch rows but the batch has {B}"
            )
        pl = prompt_len[:, None]
        code = code[:, None]
        target = torch.where(plist < 0, plist + pl, plist)  # [R|B, P]
        explicit = (pos[:, :, None] == target[:, None, :]).any(-1)
        return torch.where(
            code == 0,
            True,
            torch.where(
                code == 1,
                pos < pl,
                torch.where(
                    code == 2,
                    pos >= pl,
                    torch.where(code == 3, pos == pl - 1, torch.where(code == 4, pos >= pl - 1, explicit)),
                ),
            ),
        )


def forward_positions(module: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, int | Tensor]:
    """``(pos [B, S], valid [B, S], past_len)`` of a decoder-stack forward, from its own arguments."""
    ref = forward_args.input_tensor(args, kwargs)
    if ref is None:
        raise ValueError("pysteer: the forward got neither input_ids nor inputs_embeds")
    B, S = ref.shape[0], ref.shape[1]
    mask = forward_args.attention_mask_2d(args, kwargs)
    past_len = forward_args.past_length(module, args, kwargs, S)
    if mask is not None and mask.shape[-1] >= S:
        m = mask.to(torch.long)
        return (m.cumsum(-1) - 1)[:, -S:], m[:, -S:].bool(), past_len
    pos = (torch.arange(S, device=ref.device) + past_len).expand(B, S)
    return pos, torch.ones(B, S, dtype=torch.bool, device=ref.device), past_len


class PromptLengths:
    """Each batch row's real prompt length, fixed by a prefill and kept by the decode steps after it."""

    def __init__(self) -> None:
        self.value: Tensor | None = None  # [B]

    def update(self, valid: Tensor, past_len: int | Tensor) -> Tensor:
        """A forward with an empty cache is a prefill: it fixes each row's prompt length (real tokens);
        decode steps keep it. Without a cache every forward is a prefill. The test stays a tensor op
        when the cache length is a tensor (static caches), so it neither syncs nor breaks a graph."""
        new_len = valid.sum(-1)
        B = valid.shape[0]
        old = self.value
        if old is None or old.shape[0] != B or not isinstance(past_len, Tensor):
            if old is None or old.shape[0] != B or past_len == 0:
                self.value = new_len
        else:
            self.value = torch.where(past_len == 0, new_len, old)
        return self.value

    def reset(self) -> None:
        self.value = None


def expand_request_rows(request_rows: Tensor | None, B: int, device: torch.device) -> Tensor:
    """``[B]`` config row per batch row: every row the first config when none were assigned; a
    shorter assignment repeats each entry (``generate()`` expands rows for beams and samples)."""
    if request_rows is None:
        return torch.ones(B, dtype=torch.int32, device=device)
    n = request_rows.shape[0]
    if n == B:
        return request_rows
    if B % n:
        raise ValueError(f"pysteer: handle.rows() was given {n} batch rows but the batch has {B}")
    return request_rows.repeat_interleave(B // n)


def token_rows(
    table: PositionTable, request_rows: Tensor | None, pos: Tensor, valid: Tensor, prompt_len: Tensor
) -> Tensor:
    """Table row per token ``[B*S]`` int32 (0: unsteered) from positions ``[B, S]`` (tensor ops only)."""
    B = pos.shape[0]
    br = expand_request_rows(request_rows, B, pos.device)
    if not torch.compiler.is_compiling() and table.positions == "all":
        # Eager shortcut for the common rule (same result as the tensor encoding, a tenth of the
        # small ops). Compiled graphs keep the encoding (is_compiling() first, so Dynamo never
        # guards on the rule) and set_positions never recompiles.
        sel = valid
    else:
        sel = table.selects(pos, prompt_len) & valid
    return torch.where(sel, br[:, None].to(pos.device), 0).reshape(-1).to(torch.int32)


@dataclass
class TokenContext:
    """What an intervention's applier sees at a site during one forward.

    Attributes:
        rows: ``[T]`` int32 table row per token (0: the token is not steered).
        pos: ``[B, S]`` position of each token from its sequence's first real token.
        prompt_len: ``[B]`` real prompt tokens per sequence.
        backend: the op backend of the handle.
        site_input: ``[T, K]`` the module's input at a site that hands it over (a linear's output
            site, ``SiteKind.with_input``; what a weight delta reads), else None.
    """

    rows: Tensor
    pos: Tensor
    prompt_len: Tensor
    backend: str
    site_input: Tensor | None = None

    def with_site_input(self, x: Tensor) -> TokenContext:
        """This context with ``site_input`` set to ``x`` flattened to ``[T, K]``."""
        return TokenContext(
            self.rows, self.pos, self.prompt_len, self.backend, x.reshape(self.rows.shape[0], -1)
        )

    def offsets_from_prompt_end(self) -> Tensor:
        """``[T]`` position relative to the end of the prompt: -1 is the last prompt token, 0 the
        first generated one."""
        return (self.pos - self.prompt_len[:, None].to(self.pos.device)).reshape(-1)

    def token_prompt_len(self) -> Tensor:
        """``[T]`` the prompt length of each token's sequence."""
        return self.prompt_len.to(self.pos.device)[:, None].expand_as(self.pos).reshape(-1)

    def at_positions(self, targets: Tensor) -> Tensor:
        """``[T, P]`` bool: token ``t`` sits at position ``targets[t, p]`` (negative targets count
        back from the prompt's end, as the position rules do; a ``_NO_POSITION`` slot matches nothing)."""
        pl = self.token_prompt_len()[:, None]
        return torch.where(targets < 0, targets + pl, targets) == self.pos.reshape(-1)[:, None]
