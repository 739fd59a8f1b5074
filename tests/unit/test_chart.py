"""The Helm chart: lint --strict, render every ci/ scenario, validate the manifests offline
against the Kubernetes schemas (strict: unknown fields fail), reject bad values, and keep the
templates generic (components, and Jobs, differ only by their values). The Job manifests of
eval-jobs/ and training-jobs/ are validated the same way, and the commands they run are checked
against the CLI's options."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
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
SERVICES = ("gateway", "ingest", "encoder", "decision", "memory", "summariser", "responder")
SERVICE_VARIABLES = {"SH_SERVICE_NAME", "SH_GRPC_HOST", "SH_SHUTDOWN_GRACE_S", "OTEL_SERVICE_NAME", "SH_GRPC_PORT"}
KAFKA_VARIABLES = {"SH_KAFKA_BOOTSTRAP_SERVERS", "SH_KAFKA_TOPIC_PREFIX"}
TRAINING_JOBS = sorted((ROOT / "training-jobs").glob("*.yaml"))
# training-jobs/job-<name>.yaml and the chart's jobs.<entry> render the same Job (sh-<name>).
CHART_JOBS = {"build-dataset": "buildDataset", "train-head": "trainHead", "train-vlm": "trainVlm", "export": "export"}
JOBS_IMAGE = "streamharness-jobs:0.1.0"
TRAINING_CLAIMS = {"streamharness-training-data", "streamharness-training-output", "streamharness-model-repository"}


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


def jobs_of(docs: list[dict]) -> dict[str, dict]:
    """Jobs by name without the release prefix (release "sh")."""
    return {d["metadata"]["name"].removeprefix("sh-"): d for d in docs if d["kind"] == "Job"}


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet", "-k", KUBE_VERSION, str(path)],
        capture_output=True, text=True, timeout=120,
    )


def kebab(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"-\1", name).lower()


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
        ("jobs.trainHaed.enabled=true", "trainHaed"),  # an unknown Job has no command
        ("jobs.train_vlm.command={python}", "train_vlm"),  # becomes a Job name: kebab-able camelCase only
        ("jobs.export.enabled=maybe", "enabled"),
        ("jobs.trainVlm.gpu=-1", "gpu"),
        ("jobs.buildDataset.backofflimit=1", "backofflimit"),
        ("jobs.trainHead.claims.output.mountPath=/tmp", "mountPath"),
        ("jobs.trainHead.claims.output.claimname=x", "claimname"),
        ("jobImage.tagg=1", "tagg"),
        # The internal identity key comes from a Secret only, never as a plain value.
        ("env.SH_AUTH_INTERNAL_SECRET=plain", "SH_AUTH_INTERNAL_SECRET"),
        ("components.memory.env.SH_AUTH_INTERNAL_SECRET=plain", "SH_AUTH_INTERNAL_SECRET"),
        ("auth.internalSecret.secret=x", "secret"),
        # Client identity and TLS belong to the public entry point.
        ("components.ingest.tls.enabled=true", "tls"),
        ("components.memory.apiKeys.existingSecret=keys", "apiKeys"),
        ("components.gateway.tls.secretname=x", "secretname"),
        # Generated keys: tenant names that are also Secret data keys; the health port a port.
        ("components.gateway.apiKeys.generate[0]=a b", "generate"),
        ("components.gateway.apiKeys.generate[0]=..", "generate"),
        ("components.gateway.apiKeys.generat[0]=a", "generat"),
        ("components.gateway.tls.healthPort=0", "healthPort"),
        ("components.gateway.tls.probe.tcpSocket.port=grpc", "probe"),  # gone: the health port is probed
        ("networkPolicy.enabled=maybe", "enabled"),
        ("networkPolicy.gatewayFrom[0].podSelectr.matchLabels.a=b", "podSelectr"),
        ("components.ingest.allowFrom[0]=gatewy", "gatewy"),  # no such component or Job
        ("components.triton.monitoringPorts[0]=nope", "nope"),  # not one of its ports
        ("components.triton.allowPorts[0]=grcp", "grcp"),
        # Metrics: a port, a switch per component, the Operator's and Grafana's switches.
        ("metrics.port=0", "port"),
        ("components.gateway.metrics=yes", "metrics"),
        ("metrics.serviceMonitor.interval=often", "interval"),
        ("metrics.serviceMonitor.intervall=30s", "intervall"),
        ("grafana.dashboard.enabled=maybe", "enabled"),
        ("grafana.dashbord.enabled=true", "dashbord"),
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
    docs = render(tmp_path, *SCENARIOS)
    assert jobs_of(docs), "no scenario renders a Job"
    for d in [*workloads(docs).values(), *jobs_of(docs).values()]:
        for c in d["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                if e["name"].startswith("SH_"):
                    assert e["name"] in known, f"chart sets {e['name']}, which no settings class reads"


def test_services_probe_grpc_health_and_gateways_know_their_pod(tmp_path):
    deployments = workloads(render(tmp_path))
    assert {"gateway", "ingest", "encoder", "decision", "memory", "summariser", "responder", "generator", "triton"} <= set(deployments)
    for name in SERVICES:
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["grpc"]["port"] == 50051
        assert container["command"] == ["python", f"services/{name}/main.py"]
    gateway_env = {e["name"]: e for e in deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert gateway_env["SH_GATEWAY_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # Through ingest's headless Service, balanced by the gateway (round_robin): pulled streams spread.
    assert gateway_env["SH_GATEWAY_INGEST_ADDRESS"]["value"] == "dns:///sh-ingest-headless:50051"
    assert (gateway_env["SH_GATEWAY_HTTP_HOST"]["value"], gateway_env["SH_GATEWAY_HTTP_PORT"]["value"]) == ("0.0.0.0", "8080")


def test_ingest_has_a_headless_service_and_the_gateway_serves_http(tmp_path):
    docs = render(tmp_path)
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    headless = services["sh-ingest-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"]["app.kubernetes.io/component"] == "ingest"
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]} == {"grpc": 50051}
    assert {p["name"]: p["port"] for p in services["sh-gateway"]["spec"]["ports"]}.items() >= {"grpc": 50051, "http": 8080}.items()
    assert "sh-encoder-headless" not in services  # only where asked


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
    assert container_env(found["summariser"])["SH_SUMMARISER_MEMORY_ADDRESS"]["value"] == "sh-memory:50051"
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
    assert not [d for d in docs if d["kind"] == "StatefulSet" or d["metadata"]["name"] == "sh-memory-headless"]


def test_template_names_no_component():
    """Components (and Jobs) differ by their values only: no template tests or mentions a
    component's or a Job's name."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    names = set(values["components"])
    assert {"triton", "gateway", "memory"} <= names
    assert set(values["jobs"]) == set(CHART_JOBS.values())
    names |= set(values["jobs"]) | {kebab(j) for j in values["jobs"]}
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


