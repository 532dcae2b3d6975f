"""Tracing: in-memory captures, the streamed dataset, the reader, SAE storage, the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import pysteer
from pysteer.models.sites import LINEARS, SITE_KINDS, install_site_hook, resolve_site
from pysteer.models.specs import geometry, get_spec, get_submodule
from pysteer.models.tiny import TINY_TYPES, tiny_model
from pysteer.tracing import CorruptShardError, TraceConfigError, TraceReader, trace, trace_dataset

ALL_KINDS_SITES = [
    "embed",
    "layers.0.resid_pre",
    "layers.0.attn.q",
    "layers.0.attn.k",
    "layers.0.attn.v",
    "layers.0.attn.heads",
    "layers.0.attn.out",
    "layers.0.mlp.hidden",
    "layers.0.mlp.out",
    "layers.0.resid",
    "layers.1.resid",
    *(f"layers.0.{linear}.{side}" for linear in LINEARS for side in ("in", "out")),
]
QKV = ("attn.q", "attn.k", "attn.v")


def all_kinds_sites(model: nn.Module) -> list[str]:
    """ALL_KINDS_SITES less attn.q|k|v where the architecture fuses them (resolving them says so), and
    less the MLP's gate / up linears where it has none of its own."""
    spec = get_spec(model)
    sites = [s for s in ALL_KINDS_SITES if spec.q_proj is not None or not s.endswith(QKV)]
    missing = [
        name
        for name, path in (("mlp.gate_proj", spec.mlp_gate_proj), ("mlp.up_proj", spec.mlp_up_proj))
        if path is None
    ]
    return [s for s in sites if not any(f".{name}." in s for name in missing)]


DOC_LENGTHS = [5, 11, 1, 0, 17, 8, 3, 13]


def make_docs(lengths=DOC_LENGTHS, seed=0, vocab=128) -> list[list[int]]:
    """Token documents with no id 0 (the pad id), so a stored 0 would reveal a padded row."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def manual_site_hooks(model: nn.Module, site_names: list[str], store: dict[str, list[torch.Tensor]]):
    """Plain module hooks at the HF module points of DESIGN §2, independent of pysteer's hook code."""
    spec = get_spec(model)
    layers = get_submodule(model, spec.layers)
    handles = []
    for name in site_names:
        store[name] = []

        def keep(t, name=name):
            store[name].append(t.detach().clone())

        if name == "embed":
            handles.append(
                model.get_input_embeddings().register_forward_hook(lambda m, a, out, keep=keep: keep(out))
            )
            continue
        _, i, *kind = name.split(".")
        kind = ".".join(kind)
        layer = layers[int(i)]
        linear_paths = {
            "mlp.gate_proj": spec.mlp_gate_proj,
            "mlp.up_proj": spec.mlp_up_proj,
            "mlp.down_proj": spec.mlp_out_proj,
            "attn.o_proj": spec.attn_out_proj,
        }
        linear, _, side = kind.rpartition(".")
        if linear in linear_paths:
            mod = get_submodule(layer, linear_paths[linear])
            if side == "in":
                handles.append(mod.register_forward_pre_hook(lambda m, args, keep=keep: keep(args[0])))
            else:
                handles.append(mod.register_forward_hook(lambda m, a, out, keep=keep: keep(out)))
            continue
        if kind in ("attn.heads", "mlp.hidden", "resid_pre"):
            path = {"attn.heads": spec.attn_out_proj, "mlp.hidden": spec.mlp_out_proj, "resid_pre": ""}[kind]
            mod = get_submodule(layer, path)
            handles.append(
                mod.register_forward_pre_hook(
                    lambda m, args, kw, keep=keep: keep(args[0] if args else kw["hidden_states"]),
                    with_kwargs=True,
                )
            )
        else:
            mod = {
                "attn.q": get_submodule(layer, spec.q_proj or ""),
                "attn.k": get_submodule(layer, spec.k_proj or ""),
                "attn.v": get_submodule(layer, spec.v_proj or ""),
                "attn.out": get_submodule(layer, spec.attn_out_proj),
                "mlp.out": get_submodule(layer, spec.mlp),
            }.get(kind, layer)
            handles.append(
                mod.register_forward_hook(
                    lambda m, a, out, keep=keep: keep(out[0] if isinstance(out, tuple) else out)
                )
            )
    return handles


