"""The topology is the one source: topics, services, the local stack, the chart's components and
the settings table all agree with it; every service's entry point has the same shape."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import yaml

from streamharness import topics, topology
from streamharness.devinfra import stack
from streamharness.stage import Stage, import_object, settings_classes
from streamharness.topology import COMMON_SETTINGS, TOPOLOGY

ROOT = Path(__file__).resolve().parents[2]
NOT_STAGES = {"generator"}  # a model server the responder calls, not a pipeline stage


def test_every_topic_has_a_producer_and_a_consumer_and_matches_the_topic_names():
    assert set(topology.all_topics()) == set(topics.PIPELINE)
    for topic in topology.all_topics():
        producers = [n for n, s in TOPOLOGY.items() if topic in s.produces]
        assert producers, f"nobody produces {topic}"
        assert topology.consumers_of(topic), f"nobody consumes {topic}"


def test_every_row_names_a_stage_class_its_settings_and_a_reason_for_its_offset_reset():
    for name, spec in TOPOLOGY.items():
        assert spec.name == name
        cls = import_object(spec.factory)
        assert issubclass(cls, Stage) and getattr(cls, "name") == name
        params = [p for p in inspect.signature(cls).parameters.values()]
        assert len(params) >= len(spec.settings), f"{name}: the constructor takes its settings in order"
        for param, settings_cls in zip(params, settings_classes(spec)):
            assert settings_cls.__name__ in str(param.annotation), f"{name}: {param.name} is not a {settings_cls.__name__}"
        if spec.consumes:
            assert spec.group and len(spec.offset_reset_reason) > 20, f"{name}: say why {spec.offset_reset}"


def test_co_partitioned_readers_need_both_topics_assigned():
    # The decision step must hold a stream's queries and frames in one member; memory and the
    # summariser read several topics too, but each record stands alone (no cross-topic state). The
    # responder keeps recent frames for its prompts (only with SH_RESPONDER_FRAMES_PER_REQUEST > 0):
    # co-partitioned like the decision step, but a response without frames is still an answer, so
    # readiness does not wait for both topics. The gateway reads responses and the decision log in a
    # group of its own per replica (every partition of both; each record stands alone).
    multi = [n for n, s in TOPOLOGY.items() if len(s.consumes) > 1]
    assert multi == ["gateway", "memory", "summariser", "decision", "responder"]
    assert TOPOLOGY["decision"].needs_assignment
    assert not TOPOLOGY["memory"].needs_assignment and not TOPOLOGY["summariser"].needs_assignment
    assert not TOPOLOGY["responder"].needs_assignment
    # ... but a responder that holds no partition does no work: not ready (a restart waiting for the
    # group's rebalance). The decision step is not ready while it restores its streams' state either.
    assert TOPOLOGY["responder"].needs_partitions


def test_every_stage_is_a_service_with_the_one_entry_point_shape():
    folders = {p.name for p in (ROOT / "services").iterdir() if (p / "main.py").exists()}
    assert folders - NOT_STAGES == set(TOPOLOGY)
    for name in TOPOLOGY:
        tree = ast.parse((ROOT / "services" / name / "main.py").read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "serve"]
        assert len(calls) == 1 and ast.literal_eval(calls[0].args[0]) == name, f"services/{name}/main.py must call serve({name!r})"


def test_the_local_stack_starts_every_stage_from_its_service_folder(tmp_path):
    local = stack.LocalStack(tmp_path, gateways=2)
    plan = local.plan("127.0.0.1:8080")
    assert sorted({p.stage for p in plan}) == sorted(TOPOLOGY)
    assert [p.name for p in plan if p.stage == "gateway"] == ["gateway-1", "gateway-2"]
    for p in plan:
        assert p.script == f"services/{p.stage}/main.py" and (ROOT / p.script).exists()
    by_name = {p.name: p for p in plan}
    assert by_name["gateway-2"].env["SH_GATEWAY_INGEST_ADDRESS"] == f"127.0.0.1:{by_name['ingest'].port}"
    assert by_name["gateway-2"].env["SH_GATEWAY_REPLICA_ID"] == "gateway-2"
    assert by_name["responder"].env["SH_RESPONDER_MEMORY_ADDRESS"] == f"127.0.0.1:{by_name['memory'].port}"
    assert by_name["summariser"].env["SH_SUMMARISER_MEMORY_ADDRESS"] == f"127.0.0.1:{by_name['memory'].port}"
    assert len({p.port for p in plan}) == len(plan)


def test_the_chart_deploys_every_stage_as_a_kafka_service_with_its_entry_point():
    values = yaml.safe_load((ROOT / "charts" / "streamharness" / "values.yaml").read_text())
    components = values["components"]
    for name in TOPOLOGY:
        c = components[name]
        assert c["command"] == ["python", f"services/{name}/main.py"], name
        assert c["streamharness"] and c["kafka"], f"{name} reads SH_KAFKA_*"
        assert "grpc" in c["ports"], f"{name} serves gRPC health"
    others = {n for n, c in components.items() if n not in TOPOLOGY}
    assert others == {"triton", "generator"}
    assert not any(components[n].get("kafka") for n in others), "only stages get Kafka settings"


def test_the_settings_table_lists_every_settings_class_a_stage_reads():
    import importlib.util

    spec = importlib.util.spec_from_file_location("settings_table", ROOT / "tools" / "settings_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    documented = set(table.settings_classes())
    for row in TOPOLOGY.values():
        for cls in settings_classes(row):
            assert cls in documented, f"{cls.__name__} of {row.name} is missing from docs/operations.md"
    for path in COMMON_SETTINGS:
        assert import_object(path) in documented
    docs = (ROOT / "docs" / "operations.md").read_text()
    for cls in documented:
        assert re.search(rf"### {cls.__name__}\b", docs), cls.__name__