# -- Streaming-Train Jobs (training-jobs/*.yaml and the chart's `jobs:`) ---------------------------


def command_tokens(container: dict) -> list[str]:
    """The container's command line as words (a shell script argument is split)."""
    tokens: list[str] = []
    for part in [*container.get("command", []), *container.get("args", [])]:
        tokens += shlex.split(part) if re.search(r"\s", part) else [part]
    return tokens


def train_invocations(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """Every `streamharness train <sub> ...` and `... -m streamharness.train.cli <sub> ...` (torchrun)
    in a command line: (sub, its arguments); `&&`, `||` or `;` ends one."""
    found = []
    i = 0
    while i < len(tokens):
        if tokens[i : i + 2] in (["streamharness", "train"], ["-m", "streamharness.train.cli"]):
            end = i + 3
            while end < len(tokens) and tokens[end] not in ("&&", "||", ";"):
                end += 1
            found.append((tokens[i + 2], tokens[i + 3 : end]))
            i = end
        else:
            i += 1
    return found


def commented_invocations(manifest: Path) -> list[tuple[str, list[str]]]:
    """The `streamharness train ...` lines of the manifest's comments (variants shown there)."""
    lines = [line.lstrip("# ") for line in manifest.read_text().splitlines() if line.lstrip().startswith("#")]
    return [inv for line in lines if "streamharness train " in line for inv in train_invocations(shlex.split(line))]


def parse_train_options(sub: str, args: list[str], root: Path) -> dict[str, object]:
    """Parses `streamharness train <sub> ARGS` with the typer app, without running it: an unknown
    option, a bad number or a missing required option fails as it would in the pod, and so does a
    value the command itself refuses (--format, --trainer, --style). Absolute paths are made to exist
    under `root` for the parse (options with exists=True), as the Job's volumes provide them.
    Returns the parameters the arguments set (name -> value, paths as the Job sees them)."""
    from typer.main import get_command

    from streamharness.train import cli
    from streamharness.train.synthetic import STYLES

    def rebase(value: str) -> str:
        if not value.startswith("/"):
            return value
        (root / value.lstrip("/")).mkdir(parents=True, exist_ok=True)
        return str(root) + value

    rebased = []
    for arg in args:
        name, eq, value = arg.partition("=")
        rebased.append(f"{name}={rebase(value)}" if arg.startswith("--") and eq else rebase(arg))
    group = get_command(cli.app)
    assert sub in group.commands, f"no `streamharness train {sub}` (has {sorted(group.commands)})"
    try:
        ctx = group.commands[sub].make_context(f"train {sub}", rebased)
    except Exception as exc:  # the CLI's usage error (typer's click)
        raise AssertionError(f"streamharness train {sub} {shlex.join(args)}: {exc}") from exc

    def unbase(value: object) -> object:
        if isinstance(value, (list, tuple)):
            return [unbase(v) for v in value]
        if isinstance(value, (str, Path)) and str(value).startswith(str(root) + "/"):
            return "/" + str(value)[len(str(root)) + 1 :]
        return value

    used = {k: unbase(v) for k, v in ctx.params.items() if ctx.get_parameter_source(k).name == "COMMANDLINE"}
    # What the command checks in its body (plain str options).
    assert ctx.params.get("format", "auto") in cli.FORMAT_NAMES, used
    assert ctx.params.get("style", "mixed") in STYLES, used
    assert ctx.params.get("trainer", "head") in ("head", "vlm"), used
    if sub == "train" and ctx.params.get("trainer") == "vlm":
        assert used.get("model") or used.get("tiny"), "--trainer vlm needs --model"
    return used


def mounts(pod: dict) -> dict[str, tuple]:
    """mountPath -> (source, mount readOnly, claim readOnly); source is the claim name or the emptyDir."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    found = {}
    for m in pod["containers"][0].get("volumeMounts", []):
        v = volumes[m["name"]]
        claim = v.get("persistentVolumeClaim")
        source = claim["claimName"] if claim else ("emptyDir", v["emptyDir"].get("medium"), v["emptyDir"].get("sizeLimit"))
        found[m["mountPath"]] = (source, m.get("readOnly", False), bool(claim and claim.get("readOnly")))
    return found


def test_training_jobs_are_the_charts():
    assert {p.stem.removeprefix("job-") for p in TRAINING_JOBS} == set(CHART_JOBS)


@pytest.mark.parametrize("manifest", TRAINING_JOBS, ids=lambda p: p.name)
def test_training_job_manifest_is_valid_and_locked_down(manifest):
    proc = kubernetes_validate(manifest)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = yaml.safe_load(manifest.read_text())
    assert job["kind"] == "Job" and job["metadata"]["name"] == f"streamharness-{manifest.stem.removeprefix('job-')}"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["image"] == JOBS_IMAGE
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and "memory" in container["resources"]["limits"]
    found = mounts(pod)
    assert found["/tmp"][0][0] == "emptyDir"
    claims = {source for source, *_ in found.values() if isinstance(source, str)}
    assert claims and claims <= TRAINING_CLAIMS, claims
    # The read-only training data is mounted read-only.
    assert all(ro and claim_ro for source, ro, claim_ro in found.values() if source == "streamharness-training-data")


@pytest.mark.parametrize("manifest", TRAINING_JOBS, ids=lambda p: p.name)
def test_training_job_runs_the_train_cli_with_its_options(manifest, tmp_path):
    """Every `streamharness train` command a Job runs (and the variants its comments show) parses
    against the CLI: a renamed option would otherwise fail only in the cluster. Outputs go to a
    writable volume, inputs to a mounted one."""
    pod = yaml.safe_load(manifest.read_text())["spec"]["template"]["spec"]
    container = pod["containers"][0]
    invocations = train_invocations(command_tokens(container))
    assert len(invocations) == 1, invocations
    found = mounts(pod)
    for sub, args in invocations:
        for name, value in parse_train_options(sub, args, tmp_path / "job").items():
            for path in value if isinstance(value, list) else [value]:
                if not (isinstance(path, str) and path.startswith("/")):
                    continue
                under = [ro for mount, (_, ro, _) in found.items() if Path(path).is_relative_to(mount)]
                assert under, f"{manifest.name}: {name}={path} is on no volume"
                if name in ("out", "model_repository"):
                    assert not any(under), f"{manifest.name}: {name}={path} is read-only"
    for sub, args in commented_invocations(manifest):
        parse_train_options(sub, args, tmp_path / "comment")


def test_training_jobs_need_a_gpu_only_for_the_vlm():
    for manifest in TRAINING_JOBS:
        job = yaml.safe_load(manifest.read_text())
        pod = job["spec"]["template"]["spec"]
        container = pod["containers"][0]
        if manifest.name != "job-train-vlm.yaml":
            assert "nvidia.com/gpu" not in str(job), manifest.name
            continue
        assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["command"][:3] == ["torchrun", "--standalone", "--nproc_per_node=1"]
        assert ("--trainer=vlm" in container["args"]) and mounts(pod)["/dev/shm"][0][:2] == ("emptyDir", "Memory")


def test_default_values_render_no_job(tmp_path):
    assert not any(j["enabled"] for j in yaml.safe_load((CHART / "values.yaml").read_text())["jobs"].values())
    for values in ((), (CHART / "ci" / "default-values.yaml",)):
        assert not jobs_of(render(tmp_path, *values))


def test_training_scenario_renders_the_training_job_manifests(tmp_path):
    """ci/training-values.yaml enables the four Jobs: the chart renders what training-jobs/ holds
    (same command, arguments, resources, volumes), the GPU on the VLM Job only."""
    docs = render(tmp_path, CHART / "ci" / "training-values.yaml")
    jobs = jobs_of(docs)
    assert set(jobs) == set(CHART_JOBS)
    for name, rendered in jobs.items():
        manifest = yaml.safe_load((ROOT / "training-jobs" / f"job-{name}.yaml").read_text())
        for key in ("backoffLimit", "ttlSecondsAfterFinished"):
            assert rendered["spec"].get(key) == manifest["spec"].get(key), (name, key)
        pod, want_pod = rendered["spec"]["template"]["spec"], manifest["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never" and pod["securityContext"] == want_pod["securityContext"]
        (container,), want = pod["containers"], want_pod["containers"][0]
        assert container["image"] == JOBS_IMAGE
        for key in ("command", "args", "resources", "securityContext"):
            assert container.get(key) == want.get(key), (name, key)
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert {e["name"]: e["value"] for e in want.get("env", [])}.items() <= env.items(), name
        assert mounts(pod) == mounts(want_pod), name
        assert ("nvidia.com/gpu" in str(rendered)) == (name == "train-vlm"), name
    # The dataset builder reaches the chart's tritonserver on its gRPC port.
    host, port = container_env(jobs["build-dataset"])["SH_TRITON_URL"]["value"].split(":")
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == host)
    assert any(p["name"] == "grpc" and p["port"] == int(port) for p in service["spec"]["ports"]), service["spec"]["ports"]


# -- Identity on every hop: the internal key, API keys, TLS, NetworkPolicies ----------------------

INTERNAL_SECRET = "SH_AUTH_INTERNAL_SECRET"
# What apiKeys.generate (default ["default"]) makes when apiKeys.existingSecret is empty.
GENERATED_API_KEYS = ("sh-api-keys", "sh-api-keys-plain")
TLS_VARIABLES = {"SH_GRPC_TLS_CERT_FILE", "SH_GRPC_TLS_KEY_FILE", "SH_GRPC_TLS_CLIENT_CA_FILE"}
EVAL_JOBS = sorted((ROOT / "eval-jobs").glob("*.yaml"))


def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def pod_of(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def mount_sources(workload: dict) -> dict[str, tuple[dict, dict]]:
    """mountPath -> (the volumeMount, its volume; {} for a StatefulSet's claim)."""
    pod = pod_of(workload)
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: (m, volumes.get(m["name"], {})) for m in pod["containers"][0]["volumeMounts"]}


def test_internal_secret_reaches_every_service_from_a_secret_never_as_a_literal(tmp_path):
    streamharness = {n for n, c in chart_values()["components"].items() if c.get("streamharness")}
    assert streamharness >= {*SERVICES, "generator"}
    docs = render(tmp_path)
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert set(secrets) == {"sh-internal-token", *GENERATED_API_KEYS}
    secret = secrets["sh-internal-token"]
    assert set(secret["data"]) == {"internal-secret"}
    value = base64.b64decode(secret["data"]["internal-secret"]).decode()
    assert len(value) == 48 and value.isalnum()
    found = workloads(docs)
    for name, workload in found.items():
        env = container_env(workload)
        if name not in streamharness:
            assert INTERNAL_SECRET not in env, name  # Triton reads no SH_*
            continue
        assert env[INTERNAL_SECRET] == {
            "name": INTERNAL_SECRET,
            "valueFrom": {"secretKeyRef": {"name": "sh-internal-token", "key": "internal-secret"}},
        }, name
    # Nowhere as a literal: no manifest but the Secret holds the value, in clear or encoded.
    rendered = (tmp_path / "rendered.yaml").read_text()
    assert rendered.count(secret["data"]["internal-secret"]) == 1 and value not in rendered
    # A Secret of one's own (name, a template, and key): referenced, and the chart creates none.
    own = tmp_path / "own-secret.yaml"
    own.write_text(yaml.safe_dump({"auth": {"internalSecret": {"existingSecret": "{{ .Release.Name }}-mine", "key": "hmac"}}}))
    docs = render(tmp_path, own)
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] not in GENERATED_API_KEYS]
    for name in streamharness:
        ref = container_env(workloads(docs)[name])[INTERNAL_SECRET]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "sh-mine", "key": "hmac"}, name


