"""The Helm chart: lint --strict, render every ci/ scenario, validate the manifests offline
against the Kubernetes schemas (strict: unknown fields fail), reject bad values, and keep the one
template generic (components differ only by their values)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "streamharness"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.31.0"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
SERVICES = ("gateway", "ingest", "encoder", "decision", "memory", "responder")
SERVICE_VARIABLES = {"SH_SERVICE_NAME", "SH_GRPC_HOST", "SH_SHUTDOWN_GRACE_S", "OTEL_SERVICE_NAME", "SH_GRPC_PORT"}
KAFKA_VARIABLES = {"SH_KAFKA_BOOTSTRAP_SERVERS", "SH_KAFKA_TOPIC_PREFIX"}


def helm_binary() -> str:
    cache = Path(os.environ.get("SH_DEV_CACHE_DIR", Path.home() / ".cache" / "streamharness"))
    for candidate in (os.environ.get("SH_HELM"), str(cache / "bin" / "helm"), shutil.which("helm")):
        if candidate and Path(candidate).exists():
            return candidate
    raise AssertionError("helm not found: run `make helm` (go install helm.sh/helm/v4/cmd/helm) or set SH_HELM")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)


def render(tmp_path: Path, *values: Path, sets: tuple[str, ...] = ()) -> list[dict]:
    args = ["template", "sh", str(CHART), "--kube-version", KUBE_VERSION]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    proc = helm(*args)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "rendered.yaml"
    out.write_text(proc.stdout)
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def workloads(docs: list[dict]) -> dict[str, dict]:
    """Deployments and StatefulSets by component name (release "sh")."""
    return {d["metadata"]["name"].removeprefix("sh-"): d for d in docs if d["kind"] in WORKLOAD_KINDS}


def container_env(workload: dict) -> dict[str, dict]:
    return {e["name"]: e for e in workload["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_lint_strict():
    for scenario in [None, *SCENARIOS]:
        args = ["lint", "--strict", str(CHART)] + (["-f", str(scenario)] if scenario else [])
        proc = helm(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.name)
def test_scenarios_render_valid_manifests(tmp_path, scenario):
    docs = render(tmp_path, scenario)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet", "-k", KUBE_VERSION, str(tmp_path / "rendered.yaml")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pods_are_non_root_read_only_with_grace_above_drain(tmp_path):
    drained = set()
    for name, workload in workloads(render(tmp_path)).items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            env = {e["name"]: e.get("value") for e in c["env"]}
            # Every StreamHarness service drains for SH_SHUTDOWN_GRACE_S (Triton reads no SH_*).
            if "SH_SERVICE_NAME" in env:
                assert pod["terminationGracePeriodSeconds"] > float(env["SH_SHUTDOWN_GRACE_S"])
                drained.add(name)
    assert drained >= {*SERVICES, "generator"}


def test_gpu_scenario_requests_gpu_and_shared_memory(tmp_path):
    docs = render(tmp_path, CHART / "ci" / "gpu-values.yaml")
    triton = workloads(docs)["triton"]
    assert triton["kind"] == "Deployment"
    pod = triton["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])


def test_cpu_default_requests_no_gpu(tmp_path):
    docs = render(tmp_path, CHART / "ci" / "default-values.yaml")
    for d in workloads(docs).values():
        assert "nvidia.com/gpu" not in str(d)


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("componentz.triton.enabled=true", "componentz"),
        ("components.triton.gpus=1", "gpus"),
        ("kafka.bootstrapServers=no-port", "bootstrapServers"),
        ("components.triton.enabled=maybe", "enabled"),
        ("components.triton.kafka=yes", "kafka"),
        ("components.gateway.fieldEnv.SH_GATEWAY_REPLICA_ID=metadata.nam", "fieldEnv"),
        ("components.memory.persistence.size=lots", "size"),
        ("components.memory.persistence.mountPath=/tmp", "mountPath"),
        ("components.memory.persistence.sizee=1Gi", "sizee"),
        ("components.decision.persistence.enabled=true", "persistence"),
    ],
)
def test_schema_rejects_bad_values(setting, complaint):
    proc = helm("template", "sh", str(CHART), "--set", setting)
    assert proc.returncode != 0
    assert complaint in proc.stderr


def test_same_setting_names_as_local_runs(tmp_path):
    """One source for configuration: every SH_* variable the chart sets is a real setting."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    from settings_table import settings_classes, variables

    known = {var for cls in settings_classes() for var, *_ in variables(cls)}
    for d in workloads(render(tmp_path, *SCENARIOS)).values():
        for c in d["spec"]["template"]["spec"]["containers"]:
            for e in c["env"]:
                if e["name"].startswith("SH_"):
                    assert e["name"] in known, f"chart sets {e['name']}, which no settings class reads"


