"""Timing two ways of doing the same thing on a noisy machine: alternated, so that drift hits both alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def alternating(first: Callable[[], object], second: Callable[[], object], repeats: int,
                warmup: int = 2) -> tuple[float, float, float]:
    """Median seconds of ``first`` and of ``second``, called in alternation so that drift hits both alike, and the
    median ratio first / second over the alternated pairs."""
    times: tuple[list[float], list[float]] = ([], [])
    for index in range(repeats + warmup):
        for run, store in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            run()
            if index >= warmup:
                store.append(time.perf_counter() - started)
    ratio = statistics.median(a / b for a, b in zip(*times))
    return statistics.median(times[0]), statistics.median(times[1]), ratio


def alternating_within(first: Callable[[], object], second: Callable[[], object], seconds: float, least: int,
                       most: int, warmup: int = 2) -> tuple[float, float, float]:
    """:func:`alternating` with as many pairs as fit in about ``seconds``, at least ``least`` and at most ``most``,
    sized by the last warm-up pair (a short call's ratio is noisy, so it gets more pairs)."""
    pair_s = 0.0
    for _ in range(max(1, warmup)):
        started = time.perf_counter()
        first()
        second()
        pair_s = time.perf_counter() - started
    pairs = min(most, max(least, int(seconds / max(pair_s, 1e-9))))
    return alternating(first, second, pairs, warmup=0)