def test_internal_secret_is_kept_across_upgrades():
    """The chart-made key is looked up in the cluster before a fresh one is drawn (`lookup` sees no
    cluster under `helm template`, so this is read from the template)."""
    text = (CHART / "templates" / "internal-secret.yaml").read_text()
    assert re.search(r'lookup "v1" "Secret" \.Release\.Namespace \$name', text)
    assert re.search(r"\$value = index \$existing\.data \$key", text)


def test_api_keys_and_jwt_issuers_are_directory_mounts_without_sub_path(tmp_path):
    default = workloads(render(tmp_path))
    for name, workload in default.items():
        env = container_env(workload)
        assert "SH_GATEWAY_JWT_ISSUERS_FILE" not in env, name
        if name == "gateway":  # the generated keys (test_generated_api_keys_by_default)
            assert [p for p in mount_sources(workload) if p.startswith("/etc/streamharness")] == ["/etc/streamharness/api-keys"]
            continue
        assert "SH_GATEWAY_API_KEYS_FILE" not in env, name
        assert not [p for p in mount_sources(workload) if p.startswith("/etc/streamharness")], name
    found = workloads(render(tmp_path, sets=("components.gateway.apiKeys.existingSecret=sh-api-keys",
                                             "components.gateway.jwtIssuers.existingConfigMap=sh-jwt")))
    gateway = found["gateway"]
    env = container_env(gateway)
    sources = mount_sources(gateway)
    for variable, directory, kind, name, key, items in (
        ("SH_GATEWAY_API_KEYS_FILE", "/etc/streamharness/api-keys", "secret", "sh-api-keys", "api-keys.json", [{"key": "api-keys.json", "path": "api-keys.json"}]),
        # Every key of the ConfigMap: the issuers' public keys are files next to issuers.json.
        ("SH_GATEWAY_JWT_ISSUERS_FILE", "/etc/streamharness/jwt", "configMap", "sh-jwt", "issuers.json", None),
    ):
        assert env[variable]["value"] == f"{directory}/{key}"
        mount, volume = sources[directory]
        # A directory mount: Kubernetes updates the file in place (rotation without a restart) only
        # without subPath.
        assert "subPath" not in mount and "subPathExpr" not in mount and mount["readOnly"] is True
        source = volume[kind]
        assert source.get("secretName", source.get("name")) == name
        assert source.get("items") == items
    for m in pod_of(gateway)["containers"][0]["volumeMounts"]:
        assert "subPath" not in m, m
    for name, workload in found.items():
        if name != "gateway":
            assert not {"SH_GATEWAY_API_KEYS_FILE", "SH_GATEWAY_JWT_ISSUERS_FILE"} & set(container_env(workload)), name


