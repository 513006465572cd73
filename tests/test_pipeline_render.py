"""Schedule pictures: planned schedules and measured timelines to SVG and PNG."""

import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tandem.pipeline import (CustomSchedule, Interleaved1F1B, OneFOneB,
                             TimelineRecord, ZeroBubbleH1, render, simulate)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 300 and height > 100
    return width, height


def _svg_texts(path):
    root = ET.parse(path).getroot()  # well-formed XML
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return [el.text for el in root.iter() if el.tag.endswith("text") and el.text]


def test_plan_to_svg_and_png(tmp_path):
    sched = ZeroBubbleH1(4, 8)
    svg = render(sched, tmp_path / "zb.svg")
    texts = _svg_texts(svg)
    assert "ZeroBubbleH1: p=4 m=8, bubble 11.1%" in texts
    assert {"rank 0", "rank 3", "W (weight grad)"} <= set(texts)
    assert texts.count("7") >= 12  # microbatch 7 labels its F, B and W on every rank
    _check_png(render(sched, tmp_path / "zb.png"))


def test_interleaved_plan_by_rank_and_by_stage(tmp_path):
    sched = Interleaved1F1B(4, 8, virtual_stages=2)
    texts = _svg_texts(render(sched, tmp_path / "rank.svg"))
    assert "rank 1 (stages 1, 5)" in texts and "B (full backward)" in texts
    texts = _svg_texts(render(sched, tmp_path / "stage.svg", rows="stage",
                              title="by stage"))
    assert "stage 5 (rank 1)" in texts and "by stage" in texts
    w_rank, h_rank = _check_png(render(sched, tmp_path / "rank.png"))
    w_stage, h_stage = _check_png(render(sched, tmp_path / "stage.png", rows="stage"))
    assert h_stage > h_rank  # twice the rows


def test_simulation_result_and_hand_written_schedule(tmp_path):
    result = simulate(OneFOneB(2, 4))
    assert "bubble 20.0%" in _svg_texts(render(result, tmp_path / "result.svg"))
    custom = CustomSchedule.from_text("rank 0: 0F0 0F1 0B0 0B1\nrank 1: 1F0 1B0 1F1 1B1",
                                      name="hand")
    assert "hand: p=2 m=2, bubble 33.3%" in _svg_texts(render(custom, tmp_path / "c.svg"))


def test_measured_timeline(tmp_path):
    # what the runtime records: seconds on a wall clock, sends and receives included
    result = simulate(OneFOneB(2, 4))
    measured = [TimelineRecord(r.rank, r.stage, r.kind, r.microbatch,
                               1e4 + r.start_s * 1e-3, 1e4 + r.end_s * 1e-3)
                for r in result.timeline]
    texts = _svg_texts(render(measured, tmp_path / "measured.svg"))
    assert "measured, bubble 20.0%" in texts and "time (s)" in texts
    _check_png(render(measured, tmp_path / "measured.png"))
    as_tuples = [(r.rank, r.stage, r.kind.value, r.microbatch, r.start_s, r.end_s)
                 for r in measured]
    _check_png(render(as_tuples, tmp_path / "tuples.png"))


@pytest.mark.parametrize("source, path, message", [
    (OneFOneB(2, 2), "plan.pdf", r"render writes .svg or .png files"),
    ([(0, 0, "F", 0, 1.0)], "t.png", r"timeline record 0 .* is not \(rank, stage, kind"),
    ([(0, 0, "X", 0, 0.0, 1.0)], "t.png", r"timeline record 0"),
    ([(0, 0, "F", 0, 2.0, 1.0)], "t.png", r"ends before it starts"),
    ([(0, 0, "SEND_F", 0, 0.0, 1.0)], "t.png", r"no F, B or W record"),
    ([], "t.png", r"no F, B or W record"),
])
def test_bad_input_is_refused(tmp_path, source, path, message):
    with pytest.raises(ValueError, match=message):
        render(source, tmp_path / path)


def test_bad_rows_and_sources_are_refused(tmp_path):
    with pytest.raises(ValueError, match="rows must be 'rank' or 'stage'"):
        render(OneFOneB(2, 2), tmp_path / "x.svg", rows="device")
    with pytest.raises(TypeError, match="render draws a Schedule"):
        render(42, tmp_path / "x.svg")


def test_import_stays_light():
    code = "import sys, tandem.pipeline; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

