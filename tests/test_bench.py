"""The bench's own code keeps working (its figures are `make bench`'s, never asserted here)."""

from __future__ import annotations

import json

import pytest

from bench.core import decide_cost_us, detectors_cost_us, main


def test_the_core_bench_measures_decide_and_the_detectors() -> None:
    assert decide_cost_us(calls=5) > 0
    assert detectors_cost_us(calls=60) > 0


def test_the_core_bench_prints_its_figures_as_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bench.core.ROUNDS", 1)
    assert main(["--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert set(figures) == {"decide_us_ten_grants", "detectors_us_per_call", "json_yardstick_us"}
    assert all(isinstance(v, float) and v > 0 for v in figures.values())