def test_tls_on_the_gateway_only_and_only_when_enabled(tmp_path):
    for name, workload in workloads(render(tmp_path)).items():
        assert not TLS_VARIABLES & set(container_env(workload)), name
        assert "/etc/streamharness/tls" not in mount_sources(workload), name
    for client_ca in (None, "sh-client-ca"):
        values = tmp_path / "tls.yaml"  # the Secret's name is a template
        values.write_text(yaml.safe_dump({"components": {"gateway": {"tls": {"enabled": True, "secretName": "{{ .Release.Name }}-gateway-tls"}}}}))
        sets = (f"components.gateway.tls.clientCaSecretName={client_ca}",) if client_ca else ()
        found = workloads(render(tmp_path, values, sets=sets))
        gateway = found["gateway"]
        env = {k: e["value"] for k, e in container_env(gateway).items() if k in TLS_VARIABLES}
        want = {"SH_GRPC_TLS_CERT_FILE": "/etc/streamharness/tls/tls.crt", "SH_GRPC_TLS_KEY_FILE": "/etc/streamharness/tls/tls.key"}
        if client_ca:
            want["SH_GRPC_TLS_CLIENT_CA_FILE"] = "/etc/streamharness/tls/ca.crt"
        assert env == want
        mount, volume = mount_sources(gateway)["/etc/streamharness/tls"]
        assert "subPath" not in mount and mount["readOnly"] is True
        secrets = [src["secret"] for src in volume["projected"]["sources"]]
        assert secrets[0] == {"name": "sh-gateway-tls", "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}]}
        assert secrets[1:] == ([{"name": client_ca, "items": [{"key": "ca.crt", "path": "ca.crt"}]}] if client_ca else [])
        # The kubelet's gRPC probe speaks no TLS: it probes the plaintext health port
        # (test_tls_gateway_is_probed_on_its_plaintext_health_port).
        container = pod_of(gateway)["containers"][0]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["grpc"] == {"port": 50061}, probe
        for name, workload in found.items():
            if name != "gateway":
                assert not TLS_VARIABLES & set(container_env(workload)), name
                assert "/etc/streamharness/tls" not in mount_sources(workload), name
                assert "grpc" in pod_of(workload)["containers"][0]["readinessProbe"] or name in ("triton", "generator"), name


def test_tls_without_a_secret_fails_to_render_with_the_reason():
    proc = helm("template", "sh", str(CHART), "--set", "components.gateway.tls.enabled=true")
    assert proc.returncode != 0
    assert "components.gateway.tls.secretName is empty" in proc.stderr and "kubernetes.io/tls" in proc.stderr, proc.stderr


# Tenant authentication by default: generated API keys, kept across upgrades; no authentication at
# all fails the render; with TLS the kubelet probes a plaintext health port.

API_KEYS_MOUNT = "/etc/streamharness/api-keys"
HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


def values_file(tmp_path: Path, values: dict, name: str = "values.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def gateway_values(**fields: object) -> dict:
    return {"components": {"gateway": fields}}


def secrets_of(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}


def decoded(secret: dict) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def api_keys_volume(gateway: dict) -> dict:
    """The gateway's keys file: SH_GATEWAY_API_KEYS_FILE in a directory mount (no subPath) of a Secret."""
    assert container_env(gateway)["SH_GATEWAY_API_KEYS_FILE"]["value"] == f"{API_KEYS_MOUNT}/api-keys.json"
    mount, volume = mount_sources(gateway)[API_KEYS_MOUNT]
    assert "subPath" not in mount and "subPathExpr" not in mount and mount["readOnly"] is True
    assert volume["secret"]["items"] == [{"key": "api-keys.json", "path": "api-keys.json"}]
    return volume["secret"]


def check_generated_keys(secrets: dict[str, dict], tenants: set[str]) -> dict[str, str]:
    """The generated pair: api-keys.json lists, per tenant, the sha256 of the plain Secret's key.
    Returns tenant -> plain key."""
    hashed = json.loads(decoded(secrets["sh-api-keys"])["api-keys.json"])
    plain = decoded(secrets["sh-api-keys-plain"])
    assert set(hashed) == set(plain) == tenants
    for tenant, hashes in hashed.items():
        assert isinstance(hashes, list) and hashes and all(HASH.match(h) for h in hashes), (tenant, hashes)
        assert re.fullmatch(r"sh_[A-Za-z0-9]{43}", plain[tenant]), tenant  # like `streamharness keys new`
        assert hashes == ["sha256:" + hashlib.sha256(plain[tenant].encode()).hexdigest()], tenant
    assert len(set(plain.values())) == len(plain)
    return plain


def test_generated_api_keys_by_default(tmp_path):
    assert chart_values()["components"]["gateway"]["apiKeys"] == {"existingSecret": "", "generate": ["default"]}
    docs = render(tmp_path)
    secrets = secrets_of(docs)
    plain = check_generated_keys(secrets, {"default"})
    # The gateway mounts the hashes as it would an existingSecret; nothing mounts or names the keys.
    found = workloads(docs)
    assert api_keys_volume(found["gateway"])["secretName"] == "sh-api-keys"
    rendered = (tmp_path / "rendered.yaml").read_text()
    assert plain["default"] not in rendered  # only base64 in its Secret
    assert not [d["metadata"]["name"] for d in docs if d["kind"] != "Secret" and "sh-api-keys-plain" in json.dumps(d)]
    for name, workload in found.items():
        if name != "gateway":
            assert API_KEYS_MOUNT not in mount_sources(workload) and "SH_GATEWAY_API_KEYS_FILE" not in container_env(workload), name
    # Every tenant listed gets its own key; each render draws new ones (`lookup` sees no cluster).
    two_tenants = values_file(tmp_path, gateway_values(apiKeys={"generate": ["default", "acme.co"]}))
    two = check_generated_keys(secrets_of(render(tmp_path, two_tenants)), {"default", "acme.co"})
    assert two["default"] != plain["default"]


def test_existing_api_keys_secret_replaces_the_generated_ones(tmp_path):
    docs = render(tmp_path, values_file(tmp_path, gateway_values(apiKeys={"existingSecret": "{{ .Release.Name }}-own-keys"})))
    # `generate` (still ["default"]) is ignored: no Secret made, the user's own left alone.
    assert set(secrets_of(docs)) == {"sh-internal-token"}
    assert api_keys_volume(workloads(docs)["gateway"])["secretName"] == "sh-own-keys"
    # The generated Secret's name is the default's mount, not a coincidence of the test.
    assert api_keys_volume(workloads(render(tmp_path))["gateway"])["secretName"] == "sh-api-keys"


class FakeCluster:
    """Just enough of a Kubernetes API server for `helm template --dry-run=server`, whose `lookup`
    then reads the cluster: discovery of the kinds the chart renders, and GET of the Secrets in
    `secrets` (name -> data, values plain; 404 for anything else). Helm only reads (no write is
    served): `helm upgrade` renders the same way."""

    KINDS = {"v1": {"Secret": "secrets", "Service": "services"},
             "apps/v1": {"Deployment": "deployments", "StatefulSet": "statefulsets"},
             "batch/v1": {"Job": "jobs"},
             "networking.k8s.io/v1": {"NetworkPolicy": "networkpolicies"}}

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.secrets: dict[str, dict[str, str]] = {}
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.send(*cluster.answer(self.path.split("?")[0]))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, path: str) -> tuple[int, dict]:
        groups = [gv for gv in self.KINDS if "/" in gv]
        if path == "/version":
            return 200, {"major": "1", "minor": "31", "gitVersion": f"v{KUBE_VERSION}"}
        if path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": "v1"}],
                 "preferredVersion": {"groupVersion": gv, "version": "v1"}} for gv in groups]}
        gv = path.removeprefix("/api/").removeprefix("/apis/")
        if gv in self.KINDS:
            return 200, {"kind": "APIResourceList", "groupVersion": gv, "resources": [
                {"name": plural, "singularName": kind.lower(), "namespaced": True, "kind": kind, "verbs": ["get", "list"]}
                for kind, plural in self.KINDS[gv].items()]}
        match = re.fullmatch(r"/api/v1/namespaces/([^/]+)/secrets/([^/]+)", path)
        if match and match[2] in self.secrets:
            namespace, name = match.groups()
            # Owned by the release, as after `helm install` (Helm refuses to adopt anything else).
            return 200, {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {
                "name": name, "namespace": namespace, "labels": {"app.kubernetes.io/managed-by": "Helm"},
                "annotations": {"meta.helm.sh/release-name": "sh", "meta.helm.sh/release-namespace": namespace}},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in self.secrets[match[2]].items()}}
        return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}

    def render(self, tmp_path: Path, *values: Path) -> subprocess.CompletedProcess[str]:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text("")  # nothing of the caller's cluster
        args = ["template", "sh", str(CHART), "-n", "default", "--dry-run=server", "--disable-openapi-validation",
                "--kube-apiserver", self.url]
        for v in values:
            args += ["-f", str(v)]
        return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "KUBECONFIG": str(kubeconfig)})


