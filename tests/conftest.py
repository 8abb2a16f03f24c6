from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest
import torch

from shadowfx import native
from shadowfx.capture import capture
from shadowfx.families import FAMILIES, build_small
from shadowfx.passes.discover_structure import discover_structure

ATTENTIONS = ("sdpa", "eager")

if "PYTEST_XDIST_WORKER" in os.environ:  # the suite runs in one process per core; more threads would oversubscribe
    torch.set_num_threads(1)


@functools.cache
def small_model(family: str, attn: str = "sdpa", num_layers: int = 3):
    return build_small(family, attn_implementation=attn, num_layers=num_layers)


@functools.cache
def captured(family: str, attn: str = "sdpa", step: str = "prefill"):
    return capture(small_model(family, attn), step=step)


@functools.cache
def structure(family: str, attn: str = "sdpa"):
    return discover_structure(captured(family, attn))


def save_with_tokenizer(model, path, texts, vocab_size: int):
    """``model`` saved to ``path`` with a byte-level BPE tokenizer trained here on ``texts``: a checkpoint as the CLI
    takes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>").save_pretrained(path)
    model.save_pretrained(path)
    return path


def padded_batch(batch: int, length: int, vocab: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with a different amount of left padding in every row (row 0 unpadded)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        attention_mask[row, : min(row * 2, length - 1)] = 0
    return input_ids, attention_mask


TRANSPARENT_HUGE_PAGES = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_huge_pages = pytest.mark.skipif(
    not TRANSPARENT_HUGE_PAGES.is_file() or "[never]" in TRANSPARENT_HUGE_PAGES.read_text(),
    reason="this system grants no transparent huge pages")


def huge_page_kib(address: int, size: int) -> int:
    """The KiB of transparent huge pages in this process's memory mappings that overlap [address, address + size)
    (advice splits a mapping where it starts and ends)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span[1], 16) < address + size and address < int(span[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead, and spin-waiting threads slow a test file several times
    over when another process shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def native_calls(monkeypatch):
    """How often each native decode kernel ran from here on, by name (the kernels still run)."""
    counts = {"gather_rows": 0, "gather_cols": 0}
    for name in counts:
        kernel = getattr(native, name)

        def counted(*args, _name=name, _kernel=kernel):
            counts[_name] += 1
            return _kernel(*args)

        monkeypatch.setattr(native, name, counted)
    return counts


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(params=ATTENTIONS)
def attn(request):
    return request.param
