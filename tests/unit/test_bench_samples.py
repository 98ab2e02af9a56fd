"""The Python load generators' latency samples (bench/loadgen.py `Samples`): past the limit,
the kept ones stand for the whole step, not its start (the C one is tested in
test_loadgen_c.py)."""

from __future__ import annotations

from bench.loadgen import Samples


def test_under_the_limit_every_sample_is_kept() -> None:
    samples = Samples(limit=10)
    for value in (0.003, 0.001, 0.002):
        samples.add(value)
    assert samples.summary() == {"count": 3, "seen": 3, "p50_ms": 2.0, "p99_ms": 3.0,
                                 "max_ms": 3.0}


def test_past_the_limit_the_kept_samples_cover_the_whole_step() -> None:
    samples = Samples(limit=1000)
    for i in range(4000):  # valued by arrival: the first quarter is the step's start
        samples.add(float(i))
    later = sum(1 for value in samples.kept if value >= 1000)
    assert len(samples.kept) == 1000 and samples.seen == 4000
    assert 700 <= later <= 800  # about 3/4; keeping the first 1,000 would give 0
    assert samples.summary()["max_ms"] == 3999 * 1000


def test_clear_starts_a_new_step() -> None:
    samples = Samples(limit=2)
    for value in (1.0, 2.0, 3.0):
        samples.add(value)
    samples.clear()
    assert samples.summary() == {"count": 0, "seen": 0}