@pytest.fixture
def fake_cluster():
    cluster = FakeCluster()
    yield cluster
    cluster.server.shutdown()
    cluster.server.server_close()


def test_generated_keys_and_internal_key_are_kept_across_upgrades(tmp_path, fake_cluster):
    """What `helm upgrade` renders when the chart's Secrets are already in the cluster (`lookup`)."""

    def sha(key: str) -> str:
        return "sha256:" + hashlib.sha256(key.encode()).hexdigest()

    def upgrade(**api_keys: object) -> dict[str, dict]:
        values = values_file(tmp_path, gateway_values(apiKeys=api_keys)) if api_keys else values_file(tmp_path, {})
        proc = fake_cluster.render(tmp_path, values)
        assert proc.returncode == 0, proc.stderr
        docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
        assert api_keys_volume(workloads(docs)["gateway"])["secretName"] == "sh-api-keys"
        return secrets_of(docs)

    key, old_key, gone = "sh_" + "a" * 43, "sh_" + "b" * 43, "sh_" + "c" * 43
    internal = "i" * 48
    # A first install: nothing in the cluster, fresh keys (as under `helm template`).
    check_generated_keys(upgrade(), {"default"})
    # Both Secrets there (the tenant's list grown by hand with a second hash), a tenant added to
    # `generate` and one removed from it: kept as they are, one new key, one revoked.
    fake_cluster.secrets = {
        "sh-api-keys": {"api-keys.json": json.dumps({"default": [sha(key), sha(old_key)], "gone": [sha(gone)]})},
        "sh-api-keys-plain": {"default": key, "gone": gone},
        "sh-internal-token": {"internal-secret": internal},
    }
    secrets = upgrade(generate=["default", "acme"])
    hashed, plain = json.loads(decoded(secrets["sh-api-keys"])["api-keys.json"]), decoded(secrets["sh-api-keys-plain"])
    assert set(hashed) == set(plain) == {"default", "acme"}
    assert hashed["default"] == [sha(key), sha(old_key)] and plain["default"] == key
    assert hashed["acme"] == [sha(plain["acme"])] and plain["acme"] not in (key, old_key, gone)
    assert decoded(secrets["sh-internal-token"]) == {"internal-secret": internal}
    # The plain Secret deleted once read: the hashes stay, the keys are not made again.
    del fake_cluster.secrets["sh-api-keys-plain"]
    secrets = upgrade()
    assert json.loads(decoded(secrets["sh-api-keys"])["api-keys.json"]) == {"default": [sha(key), sha(old_key)]}
    assert "sh-api-keys-plain" not in secrets
    # Only the plain Secret left: the hashes are made from it again.
    fake_cluster.secrets = {"sh-api-keys-plain": {"default": key}}
    secrets = upgrade()
    assert json.loads(decoded(secrets["sh-api-keys"])["api-keys.json"]) == {"default": [sha(key)]}
    assert decoded(secrets["sh-api-keys-plain"]) == {"default": key}
    # A keys file broken by hand is not silently replaced by new keys (every client would lose its key).
    fake_cluster.secrets = {"sh-api-keys": {"api-keys.json": "{not json"}}
    proc = fake_cluster.render(tmp_path, values_file(tmp_path, {}))
    assert proc.returncode != 0 and "Secret sh-api-keys in the cluster holds an api-keys.json that is not JSON" in proc.stderr, proc.stderr


