"""Summariser backends: the digest, the prompts, a text generator, an OpenAI-compatible VLM behind a
real HTTP server on 127.0.0.1, and a tiny randomly initialised Qwen2-VL built in the test (no
download) through the Hugging Face backend. And ``Prompt(task=...)``, with the old prompt forms
rendering exactly as before."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from streamharness.errors import InvalidInput
from streamharness.generation import GenerationSettings, OpenAICompatibleGenerator
from streamharness.generation.base import (
    GenerationError,
    GenerationRejected,
    Prompt,
    ResponseGenerator,
)
from streamharness.generation.local_smollm2 import validate_messages
from streamharness.summariser import (
    BlockInput,
    ChunkFrame,
    ChunkInput,
    DigestSummariser,
    GeneratorSummariser,
    HFVisionSummariser,
    OpenAIVisionSummariser,
    SummariserSettings,
    SummaryPiece,
    make_backend,
    prompts,
)
from streamharness.summariser.backends import sample_frames, tidy
from streamharness.summariser.prompts import caption_lines, clock

KEY = "acme/cam-1"
START = 200_000  # chunk 1 of 200-s chunks: 0:03:20


def settings(**overrides: Any) -> SummariserSettings:
    values: dict[str, Any] = {"backend": "digest"}
    values.update(overrides)
    return SummariserSettings(**values)


def jpeg(width: int = 640, height: int = 360, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def scene_frames(*, images_every: int = 0) -> tuple[ChunkFrame, ...]:
    """60 frames, 3 s apart from 0:03:20: a car (with 2 people for a while, 3 once), a truck flickers
    in, the car leaves, the road is empty, a dog arrives and stays."""
    frames = []
    for i in range(60):
        ts = START + i * 3000
        if i < 20:
            caption, labels = "a car on a road", ["car"]
        elif i < 40:
            caption, labels = "an empty road", []
        else:
            caption, labels = "a dog on a road", ["dog"]
        if i in (10, 11):
            caption = "a truck on a road"
        if i == 30:
            labels = ["car"]  # one-frame detector flicker: not a change
        people = 0
        if 5 < i < 15:
            people, labels = (3 if i == 12 else 2), labels + ["person"]
        image = jpeg(color=(i * 4, 100, 100)) if images_every and i % images_every == 0 else None
        frames.append(ChunkFrame(ts, caption, tuple(labels), people, image))
    return tuple(frames)


def chunk(frames: tuple[ChunkFrame, ...] | None = None) -> ChunkInput:
    return ChunkInput(KEY, 1, START, START + 199_999, scene_frames() if frames is None else frames)


def block() -> BlockInput:
    pieces = tuple(
        SummaryPiece(i, i * 200_000, i * 200_000 + 199_999,
                     f"A car parks at [{clock(i * 200_000 + 5000)}]. Sign reads EXIT 4. At the end the lot holds {i} cars.",
                     fallback=i == 2)
        for i in range(5)
    )
    return BlockInput(KEY, 0, 0, 999_999, pieces)


# -- Prompt ----------------------------------------------------------------------------------------
def test_old_prompt_forms_render_exactly_as_before() -> None:
    # The strings the code produced before Prompt got its task field.
    assert Prompt(system="S", question="Q?").user_text() == "Question: Q?"
    p = Prompt(system="S", context="  mem line\nline2 ", recent_captions=("a", " ", "b "), question=" Q? ")
    assert p.user_text() == "Memory of the stream so far:\nmem line\nline2\n\nWhat the camera shows now (oldest first):\n- a\n- b\n\nQuestion: Q?"
    assert p.messages() == [{"role": "system", "content": "S"}, {"role": "user", "content": p.user_text()}]
    p = Prompt(system="S", context="mem", recent_captions=("cap",), instruction="tell me when a dog")
    assert p.user_text() == (
        "Memory of the stream so far:\nmem\n\nWhat the camera shows now (oldest first):\n- cap\n\n"
        "Standing instruction: tell me when a dog\nIt has just been triggered. Write one short sentence alerting the user."
    )
    p = Prompt(system="S", instruction="x", max_new_tokens=5)
    assert p.user_text() == "Standing instruction: x\nIt has just been triggered. Write one short sentence alerting the user."
    with pytest.raises(InvalidInput):
        Prompt(system="S")
    with pytest.raises(InvalidInput):
        Prompt(system="S", question="  ", instruction="")


def test_prompt_with_a_task() -> None:
    p = Prompt(system="S", context="  Captions:\n[0:00:01] a car  ", task=" Summarise. ", max_new_tokens=9)
    assert p.user_text() == "Captions:\n[0:00:01] a car\n\nSummarise."
    assert p.messages() == [{"role": "system", "content": "S"}, {"role": "user", "content": "Captions:\n[0:00:01] a car\n\nSummarise."}]
    assert Prompt(system="S", task="Do it.").user_text() == "Do it."
    assert validate_messages(p.messages()) == p.messages()  # what the local SmolLM2 backend renders
    with pytest.raises(InvalidInput):
        Prompt(system="S", task="Do it.", question="Why?")


def test_the_openai_client_sends_a_task_prompt() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        body = 'data: {"choices":[{"delta":{"content":"ok"}}]}\n\ndata: [DONE]\n\n'
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    generator = OpenAICompatibleGenerator(GenerationSettings(), transport=httpx.MockTransport(handler))
    try:
        assert "".join(generator.stream(Prompt(system="S", context="ctx", task="Write it.", max_new_tokens=7))) == "ok"
    finally:
        generator.close()
    assert seen[0]["messages"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "ctx\n\nWrite it."}]
    assert seen[0]["max_tokens"] == 7


# -- prompts ---------------------------------------------------------------------------------------
def test_caption_lines_are_runs_with_time_spans() -> None:
    lines = caption_lines(scene_frames(), 80)
    assert lines == [
        "[0:03:20–0:03:47] a car on a road (10 frames)",
        "[0:03:50–0:03:53] a truck on a road (2 frames)",
        "[0:03:56–0:04:17] a car on a road (8 frames)",
        "[0:04:20–0:05:17] an empty road (20 frames)",
        "[0:05:20–0:06:17] a dog on a road (20 frames)",
    ]
    one = ChunkFrame(START, "  a   cat ")
    assert caption_lines([one, ChunkFrame(START + 500, "")], 5) == ["[0:03:20] a cat (1 frame)"]
    assert caption_lines([], 5) == []


@pytest.mark.parametrize("max_lines", [1, 2, 3, 4, 7, 10, 25])
def test_caption_lines_merge_to_fit_exactly(max_lines: int) -> None:
    # 40 runs: steady runs of 10 frames between one-frame flickers.
    frames = []
    ts = START
    for r in range(40):
        caption, n = (f"steady scene {r}", 10) if r % 2 == 0 else (f"flicker {r}", 1)
        for _ in range(n):
            frames.append(ChunkFrame(ts, caption))
            ts += 1000
    lines = caption_lines(frames, max_lines)
    assert len(lines) == max_lines
    counts = [int(line.rsplit("(", 1)[1].split()[0]) for line in lines]
    assert sum(counts) == len(frames)
    starts = [line[1:line.index("]")].split("–")[0] for line in lines]
    assert starts[0] == clock(START) and starts == sorted(starts, key=lambda s: [int(x) for x in s.split(":")])
    if max_lines == 25:  # 15 merges: each absorbs a flicker; no two steady runs are merged yet
        assert all(line.count("steady scene") <= 1 for line in lines)
        assert sum("steady scene" not in line for line in lines) == 5
    assert caption_lines(frames, 40) == caption_lines(frames, 1000)
    assert len(caption_lines(frames, 40)) == 40


def test_merged_lines_name_the_most_seen_captions_in_time_order() -> None:
    frames = [ChunkFrame(START + i * 1000, c) for i, c in enumerate(["a", "a", "a", "b", "c", "c", "d", "d", "d", "d", "e"])]
    (line,) = caption_lines(frames, 1)
    assert line == "[0:03:20–0:03:30] a; c; d; … (11 frames)"


def test_prompt_texts() -> None:
    c = chunk()
    task = prompts.chunk_task(c)
    assert "0:03:20–0:06:39" in task and "120 words" in task and "[H:MM:SS]" in task and "(uncertain)" in task
    assert "at the end, at 0:06:39" in task
    text = prompts.render_chunk_input(c, 80)
    assert text.startswith("Captions of the video from 0:03:20–0:06:39, oldest first:\n[0:03:20–0:03:47] a car on a road (10 frames)")
    assert "at most 3 people at once, first at [0:03:56]" in text and "car 21, dog 20, person 9" in text
    b = block()
    assert "5 records" in prompts.block_task(b) and "150 words" in prompts.block_task(b)
    rendered = prompts.render_block_input(b)
    assert rendered.startswith("Record 1, 0:00:00–0:03:19:\nA car parks at [0:00:05].")
    assert "Record 3, 0:06:40–0:09:59 (automatic digest):" in rendered
    assert clock(3_723_999) == "1:02:03" and clock(-5) == "0:00:00"


# -- digest ----------------------------------------------------------------------------------------
def test_digest_chunk_has_anchors_end_state_changes_and_counts() -> None:
    text = DigestSummariser().summarise(chunk())
    assert text == (
        "0:03:20–0:06:39, 60 frames. "
        "Scenes: 0:03:20–0:03:47 a car on a road, 2 people; 0:03:50–0:04:17 mostly a car on a road, 3 people; "
        "0:04:20–0:05:17 an empty road; 0:05:20–0:06:17 a dog on a road. "
        "Changes: 0:03:38 person appears; 0:04:05 person gone; 0:04:20 car gone; 0:05:20 dog appears. "
        "Most people: 3 at 0:03:56. "
        "Seen most (frames): car 21, dog 20, person 9. "
        "At the end (0:06:17): a dog on a road; labels: dog; no people."
    )
    assert len(text.split()) <= prompts.CHUNK_WORDS


def test_digest_is_deterministic_and_bounded() -> None:
    import random

    rng = random.Random(7)
    words = ["red", "blue", "car", "truck", "person", "dog", "bag", "door", "open", "closed", "sign", "reads", "EXIT", "parking", "lot", "tree"]
    frames = tuple(
        ChunkFrame(START + i * 400, " ".join(rng.choice(words) for _ in range(rng.randint(3, 30))),
                   tuple(rng.sample(words, rng.randint(0, 6))), rng.randint(0, 9))
        for i in range(500)
    )
    first = DigestSummariser().summarise(chunk(frames))
    rebuilt = tuple(ChunkFrame(f.media_ts_ms, f.caption, tuple(f.labels), f.person_count) for f in frames)
    assert DigestSummariser().summarise(chunk(rebuilt)).encode() == first.encode()
    assert len(first.split()) <= prompts.CHUNK_WORDS
    assert first.startswith("0:03:20–0:06:39, 500 frames.") and "At the end (0:06:39)" in first
    assert DigestSummariser().summarise(chunk(())) == "0:03:20–0:06:39: no frames were received."


def test_digest_block_keeps_spans_and_end_states() -> None:
    digest = DigestSummariser()
    pieces = list(block().summaries)
    pieces[2] = SummaryPiece(2, 400_000, 599_999, digest.summarise(chunk()), fallback=True)
    b = BlockInput(KEY, 0, 0, 999_999, tuple(pieces))
    text = digest.compress(b)
    lines = text.split("\n")
    assert len(lines) == 5
    assert lines[0] == "[0:00:00–0:03:19] A car parks at [0:00:05]. At the end the lot holds 0 cars."
    # A digest keeps what happened (its scenes, with their times) and its end state, cut to fit.
    assert lines[2].startswith("[0:06:40–0:09:59] Scenes: 0:03:20–0:03:47 a car on a road, 2 people;")
    assert "At the end (0:06:17): a dog on a road" in lines[2]
    assert len(text.split()) <= prompts.BLOCK_WORDS + 10
    assert digest.compress(b) == text
    long = BlockInput(KEY, 0, 0, 999_999, tuple(
        SummaryPiece(i, i * 1000, i * 1000 + 999, " ".join(["word"] * 200) + ".") for i in range(5)))
    assert len(digest.compress(long).split()) <= prompts.BLOCK_WORDS + 10


def test_tidy_drops_repeats_and_cuts_at_a_sentence_end() -> None:
    looped = "A car at [0:03:20]. The man wears a helmet. The man wears a helmet. The man  wears a helmet. The"
    assert tidy(looped, 100) == "A car at [0:03:20]. The man wears a helmet."
    assert tidy("Unfinished sentence without an end", 100) == "Unfinished sentence without an end"
    assert tidy("One two three. Four five six seven.", 5) == "One two three."
    assert tidy("one two three four five six", 3) == "one two three …"
    assert tidy("- [0:00:01] a car\n- [0:00:05] a dog\n\n- [0:00:01] a car", 50) == "- [0:00:01] a car\n- [0:00:05] a dog"
    assert tidy("  \n ", 10) == ""


# -- a text generator --------------------------------------------------------------------------------
class RecordingGenerator(ResponseGenerator):
    def __init__(self, chunks: list[str], fail: BaseException | None = None) -> None:
        self.chunks, self.fail = chunks, fail
        self.prompts: list[Prompt] = []
        self.loaded = self.closed = False

    def load(self) -> RecordingGenerator:
        self.loaded = True
        return self

    def stream(self, prompt: Prompt) -> Iterator[str]:
        self.prompts.append(prompt)
        yield from self.chunks
        if self.fail is not None:
            raise self.fail

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def test_generator_summariser_prompts_with_caption_lines_and_task() -> None:
    generator = RecordingGenerator(["A car ", "leaves at [0:04:20]. ", ""])
    backend = GeneratorSummariser(generator, settings(max_caption_lines=4, max_new_tokens=99)).load()
    assert generator.loaded and backend.ready() and backend.name == "generator" and not backend.takes_images
    assert backend.summarise(chunk()) == "A car leaves at [0:04:20]."
    (prompt,) = generator.prompts
    assert prompt.system == prompts.CHUNK_SYSTEM
    assert prompt.task == prompts.chunk_task(chunk())
    assert prompt.max_new_tokens == 99
    lines = caption_lines(chunk().frames, 4)
    assert len(lines) == 4
    user = prompt.user_text()
    assert all(line in user for line in lines)
    assert user.endswith(prompts.chunk_task(chunk()))
    assert backend.compress(block()) == "A car leaves at [0:04:20]."
    assert generator.prompts[1].system == prompts.BLOCK_SYSTEM
    assert prompts.render_block_input(block()) in generator.prompts[1].user_text()
    backend.close()
    assert not generator.closed  # the caller's generator: the caller closes it


def test_generator_summariser_errors() -> None:
    failing = GeneratorSummariser(RecordingGenerator(["half"], GenerationError("backend down")), settings())
    with pytest.raises(GenerationError, match="backend down"):
        failing.summarise(chunk())
    refused = GeneratorSummariser(RecordingGenerator([], GenerationRejected("prompt too long")), settings())
    with pytest.raises(GenerationError, match="prompt too long"):
        refused.compress(block())
    empty = GeneratorSummariser(RecordingGenerator(["  "]), settings())
    with pytest.raises(GenerationError, match="empty"):
        empty.summarise(chunk())
    # Nothing to show the model: the digest, without a call.
    quiet = RecordingGenerator(["never"])
    no_captions = chunk((ChunkFrame(START, ""), ChunkFrame(START + 1000, " ")))
    assert GeneratorSummariser(quiet, settings()).summarise(no_captions) == DigestSummariser().summarise(no_captions)
    assert quiet.prompts == []


# -- an OpenAI-compatible VLM on 127.0.0.1 ------------------------------------------------------------
class FakeVLM:
    """A real HTTP server answering /v1/chat/completions and /v1/models, recording the requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.mode = "ok"
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send(200, json.dumps({"data": [{"id": "tiny-vlm"}]}).encode())

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                fake.requests.append((self.path, dict(self.headers), body))
                if fake.mode == "500":
                    self._send(500, json.dumps({"error": {"message": "CUDA out of memory"}}).encode())
                elif fake.mode == "400":
                    self._send(400, json.dumps({"error": {"message": "too many images"}}).encode())
                elif fake.mode == "garbage":
                    self._send(200, b"<html>not json</html>", "text/html")
                else:
                    answer = {"id": "x", "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": " At [0:03:20] a car. "}, "finish_reason": "stop"}]}
                    self._send(200, json.dumps(answer).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def fake_vlm() -> Iterator[FakeVLM]:
    server = FakeVLM()
    try:
        yield server
    finally:
        server.stop()


def vlm_settings(url: str, **overrides: Any) -> SummariserSettings:
    values: dict[str, Any] = {"backend": "openai-vlm", "vlm_base_url": url, "vlm_model": "tiny-vlm", "vlm_api_key": "s3cret",
                                  "images_per_chunk": 4, "image_max_side": 128, "timeout_s": 10}
    values.update(overrides)
    return SummariserSettings(**values)


def test_openai_vlm_sends_timestamped_downscaled_jpegs(fake_vlm: FakeVLM) -> None:
    backend = make_backend(vlm_settings(fake_vlm.url, max_new_tokens=77))
    assert isinstance(backend, OpenAIVisionSummariser) and backend.takes_images
    try:
        assert backend.ready()
        c = chunk(scene_frames(images_every=5))  # 12 frames carry a JPEG
        assert backend.summarise(c) == "At [0:03:20] a car."
        path, headers, body = fake_vlm.requests[0]
        assert path == "/v1/chat/completions"
        assert headers["Authorization"] == "Bearer s3cret"
        assert body["model"] == "tiny-vlm" and body["max_tokens"] == 77 and body["temperature"] == 0 and body["stream"] is False
        system, user = body["messages"]
        assert system == {"role": "system", "content": prompts.CHUNK_SYSTEM}
        parts = user["content"]
        images = [p for p in parts if p["type"] == "image_url"]
        assert 1 <= len(images) <= 4
        expected = [f for f in sample_frames(c.frames, 4)]
        assert len(images) == len(expected) == 4
        for image_part, frame in zip(images, expected, strict=True):
            before = parts[parts.index(image_part) - 1]
            assert before == {"type": "text", "text": f"[{clock(frame.media_ts_ms)}]"}
            url = image_part["image_url"]["url"]
            assert url.startswith("data:image/jpeg;base64,")
            data = base64.b64decode(url.split(",", 1)[1])
            assert data[:2] == b"\xff\xd8"
            with Image.open(io.BytesIO(data)) as decoded:
                assert decoded.format == "JPEG" and max(decoded.size) <= 128 and decoded.size == (128, 72)
        assert parts[-1] == {"type": "text", "text": prompts.chunk_task(c)}
        assert "[0:04:20–0:05:17] an empty road (20 frames)" in parts[-2]["text"]
        # The first and the last of the frames with a JPEG are shown (the end state matters).
        assert expected[0].media_ts_ms == START and expected[-1].media_ts_ms == START + 55 * 3000

        assert backend.compress(block()) == "At [0:03:20] a car."
        _, _, body = fake_vlm.requests[1]
        assert body["messages"][1]["content"] == prompts.render_block_input(block()) + "\n\n" + prompts.block_task(block())
        assert body["max_tokens"] == 200
    finally:
        backend.close()


def test_openai_vlm_failures_raise_generation_error(fake_vlm: FakeVLM) -> None:
    backend = OpenAIVisionSummariser(vlm_settings(fake_vlm.url))
    try:
        for mode, message in (("500", "HTTP 500: CUDA out of memory"), ("400", "HTTP 400: too many images"),
                              ("garbage", "not a chat completion")):
            fake_vlm.mode = mode
            with pytest.raises(GenerationError, match=message):
                backend.summarise(chunk(scene_frames(images_every=10)))
    finally:
        backend.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused = OpenAIVisionSummariser(vlm_settings(f"http://127.0.0.1:{port}/v1"))
    try:
        assert not refused.ready()
        with pytest.raises(GenerationError, match="cannot reach"):
            refused.compress(block())
    finally:
        refused.close()


def test_sample_frames_spreads_evenly() -> None:
    frames = [ChunkFrame(i, "c", jpeg=b"x" if i % 2 else None) for i in range(40)]
    picked = sample_frames(frames, 5)
    assert [f.media_ts_ms for f in picked] == [1, 11, 21, 29, 39]
    assert [f.media_ts_ms for f in sample_frames(frames, 1)] == [39]
    assert len(sample_frames(frames, 100)) == 20


def test_make_backend() -> None:
    assert isinstance(make_backend(settings()), DigestSummariser)
    mine = RecordingGenerator(["x"])
    backend = make_backend(settings(backend="generator"), generator=mine)
    assert isinstance(backend, GeneratorSummariser) and backend.load() is backend and mine.loaded
    own = make_backend(settings(backend="generator"), GenerationSettings(base_url="http://127.0.0.1:9/v1"))
    assert isinstance(own, GeneratorSummariser)
    own.close()
    hf = make_backend(settings(backend="hf-vlm", hf_model_path="/nonexistent/model"))
    assert isinstance(hf, HFVisionSummariser) and not hf.ready() and hf.takes_images
    with pytest.raises(GenerationError, match="no such folder"):
        hf.load()


# -- a tiny Qwen2-VL through the Hugging Face backend --------------------------------------------------
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2_vl(folder: Path) -> None:
    """A randomly initialised Qwen2-VL of a few thousand parameters, its processor's parts and a
    word-level tokenizer, saved as a model folder (the processor's video half needs torchvision,
    which may not be installed: the parts are saved one by one, as a full processor would be)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    try:
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import Qwen2VLImageProcessor as ImageProcessor

    words = ["system", "user", "assistant", "a", "the", "car", "road", "dog", "at", "end"] + [chr(c) for c in range(33, 127)]
    vocab = {token: i for i, token in enumerate([*QWEN_SPECIAL, "[UNK]", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=QWEN_SPECIAL[1:])
    tokenizer.save_pretrained(folder)
    ImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16).save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                         "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<|endoftext|>"), "bos_token_id": ids("<|endoftext|>")},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14,
                           "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = None  # a random model: run to max_new_tokens, never stop early
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_qwen2_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-qwen2-vl")
    build_tiny_qwen2_vl(folder)
    return folder


def test_hf_vlm_runs_a_tiny_qwen2_vl(tiny_qwen2_vl: Path) -> None:
    backend = make_backend(settings(backend="hf-vlm", hf_model_path=tiny_qwen2_vl, images_per_chunk=3,
                                    image_max_side=64, max_new_tokens=16, block_max_new_tokens=16))
    assert isinstance(backend, HFVisionSummariser) and not backend.ready()
    backend.load()
    assert backend.ready() and backend.load() is backend
    if importlib.util.find_spec("torchvision") is None:  # AutoProcessor cannot build Qwen2-VL's video processor
        assert type(backend._processor).__name__ == "Qwen2VLProcessorImageOnly"
    calls: list[dict[str, Any]] = []
    model = backend._model
    generate = model.generate

    def recording_generate(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return generate(**kwargs)

    model.generate = recording_generate
    try:
        c = chunk(scene_frames(images_every=10))  # 6 frames carry a JPEG, 3 are shown
        text = backend.summarise(c)
        assert isinstance(text, str) and text.strip() == text and text
        (call,) = calls
        assert call["max_new_tokens"] == 16 and call["do_sample"] is False
        assert call["image_grid_thw"].shape == (3, 3)  # three images reached the model
        assert call["pixel_values"].shape[0] == int(call["image_grid_thw"].prod(dim=1).sum())
        image_pad = backend._processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        merged = int(call["image_grid_thw"].prod(dim=1).sum()) // 4  # spatial merge 2x2
        assert int((call["input_ids"] == image_pad).sum()) == merged
        # Frames were downscaled to 64 px at most: 64x36 -> the processor's smallest grid.
        assert all(int(h) * 14 <= 2 * 64 and int(w) * 14 <= 2 * 64 for _, h, w in call["image_grid_thw"].tolist())

        text = backend.compress(block())
        assert isinstance(text, str) and text
        assert "pixel_values" not in calls[1] or calls[1]["pixel_values"] is None
    finally:
        backend.close()
    assert not backend.ready()
    with pytest.raises(GenerationError, match="not loaded"):
        backend.summarise(chunk(scene_frames(images_every=10)))
