"""The alternated timing that bench and runtime="auto" share, on a clock the test advances (no real timing)."""

import pytest

from shadowfx import timing
from shadowfx.runtimes.pytorch import COMPILE_MARGIN, RuntimeTiming


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    return now


@pytest.mark.parametrize(("seconds", "pairs"), [(4.0, 10), (0.1, 3), (100.0, 50)])
def test_alternating_within_fits_the_pairs_to_the_time_sized_by_the_warm_up(clock, seconds, pairs):
    calls = []

    def call(name: str, seconds_taken: float) -> None:
        clock[0] += seconds_taken
        calls.append(name)

    # a warm-up pair takes 0.4 s; one timed call is slower, and the medians ignore it
    durations = iter([0.1] * 3 + [0.5] + [0.1] * 200)
    first_s, second_s, ratio = timing.alternating_within(
        lambda: call("first", 0.3), lambda: call("second", next(durations)), seconds, least=3, most=50, warmup=2)
    assert calls == ["first", "second"] * (2 + pairs)
    assert (first_s, second_s, ratio) == pytest.approx((0.3, 0.1, 3.0))


@pytest.mark.parametrize(("speedup", "chosen"), [(0.5, "eager"), (1.0 + COMPILE_MARGIN / 2, "eager"), (1.2, "compile")])
def test_auto_compiles_only_a_graph_faster_by_more_than_the_margin(speedup, chosen):
    assert RuntimeTiming(eager_s=speedup, compile_s=1.0, speedup=speedup).chosen == chosen
