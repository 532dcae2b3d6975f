"""Recipes: the locating / fitting workflows of the papers, each a small API, a CLI subcommand, a
steering file and a picture.

- ``locate_heads`` / ``consistency_edit``: heads whose output predicts answer consistency across
  paraphrases, and ITI biases injected there (Yang et al.; ``pysteer locate`` / ``pysteer edit``).
- ``activation_scaling``: learned per-(site, layer, position) scalars, steering vectors and
  activation-dependent scalars trained through the affine op (Stoehr et al.; ``pysteer scale``).
- ``jola``: HardConcrete-gated per-head scaling and bias, folded into ``o_proj`` (``pysteer jola``).
- ``causal_trace``: which (layer, token) states carry a fact, every cell a batch row (ROME; ``pysteer causal-trace``).
- ``absc_edit``: aspect-based sentiment by tracing the layers and training LoReFT at the aspect token
  (Li et al., ME-ABSC; ``pysteer absc``).
- ``lf_steering``: layer probes for consistency, SAE latents located there, ``add_if_active`` steering
  (Yang et al., LF-Steering; ``pysteer lf-steer``); ``selection`` holds the validation / test split both
  consistency recipes report with.
- ``load_edits`` / ``EditEvaluator`` / ``FTL``: the sequential-editing set, its reliability / generality /
  locality metrics and the fine-tuning baseline (DAFNet's evaluation).
- ``dafnet_train`` / ``sequential_edit``: the DAFNet editor, meta-trained, turning edits into low-rank
  weight deltas one after another (``pysteer edit-seq``).

The package imports lazily (``pysteer --help`` loads the CLI modules, which must stay light). The JoLA
module is ``jola_gates`` (and LF-Steering's ``lf_features``) so that a submodule never shadows the function
``pysteer.recipes.jola`` (``pysteer.recipes.lf_steering``).
"""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    # locate heads + consistency edit
    "ParaphraseFact": "pysteer.recipes.locate",
    "PairDataset": "pysteer.recipes.locate",
    "LocateResult": "pysteer.recipes.locate",
    "load_paraphrases": "pysteer.recipes.locate",
    "locate_heads": "pysteer.recipes.locate",
    "locate_from_features": "pysteer.recipes.locate",
    "consistency_edit": "pysteer.recipes.locate",
    "consistency_metrics": "pysteer.recipes.locate",
    "evaluate_consistency": "pysteer.recipes.locate",
    "edit_spec": "pysteer.recipes.locate",
    # activation scaling
    "ConflictPrompt": "pysteer.recipes.scaling",
    "ScalingResult": "pysteer.recipes.scaling",
    "load_country_conflicts": "pysteer.recipes.scaling",
    "activation_scaling": "pysteer.recipes.scaling",
    "evaluate_scaling": "pysteer.recipes.scaling",
    "steer_files": "pysteer.recipes.scaling",
    # JoLA
    "LabelledText": "pysteer.recipes.jola_gates",
    "JolaResult": "pysteer.recipes.jola_gates",
    "load_topics": "pysteer.recipes.jola_gates",
    "jola": "pysteer.recipes.jola_gates",
    "hard_concrete_eval": "pysteer.recipes.jola_gates",
    "expected_l0": "pysteer.recipes.jola_gates",
    # causal tracing
    "causal_trace": "pysteer.recipes.causal_trace",
    "CausalTraceResult": "pysteer.recipes.causal_trace",
    # aspect-based sentiment by model editing
    "AspectExample": "pysteer.recipes.absc",
    "AbscResult": "pysteer.recipes.absc",
    "load_absc": "pysteer.recipes.absc",
    "absc_edit": "pysteer.recipes.absc",
    "absc_metrics": "pysteer.recipes.absc",
    # LF-Steering and the honest split shared by the consistency recipes
    "lf_steering": "pysteer.recipes.lf_features",
    "probe_consistency_layers": "pysteer.recipes.lf_features",
    "LFSteeringResult": "pysteer.recipes.lf_features",
    "split_test_facts": "pysteer.recipes.selection",
    "bootstrap_consistency": "pysteer.recipes.selection",
    # sequential model editing: the editing set, metrics, FT-L
    "EditRecord": "pysteer.recipes.editing",
    "EditScores": "pysteer.recipes.editing",
    "EditEvaluator": "pysteer.recipes.editing",
    "load_edits": "pysteer.recipes.editing",
    "token_accuracy": "pysteer.recipes.editing",
    "FTL": "pysteer.recipes.editing",
    # DAFNet: the sequential editor
    "DAFNetConfig": "pysteer.recipes.dafnet",
    "DAFNetEditor": "pysteer.recipes.dafnet",
    "TrainConfig": "pysteer.recipes.dafnet",
    "capture_signals": "pysteer.recipes.dafnet",
    "dafnet_train": "pysteer.recipes.dafnet",
    "sequential_edit": "pysteer.recipes.dafnet",
}


__getattr__, __dir__ = lazy_exports("pysteer.recipes", globals(), _LAZY)


__all__ = list(_LAZY)
