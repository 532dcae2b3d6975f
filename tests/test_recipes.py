"""Recipes: locate heads + consistency edit, activation scaling, JoLA gates (tiny random models).

Most tests use ``IntTokenizer`` (texts are space-separated token ids) so they need nothing but a
tiny model; the steering-file and CLI tests use the embedded model's tokenizer with a tiny llama of
the same vocabulary, and skip with a reason when that tokenizer cannot be loaded.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import pysteer
from pysteer.models.sites import resolve_site
from pysteer.models.tiny import tiny_model
from pysteer.recipes import jola_gates as jola_mod
from pysteer.recipes import locate as locate_mod
from pysteer.recipes import scaling as scaling_mod
from pysteer.recipes._common import offsets_from_end


class IntTokenizer:
    """A tokenizer whose texts are space-separated token ids (padding id 0, left padding)."""

    pad_token_id = 0
    eos_token_id = 2
    chat_template = None

    def __init__(self):
        self.padding_side = "left"

    def __call__(self, texts, return_tensors=None, padding=False, add_special_tokens=True):
        single = isinstance(texts, str)
        ids = [[int(t) for t in s.split()] for s in ([texts] if single else texts)]
        if return_tensors is None:
            return {"input_ids": ids[0] if single else ids}
        S = max(map(len, ids))
        inp = torch.zeros(len(ids), S, dtype=torch.long)
        mask = torch.zeros(len(ids), S, dtype=torch.long)
        for i, r in enumerate(ids):
            sl = slice(S - len(r), S) if self.padding_side == "left" else slice(0, len(r))
            inp[i, sl] = torch.tensor(r)
            mask[i, sl] = 1
        return _Encoding(input_ids=inp, attention_mask=mask)

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids if not (skip_special_tokens and int(i) in (0, 2)))


class _Encoding(dict):
    def to(self, device):
        return _Encoding({k: v.to(device) for k, v in self.items()})

    def __getattr__(self, name):
        return self[name]


def _random_texts(n: int, seed: int, lo: int = 4, hi: int = 9) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        out.append(" ".join(str(int(t)) for t in torch.randint(3, 128, (length,), generator=g)))
    return out


# ------------------------------------------------------------------------------------------------
# 1. locate heads + consistency edit
# ------------------------------------------------------------------------------------------------

PLANTED = (1, 2)  # (layer, head) of a 3-layer tiny llama: later heads see the signal only through layer 2


@pytest.fixture(scope="module")
def planted_locate():
    """A tiny model whose head (1, 2) gets +3 u on prompts of class 1; pairs are labelled by class."""
    model = tiny_model("llama", num_hidden_layers=3)
    geo = pysteer.models.geometry(model)
    H, D = geo.n_heads, geo.head_dim
    N = 96
    prompts = _random_texts(N, seed=1)
    cls = torch.arange(N) % 2
    pairs = [(i, i + 2) for i in range(0, N - 2, 4)] + [(i + 1, i + 3) for i in range(0, N - 2, 4)]
    labels = [int(cls[a]) for a, _ in pairs]
    ds = locate_mod.PairDataset(prompts, torch.tensor(pairs), torch.tensor(labels), torch.arange(len(pairs)))
    u = torch.randn(D, generator=torch.Generator().manual_seed(7))
    u = u / u.norm()
    class_of = {tuple(int(t) for t in p.split()): int(c) for p, c in zip(prompts, cls)}
    current = {}
    model.register_forward_pre_hook(
        lambda m, a, k: current.__setitem__("ids", k["input_ids"]), with_kwargs=True
    )

    def plant(module, args):
        x = args[0]
        ids = current["ids"]
        c = torch.tensor(
            [class_of.get(tuple(int(t) for t in row[row != 0].tolist()), 0) for row in ids], dtype=x.dtype
        )
        x = x.reshape(x.shape[0], x.shape[1], H, D).clone()
        x[:, :, PLANTED[1]] += 3.0 * c[:, None, None] * u
        return (x.reshape(args[0].shape),)

    resolve_site(model, f"layers.{PLANTED[0]}.attn.heads").module.register_forward_pre_hook(plant)
    result = locate_mod.locate_heads(model, IntTokenizer(), ds, probe_steps=200)
    return result, u


def test_locate_ranks_the_planted_head_first(planted_locate):
    result, _ = planted_locate
    assert result.accuracy.shape == (3, 4)
    assert result.ranking()[0] == PLANTED
    assert float(result.accuracy[PLANTED]) > 0.95
    # heads before the planted layer carry no class information
    assert float(result.accuracy[0].max()) < 0.8


def test_located_direction_matches_the_planted_one(planted_locate):
    result, u = planted_locate
    cos = torch.nn.functional.cosine_similarity(result.diff[PLANTED], u, dim=0)
    assert float(cos) > 0.9
    assert float(result.sigma[PLANTED]) > 0


def test_head_biases_are_alpha_sigma_unit(planted_locate):
    result, u = planted_locate
    (iv,) = [b for b in result.head_biases(1, alpha=4.0)]
    assert (iv.layer, iv.head) == (PLANTED[0], [PLANTED[1]])
    geo = pysteer.models.geometry(tiny_model("llama", num_hidden_layers=3))
    a = iv.affine_terms(geo).a[PLANTED[1]]
    expected = 4.0 * result.sigma[PLANTED] * result.unit(*PLANTED)
    torch.testing.assert_close(a, expected)


def test_locate_result_round_trips_through_safetensors(planted_locate, tmp_path):
    result, _ = planted_locate
    path = result.save(tmp_path / "located.safetensors")
    back = locate_mod.LocateResult.load(path)
    assert torch.equal(back.accuracy, result.accuracy) and torch.equal(back.diff, result.diff)
    assert back.heldout_groups == result.heldout_groups and back.ranking() == result.ranking()
    with pytest.raises(ValueError, match="not a file written by locate_heads"):
        pysteer.save([pysteer.VectorScale("layers.0.attn.out", 2.0)], tmp_path / "other.safetensors")
        locate_mod.LocateResult.load(tmp_path / "other.safetensors")


def test_locate_needs_both_labels():
    ds = locate_mod.PairDataset(
        ["1 2", "3 4", "5 6", "7 8"], torch.tensor([[0, 1], [2, 3]]), torch.ones(2), torch.arange(2)
    )
    feats = torch.randn(4, 2, 4, 16)
    with pytest.raises(ValueError, match="only one label"):
        locate_mod.locate_from_features(feats, ds, test_fraction=0.5)
    with pytest.raises(ValueError, match="pair indexes outside"):
        locate_mod.PairDataset(["1"], torch.tensor([[0, 1]]), torch.ones(1), torch.zeros(1))


def test_consistency_metric_matches_answers_by_string():
    facts = [
        locate_mod.ParaphraseFact("capital", "France", "Paris", (), ("q1", "q2", "q3")),
        locate_mod.ParaphraseFact("capital", "Brazil", "Brasilia", ("Brasília",), ("q1", "q2")),
    ]
    answers = [
        "The capital of France is Paris.",
        "Paris, of course",
        "I think it is Brasilia",  # a wrong known answer: disagrees with Paris
        "The capital is Brasília.",  # an alias counts as the canonical answer
        "BRASILIA",
    ]
    m = locate_mod.consistency_metrics(facts, answers)
    # France: (Paris, Paris) agree, (Paris, brasilia) x2 disagree; Brazil: 1 pair agrees
    assert m["n_pairs"] == 4 and m["consistency"] == pytest.approx(2 / 4)
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert locate_mod.consistency_metrics(facts[:1], ["no idea", "no idea", "Paris"])["consistency"] == 0.0


def test_shipped_paraphrases_parse():
    facts = locate_mod.load_paraphrases()
    assert {f.relation for f in facts} == {"capital", "language", "currency"}
    assert all(len(f.prompts) >= 4 for f in facts)
    matcher = locate_mod.AnswerMatcher(facts)
    for f in facts:
        assert matcher.key(f, f"The answer is {f.answer}.") == locate_mod._fold(f.answer)


def test_consistency_edit_file_reloads_and_steers_generation(planted_locate, tmp_path):
    result, _ = planted_locate
    model = tiny_model("llama", num_hidden_layers=3)
    path = locate_mod.consistency_edit(
        result, tmp_path / "edit.safetensors", k=2, alpha=5.0, positions="generated"
    )
    spec = pysteer.load(path)
    assert spec.positions == "generated" and spec.metadata["k"] == 2
    ids = torch.tensor([[5, 9, 17, 33]])
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=4, do_sample=False)
        with pysteer.steer(model, spec) as handle:
            assert handle.mode == "dynamic"
            steered = model.generate(ids, max_new_tokens=4, do_sample=False)
            with handle.prompt_length(4):
                logits = model(steered).logits
        ref = model(steered).logits
    assert steered.shape == plain.shape
    assert not torch.equal(logits[:, 4:], ref[:, 4:])  # the generated positions are steered ...
    assert torch.equal(logits[:, :4], ref[:, :4])  # ... the prompt is not


# ------------------------------------------------------------------------------------------------
# 2. activation scaling
# ------------------------------------------------------------------------------------------------

TARGET, COMPETITOR = 10, 11


@pytest.fixture(scope="module")
def planted_preference():
    """A tiny llama whose lm_head prefers token 11 over token 10 on every training prompt."""
    model = tiny_model("llama")
    tok = IntTokenizer()
    texts = _random_texts(24, seed=0, lo=6, hi=7)
    finals = []
    hook = model.model.norm.register_forward_hook(lambda m, a, o: finals.append(o[:, -1].detach()))
    with torch.no_grad():
        model(**tok(texts, return_tensors="pt", padding=True))
    hook.remove()
    u = finals[0].mean(0)
    with torch.no_grad():
        model.lm_head.weight[COMPETITOR] = model.lm_head.weight[TARGET] + 5.0 * u / u.norm()
        logits = model(**tok(texts, return_tensors="pt", padding=True)).logits[:, -1]
    keep = [t for t, d in zip(texts, logits[:, TARGET] - logits[:, COMPETITOR]) if d < 0]
    assert len(keep) >= 16
    prompts = [scaling_mod.ConflictPrompt(t, str(TARGET), str(COMPETITOR)) for t in keep]
    return model, tok, prompts, _fit_scalars(model, tok, prompts, lambda_m=0.0, zero_tol=0.0)


def _fit_scalars(model, tok, prompts, lambda_m: float, zero_tol: float):
    """ActivScalar on the planted task; only the minimality weight and the zero tolerance vary."""
    return scaling_mod.activation_scaling(
        model, tok, prompts, betas=(1,), steps=60, lr=0.2, lambda_m=lambda_m, lambda_f=0.1,
        batch_size=len(prompts), zero_tol=zero_tol,
    )  # fmt: skip


def test_activation_scaling_flips_the_planted_preference(planted_preference):
    model, tok, prompts, free = planted_preference
    before = scaling_mod.evaluate_scaling(model, tok, None, prompts)
    assert before["unsteered_target_preferred"] == 0.0
    after = scaling_mod.evaluate_scaling(model, tok, free, prompts)
    assert after["beta+1"]["success"] >= 0.9
    assert free.history["psi"][-1] < 0.5 * free.history["psi"][0]


def test_l1_term_shrinks_the_scalars(planted_preference):
    model, tok, prompts, free = planted_preference
    sparse = _fit_scalars(model, tok, prompts, lambda_m=0.3, zero_tol=1e-2)
    l1_free = float(free.params["alpha"].abs().sum())
    l1_sparse = float(sparse.params["alpha"].abs().sum())
    assert l1_sparse < 0.6 * l1_free
    assert sparse.n_nonzero() < free.n_nonzero()


def _reference_affine(x, rows, M, A, backend):
    """Plain autograd math of the op (what the affine op's backward must reproduce)."""
    r = rows.long()
    y = x * M[r].to(x.dtype) + A[r].to(x.dtype)
    return torch.where((r == 0)[:, None, None], x, y)


@pytest.mark.parametrize("method", ["scalar", "vector", "dynamic"])
def test_scaling_gradients_through_the_affine_op_match_float64(method, monkeypatch):
    """The trainable handle's gradients (the op's own backward) are as close to a float64 truth as
    plain float32 autograd math of the same edit."""
    import pysteer.scalars as scalars_mod

    tok = IntTokenizer()
    # equal lengths: no padding (a float64 llama turns fully masked padding rows into NaN)
    prompts = [scaling_mod.ConflictPrompt(t, "10", "11") for t in _random_texts(6, seed=3, lo=7, hi=8)]
    sites = ["layers.0.attn.out", "layers.1.mlp.out", "layers.1.attn.out"]
    model = tiny_model("llama")
    kw = dict(sites=sites, method=method, window=5, betas=(1, -1), margin=2.0, lambda_f=0.5, lambda_m=0.0)
    g = torch.Generator().manual_seed(0)
    base = scaling_mod._init_params(method, len(sites), 5, [64] * 3, [1] * 3, "cpu")
    base = {k: (torch.randn(v.shape, generator=g) * 0.3) for k, v in base.items()}
    op = scalars_mod.affine_steer

    def grads(m, dtype, affine):
        monkeypatch.setattr(scalars_mod, "affine_steer", affine)
        params = {k: v.to(dtype).clone().requires_grad_(True) for k, v in base.items()}
        with torch.no_grad():
            ref = scaling_mod._last_logits(m, *_ids(tok, prompts))
        psi, _ = scaling_mod.scaling_objective(m, tok, prompts, params, ref_logits=ref, backend="torch", **kw)
        psi.backward()
        return {k: v.grad.double() for k, v in params.items()}

    g_op = grads(model, torch.float32, op)
    g_ref32 = grads(model, torch.float32, _reference_affine)
    g_64 = grads(tiny_model("llama").double(), torch.float64, _reference_affine)
    for k in base:
        err_op = (g_op[k] - g_64[k]).abs().max().item()
        err_ref = (g_ref32[k] - g_64[k]).abs().max().item()
        scale = g_64[k].abs().max().item()
        assert scale > 0
        assert err_op <= 2 * err_ref + 1e-6 * scale, (k, err_op, err_ref, scale)


def _ids(tok, prompts):
    enc = tok([p.text for p in prompts], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_offsets_count_back_from_the_last_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert offsets_from_end(mask).tolist() == [[0, 0, -3, -2, -1], [-5, -4, -3, -2, -1]]
    right = torch.tensor([[1, 1, 0]])
    assert offsets_from_end(right).tolist() == [[-2, -1, 0]]


def _training_logits(model, result, ids, mask, beta):
    """Last-token logits through the training path: a trainable handle over the stacked parameters."""
    params = {k: v.clone() for k, v in result.params.items()}
    configs = scaling_mod._configs(result.method, result.sites, params)
    with pysteer.steer(model, configs, trainable=True) as h, torch.no_grad():
        h.rows([f"beta{beta:+d}"] * ids.shape[0])
        return model(input_ids=ids, attention_mask=mask).logits[:, -1]


def test_scaling_file_reproduces_the_trained_intervention(planted_preference, tmp_path):
    model, tok, prompts, free = planted_preference
    paths = free.save(tmp_path / "scal")
    assert [p.name for p in paths] == ["steering.safetensors"]
    spec = pysteer.load(paths[0])
    assert spec.positions == "all" and list(spec.configs) == ["beta+1", "beta-1"]
    assert all(isinstance(iv, pysteer.ActivScalar) for iv in spec.configs["beta+1"])
    ids, mask = _ids(tok, prompts)
    trained = _training_logits(model, free, ids, mask, 1)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    with pysteer.steer(model, spec) as h:
        assert h.mode == "dynamic"
        with torch.no_grad():
            from_file = model(input_ids=ids, attention_mask=mask).logits[:, -1]
            out = model.generate(
                input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=3, do_sample=False
            )
    assert not torch.allclose(trained, base, atol=1e-3)
    torch.testing.assert_close(from_file, trained, rtol=1e-5, atol=1e-5)
    assert out.shape == (2, ids.shape[1] + 3)
    # the same steering on the fast path generates what Hugging Face's generate did under the handle
    prompts_ids = [r[m.bool()].tolist() for r, m in zip(ids[:2], mask[:2])]
    fast = pysteer.generate(
        model, prompts_ids, steering=spec.configs["beta+1"], max_new_tokens=3, compile=False
    )
    assert fast.tokens == out[:, ids.shape[1] :].tolist()


def test_scaling_rejects_bad_input(planted_preference):
    model, tok, prompts, _ = planted_preference
    with pytest.raises(ValueError, match="method"):
        scaling_mod.activation_scaling(model, tok, prompts, method="nope")
    with pytest.raises(ValueError, match="betas"):
        scaling_mod.activation_scaling(model, tok, prompts, betas=(2,))
    with pytest.raises(ValueError, match="resid"):
        scaling_mod.activation_scaling(model, tok, prompts, sites=["layers.0.resid"])
    with pytest.raises(ValueError, match="same target and competitor"):
        scaling_mod.activation_scaling(model, tok, [scaling_mod.ConflictPrompt("5 6", "7", "7")], steps=1)


# ------------------------------------------------------------------------------------------------
# 3. JoLA
# ------------------------------------------------------------------------------------------------


def test_jola_with_closed_gates_is_the_identity_bit_exactly():
    model = tiny_model("llama")
    tok = IntTokenizer()
    p = jola_mod.init_params(model, init_log_alpha=-10.0)
    g = torch.Generator().manual_seed(0)
    p.add.copy_(torch.randn(p.add.shape, generator=g))
    p.mul.copy_(torch.randn(p.mul.shape, generator=g))
    enc = tok(_random_texts(5, seed=4), return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**enc).logits
        with jola_mod.steer_gates(model, p, training=False):
            out = model(**enc).logits
    assert torch.equal(out, ref)
    assert p.n_open() == 0 and p.interventions() == []


def test_jola_l0_penalty_matches_the_closed_form():
    tau, (low, high) = jola_mod.TEMPERATURE, jola_mod.STRETCH
    assert (tau, low, high) == (0.33, -0.1, 1.1)
    la = torch.tensor([-4.0, -1.0, tau * math.log(-low / high), 0.0, 2.5])
    closed = torch.sigmoid(la - tau * math.log(-low / high))
    torch.testing.assert_close(jola_mod.expected_l0(la), closed)
    assert jola_mod.expected_l0(la)[2].item() == pytest.approx(0.5)
    # P(gate > 0) measured on samples of the training gate
    g = torch.Generator().manual_seed(0)
    samples = jola_mod.hard_concrete_sample(la.expand(200_000, -1).contiguous(), generator=g)
    measured = (samples > 0).double().mean(0)
    torch.testing.assert_close(measured, closed.double(), atol=4e-3, rtol=0)
    # evaluation gate: exact 0 below log(1/11), exact 1 above log(11)
    ev = jola_mod.hard_concrete_eval(torch.tensor([-2.5, math.log(1 / 11) - 1e-3, 0.0, 2.5]))
    assert ev[0] == 0 and ev[1] == 0 and ev[2] == pytest.approx(0.5) and ev[3] == 1


@pytest.fixture(scope="module")
def jola_trained():
    model = tiny_model("llama")
    tok = IntTokenizer()
    labels = ["20", "21", "22"]
    examples = [jola_mod.LabelledText(t, labels[i % 3]) for i, t in enumerate(_random_texts(24, seed=6))]
    before = jola_mod.evaluate_topics(model, tok, examples, prompt="{text}")
    r = jola_mod.jola(
        model,
        tok,
        examples,
        steps=60,
        lr=0.5,  # the tiny model's o_proj weights have std 0.02: head edits must be large to move its logits
        gate_lr=0.1,
        lambda_l0=1.0,
        batch_size=12,
        prompt="{text}",
        seed=0,
    )
    return model, tok, examples, before, r


def test_jola_lowers_the_loss_and_closes_most_gates(jola_trained):
    model, tok, examples, before, r = jola_trained
    after = jola_mod.evaluate_topics(model, tok, examples, r, prompt="{text}")
    assert after["ce"] < before["ce"] - 0.4  # measured: 4.87 -> 4.26
    assert 0 < r.n_open() < 0.5 * r.n_gates()
    assert r.history["l0"][-1] < r.history["l0"][0]


def test_jola_folded_equals_hooked_and_file_reloads(jola_trained, tmp_path):
    model, tok, examples, _, r = jola_trained
    check = jola_mod.fold_check(model, tok, r, examples, prompt="{text}")
    assert check["max_abs_diff_dynamic"] == 0.0
    assert check["max_abs_diff_fold"] <= 1e-5 * max(1.0, check["max_abs_logit"])
    spec = pysteer.load(r.save(tmp_path / "jola.safetensors"))
    enc = tok([e.text for e in examples[:4]], return_tensors="pt", padding=True)
    with pysteer.steer(model, spec) as handle:
        assert handle.mode == "fold"
        out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3


# ------------------------------------------------------------------------------------------------
# CLI smoke tests (tiny llama with the embedded tokenizer, saved to a directory)
# ------------------------------------------------------------------------------------------------


def test_cli_locate_reports_single_label_data_clearly(tiny_dir, tmp_path, capsys):
    from pysteer.cli import main

    rc = main(
        [
            "locate",
            "--model",
            str(tiny_dir),
            "--relations",
            "capital",
            "--max-facts",
            "3",
            "--max-new-tokens",
            "2",
            "--probe-steps",
            "5",
            "--out",
            str(tmp_path / "loc.safetensors"),
        ]
    )
    # a random model never names a capital: every pair disagrees, which the probe cannot learn from
    assert rc == 2
    assert "only one label" in capsys.readouterr().err


def test_cli_edit_writes_a_steering_file_that_generate_uses(planted_locate, tiny_dir, tmp_path, capsys):
    from pysteer.cli import main

    result, _ = planted_locate
    L, H, D = 2, 4, 16  # the tiny llama of tiny_dir
    small = locate_mod.LocateResult(
        result.accuracy[:L],
        result.heldout_loss[:L],
        result.diff[:L],
        result.sigma[:L],
        result.heldout_groups,
        {},
    )
    assert small.diff.shape == (L, H, D)
    located = small.save(tmp_path / "located.safetensors")
    out = tmp_path / "edit.safetensors"
    assert main(["edit", "--located", str(located), "--k", "2", "--alpha", "3", "--out", str(out)]) == 0
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_dir),
                "--steer",
                str(out),
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    assert "steering:" in capsys.readouterr().err


def test_cli_scale_trains_saves_and_reports(tiny_dir, tmp_path):
    from pysteer.cli import main

    js = tmp_path / "scale.json"
    rc = main(
        [
            "scale",
            "--model",
            str(tiny_dir),
            "--method",
            "all",
            "--layers",
            "1",
            "--max-prompts",
            "8",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--zero-tol",
            "0",
            "--out-dir",
            str(tmp_path / "scal"),
            "--json-out",
            str(js),
        ]
    )
    assert rc == 0
    summary = json.loads(js.read_text())
    assert set(summary["methods"]) == {"scalar", "vector", "dynamic"}
    for method in ("scalar", "vector"):
        files = summary["methods"][method]["steering_files"]
        assert files and all(pysteer.load(f).configs for f in files)
    assert (tmp_path / "scal" / "scalar.png").stat().st_size > 0
    assert summary["methods"]["dynamic"]["test_long"]["beta+1"]["success"] is not None


def test_cli_jola_trains_and_saves(tiny_dir, tmp_path):
    from pysteer.cli import main

    js = tmp_path / "jola.json"
    out = tmp_path / "jola.safetensors"
    rc = main(
        [
            "jola",
            "--model",
            str(tiny_dir),
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--lambda-l0",
            "0",
            "--out",
            str(out),
            "--json-out",
            str(js),
        ]
    )
    assert rc == 0
    summary = json.loads(js.read_text())
    assert summary["fold_check"]["max_abs_diff_fold"] <= 1e-4
    assert pysteer.load(out).metadata["recipe"] == "jola"
    assert (tmp_path / "jola.png").stat().st_size > 0 and (tmp_path / "jola_loss.png").stat().st_size > 0


def test_per_head_scalars_save_one_file_that_reproduces_the_training_path(tmp_path):
    model = tiny_model("llama")
    tok = IntTokenizer()
    sites = scaling_mod.default_sites(model, heads=True)
    alpha = torch.randn(len(sites), 3, 4, generator=torch.Generator().manual_seed(2)) * 0.5
    alpha[0] = 0  # an all-zero site is not written
    r = scaling_mod.ScalingResult("scalar", sites, 3, {"alpha": alpha}, [1, -1])
    (path,) = r.save(tmp_path / "heads")
    spec = pysteer.load(path)
    assert [iv.site_name for iv in spec.configs["beta+1"]] == sites[1:]
    ids, mask = _ids(tok, [scaling_mod.ConflictPrompt(t, "1", "2") for t in _random_texts(4, seed=8)])
    for beta, config in ((1, "beta+1"), (-1, "beta-1")):
        trained = _training_logits(model, r, ids, mask, beta)
        with pysteer.steer(model, spec) as h, torch.no_grad():
            h.rows([config] * ids.shape[0])
            from_file = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        torch.testing.assert_close(from_file, trained, rtol=1e-5, atol=1e-6)
