"""Deployment files: cluster.yaml, the KubeRay manifests in deploy/k8s/ and the Dockerfile.

No cluster is needed: cluster.yaml is checked against the JSON schema the installed Ray ships (and Ray's own
config preparation), the manifests are parsed and every config file, Python entry point and serve application
they reference must exist in this repository, and the retraining CronJob's script runs against a fake kubectl.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
K8S_DIR = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
SERVE_CONFIG = ROOT / "configs" / "serve_llava7b.yaml"

RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"


# ----------------------------------------------------------------------------------------------
# helpers


def load_docs(path: Path) -> list[dict[str, Any]]:
    """All non-empty YAML documents of a (multi-document) manifest."""
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def all_k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in load_docs(path)]


def embedded_rayjobs() -> list[tuple[str, dict[str, Any]]]:
    """RayJob templates stored as strings in ConfigMaps (created by the retraining CronJob)."""
    found = []
    for path, obj in all_k8s_objects():
        if obj["kind"] != "ConfigMap":
            continue
        for key, value in (obj.get("data") or {}).items():
            if key.endswith((".yaml", ".yml")):
                for doc in yaml.safe_load_all(value):
                    if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                        found.append((f"{path.name}:{obj['metadata']['name']}/{key}", doc))
    return found


def all_rayjobs() -> list[tuple[str, dict[str, Any]]]:
    direct = [(p.name, o) for p, o in all_k8s_objects() if o["kind"] == "RayJob"]
    return direct + embedded_rayjobs()


def objects_of_kind(kind: str) -> list[dict[str, Any]]:
    return [o for _, o in all_k8s_objects() if o["kind"] == kind]


def pod_templates(cluster_spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group name, pod spec) of the head and every worker group of a rayClusterSpec."""
    pods = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster_spec.get("workerGroupSpecs", [])]
    return pods


def ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = [(name, job["spec"]["rayClusterSpec"]) for name, job in all_rayjobs()]
    specs += [(o["metadata"]["name"], o["spec"]["rayClusterConfig"]) for o in objects_of_kind("RayService")]
    return specs


def config_files(command: str) -> list[Path]:
    """The `--config` file of a command and the YAML configs it names (e.g. retrain -> training.config)."""
    tokens = shlex.split(command)
    # A missing file is reported by check_command; here it is skipped.
    found = [ROOT / tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == "--config"]
    found = [path for path in found if path.is_file()]
    for path in found:
        for value in string_values(yaml.safe_load(path.read_text())):
            if value.endswith((".yaml", ".yml")) and (ROOT / value).is_file() and ROOT / value not in found:
                found.append(ROOT / value)
    return found


def string_values(tree: Any) -> list[str]:
    if isinstance(tree, dict):
        return [v for item in tree.values() for v in string_values(item)]
    if isinstance(tree, list):
        return [v for item in tree for v in string_values(item)]
    return [tree] if isinstance(tree, str) else []


def local_paths(command: str) -> set[str]:
    """Absolute local paths (model dirs, work dirs) in the configs a job command reads."""
    return {
        v
        for path in config_files(command)
        for v in string_values(yaml.safe_load(path.read_text()))
        if v.startswith("/")
    }


def covered(path: str, mount_points: list[str]) -> bool:
    return any(Path(path).is_relative_to(m) for m in mount_points)


def check_command(command: str, where: str) -> None:
    """Every `python -m MODULE` must be a module of this repo and every `--config PATH` a file in it."""
    tokens = shlex.split(command)
    modules = [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == "-m"]
    assert modules, f"{where}: no `python -m MODULE` in {command!r}"
    for module in modules:
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, f"{where}: module {module!r} does not exist ({command!r})"
        assert Path(spec.origin).resolve().is_relative_to(ROOT), (
            f"{where}: {module!r} resolves to {spec.origin}, outside this repository"
        )
    for i, token in enumerate(tokens[:-1]):
        if token == "--config":
            config = ROOT / tokens[i + 1]
            assert config.is_file(), f"{where}: config file {tokens[i + 1]} does not exist ({command!r})"
            assert isinstance(yaml.safe_load(config.read_text()), dict), (
                f"{where}: {config} is not a YAML mapping"
            )


