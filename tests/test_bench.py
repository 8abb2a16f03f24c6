"""`shadowfx bench` and shadowfx.bench on small models of real HF classes: every setting measured, the ratios and
bounds consistent with the times and bytes they come from, the saved predictor used, and bad input refused."""

from __future__ import annotations

import json
import weakref

import pytest
import torch

from shadowfx import bench
from shadowfx.cli import main
from shadowfx.data import DataError
from shadowfx.experiment import domain_texts, spread_windows
from shadowfx.loading import load_tokenizer
from shadowfx.families import build_small
from shadowfx.predictor import ShadowPredictor
from shadowfx.runtimes.onnx import OnnxDecoder

from conftest import save_with_tokenizer, small_model, structure

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = dict(prompt_tokens=6, repeats=2, runs=2, predictor_hidden=16)


def test_bench_measures_every_setting_against_dense():
    settings = bench.BenchSettings(sparsities=(0.5,), granularities=("prompt", "token"), batches=(1, 2),
                                   prefills=("sparse", "dense"), **QUICK)
    results = bench.bench(small_model("llama"), settings, name="tiny llama", progress=False)
    rows = results["rows"]
    # per prompt the prefill selects: one row, whatever the per-token prefills
    assert [(r["batch"], r["granularity"], r["prefill"]) for r in rows] == [
        (batch, granularity, prefill) for batch in (1, 2)
        for granularity, prefill in (("prompt", "sparse"), ("token", "sparse"), ("token", "dense"))]
    assert results["threads"] == 1 and results["layers"] == structure("llama").num_layers
    for row in rows:
        for key in ("prefill_speedup", "decode_speedup", "first_token_vs_dense"):
            low, high = row[f"{key}_range"]
            assert 0 < low <= row[key] <= high
        assert row["tokens_per_s"] == pytest.approx(row["batch"] / row["decode_step_s"])
        bound = row["dense_bytes_per_token"] / row["sparse_bytes_per_token"]
        assert row["decode_amdahl_bound"] == pytest.approx(bound)
        assert row["heads_skipped"] > 0 and row["neurons_skipped"] > 0
        assert row["peak_resident_bytes"] > 0
        assert set(row["graph_runtimes"].values()) == {"eager"} and "prefill" in row["graph_runtimes"]
    by_path = {(r["batch"], r["granularity"]): r["decode_path"] for r in rows}  # two rows fit max_gathered_bytes
    assert by_path == {(1, "prompt"): "pregathered", (1, "token"): "per_token", (2, "prompt"): "pregathered",
                       (2, "token"): "per_token"}
    # per token the predictor runs every step and is counted; per prompt it is not
    predictor = rows[0]["predictor_bytes"]
    assert predictor > 0 and {r["predictor"] for r in rows} == {"shadowllm"}
    assert [r["predictor_bytes_per_step"] for r in rows] == [0, predictor, predictor] * 2
    with pytest.raises(ValueError, match="prefills must name some of"):
        bench.bench(small_model("llama"), bench.BenchSettings(prefills=("half",), **QUICK), progress=False)


def test_bench_compares_the_predictor_kinds_per_token():
    """ShadowLLM's one predictor against DejaVu's per-layer ones in the same run: the ratio comes from the rows'
    speedups and bytes; at sparsity 0 no predictor runs, so none is counted."""
    settings = bench.BenchSettings(sparsities=(0.0, 0.5), granularities=("token",), predictors=("shadowllm", "dejavu"),
                                   **QUICK)
    results = bench.bench(small_model("llama"), settings, progress=False)
    rows = {(r["sparsity"], r["predictor"]): r for r in results["rows"]}
    assert set(rows) == {(s, k) for s in (0.0, 0.5) for k in ("shadowllm", "dejavu")}
    assert rows[0.0, "dejavu"]["predictor_bytes_per_step"] == rows[0.0, "shadowllm"]["predictor_bytes_per_step"] == 0
    shadow, dejavu = rows[0.5, "shadowllm"], rows[0.5, "dejavu"]
    assert dejavu["predictor_bytes_per_step"] == dejavu["predictor_bytes"] > shadow["predictor_bytes"] > 0
    costs = {cost["sparsity"]: cost for cost in results["predictor_cost"]}
    assert set(costs) == {0.0, 0.5}
    assert costs[0.5]["shadowllm_over_dejavu_decode"] == pytest.approx(shadow["decode_speedup"]
                                                                       / dejavu["decode_speedup"])
    assert costs[0.5]["dejavu_over_shadowllm_predictor_bytes"] == pytest.approx(dejavu["predictor_bytes"]
                                                                                / shadow["predictor_bytes"])