def reference_rows(model: nn.Module, docs: list[list[int]], site_names: list[str]) -> dict[str, torch.Tensor]:
    """Each document run alone (no padding), rows concatenated: ``{site: [N, width]}``."""
    rows: dict[str, list[torch.Tensor]] = {s: [] for s in site_names}
    for doc in docs:
        if not doc:
            continue
        store: dict[str, list[torch.Tensor]] = {}
        handles = manual_site_hooks(model, site_names, store)
        with torch.no_grad():
            model(torch.tensor([doc]))
        for h in handles:
            h.remove()
        for s in site_names:
            t = store[s][0]
            rows[s].append(t.reshape(len(doc), t.shape[-1]))  # [1, S, W], or [S, W] for OPT's MLP
    return {s: torch.cat(v) for s, v in rows.items()}


# --------------------------------------------------------------------------- in memory


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_trace_equals_manual_hooks_for_every_site_kind(model_type):
    assert {name.split(".", 2)[-1] for name in ALL_KINDS_SITES} == set(SITE_KINDS)
    model = tiny_model(model_type)
    sites = all_kinds_sites(model)
    if get_spec(model).q_proj is None:  # fused query/key/value: the three sites do not exist
        with pytest.raises(ValueError, match="fused projection"):
            with trace(model, "layers.0.attn.q"):
                pass
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a right-padded row
    manual: dict[str, list[torch.Tensor]] = {}
    handles = manual_site_hooks(model, sites, manual)
    with torch.no_grad(), trace(model, sites) as cache:
        model(ids, attention_mask=mask)
    for h in handles:
        h.remove()
    geo = geometry(model)
    heads = {
        "attn.heads": geo.n_heads,
        "attn.o_proj.in": geo.n_heads,
        "attn.q": geo.n_heads,
        "attn.k": geo.n_kv_heads,
        "attn.v": geo.n_kv_heads,
    }
    for name in sites:
        expected = manual[name][0]
        H = heads.get(name.split(".", 2)[-1])
        width = expected.shape[-1]
        shape = (2, 9, H, width // H) if H else (2, 9, width)
        # OPT runs its MLP on flattened tokens [B*S, d]; the trace restores [B, S, d]
        assert cache[name].shape == shape, (model_type, name)
        assert torch.equal(cache[name], expected.reshape(shape)), (model_type, name)


def test_per_head_sites_are_batch_seq_heads_headdim():
    model = tiny_model("qwen3")  # head_dim * heads (96) != d_model (64)
    with torch.no_grad(), trace(model, "layers.1.attn.heads") as cache:
        model(torch.randint(3, 128, (3, 5)))
    assert cache["layers.1.attn.heads"].shape == (3, 5, 4, 24)


def test_generate_concatenates_decode_steps_along_seq():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), trace(model, ["layers.1.resid", "layers.0.attn.heads"]) as cache:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 11)
    # generate() runs the model on every token but the one it emits last
    with torch.no_grad(), trace(model, ["layers.1.resid", "layers.0.attn.heads"]) as full:
        model(out[:, :-1])
    assert cache["layers.1.resid"].shape == (2, 10, 64)
    assert cache["layers.0.attn.heads"].shape == (2, 10, 4, 16)
    torch.testing.assert_close(cache["layers.1.resid"], full["layers.1.resid"], rtol=1e-5, atol=1e-5)


def test_positions_last_follows_the_attention_mask():
    model = tiny_model("gpt2")
    ids = torch.randint(3, 128, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # row 0 ends at position 3
    with torch.no_grad(), trace(model, "layers.1.resid", positions="last") as last:
        model(ids, attention_mask=mask)
    with torch.no_grad(), trace(model, "layers.1.resid") as every:
        model(ids, attention_mask=mask)
    got = last["layers.1.resid"]
    assert got.shape == (2, 1, 64)
    assert torch.equal(got[0, 0], every["layers.1.resid"][0, 3])
    assert torch.equal(got[1, 0], every["layers.1.resid"][1, 6])


def test_positions_last_with_generate_keeps_one_position_per_step():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 4))
    with torch.no_grad(), trace(model, "layers.0.resid", positions="last") as cache:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert cache["layers.0.resid"].shape == (1, 3, 64)  # prompt's last token + 2 decode steps