def test_services_probe_grpc_health_and_gateways_know_their_pod(tmp_path):
    deployments = workloads(render(tmp_path))
    assert {"gateway", "ingest", "encoder", "decision", "memory", "responder", "generator", "triton"} <= set(deployments)
    for name in ("gateway", "ingest", "encoder", "decision", "memory", "responder"):
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["grpc"]["port"] == 50051
        assert container["command"] == ["python", f"services/{name}/main.py"]
    gateway_env = {e["name"]: e for e in deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert gateway_env["SH_GATEWAY_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert gateway_env["SH_GATEWAY_INGEST_ADDRESS"]["value"] == "sh-ingest:50051"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.name)
def test_triton_gets_no_service_or_kafka_variables_and_services_keep_theirs(tmp_path, scenario):
    found = workloads(render(tmp_path, scenario))
    triton = set(container_env(found["triton"]))
    assert not {v for v in triton if v.startswith("SH_KAFKA_")}, triton
    assert not triton & SERVICE_VARIABLES, triton
    for name in SERVICES:
        env = container_env(found[name])
        assert SERVICE_VARIABLES | KAFKA_VARIABLES <= set(env), (name, set(env))
        assert env["SH_SERVICE_NAME"]["value"] == env["OTEL_SERVICE_NAME"]["value"] == name
        assert env["SH_GRPC_HOST"]["value"] == "0.0.0.0"
        assert env["SH_GRPC_PORT"]["value"] == "50051"
    generator = set(container_env(found["generator"]))
    assert SERVICE_VARIABLES - {"SH_GRPC_PORT"} <= generator  # no grpc port
    assert "SH_GRPC_PORT" not in generator and not generator & KAFKA_VARIABLES  # a model server, not a stage


def test_gateway_replica_id_is_the_pod_name_and_field_env_is_generic(tmp_path):
    found = workloads(render(tmp_path, sets=("components.ingest.fieldEnv.POD_IP=status.podIP",)))
    replica_id = container_env(found["gateway"])["SH_GATEWAY_REPLICA_ID"]
    assert replica_id["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}} and "value" not in replica_id
    assert container_env(found["ingest"])["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    for name in ("ingest", "triton", "memory"):
        assert "SH_GATEWAY_REPLICA_ID" not in container_env(found[name])
    # A variable in both fieldEnv and env would be set twice: refused with its name.
    proc = helm("template", "sh", str(CHART), "--set", "components.gateway.env.SH_GATEWAY_REPLICA_ID=x")
    assert proc.returncode != 0 and "SH_GATEWAY_REPLICA_ID" in proc.stderr


def _data_mount(workload: dict) -> dict:
    mounts = workload["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    data_dir = container_env(workload)["SH_MEMORY_DATA_DIR"]["value"]
    return next(m for m in mounts if m["mountPath"] == data_dir)


def test_memory_is_a_stateful_set_with_its_data_on_a_claim(tmp_path):
    docs = render(tmp_path)
    found = workloads(docs)
    memory = found["memory"]
    assert memory["kind"] == "StatefulSet"
    assert [n for n, w in found.items() if w["kind"] == "StatefulSet"] == ["memory"]
    mount = _data_mount(memory)
    assert mount["mountPath"] == "/data/memory"
    (claim,) = memory["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == mount["name"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and "storageClassName" not in claim["spec"]
    assert mount["name"] not in {v["name"] for v in memory["spec"]["template"]["spec"]["volumes"]}
    governing = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == memory["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    assert memory["spec"]["replicas"] == 1
    # Clients keep using the ordinary Service.
    assert container_env(found["responder"])["SH_RESPONDER_MEMORY_ADDRESS"]["value"] == "sh-memory:50051"
    assert any(d["kind"] == "Service" and d["metadata"]["name"] == "sh-memory" and "clusterIP" not in d["spec"] for d in docs)
    gpu_claim = workloads(render(tmp_path, CHART / "ci" / "gpu-values.yaml"))["memory"]["spec"]["volumeClaimTemplates"][0]
    assert gpu_claim["spec"]["storageClassName"] == "premium-rwo"


def test_memory_without_persistence_is_a_deployment_with_an_empty_dir(tmp_path):
    docs = render(tmp_path, CHART / "ci" / "ephemeral-memory-values.yaml")
    memory = workloads(docs)["memory"]
    assert memory["kind"] == "Deployment"
    assert "volumeClaimTemplates" not in memory["spec"] and "serviceName" not in memory["spec"]
    mount = _data_mount(memory)
    assert mount["mountPath"] == "/data/memory"
    volume = next(v for v in memory["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume == {"name": mount["name"], "emptyDir": {}}
    assert not [d for d in docs if d["kind"] == "StatefulSet" or d["metadata"]["name"].endswith("-headless")]


def test_template_names_no_component():
    """Components differ by their values only: no template tests or mentions a component's name."""
    names = set(yaml.safe_load((CHART / "values.yaml").read_text())["components"])
    assert {"triton", "gateway", "memory"} <= names
    for template in sorted((CHART / "templates").glob("*")):
        text = template.read_text()
        for name in sorted(names):
            hits = [line for line in text.splitlines() if re.search(rf"\b{name}\b", line)]
            assert not hits, f"{template.name} names component {name!r}: {hits}"
        assert not re.search(r"\b(eq|ne)\s+\$name\b", text), f"{template.name} compares $name"


def test_eval_job_manifest_is_valid_and_runs_the_eval_entry_point():
    job = ROOT / "eval-jobs" / "job.yaml"
    proc = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet", "-k", KUBE_VERSION, str(job)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    spec = yaml.safe_load(job.read_text())["spec"]["template"]["spec"]
    assert spec["containers"][0]["command"] == ["streamharness", "eval", "run"]


def test_in_process_eval_job_manifest_is_valid_and_its_command_parses():
    job = ROOT / "eval-jobs" / "job-in-process.yaml"
    proc = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet", "-k", KUBE_VERSION, str(job)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    container = yaml.safe_load(job.read_text())["spec"]["template"]["spec"]["containers"][0]
    script = container["args"][0]
    assert "eval build-episodes" in script and "eval run" in script and "--in-process" in script
    # Every option the Job passes exists on the CLI (a renamed option would fail only in the cluster).
    from typer.main import get_command

    from streamharness.eval.cli import app as eval_app

    eval_group = get_command(eval_app)
    for sub, part in (("build-episodes", script.split("&&")[0]), ("run", script.split("&&")[1])):
        known = {opt for p in eval_group.commands[sub].params for opt in p.opts}
        used = {tok for tok in part.split() if tok.startswith("--")}
        assert used <= known, (sub, used - known)
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SH_GENERATION_BACKEND"] == "openai" and env["SH_TRITON_URL"].endswith(":8001")