def test_bench_union_at_batch_two_gathers_one_copy():
    settings = bench.BenchSettings(granularities=("prompt", "token"), batches=(2,), batch_selection="union", **QUICK)
    rows = bench.bench(small_model("qwen2"), settings, progress=False)["rows"]
    assert [(r["granularity"], r["batch_selection"]) for r in rows] == [("prompt", "union"), ("token", "per_row")]
    union = rows[0]
    assert union["decode_path"] == "pregathered"
    assert union["sparse_layers_skipped"]["heads"] == pytest.approx(0.5)  # shared heads keep the budget exactly


def test_bench_against_a_compiled_dense_model():
    settings = bench.BenchSettings(granularities=("prompt",), dense="compile", runtimes=("eager",),
                                   **{**QUICK, "runs": 1})
    results = bench.bench(small_model("opt"), settings, progress=False)
    assert results["settings"]["dense"] == "compile" and len(results["rows"]) == 1
    assert results["rows"][0]["dense_decode_step_s"] > 0


TEXT = "\n".join(f"Line {i}: the shadow predictor ranks heads and neurons of layer {i % 7}." for i in range(60))


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(tmp_path_factory):
    return save_with_tokenizer(build_small("llama"), tmp_path_factory.mktemp("models") / "llama-tok", [TEXT], 300)


def test_bench_prompts_of_real_text_are_windows_of_it_one_per_row(checkpoint_with_tokenizer, tmp_path):
    """A text file, or the built-in corpus's held-out documentation, tokenized by the checkpoint's tokenizer: each
    batch size's prompt is that many windows spread over the text; the settings record where they came from."""
    from shadowfx.loading import load_decoder

    text_file = tmp_path / "prompts.txt"
    text_file.write_text(TEXT)
    model = load_decoder(checkpoint_with_tokenizer)
    tokenizer = load_tokenizer(checkpoint_with_tokenizer)
    found = structure("llama")
    settings = bench.BenchSettings(granularities=("prompt",), batches=(1, 3), prompt_text=str(text_file), **QUICK)
    prompts = bench._prompts(model, found, settings)
    for batch in (1, 3):
        assert torch.equal(prompts[batch], spread_windows(tokenizer, TEXT, 6, batch, "prompt"))
        assert prompts[batch].shape == (batch, 6) and len({tuple(row) for row in prompts[batch].tolist()}) == batch
    builtin = bench._prompts(model, found, bench.BenchSettings(batches=(2,), prompt_text="builtin", **QUICK))
    assert torch.equal(builtin[2], spread_windows(tokenizer, domain_texts()["docs"].held_out, 6, 2, "prompt"))
    results = bench.bench(model, settings, progress=False)
    assert results["settings"]["prompt_text"] == str(text_file) and len(results["rows"]) == 2


def test_bench_refuses_prompt_text_it_cannot_use(checkpoint_with_tokenizer, tmp_path):
    from shadowfx.loading import load_decoder

    with pytest.raises(ValueError, match="prompts of real text need the model's tokenizer"):
        bench._prompts(small_model("llama"), structure("llama"), bench.BenchSettings(prompt_text="builtin"))
    short = tmp_path / "short.txt"
    short.write_text(TEXT[:400])
    settings = bench.BenchSettings(batches=(64,), prompt_text=str(short), **QUICK)
    with pytest.raises(DataError, match="fewer than the batch of 64"):
        bench._prompts(load_decoder(checkpoint_with_tokenizer), structure("llama"), settings)


def test_shapes_have_the_published_sizes():
    opt, llama = (bench.SHAPES[name]() for name in ("opt-1.3b", "llama-3.2-1b"))
    assert (opt.num_hidden_layers, opt.hidden_size, opt.ffn_dim, opt.num_attention_heads) == (24, 2048, 8192, 32)
    assert (llama.num_hidden_layers, llama.hidden_size, llama.intermediate_size, llama.num_attention_heads,
            llama.num_key_value_heads, llama.vocab_size) == (16, 2048, 8192, 32, 8, 128256)
    with pytest.raises(ValueError, match="unknown shape 'gpt-5'"):
        bench.shape_model("gpt-5")
    with pytest.raises(ValueError, match="at least 2"):
        bench.shape_model("opt-1.3b", layers=1)