def test_prefill_only_keeps_each_generate_calls_last_prompt_token():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: row 0's prompt starts at position 2
    sites = ["layers.1.resid", "layers.0.attn.heads"]
    with torch.no_grad(), trace(model, sites, positions="last", prefill_only=True, device="cpu") as cache:
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        model.generate(ids[1:], attention_mask=mask[1:], max_new_tokens=2, do_sample=False)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate() counts them
    with torch.no_grad(), trace(model, sites) as prompt:
        model(ids, attention_mask=mask, position_ids=position_ids)
    first, second = cache.runs("layers.0.attn.heads")  # one run per call, decode steps skipped
    assert first.shape == (3, 1, 4, 16) and second.shape == (2, 1, 4, 16)
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first[:, 0], prompt["layers.0.attn.heads"][:, -1], **close)
    torch.testing.assert_close(second[:, 0], prompt["layers.0.attn.heads"][1:, -1], **close)
    assert cache.runs("layers.1.resid")[0].shape == (3, 1, 64)
    torch.testing.assert_close(
        cache.runs("layers.1.resid")[0][:, 0], prompt["layers.1.resid"][:, -1], **close
    )


def test_positions_list_and_slice_select_absolute_positions():
    model = tiny_model("opt")
    ids = torch.randint(3, 128, (2, 8))
    with torch.no_grad(), trace(model, "layers.0.mlp.out") as every:
        model(ids)
    with torch.no_grad(), trace(model, "layers.0.mlp.out", positions=[0, 3, -1]) as some:
        model(ids)
    with torch.no_grad(), trace(model, "layers.0.mlp.out", positions=slice(2, 6, 2)) as sliced:
        model(ids)
    all_pos = every["layers.0.mlp.out"]
    assert torch.equal(some["layers.0.mlp.out"], all_pos[:, [0, 3, 7]])
    assert torch.equal(sliced["layers.0.mlp.out"], all_pos[:, 2:6:2])


def test_separate_forwards_are_separate_runs():
    model = tiny_model("llama")
    with torch.no_grad(), trace(model, "layers.0.resid") as cache:
        model(torch.randint(3, 128, (1, 4)))
        model(torch.randint(3, 128, (1, 6)))
    assert [t.shape[1] for t in cache.runs("layers.0.resid")] == [4, 6]
    with pytest.raises(ValueError, match="2 separate runs"):
        cache["layers.0.resid"]


def test_trace_sees_steering_installed_after_it():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad(), trace(model, "layers.0.resid") as plain:
        model(ids)
    vector = torch.randn(64)
    with torch.no_grad(), trace(model, "layers.0.resid") as steered:
        with pysteer.steer(model, pysteer.VectorAdd("layers.0.resid", vector, 1.0), mode="dynamic"):
            model(ids)
    torch.testing.assert_close(steered["layers.0.resid"], plain["layers.0.resid"] + vector)


def test_trace_runs_after_prepended_site_hooks():
    model = tiny_model("gpt_neox")
    ids = torch.randint(3, 128, (1, 5))
    r = resolve_site(model, "layers.1.attn.heads")
    with torch.no_grad(), trace(model, "layers.1.attn.heads") as cache:
        # registered after the trace hook, but prepended: runs first, as steering does
        h = install_site_hook(r, lambda x: x * 0 + 3.0, prepend=True)
        model(ids)
        h.remove()
    assert torch.all(cache["layers.1.attn.heads"] == 3.0)


def test_trace_rejects_unknown_sites_before_hooking():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        with trace(model, "layers.7.resid"):
            pass
    with pytest.raises(ValueError, match="unknown site"):
        with trace(model, "layers.0.ffn"):
            pass
    assert not model._forward_pre_hooks


