"""Answers sampled from a causal LM, with their token log-probabilities and hidden states.

:func:`sample_answers` samples through ``pysteer.generate`` (eager): each question is prefilled once
and its KV cache shared by its ``n`` samples, the token log-probabilities are those of the
distribution each token was sampled from (what the reference reads from Hugging Face ``generate``'s
scores), and the hidden states are taps recorded in the same forwards (no second pass). The Hugging
Face path (:func:`_generate`, and :func:`_teacher_forced` for states) stays for the judge's short
greedy replies and as the tests' oracle; both give the same answers, log-probabilities and states.

Positions follow the semantic-entropy-probes paper: the *token before generation* (TBG) is the last
prompt token; the *second-last token* (SLT) is the second-last generated token, i.e. the last answer
token when generation ended on a stop token (a newline or EOS).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

ANSWER_PROMPT = "Answer the following question as briefly as possible.\nQuestion: {question}\nAnswer:"


@dataclass
class AnswerSamples:
    """``n`` answers per question.

    Attributes:
        questions: the ``Q`` questions.
        texts: ``[Q][n]`` answer strings (stop token removed, stripped).
        token_logprobs: ``[Q][n]`` tensors ``[T]`` of the answer tokens' log-probabilities under
            the sampling distribution (the model's own at temperature 1 or greedy); the stop token
            is excluded, as in the reference, except in an answer that is only a stop token.
        sites: the traced sites, ``layers.{i}.resid`` in layer order (empty when none were asked).
        hidden_tbg: ``[Q, n, L, d]`` float32 at the token before generation, or ``None``.
        hidden_slt: ``[Q, n, L, d]`` float32 at the second-last generated token, or ``None``.
    """

    questions: list[str]
    texts: list[list[str]]
    token_logprobs: list[list[Tensor]]
    sites: list[str]
    hidden_tbg: Tensor | None = None
    hidden_slt: Tensor | None = None

    def log_likelihoods(self) -> list[list[float]]:
        """``[Q][n]`` length-normalised log-likelihoods (mean token log-probability)."""
        return [[float(lp.mean()) for lp in row] for row in self.token_logprobs]


def answer_prompt(tokenizer: Any, question: str, chat: bool = True) -> str:
    """The question in the answering prompt, in the chat template when the tokenizer has one."""
    from ..recipes._common import chat_text

    return chat_text(tokenizer, ANSWER_PROMPT.format(question=question), chat)


# tokenizer -> its stop ids (decoding the whole vocabulary takes seconds)
_STOP_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS and every token whose text contains a newline: an answer ends at its first line."""
    if tokenizer not in _STOP_IDS:
        _STOP_IDS[tokenizer] = _find_stop_ids(tokenizer)
    return list(_STOP_IDS[tokenizer])


def _find_stop_ids(tokenizer: Any) -> list[int]:
    vocab = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(vocab)])
    ids = {i for i, t in enumerate(texts) if "\n" in t}
    eos = tokenizer.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _encode_left(tokenizer: Any, prompts: Sequence[str], device: torch.device) -> dict[str, Tensor]:
    saved = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = saved
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def _generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    n: int,
    temperature: float,
    max_new_tokens: int,
    stops: list[int],
) -> tuple[list[list[int]], list[list[int]], list[Tensor]]:
    """Prompt token ids (one per prompt), generated ids (``n`` per prompt, cut after the first
    stop token, which is kept) and their log-probabilities under the sampling distribution (the
    model's own at temperature 1 or greedy; as the reference computes them, from the scores
    ``generate`` sampled from)."""
    enc = _encode_left(tokenizer, prompts, _device(model))
    # plain temperature sampling: top_k=0 and top_p=1 switch off the filters a model's
    # generation config may turn on
    how = (
        dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        if temperature > 0
        else dict(do_sample=False)
    )
    out = model.generate(
        **enc,
        **how,
        max_new_tokens=max_new_tokens,
        num_return_sequences=n,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
        output_scores=True,
        return_dict_in_generate=True,
    )
    width = enc["input_ids"].shape[1]
    chosen = out.sequences[:, width:]
    step_logprobs = torch.stack(
        [
            torch.log_softmax(sc.float(), -1).gather(-1, chosen[:, k, None])[:, 0]
            for k, sc in enumerate(out.scores)
        ],
        dim=1,
    ).cpu()
    stop_set = set(stops)
    prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"])]
    generated, logprobs = [], []
    for row, lp in zip(chosen.tolist(), step_logprobs):
        cut = next((k + 1 for k, t in enumerate(row) if t in stop_set), len(row))
        generated.append(row[:cut])
        logprobs.append(lp[:cut])
    return prompt_ids, generated, logprobs


MAX_ROWS = 128


@torch.no_grad()
def _generate_fast(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    n: int,
    temperature: float,
    max_new_tokens: int,
    stops: list[int],
    sites: list[str],
) -> tuple[list[list[int]], list[Tensor], Tensor | None, Tensor | None]:
    """``n`` answers per prompt through ``pysteer.generate`` (one prefill per prompt, eager): generated
    ids (cut after the first stop token, which is kept), their log-probabilities under the sampling
    distribution, and, for ``sites``, the tapped states ``[rows, L, d]`` at the last prompt token and
    the second-last generated token."""
    from ..fast import generate

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    res = generate(
        model,
        ids,
        tokenizer=tokenizer,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_k=0,
        top_p=1.0,
        stop=stops,
        compile=False,
        progress=False,
        num_return_sequences=n,
        taps=sites or None,
        # drawn from torch's global generator, so torch.manual_seed makes the samples reproducible
        # (as it does Hugging Face sampling)
        seed=int(torch.randint(0, 2**31 - 1, ())) if temperature > 0 else None,
    )
    logprobs = [torch.tensor(lp, dtype=torch.float32) for lp in res.logprobs]
    if not sites:
        return [list(t) for t in res.tokens], logprobs, None, None
    states = [
        torch.stack([res.taps[pos][s].float() for s in sites], dim=1)
        for pos in ("last_prompt", "second_last_generated")
    ]
    return [list(t) for t in res.tokens], logprobs, states[0], states[1]


