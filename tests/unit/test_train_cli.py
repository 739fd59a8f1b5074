"""`streamharness train …` refuses bad input before it costs anything, with a message that says
what was wrong and where."""

from typer.testing import CliRunner

from streamharness.train.cli import app


def test_a_malformed_annotation_names_the_file_the_line_and_the_field(tmp_path):
    ann = tmp_path / "samples.jsonl"
    good = '{"sample_id": "a", "video_name": "a", "video_path": "a.mp4", "triggers": []}'
    bad = '{"sample_id": "b", "video_name": "b", "video_path": "b.mp4", "triggers": [{"trigger_id": "q", "kind": "question", "content": "hi", "time": "soon"}]}'
    ann.write_text(good + "\n" + bad + "\n")
    result = CliRunner().invoke(app, ["build-dataset", "--input", str(ann), "--format", "jsonl", "--out", str(tmp_path / "ds")])
    assert result.exit_code == 2
    assert f"{ann}:2" in result.output and "time" in result.output
    assert not (tmp_path / "ds").exists()  # nothing built from a file that is wrong


def test_unknown_format_and_trainer_are_refused(tmp_path):
    ann = tmp_path / "a.jsonl"
    ann.write_text("")
    result = CliRunner().invoke(app, ["build-dataset", "--input", str(ann), "--format", "csv", "--out", str(tmp_path / "ds")])
    assert result.exit_code == 2 and "--format must be one of" in result.output
    (tmp_path / "ds").mkdir()
    result = CliRunner().invoke(app, ["train", "--dataset", str(tmp_path / "ds"), "--trainer", "gpt", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--trainer must be head or vlm" in result.output
    result = CliRunner().invoke(app, ["train", "--dataset", str(tmp_path / "ds"), "--trainer", "vlm", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--model PATH" in result.output