# ----------------------------------------------------------------------------------------------
# cluster.yaml


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), f"the installed Ray ({ray.__version__}) ships no {path}"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def cluster_config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_matches_rays_schema(cluster_config, ray_schema):
    jsonschema.validate(cluster_config, ray_schema)


@pytest.mark.parametrize(
    "breakage",
    ["no provider", "unknown key", "max_workers as text", "node type without node_config", "bad resources"],
)
def test_schema_rejects_broken_cluster_yaml(cluster_config, ray_schema, breakage):
    """The schema check above can fail: broken copies of cluster.yaml do not validate."""
    broken = copy.deepcopy(cluster_config)
    if breakage == "no provider":
        del broken["provider"]
    elif breakage == "unknown key":
        broken["max_wrokers"] = 3
    elif breakage == "max_workers as text":
        broken["max_workers"] = "many"
    elif breakage == "node type without node_config":
        del broken["available_node_types"]["gpu_train"]["node_config"]
    elif breakage == "bad resources":
        broken["available_node_types"]["gpu_serve"]["resources"] = {"GPU": "one"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema)


def test_cluster_yaml_passes_rays_own_preparation(cluster_config):
    """What `ray up` does before launching: merge the AWS defaults, then Ray's validation (head type, worker counts)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster_config))
    validate_config(prepared)
    broken = copy.deepcopy(cluster_config)
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(broken))


def test_cluster_yaml_node_types(cluster_config):
    assert cluster_config["provider"]["type"] == "aws"
    for key in ("region", "availability_zone", "cache_stopped_nodes"):
        assert key in cluster_config["provider"], f"provider.{key} missing"
    assert cluster_config["auth"]["ssh_user"]
    types = cluster_config["available_node_types"]
    head = cluster_config["head_node_type"]
    workers = {name: t for name, t in types.items() if name != head}
    gpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    cpu = {
        n: t
        for n, t in workers.items()
        if not t["resources"].get("GPU") and t["resources"].get("CPU", 0) >= 1
    }
    assert gpu, "no GPU worker type (resources: {GPU: N})"
    assert cpu, "no CPU-only worker type for Ray Data preprocessing"
    for name, node_type in gpu.items():
        accel = [r for r in node_type["resources"] if r.startswith("accelerator_type:")]
        assert accel, f"GPU worker type {name} declares no accelerator_type:<GPU> resource"
    for name, node_type in workers.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], f"{name}: bad min/max_workers"
    assert sum(t["min_workers"] for t in workers.values()) <= cluster_config["max_workers"]


def test_cluster_yaml_installs_this_project(cluster_config):
    """The repo (file_mounts of `.`) is pip-installed on every node, in the Ray image the project runs on."""
    mounted = [remote for remote, local in cluster_config["file_mounts"].items() if local in (".", "./")]
    assert len(mounted) == 1, "file_mounts must sync the repository root ('.') to the nodes"
    setup = " ; ".join(cluster_config["setup_commands"])
    assert re.search(rf"pip install .*-e {re.escape(mounted[0])}(\s|$)", setup), (
        f"setup_commands must `pip install -e {mounted[0]}`: {setup!r}"
    )
    assert cluster_config["docker"]["image"] == RAY_IMAGE, (
        f"docker.image must be {RAY_IMAGE} (the installed Ray; `ray up` needs the same Ray version on both sides)"
    )


def test_cluster_yaml_mounts_the_local_paths_job_configs_use(cluster_config):
    """Absolute paths in the configs of the documented jobs are bind-mounted into the nodes' containers."""
    header = "\n".join(line[1:] for line in CLUSTER_YAML.read_text().splitlines() if line.startswith("#"))
    entrypoints = [
        job.split(" -- ", 1)[1] for job in re.findall(r"ray job submit (.*)", re.sub(r"\\\n\s*", " ", header))
    ]
    paths = {p for e in entrypoints for p in local_paths(e)}
    options = " ".join(cluster_config["docker"]["run_options"])
    mounts = [container for _, container in re.findall(r"-v (\S+):(\S+)", options)]
    missing = [p for p in paths if not covered(p, mounts)]
    assert not missing, (
        f"{missing} (used by job configs) are not mounted into the containers (docker.run_options -v)"
    )


