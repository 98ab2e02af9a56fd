"""The bench's ramp finds the limit to within its bisection's resolution (pure logic: the step
is a stand-in that passes below a given rate)."""

from __future__ import annotations

from typing import Any

import pytest

from bench import run


def _ramp(monkeypatch: pytest.MonkeyPatch, limit: float, refine: int, start: float = 100.0,
          publisher_limit: float = 1e12) -> tuple[dict[str, Any], list[float]]:
    rates: list[float] = []

    def step(target: object, subs: object, rate: float, seconds: float, **kw: Any) -> run.Step:
        rates.append(rate)
        p99 = 10.0 if rate <= limit else 100.0
        return run.Step(rate=rate, subscribers=1, published=1, received=1, lost=0, seconds=1.0,
                        delivered_per_second=round(rate), latency={"p99_ms": p99},
                        server_cpu_percent=0.0, server_rss_mb=0.0,
                        publish_rate=min(rate, publisher_limit))

    monkeypatch.setattr(run, "step", step)
    monkeypatch.setattr(run, "log", lambda message: None)
    result = run.ramp(None, None, mode="x", start_rate=start, seconds=1.0,  # type: ignore[arg-type]
                      factor=1.6, max_steps=16, label="t", refine=refine)
    return result, rates


@pytest.mark.parametrize("limit", [130.0, 1000.0, 7777.0])
def test_three_bisections_end_within_six_percent_of_the_limit(
        monkeypatch: pytest.MonkeyPatch, limit: float) -> None:
    result, rates = _ramp(monkeypatch, limit, refine=3)
    best = result["best"]["rate"]
    assert best <= limit and best >= limit / 1.6 ** (1 / 8)
    assert len(rates) == len(result["steps"])


def test_without_bisection_the_ramp_stops_at_its_first_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, rates = _ramp(monkeypatch, 1000.0, refine=0)
    assert rates[-1] == rates[-2] > 1000.0  # the failed step, tried once more: failed again
    distinct = list(dict.fromkeys(rates))
    assert distinct == pytest.approx([100.0 * 1.6 ** k for k in range(len(distinct))])
    assert distinct[-2] <= 1000.0


def test_a_first_step_that_fails_is_halved_then_bisected(monkeypatch: pytest.MonkeyPatch) -> None:
    result, rates = _ramp(monkeypatch, 30.0, refine=3)
    assert rates[:5] == [100.0, 100.0, 50.0, 50.0, 25.0]  # each failure tried twice
    assert 30.0 / 1.6 ** (1 / 8) <= result["best"]["rate"] <= 30.0


def test_nothing_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    result, rates = _ramp(monkeypatch, 1.0, refine=3)
    assert result["best"] is None and len(rates) == 8  # 100, 50, 25, 12.5, each twice


