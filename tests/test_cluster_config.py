"""ray_cluster.yaml through Ray's own validator (offline) and our rules; the KubeRay manifests' required fields."""
import copy
import json
import re
import shlex
import socket
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.ray_init import PRELOAD

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "cluster" / "k8s"
AWS_KEY = re.compile(r"(AKIA|ASIA)[0-9A-Z]{16}|aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{16,}", re.IGNORECASE)
PINNED = re.compile(r"==[0-9]|@ ?git\+\S+@[0-9a-f]{40}$")


@pytest.fixture
def offline(monkeypatch):
    """No AWS SDK and no network: what validation may not touch."""
    for name in ("boto3", "botocore"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError

    def refuse(*args, **kwargs):
        raise AssertionError("network access during offline validation")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _config() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def _validated(config: dict) -> dict:
    """What `ray up` checks before it calls AWS: provider defaults merged, schema and cross-field rules."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_ray_cluster_yaml_passes_rays_validator_offline(offline):
    prepared = _validated(_config())
    assert prepared["provider"]["type"] == "aws"


BREAKAGES = {  # a broken copy of ray_cluster.yaml -> what Ray's validator says
    "misspelled key": (lambda c: c.update(max_workerz=c.pop("max_workers")), "'max_workerz' was unexpected"),
    "wrong type": (lambda c: c["available_node_types"]["gpu_1x"].update(min_workers="one"), "not of type 'integer'"),
    "unknown head type": (lambda c: c.update(head_node_type="cpu_head"), "must be one of `available_node_types`"),
    "too few max_workers": (lambda c: c.update(max_workers=0), "smaller than the sum of `min_workers`"),
    "no resources": (lambda c: c["available_node_types"]["gpu_4x"].pop("resources"), "'resources' is a required"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_broken_copies_fail_the_validator(offline, breakage):
    config = _config()
    breaks, message = BREAKAGES[breakage]
    breaks(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        _validated(config)


def _violations(prepared: dict, text: str) -> list[str]:
    """Our rules on top of Ray's: no keys, everything pinned, a head without work, GPU types that autoscale."""
    found = ["AWS keys in the file: use the instance profile"] if AWS_KEY.search(text) else []
    commands = dict.fromkeys(c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                           "worker_setup_commands") for c in prepared[key])  # merged: repeats
    installs = [c for c in commands if "pip install" in c]
    found += [] if installs else ["setup does not install the package"]
    for command in installs:
        words = shlex.split(command.replace("~", "HOME"))
        requirements = [w for w in words[words.index("install") + 1:] if not w.startswith(("-", "HOME/"))]
        if not requirements or not all(PINNED.search(r) for r in requirements):
            found.append(f"unpinned install: {command}")
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]["resources"]
    if head.get("CPU") != 0 or head.get("GPU"):
        found.append("the head takes work (resources must be CPU 0, no GPU)")
    gpus = {name: t["resources"].get("GPU", 0) for name, t in types.items() if name != prepared["head_node_type"]}
    if not gpus or min(gpus.values()) != 1 or max(gpus.values()) < 2:
        found.append("want a single-GPU and a multi-GPU worker type")
    found += [f"{n} does not autoscale" for n in gpus if not types[n]["max_workers"] > types[n]["min_workers"] >= 0]
    found += [f"{n} has no instance profile" for n, t in types.items() if "IamInstanceProfile" not in t["node_config"]]
    if "--dashboard-host=127.0.0.1" not in " ".join(prepared["head_start_ray_commands"]):
        found.append("the dashboard listens beyond localhost")
    found += [f"{key} without token auth" for key in ("head_start_ray_commands", "worker_start_ray_commands")
              if "RAY_AUTH_MODE=token" not in " ".join(prepared[key])]
    return found


def test_ray_cluster_yaml_is_secure_and_pinned(offline):
    text = (REPO / "ray_cluster.yaml").read_text()
    prepared = _validated(_config())  # Ray's defaults merged in: their commands must be pinned too
    assert _violations(prepared, text) == []
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--object-spilling-directory" in head_start and "--object-store-memory" in head_start
    system_config = json.loads(re.search(r"--system-config='([^']*)'", head_start).group(1))
    assert system_config["preload_python_modules"] == PRELOAD
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the token file, never the token
    pins = [line for line in (REPO / "cluster" / "constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert "ray==2.60.0" in pins and all(re.fullmatch(r"[A-Za-z0-9_.-]+==\S+", p) for p in pins)


def test_our_rules_catch_a_broken_copy(offline):
    config = _config()
    config["setup_commands"].append("pip install torch")
    config["available_node_types"]["head"]["resources"] = {"CPU": 8}
    config["available_node_types"]["gpu_4x"]["resources"]["GPU"] = 1
    config["head_start_ray_commands"] = ["ray start --head --dashboard-host=0.0.0.0"]
    text = yaml.safe_dump(config) + "\n# aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
    found = _violations(_validated(config), text)
    assert [f.split(":")[0].split(" (")[0] for f in found] == [
        "AWS keys in the file", "unpinned install", "the head takes work",
        "want a single-GPU and a multi-GPU worker type", "the dashboard listens beyond localhost",
        "head_start_ray_commands without token auth"]


def _manifests() -> dict[str, list[dict]]:
    return {p.name: list(yaml.safe_load_all(p.read_text())) for p in sorted(K8S.glob("*.yaml"))}


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == "2.60.0", where
    assert spec["authOptions"]["mode"] == "token", where
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and head["rayStartParams"].get("num-cpus") == "0", where
    pods = [head["template"]]
    groups = spec["workerGroupSpecs"]
    assert groups, where
    for group in groups:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict), where
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, f"{where}: worker group {group['groupName']} has no GPU"
        pods.append(group["template"])
    for pod in pods:
        assert pod["spec"]["serviceAccountName"], where  # S3 through the service account's role
        container = pod["spec"]["containers"][0]
        assert container["image"] and container["resources"]["limits"]["memory"], where
        for env in container.get("env", []):  # secrets only by reference
            assert "value" not in env or not re.search("SECRET|TOKEN|KEY", env["name"]), f"{where}: {env['name']}"


def test_kuberay_manifests_carry_the_required_fields():
    manifests = _manifests()
    assert {"raycluster.yaml", "rayjob-train.yaml", "rayjob-score.yaml"} <= set(manifests)
    for name, docs in manifests.items():
        for doc in docs:
            assert doc["metadata"]["name"], name
            if doc["kind"] == "RayCluster":
                assert doc["apiVersion"] == "ray.io/v1"
                _check_cluster_spec(doc["spec"], name)
                assert doc["spec"]["enableInTreeAutoscaling"] is True
                assert any(g["maxReplicas"] > g["minReplicas"] for g in doc["spec"]["workerGroupSpecs"])
            elif doc["kind"] == "RayJob":
                assert doc["apiVersion"] == "ray.io/v1"
                spec = doc["spec"]
                assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")
                assert spec["shutdownAfterJobFinishes"] is True and "rayClusterSpec" in spec
                _check_cluster_spec(spec["rayClusterSpec"], name)
            else:
                assert doc["kind"] == "ServiceAccount", name
    entrypoints = {n: d[0]["spec"]["entrypoint"] for n, d in manifests.items() if n.startswith("rayjob-")}
    assert entrypoints["rayjob-train.yaml"].startswith("python -m jobs train ")
    assert entrypoints["rayjob-score.yaml"].startswith("python -m jobs score ")
    for path in K8S.iterdir():
        assert not AWS_KEY.search(path.read_text()), f"AWS keys in {path.name}"