def test_cluster_yaml_documents_commands_that_exist():
    """The header lists how to train, evaluate, retrain and serve; every module and config it names exists."""
    header = "\n".join(
        line[1:].strip() for line in CLUSTER_YAML.read_text().splitlines() if line.startswith("#")
    )
    commands = re.sub(r"\\\n\s*", " ", header)  # join continued lines
    jobs = re.findall(r"ray job submit (.*)", commands)
    modules = set()
    for job in jobs:
        assert "--address" in job and "--working-dir ." in job, f"incomplete submit command: {job!r}"
        entrypoint = job.split(" -- ", 1)[1]
        check_command(entrypoint, "cluster.yaml")
        modules.add(shlex.split(entrypoint)[2])
    assert {"jobs.train", "jobs.evaluate", "jobs.retrain"} <= modules, f"submit commands found for {modules}"
    deploys = re.findall(r"serve deploy (\S+)", commands)
    assert deploys, "no `serve deploy` command in the header"
    for path in deploys:
        assert (ROOT / path).is_file(), f"cluster.yaml deploys {path}, which does not exist"


# ----------------------------------------------------------------------------------------------
# Kubernetes manifests


EXPECTED_KINDS = {
    "rayjob-train.yaml": {("ray.io/v1", "RayJob")},
    "rayservice.yaml": {("ray.io/v1", "RayService")},
    "cronjob-retrain.yaml": {
        ("batch/v1", "CronJob"),
        ("v1", "ServiceAccount"),
        ("rbac.authorization.k8s.io/v1", "Role"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"),
        ("v1", "ConfigMap"),
    },
    "configmap.yaml": {("v1", "ConfigMap")},
    "storage.yaml": {("v1", "PersistentVolumeClaim")},
}


def test_manifests_parse_with_expected_kinds():
    assert {p.name for p in manifest_files()} == set(EXPECTED_KINDS), (
        "deploy/k8s/ manifests changed: update the test"
    )
    for path in manifest_files():
        docs = load_docs(path)
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path.name}: incomplete object {doc}"
            assert doc["metadata"].get("name") or doc["metadata"].get("generateName"), f"{path.name}: unnamed"
        assert {(d["apiVersion"], d["kind"]) for d in docs} == EXPECTED_KINDS[path.name], path.name


def test_kustomization_lists_existing_manifests():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S_DIR / resource).is_file(), f"kustomization.yaml lists missing {resource}"
    # The RoleBinding must name the ServiceAccount in the namespace kustomize puts it in.
    (binding,) = objects_of_kind("RoleBinding")
    for subject in binding["subjects"]:
        assert subject["namespace"] == kustomization["namespace"]


def test_rayjob_entrypoints_reference_existing_modules_and_configs():
    jobs = all_rayjobs()
    entrypoints = {name: job["spec"]["entrypoint"] for name, job in jobs}
    assert any("jobs.train" in e for e in entrypoints.values()), entrypoints
    assert any("jobs.retrain" in e for e in entrypoints.values()), entrypoints
    for name, job in jobs:
        assert job["apiVersion"] == "ray.io/v1", name
        assert job["spec"]["shutdownAfterJobFinishes"] is True, (
            f"{name}: the GPU cluster must go away after the job"
        )
        check_command(job["spec"]["entrypoint"], name)


def test_ray_pods_run_the_project_image_with_mlflow_settings():
    images = set()
    configmaps = {o["metadata"]["name"]: o for o in objects_of_kind("ConfigMap")}
    workdir = re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    for name, cluster in ray_cluster_specs():
        assert cluster["rayVersion"] == ray.__version__, f"{name}: rayVersion must match the project's Ray"
        for group, pod in pod_templates(cluster):
            for container in pod["containers"]:
                where = f"{name}/{group}/{container['name']}"
                images.add(container["image"])
                assert container.get("workingDir") == workdir, (
                    f"{where}: workingDir must be the image's {workdir}"
                )
                env = {e["name"]: e for e in container.get("env", [])}
                assert "MLFLOW_TRACKING_URI" in env, f"{where}: no MLFLOW_TRACKING_URI"
                ref = env["MLFLOW_TRACKING_URI"]["valueFrom"]
                if "configMapKeyRef" in ref:
                    cm = ref["configMapKeyRef"]
                    assert cm["key"] in configmaps[cm["name"]]["data"], (
                        f"{where}: {cm} not defined in deploy/k8s"
                    )
                else:
                    assert "secretKeyRef" in ref, where
    assert len(images) == 1, f"all Ray pods (embedded RayJob template included) must use one image: {images}"


