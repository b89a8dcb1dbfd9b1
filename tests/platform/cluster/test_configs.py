"""The cluster definitions are valid and pin exactly the project's versions.

* ``cluster.yaml`` and ``deploy/onprem.yaml`` go through Ray's own cluster-launcher validation: the raw
  file against ``ray/autoscaler/ray-schema.json`` (which rejects unknown keys such as a global
  ``min_workers``), then ``prepare_config`` + ``validate_config``, the same steps ``ray up`` runs before
  touching any machine. ``prepare_config`` only merges the provider's bundled ``defaults.yaml`` (AWS
  included): it needs neither boto3 nor credentials, so this runs offline. What it cannot check is
  anything on AWS itself (AMIs, quotas, whether the image tag has been published).
* The KubeRay manifests have no schema here (the CRDs live in the cluster), so the fields KubeRay
  needs are checked by hand.
* Every ``name==version`` pin and every ``rayproject/ray`` image tag must agree with pyproject.toml.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
LAUNCHER_CONFIGS = ["cluster.yaml", "deploy/onprem.yaml"]
KUBERAY = ["deploy/kuberay/raycluster.yaml", "deploy/kuberay/rayjob.yaml"]
PINNED_FILES = [*LAUNCHER_CONFIGS, *KUBERAY, "deploy/README.md"]
CORE = ("torch", "ray", "mlflow")

PIN_RE = re.compile(r"(?<![\w.-])(?P<name>[A-Za-z][A-Za-z0-9._-]*)(?P<extras>\[[^\]\s]*\])?"
                    r"==(?P<version>[0-9][^\s\"',;)]*)")
IMAGE_RE = re.compile(r"rayproject/ray:(?P<version>[0-9][0-9.]*)-py(?P<py>[0-9]+)(?P<gpu>-gpu)?\b")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(text: str) -> list[tuple[str, str, str]]:
    return [(_norm(m["name"]), m["extras"] or "", m["version"]) for m in PIN_RE.finditer(text)]


@pytest.fixture(scope="module")
def project() -> dict:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for dep in data["dependencies"]:
        found = _pins(dep)
        assert len(found) == 1, f"pyproject dependency {dep!r} is not pinned with =="
        name, extras, version = found[0]
        pins[name] = (extras, version)
    py = re.search(r">=\s*3\.(\d+)", data["requires-python"])
    return {"pins": pins, "py": f"3{py.group(1)}"}


def _load(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text())


def _docs(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((REPO / rel).read_text()) if d]


# ---------------------------------------------------------------------------------------------------
# Ray cluster launcher configs


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_validation(rel):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(rel)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # the file as written: no unknown or misspelt keys
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` does before it starts anything
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_aws_cluster_layout():
    cfg = _load("cluster.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no work on the head
    cpu, gpu = types["cpu_worker"], types["gpu_worker"]
    assert cpu["resources"]["train_driver"] >= 1 and "GPU" not in cpu["resources"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1 and gpu["resources"]["GPU"] >= 1
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in cpu["node_config"]  # Tune drivers live on on-demand nodes
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]

    docker = cfg["docker"]
    assert IMAGE_RE.fullmatch(docker["image"]) and docker["image"].endswith("-gpu")
    # /dev/shm sized explicitly for every node type (Docker's default is 64 MB)
    shm = {"head": docker.get("head_run_options", [])}
    shm.update({n: t.get("docker", {}).get("worker_run_options", []) for n, t in types.items() if n != "head"})
    for name, options in shm.items():
        assert any(re.fullmatch(r"--shm-size=\d+g", o) for o in docker["run_options"] + options), name

    assert cfg["file_mounts"]["~/cascadelab"] == "."
    setup = " && ".join(cfg["setup_commands"])
    assert "pip install" in setup and "-e ~/cascadelab" in setup
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-host=0.0.0.0" in head_start
    mlflow = next(c for c in cfg["head_start_ray_commands"] if "mlflow server" in c)
    assert "--backend-store-uri sqlite:////" in mlflow and "--artifacts-destination s3://" in mlflow
    assert "--host 0.0.0.0" in mlflow and "--port 5000" in mlflow


def test_onprem_layout():
    cfg = _load("deploy/onprem.yaml")
    provider = cfg["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    assert "min_workers" not in cfg and cfg["max_workers"] == len(provider["worker_ips"])
    assert cfg["file_mounts"]["~/cascadelab"] == "."
    assert any("pip install -e ~/cascadelab" in c for c in cfg["setup_commands"])
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_start and "mlflow server" in head_start
    # jobs run `python -m ...`: Ray must be started from the environment that has the dependencies
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        start = next(c for c in cmds if "ray start" in c)
        assert "export PATH=$HOME/cascadelab-venv/bin:$PATH" in start and "RAY_AUTH_MODE=token" in start


# ---------------------------------------------------------------------------------------------------
# KubeRay manifests


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_cluster_spec(spec: dict, project: dict) -> None:
    assert spec["rayVersion"] == project["pins"]["ray"][1]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0"
    assert _containers(head["template"])[0]["name"] == "ray-head"
    groups = spec["workerGroupSpecs"]
    assert groups and all(g["groupName"] and "template" in g for g in groups)
    gpu_groups = [g for g in groups
                  if any(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
                         for c in _containers(g["template"]))]
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    for g in gpu_groups:
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1
        assert all(c["image"].endswith("-gpu") for c in _containers(g["template"]))
    for pod in [head["template"]] + [g["template"] for g in groups]:
        for c in _containers(pod):
            if c["name"].startswith("ray-"):
                assert "$KUBERAY_GEN_RAY_START_CMD" in " ".join(c["args"])  # overwrite-container-cmd
    assert spec["authOptions"]["mode"] == "token"


def test_kuberay_raycluster(project):
    docs = _docs("deploy/kuberay/raycluster.yaml")
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    spec = cluster["spec"]
    _check_cluster_spec(spec, project)
    assert spec["enableInTreeAutoscaling"] is True
    assert any(g["rayStartParams"].get("resources") for g in spec["workerGroupSpecs"])  # train_driver
    mlflow = next(c for c in _containers(spec["headGroupSpec"]["template"]) if c["name"] == "mlflow")
    assert "mlflow server" in mlflow["args"][0] and "sqlite:////" in mlflow["args"][0]
    # every claim used by a pod is defined, and the MLflow Service selects this cluster's head
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    used = {v["persistentVolumeClaim"]["claimName"] for p in pods for v in p["spec"].get("volumes", [])
            if "persistentVolumeClaim" in v}
    assert used and used <= claims
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    assert svc["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}


def test_kuberay_rayjob(project):
    from cascadelab.jobs import add_parser_of, submittable
    from cascadelab.platform.cluster.jobs import check_job_args

    (job,) = _docs("deploy/kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("cascadelab.jobs.")
    name = argv[2].removeprefix("cascadelab.jobs.")
    assert name in submittable()
    check_job_args(name, argv[3:], add_parser_of(name))  # the arguments parse with the job's own CLI
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip")
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    _check_cluster_spec(spec["rayClusterSpec"], project)


# ---------------------------------------------------------------------------------------------------
# versions


def test_installed_core_packages_match_the_pins(project):
    from importlib.metadata import version

    for name in CORE:
        assert version(name).split("+")[0] == project["pins"][name][1], name  # torch reports 2.13.0+cpu


@pytest.mark.parametrize("rel", PINNED_FILES)
def test_pinned_versions_equal_pyproject(rel, project):
    text = (REPO / rel).read_text()
    found = _pins(text)
    assert found, f"{rel} pins nothing"
    for name, extras, version in found:
        assert name in project["pins"], f"{rel}: {name}=={version} is not a pyproject dependency"
        want_extras, want_version = project["pins"][name]
        assert version == want_version, f"{rel}: {name}=={version}, pyproject has {want_version}"
        if name == "ray":
            assert extras == want_extras, f"{rel}: ray{extras}, pyproject has ray{want_extras}"
    if rel != "deploy/README.md":
        assert set(CORE) <= {n for n, _, _ in found}, f"{rel} does not pin all of {CORE}"


@pytest.mark.parametrize("rel", [*LAUNCHER_CONFIGS, *KUBERAY, "deploy/README.md"])
def test_ray_images_match_the_ray_pin(rel, project):
    text = (REPO / rel).read_text()
    images = list(IMAGE_RE.finditer(text))
    if rel in ("cluster.yaml", *KUBERAY):
        assert images, f"{rel} names no rayproject/ray image"
    for m in images:
        assert m["version"] == project["pins"]["ray"][1], m.group(0)
        assert m["py"] == project["py"], m.group(0)
