"""Train the reference models: small decoders whose upper layers matter, saved as ordinary HF directories.

No pretrained weights can be downloaded here, so the project trains its own on varied text: the installed Python
packages' API documentation and code, and WikiText-2 prose where ``--wikitext`` (or ``$SHADOWFX_WIKITEXT``) names a
folder holding its valid.txt and test.txt (see ``shadowfx.data``). A byte-level BPE tokenizer is trained first and
shared by both models; it and the token streams are cached under ``--home`` with the settings they were built from,
and a run asking for other settings there is refused. Training checkpoints every few minutes and resumes from the
last checkpoint, so it can run across sessions; at the end the model is evaluated (perplexity per domain and the
damage curve, on held-out prose or else on API docs) and written with its tokenizer and ``report.json`` as one
``save_pretrained`` directory.

    python scripts/train_reference.py --arch llama --wikitext path/to/wikitext-2   # LLaMA-style, GQA
    python scripts/train_reference.py --arch opt --wikitext path/to/wikitext-2     # OPT-style, ReLU
    python scripts/train_reference.py --arch llama --steps 20 --layers 2 --hidden 64 --home /tmp/ref   # smoke run

The finished models go to ``--out`` (default: the repository's ``reference/<name>``, where they are committed, stored
in float16 to stay small); the tokenizer, token streams and training state go under ``--home`` (default
``$SHADOWFX_HOME`` or ``~/.cache/shadowfx``), outside the repository. Running the script again for a model whose
training finished only evaluates it and writes it again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
)

from shadowfx.data import (
    WIKITEXT_ENV,
    WIKITEXT_FILES,
    Corpus,
    DataError,
    build_corpus,
    read_text,
    wikitext_dir,
    wikitext_file,
)
from shadowfx.perplexity import damage_curve, perplexity
from shadowfx.files import atomic_write, atomic_write_directory

REPOSITORY_MODELS = Path(__file__).resolve().parents[1] / "reference"
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def default_home() -> Path:
    return Path(os.environ.get("SHADOWFX_HOME", Path.home() / ".cache" / "shadowfx"))


def train_tokenizer(corpus: Corpus, vocab: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tokenizer.train_from_iterator(corpus.texts("train"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL)


def encode(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """One stream, documents separated by the end-of-text token."""
    ids: list[int] = []
    for batch_start in tqdm(range(0, len(texts), 64), desc="tokenising", leave=False):
        for encoded in tokenizer(texts[batch_start:batch_start + 64])["input_ids"]:
            ids.extend(encoded)
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int32)


def data_settings(vocab: int, corpus_chars: int, wikitext: Path | None) -> str:
    """What the tokenizer and streams are built from, as JSON; WikiText-2 by content, so a moved folder still
    matches."""
    prose = None if wikitext is None else {
        name: hashlib.sha256(read_text(wikitext_file(wikitext, name)).encode()).hexdigest()
        for name in WIKITEXT_FILES.values()}
    return json.dumps({"vocab": vocab, "corpus_chars": corpus_chars, "wikitext_sha256": prose}, sort_keys=True)


def prepare_data(home: Path, vocab: int, corpus_chars: int,
                 wikitext: Path | None) -> tuple[PreTrainedTokenizerFast, dict[str, torch.Tensor]]:
    """Tokenizer and token streams (train, and held out per domain), built once and cached under ``home``.

    The streams file records the settings it was built from (written last, so its presence means both are complete);
    a cache built from other settings is refused rather than silently reused, since both models must share it.
    """
    tokenizer_dir, streams_file = home / "tokenizer", home / "streams.safetensors"
    settings = data_settings(vocab, corpus_chars, wikitext)
    if streams_file.is_file():
        with safe_open(str(streams_file), "pt") as cached:
            built_from = (cached.metadata() or {}).get("settings", "unrecorded settings")
        if built_from != settings:
            raise DataError(f"{streams_file} was built from {built_from}, this run asks for {settings}: use another "
                            f"--home, or delete {tokenizer_dir} and {streams_file} to rebuild them")
        return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir), load_file(str(streams_file))
    corpus = build_corpus(docs_chars=corpus_chars, code_chars=corpus_chars, wikitext=wikitext)
    print("corpus characters:", json.dumps(corpus.sizes()))
    tokenizer = train_tokenizer(corpus, vocab)
    atomic_write_directory(tokenizer_dir, tokenizer.save_pretrained)
    streams = {"train": encode(tokenizer, corpus.texts("train"))}
    for domain in corpus.documents["heldout"]:
        streams[f"heldout_{domain}"] = encode(tokenizer, corpus.texts("heldout", domain))
    atomic_write(streams_file, lambda temporary: save_file(streams, str(temporary), metadata={"settings": settings}))
    return tokenizer, streams


def model_config(arch: str, vocab: int, layers: int, hidden: int, heads: int, kv_heads: int, tokenizer):
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=kv_heads, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                           max_position_embeddings=1024, tie_word_embeddings=True, **special)
    return OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     ffn_dim=4 * hidden, max_position_embeddings=1024, word_embed_proj_dim=hidden, dropout=0.0,
                     **special)


def save_checkpoint(path: Path, model, optimizer, step: int, train_seconds: float) -> None:
    """Training state; ``train_seconds`` is the training time of every run so far, which the next run adds to."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "train_seconds": train_seconds}
    atomic_write(path, lambda temporary: torch.save(state, temporary))


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("llama", "opt"), required=True)
    parser.add_argument("--home", type=Path, default=default_home(), help="tokenizer, token streams and training "
                        "checkpoints (outside the repository)")
    parser.add_argument("--out", type=Path, default=REPOSITORY_MODELS,
                        help="where the finished model goes, in float16 (default: the repository's reference/)")
    parser.add_argument("--name", help="model directory name (default: <arch>-<layers>x<hidden>)")
    parser.add_argument("--wikitext", type=Path, default=wikitext_dir(),
                        help=f"WikiText-2 folder holding {' and '.join(WIKITEXT_FILES.values())}, for a prose domain "
                             f"(default: ${WIKITEXT_ENV}; neither: API documentation and code only)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--corpus-chars", type=int, default=8_000_000, help="characters of API docs and of code")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    try:
        tokenizer, streams = prepare_data(args.home, args.vocab, args.corpus_chars, args.wikitext)
    except DataError as error:
        raise SystemExit(f"train_reference.py: {error}") from error
    name = args.name or f"{args.arch}-{args.layers}x{args.hidden}"
    out = args.out / name
    # outside the model folder, which is replaced whole when a run finishes
    state_file = args.home / "checkpoints" / name / "state.pt"
    torch.manual_seed(0)
    config = model_config(args.arch, len(tokenizer), args.layers, args.hidden, args.heads, args.kv_heads, tokenizer)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    step, earlier_seconds = 0, 0.0
    if state_file.is_file():
        state = torch.load(state_file, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, earlier_seconds = state["step"], state["train_seconds"]
        print(f"resuming {name} at step {step}")
    train = streams["train"].long()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{name}: {parameters / 1e6:.1f}M parameters, {train.numel() / 1e6:.1f}M training tokens")
    model.train()
    last_save, started, losses = time.monotonic(), time.monotonic(), []
    train_seconds = earlier_seconds
    progress = tqdm(total=args.steps, initial=step, desc=name)
    while step < args.steps:
        # windows drawn from a generator seeded by the step, so a resumed run sees the same data
        generator = torch.Generator().manual_seed(step)
        starts = torch.randint(0, train.numel() - args.length - 1, (args.batch,), generator=generator)
        batch = torch.stack([train[s:s + args.length + 1] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, warmup=min(100, args.steps // 10 + 1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        losses.append(loss.item())
        progress.update(1)
        progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        train_seconds = earlier_seconds + time.monotonic() - started
        if time.monotonic() - last_save > 60 * args.checkpoint_minutes or step == args.steps:
            save_checkpoint(state_file, model, optimizer, step, train_seconds)
            last_save = time.monotonic()
    progress.close()
    model.eval()
    domains = sorted(key.removeprefix("heldout_") for key in streams if key.startswith("heldout_"))
    damage_domain = "prose" if "prose" in domains else "docs"
    report = {"name": name, "arch": args.arch, "parameters": parameters, "steps": args.steps,
              "tokens_seen": args.steps * args.batch * args.length, "train_minutes": train_seconds / 60,
              "train_minutes_this_run": (train_seconds - earlier_seconds) / 60,
              "threads": args.threads, "config": config.to_diff_dict(),
              "perplexity": {domain: perplexity(model, streams[f"heldout_{domain}"].long(), length=args.length)
                             for domain in domains},
              "damage_domain": damage_domain,
              "damage": damage_curve(model, streams[f"heldout_{damage_domain}"].long(), length=args.length)}

    report["saved_dtype"] = "float16"  # evaluated in float32; stored in half the bytes, loaded back as asked

    def write_model(folder: Path) -> None:
        model.to(torch.float16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "report.json").write_text(json.dumps(report, indent=2))  # the folder's rename makes it atomic

    atomic_write_directory(out, write_model)
    print(json.dumps({k: report[k] for k in ("name", "parameters", "perplexity", "damage")}, indent=2))


if __name__ == "__main__":
    main()