def test_job_pods_mount_the_local_paths_their_configs_use():
    """Absolute paths in a job's configs (model.init, run.work_dir, ...) exist on every pod: shared volumes."""
    claims = {o["metadata"]["name"] for o in objects_of_kind("PersistentVolumeClaim")}
    for name, job in all_rayjobs():
        paths = local_paths(job["spec"]["entrypoint"])
        for group, pod in pod_templates(job["spec"]["rayClusterSpec"]):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for container in pod["containers"]:
                mounts = container.get("volumeMounts", [])
                for mount in mounts:
                    claim = volumes[mount["name"]].get("persistentVolumeClaim")
                    assert claim is None or claim["claimName"] in claims, (
                        f"{name}/{group}: unknown PVC {claim}"
                    )
                missing = [p for p in paths if not covered(p, [m["mountPath"] for m in mounts])]
                assert not missing, (
                    f"{name}/{group}: {missing} (from the job's configs) are not on a mounted volume"
                )


def test_gpu_worker_groups_request_gpus():
    for name, cluster in ray_cluster_specs():
        gpus = 0
        for group, pod in pod_templates(cluster):
            for container in pod["containers"]:
                limits = container.get("resources", {}).get("limits", {})
                if group == "head":
                    assert "nvidia.com/gpu" not in limits, f"{name}: the head should not hold a GPU"
                gpus += int(limits.get("nvidia.com/gpu", 0))
        assert gpus >= 1, f"{name}: no worker group requests nvidia.com/gpu"
        for group in cluster["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (
                f"{name}/{group['groupName']}"
            )