def test_bench_command_uses_the_saved_predictor_and_writes_json_and_plot(tmp_path, capsys):
    checkpoint = tmp_path / "opt"
    model = build_small("opt")
    model.save_pretrained(checkpoint)
    from shadowfx.api import discover

    saved = ShadowPredictor.for_structure(discover(model), hidden=24, seed=3)
    saved.save(checkpoint)
    out = tmp_path / "bench"
    code = main(["bench", "--model", str(checkpoint), "--granularity", "token", "--prompt", "5", "--repeats", "2",
                 "--runs", "1", "--threads", "1", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 0
    assert results["model"] == str(checkpoint) and len(results["rows"]) == 1
    assert results["rows"][0]["predictor_bytes"] == sum(p.numel() * p.element_size() for p in saved.parameters())
    assert "bench.json" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "no/such/dir"], "no/such/dir"),
    (["--layers", "4", "--model", "{checkpoint}"], "--layers shortens the random-weight shapes only"),
    (["--model", "{checkpoint}", "--sparsity", "1.5"], "sparsity"),
    (["--model", "{checkpoint}", "--prompt-text", "{checkpoint}/no-such.txt"], "no-such.txt"),
])
def test_bench_command_refuses_bad_input(argv, message, tmp_path, capsys):
    checkpoint = tmp_path / "opt"
    build_small("opt").save_pretrained(checkpoint)
    argv = [a.replace("{checkpoint}", str(checkpoint)) for a in argv]
    assert main(["bench", *argv, "--prompt", "4", "--repeats", "1", "--runs", "1", "--out", str(tmp_path / "b")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b" / "bench.json").exists()


def test_bench_command_rejects_a_zero_batch(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--batch", "0"])
    assert "must be at least 1" in capsys.readouterr().err
    torch.set_num_threads(1)


def test_bench_in_onnxruntime_against_the_dense_export(monkeypatch):
    """The runtime "onnx" times the sparse export against the dense export in onnxruntime, after the PyTorch rows,
    with the same bytes and bound as the PyTorch runtime's rows of the same setting; the PyTorch model is freed
    before onnxruntime loads its own copy of the weights."""
    model = build_small("llama")
    weight = weakref.ref(model.lm_head.weight)
    alive_at_load, loaded_beside = [], []
    live = weakref.WeakSet()

    made_with_kernels = []  # whether each sparse decoder runs the kernel library

    def decoder(*args, **kwargs):
        alive_at_load.append(weight() is not None)
        loaded_beside.append(len(live))
        made = OnnxDecoder(*args, **kwargs)
        live.add(made)
        if kwargs.get("kernels") is not None:
            assert kwargs["kernels"] == "auto" and "dense" not in str(args[0])
            made_with_kernels.append(made.kernels is not None)
        return made

    monkeypatch.setattr(bench, "OnnxDecoder", decoder)
    settings = bench.BenchSettings(granularities=("prompt", "token"), runtimes=("eager", "onnx"), **QUICK)
    arguments = [model]
    del model  # bench then holds the only reference, as in the CLI
    rows = bench.bench(arguments.pop(), settings, progress=False)["rows"]
    # the dense export, then each setting's beside it; then, for the first token alone, dense, sparse, dense
    assert alive_at_load == [False] * 9
    assert loaded_beside[6:] == [0] * 3 and loaded_beside[3:6] == [0] * 3
    assert [(r["runtime"], r["dense"], r["granularity"]) for r in rows] == [
        ("eager", "eager", "prompt"), ("eager", "eager", "token"), ("onnx", "onnx", "prompt"), ("onnx", "onnx", "token")]
    eager, onnx = {r["granularity"]: r for r in rows[:2]}, {r["granularity"]: r for r in rows[2:]}
    for granularity in ("prompt", "token"):
        row = onnx[granularity]
        assert row["decode_path"] == eager[granularity]["decode_path"]
        assert row["gathered_bytes"] == eager[granularity]["gathered_bytes"]
        for key in ("decode_amdahl_bound", "sparse_bytes_per_token", "heads_skipped", "neurons_skipped"):
            assert row[key] == pytest.approx(eager[granularity][key])
        assert row["dense_decode_step_s"] > 0 and row["decode_step_s"] > 0
        alone = row["first_token_alone"]
        ratio = alone["first_token_s"] / alone["dense_first_token_s"]
        assert alone["first_token_vs_dense"] == pytest.approx(ratio)
        assert 0 < alone["first_token_s_range"][0] <= alone["first_token_s"] <= alone["first_token_s_range"][1]
    assert "first_token_alone" not in eager["prompt"]
    # the sparse exports run with the kernel library where it builds (the measured ones, then the first tokens alone)
    assert len(made_with_kernels) == 4
    assert [onnx[granularity]["onnx_kernels"] for granularity in ("prompt", "token")] == made_with_kernels[:2]
    assert onnx["prompt"]["gathered_bytes"] > 0 and onnx["token"]["predictor_bytes_per_step"] > 0
