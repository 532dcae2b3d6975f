"""``pysteer edit-seq``: sequential model editing with a DAFNet editor (meta-train one, or load one),
then the edits applied one after another as low-rank weight deltas, scored and saved."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "sequential model editing (DAFNet): meta-train or load an editor, apply N edits, score, save"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="default", help="local HF model directory, or 'default' (SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--editor", required=True, help="editor checkpoint (safetensors): read, or written by --train-steps"
    )
    p.add_argument(
        "--train-steps", type=int, help="meta-train a new editor for this many steps and save it to --editor"
    )
    p.add_argument(
        "--layers", type=int, nargs="+", help="layers whose --linear is edited (default: the last 3)"
    )
    p.add_argument(
        "--linear", default="mlp.down_proj", help="mlp.gate_proj, mlp.up_proj, mlp.down_proj or attn.o_proj"
    )
    p.add_argument(
        "--no-inter-attention", action="store_true", help="the ablation without inter-editing attention"
    )
    p.add_argument("--max-sequence", type=int, default=100, help="longest training edit sequence")
    p.add_argument(
        "--edits", help="edit records (JSON lines, the shipped set's fields); default: the shipped set"
    )
    p.add_argument(
        "--split", default="eval", choices=("train", "eval"), help="which split of the records to apply"
    )
    p.add_argument("-n", "--num-edits", type=int, default=100, help="apply the first N records")
    p.add_argument("--rank", type=int, help="compress each linear's delta to this rank")
    p.add_argument("--out", help="steering file of the accumulated weight deltas")
    p.add_argument("--json-out", help="write the scores here")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")


def run(args) -> int:
    import torch

    import pysteer
    from pysteer.default_model import load_model
    from pysteer.recipes.dafnet import DAFNetConfig, DAFNetEditor, TrainConfig, dafnet_train, sequential_edit
    from pysteer.recipes.editing import EditEvaluator, load_edits

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_edits < 1:
        print("error: --num-edits must be >= 1", file=sys.stderr)
        return 2
    try:
        records = load_edits(args.split, args.edits)[: args.num_edits]
        train_records = load_edits("train", args.edits) if args.train_steps else []
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not records:
        print(f"error: no {args.split} records", file=sys.stderr)
        return 2
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.train_steps:
        n_layers = len(pysteer.models.layer_modules(model))
        layers = args.layers or list(range(n_layers - 3, n_layers))
        cfg = DAFNetConfig(
            [f"layers.{i}.{args.linear}" for i in layers], inter_attention=not args.no_inter_attention
        )
        train = TrainConfig(steps=args.train_steps, max_sequence=args.max_sequence, seed=args.seed)
        editor, _ = dafnet_train(model, tok, train_records, cfg, train, checkpoint=args.editor)
    else:
        editor = DAFNetEditor.load(args.editor, device=args.device)
    evaluator = EditEvaluator(model, tok, records)
    handle = sequential_edit(model, editor, records, tok, rank=args.rank)
    scores = evaluator.score(model, len(records)).as_dict()
    print(json.dumps(scores))
    if args.out:
        pysteer.save(handle, args.out, metadata={"recipe": "dafnet", "edits": len(records)})
    handle.remove()
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(
                {"scores": scores, "editor": args.editor, "edited": editor.cfg.module_sites}, f, indent=1
            )
    return 0
