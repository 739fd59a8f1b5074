"""Annotation readers: each format's sample file (tests/data/train/) read into StreamSamples, every
malformed input an AnnotationFormatError naming file, line and field, and format detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamharness.media import OPENCV_DOC
from streamharness.train.convert import to_messages, to_steps
from streamharness.train.readers import (
    FORMATS,
    NARRATION_INSTRUCTION,
    charades_query,
    detect_format,
    read_activitynet,
    read_annotations,
    read_charades_sta,
    read_episodes,
    read_jsonl,
    read_streaming_converted,
    read_streaming_raw,
    read_youcook2,
)
from streamharness.train.samples import AnnotationFormatError, StreamSample

DATA = (Path(__file__).resolve().parents[1] / "data" / "train").resolve()
RAW = DATA / "streaming_raw.json"
CONVERTED = DATA / "streaming_converted.json"
ACTIVITYNET = DATA / "activitynet_captions_val_1.json"
YOUCOOK = DATA / "youcookii_annotations_trainval.json"
CHARADES = DATA / "charades_sta_test.txt"
EPISODES = DATA / "episodes.jsonl"
SAMPLES = DATA / "samples.jsonl"


def by_id(samples) -> dict[str, StreamSample]:
    return {s.sample_id: s for s in samples}


def responses(trigger) -> list[tuple[float, str]]:
    return [(r.time, r.content) for r in trigger.responses]


def expect_error(reader, path: Path, line: int | None, field: str | None, *words: str, file: Path | None = None,
                 **kwargs) -> AnnotationFormatError:
    """Reading ``path`` fails with an error naming exactly this file (``file``: the one inside a
    folder), line and field."""
    with pytest.raises(AnnotationFormatError) as info:
        list(reader(path, **kwargs))
    err = info.value
    path = file or path
    assert (err.path, err.line, err.field) == (str(path), line, field), str(err)
    message = str(err)
    assert message.startswith(f"{path}:{line}: " if line is not None else f"{path}: "), message
    if field is not None:
        assert repr(field) in message, message
    for word in words:
        assert word in message, message
    return err


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, *records) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


# -- streaming-raw ------------------------------------------------------------------------------------
def test_streaming_raw_links_responses_to_the_latest_question():
    samples = by_id(read_streaming_raw(RAW))
    assert list(samples) == ["kitchen_0412.mp4#0", "bike_repair_07.mp4#1", "street_cam_113.mp4#2"]

    qa = samples["kitchen_0412.mp4#0"]
    assert (qa.video_name, qa.task_type, qa.source, qa.duration_s) == ("kitchen_0412.mp4", "QA", "ego4d", None)
    assert qa.video_path == str(DATA / "videos" / "kitchen_0412.mp4")  # relative: next to the annotation file
    q0, q1 = qa.triggers
    assert (q0.kind, q0.time, q0.content) == ("question", 6.0, "What is the person cutting on the board?")
    assert responses(q0) == [(7.0, "They are slicing a red bell pepper into thin strips.")]
    assert q0.windows == [(7.0, 10.0)]  # none in the layout: [t, t + 3 s]
    assert (q1.kind, q1.time) == ("question", 14.5)
    assert responses(q1) == [(17.0, "A wooden spatula from the drawer by the hob.")]

    narration = samples["bike_repair_07.mp4#1"]
    assert narration.video_path == "/data/streaming/videos/bike_repair_07.mp4"  # absolute: kept
    (n,) = narration.triggers
    assert (n.kind, n.time) == ("instruction", 0.0)  # task_type "Narration"
    assert [r.time for r in n.responses] == [2.0, 9.0, 21.0]
    assert n.windows == [(2.0, 5.0), (9.0, 12.0), (21.0, 24.0)]

    grounding = samples["street_cam_113.mp4#2"]
    (g,) = grounding.triggers
    assert g.kind == "instruction"  # asked at 0 s and answered twice
    assert [r.time for r in g.responses] == [16.0, 44.5]  # no instant time: the event's end
    assert g.windows == [(12.0, 16.0), (41.0, 44.5)]  # st_time / end_time


def test_streaming_raw_kind_rule_window_keyword_jsonl_and_video_root(tmp_path):
    path = jsonl(tmp_path / "raw.jsonl",
                 {"video_name": "a.mp4", "video_path": "clips/a.mp4", "task_type": "QA", "source": "custom",
                  "question": [{"content": "What is on the table?", "time": 0}],
                  "response": [{"content": "A vase of tulips.", "time": "1.5"}]},
                 {"video_name": "b.mp4", "video_path": "clips/b.mp4", "task_type": "Proactive Alert", "source": "custom",
                  "question": [{"content": "Warn me if the pot boils over.", "time": 3}],
                  "response": [{"content": "It is boiling over!", "time": 30}]},
                 {"video_name": "c.mp4", "video_path": "clips/c.mp4", "task_type": "QA", "source": "custom",
                  "question": [{"content": "Describe the room.", "time": 0}, {"content": "And now?", "time": 10}],
                  "response": [{"content": "A small kitchen.", "time": 1}, {"content": "Still a kitchen.", "time": 12}]})
    a, b, c = read_streaming_raw(path, video_root=tmp_path / "videos", window_s=5.0)
    assert a.video_path == str(tmp_path / "videos" / "clips" / "a.mp4")
    assert a.triggers[0].kind == "question"  # at 0 s but answered once
    assert a.triggers[0].windows == [(1.5, 6.5)]
    assert b.triggers[0].kind == "instruction"  # "alert" in the task type, though asked at 3 s
    assert [t.kind for t in c.triggers] == ["question", "question"]
    assert [responses(t) for t in c.triggers] == [[(1.0, "A small kitchen.")], [(12.0, "Still a kitchen.")]]


def test_streaming_raw_errors_name_file_line_and_field(tmp_path):
    text = RAW.read_text()
    bad_time = write(tmp_path / "bad_time.json", text.replace('"time": "21"', '"time": "soon"'))
    expect_error(read_streaming_raw, bad_time, 16, "response[2].time", "record 1", "bike_repair_07.mp4", "'soon'")

    negative = write(tmp_path / "negative.json", text.replace('"time": 14.5', '"time": -2'))
    expect_error(read_streaming_raw, negative, 2, "question[1].time", ">= 0")

    no_comma = write(tmp_path / "no_comma.json", text.replace('"source": "custom",', '"source": "custom"'))
    expect_error(read_streaming_raw, no_comma, 35, None, "not JSON")  # where the parser stops

    event = write(tmp_path / "event.json", text.replace('"st_time": 41.0, "end_time": 44.5', '"st_time": 44.5, "end_time": 41.0'))
    expect_error(read_streaming_raw, event, 30, "response[1].end_time", "before it starts")

    record = {"video_name": "d.mp4", "video_path": "d.mp4", "task_type": "QA", "source": "custom",
              "question": [{"content": "Who is at the door?", "time": 10}], "response": [{"content": "The postman.", "time": 12}]}
    lines = tmp_path / "raw.jsonl"
    jsonl(lines, record, {k: v for k, v in record.items() if k != "question"})
    expect_error(read_streaming_raw, lines, 2, "question", "record 1", "expected a list")

    early = dict(record, response=[{"content": "The postman.", "time": 4}])
    jsonl(lines, record, record, early)
    expect_error(read_streaming_raw, lines, 3, "response[0].time", "record 2 (video_name 'd.mp4')", "before any question")

    jsonl(lines, dict(record, question=[{"content": "Who?", "timestamp": 3}]))
    expect_error(read_streaming_raw, lines, 1, "question[0].timestamp", "unknown field")

    jsonl(lines, dict(record, response=[{"content": "The postman."}]))
    expect_error(read_streaming_raw, lines, 1, "response[0].time", "needs a time")

    jsonl(lines, dict(record, response=[{"content": "", "time": 12}]))
    expect_error(read_streaming_raw, lines, 1, "response[0].content", "non-empty")

    write(lines, json.dumps(record) + "\n" + json.dumps(record)[:-3] + "\n")
    expect_error(read_streaming_raw, lines, 2, None, "not JSON")


# -- streaming-converted ------------------------------------------------------------------------------
def test_streaming_converted_parses_turns_back():
    qa, alert = read_streaming_converted(CONVERTED)
    assert (qa.sample_id, qa.video_name, qa.task_type, qa.source) == ("coin_12087_qa", "coin_12087.mp4", "QA", "coin")
    assert qa.video_path == str(DATA / "videos" / "coin_12087.mp4")
    assert qa.duration_s == 10.0 and qa.metadata["steps"] == 10
    assert [(t.kind, t.time, t.content) for t in qa.triggers] == [
        ("question", 3.0, "What tool is being used to loosen the bolt?"), ("question", 7.0, "Is the wheel off yet?")]
    assert [responses(t) for t in qa.triggers] == [[(4.0, "An adjustable wrench.")], [(8.0, "Not yet, the last bolt is still on.")]]
    assert qa.triggers[0].windows == [(4.0, 7.0)]

    # "messages" with role/content, a system turn, and a "Stop: ..." line withdrawing the instruction
    (kettle,) = alert.triggers
    assert (kettle.kind, kettle.time, kettle.withdrawn) == ("instruction", 0.0, 6.0)
    assert responses(kettle) == [(5.0, "The kettle is boiling now, steam is pouring out.")]
    assert alert.metadata["system"] == ["You are watching a live kitchen camera. Stay silent unless there is something to say."]


def test_streaming_converted_round_trips_to_messages_of_raw_samples(tmp_path):
    raw = list(read_streaming_raw(RAW))
    records = [{"id": s.sample_id, "video_name": s.video_name, "video_path": s.video_path, "task_type": s.task_type,
                "source": s.source, "conversations": to_messages(to_steps(s))} for s in raw]
    path = write(tmp_path / "converted.json", json.dumps(records, indent=2))
    back = list(read_streaming_converted(path))
    assert [s.sample_id for s in back] == [s.sample_id for s in raw]
    for original, parsed in zip(raw, back, strict=True):
        assert parsed.video_path == original.video_path
        assert [(int(t.time), t.kind, t.content) for t in original.triggers] == [(t.time, t.kind, t.content) for t in parsed.triggers]
        assert [[(int(r.time), r.content) for r in t.responses] for t in original.triggers] == \
            [[(r.time, r.content) for r in t.responses] for t in parsed.triggers]


def test_streaming_converted_errors_name_the_turn(tmp_path):
    text = CONVERTED.read_text()
    no_tag = write(tmp_path / "no_tag.json", text.replace("<3.0 seconds>", "<3.0 secs>"))
    expect_error(read_streaming_converted, no_tag, 2, "conversations[6].value", "record 0", "<T seconds>")

    neither = write(tmp_path / "neither.json", text.replace('"</response> An adjustable wrench."', '"An adjustable wrench."'))
    expect_error(read_streaming_converted, neither, 2, "conversations[9].value", "</silence>")

    empty = write(tmp_path / "empty.json", text.replace("</response> The kettle is boiling now, steam is pouring out.", "</response>  "))
    expect_error(read_streaming_converted, empty, 3, "messages[12].content", "no text")

    turn = {"role": "user", "content": "<0.0 seconds>\n<image>"}
    lines = tmp_path / "converted.jsonl"
    jsonl(lines, {"video_name": "x.mp4", "messages": [{"role": "assistant", "content": "</silence>"}, turn]})
    expect_error(read_streaming_converted, lines, 1, "messages[0].role", "no user turn before it")

    jsonl(lines, {"video_name": "x.mp4", "messages": [turn, {"role": "assistant", "content": "</response> Hello."}]})
    expect_error(read_streaming_converted, lines, 1, "messages[1].content", "before any question")

    back = {"role": "user", "content": "Where is it?\n<0.0 seconds>\n<image>"}
    jsonl(lines, {"video_name": "x.mp4", "messages": [turn, {"role": "assistant", "content": "</silence>"}, back,
                                                     {"role": "assistant", "content": "</silence>"}]})
    expect_error(read_streaming_converted, lines, 1, "messages[2].content", "does not come after")

    jsonl(lines, {"video_name": "x.mp4", "messages": [turn, {"role": "bot", "content": "</silence>"}]})
    expect_error(read_streaming_converted, lines, 1, "messages[1].role", "'bot'")

    jsonl(lines, {"video_name": "x.mp4", "messages": [turn]})
    expect_error(read_streaming_converted, lines, 1, "messages[0]", "no assistant turn")

    jsonl(lines, {"task_type": "QA", "messages": [turn, {"role": "assistant", "content": "</silence>"}]})
    expect_error(read_streaming_converted, lines, 1, "video_path", "video_path or video_name")

    step = [turn, {"role": "assistant", "content": "</silence>"}]
    jsonl(lines, {"id": "a", "video_name": "x.mp4", "messages": step}, {"id": 7, "video_name": "x.mp4", "messages": step},
          {"id": "a", "video_name": "y.mp4", "messages": step})
    expect_error(read_streaming_converted, lines, 3, "id", "'a' repeats (first on line 1)")
    jsonl(lines, {"id": "a", "video_name": "x.mp4", "messages": step}, {"id": 7, "video_name": "x.mp4", "messages": step})
    assert [s.sample_id for s in read_streaming_converted(lines)] == ["a", "7"]


# -- dense timed captions -----------------------------------------------------------------------------
def test_activitynet_videos_are_narration_samples(tmp_path):
    samples = by_id(read_activitynet(ACTIVITYNET))
    assert list(samples) == ["v_QOlSCBRmfWY", "v_ehGHCYKzyZ8", "v_nwznKOuZM7w"]
    gym = samples["v_QOlSCBRmfWY"]
    assert (gym.duration_s, gym.split, gym.source, gym.task_type) == (82.73, "val", "activitynet", "narration")
    assert gym.video_path == str(DATA / "v_QOlSCBRmfWY.mp4")
    (t,) = gym.triggers
    assert (t.kind, t.time, t.content) == ("instruction", 0.0, NARRATION_INSTRUCTION)
    assert responses(t)[1] == (17.37, "She raises the weights over her head and lowers them slowly, again and again.")  # stripped
    assert t.windows == [(0.83, 3.83), (17.37, 20.37), (56.26, 59.26)]
    # segments out of order are sorted; a window never runs past its segment's end
    (frisbee,) = samples["v_nwznKOuZM7w"].triggers
    assert [r.time for r in frisbee.responses] == [2.0, 4.1]
    # the video: <video_root>/<id> + the first extension that exists
    (tmp_path / "v_ehGHCYKzyZ8.webm").write_bytes(b"")
    (tmp_path / "v_ehGHCYKzyZ8.mkv").write_bytes(b"")
    rooted = by_id(read_activitynet(ACTIVITYNET, video_root=tmp_path, instruction="Narrate.", window_s=1.0))
    assert rooted["v_ehGHCYKzyZ8"].video_path == str(tmp_path / "v_ehGHCYKzyZ8.mkv")
    assert rooted["v_QOlSCBRmfWY"].video_path == str(tmp_path / "v_QOlSCBRmfWY.mp4")
    assert rooted["v_QOlSCBRmfWY"].triggers[0].content == "Narrate."
    assert rooted["v_QOlSCBRmfWY"].triggers[0].windows[0] == (0.83, 1.83)
    short = write(tmp_path / "x.json", json.dumps({"v_x": {"duration": 10, "timestamps": [[2, 3.5]], "sentences": ["A cat jumps."]}}))
    assert next(read_activitynet(short)).triggers[0].windows == [(2.0, 3.5)]


def test_activitynet_errors_name_the_line_of_the_video_key(tmp_path):
    text = ACTIVITYNET.read_text()
    backwards = write(tmp_path / "val_1.json", text.replace("[18.2, 47.5]", "[48.5, 47.5]"))
    expect_error(read_activitynet, backwards, 2, "v_ehGHCYKzyZ8.timestamps[1]", "0 <= start <= end")

    late = write(tmp_path / "late.json", text.replace("[4.1, 12.0]", "[4.1, 32.0]"))
    expect_error(read_activitynet, late, 3, "v_nwznKOuZM7w.timestamps[0]", "after the video")
    slack = write(tmp_path / "slack.json", text.replace("[4.1, 12.0]", "[4.1, 31.2]"))
    assert len(list(read_activitynet(slack))) == 3  # within 1 s of the duration

    no_duration = write(tmp_path / "no_duration.json", text.replace('"duration": 82.73, ', ""))
    expect_error(read_activitynet, no_duration, 1, "v_QOlSCBRmfWY.duration")

    word = write(tmp_path / "word.json", text.replace("[0, 18.2]", '["start", 18.2]'))
    expect_error(read_activitynet, word, 2, "v_ehGHCYKzyZ8.timestamps[0]", "'start'")

    fewer = write(tmp_path / "fewer.json", text.replace('"The dog leaps and catches the frisbee in mid air.", ', ""))
    expect_error(read_activitynet, fewer, 3, "v_nwznKOuZM7w.sentences", "1 sentences for 2 timestamps")

    # pretty-printed: still the line the video's key is on
    data = json.loads(text)
    data["v_nwznKOuZM7w"]["timestamps"][1] = [9.5, 2.0]
    pretty = write(tmp_path / "pretty.json", json.dumps(data, indent=2))
    key_line = pretty.read_text().splitlines().index('  "v_nwznKOuZM7w": {') + 1
    expect_error(read_activitynet, pretty, key_line, "v_nwznKOuZM7w.timestamps[1]")

    twice = write(tmp_path / "twice.json", text.replace('"v_nwznKOuZM7w"', '"v_QOlSCBRmfWY"'))
    expect_error(read_activitynet, twice, 3, "v_QOlSCBRmfWY", "repeats (first on line 1)")

    broken = write(tmp_path / "broken.json", text.replace('"v_ehGHCYKzyZ8": {', '"v_ehGHCYKzyZ8" {'))
    expect_error(read_activitynet, broken, 2, None, "not JSON")


def test_youcook2_videos_are_narration_samples():
    omelette, sandwich = read_youcook2(YOUCOOK)
    assert (omelette.sample_id, omelette.duration_s, omelette.split, omelette.source) == ("Kq7ZtY2bN4c", 186.4, "train", "youcook2")
    assert omelette.metadata == {"format": "youcook2", "recipe_type": "205", "subset": "training",
                                 "video_url": "https://www.youtube.com/watch?v=Kq7ZtY2bN4c"}
    (t,) = omelette.triggers
    assert (t.kind, t.time, t.content) == ("instruction", 0.0, NARRATION_INSTRUCTION)
    assert responses(t) == [(21.0, "crack three eggs into a bowl"), (35.0, "whisk the eggs with salt and pepper"),
                            (63.0, "pour the eggs into a hot buttered pan"), (118.0, "fold the omelette and slide it onto a plate")]
    assert t.windows == [(21.0, 24.0), (35.0, 38.0), (63.0, 66.0), (118.0, 121.0)]
    assert sandwich.split == "val" and sandwich.video_path == str(DATA / "pL0wF3mVx9s.mp4")


def test_youcook2_errors(tmp_path):
    text = YOUCOOK.read_text()
    backwards = write(tmp_path / "yc.json", text.replace('"segment": [60, 71]', '"segment": [75, 71]'))
    expect_error(read_youcook2, backwards, 15, "pL0wF3mVx9s.annotations[1].segment", "0 <= start <= end")

    no_sentence = write(tmp_path / "yc2.json", text.replace(', "sentence": "crack three eggs into a bowl"', ""))
    expect_error(read_youcook2, no_sentence, 3, "Kq7ZtY2bN4c.annotations[0].sentence", "missing")

    subset = write(tmp_path / "yc3.json", text.replace('"subset": "validation"', '"subset": "dev"'))
    expect_error(read_youcook2, subset, 15, "pL0wF3mVx9s.subset", "'dev'")

    flat = write(tmp_path / "yc4.json", json.dumps({"Kq7ZtY2bN4c": {}}))
    expect_error(read_youcook2, flat, 1, "database")


def test_charades_sta_groups_lines_by_video():
    samples = by_id(read_charades_sta(CHARADES))
    assert list(samples) == ["3MSZA", "AO8RW", "Y6R7T"]
    light = samples["3MSZA"]
    assert (light.duration_s, light.split, light.source, light.video_path) == (None, "test", "charades-sta", str(DATA / "3MSZA.mp4"))
    assert light.metadata["lines"] == [1, 2, 4]
    assert [(t.kind, t.time, t.content) for t in light.triggers] == [
        ("instruction", 0.0, "Tell me when someone turn a light on"),
        ("instruction", 0.0, "Tell me when someone flipped the light switch near the door"),
        ("instruction", 0.0, "Tell me when someone opening a closet door")]
    assert responses(light.triggers[0]) == [(24.3, "person turn a light on.")]
    assert [t.windows for t in light.triggers] == [[(24.3, 30.4)], [(24.3, 30.4)], [(0.0, 6.1)]]
    assert [t.content for t in samples["AO8RW"].triggers] == ["Tell me when someone is putting a book on a shelf",
                                                               "Tell me when someone sits down on the sofa"]
    assert charades_query("the person closes the laptop.") == "Tell me when someone closes the laptop"


def test_charades_sta_errors(tmp_path):
    text = CHARADES.read_text()
    bad_end = write(tmp_path / "c.txt", text.replace("AO8RW 8.2 15.6", "AO8RW 8.2 15,6"))
    expect_error(read_charades_sta, bad_end, 6, "AO8RW.end", "'15,6'")

    backwards = write(tmp_path / "c.txt", text.replace("Y6R7T 12.5 19.0", "Y6R7T 19.0 12.5"))
    expect_error(read_charades_sta, backwards, 5, "Y6R7T.end", "0 <= start <= end")

    negative = write(tmp_path / "c.txt", text.replace("3MSZA 0.0 6.1", "3MSZA -1.0 6.1"))
    expect_error(read_charades_sta, negative, 4, "3MSZA.start")

    no_sentence = write(tmp_path / "c.txt", text.replace("AO8RW 0.0 6.9##", "AO8RW 0.0 6.9 "))
    expect_error(read_charades_sta, no_sentence, 3, "line", "VIDEOID start end##sentence")

    empty = write(tmp_path / "c.txt", text.replace("##the person closes the laptop.", "##  "))
    expect_error(read_charades_sta, empty, 5, "Y6R7T.sentence")


# -- Streaming-Eval episodes --------------------------------------------------------------------------
def test_episodes_become_samples(tmp_path):
    street, timer = read_episodes(EPISODES)
    assert (street.sample_id, street.task_type, street.source, street.duration_s) == ("vtest-street", "streaming-eval", "opencv-doc", 79.5)
    assert street.video_name == "vtest.avi" and street.video_path.endswith("vtest.avi")
    assert Path(street.video_path).is_relative_to(OPENCV_DOC) or "samples" in Path(street.video_path).parts
    walks, count, seen = street.triggers
    assert (walks.kind, walks.time, walks.windows, responses(walks)) == ("instruction", 0.0, [(0.0, 5.0)], [(0.0, "Now.")])
    assert (walks.mode, walks.position) == ("proactive", "forward")
    assert count.kind == "question" and count.content.startswith("How many people are in view right now? Options: A. nobody;")
    assert responses(count) == [(20.0, "C. three to ten people")] and count.windows == [(20.0, 25.0)]
    assert (count.mode, count.position) == ("punctual", "present")
    assert responses(seen) == [(50.0, "People walking along the pavement past the shop fronts.")]
    assert (seen.mode, seen.position) == ("contextual", "backward")

    assert timer.video_path == str(DATA / "clips" / "kitchen_timer.mp4")
    ring, _ = timer.triggers
    assert (ring.kind, ring.time, ring.withdrawn) == ("instruction", 2.0, 35.0)
    assert responses(ring) == [(10.0, "The timer is ringing."), (30.0, "The timer is ringing.")]
    assert ring.windows == [(10.0, 13.0), (30.0, 33.0)]
    assert timer.metadata == {"format": "episodes", "episode": {"annotator": "synthetic-v1"}}
    assert [s.sample_id for s in read_episodes(EPISODES, video_root=tmp_path)] == ["vtest-street", "kitchen-timer"]
    assert list(read_episodes(EPISODES, video_root=tmp_path))[1].video_path == str(tmp_path / "clips" / "kitchen_timer.mp4")


def test_episodes_errors_name_file_line_and_field(tmp_path):
    first, second = EPISODES.read_text().splitlines()
    path = write(tmp_path / "set.jsonl", first + "\n" + second.replace('"window": [15.0, 18.0]', '"window": [18.0, 15.0]') + "\n")
    expect_error(read_episodes, path, 2, "events.1.question.window", "kitchen-timer")

    write(path, first.replace('"duration_s": 79.5, ', "") + "\n" + second + "\n")
    expect_error(read_episodes, path, 1, "duration_s", "vtest-street")

    write(path, first + "\n" + first + "\n")
    expect_error(read_episodes, path, 2, "episode_id", "repeats")

    folder = tmp_path / "episodes"
    (folder / "more").mkdir(parents=True)
    write(folder / "a.json", json.dumps(json.loads(first), indent=2))
    bad = json.loads(second)
    bad["events"][0]["mode"] = "reactive"
    array = json.dumps([json.loads(first) | {"episode_id": "other"}, bad], indent=2)
    write(folder / "more" / "b.json", array)
    line = array.splitlines().index("  {", 2) + 1  # where the second element starts
    expect_error(read_episodes, folder, line, "events.0.instruction.mode", "reactive", file=folder / "more" / "b.json")
    assert line > 2
    expect_error(read_episodes, folder / "more" / "b.json", line, "events.0.instruction.mode")


# -- generic JSONL ------------------------------------------------------------------------------------
def test_jsonl_reads_stream_samples(tmp_path):
    door, desk = read_jsonl(SAMPLES)
    assert door.video_path == str(DATA / "clips" / "lab_door.mp4")
    assert desk.video_path == "/data/clips/lab_desk.mp4"
    (t,) = door.triggers
    assert (t.kind, t.time, t.withdrawn, t.windows) == ("instruction", 0.0, 25.0, [(7.0, 10.0), (18.0, 21.0)])
    assert desk.split == "val" and door.metadata == {"annotator": "hand"}
    assert next(read_jsonl(SAMPLES, video_root="/videos")).video_path == "/videos/clips/lab_door.mp4"


def test_jsonl_errors_give_the_pydantic_field_path(tmp_path):
    first, second = SAMPLES.read_text().splitlines()
    path = tmp_path / "s.jsonl"
    write(path, first + "\n" + second.replace('"time": 5.0', '"time": -5.0') + "\n")
    expect_error(read_jsonl, path, 2, "triggers.0.time", "greater than or equal to 0")

    write(path, first.replace('"video_path": "clips/lab_door.mp4", ', "") + "\n")
    expect_error(read_jsonl, path, 1, "video_path", "Field required")

    write(path, "\n" + first.replace('"time": 8.0', '"time": "eight"') + "\n")
    expect_error(read_jsonl, path, 2, "triggers.0.responses.0.time")

    write(path, second.replace('"time": 6.0', '"time": 4.0') + "\n")
    expect_error(read_jsonl, path, 1, "triggers.0", "comes before the question")

    write(path, first.replace('"split": "train"', '"split": "train", "spilt": "val"') + "\n")
    expect_error(read_jsonl, path, 1, "spilt", "Extra inputs")

    write(path, first + "\n" + first[:-1] + "\n")
    expect_error(read_jsonl, path, 2, None, "not JSON")

    write(path, first + "\n" + first + "\n")
    expect_error(read_jsonl, path, 2, "sample_id", "repeats (first on line 1)")


# -- formats ------------------------------------------------------------------------------------------
def test_detect_format_of_each_sample_file(tmp_path):
    assert {p: detect_format(p) for p in (RAW, CONVERTED, ACTIVITYNET, YOUCOOK, CHARADES, EPISODES, SAMPLES)} == {
        RAW: "streaming-raw", CONVERTED: "streaming-converted", ACTIVITYNET: "activitynet", YOUCOOK: "youcook2",
        CHARADES: "charades-sta", EPISODES: "episodes", SAMPLES: "jsonl"}
    assert set(FORMATS) == {"streaming-raw", "streaming-converted", "activitynet", "youcook2", "charades-sta", "episodes", "jsonl"}
    assert detect_format(tmp_path) == "episodes"
    one = write(tmp_path / "episode.json", json.dumps(json.loads(EPISODES.read_text().splitlines()[0])))
    assert detect_format(one) == "episodes"
    raw_lines = jsonl(tmp_path / "raw.jsonl", *json.loads(RAW.read_text()))
    assert detect_format(raw_lines) == "streaming-raw"
    converted_lines = jsonl(tmp_path / "conv.jsonl", *json.loads(CONVERTED.read_text()))
    assert detect_format(converted_lines) == "streaming-converted"
    for name, text in (("notes.txt", "some notes\n"), ("x.json", '{"a": 1}'), ("e.jsonl", ""), ("l.json", "[1, 2]"),
                       ("samples.json", "[" + SAMPLES.read_text().splitlines()[0] + "]")):
        with pytest.raises(AnnotationFormatError) as info:
            detect_format(write(tmp_path / name, text))
        assert str(info.value).startswith(str(tmp_path / name))


def test_read_annotations_detects_or_takes_the_format(tmp_path):
    assert [s.sample_id for s in read_annotations(CHARADES)] == ["3MSZA", "AO8RW", "Y6R7T"]
    first = next(read_annotations(RAW, "streaming-raw", video_root=tmp_path, window_s=1.0))
    assert (first.sample_id, first.triggers[0].windows) == ("kitchen_0412.mp4#0", [(7.0, 8.0)])
    assert first.video_path == str(tmp_path / "videos" / "kitchen_0412.mp4")
    narrate = next(read_annotations(YOUCOOK, instruction="Say each step."))
    assert narrate.triggers[0].content == "Say each step."
    with pytest.raises(ValueError, match="unknown annotation format"):
        read_annotations(RAW, "csv")