def test_rayservice_serves_configs_serve_llava7b():
    (service,) = objects_of_kind("RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    expected = yaml.safe_load(SERVE_CONFIG.read_text())
    got_apps = {a["name"]: a for a in embedded["applications"]}
    want_apps = {a["name"]: a for a in expected["applications"]}
    assert got_apps.keys() == want_apps.keys()
    for name, app in want_apps.items():
        module, _, attr = app["import_path"].partition(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None and attr, f"serve import_path {app['import_path']} does not exist"
        assert got_apps[name]["import_path"] == app["import_path"]
    assert embedded == expected, (
        "spec.serveConfigV2 of deploy/k8s/rayservice.yaml differs from configs/serve_llava7b.yaml: "
        "copy the config (without its comments) into serveConfigV2"
    )
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True, (
        "Serve autoscaling needs the Ray autoscaler to add GPU pods"
    )
    autoscaled = [
        d for a in embedded["applications"] for d in a.get("deployments", []) if "autoscaling_config" in d
    ]
    assert autoscaled, "no Serve deployment has an autoscaling_config"


def test_rayservice_requires_the_api_key_secret():
    """Every serving pod reads the API key from the Secret, required (no `optional: true`): a cluster without the
    key does not start, and the app does not opt out of auth."""
    (service,) = objects_of_kind("RayService")
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args.get("auth", "api_key") == "api_key", "the production app must require an API key"
    key_env = args.get("api_key_env", "DPN_API_KEY")
    for group, pod in pod_templates(service["spec"]["rayClusterConfig"]):
        for container in pod["containers"]:
            where = f"{group}/{container['name']}"
            env = {e["name"]: e for e in container.get("env", [])}
            assert key_env in env, f"{where}: no {key_env}: the ingress would refuse to start"
            ref = env[key_env]["valueFrom"]["secretKeyRef"]
            assert ref["key"] == key_env and ref.get("optional") is not True, f"{where}: {ref}"
            for source in container.get("envFrom", []):
                assert source.get("secretRef", {}).get("optional") is not True, f"{where}: optional secret"


def test_retrain_cronjob_wiring():
    (cron,) = objects_of_kind("CronJob")
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5, f"not a cron schedule: {spec['schedule']}"
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert spec["jobTemplate"]["spec"]["backoffLimit"] == 0, "a retried pod would start a second retraining"
    (role,) = objects_of_kind("Role")
    (binding,) = objects_of_kind("RoleBinding")
    (account,) = objects_of_kind("ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == account["metadata"]["name"]
    rayjob_rules = [r for r in role["rules"] if "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"]]
    assert rayjob_rules and {"create", "get"} <= set(rayjob_rules[0]["verbs"])
    # The pod's script and the RayJob template come from the mounted ConfigMap.
    (volume,) = pod["volumes"]
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    assert mount["name"] == volume["name"]
    data = next(
        o for o in objects_of_kind("ConfigMap") if o["metadata"]["name"] == volume["configMap"]["name"]
    )["data"]
    script_path = Path(container["command"][-1])
    assert script_path.parent == Path(mount["mountPath"]) and script_path.name in data
    assert f"{mount['mountPath']}/rayjob-retrain.yaml" in data[script_path.name]
    ((_, template),) = embedded_rayjobs()
    assert "generateName" in template["metadata"] and "name" not in template["metadata"], (
        "the RayJob template is created once per run: it needs metadata.generateName, not a fixed name"
    )


# ----------------------------------------------------------------------------------------------
# the CronJob's script, against a fake kubectl


FAKE_KUBECTL = """#!/bin/sh
# Fake kubectl: logs its arguments, answers like KubeRay for one RayJob that reaches $FINAL_STATUS.
echo "$*" >> "$STATE_DIR/calls"
case "$1" in
  create) echo dpn-retrain-abc12 ;;
  get)
    if [ "$2" = rayjobs ]; then printf 'rayjob.ray.io/old-%s\\n' 1 2 3 4 5 6 7 8 9 10 11 12; exit 0; fi
    n=$(cat "$STATE_DIR/polls" 2>/dev/null || echo 0)
    case "$*" in
      *jobDeploymentStatus*) n=$((n + 1)); echo $n > "$STATE_DIR/polls"
        if [ $n -ge 3 ]; then echo "$FINAL_DEPLOYMENT"; else echo Running; fi ;;
      *jobStatus*) if [ $n -ge 3 ]; then echo "$FINAL_STATUS"; else echo RUNNING; fi ;;
    esac ;;
  delete) ;;
esac
"""


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
@pytest.mark.parametrize(
    ("deployment", "status", "rc"), [("Complete", "SUCCEEDED", 0), ("Failed", "FAILED", 1)]
)
def test_retrain_script_waits_for_the_rayjob(tmp_path, deployment, status, rc):
    (config_map,) = [o for o in objects_of_kind("ConfigMap") if o["metadata"]["name"] == "dpn-retrain-rayjob"]
    script = config_map["data"]["submit.sh"].replace("/etc/dpn/", f"{tmp_path}/")
    (tmp_path / "submit.sh").write_text(script)
    (tmp_path / "rayjob-retrain.yaml").write_text(config_map["data"]["rayjob-retrain.yaml"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "STATE_DIR": str(tmp_path),
        "POLL_SECONDS": "0",
        "FINAL_DEPLOYMENT": deployment,
        "FINAL_STATUS": status,
    }
    result = subprocess.run(
        ["sh", str(tmp_path / "submit.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == rc, result.stdout + result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].startswith(f"create -f {tmp_path}/rayjob-retrain.yaml")
    assert int((tmp_path / "polls").read_text()) == 3, "the script must poll until the RayJob finished"
    deleted = [c for c in calls if c.startswith("delete")]
    assert deleted == ["delete rayjob.ray.io/old-1 rayjob.ray.io/old-2"], "must keep the 10 newest RayJobs"
    if rc:
        assert f"jobStatus={status}" in result.stderr, "the failure must say how the RayJob ended"


# ----------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_builds_on_the_matching_ray_image_and_installs_the_project():
    text = DOCKERFILE.read_text()
    arg = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.M)
    assert arg and arg.group(1) == RAY_IMAGE, (
        f"base image must be {RAY_IMAGE} (the installed Ray, Python 3.11)"
    )
    assert re.search(r"^FROM \$\{RAY_IMAGE\}", text, re.M)
    assert re.search(r"^COPY .*\. \.$", text, re.M), (
        "the image must contain the repository (configs/ included)"
    )
    assert re.search(r"pip install[^\n]*-e \.", text), (
        "the project must be pip-installed (editable: jobs read configs/)"
    )
    ignored = (ROOT / ".dockerignore").read_text().split()
    packages = ("dpn_model", "pipelines", "tracking", "serve_apps", "jobs", "dpn_cli")
    for required in ("pyproject.toml", "configs", *packages):
        assert required not in ignored, f".dockerignore excludes {required}, which the image needs"