# --------------------------------------------------------------------------- dataset


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_trace_dataset_rows_equal_unpadded_forward(model_type, tmp_path):
    model = tiny_model(model_type)
    docs = make_docs()
    sites = all_kinds_sites(model)
    trace_dataset(model, docs, sites, tmp_path, dtype=torch.float32, batch_size=3, shard_tokens=16)
    reader = TraceReader(tmp_path)
    expected = reference_rows(model, docs, sites)
    for name in sites:
        got = reader.load(name)
        torch.testing.assert_close(got.reshape(got.shape[0], -1), expected[name], rtol=1e-5, atol=1e-5)


def test_padding_is_never_stored(tmp_path):
    model = tiny_model("llama")
    docs = make_docs()
    trace_dataset(model, docs, "layers.1.resid", tmp_path, batch_size=4, shard_tokens=10)
    reader = TraceReader(tmp_path)
    assert reader.num_rows == sum(DOC_LENGTHS)
    assert reader.token_ids().tolist() == [t for d in docs for t in d]
    assert reader.doc_ids().tolist() == [i for i, d in enumerate(docs) for _ in d]
    assert reader.positions().tolist() == [p for d in docs for p in range(len(d))]
    assert 0 not in reader.token_ids().tolist()


def count_calls(modules: list[nn.Module]) -> list[int]:
    """Completed forwards of each module (a forward hook runs only when the module finished)."""
    counts = [0] * len(modules)
    for i, m in enumerate(modules):

        def bump(*_, i=i):
            counts[i] += 1

        m.register_forward_hook(bump)
    return counts


def test_early_stop_runs_no_later_layer_and_no_lm_head(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4)
    layers = list(model.model.layers)
    calls = count_calls([*layers, model.model.norm, model.lm_head])
    trace_dataset(model, make_docs(), ["layers.1.mlp.out", "layers.0.resid"], tmp_path, batch_size=4)
    batches = 2  # 8 documents (one empty) in batches of 4
    # layer 1 stops right after its MLP, before its residual add
    assert calls == [batches, 0, 0, 0, 0, 0]


def test_early_stop_at_attn_heads_skips_the_output_projection(tmp_path):
    model = tiny_model("gpt2")
    block = model.transformer.h[1]
    calls = count_calls([block.attn.c_proj, block.mlp, model.lm_head])
    trace_dataset(model, make_docs(), "layers.1.attn.heads", tmp_path, batch_size=8)
    assert calls == [0, 0, 0]


def test_shards_hold_whole_documents_and_cut_at_shard_tokens(tmp_path):
    model = tiny_model("llama")
    trace_dataset(model, make_docs(), "layers.0.resid", tmp_path, shard_tokens=12, batch_size=3)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    rows = [s["rows"] for s in manifest["shards"]]
    # documents of 5+11 | 1+0+17 | 8+3+13 rows: each shard closes at the first document reaching 12
    assert rows == [16, 18, 24]
    for s in manifest["shards"]:
        doc_ids = load_file(tmp_path / s["file"])["doc_ids"]
        assert doc_ids[0].item() == s["doc_ids"][0] and doc_ids[-1].item() == s["doc_ids"][1]
    assert (
        manifest["complete"] and manifest["rows"] == sum(DOC_LENGTHS) and manifest["docs"] == len(DOC_LENGTHS)
    )


