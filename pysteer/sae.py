"""Sparse autoencoders: the ``SAE`` container, loaders and feature-edit tables.

``SAE`` holds an SAE's tensors as buffers of an ``nn.Module`` (so ``.to()`` moves and casts them)
and runs its ops through ``pysteer.ops.sae``:

    pre = (x - b_dec) @ W_enc + b_enc        (b_dec is subtracted when apply_b_dec_to_input)
    f   = relu(pre) | relu(pre) * (pre > threshold) | relu(top-k of pre)
    x^  = f @ W_dec + b_dec

Supported architectures: ReLU (SAELens ``standard``), JumpReLU (``jumprelu``; per-latent
``threshold``, or ``log_threshold`` which is exponentiated) and TopK (SAELens ``topk``,
``batchtopk`` and ``matryoshka_batchtopk``, and EleutherAI sparsify). Gated SAEs, transcoders and
skip connections are rejected.

SAELens conventions folded into the weights at load time, as SAELens's own inference form does:

- ``rescale_acts_by_decoder_norm`` (TopK family): the pre-activations are multiplied by the decoder
  row norms ``n`` and the features divided by them before decoding. Folding ``W_enc * n``,
  ``b_enc * n``, ``W_dec / n`` computes the same features and reconstruction with plain TopK.
- ``batchtopk`` / ``matryoshka_batchtopk`` training checkpoints (they hold ``topk_threshold``):
  BatchTopK picks the top ``k * batch`` activations of a whole batch, which depends on the other
  tokens; its inference form, the one SAELens saves with ``save_inference_model``, is a JumpReLU
  SAE with every threshold at ``topk_threshold`` (decoder norms folded when rescaling was on).
  Without ``topk_threshold`` such an SAE runs as per-token TopK with its ``k``.
- ``reshape_activations="hook_z"``: the SAE reads attention heads' outputs (``attn.hook_z``, the
  pysteer site ``attn.heads``); ``encode`` / ``forward`` accept ``[..., n_heads, d_head]`` (or the
  flat ``[..., n_heads * d_head]`` of the site) and flatten it head-major, as SAELens does.

Any other SAELens 6.x config field is refused by name with the file's ``sae_lens_version``
(training-only fields, which do not change inference, are ignored). ``SAE.save`` writes the
SAELens 6.x layout, which SAELens loads back with the same ``hook_name`` and features.

Input normalisation: SAELens ``normalize_activations`` of ``"none"`` and
``"expected_average_only_in"``. The latter scales the input by a constant ``s`` estimated on the
training data; given ``s`` (the ``norm_scaling_factor`` argument, or a ``norm_scaling_factor`` field
in ``cfg.json``) it is folded into the weights exactly as SAELens does (``W_enc * s``, ``W_dec / s``,
``b_dec / s``), so the SAE then consumes and reproduces raw activations. Without ``s`` the SAE is
used unscaled, which is also what SAELens does when it loads such a directory from disk (with a
warning). Per-token normalisations (``constant_norm_rescale``, ``layer_norm``) are rejected:
they would make the feature edit depend on each token's norm.

The encoder is stored as ``[m, d]`` (one contiguous row per latent, like ``nn.Linear.weight``) and
exposed as the ``[d, m]`` view ``W_enc``: a selective encode then reads whole contiguous rows, and
a decode-time GEMV streams the encoder in order.

Files are safetensors only (never pickle).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ._backend import resolve_backend
from ._files import write_safetensors
from .ops import sae as sae_ops
from .ops.sae import EDIT_KINDS

SAE_LENS_CFG = "cfg.json"
SAE_LENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"

_SAE_LENS_TOPK_ARCHS = ("topk", "batchtopk", "matryoshka_batchtopk")
_SAE_LENS_BATCH_ARCHS = ("batchtopk", "matryoshka_batchtopk")
_ARCH_FOR_ACTIVATION = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}
RESHAPES = ("none", "hook_z")
# Tensor names of SAELens files pysteer reads (an all-ones ``scaling_factor`` is a no-op SAELens drops).
_SAE_LENS_TENSORS = frozenset({
    "W_enc", "b_enc", "W_dec", "b_dec", "threshold", "log_threshold", "topk_threshold", "scaling_factor",
})  # fmt: skip

# The SAELens release whose 6.x layout ``SAE.save`` writes and whose config fields pysteer knows.
SAE_LENS_FORMAT_VERSION = "6.54.12"
# SAELens 6.x top-level config fields pysteer implements (or that describe the file, not the math).
_SAE_LENS_FIELDS = frozenset({
    "architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
    "reshape_activations", "metadata", "k", "rescale_acts_by_decoder_norm", "sae_lens_version",
    "sae_lens_training_version", "hook_name", "norm_scaling_factor", "finetuning_scaling_factor",
    "activation_fn", "activation_fn_str", "activation_fn_kwargs",
})  # fmt: skip
# Training-only fields of SAELens 6.x training configs (standard, topk, jumprelu, batchtopk and
# matryoshka_batchtopk): losses, initialisation and threshold learning rates, unused at inference.
_SAE_LENS_TRAINING_FIELDS = frozenset({
    "decoder_init_norm", "l1_coefficient", "lp_norm", "l1_warm_up_steps", "use_sparse_activations",
    "aux_loss_coefficient", "topk_threshold_lr", "matryoshka_widths", "use_matryoshka_aux_loss",
    "jumprelu_init_threshold", "jumprelu_bandwidth", "jumprelu_sparsity_loss_mode", "l0_coefficient",
    "l0_warm_up_steps", "pre_act_loss_coefficient", "jumprelu_tanh_scale", "jumprelu_ste_to_input",
    "target_l0",
})  # fmt: skip


class SAEFormatError(ValueError):
    """A saved SAE is malformed or inconsistent; the message names the file and the field."""


# ---------------------------------------------------------------------------------------------
# feature-edit tables
# ---------------------------------------------------------------------------------------------


class SAEEditTable:
    """Feature-edit tables for :func:`pysteer.ops.sae.sae_steer`, validated on the host.

    ``features [F]`` int32 is the feature set S; ``kinds [C, F]`` int32 and ``strengths [C, F]``
    float32 give, per table row ``c``, the edit of each feature (see ``EDIT_KINDS``). Row 0 is the
    identity and is never written. Updates are in place (the tensors keep their identity), so a
    compiled or CUDA-graph-captured forward sees new strengths without re-tracing.

    Args:
        features: distinct latent ids in ``[0, d_sae)``.
        num_rows: ``C``, including the identity row 0.
        d_sae: the SAE's number of latents.
        device: where the tables live.
    """

    def __init__(
        self,
        features: Sequence[int] | Tensor,
        num_rows: int,
        *,
        d_sae: int,
        device: torch.device | str | None = None,
    ) -> None:
        ids = [int(f) for f in (features.tolist() if isinstance(features, Tensor) else features)]
        if not ids:
            raise ValueError("SAEEditTable: features must name at least one latent")
        if len(set(ids)) != len(ids):
            dup = sorted({f for f in ids if ids.count(f) > 1})
            raise ValueError(f"SAEEditTable: features must be distinct; repeated: {dup}")
        bad = [f for f in ids if not 0 <= f < d_sae]
        if bad:
            raise ValueError(f"SAEEditTable: features {bad} are outside [0, d_sae={d_sae})")
        if num_rows < 1:
            raise ValueError(f"SAEEditTable: num_rows must be >= 1 (row 0 is the identity), got {num_rows}")
        self.d_sae = d_sae
        self._column = {f: j for j, f in enumerate(ids)}
        self.features = torch.tensor(ids, dtype=torch.int32, device=device)
        self.kinds = torch.zeros((num_rows, len(ids)), dtype=torch.int32, device=device)
        self.strengths = torch.zeros((num_rows, len(ids)), dtype=torch.float32, device=device)

    @property
    def num_rows(self) -> int:
        return self.kinds.shape[0]

    @property
    def feature_ids(self) -> list[int]:
        return list(self._column)

    def set(self, row: int, feature: int, kind: str | int, strength: float = 0.0) -> None:
        """Edit ``feature`` on table row ``row``: ``kind`` is a name or code from ``EDIT_KINDS``."""
        if not 1 <= row < self.num_rows:
            raise ValueError(
                f"SAEEditTable.set: row must be in [1, {self.num_rows}) (row 0 is the identity), got {row}"
            )
        if feature not in self._column:
            raise ValueError(
                f"SAEEditTable.set: feature {feature} is not in the table's features {self.feature_ids}"
            )
        if isinstance(kind, str):
            if kind not in EDIT_KINDS:
                raise ValueError(
                    f"SAEEditTable.set: unknown edit kind {kind!r}; choose one of {', '.join(EDIT_KINDS)}"
                )
            code = EDIT_KINDS[kind]
        else:
            code = int(kind)
            if code not in EDIT_KINDS.values():
                raise ValueError(
                    f"SAEEditTable.set: unknown edit code {code}; valid codes {sorted(EDIT_KINDS.values())}"
                )
        if not math.isfinite(float(strength)):
            raise ValueError(f"SAEEditTable.set: strength must be finite, got {strength}")
        j = self._column[feature]
        self.kinds[row, j] = code
        self.strengths[row, j] = float(strength)

    def clear(self, row: int | None = None) -> None:
        """Reset one row (or every row) to no edit, in place."""
        if row is None:
            self.kinds.zero_()
            self.strengths.zero_()
            return
        if not 0 <= row < self.num_rows:
            raise ValueError(f"SAEEditTable.clear: row must be in [0, {self.num_rows}), got {row}")
        self.kinds[row].zero_()
        self.strengths[row].zero_()

    def to(self, device: torch.device | str) -> SAEEditTable:
        """A copy of the tables on ``device``."""
        out = SAEEditTable.__new__(SAEEditTable)
        out.d_sae = self.d_sae
        out._column = dict(self._column)
        out.features = self.features.to(device)
        out.kinds = self.kinds.to(device)
        out.strengths = self.strengths.to(device)
        return out


# ---------------------------------------------------------------------------------------------
# the SAE
# ---------------------------------------------------------------------------------------------


class SAE(nn.Module):
    """A sparse autoencoder over a site of width ``d_in`` with ``d_sae`` latents.

    Args:
        W_enc: ``[d_in, d_sae]`` encoder.
        b_enc: ``[d_sae]`` encoder bias.
        W_dec: ``[d_sae, d_in]`` decoder.
        b_dec: ``[d_in]`` decoder bias.
        activation: ``"relu"``, ``"jumprelu"`` or ``"topk"``.
        threshold: ``[d_sae]`` JumpReLU thresholds (``activation="jumprelu"`` only).
        k: latents kept per token (``activation="topk"`` only).
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding.
        reshape_activations: ``"none"``, or ``"hook_z"`` for an SAE over attention heads' outputs:
            inputs may then be ``[..., n_heads, d_head]`` with ``n_heads * d_head = d_in``.
        metadata: free-form description (hook name, model, ...), saved with the SAE.

    All tensors are converted to ``W_enc``'s dtype and device.

    Raises:
        ValueError: a shape, the activation or its parameters are inconsistent (the message names the field).
    """

    encoder_weight: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    threshold: Tensor | None

    def __init__(
        self,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        *,
        activation: str = "relu",
        threshold: Tensor | None = None,
        k: int | None = None,
        apply_b_dec_to_input: bool = True,
        reshape_activations: str = "none",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if W_enc.dim() != 2:
            raise ValueError(f"SAE: W_enc must be [d_in, d_sae], got shape {tuple(W_enc.shape)}")
        if not W_enc.dtype.is_floating_point:
            raise ValueError(f"SAE: W_enc must be a floating tensor, got {W_enc.dtype}")
        d_in, d_sae = W_enc.shape
        expect = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        for name, t in (("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            if tuple(t.shape) != expect[name]:
                raise ValueError(
                    f"SAE: {name} has shape {tuple(t.shape)}, expected {list(expect[name])} "
                    f"for d_in={d_in}, d_sae={d_sae} (from W_enc)"
                )
        if activation not in sae_ops.ACTIVATIONS:
            raise ValueError(
                f"SAE: unknown activation {activation!r}; choose one of {', '.join(sae_ops.ACTIVATIONS)}"
            )
        if activation == "jumprelu":
            if threshold is None or tuple(threshold.shape) != (d_sae,):
                got = None if threshold is None else tuple(threshold.shape)
                raise ValueError(f"SAE: activation='jumprelu' needs threshold of shape [{d_sae}], got {got}")
        elif threshold is not None:
            raise ValueError(
                f"SAE: threshold is only used by activation='jumprelu', got activation={activation!r}"
            )
        if activation == "topk":
            if k is None or not 1 <= int(k) <= d_sae:
                raise ValueError(f"SAE: activation='topk' needs k in [1, d_sae={d_sae}], got {k}")
            k = int(k)
        elif k is not None:
            raise ValueError(f"SAE: k is only used by activation='topk', got activation={activation!r}")
        if reshape_activations not in RESHAPES:
            raise ValueError(
                f"SAE: unknown reshape_activations {reshape_activations!r}; choose one of {', '.join(RESHAPES)}"
            )

        like = {"dtype": W_enc.dtype, "device": W_enc.device}
        self.register_buffer("encoder_weight", W_enc.detach().t().to(**like).contiguous())
        self.register_buffer("b_enc", b_enc.detach().to(**like).contiguous())
        self.register_buffer("W_dec", W_dec.detach().to(**like).contiguous())
        self.register_buffer("b_dec", b_dec.detach().to(**like).contiguous())
        self.register_buffer(
            "threshold", None if threshold is None else threshold.detach().to(**like).contiguous()
        )
        self.activation = activation
        self.k = k
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.reshape_activations = reshape_activations
        self.metadata: dict[str, Any] = dict(metadata or {})

    # -- shape and placement ------------------------------------------------------------------

    @property
    def W_enc(self) -> Tensor:
        """``[d_in, d_sae]`` view of the ``[d_sae, d_in]`` encoder storage."""
        return self.encoder_weight.t()

    @property
    def d_in(self) -> int:
        return self.W_dec.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_dec.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def site(self) -> str | None:
        """The pysteer site of the SAE's recorded ``hook_name`` (SAELens metadata), or None when it
        records none; raises ``ValueError`` for a hook with no pysteer site."""
        hook = self.metadata.get("hook_name")
        return None if hook is None else site_for_hook_name(hook)

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.activation == "topk" else ""
        z = ", reshape_activations='hook_z'" if self.reshape_activations == "hook_z" else ""
        return (
            f"d_in={self.d_in}, d_sae={self.d_sae}, activation={self.activation!r}{k}{z}, dtype={self.dtype}"
        )

    # -- ops ------------------------------------------------------------------------------------

    def _lead(self, x: Tensor, name: str = "x") -> tuple[int, ...]:
        """The token dimensions of an input: all but the last (all but the last two for a
        ``hook_z`` SAE fed ``[..., n_heads, d_head]``)."""
        if x.shape[-1:] == (self.d_in,):
            return tuple(x.shape[:-1])
        if self.reshape_activations == "hook_z":
            if x.dim() >= 2 and x.shape[-2] * x.shape[-1] == self.d_in:
                return tuple(x.shape[:-2])
            raise ValueError(
                f"SAE: {name} must be [..., n_heads, d_head] with n_heads * d_head = d_in={self.d_in} "
                f"(reshape_activations='hook_z') or [..., {self.d_in}], got shape {tuple(x.shape)}"
            )
        raise ValueError(f"SAE: {name} must be [..., d_in={self.d_in}], got shape {tuple(x.shape)}")

    def _flat(self, x: Tensor, name: str = "x") -> Tensor:
        self._lead(x, name)
        return x.reshape(-1, self.d_in).to(self.dtype)

    def _backend(self, backend: str | None, device: torch.device) -> str:
        return resolve_backend(backend, device)

    @property
    def _input_bias(self) -> Tensor | None:
        return self.b_dec if self.apply_b_dec_to_input else None

    def encode(self, x: Tensor, *, backend: str | None = None) -> Tensor:
        """Dense feature activations.

        Args:
            x: ``[..., d_in]`` activations (cast to the SAE's dtype); a ``hook_z`` SAE also takes
                ``[..., n_heads, d_head]``.
            backend: ``None`` (``PYSTEER_BACKEND`` / automatic), ``"torch"``, ``"triton"`` or ``"cuda"``.

        Returns:
            ``[..., d_sae]`` in the SAE's dtype (TopK: zeros outside each token's top k).
        """
        flat = self._flat(x)
        be = self._backend(backend, flat.device)
        if self.activation == "topk":
            values, indices = self.encode_topk(flat, backend=be)
            f = torch.zeros((flat.shape[0], self.d_sae), dtype=values.dtype, device=values.device)
            f.scatter_(1, indices, values)
        else:
            f = sae_ops.sae_encode(
                flat,
                self.W_enc,
                self.b_enc,
                self._input_bias,
                self.threshold,
                act=self.activation,
                backend=be,
            )
        return f.reshape(*self._lead(x), self.d_sae)

    def encode_topk(self, x: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
        """Sparse codes of a TopK SAE.

        Args:
            x: ``[..., d_in]`` activations.
            backend: as in :meth:`encode`.

        Returns:
            ``(values [..., k], indices [..., k] int64)``, values descending per token.
        """
        if self.activation != "topk":
            raise ValueError(f"SAE.encode_topk: this SAE's activation is {self.activation!r}, not 'topk'")
        flat = self._flat(x)
        be = self._backend(backend, flat.device)
        assert self.k is not None
        values, indices = sae_ops.sae_encode_topk(
            flat, self.W_enc, self.b_enc, self._input_bias, k=self.k, backend=be
        )
        lead = self._lead(x)
        return values.reshape(*lead, self.k), indices.reshape(*lead, self.k)

    def decode(self, f: Tensor) -> Tensor:
        """Dense decode ``[..., d_sae] -> [..., d_in]``: ``f @ W_dec + b_dec`` (a ``hook_z`` SAE's
        output stays flat, head-major: ``.unflatten(-1, (n_heads, d_head))`` gives the heads)."""
        if f.shape[-1:] != (self.d_sae,):
            raise ValueError(f"SAE.decode: f must be [..., d_sae={self.d_sae}], got shape {tuple(f.shape)}")
        return torch.addmm(self.b_dec, f.reshape(-1, self.d_sae).to(self.dtype), self.W_dec).reshape(
            *f.shape[:-1], self.d_in
        )

    def decode_sparse(self, indices: Tensor, values: Tensor, *, backend: str | None = None) -> Tensor:
        """Decode sparse codes: ``[..., k]`` indices and values -> ``[..., d_in]``; reads k rows of ``W_dec``."""
        if indices.shape != values.shape or indices.dim() < 1:
            raise ValueError(
                f"SAE.decode_sparse: indices {tuple(indices.shape)} and values {tuple(values.shape)} must be [..., k]"
            )
        kk = indices.shape[-1]
        idx = indices.reshape(-1, kk)
        val = values.reshape(-1, kk).to(self.dtype)
        be = self._backend(backend, val.device)
        out = sae_ops.sae_decode_sparse(idx, val, self.W_dec, self.b_dec, backend=be)
        return out.reshape(*indices.shape[:-1], self.d_in)

    def forward(self, x: Tensor, *, backend: str | None = None) -> Tensor:
        """Reconstruction in ``x``'s shape (TopK decodes only the k rows per token)."""
        if self.activation == "topk":
            values, indices = self.encode_topk(x, backend=backend)
            return self.decode_sparse(indices, values, backend=backend).reshape(x.shape)
        return self.decode(self.encode(x, backend=backend)).reshape(x.shape)

    def edit_table(self, features: Sequence[int] | Tensor, num_rows: int) -> SAEEditTable:
        """Empty :class:`SAEEditTable` for this SAE on its device."""
        return SAEEditTable(features, num_rows, d_sae=self.d_sae, device=self.device)

    def steer_rows(
        self,
        x: Tensor,
        rows: Tensor,
        table: SAEEditTable | tuple[Tensor, Tensor, Tensor],
        *,
        backend: str | None = None,
    ) -> Tensor:
        """Error-preserving feature edit ``x + W_dec[S]^T (f'_S - f_S)`` with per-token table rows.

        Args:
            x: ``[..., d_in]`` site activations (any float dtype; computed in the SAE's dtype).
            rows: ``[N]`` int32 table row per token, ``N = x.numel() // d_in``; 0 = bit-exact ``x``.
            table: an :class:`SAEEditTable`, or ``(features [F], kinds [C, F], strengths [C, F])``.
            backend: as in :meth:`encode`.

        Returns:
            Tensor of ``x``'s shape and dtype.
        """
        if isinstance(table, SAEEditTable):
            if table.d_sae != self.d_sae:
                raise ValueError(
                    f"SAE.steer_rows: table was built for d_sae={table.d_sae}, this SAE has {self.d_sae}"
                )
            features, kinds, strengths = table.features, table.kinds, table.strengths
        else:
            features, kinds, strengths = table
        flat = self._flat(x)
        if flat.dtype == torch.float64 and strengths.dtype != torch.float64:
            strengths = strengths.double()  # the op edits in float64 for a float64 SAE
        be = self._backend(backend, flat.device)
        y = sae_ops.sae_steer(
            flat,
            rows,
            self.W_enc,
            self.b_enc,
            self.W_dec,
            self._input_bias,
            self.threshold,
            features,
            kinds,
            strengths,
            act=self.activation,
            k=self.k or 0,
            backend=be,
        )
        if y.dtype == x.dtype:
            return y.reshape(x.shape)
        # The SAE computes in its own dtype. Hand back only the edit, added to the caller's own
        # activations: tokens with no edit (row 0, a zero edit) keep x's bits, not x rounded through
        # the SAE's dtype (a bf16 SAE on an fp32 model moved unsteered logits by 1e-3).
        acc = torch.promote_types(x.dtype, torch.float32)
        x_flat = x.reshape(-1, self.d_in)
        delta = y.to(acc) - flat.to(acc)
        return torch.where(delta == 0, x_flat, (x_flat.to(acc) + delta).to(x.dtype)).reshape(x.shape)

    # -- construction from saved SAEs -------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        norm_scaling_factor: float | None = None,
    ) -> SAE:
        """Load an SAE directory, detecting its layout.

        ``cfg.json`` + ``sae_weights.safetensors`` is SAELens; ``cfg.json`` + ``sae.safetensors`` is
        EleutherAI sparsify (one hookpoint's directory).

        Args:
            path: the directory.
            device: where to put the tensors (default CPU).
            dtype: convert the tensors to this dtype (default: as stored).
            norm_scaling_factor: SAELens ``expected_average_only_in`` input scale to fold in.

        Raises:
            SAEFormatError: no SAE in ``path``, or a malformed / inconsistent one (names the field).
        """
        root = Path(path)
        if not root.is_dir():
            raise SAEFormatError(f"{root}: not a directory")
        lens = (root / SAE_LENS_WEIGHTS).is_file()
        sparsify = (root / SPARSIFY_WEIGHTS).is_file()
        if lens and sparsify:
            raise SAEFormatError(
                f"{root}: holds both {SAE_LENS_WEIGHTS} (SAELens) and {SPARSIFY_WEIGHTS} (sparsify); "
                "call SAE.from_sae_lens_dir or SAE.from_sparsify_dir"
            )
        if lens:
            return cls.from_sae_lens_dir(
                root, device=device, dtype=dtype, norm_scaling_factor=norm_scaling_factor
            )
        if sparsify:
            if norm_scaling_factor is not None:
                raise ValueError("SAE.load: norm_scaling_factor applies to SAELens SAEs only")
            return cls.from_sparsify_dir(root, device=device, dtype=dtype)
        subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / SAE_LENS_CFG).is_file())
        hint = f"; its subdirectories {subdirs[:8]} hold SAEs: load one of them" if subdirs else ""
        raise SAEFormatError(
            f"{root}: no SAE found: expected {SAE_LENS_CFG} with {SAE_LENS_WEIGHTS} (SAELens) "
            f"or with {SPARSIFY_WEIGHTS} (EleutherAI sparsify){hint}"
        )

    @classmethod
    def from_sae_lens_dir(
        cls,
        path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        norm_scaling_factor: float | None = None,
    ) -> SAE:
        """Load a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``); see :meth:`load`."""
        root = Path(path)
        cfg = _read_cfg(root / SAE_LENS_CFG)
        weights = root / SAE_LENS_WEIGHTS
        tensors = _read_safetensors(weights)
        return _from_sae_lens_parts(
            cfg, tensors, f"{SAE_LENS_CFG}", f"{weights.name}", device, dtype, norm_scaling_factor
        )

    @classmethod
    def from_sparsify_dir(
        cls,
        path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> SAE:
        """Load an EleutherAI sparsify directory (``cfg.json`` + ``sae.safetensors``); see :meth:`load`."""
        root = Path(path)
        cfg = _read_cfg(root / SAE_LENS_CFG)
        weights = root / SPARSIFY_WEIGHTS
        tensors = _read_safetensors(weights)
        src = SAE_LENS_CFG
        d_in = _positive_int(cfg, "d_in", src)
        if cfg.get("transcode"):
            raise SAEFormatError(
                f"{src}: transcode=true: transcoders are not supported (an SAE maps a site to itself)"
            )
        if cfg.get("skip_connection") or "W_skip" in tensors:
            raise SAEFormatError(f"{src}: skip_connection (W_skip) is not supported")
        activation = cfg.get("activation", "topk")
        if activation != "topk":
            raise SAEFormatError(
                f"{src}: unknown activation {activation!r} (field 'activation'); supported: 'topk'"
            )
        num_latents = cfg.get("num_latents", 0)
        if num_latents:
            d_sae = _positive_int(cfg, "num_latents", src)
        else:
            d_sae = d_in * _positive_int(cfg, "expansion_factor", src)
        k = _positive_int(cfg, "k", src)
        file = weights.name
        enc = _tensor(tensors, "encoder.weight", (d_sae, d_in), "[d_sae, d_in]", file, d_in, d_sae)
        b_enc = _tensor(tensors, "encoder.bias", (d_sae,), "[d_sae]", file, d_in, d_sae)
        W_dec = _tensor(tensors, "W_dec", (d_sae, d_in), "[d_sae, d_in]", file, d_in, d_sae)
        b_dec = _tensor(tensors, "b_dec", (d_in,), "[d_in]", file, d_in, d_sae)
        if k > d_sae:
            raise SAEFormatError(f"{src}: k={k} exceeds the number of latents {d_sae}")
        meta = {"format": "sparsify", "hookpoint": root.name}
        sae = cls(
            enc.t(), b_enc, W_dec, b_dec, activation="topk", k=k, apply_b_dec_to_input=True, metadata=meta
        )
        return sae.to(device=device or "cpu", dtype=dtype or sae.dtype)

    @classmethod
    def from_sae_lens(cls, sae: Any, *, norm_scaling_factor: float | None = None) -> SAE:
        """Convert an in-memory SAELens SAE (duck-typed: ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``cfg``).

        ``cfg`` may be a SAELens config object (``architecture`` an attribute or a method) or a dict.
        The tensors keep their dtype and device (detached).

        Raises:
            SAEFormatError: a missing or inconsistent field (named in the message).
        """
        cfg_obj = getattr(sae, "cfg", None)
        if cfg_obj is None:
            raise SAEFormatError(f"{type(sae).__name__}: has no 'cfg' (not a SAELens SAE?)")
        fields = (
            "d_in", "d_sae", "architecture", "activation_fn", "activation_fn_str", "activation_fn_kwargs", "k",
            "apply_b_dec_to_input", "normalize_activations", "finetuning_scaling_factor", "norm_scaling_factor",
            "rescale_acts_by_decoder_norm", "reshape_activations",
        )  # fmt: skip
        cfg: dict[str, Any] = {}
        for name in fields:
            value = cfg_obj.get(name) if isinstance(cfg_obj, Mapping) else getattr(cfg_obj, name, None)
            if callable(value):
                value = value()
            if value is not None:
                cfg[name] = value
        meta = getattr(cfg_obj, "metadata", None) or getattr(cfg_obj, "meta", None)
        if meta is not None and not isinstance(meta, Mapping):
            meta = {k: v for k, v in vars(meta).items() if isinstance(v, (str, int, float, bool))}
        if meta:
            cfg["metadata"] = dict(meta)
        tensors: dict[str, Tensor] = {}
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "log_threshold", "topk_threshold"):
            t = getattr(sae, name, None)
            if isinstance(t, Tensor):
                tensors[name] = t.detach()
        src = type(sae).__name__
        return _from_sae_lens_parts(cfg, tensors, f"{src}.cfg", src, None, None, norm_scaling_factor)

    # -- writing ----------------------------------------------------------------------------------

    def to_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(tensors, config)``: everything ``from_state`` needs (a steering file stores SAEs so)."""
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold
        config = {
            "activation": self.activation,
            "k": self.k,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "reshape_activations": self.reshape_activations,
            "metadata": self.metadata,
        }
        return {n: t.detach() for n, t in tensors.items()}, config

    @classmethod
    def from_state(cls, tensors: Mapping[str, Tensor], config: Mapping[str, Any]) -> SAE:
        """The SAE ``to_state`` described (validated like any construction)."""
        unknown = sorted(set(tensors) - {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"})
        if unknown:
            raise ValueError(f"SAE: unknown tensor {unknown[0]!r}")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            if name not in tensors:
                raise ValueError(f"SAE: missing tensor {name!r}")
        for name, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"SAE: tensor {name!r} contains NaN or inf")
        return cls(
            tensors["W_enc"],
            tensors["b_enc"],
            tensors["W_dec"],
            tensors["b_dec"],
            activation=config.get("activation", "relu"),
            threshold=tensors.get("threshold"),
            k=config.get("k"),
            apply_b_dec_to_input=bool(config.get("apply_b_dec_to_input", True)),
            reshape_activations=config.get("reshape_activations", "none"),
            metadata=config.get("metadata") or {},
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the SAE in the SAELens 6.x layout (``cfg.json`` + ``sae_weights.safetensors``).

        ``cfg.json`` holds every field SAELens 6.x reads: the config fields at the top level, the
        metadata (``hook_name``, ``model_name``, ...) under ``"metadata"`` with ``sae_lens_version``
        (without a version SAELens reads the file as a pre-6.0 config and drops ``hook_name``), and
        ``hook_name`` / ``sae_lens_version`` also at the top level for readers of the older layout.
        Any folded input scale or decoder norm is already in the weights, so ``normalize_activations``
        is ``"none"`` and ``rescale_acts_by_decoder_norm`` is false. Files are written to temporaries
        and renamed, so a reader never sees a partial SAE.

        Returns:
            The directory.
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        tensors = {
            "W_enc": self.W_enc,
            "b_enc": self.b_enc,
            "W_dec": self.W_dec,
            "b_dec": self.b_dec,
        }
        if self.threshold is not None:
            tensors["threshold"] = self.threshold
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        tmp_c = root / (SAE_LENS_CFG + ".tmp")
        tmp_c.write_text(json.dumps(self._sae_lens_cfg(), indent=2, default=str))
        write_safetensors(tensors, root / SAE_LENS_WEIGHTS)
        os.replace(tmp_c, root / SAE_LENS_CFG)
        return root

    def _sae_lens_cfg(self) -> dict[str, Any]:
        """The SAELens 6.x ``cfg.json`` of this SAE (see :meth:`save`)."""
        metadata = {**self.metadata, "sae_lens_version": SAE_LENS_FORMAT_VERSION}
        cfg: dict[str, Any] = {
            "architecture": _ARCH_FOR_ACTIVATION[self.activation],
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": self.reshape_activations,
            "sae_lens_version": SAE_LENS_FORMAT_VERSION,
        }
        if "hook_name" in self.metadata:
            cfg["hook_name"] = self.metadata["hook_name"]
        if self.activation == "topk":
            cfg["k"] = self.k
            cfg["rescale_acts_by_decoder_norm"] = False
        cfg["metadata"] = metadata
        return cfg


# ---------------------------------------------------------------------------------------------
# reading helpers
# ---------------------------------------------------------------------------------------------


# TransformerLens hook names (what SAELens records as ``hook_name``) -> pysteer site kinds
_HOOK_SITES = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid",
    "hook_attn_out": "attn.out",
    "hook_mlp_out": "mlp.out",
    "attn.hook_z": "attn.heads",
    "attn.hook_q": "attn.q",
    "attn.hook_k": "attn.k",
    "attn.hook_v": "attn.v",
    "mlp.hook_post": "mlp.hidden",
}


def site_for_hook_name(hook_name: str) -> str:
    """The pysteer site of a TransformerLens / SAELens hook name: ``blocks.6.hook_resid_post`` ->
    ``layers.6.resid``, ``blocks.3.attn.hook_z`` -> ``layers.3.attn.heads``, ``hook_embed`` -> ``embed``.

    Raises:
        ValueError: a hook with no pysteer site (e.g. ``hook_resid_mid``: pysteer's sites are module
            inputs and outputs, and a residual stream between attention and MLP is not one).
    """
    name = str(hook_name).strip()
    if name == "hook_embed":
        return "embed"
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in _HOOK_SITES:
        return f"layers.{int(parts[1])}.{_HOOK_SITES[parts[2]]}"
    raise ValueError(
        f"hook name {hook_name!r} has no pysteer site (known: hook_embed, blocks.<i>.{{{', '.join(_HOOK_SITES)}}})"
    )


def _read_cfg(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SAEFormatError(f"{path}: missing (an SAE directory needs {SAE_LENS_CFG})")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAEFormatError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{path}: must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise SAEFormatError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise SAEFormatError(f"{path}: not a readable safetensors file ({err})") from None


def _positive_int(cfg: Mapping[str, Any], name: str, src: str) -> int:
    if name not in cfg:
        raise SAEFormatError(f"{src}: missing field '{name}'")
    value = cfg[name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SAEFormatError(f"{src}: field '{name}' must be a positive integer, got {value!r}")
    return value


def _tensor(
    tensors: Mapping[str, Tensor],
    name: str,
    shape: tuple[int, ...],
    spec: str,
    src: str,
    d_in: int,
    d_sae: int,
) -> Tensor:
    if name not in tensors:
        have = ", ".join(sorted(tensors)) or "none"
        raise SAEFormatError(f"{src}: missing tensor '{name}' (found: {have})")
    t = tensors[name]
    if not t.dtype.is_floating_point:
        raise SAEFormatError(f"{src}: tensor '{name}' must be floating point, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise SAEFormatError(
            f"{src}: tensor '{name}' has shape {list(t.shape)}, expected {spec} = {list(shape)} "
            f"(config: d_in={d_in}, d_sae={d_sae})"
        )
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise SAEFormatError(f"{src}: tensor '{name}' holds {bad} NaN or inf value(s)")
    return t


def _sae_lens_version(cfg: Mapping[str, Any]) -> str | None:
    """The ``sae_lens_version`` a config records (top level, else in its metadata), or None."""
    version = cfg.get("sae_lens_version")
    meta = cfg.get("metadata")
    if not version and isinstance(meta, Mapping):
        version = meta.get("sae_lens_version")
    return str(version) if version else None


def _major(version: str | None) -> int | None:
    head = (version or "").split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _reshape_activations(cfg: Mapping[str, Any], hook_name: Any) -> str:
    """The config's ``reshape_activations``; a pre-6.0 config without the field gets SAELens's own
    default for it: ``"hook_z"`` when its hook name is a ``hook_z`` one."""
    if cfg.get("reshape_activations"):
        return str(cfg["reshape_activations"])
    major = _major(_sae_lens_version(cfg))
    pre_6 = major is None or major < 6
    return "hook_z" if pre_6 and "hook_z" in str(hook_name or "") else "none"


def _is_training_checkpoint(cfg: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> bool:
    """A BatchTopK-family training checkpoint: it holds the learned ``topk_threshold``."""
    return cfg.get("architecture") in _SAE_LENS_BATCH_ARCHS and "topk_threshold" in tensors


def _sae_lens_activation(
    cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], src: str, d_sae: int
) -> tuple[str, int | None]:
    arch = cfg.get("architecture", "standard")
    if arch == "standard":
        fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        if fn == "relu":
            return "relu", None
        if fn != "topk":
            raise SAEFormatError(
                f"{src}: unknown activation_fn {fn!r} (field 'activation_fn'); supported: relu, topk"
            )
        kwargs = cfg.get("activation_fn_kwargs") or {}
        k_cfg = {"k": cfg["k"]} if "k" in cfg else kwargs
        return "topk", _k_field(k_cfg, src, d_sae)
    if arch == "jumprelu" or _is_training_checkpoint(cfg, tensors):
        return "jumprelu", None
    if arch in _SAE_LENS_TOPK_ARCHS:
        return "topk", _k_field(cfg, src, d_sae)
    raise SAEFormatError(
        f"{src}: unknown architecture {arch!r} (field 'architecture'); "
        f"supported: standard, jumprelu, {', '.join(_SAE_LENS_TOPK_ARCHS)}"
    )


def _refuse_unimplemented(
    cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], src: str, tensor_src: str
) -> None:
    """SAELens config fields and tensors that change what the SAE computes and that pysteer does not
    implement: loading such an SAE as if they were absent would compute different features, silently."""
    version = _sae_lens_version(cfg)
    at = f"{src} (sae_lens_version {version or 'unrecorded'})"
    extra = sorted(set(tensors) - _SAE_LENS_TENSORS)
    if extra:
        raise SAEFormatError(
            f"{tensor_src} (sae_lens_version {version or 'unrecorded'}): tensor {extra[0]!r} is not known to "
            f"pysteer (it reads {', '.join(sorted(_SAE_LENS_TENSORS))})"
        )
    if "scaling_factor" in tensors and not bool((tensors["scaling_factor"] == 1).all()):
        # SAELens drops an all-ones scaling_factor and otherwise scales the features by it
        raise SAEFormatError(f"{tensor_src}: tensor 'scaling_factor' (a finetuning scale) is not supported")
    major = _major(version)
    if major is not None and major >= 6:
        # a 6.x config holds exactly its config class's fields: any other one is new to pysteer
        unknown = sorted(set(cfg) - _SAE_LENS_FIELDS - _SAE_LENS_TRAINING_FIELDS)
        if unknown:
            raise SAEFormatError(
                f"{at}: field {unknown[0]!r} is not known to pysteer, which implements the fields of "
                f"sae-lens up to {SAE_LENS_FORMAT_VERSION}; loading it as if absent could compute different features"
            )
    if cfg.get("finetuning_scaling_factor"):
        raise SAEFormatError(f"{at}: field 'finetuning_scaling_factor' is not supported")
    if cfg.get("rescale_acts_by_decoder_norm") and cfg.get("architecture") not in _SAE_LENS_TOPK_ARCHS:
        raise SAEFormatError(
            f"{at}: field 'rescale_acts_by_decoder_norm'=True is implemented for the TopK family "
            f"({', '.join(_SAE_LENS_TOPK_ARCHS)}), not for architecture {cfg.get('architecture', 'standard')!r}"
        )
    reshape = _reshape_activations(cfg, cfg.get("hook_name", cfg.get("hook_point")))
    if reshape not in RESHAPES:
        raise SAEFormatError(
            f"{at}: field 'reshape_activations'={reshape!r} is not supported (supported: {', '.join(RESHAPES)})"
        )


def _k_field(cfg: Mapping[str, Any], src: str, d_sae: int) -> int:
    k = _positive_int(cfg, "k", src)
    if k > d_sae:
        raise SAEFormatError(f"{src}: field 'k'={k} exceeds d_sae={d_sae}")
    return k


def _fold_decoder_norms(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``rescale_acts_by_decoder_norm`` folded as SAELens folds it for inference: with the decoder
    row norms ``n``, ``W_enc * n``, ``b_enc * n`` and ``W_dec / n`` (same arithmetic, same dtype)."""
    norms = W_dec.norm(dim=-1).clamp(min=1e-8)
    return W_enc * norms.unsqueeze(1).T, b_enc * norms, W_dec / norms.unsqueeze(1)


