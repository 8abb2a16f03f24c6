"""The accuracy comparison: the leak-free protocol, the controls, the bootstrap, resuming, and `shadowfx eval`."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import shadowfx
from shadowfx import comparison
from shadowfx.cli import main
from shadowfx.comparison import (
    Baselines,
    BudgetOnly,
    ComparisonError,
    EvalWindows,
    affordable_sparsity,
    continuation_nll,
    evaluate,
    paired_bootstrap,
    report_runs,
    within_layer_order,
)
from shadowfx.predictor import LayerwisePredictor, ShadowPredictor, StaticScores
from shadowfx.selection import SparsityConfig, kept_counts, select
from conftest import save_with_tokenizer, small_model, structure
from shadowfx.masked_reference import MaskedReference

PROMPT = 12
WINDOW = 18


@pytest.fixture(scope="module")
def llama(one_thread):
    return small_model("llama")


@pytest.fixture(scope="module")
def baselines(llama, tmp_path_factory):
    """Static, constant and per-domain statics from traces of two 'domains' of random text with different vocab."""
    generator = torch.Generator().manual_seed(3)
    root = tmp_path_factory.mktemp("traces")
    traces = {domain: shadowfx.calibrate(llama, torch.randint(0, high, (10, PROMPT), generator=generator),
                                         structure("llama"), root / domain, progress=False)
              for domain, high in (("low", 128), ("high", 512))}
    return Baselines.from_traces(traces)


def _windows(seed: int = 0, per_domain: int = 3) -> EvalWindows:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 512, (2 * per_domain, WINDOW), generator=generator)
    return EvalWindows(tokens, ("low",) * per_domain + ("high",) * per_domain, PROMPT)


def _kept(selection) -> list[list[int]]:
    return [t.tolist() for t in (*selection.kv_heads, *selection.neurons)]


def test_leak_free_selects_from_the_prompt_and_scores_only_the_continuation(llama):
    sparse = shadowfx.transform(llama, ShadowPredictor.for_structure(structure("llama"), hidden=16), sparsity=0.5)
    tokens = _windows().tokens[:2]
    other = tokens.clone()
    other[:, PROMPT:] = torch.randint(0, 512, other[:, PROMPT:].shape, generator=torch.Generator().manual_seed(9))
    nll = continuation_nll(sparse, tokens, PROMPT, "leak_free")
    selection = sparse.last_selection
    continuation_nll(sparse, other, PROMPT, "leak_free")
    assert _kept(sparse.last_selection) == _kept(selection)  # another continuation, the same selection

    # the prompt's selection, held over the whole window, predicts exactly the continuation tokens' NLL
    with MaskedReference(llama, structure("llama")) as reference:
        reference.set_selection({i + 1: t for i, t in enumerate(selection.kv_heads)},
                                {i + 1: t for i, t in enumerate(selection.neurons)})
        logits = reference.logits(tokens, torch.ones_like(tokens))
    expected = torch.nn.functional.cross_entropy(logits[:, PROMPT - 1:-1].transpose(1, 2), tokens[:, PROMPT:],
                                                 reduction="none").sum(1)
    torch.testing.assert_close(nll, expected, rtol=1e-4, atol=1e-3)

    # the paper's protocol selects from the whole window, so the continuation changes the selection
    continuation_nll(sparse, tokens, PROMPT, "paper")
    paper = sparse.last_selection
    continuation_nll(sparse, other, PROMPT, "paper")
    assert _kept(sparse.last_selection) != _kept(paper)


def test_an_input_free_selection_scores_the_same_under_both_protocols(llama, baselines):
    sparse = shadowfx.transform(llama, baselines.static, sparsity=0.5)
    tokens = _windows().tokens
    torch.testing.assert_close(continuation_nll(sparse, tokens, PROMPT, "leak_free"),
                               continuation_nll(sparse, tokens, PROMPT, "paper"), rtol=1e-4, atol=1e-3)
    dense = continuation_nll(llama, tokens, PROMPT, "leak_free")
    logits = llama(tokens).logits
    manual = -torch.log_softmax(logits[:, PROMPT - 1:-1], -1).gather(-1, tokens[:, PROMPT:, None]).squeeze(-1).sum(1)
    torch.testing.assert_close(dense, manual, rtol=1e-5, atol=1e-4)


def test_within_layer_order_keeps_every_layers_count_and_ranks_by_the_reference():
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(3, 4, 12, generator=generator) * torch.tensor([1.0, 3.0, 0.5, 2.0])[:, None]
    order = torch.rand(4, 12, generator=generator)
    config = SparsityConfig.from_arguments(0.5, None, None, "global")
    rearranged = within_layer_order(scores, order)
    before = select(shadowfx.Scores(scores[..., :4], scores), structure("llama"), config).neurons
    after = select(shadowfx.Scores(rearranged[..., :4], rearranged), structure("llama"), config).neurons
    for layer, (a, b) in enumerate(zip(before, after)):
        assert kept_counts(a, 12).tolist() == kept_counts(b, 12).tolist()
        for row in range(3):
            kept = sorted(b[row][b[row] < 12].tolist())
            best = order[layer].argsort(descending=True)[:len(kept)].sort().values.tolist()
            assert kept == best  # the static ranking's top units of this layer
    blocks = within_layer_order(scores, order, block=3)
    assert torch.equal(blocks.unflatten(-1, (4, 3)).amin(-1), blocks.unflatten(-1, (4, 3)).amax(-1))


def test_budget_only_keeps_the_predictors_counts_with_the_static_units(llama, baselines):
    predictor = ShadowPredictor.for_structure(structure("llama"), hidden=16)
    tokens = _windows().tokens[:, :PROMPT]
    shadow = shadowfx.transform(llama, predictor, sparsity=0.5)
    budget = shadowfx.transform(llama, BudgetOnly(predictor, baselines.static, structure("llama")), sparsity=0.5)
    shadow(tokens)
    budget(tokens)
    groups = structure("llama").layers[1].attention.num_kv_heads
    width = structure("llama").layers[1].mlp.intermediate_size
    for a, b in zip(shadow.last_selection.kv_heads, budget.last_selection.kv_heads):
        assert kept_counts(a, groups).tolist() == kept_counts(b, groups).tolist()
    for a, b in zip(shadow.last_selection.neurons, budget.last_selection.neurons):
        assert kept_counts(a, width).tolist() == kept_counts(b, width).tolist()
    assert _kept(shadow.last_selection) != _kept(budget.last_selection)


def test_bootstrap_interval_and_affordable_sparsity():
    a = torch.tensor([10.0, 12.0, 9.0, 11.0])
    same = paired_bootstrap(a, a.clone(), 4, samples=200)
    assert same["ratio"] == 1.0 and same["ci95"] == [1.0, 1.0] and not same["excludes_equality"]
    worse = paired_bootstrap(a + 2.0, a, 4, samples=200)
    assert worse["ratio"] == pytest.approx(math.exp(0.5)) and worse["excludes_equality"]
    noisy = paired_bootstrap(a + torch.tensor([3.0, -3.0, 2.5, -2.0]), a, 4, samples=500)
    assert noisy["ci95"][0] < 1.0 < noisy["ci95"][1] and not noisy["excludes_equality"]
    assert affordable_sparsity({0.1: 1.01, 0.2: 1.04, 0.3: 1.3}, 1.05) == 0.2
    assert affordable_sparsity({0.1: 1.1}, 1.05) is None


@pytest.fixture(scope="module")
def report(llama, baselines, tmp_path_factory):
    s = structure("llama")
    predictors = {"shadowllm_prompt": ShadowPredictor.for_structure(s, hidden=16),
                  "shadowllm_token": ShadowPredictor.for_structure(s, hidden=16, seed=1),
                  "dejavu_prompt": LayerwisePredictor.for_structure(s, hidden=8),
                  "dejavu_token": LayerwisePredictor.for_structure(s, hidden=8, seed=1)}
    out = tmp_path_factory.mktemp("comparison")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", shadowfx.SparsityWarning)  # 2 KV groups per layer: 0.25 rounds
        result = evaluate(llama, _windows(), baselines, criterion="plainact", predictors=predictors,
                          sparsities=(0.25, 0.5), batch_size=4, bootstrap_samples=200, out=out, progress=False)
    return result, out, predictors


def test_every_method_and_control_runs_and_differs_from_the_predictor(report):
    result, out, _ = report
    runs = json.loads((out / comparison.RUNS_FILE).read_text())["runs"]
    assert set(result["methods"]) == {"global", "per_layer"}
    assert set(result["methods"]["global"]) == set(comparison.METHODS) - {"dejavu_prompt", "dejavu_token"}
    assert set(result["methods"]["per_layer"]) == set(comparison.METHODS) - {"budget_only"}
    assert set(result["skipped"]["global"]) == {"dejavu_prompt", "dejavu_token"}
    for scope in ("global", "per_layer"):
        reference = runs[f"{scope}/0.5/shadowllm_prompt"]["nll"]
        for method in result["methods"][scope]:
            keys = [k for k in runs if k.startswith(f"{scope}/0.5/{method}")]
            assert keys, method
            if method != "shadowllm_prompt":
                assert all(runs[k]["nll"] != reference for k in keys), method
        assert result["methods"][scope]["random"]["0.5"]["per_seed"].keys() == {"0", "1", "2"}
        assert len(set(result["methods"][scope]["random"]["0.5"]["per_seed"].values())) == 3
        assert set(result["shadowllm_prompt_vs"][scope]["0.5"]) == set(result["methods"][scope]) - {
            "shadowllm_prompt"}
    entry = result["methods"]["global"]["static"]["0.5"]
    assert entry["effective_sparsity"]["neurons"] == pytest.approx(0.5)
    assert entry["perplexity"] > result["dense"]["perplexity"] * 0.5
    assert set(entry["per_domain"]) == {"low", "high"}
    assert result["planned_sparsity"]["per_layer"]["0.25"]["heads"]["achieved"] == 0.0  # one of 2 groups: none
    assert (out / "comparison.json").is_file() and (out / "comparison.png").stat().st_size > 0


def test_the_oracle_of_another_window_is_that_windows_oracle(report, llama, baselines):
    _, out, _ = report
    runs = json.loads((out / comparison.RUNS_FILE).read_text())["runs"]
    windows = _windows()
    heads, neurons = comparison.oracle_scores(llama, structure("llama"), windows.tokens[:, :PROMPT], "plainact",
                                              batch_size=4, progress=False)
    other = comparison._other_window(windows.domains)
    assert other.tolist() == [1, 2, 0, 4, 5, 3]  # the next window of the same domain
    rows = comparison.RowScores(baselines.static)
    sparse = shadowfx.transform(llama, rows, sparsity=0.5, scope="per_layer")
    rows.use(heads[other], neurons[other])
    nll = continuation_nll(sparse, windows.tokens, PROMPT, "leak_free")
    torch.testing.assert_close(nll, torch.tensor(runs["per_layer/0.5/other_window_oracle"]["nll"]), rtol=1e-4,
                               atol=1e-3)


def test_a_rerun_resumes_and_other_settings_are_refused(report, llama, baselines, monkeypatch):
    result, out, predictors = report

    def no_new_runs(*args, **kwargs):
        raise AssertionError("a finished run was computed again")

    monkeypatch.setattr(comparison, "_run", no_new_runs)
    again = evaluate(llama, _windows(), baselines, criterion="plainact", predictors=predictors,
                     sparsities=(0.25, 0.5), batch_size=4, bootstrap_samples=200, out=out, progress=False)
    assert again["methods"] == result["methods"] and again["missing_runs"] == []
    # a predictor trained later, or left out, voids nothing of the others' runs; a changed one is refused
    fewer = {name: predictors[name] for name in ("shadowllm_prompt", "dejavu_prompt")}
    kept = evaluate(llama, _windows(), baselines, criterion="plainact", predictors=fewer, sparsities=(0.25, 0.5),
                    batch_size=4, bootstrap_samples=200, out=out, progress=False)
    assert kept["methods"]["per_layer"]["dejavu_prompt"] == result["methods"]["per_layer"]["dejavu_prompt"]
    assert "shadowllm_token" in kept["skipped"]["global"]
    retrained = fewer | {"dejavu_prompt": LayerwisePredictor.for_structure(structure("llama"), hidden=8, seed=7)}
    with pytest.raises(ComparisonError, match="per_layer/0.25/dejavu_prompt .* another dejavu_prompt predictor"):
        evaluate(llama, _windows(), baselines, criterion="plainact", predictors=retrained, sparsities=(0.25, 0.5),
                 batch_size=4, bootstrap_samples=200, out=out, progress=False)
    partial = report_runs(llama, _windows(), out, criterion="plainact", sparsities=(0.5, 0.75),
                          bootstrap_samples=200)
    assert partial["methods"]["global"]["static"].keys() == {"0.5"}  # reports what ran, runs nothing
    assert "global/0.75/static" in partial["missing_runs"] and "per_layer/0.75/random/seed2" in partial["missing_runs"]
    assert "global/0.75/dejavu_token" not in partial["missing_runs"]  # per-layer scope only
    with pytest.raises(ComparisonError, match="no finished runs"):
        report_runs(llama, _windows(), out / "empty", criterion="plainact")
    with pytest.raises(ComparisonError, match="other settings"):
        report_runs(llama, _windows(seed=1), out, criterion="plainact")
    with pytest.raises(ComparisonError, match="other settings"):
        evaluate(llama, _windows(), baselines, criterion="plainact", predictors=predictors, sparsities=(0.5,),
                 protocol="paper", out=out, progress=False)
    with pytest.raises(ComparisonError, match="unknown methods"):
        evaluate(llama, _windows(), baselines, criterion="plainact", methods=("static", "best"), progress=False)
    with pytest.raises(ComparisonError, match="sparsities"):
        evaluate(llama, _windows(), baselines, criterion="plainact", sparsities=(1.5,), progress=False)
    with pytest.raises(ComparisonError, match="continuation"):
        EvalWindows(_windows().tokens, _windows().domains, WINDOW)


def test_a_dense_token_prefill_scores_the_continuation_after_a_dense_prompt(report, llama, baselines, tmp_path):
    """token_prefill="dense": the per-token methods run the transform with the prompt dense (leak-free only), the
    setting is recorded, and runs of the other prefill are never mixed in."""
    result, out, predictors = report
    dense_prefill = evaluate(llama, _windows(), baselines, criterion="plainact", predictors=predictors,
                             methods=("shadowllm_token",), scopes=("per_layer",), sparsities=(0.5,), batch_size=4,
                             bootstrap_samples=200, out=tmp_path, token_prefill="dense", progress=False)
    assert dense_prefill["settings"]["token_prefill"] == "dense"
    sparse = shadowfx.transform(llama, predictors["shadowllm_token"], sparsity=0.5, scope="per_layer",
                                granularity="token", prefill="dense")
    tokens = _windows().tokens
    expected = torch.cat([continuation_nll(sparse, tokens[i:i + 4], PROMPT, "leak_free") for i in range(0, 6, 4)])
    runs = json.loads((tmp_path / comparison.RUNS_FILE).read_text())["runs"]
    torch.testing.assert_close(torch.tensor(runs["per_layer/0.5/shadowllm_token"]["nll"]), expected)
    sparse_prefill = json.loads((out / comparison.RUNS_FILE).read_text())["runs"]["per_layer/0.5/shadowllm_token"]
    assert runs["per_layer/0.5/shadowllm_token"]["nll"] != sparse_prefill["nll"]
    with pytest.raises(ComparisonError, match="other settings"):
        evaluate(llama, _windows(), baselines, criterion="plainact", predictors=predictors, sparsities=(0.5,),
                 methods=("shadowllm_token",), out=out, token_prefill="dense", progress=False)
    for directory, prefill in ((out, "dense"), (tmp_path, "sparse")):
        with pytest.raises(ComparisonError, match="other settings"):
            report_runs(llama, _windows(), directory, criterion="plainact", token_prefill=prefill)
    with pytest.raises(ComparisonError, match="needs the leak_free protocol"):
        evaluate(llama, _windows(), baselines, criterion="plainact", protocol="paper", token_prefill="dense",
                 progress=False)
    with pytest.raises(ComparisonError, match="token_prefill must be one of"):
        evaluate(llama, _windows(), baselines, criterion="plainact", token_prefill="half", progress=False)


def test_a_predictor_of_another_model_is_refused(llama, baselines):
    foreign = StaticScores.random(structure("llama"), 0)
    foreign.fingerprint = structure("opt").fingerprint
    with pytest.raises(shadowfx.FingerprintMismatch):
        evaluate(llama, _windows(), baselines, criterion="plainact", predictors={"shadowllm_prompt": foreign},
                 methods=("static",), progress=False)


def test_eval_command_calibrates_trains_and_prints_the_table(tmp_path, capsys, monkeypatch, one_thread):
    model = small_model("llama")
    text = " ".join(f"word{i % 97} value{i % 13}" for i in range(6000))
    checkpoint = save_with_tokenizer(model, tmp_path / "model", [text], vocab_size=300)
    (tmp_path / "notes.txt").write_text(text)
    out = tmp_path / "eval"
    argv = [str(checkpoint), "--out", str(out), "--no-builtin", "--text", str(tmp_path / "notes.txt"),
            "--methods", "static", "random", "shadowllm_prompt", "--scope", "global", "--sparsity", "0.5",
            "--windows", "3", "--calibration-samples", "24", "--prompt-length", "16", "--continuation", "4",
            "--hidden", "8"]
    assert main(["eval", *argv]) == 0
    printed = capsys.readouterr().out
    assert "dense perplexity" in printed and "shadowllm_prompt" in printed and "random" in printed
    result = json.loads((out / "comparison.json").read_text())
    assert set(result["methods"]["global"]) == {"static", "random", "shadowllm_prompt"}
    assert result["settings"]["windows"]["per_domain"] == {"notes": 3}
    assert (out / "predictors").is_dir() and (out / "traces" / "notes").is_dir()
    assert main(["eval", *argv]) == 0  # resumes: traces, predictor and runs are all reused
    # --report-only reads the runs alone: a copy of the folder without traces or predictors, and nothing calibrates
    copy = tmp_path / "runs-only"
    copy.mkdir()
    (copy / comparison.RUNS_FILE).write_text((out / comparison.RUNS_FILE).read_text())

    def nothing_slow(*args, **kwargs):
        raise AssertionError("--report-only calibrated or trained")

    monkeypatch.setattr("shadowfx.experiment.calibrate_domains", nothing_slow)
    monkeypatch.setattr("shadowfx.experiment.train_missing", nothing_slow)
    capsys.readouterr()
    only = [*argv[:argv.index("--sparsity") + 1], "0.25", *argv[argv.index("--sparsity") + 1:]]
    assert main(["eval", *only[:1], "--out", str(copy), *only[3:], "--report-only"]) == 0
    reported = json.loads((copy / "comparison.json").read_text())
    assert reported["methods"] == result["methods"] and reported["predictors"] == result["predictors"]
    assert set(reported["missing_runs"]) == {"global/0.25/static", "global/0.25/shadowllm_prompt",
                                             *(f"global/0.25/random/seed{seed}" for seed in range(3))}
    assert "5 runs are not finished yet" in capsys.readouterr().out
    # a plan it cannot run is refused before anything slow (calibration is refused from here on)
    assert main(["eval", *argv[:1], "--out", str(tmp_path / "paper"), *argv[3:], "--protocol", "paper",
                 "--token-prefill", "dense"]) == 2
    assert "token_prefill='dense' needs the leak_free protocol" in capsys.readouterr().err


def test_demo_runs_the_method_end_to_end(tmp_path, capsys, one_thread):
    from shadowfx.demo import METHODS, SCOPE, run_demo

    model = small_model("llama")
    text = " ".join(f"word{i % 97} value{i % 13}" for i in range(3000))
    checkpoint = save_with_tokenizer(model, tmp_path / "model", [text], vocab_size=300)
    demo = run_demo(tmp_path / "demo", model_id=checkpoint, windows=2, calibration_samples=24, prompt_length=16,
                    continuation=4, hidden=8, progress=False)
    printed = capsys.readouterr().out
    assert set(demo["perplexity"]) == set(METHODS) and demo["scope"] == SCOPE
    assert len(demo["answers"]) == 3 and all("dense" in a and "sparse" in a for a in demo["answers"])
    assert demo["decode"]["dense_s"] > 0 and demo["decode"]["sparse_s"] > 0
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["sparsity"] == demo["sparsity"]
    assert "Q: What is the capital of France?" in printed and "decode" in printed
