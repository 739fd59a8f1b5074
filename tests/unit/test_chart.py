"""The Helm chart: lint --strict, render every ci/ scenario, validate the manifests offline
against the Kubernetes schemas (strict: unknown fields fail), and reject bad values."""

from __future__ import annotations

import os
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
    for deploy in (d for d in render(tmp_path) if d["kind"] == "Deployment"):
        pod = deploy["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert pod["terminationGracePeriodSeconds"] > float(env["SH_SHUTDOWN_GRACE_S"])


def test_gpu_scenario_requests_gpu_and_shared_memory(tmp_path):
    docs = render(tmp_path, CHART / "ci" / "gpu-values.yaml")
    triton = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("triton"))
    pod = triton["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])


def test_cpu_default_requests_no_gpu(tmp_path):
    docs = render(tmp_path, CHART / "ci" / "default-values.yaml")
    for d in docs:
        if d["kind"] == "Deployment":
            assert "nvidia.com/gpu" not in str(d)


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("componentz.triton.enabled=true", "componentz"),
        ("components.triton.gpus=1", "gpus"),
        ("kafka.bootstrapServers=no-port", "bootstrapServers"),
        ("components.triton.enabled=maybe", "enabled"),
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
    for d in render(tmp_path, *SCENARIOS):
        if d["kind"] != "Deployment":
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            for e in c["env"]:
                if e["name"].startswith("SH_"):
                    assert e["name"] in known, f"chart sets {e['name']}, which no settings class reads"


def test_services_probe_grpc_health_and_gateways_know_their_pod(tmp_path):
    deployments = {d["metadata"]["name"].removeprefix("sh-"): d for d in render(tmp_path) if d["kind"] == "Deployment"}
    assert {"gateway", "ingest", "encoder", "decision", "memory", "responder", "generator", "triton"} <= set(deployments)
    for name in ("gateway", "ingest", "encoder", "decision", "memory", "responder"):
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["grpc"]["port"] == 50051
        assert container["command"] == ["python", f"services/{name}/main.py"]
    gateway_env = {e["name"]: e for e in deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert gateway_env["SH_GATEWAY_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert gateway_env["SH_GATEWAY_INGEST_ADDRESS"]["value"] == "sh-ingest:50051"


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
