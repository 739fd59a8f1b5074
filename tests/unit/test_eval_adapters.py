"""OVO-Bench and StreamingBench annotation files (small samples written in their published layouts)
read into Streaming-Eval episodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamharness.eval.adapters import (
    OVO_TASK_CELLS,
    STREAMINGBENCH_TASK_CELLS,
    AdapterError,
    parse_timestamp,
    read_benchmark,
    read_ovo_bench,
    read_streamingbench,
)
from streamharness.eval.episode import EpisodeFormatError, InstructionEvent, QuestionEvent

DATA = Path(__file__).resolve().parents[1] / "data"
OVO = DATA / "ovo_bench_sample.json"
SB = DATA / "streamingbench_sample.json"


def _by_id(episodes):
    return {e.event_id: e for ep in episodes for e in ep.events}


def test_ovo_sample_parses_into_one_episode_per_video(tmp_path):
    episodes = read_ovo_bench(OVO, tmp_path)
    assert [ep.episode_id for ep in episodes] == ["ovo-src_videos-kitchen_demo", "ovo-src_videos-gym_demo"]
    kitchen, gym = episodes
    assert kitchen.source == "ovo-bench"
    assert kitchen.video == str(tmp_path / "src_videos" / "kitchen_demo.mp4")
    # no video under video_root: duration = latest window end + 5 s tail, flagged
    assert kitchen.duration_s == 70.5 and kitchen.metadata["duration_estimated"] is True
    assert kitchen.metadata["benchmark_ids"] == [101, 102]

    ev = _by_id(episodes)
    epm = ev["EPM-101"]
    assert isinstance(epm, QuestionEvent)
    assert (epm.ask_at_s, epm.window) == (42.0, (42.0, 47.0))
    assert epm.choices[epm.answer_index] == "On the table"
    assert (epm.mode, epm.position) == ("punctual", "backward")
    assert (ev["OCR-102"].mode, ev["OCR-102"].position) == ("punctual", "present")
    assert ev["OCR-102"].choices[ev["OCR-102"].answer_index] == "SUGAR"


def test_ovo_forward_tasks_become_proactive_instructions():
    ev = _by_id(read_ovo_bench(OVO, probe_duration=False))
    rec = ev["REC-103"]
    assert isinstance(rec, InstructionEvent) and (rec.mode, rec.position) == ("proactive", "forward")
    assert rec.text == "Tell me each time they lift the dumbbell."
    # count 0->1 in (0,10]; unchanged in (10,20]; 1->3 in (20,30] and 3->4 in (30,40]: touching, merged
    assert rec.windows == [(0.0, 10.0), (20.0, 40.0)]
    assert ev["SSR-104-step1"].windows == [(12.0, 15.0)]
    assert ev["SSR-104-step2"].windows == [(25.0, 25.0)]
    crr = ev["CRR-105"]
    assert crr.windows == [(16.0, 29.0)] and crr.reference == "Blue"


def test_answer_window_is_configurable():
    ev = _by_id(read_ovo_bench(OVO, answer_window_s=2.0, probe_duration=False))
    assert ev["EPM-101"].window == (42.0, 44.0)


def test_streamingbench_sample_parses(tmp_path):
    episodes = read_streamingbench(SB, tmp_path)
    assert [ep.episode_id for ep in episodes] == ["streamingbench-videos-sample_cycling",
                                                  "streamingbench-videos-sample_crossing"]
    cycling, crossing = episodes
    assert cycling.video == str(tmp_path / "videos" / "sample_cycling.mp4")
    assert len(cycling.events) == 3  # two entries on the same video merge
    ev = _by_id(episodes)
    op = ev["object-perception-0-0"]
    assert op.ask_at_s == 35.0 and op.window == (35.0, 40.0)
    assert op.choices == ["A guitar", "A surfboard", "A backpack", "Nothing"] and op.answer_index == 2
    assert (op.mode, op.position) == ("punctual", "present")
    assert (ev["clips-summarization-0-1"].mode, ev["clips-summarization-0-1"].position) == ("punctual", "backward")
    sqa = ev["sequential-question-answering-1-0"]
    assert sqa.ask_at_s == 80.0 and (sqa.mode, sqa.position) == ("contextual", "backward")
    po = ev["proactive-output-2-0"]
    assert isinstance(po, InstructionEvent)
    assert po.given_at_s == 5.0 and po.windows == [(27.0, 31.0)] and po.reference == "GO"
    assert (po.mode, po.position) == ("proactive", "forward")


def test_real_video_gives_real_duration(tmp_path):
    from streamharness.media import sample_path

    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "sample_crossing.mp4").symlink_to(sample_path("vtest.avi"))
    crossing = read_streamingbench(SB, tmp_path)[1]
    assert 79.0 <= crossing.duration_s <= 81.0 and "duration_estimated" not in crossing.metadata


def test_task_tables_cover_the_published_task_sets():
    assert set(OVO_TASK_CELLS) == {"EPM", "ASI", "HLD", "STU", "OJR", "ATR", "ACR", "OCR", "FPD", "REC", "SSR", "CRR"}
    assert {OVO_TASK_CELLS[t][1] for t in ("EPM", "ASI", "HLD")} == {"backward"}
    assert {OVO_TASK_CELLS[t] for t in ("REC", "SSR", "CRR")} == {("proactive", "forward")}
    assert len(STREAMINGBENCH_TASK_CELLS) == 18


def test_timestamps():
    assert parse_timestamp("00:01:20") == 80.0
    assert parse_timestamp("1:02") == 62.0
    assert parse_timestamp(12.5) == 12.5
    with pytest.raises(ValueError):
        parse_timestamp("soon")


def _write(tmp_path, data) -> Path:
    p = tmp_path / "anno.json"
    p.write_text(json.dumps(data))
    return p


@pytest.mark.parametrize("item, needle", [
    ({"id": 7, "task": "EPM", "video": "a.mp4", "realtime": 3, "options": ["x", "y"], "gt": 0}, "id 7): missing field 'question'"),
    ({"id": 8, "task": "EPM", "video": "a.mp4", "realtime": 3, "question": "q", "options": ["x", "y"], "gt": 5}, "id 8): field 'gt' = 5"),
    ({"id": 9, "task": "XYZ", "video": "a.mp4"}, "id 9): unknown task 'XYZ'"),
    ({"id": 10, "task": "OCR", "video": "a.mp4", "realtime": "later", "question": "q", "options": ["x", "y"], "gt": 0}, "id 10): field 'realtime'"),
    ({"id": 11, "task": "CRR", "video": "a.mp4", "question": "q", "test_info": [{"realtime": 4, "type": 0}]}, "id 11): test_info has no probe with type 1"),
])
def test_bad_ovo_items_name_the_item(tmp_path, item, needle):
    good = {"id": 1, "task": "OCR", "video": "a.mp4", "realtime": 1, "question": "q", "options": ["x", "y"], "gt": 0}
    with pytest.raises(AdapterError) as err:
        read_ovo_bench(_write(tmp_path, [good, item]), probe_duration=False)
    assert "item 1 (" in str(err.value) and needle in str(err.value), str(err.value)
    assert isinstance(err.value, EpisodeFormatError)


def test_bad_streamingbench_items_name_the_item(tmp_path):
    entry = {"video_path": "./videos/v.mp4", "questions": [
        {"task_type": "Counting", "question": "how many?", "time_stamp": "00:00:10", "answer": "E",
         "options": ["A. 1", "B. 2", "C. 3", "D. 4"]}]}
    with pytest.raises(AdapterError, match=r"entry 0 \(\./videos/v\.mp4\): questions\[0\]: answer 'E' is not one"):
        read_streamingbench(_write(tmp_path, [entry]), probe_duration=False)
    entry["questions"][0] = {"task_type": "Counting", "question": "q", "answer": "A", "options": ["A. 1", "B. 2"]}
    with pytest.raises(AdapterError, match=r"questions\[0\]: missing field 'time_stamp'"):
        read_streamingbench(_write(tmp_path, [entry]), probe_duration=False)


def test_not_json_and_wrong_shape(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{nope")
    with pytest.raises(AdapterError, match="not JSON"):
        read_ovo_bench(p)
    with pytest.raises(AdapterError, match="expected a JSON list"):
        read_ovo_bench(_write(tmp_path, {"a": 1}))
    with pytest.raises(AdapterError, match="no such annotation file"):
        read_streamingbench(tmp_path / "missing.json")
    with pytest.raises(AdapterError, match="unknown benchmark"):
        read_benchmark("mvbench", OVO)


def test_read_benchmark_dispatches():
    assert len(read_benchmark("ovo-bench", OVO, probe_duration=False)) == 2
    assert len(read_benchmark("streamingbench", SB, probe_duration=False)) == 2