def _topk_threshold(tensors: Mapping[str, Tensor], src: str, like: Tensor) -> Tensor:
    """A training checkpoint's scalar ``topk_threshold`` as per-latent JumpReLU thresholds."""
    t = tensors["topk_threshold"]
    if t.numel() != 1 or not t.dtype.is_floating_point or not torch.isfinite(t).all():
        raise SAEFormatError(
            f"{src}: tensor 'topk_threshold' must be one finite float, got {list(t.shape)} {t.dtype}"
        )
    return torch.ones_like(like) * t.item()


def _from_sae_lens_parts(
    cfg: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    cfg_src: str,
    tensor_src: str,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    norm_scaling_factor: float | None,
) -> SAE:
    d_in = _positive_int(cfg, "d_in", cfg_src)
    d_sae = _positive_int(cfg, "d_sae", cfg_src)
    _refuse_unimplemented(cfg, tensors, cfg_src, tensor_src)
    activation, k = _sae_lens_activation(cfg, tensors, cfg_src, d_sae)
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise SAEFormatError(
            f"{cfg_src}: normalize_activations={norm!r} is not supported (field 'normalize_activations'); "
            "supported: none, expected_average_only_in"
        )
    scale = norm_scaling_factor if norm_scaling_factor is not None else cfg.get("norm_scaling_factor")
    if norm == "none" and norm_scaling_factor is not None:
        raise ValueError("norm_scaling_factor given, but the SAE's normalize_activations is 'none'")
    if norm == "expected_average_only_in" and scale is None:
        warnings.warn(
            f"{cfg_src}: normalize_activations='expected_average_only_in' without a norm_scaling_factor; "
            "using the SAE unscaled (as SAELens does when loading from disk). Pass norm_scaling_factor= to fold it.",
            stacklevel=3,
        )
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise SAEFormatError(f"{cfg_src}: norm_scaling_factor must be a positive number, got {scale!r}")

    def get(name: str, shape: tuple[int, ...], spec: str) -> Tensor:
        return _tensor(tensors, name, shape, spec, tensor_src, d_in, d_sae)

    W_enc = get("W_enc", (d_in, d_sae), "[d_in, d_sae]")
    b_enc = get("b_enc", (d_sae,), "[d_sae]")
    W_dec = get("W_dec", (d_sae, d_in), "[d_sae, d_in]")
    b_dec = get("b_dec", (d_in,), "[d_in]")
    threshold = None
    if _is_training_checkpoint(cfg, tensors):
        threshold = _topk_threshold(tensors, tensor_src, b_enc)
    elif activation == "jumprelu":
        if "threshold" in tensors:
            threshold = get("threshold", (d_sae,), "[d_sae]")
        elif "log_threshold" in tensors:
            threshold = get("log_threshold", (d_sae,), "[d_sae]").exp()
        else:
            have = ", ".join(sorted(tensors)) or "none"
            raise SAEFormatError(
                f"{tensor_src}: missing tensor 'threshold' for architecture 'jumprelu' (found: {have})"
            )
    metadata = cfg.get("metadata") or cfg.get("meta") or {}
    if not isinstance(metadata, Mapping):
        metadata = {}
    metadata = {"format": "sae_lens", **metadata}
    for key in ("model_name", "hook_name", "hook_layer", "hook_head_index"):
        if key in cfg and key not in metadata:
            metadata[key] = cfg[key]
    if "hook_point" in cfg and "hook_name" not in metadata:  # the pre-6.0 name
        metadata["hook_name"] = cfg["hook_point"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        # before any input scale: the rescaling uses the norms of the decoder as stored
        W_enc, b_enc, W_dec = _fold_decoder_norms(W_enc, b_enc, W_dec)
        metadata["folded_decoder_norms"] = True
    if scale is not None and norm == "expected_average_only_in":
        s = float(scale)
        metadata["folded_norm_scaling_factor"] = s
        # fold in fp32 and round once, so the folded SAE is as exact as its storage dtype allows
        W_enc = (W_enc.float() * s).to(W_enc.dtype)
        W_dec = (W_dec.float() / s).to(W_dec.dtype)
        b_dec = (b_dec.float() / s).to(b_dec.dtype)
    sae = SAE(
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        activation=activation,
        threshold=threshold,
        k=k,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        reshape_activations=_reshape_activations(cfg, metadata.get("hook_name")),
        metadata=metadata,
    )
    if device is not None or dtype is not None:
        sae = sae.to(device=device or sae.device, dtype=dtype or sae.dtype)
    return sae