def greedy_texts(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded, one ``generate`` call), special tokens dropped."""
    eos = tokenizer.eos_token_id
    stops = eos if isinstance(eos, list) else [eos]
    _, generated, _ = _generate(model, tokenizer, prompts, 1, 0.0, max_new_tokens, stops)
    return [tokenizer.decode(g, skip_special_tokens=True) for g in generated]


@torch.no_grad()
def _teacher_forced(
    model: Any, prompts: list[list[int]], continuations: list[list[int]], sites: list[str]
) -> tuple[list[Tensor], Tensor | None, Tensor | None]:
    """One right-padded forward of prompt + continuation per row: the continuation tokens'
    log-probabilities and, for ``sites``, the states ``[B, L, d]`` at the last prompt token and
    the second-last continuation token."""
    from ..tracing import trace

    device = _device(model)
    rows = [p + c for p, c in zip(prompts, continuations)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, device=device)
        mask[b, : len(r)] = 1
    if sites:
        with trace(model, sites) as cache:
            logits = model(input_ids=ids, attention_mask=mask).logits
        states = torch.stack([cache[s] for s in sites], dim=2).float()  # [B, S, L, d]
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits
    logprobs = []
    tbg, slt = [], []
    for b, (p, c) in enumerate(zip(prompts, continuations)):
        start = len(p) - 1
        lp = torch.log_softmax(logits[b, start : start + len(c)].float(), -1)
        logprobs.append(lp.gather(-1, torch.tensor(c, device=device)[:, None])[:, 0].cpu())
        if sites:
            tbg.append(states[b, start])
            slt.append(states[b, len(p) + len(c) - 2])
    if not sites:
        return logprobs, None, None
    return logprobs, torch.stack(tbg).cpu(), torch.stack(slt).cpu()


def continuation_logprobs(
    model: Any, tokenizer: Any, prompts: Sequence[str], continuation: str
) -> list[float]:
    """Log-probability of ``continuation`` after each prompt (summed over its tokens)."""
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    lps, _, _ = _teacher_forced(model, ids, [cont] * len(ids), [])
    return [float(lp.sum()) for lp in lps]


def residual_sites(model: Any) -> list[str]:
    """``layers.{i}.resid`` for every decoder layer of ``model``."""
    from ..models.specs import geometry, get_spec, unwrap_model

    hf = unwrap_model(model)
    return [f"layers.{i}.resid" for i in range(geometry(hf, get_spec(hf)).n_layers)]


def sample_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    n: int = 10,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    *,
    hidden: bool = False,
    batch_size: int = 8,
    chat: bool = True,
) -> AnswerSamples:
    """Sample ``n`` answers per question (``temperature=0``: greedy, ``n`` must be 1).

    Args:
        model, tokenizer: a Hugging Face causal LM of a supported architecture.
        questions: the questions, put in :data:`ANSWER_PROMPT`.
        n: answers per question.
        temperature: sampling temperature; 0 decodes greedily.
        max_new_tokens: longest answer; an answer ends at its first newline or EOS.
        hidden: also record ``layers.{i}.resid`` of every layer at the TBG and SLT positions.
        batch_size: questions per ``generate`` call (``batch_size * n`` sequences).
        chat: use the tokenizer's chat template.

    Returns:
        :class:`AnswerSamples`.
    """
    questions = list(questions)
    if not questions:
        raise ValueError("sample_answers needs at least one question")
    if n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"n={n}, max_new_tokens={max_new_tokens}, batch_size={batch_size}: each must be >= 1"
        )
    if temperature < 0 or (temperature == 0 and n != 1):
        raise ValueError(
            f"temperature={temperature} with n={n}: greedy decoding (0) gives one answer per question"
        )
    stops = stop_token_ids(tokenizer)
    sites = residual_sites(model) if hidden else []
    texts, logprobs, tbg, slt = [], [], [], []
    # the fast path's largest batch is 128 rows (prompts x samples)
    batch_size = max(1, min(batch_size, MAX_ROWS // n))
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        prompts = [answer_prompt(tokenizer, q, chat) for q in chunk]
        generated, lps, h_tbg, h_slt = _generate_fast(
            model, tokenizer, prompts, n, temperature, max_new_tokens, stops, sites
        )
        for q in range(len(chunk)):
            rows = range(q * n, (q + 1) * n)
            texts.append([_answer_text(tokenizer, generated[r], stops) for r in rows])
            logprobs.append([_answer_logprobs(lps[r], generated[r], stops) for r in rows])
        if sites:
            tbg.append(h_tbg.view(len(chunk), n, len(sites), -1))
            slt.append(h_slt.view(len(chunk), n, len(sites), -1))
    return AnswerSamples(
        questions,
        texts,
        logprobs,
        sites,
        torch.cat(tbg) if sites else None,
        torch.cat(slt) if sites else None,
    )


def _answer_text(tokenizer: Any, generated: list[int], stops: list[int]) -> str:
    body = generated[:-1] if generated and generated[-1] in stops else generated
    return tokenizer.decode(body, skip_special_tokens=True).strip()


def _answer_logprobs(logprobs: Tensor, generated: list[int], stops: list[int]) -> Tensor:
    if len(generated) > 1 and generated[-1] in stops:
        return logprobs[:-1]
    return logprobs
