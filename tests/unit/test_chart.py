"""The Helm chart: lint --strict, render every ci/ scenario, validate the manifests offline
against the Kubernetes schemas (strict: unknown fields fail), reject bad values, and keep the
templates generic (components, and Jobs, differ only by their values). The Job manifests of
eval-jobs/ and training-jobs/ are validated the same way, and the commands they run are checked
against the CLI's options."""

from __future__ import annotations

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
    assert not [d for d in docs if d["kind"] == "StatefulSet" or d["metadata"]["name"].endswith("-headless")]


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
