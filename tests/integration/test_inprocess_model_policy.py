"""The ``model`` decision policy in the running in-process pipeline, on a real video: ingest, the
encoder on the real tritonserver, Qdrant-engine memory, and SmolLM2 on the streaming engine reading
the encoder's captions in the streaming protocol (``SH_DECISION_POLICY=model``)."""

from __future__ import annotations

import pytest

from streamharness.generation import GenerationSettings, make_generator
from streamharness.inprocess import InProcessConfig, InProcessPipeline, TimedQuery
from streamharness.keys import key_str, make_key
from streamharness.settings import load_settings
from tests.integration.test_inprocess import _jpegs


@pytest.fixture(scope="module")
def model_pipeline(triton_settings, generator_server, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SH_DECISION_POLICY", "model")
    mp.setenv("SH_DECISION_MODEL_QUESTION_MAX_NEW_TOKENS", "24")
    mp.setenv("SH_DECISION_MODEL_ALERT_MAX_NEW_TOKENS", "16")
    generator = make_generator(load_settings(
        GenerationSettings, backend="openai", base_url=generator_server.base_url, model="smollm2", api_key=None,
        max_new_tokens=24, temperature=0.0, read_timeout_s=120.0))
    pipe = InProcessPipeline(InProcessConfig(triton=triton_settings, memory_dir=tmp_path_factory.mktemp("memory")),
                             generator=generator)
    try:
        with pipe:
            assert pipe.ready()
            yield pipe
    finally:
        generator.close()
        mp.undo()


def test_the_model_decides_each_second_and_answers_a_question_on_its_cache(model_pipeline):
    pipe = model_pipeline
    assert pipe.decision.policy.name == "model"
    frames = _jpegs("vtest.avi", 8)
    result = pipe.run_session("acme", "model-policy", frames, instructions={"walk": "tell me when someone walks in"},
                              queries=[TimedQuery("question", "q1", 5000, "How many people are in the street?")])
    answers = [r for r in result.responses if r.question_id == "q1"]
    assert len(answers) == 1 and answers[0].media_ts_ms == 5000 and answers[0].text.strip()
    # Every response came from the model policy itself (the responder answered none).
    assert all(r.instruction_id == "walk" or r.question_id == "q1" for r in result.responses)
    # The question and the model's answer are in memory's Q&A tier, once.
    key = key_str(make_key("acme", "model-policy"))
    assert pipe.memory.store.count(key, ("qa",)) == len(result.responses)
    # The stream's cache held the protocol turns with the encoder's captions, and was given back at the end.
    engine = pipe.decision.policy.engine
    assert not engine.has("acme/model-policy")
    assert pipe.decision.policy.rebuilds.get("missing") == 1