@pytest.mark.parametrize("where", ["component", "global"])
def test_gateway_without_authentication_fails_to_render_unless_anonymous(tmp_path, where):
    none = gateway_values(apiKeys={"generate": []})
    for env in ({}, {"SH_GATEWAY_ALLOW_ANONYMOUS": "false"}):
        values = {**none, "env": env} if where == "global" else gateway_values(apiKeys={"generate": []}, env=env)
        proc = helm("template", "sh", str(CHART), "-f", str(values_file(tmp_path, values)))
        assert proc.returncode != 0, env
        message = proc.stderr
        assert "components.gateway authenticates no tenant and would refuse to start" in message, message
        for option in ("components.gateway.apiKeys", "existingSecret", "generate", "components.gateway.jwtIssuers.existingConfigMap",
                       'SH_GATEWAY_ALLOW_ANONYMOUS="true"'):
            assert option in message, (option, message)
    # Development: anonymous access asked for renders, with no keys file and no generated Secret.
    values = {**none, "env": {"SH_GATEWAY_ALLOW_ANONYMOUS": "true"}} if where == "global" else gateway_values(
        apiKeys={"generate": []}, env={"SH_GATEWAY_ALLOW_ANONYMOUS": "true"})
    docs = render(tmp_path, values_file(tmp_path, values))
    gateway = workloads(docs)["gateway"]
    assert container_env(gateway)["SH_GATEWAY_ALLOW_ANONYMOUS"]["value"] == "true"
    assert "SH_GATEWAY_API_KEYS_FILE" not in container_env(gateway) and API_KEYS_MOUNT not in mount_sources(gateway)
    assert not set(GENERATED_API_KEYS) & set(secrets_of(docs))
    # JWT issuers alone are enough.
    render(tmp_path, values_file(tmp_path, gateway_values(apiKeys={"generate": []}, jwtIssuers={"existingConfigMap": "sh-jwt"})))


def test_tls_gateway_is_probed_on_its_plaintext_health_port(tmp_path):
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    for health_port in (None, 50071):
        tls = {"enabled": True, "secretName": "sh-gateway-tls", **({"healthPort": health_port} if health_port else {})}
        values = {**gateway_values(tls=tls), "networkPolicy": {"enabled": True, "monitoringFrom": [{"podSelector": {"matchLabels": prometheus}}]}}
        docs = render(tmp_path, values_file(tmp_path, values))
        want = health_port or 50061
        gateway = workloads(docs)["gateway"]
        container = pod_of(gateway)["containers"][0]
        assert container_env(gateway)["SH_GRPC_HEALTH_PORT"]["value"] == str(want)
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": 50051, "http": 8080, "health": want, "metrics": 9464}
        # The kubelet's gRPC probe on the plaintext port: readiness is the service's health status.
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert {k: v for k, v in container[probe].items() if k in ("grpc", "tcpSocket", "httpGet", "exec")} == {"grpc": {"port": want}}, probe
        # Not on the Service; under the policies, from monitoringFrom only (the kubelet needs no rule).
        service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "sh-gateway")
        assert [p["name"] for p in service["spec"]["ports"]] == ["grpc", "http", "metrics"]
        policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
        labels = pod_labels(docs)
        assert admitted(policies, labels["gateway"], "health", prometheus)
        assert not admitted(policies, labels["gateway"], "health", None)
        assert not [s for s in labels if admitted(policies, labels["gateway"], "health", labels[s])]
        assert admitted(policies, labels["gateway"], "grpc", None)  # the public port stays public
        for name, workload in workloads(docs).items():
            if name != "gateway":
                assert "SH_GRPC_HEALTH_PORT" not in container_env(workload), name
    # TLS off: health on the gRPC port itself, no second port.
    gateway = workloads(render(tmp_path))["gateway"]
    assert "SH_GRPC_HEALTH_PORT" not in container_env(gateway)
    assert [p["name"] for p in pod_of(gateway)["containers"][0]["ports"]] == ["grpc", "http", "metrics"]
    assert pod_of(gateway)["containers"][0]["readinessProbe"]["grpc"] == {"port": 50051}
    # A health port on the TLS port, or set by hand, is refused with the reason.
    for extra, complaint in ((["--set", "components.gateway.tls.healthPort=50051"], "clashes with ports.grpc"),
                             (["--set", "components.gateway.env.SH_GRPC_HEALTH_PORT=1"], "SH_GRPC_HEALTH_PORT is set by the chart"),
                             (["--set", "components.gateway.tls.probe.tcpSocket.port=grpc"], "probe")):
        proc = helm("template", "sh", str(CHART), "--set", "components.gateway.tls.enabled=true",
                    "--set", "components.gateway.tls.secretName=x", *extra)
        assert proc.returncode != 0 and complaint in proc.stderr, proc.stderr


