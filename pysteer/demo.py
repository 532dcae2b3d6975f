"""``pysteer demo``: sentiment steering on the embedded SmolLM2-135M-Instruct, in one batch.

Loads the default model, derives a positive-vs-negative sentiment direction from a few contrast
sentences (mean difference of the residual stream, scaled by its std, at three middle layers),
and prints unsteered, positive-steered and negative-steered completions of the same prompts,
all generated in *one* batch (per-request rows of the steering tables), plus tokens/s of an
unsteered and the steered batch. Generation runs on the fast path (static KV cache, compiled
decode step; ``--no-compile`` uses Hugging Face ``generate()`` instead).
"""

from __future__ import annotations

import argparse
import sys
import time

HELP = "steer the embedded SmolLM2 model towards positive / negative sentiment and print completions"

POSITIVE = [
    "I love this, it is wonderful and makes me so happy.",
    "What a fantastic, delightful day!",
    "This is the best thing ever, amazing!",
    "I feel great, everything is beautiful.",
    "Such a lovely, kind and joyful person.",
]
NEGATIVE = [
    "I hate this, it is awful and makes me so sad.",
    "What a terrible, miserable day!",
    "This is the worst thing ever, horrible!",
    "I feel awful, everything is ugly.",
    "Such a nasty, cruel and bitter person.",
]
PROMPTS = ["Write one sentence about your weekend.", "Describe the weather today."]
LAYERS = (8, 10, 12)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="default", help="model directory, or 'default' (embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--alpha", type=float, default=1.5, help="strength in units of the activations' std (default 1.5)"
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompt", action="append", help="prompt(s) to complete (repeatable)")
    p.add_argument(
        "--save-steering", metavar="FILE", help="also write the positive steering to FILE (safetensors)"
    )
    p.add_argument("--backend", default=None, help="op backend: auto | torch | triton | cuda")
    p.add_argument(
        "--no-compile", action="store_true", help="use Hugging Face generate() instead of the fast path"
    )


def _chat(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def _run_hf(model, tok, configs, prompts, batch_texts, args):
    """The same comparison through Hugging Face ``generate()`` with a steering handle."""
    import torch

    import pysteer

    def generate(texts):
        batch = tok(texts, return_tensors="pt", padding=True).to(model.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        seconds = time.perf_counter() - start
        new = out[:, batch["input_ids"].shape[1] :]
        n_tokens = int((new != tok.pad_token_id).sum())
        return [tok.decode(o, skip_special_tokens=True).strip() for o in new], n_tokens / seconds

    _, plain_tps = generate(batch_texts)
    with pysteer.steer(model, configs, mode="dynamic", backend=args.backend) as handle:
        handle.rows([cfg for _ in prompts for cfg in (None, "positive", "negative")])
        mixed, mixed_tps = generate(batch_texts)
    return mixed, mixed_tps, plain_tps


def run(args) -> int:

    import pysteer
    from pysteer.default_model import load_model

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    layers = [layer for layer in LAYERS if layer < model.config.num_hidden_layers] or [
        model.config.num_hidden_layers // 2
    ]
    print(
        f"deriving a sentiment direction at layers {layers} from {len(POSITIVE)}+{len(NEGATIVE)} sentences ...",
        file=sys.stderr,
    )
    dirs = pysteer.directions.mean_difference(
        model, tok, POSITIVE, NEGATIVE, [f"layers.{i}.resid" for i in layers], position="mean"
    )
    configs = {
        "positive": [d.vector_add(alpha=args.alpha, normalise=True) for d in dirs.values()],
        "negative": [d.vector_add(alpha=-args.alpha, normalise=True) for d in dirs.values()],
    }
    if args.save_steering:
        path = pysteer.save(
            {"positive": configs["positive"]}, args.save_steering, metadata={"source": "pysteer demo"}
        )
        print(f"wrote {path}", file=sys.stderr)

    prompts = args.prompt or PROMPTS
    texts = [_chat(tok, p) for p in prompts]
    # one batch: every prompt three times, rows unsteered / positive / negative
    batch_texts = [t for t in texts for _ in range(3)]
    per_request = [cfg for _ in prompts for cfg in (None, configs["positive"], configs["negative"])]
    unsteered = [None] * len(batch_texts)

    if args.no_compile:
        mixed, mixed_tps, plain_tps = _run_hf(model, tok, configs, prompts, batch_texts, args)
    else:

        def run_fast(steering):
            res = pysteer.generate(
                model, batch_texts, tokenizer=tok, steering=steering, max_new_tokens=args.max_new_tokens
            )
            return [t.strip() for t in res.texts], res.tokens_per_second

        run_fast(per_request)  # compiles the decode step once (same bucket and sites for both runs below)
        _, plain_tps = run_fast(unsteered)
        mixed, mixed_tps = run_fast(per_request)
    for i, prompt in enumerate(prompts):
        print(f"\n=== {prompt}")
        print(f"[unsteered]       {mixed[3 * i]}")
        print(f"[positive +{args.alpha:g}]   {mixed[3 * i + 1]}")
        print(f"[negative -{args.alpha:g}]   {mixed[3 * i + 2]}")
    path = "HF generate()" if args.no_compile else "pysteer fast path (static cache, compiled decode)"
    print(
        f"\ntokens/s, batch of {len(batch_texts)}, {path}: unsteered {plain_tps:.1f}; "
        f"steered with 3 configs in the batch {mixed_tps:.1f} ({mixed_tps / plain_tps:.2f}x)"
    )
    print(f"total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
