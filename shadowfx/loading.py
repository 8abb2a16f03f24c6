"""Load a causal-LM decoder from a local Hugging Face directory or a config file, never from the network."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(ValueError):
    """The path does not hold a causal-LM decoder that can be loaded here."""


def _read_config(path: Path) -> PretrainedConfig:
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ModelLoadError(
            f"{path} is not a Hugging Face model directory (no config.json in it); pass a directory written by "
            "save_pretrained, or a config.json file"
        )
    try:
        json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{config_file} is not a readable JSON config: {error}") from error
    try:
        return AutoConfig.from_pretrained(str(config_file.parent if path.is_dir() else config_file),
                                          local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"{config_file} is not a config transformers understands: {error}") from error


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of one of :data:`DTYPES` (by name or as the dtype itself)."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def has_weights(path: Path) -> bool:
    return path.is_dir() and any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS)


def load_decoder(path: str | Path, *, attn_implementation: str = "sdpa",
                 dtype: str | torch.dtype = "float32") -> nn.Module:
    """The causal LM at ``path``: with its weights if the directory has them, else on the meta device.

    ``dtype`` (a name in :data:`DTYPES` or the torch dtype) is the one the weights are held in, whatever the
    checkpoint was saved in: float32 by default, so nothing silently runs in a checkpoint's saved float16. A
    config-only model has the exact architecture (so its structure can be discovered and inspected) but no weights,
    so nothing can run on it.
    """
    dtype = torch_dtype(dtype)
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist; pass a local model directory or a config.json file")
    config = _read_config(path)
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"{path} is a {config.model_type} encoder-decoder model; shadowfx rewrites decoder-only "
                             "causal LMs")
    try:
        if has_weights(path):
            return AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, attn_implementation=attn_implementation, dtype=dtype,
            ).eval()
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype).eval()
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            raise ModelLoadError(
                f"{path} holds a {config.model_type} model, which is not a causal-LM decoder transformers can load "
                "with AutoModelForCausalLM"
            ) from error
        raise ModelLoadError(f"cannot load the model at {path}: {error}") from error
    except (OSError, SafetensorError) as error:
        raise ModelLoadError(f"cannot read the weights at {path}: {error}; the checkpoint is damaged or incomplete, "
                             "save it again (save_pretrained)") from error


def load_tokenizer(path: str | Path):
    """The tokenizer saved with the model at ``path``, or a clear error when there is none."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{path} has no usable tokenizer (none of {', '.join(TOKENIZER_FILES)}); save one with "
                             "tokenizer.save_pretrained there")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(f"{path} has no usable tokenizer (save one with tokenizer.save_pretrained there): "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