# NetworkPolicies: who may reach whom, evaluated from the rendered policies as a CNI would (pods of
# the release's namespace; a peer with a namespaceSelector or ipBlock stands for elsewhere).


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the chart writes matchLabels only
    return selector.get("matchLabels", {}).items() <= labels.items()


def admitted(policies: list[dict], target: dict, port: str, source: dict | None) -> bool:
    """Whether a pod with labels `source` (None: a client outside the namespace) may open a connection
    to port `port` (a name) of a pod with labels `target`."""
    isolating = [p for p in policies if "Ingress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], target)]
    if not isolating:
        return True
    for policy in isolating:
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and not any(p["port"] == port for p in rule["ports"]):
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                if source is not None and set(peer) == {"podSelector"} and selects(peer["podSelector"], source):
                    return True
    return False


def eval_job_pods() -> dict[str, dict]:
    """The pod templates of eval-jobs/*.yaml (outside the release), by file name."""
    return {m.name: yaml.safe_load(m.read_text())["spec"]["template"] for m in EVAL_JOBS}


def pod_labels(docs: list[dict]) -> dict[str, dict]:
    """The pod labels of every workload and Job (by component label), and of the eval Jobs of
    eval-jobs/ ("eval": they carry the same labels, so no policy tells them apart)."""
    found = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]["metadata"]["labels"]
             for d in docs if d["kind"] in (*WORKLOAD_KINDS, "Job")}
    (found["eval"],) = {tuple(sorted(t["metadata"]["labels"].items())): t["metadata"]["labels"] for t in eval_job_pods().values()}.values()
    return found