def test_manifest_records_config_sites_and_checksums(tmp_path):
    model = tiny_model("phi3")
    trace_dataset(model, make_docs(), ["layers.1.attn.heads", "layers.0.resid"], tmp_path, shard_tokens=30)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    cfg = manifest["config"]
    assert cfg["sites"] == ["layers.1.attn.heads", "layers.0.resid"]
    assert cfg["dtype"] == "float16" and cfg["model"]["model_type"] == "phi3"
    assert len(cfg["model"]["config_sha256"]) == 64 and len(cfg["model"]["weights_fingerprint"]) == 64
    assert manifest["sites"]["layers.1.attn.heads"] == {"kind": "dense", "shape": [4, 16], "dtype": "float16"}
    import hashlib

    for s in manifest["shards"]:
        assert hashlib.sha256((tmp_path / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_text_documents_are_tokenised(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the quick brown fox jumps over lazy dog and cat".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 3 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    texts = ["the quick brown fox", "lazy dog", "the cat jumps over the dog and the fox"]
    model = tiny_model("llama")
    trace_dataset(model, texts, "layers.0.resid", tmp_path, tokenizer=tok, max_length=6)
    reader = TraceReader(tmp_path)
    assert reader.token_ids().tolist() == [3, 4, 5, 6, 9, 10, 3, 12, 7, 8, 3, 10]
    with pytest.raises(ValueError, match="no tokenizer"):
        trace_dataset(model, texts, "layers.0.resid", tmp_path / "other")


def test_refuses_a_non_trace_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TraceConfigError, match="not a pysteer trace"):
        trace_dataset(tiny_model("llama"), make_docs(), "layers.0.resid", tmp_path)
    assert os.listdir(tmp_path) == ["notes.txt"]


# --------------------------------------------------------------------------- reader


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("traced")
    docs = make_docs([7, 3, 12, 9, 1, 15, 6, 10, 4, 8], seed=3)
    trace_dataset(
        tiny_model("llama"),
        docs,
        ["layers.0.resid", "layers.1.attn.heads"],
        out,
        dtype=torch.float32,
        shard_tokens=14,
    )
    return out


def test_reader_batches_cover_every_row_once_in_a_seeded_order(traced):
    reader = TraceReader(traced)
    full = reader.load("layers.0.resid")
    first = torch.cat(list(reader.batches("layers.0.resid", 8, shuffle=True, seed=0, shuffle_rows=20)))
    again = torch.cat(list(reader.batches("layers.0.resid", 8, shuffle=True, seed=0, shuffle_rows=20)))
    other = torch.cat(list(reader.batches("layers.0.resid", 8, shuffle=True, seed=1, shuffle_rows=20)))
    in_order = torch.cat(list(reader.batches("layers.0.resid", 8, shuffle=False)))
    assert torch.equal(in_order, full)
    assert torch.equal(first, again) and not torch.equal(first, other) and not torch.equal(first, full)

    def as_sorted(t):
        return sorted(map(tuple, t.tolist()))

    assert as_sorted(first) == as_sorted(full) == as_sorted(other)
    sizes = [b.shape[0] for b in reader.batches("layers.0.resid", 8, drop_last=True)]
    assert set(sizes) == {8} and sum(sizes) == full.shape[0] // 8 * 8


def test_reader_batches_with_meta_keep_rows_aligned(traced):
    reader = TraceReader(traced)
    full, docs, pos = reader.load("layers.1.attn.heads"), reader.doc_ids(), reader.positions()
    index = {(d, p): i for i, (d, p) in enumerate(zip(docs.tolist(), pos.tolist()))}
    for b in reader.batches("layers.1.attn.heads", 5, seed=4, with_meta=True):
        assert b["layers.1.attn.heads"].shape[1:] == (4, 16)
        rows = [index[(d, p)] for d, p in zip(b["doc_ids"].tolist(), b["positions"].tolist())]
        assert torch.equal(b["layers.1.attn.heads"], full[rows])


def test_reader_numpy_memmaps_equal_tensors(traced):
    reader = TraceReader(traced)
    for pt, npy in zip(
        reader.iter_shards("layers.0.resid"), reader.iter_shards("layers.0.resid", format="np")
    ):
        assert isinstance(npy["layers.0.resid"], np.memmap)
        assert np.array_equal(npy["layers.0.resid"], pt["layers.0.resid"].numpy())
        assert np.array_equal(npy["doc_ids"], pt["doc_ids"].numpy())
        assert set(pt) == {"layers.0.resid", "doc_ids", "positions", "token_ids"}


def test_reader_filters_by_site_and_names_unknown_ones(traced):
    reader = TraceReader(traced)
    shard = next(reader.iter_shards("layers.1.attn.heads", meta=False))
    assert list(shard) == ["layers.1.attn.heads"]
    with pytest.raises(KeyError, match="layers.3.resid"):
        reader.load("layers.3.resid")


def test_corrupt_shard_is_detected_naming_the_file(traced, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(traced, copy)
    reader = TraceReader(copy)
    victim = reader.shards[1].file
    data = bytearray((copy / victim).read_bytes())
    data[-3] ^= 0xFF  # one flipped bit-pattern in the last activation bytes
    (copy / victim).write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=victim):
        reader.verify()
    with pytest.raises(CorruptShardError, match=victim):
        list(TraceReader(copy).batches("layers.0.resid", 4, shuffle=False))
    with pytest.raises(CorruptShardError, match=victim):
        list(TraceReader(copy).iter_shards(format="np"))
    (copy / victim).unlink()
    with pytest.raises(CorruptShardError, match=f"{victim} is listed in the manifest but missing"):
        TraceReader(copy).load("layers.0.resid")


# --------------------------------------------------------------------------- SAE features


class DenseSAE:
    """Stand-in SAE: ReLU encoder returning dense features ``[T, d_sae]``."""

    def __init__(self, d_in: int, d_sae: int, k: int | None = None) -> None:
        g = torch.Generator().manual_seed(5)
        self.W_enc = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
        self.b_enc = torch.randn(d_sae, generator=g) * 0.1
        if k is not None:
            self.k = k

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_enc + self.b_enc)


class TopKSAE(DenseSAE):
    """Stand-in TopK SAE whose ``encode`` returns ``(indices, values)``."""

    def encode(self, x: torch.Tensor):
        values, indices = super().encode(x).topk(4, dim=-1)
        return indices, values


def test_sae_sites_store_topk_indices_and_values(tmp_path):
    model = tiny_model("llama")
    docs = make_docs()
    sae = DenseSAE(64, 256)
    trace_dataset(
        model,
        docs,
        ["layers.1.resid", "layers.0.resid"],
        tmp_path,
        dtype=torch.float32,
        sae={"layers.1.resid": sae},
        sae_k=8,
    )
    reader = TraceReader(tmp_path)
    info = reader.sites["layers.1.resid"]
    assert info["kind"] == "sae_topk" and info["k"] == 8 and info["d_sae"] == 256
    assert info["compression_ratio"] == pytest.approx(64 * 4 / (8 * (4 + 4)))
    idx, val = reader.load("layers.1.resid")
    assert idx.dtype == torch.int32 and idx.shape == val.shape == (sum(DOC_LENGTHS), 8)
    feats = sae.encode(reference_rows(model, docs, ["layers.1.resid"])["layers.1.resid"])
    torch.testing.assert_close(val, feats.gather(1, idx.long()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(val, feats.topk(8, dim=-1).values, rtol=1e-5, atol=1e-5)
    assert reader.load("layers.0.resid").shape == (sum(DOC_LENGTHS), 64)  # the other site stays dense
    b_idx, b_val = next(reader.batches("layers.1.resid", 6))
    assert b_idx.shape == b_val.shape == (6, 8)


def test_sae_returning_indices_and_values_is_stored_as_is(tmp_path):
    model = tiny_model("gemma2")
    trace_dataset(
        model, make_docs(), "layers.0.attn.heads", tmp_path, sae={"layers.0.attn.heads": TopKSAE(64, 128)}
    )
    reader = TraceReader(tmp_path)
    assert reader.sites["layers.0.attn.heads"]["k"] == 4
    idx, val = reader.load("layers.0.attn.heads")
    assert idx.shape == (sum(DOC_LENGTHS), 4) and val.dtype == torch.float16


def test_sae_with_dense_features_needs_k(tmp_path):
    with pytest.raises(ValueError, match="sae_k"):
        trace_dataset(
            tiny_model("llama"),
            make_docs(),
            "layers.0.resid",
            tmp_path,
            sae={"layers.0.resid": DenseSAE(64, 32)},
        )
    assert not tmp_path.joinpath("manifest.json").exists()


# --------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_traces_the_default_model(tmp_path, capsys):
    pytest.importorskip("gguf")
    from pysteer.cli import main

    data = tmp_path / "docs.jsonl"
    data.write_text(
        "\n".join(json.dumps({"text": f"Document number {i} talks about tracing."}) for i in range(6))
    )
    out = tmp_path / "trace"
    argv = [
        "trace",
        "--model",
        "default",
        "--data",
        str(data),
        "--sites",
        "layers.15.resid,layers.2.attn.heads",
    ]
    assert main([*argv, "--out", str(out), "--max-tokens", "40", "--batch-size", "4"]) == 0
    assert "dataset" in capsys.readouterr().out
    reader = TraceReader(out)
    assert reader.num_rows == 40 and reader.complete
    assert reader.load("layers.2.attn.heads").shape == (40, 9, 64)
    # a changed configuration into the same directory is refused with exit code 2
    assert main([*argv, "--out", str(out), "--max-tokens", "40", "--dtype", "float32"]) == 2
    assert "dtype: 'float16' -> 'float32'" in capsys.readouterr().err


def test_token_matrix_rows_are_documents(tmp_path):
    ids = torch.randint(3, 128, (5, 6), generator=torch.Generator().manual_seed(8))
    model = tiny_model("qwen2")
    summary = trace_dataset(model, ids, "layers.1.mlp.out", tmp_path, max_length=4, dtype=torch.float32)
    reader = TraceReader(tmp_path)
    assert summary.docs == 5 and reader.num_rows == 20
    assert reader.token_ids().reshape(5, 4).tolist() == ids[:, :4].tolist()
    # equal-length batches run without an attention mask; the rows must not change
    expected = reference_rows(model, ids[:, :4].tolist(), ["layers.1.mlp.out"])["layers.1.mlp.out"]
    torch.testing.assert_close(reader.load("layers.1.mlp.out"), expected, rtol=1e-5, atol=1e-5)


def test_package_exposes_the_tracing_api():
    assert (
        pysteer.trace is trace
        and pysteer.trace_dataset is trace_dataset
        and pysteer.TraceReader is TraceReader
    )


def test_trace_dataset_stores_steered_activations(tmp_path):
    model = tiny_model("mistral")
    docs = make_docs()
    vector = torch.randn(64, generator=torch.Generator().manual_seed(9))
    with pysteer.steer(model, pysteer.VectorAdd("layers.0.resid", vector, 2.0), mode="dynamic"):
        trace_dataset(model, docs, "layers.0.resid", tmp_path, dtype=torch.float32, batch_size=3)
    expected = reference_rows(model, docs, ["layers.0.resid"])["layers.0.resid"] + 2.0 * vector
    torch.testing.assert_close(TraceReader(tmp_path).load("layers.0.resid"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_pysteer_sae_features_are_stored_sparse(tmp_path, activation):
    from pysteer.sae import SAE

    g = torch.Generator().manual_seed(6)
    d_in, d_sae = 64, 96
    sae = SAE(
        torch.randn(d_in, d_sae, generator=g) / 8,
        torch.randn(d_sae, generator=g) * 0.1,
        torch.randn(d_sae, d_in, generator=g) / 8,
        torch.zeros(d_in),
        activation=activation,
        k=5 if activation == "topk" else None,
    )
    model, docs = tiny_model("llama"), make_docs()
    trace_dataset(
        model, docs, "layers.0.resid", tmp_path, dtype=torch.float32, sae={"layers.0.resid": sae}, sae_k=5
    )
    idx, val = TraceReader(tmp_path).load("layers.0.resid")
    feats = sae.encode(reference_rows(model, docs, ["layers.0.resid"])["layers.0.resid"])
    torch.testing.assert_close(val, feats.gather(1, idx.long()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        val.sort(dim=1).values, feats.topk(5).values.sort(dim=1).values, rtol=1e-5, atol=1e-5
    )


def test_out_of_vocabulary_token_names_the_document(tmp_path):
    docs = make_docs()
    docs[5] = [3, 4, 500]
    with pytest.raises(ValueError, match="document 5: token id 500"):
        trace_dataset(tiny_model("llama"), docs, "layers.0.resid", tmp_path, batch_size=4)
