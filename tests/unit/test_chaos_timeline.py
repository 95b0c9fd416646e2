"""The chaos run's timeline picture, drawn from a small synthetic summary."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.chaos import timeline


def summary() -> dict[str, Any]:
    samples = []
    written = published = applied = 0
    for t in range(40):
        written += 50 if t < 30 else 0
        if not 10 <= t < 15:  # Kafka down: nothing leaves the outbox
            published = min(written, published + 120)
            applied = min(published, applied + 100)
        samples.append({"at": float(t), "written": written, "published": published,
                        "pending": written - published, "dead_letters": 0,
                        "applied": applied})
    return {
        "seed": 7, "duration": 30.0, "unsafe": None, "exactly_once": False,
        "faults": {"kafka_kill": 1, "relay_kill": 2, "window_ack_crash": 0},
        "events_committed": 1500, "violations": {},
        "timeline": [
            {"kind": "kafka_kill", "at": 10.0, "seconds": 5.0, "hit": True, "detail": ""},
            {"kind": "relay_kill", "at": 3.0, "seconds": 0.0, "hit": True, "detail": ""},
            {"kind": "relay_kill", "at": 20.0, "seconds": 0.1, "hit": True, "detail": ""},
            {"kind": "window_ack_crash", "at": 22.0, "seconds": 6.0, "hit": False,
             "detail": "window not reached"},
        ],
        "samples": samples,
    }


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (after checking the signature)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_rates_are_per_second_between_samples() -> None:
    samples = [{"at": 0.0, "n": 0}, {"at": 2.0, "n": 100}, {"at": 3.0, "n": 100},
               {"at": 3.0, "n": 120}]  # the same instant twice: no rate
    assert timeline.per_second(samples, "n") == ([2.0, 3.0], [50.0, 0.0])


def test_draws_a_png_of_the_run(tmp_path: Path) -> None:
    out = timeline.draw(summary(), tmp_path / "chaos-seed7-timeline.png")
    width, height = png_size(out)
    assert (width, height) == (1400, 950)
    assert out.stat().st_size > 20_000  # three panels with lines and bars, not a blank page


def test_a_summary_without_samples_still_draws_its_faults(tmp_path: Path) -> None:
    old = summary()
    del old["samples"]
    out = timeline.draw(old, tmp_path / "old.png")
    assert png_size(out) == (1400, 950)


def test_redraw_from_a_summary_file_lands_beside_it(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "chaos-seed7.json"
    path.write_text(json.dumps(summary()))
    assert timeline.main([str(path)]) == 0
    drawn = tmp_path / "chaos-seed7-timeline.png"
    assert png_size(drawn) == (1400, 950)
    assert capsys.readouterr().out == f"timeline: {drawn}\n"
    with pytest.raises(SystemExit) as exit_:
        timeline.main([str(tmp_path / "missing.json")])
    assert exit_.value.code == 2


def test_without_matplotlib_the_run_goes_on_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    said: list[str] = []
    assert timeline.draw_or_skip(summary(), tmp_path / "t.png", said.append) is None
    assert said == ["no timeline picture: matplotlib is missing "
                    "(pip install 'transactional-outbox[plots]')"]
    assert not (tmp_path / "t.png").exists()


def test_a_broken_summary_costs_the_picture_not_the_run(tmp_path: Path) -> None:
    said: list[str] = []
    bad = {**summary(), "timeline": [{"kind": "relay_kill"}]}  # no "at"
    assert timeline.draw_or_skip(bad, tmp_path / "t.png", said.append) is None
    assert said == ["no timeline picture: KeyError: 'at'"]
