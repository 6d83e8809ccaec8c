"""benchmarks/time_to_quality.py reads its curves right: the time a curve reaches a FID and its FID at a time, both
linear between checkpoints, and `never` when the curve does not get there."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from time_to_quality import compare, fid_at, summarise, time_to  # noqa: E402

CURVE = [{"step": 250, "seconds": 30.0, "fid": 40.0}, {"step": 500, "seconds": 60.0, "fid": 20.0},
         {"step": 750, "seconds": 90.0, "fid": 25.0}, {"step": 1000, "seconds": 120.0, "fid": 10.0}]


def test_time_to_a_fid_is_the_first_crossing_interpolated():
    assert time_to(CURVE, 30.0) == 45.0  # halfway from 40 to 20
    assert time_to(CURVE, 20.0) == 60.0
    assert time_to(CURVE, 15.0) == 110.0  # after the rise at 750: the first time at or below 15
    assert time_to(CURVE, 50.0) == 30.0  # already there at the first checkpoint
    assert time_to(CURVE, 5.0) is None  # never


def test_fid_at_a_time_interpolates_and_stops_at_the_end():
    assert fid_at(CURVE, 45.0) == 30.0
    assert fid_at(CURVE, 105.0) == 17.5
    assert fid_at(CURVE, 130.0) is None


def test_a_method_is_compared_with_the_baseline_at_its_final_fid_and_time():
    base = [{"step": 250, "seconds": 40.0, "fid": 30.0, "prompt_accuracy": None},
            {"step": 500, "seconds": 80.0, "fid": 22.0, "prompt_accuracy": None}]
    row = compare(base, CURVE_ACC := [dict(p, prompt_accuracy=None) for p in CURVE])
    assert row["time_ratio"] == time_to(CURVE_ACC, 22.0) / 80.0 == 57.0 / 80.0  # 40 -> 20 over 30..60 s: 22 at 57 s
    assert row["fid_at_baseline_seconds"] == fid_at(CURVE_ACC, 80.0)
    s = summarise([{"seed": 0, **row}, {"seed": 1, **row}])
    assert s["reached"] == "2 of 2" and s["time_ratio"][0] == 57.0 / 80.0 and s["step_time_ratio"][0] == 1.5