def callers_by_address(docs: list[dict]) -> dict[tuple[str, str], set[str]]:
    """(target component, port name) -> the pods whose environment names that Service's address
    (sh-<name>:<port>, as SH_*_ADDRESS, SH_TRITON_URL or SH_GENERATION_BASE_URL do)."""
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}  # headless ones too (the gateways call ingest's)
    pods = [(d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"], d["spec"]["template"]["spec"]) for d in docs if d["kind"] in (*WORKLOAD_KINDS, "Job")]
    pods += [("eval", t["spec"]) for t in eval_job_pods().values()]
    found: dict[tuple[str, str], set[str]] = {}
    for caller, pod in pods:
        for e in pod["containers"][0].get("env", []):
            for host, port in re.findall(r"\b(sh-[a-z0-9-]+):(\d+)", e.get("value", "")):
                service = services[host]
                (name,) = [p["name"] for p in service["spec"]["ports"] if p["port"] == int(port)]
                found.setdefault((service["spec"]["selector"]["app.kubernetes.io/component"], name), set()).add(caller)
    return found


def test_network_policies_admit_only_the_callers(tmp_path):
    docs = render(tmp_path, CHART / "ci" / "training-values.yaml")  # the Jobs' pods too
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    labels = pod_labels(docs)
    by_port = {name: {p["name"] for p in pod_of(w)["containers"][0]["ports"]} for name, w in workloads(docs).items()}
    inside = sorted(labels)

    def reach(target: str, port: str) -> set[str]:
        return {s for s in inside if admitted(policies, labels[target], port, labels[s])}

    # Default deny: one policy isolates every pod of the release, Jobs included, and admits nothing.
    (deny,) = [p for p in policies if not p["spec"].get("ingress")]
    assert deny["spec"]["policyTypes"] == ["Ingress"]
    assert all(selects(deny["spec"]["podSelector"], labels[n]) for n in inside if n != "eval")
    assert not selects(deny["spec"]["podSelector"], labels["eval"])  # not the release's pods
    # The gateway is open: any pod, and clients outside the namespace.
    assert reach("gateway", "grpc") == set(inside) and admitted(policies, labels["gateway"], "grpc", None)
    # Ingest only from the gateway; memory only from the stages that query it.
    assert reach("ingest", "grpc") == {"gateway"}
    assert reach("memory", "grpc") == {"decision", "responder", "summariser"}
    assert not admitted(policies, labels["ingest"], "grpc", None) and not admitted(policies, labels["memory"], "grpc", None)
    # Triton from the frame encoder, decision's trained head, the dataset builder and the in-process
    # eval; the generator from its two callers and the in-process eval.
    assert reach("triton", "grpc") == {"encoder", "decision", "build-dataset", "eval"}
    assert reach("generator", "http") == {"responder", "summariser", "eval"}
    # Nobody calls the other stages: only their health port, and only kubelet probes use it.
    for name in ("encoder", "decision", "summariser", "responder"):
        assert reach(name, "grpc") == set(), name
    # Least privilege both ways: every address a pod is given is reachable, and an internal port
    # admits exactly the pods given its address.
    callers = callers_by_address(docs)
    assert callers[("ingest", "grpc")] == {"gateway"}
    for name, ports in by_port.items():
        for port in ports:
            want = callers.get((name, port), set())
            if name == "gateway":
                assert want <= reach(name, port)
            else:
                assert reach(name, port) == want, (name, port)
    # Every port a policy opens is a port of the pods it selects.
    for policy in policies:
        component = policy["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component")
        for rule in policy["spec"].get("ingress", []):
            assert {p["port"] for p in rule.get("ports", [])} <= by_port[component], policy["metadata"]["name"]


def test_network_policies_gateway_sources_monitoring_and_switch(tmp_path):
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    docs = render(tmp_path, sets=(
        "networkPolicy.gatewayFrom[0].podSelector.matchLabels.app\\.kubernetes\\.io/name=ingress-nginx",
        "networkPolicy.monitoringFrom[0].podSelector.matchLabels.app\\.kubernetes\\.io/name=prometheus",
    ))
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    labels = pod_labels(docs)
    # gatewayFrom narrows the gateway to those peers.
    assert admitted(policies, labels["gateway"], "grpc", {"app.kubernetes.io/name": "ingress-nginx"})
    assert not admitted(policies, labels["gateway"], "grpc", None)
    assert not admitted(policies, labels["gateway"], "grpc", labels["responder"])
    # monitoringFrom reaches every component's health/metrics ports, and no others.
    for name in SERVICES:
        assert admitted(policies, labels[name], "grpc", prometheus), name
    assert admitted(policies, labels["triton"], "metrics", prometheus) and admitted(policies, labels["triton"], "http", prometheus)
    assert not admitted(policies, labels["triton"], "grpc", prometheus)
    assert admitted(policies, labels["generator"], "http", prometheus)
    assert not admitted(policies, labels["ingest"], "grpc", {"app.kubernetes.io/name": "ingress-nginx"})
    # No egress policy unless asked for (Kafka is external).
    assert not [p for p in policies if "Egress" in p["spec"]["policyTypes"]]
    # networkPolicy.enabled=false: none at all.
    assert not [d for d in render(tmp_path, sets=("networkPolicy.enabled=false",)) if d["kind"] == "NetworkPolicy"]


def test_egress_policy_allows_dns_kafka_and_the_release(tmp_path):
    docs = render(tmp_path, CHART / "ci" / "identity-values.yaml")
    (egress,) = [d for d in docs if d["kind"] == "NetworkPolicy" and "Egress" in d["spec"]["policyTypes"]]
    assert egress["spec"]["policyTypes"] == ["Egress"]
    rules = egress["spec"]["egress"]
    dns = [r for r in rules if "to" not in r]
    assert dns == [{"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]
    ports = [{p["port"] for p in r.get("ports", [])} for r in rules]
    assert {9092, 9093} in ports  # the ports of kafka.bootstrapServers
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "streamharness", "app.kubernetes.io/instance": "sh"}}} in [
        peer for r in rules for peer in r.get("to", [])]
    assert {4317} in ports  # networkPolicy.egress.extra


# Metrics for Prometheus and the Grafana dashboard (docs/operations.md, "Traces and meters").


def test_services_serve_prometheus_metrics_on_a_port_of_their_own(tmp_path):
    docs = render(tmp_path)
    found = workloads(docs)
    services = {d["metadata"]["name"].removeprefix("sh-"): d for d in docs if d["kind"] == "Service" and "clusterIP" not in d["spec"]}
    for name in SERVICES:
        env, pod = container_env(found[name]), found[name]["spec"]["template"]
        assert env["SH_TELEMETRY_METRICS_PORT"]["value"] == "9464" and env["SH_TELEMETRY_METRICS_HOST"]["value"] == "0.0.0.0", name
        assert {"name": "metrics", "containerPort": 9464} in pod["spec"]["containers"][0]["ports"], name
        assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "9464", "prometheus.io/path": "/metrics"}
        assert {"name": "metrics", "port": 9464, "targetPort": "metrics", "appProtocol": "http"} in services[name]["spec"]["ports"], name
    # Not the model servers: they serve no StreamHarness endpoint (Triton has its own metrics port).
    for name in ("triton", "generator"):
        assert "SH_TELEMETRY_METRICS_PORT" not in container_env(found[name]) and "annotations" not in found[name]["spec"]["template"]["metadata"]
    assert {p["name"]: p["port"] for p in services["triton"]["spec"]["ports"]}["metrics"] == 8002
    # Off: no endpoint, no port, no annotation anywhere; annotations alone can be left out.
    off = workloads(render(tmp_path, sets=("metrics.enabled=false",)))
    assert not [n for n, w in off.items() if "SH_TELEMETRY_METRICS_PORT" in container_env(w) or "annotations" in w["spec"]["template"]["metadata"]]
    quiet = workloads(render(tmp_path, sets=("metrics.podAnnotations=false", "metrics.port=9100")))
    assert container_env(quiet["gateway"])["SH_TELEMETRY_METRICS_PORT"]["value"] == "9100"
    assert "annotations" not in quiet["gateway"]["spec"]["template"]["metadata"]
    # A component's own port on the metrics port, or the variable set by hand, is refused with the reason.
    for extra, complaint in (("components.ingest.ports.metrics=9000", "clashes with the metrics port"),
                             ("components.ingest.ports.http=9464", "clashes with the metrics port"),
                             ("components.ingest.env.SH_TELEMETRY_METRICS_PORT=1", "SH_TELEMETRY_METRICS_PORT is set by the chart")):
        proc = helm("template", "sh", str(CHART), "--set", extra)
        assert proc.returncode != 0 and complaint in proc.stderr, proc.stderr


def test_monitoring_reaches_the_metrics_ports_and_nobody_else_does(tmp_path):
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    docs = render(tmp_path, sets=("networkPolicy.monitoringFrom[0].podSelector.matchLabels.app\\.kubernetes\\.io/name=prometheus",))
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    labels = pod_labels(docs)
    for name in SERVICES:
        assert admitted(policies, labels[name], "metrics", prometheus), name
        assert not [s for s in labels if admitted(policies, labels[name], "metrics", labels[s])], name
        assert not admitted(policies, labels[name], "metrics", None), name
    assert admitted(policies, labels["triton"], "metrics", prometheus)


def test_service_monitor_and_grafana_dashboard_only_when_asked(tmp_path):
    docs = render(tmp_path)
    assert not [d for d in docs if d["kind"] == "ServiceMonitor" or d["metadata"]["name"].endswith("grafana-dashboard")]
    docs = render(tmp_path, CHART / "ci" / "monitoring-values.yaml")
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/part-of": "streamharness", "app.kubernetes.io/instance": "sh"}
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}]
    # It selects the Services that have a metrics port (the headless one has none: no pod twice).
    selected = [d for d in docs if d["kind"] == "Service" and selects(monitor["spec"]["selector"], d["metadata"]["labels"])]
    with_port = sorted(d["metadata"]["name"] for d in selected if any(p["name"] == "metrics" for p in d["spec"]["ports"]))
    assert with_port == sorted(f"sh-{n}" for n in (*SERVICES, "triton"))
    (dashboard,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "sh-grafana-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "StreamHarness"}
    shipped = json.loads((CHART / "dashboards" / "streamharness.json").read_text())
    assert json.loads(dashboard["data"]["streamharness.json"]) == shipped and shipped["uid"] == "streamharness"
