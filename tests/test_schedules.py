"""Layer-wise decay constants (GEONORM.md section 3)."""
import math

import pytest

import geonorm_fx as gf


def test_named_schedules():
    assert gf.decay_constants("harmonic", 4) == [1.0, 0.5, 1 / 3, 0.25]
    assert gf.decay_constants("sqrt", 3) == [1.0, 1 / math.sqrt(2), 1 / math.sqrt(3)]
    assert gf.decay_constants("linear", 4) == [1.0, 0.75, 0.5, 0.25]
    assert gf.decay_constants("none", 3) == [1.0, 1.0, 1.0]
    assert gf.decay_constants("harmonic", 0) == []


def test_sequence_and_callable():
    assert gf.decay_constants([0.9, 0.8], 2) == [0.9, 0.8]
    assert gf.decay_constants((1, 2, 3), 3) == [1.0, 2.0, 3.0]
    assert gf.decay_constants(lambda k, n: (k + 1) / n, 4) == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("schedule,n,match", [
    ("cosine", 3, "unknown schedule"),
    ([1.0, 2.0], 3, "2 values but the model has 3 blocks"),
    ([1.0, float("inf")], 2, "not finite"),
    (["a"], 1, "not a number"),
    (42, 2, "name, a sequence"),
])
def test_bad_schedules(schedule, n, match):
    with pytest.raises(gf.ScheduleError, match=match):
        gf.decay_constants(schedule, n)