def test_a_step_whose_publisher_was_held_back_has_not_sustained_its_rate(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # latency is fine at every rate, but the server kept the publisher under 500 msg/s
    result, _ = _ramp(monkeypatch, 1e9, refine=3, publisher_limit=500.0)
    assert 500.0 / 1.6 ** (1 / 8) <= result["best"]["rate"] <= 500.0 / run.RATE_KEPT


def test_ramps_run_in_lockstep_and_each_finds_its_own_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    limits = {"a": 1000.0, "b": 300.0}
    calls: list[str] = []

    def step(target: str, subs: object, rate: float, seconds: float, **kw: Any) -> run.Step:
        calls.append(target)
        p99 = 10.0 if rate <= limits[target] else 100.0
        return run.Step(rate=rate, subscribers=1, published=1, received=1, lost=0, seconds=1.0,
                        delivered_per_second=round(rate), latency={"p99_ms": p99},
                        server_cpu_percent=0.0, server_rss_mb=0.0, publish_rate=rate)

    monkeypatch.setattr(run, "step", step)
    monkeypatch.setattr(run, "log", lambda message: None)
    results = run.ramps([("a", "a", None), ("b", "b", None)],  # type: ignore[list-item]
                        mode="x", start_rate=100.0, seconds=1.0, factor=1.6, max_steps=16,
                        refine=3)
    for label, limit in limits.items():
        assert limit / 1.6 ** (1 / 8) <= results[label]["best"]["rate"] <= limit
    # alternating while both go on: a's tries at a rate (one, or two when it fails), then b's
    last_b = len(calls) - 1 - calls[::-1].index("b")
    runs = "".join(calls[: last_b + 1]).replace("aa", "a").replace("bb", "b")
    assert runs == "ab" * (len(runs) // 2)
    assert set(calls[last_b + 1 :]) == {"a"}


@pytest.mark.parametrize(
    ("tries", "held"),
    [("P", True), ("FPP", True), ("FPF", False), ("FF", False)],
)
def test_a_failed_step_is_tried_again_and_holds_if_the_next_two_pass(
        monkeypatch: pytest.MonkeyPatch, tries: str, held: bool) -> None:
    """At 200 msg/s the step goes as ``tries`` says; below it every step passes, above it
    every step fails."""
    script = list(tries)
    rates: list[float] = []

    def step(target: object, subs: object, rate: float, seconds: float, **kw: Any) -> run.Step:
        rates.append(rate)
        passed = script.pop(0) == "P" if rate == 200.0 else rate < 200.0
        return run.Step(rate=rate, subscribers=1, published=1, received=1, lost=0, seconds=1.0,
                        delivered_per_second=round(rate),
                        latency={"p99_ms": 10.0 if passed else 100.0},
                        server_cpu_percent=0.0, server_rss_mb=0.0, publish_rate=rate)

    monkeypatch.setattr(run, "step", step)
    monkeypatch.setattr(run, "log", lambda message: None)
    result = run.ramp(None, None, mode="x", start_rate=100.0, seconds=1.0,  # type: ignore[arg-type]
                      factor=2.0, max_steps=16, label="t", refine=0)
    assert rates.count(200.0) == len(tries) and not script
    assert result["best"]["rate"] == (200.0 if held else 100.0)  # a try that passed at a
    # rate that did not hold is not the result
    assert rates[-1] == (400.0 if held else 200.0)


@pytest.mark.parametrize(
    ("tries", "runs", "held"),
    [
        ("S P", 2, True),  # failed with steal: run again, and that one counts
        ("S S S S F", 5, False),  # run again three times at most, then the failure counts
        ("X F", 2, False),  # failed with little stolen: the usual retry rule
        ("Y", 1, True),  # passed with much stolen: it counts
    ],
)
def test_a_step_failed_while_the_host_stole_a_core_is_run_again(
        monkeypatch: pytest.MonkeyPatch, tries: str, runs: int, held: bool) -> None:
    """At 200 msg/s: S failed with 30 % of a core stolen, X failed with 2 %, Y passed with 30 %,
    P passed, F failed (no steal)."""
    script = tries.split()
    rates: list[float] = []
    waits: list[float] = []

    def step(target: object, subs: object, rate: float, seconds: float, **kw: Any) -> run.Step:
        rates.append(rate)
        kind = script.pop(0) if rate == 200.0 else ("P" if rate < 200.0 else "F")
        steal = {"S": 30.0, "X": 2.0, "Y": 30.0}.get(kind, 0.0)
        return run.Step(rate=rate, subscribers=1, published=1, received=1, lost=0, seconds=1.0,
                        delivered_per_second=round(rate),
                        latency={"p99_ms": 10.0 if kind in "PY" else 100.0},
                        server_cpu_percent=0.0, server_rss_mb=0.0, publish_rate=rate,
                        steal_percent={"cpu0": steal, "cpu1": 0.0})

    monkeypatch.setattr(run, "step", step)
    monkeypatch.setattr(run, "log", lambda message: None)
    monkeypatch.setattr(run, "wait_until_quiet", lambda: waits.append(1.0) or 1.0)
    result = run.ramp(None, None, mode="x", start_rate=100.0, seconds=1.0,  # type: ignore[arg-type]
                      factor=2.0, max_steps=16, label="t", refine=0)
    assert rates.count(200.0) == runs and not script
    at_200 = [s for s in result["steps"] if s["rate"] == 200.0]
    assert [s["stolen"] for s in at_200] == [k == "S" and i < 3 for i, k in
                                            enumerate(tries.split())]
    assert len(waits) == sum(s["stolen"] for s in at_200)
    assert result["best"]["rate"] == (200.0 if held else 100.0)
