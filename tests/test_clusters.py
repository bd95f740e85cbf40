"""Every file in clusters/ is read the way its tool reads it, offline, and none of them opens a
port to the internet or carries a key.

Launcher files (`ray up`) go through Ray's own schema exactly as `ray up` does, minus its two
cloud calls: `ray up` runs `prepare_config` (merge the provider's defaults.yaml, fold
setup_commands into head/worker_setup_commands, check the docker section, fill per-type worker
caps), then asks the cloud for instance resources, then `validate_config` (ray-schema.json and
the cross-field checks), then the provider's bootstrap (IAM, key pairs, subnets, security
groups). `prepare_config` and `validate_config` make no network calls, which a test here proves
by cutting the network while they run; the skipped resource fill-in only adds what `resources`
already states. Ray's schema stops at `node_config`, so the properties that matter inside it
(spot workers, identities, security groups) are checked here.

KubeRay manifests have no schema in any Python package: they are checked for the fields the
operator and Ray's KubeRay autoscaler read, and run through Ray's own (private) translation of a
RayCluster into an autoscaling config, which ends in the same `validate_config`.
"""

from __future__ import annotations

import copy
import re
import shlex
import socket
from pathlib import Path
from typing import Any

import click
import pytest
import ray
import torch
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from imder_sweep import tune as tune_cli
from imder_sweep.samplers import SOLVERS
from imder_sweep.sde import VESDE

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
DOCS = ROOT / "docs" / "cluster.md"
LOCAL = CLUSTERS / "local.md"

# Which validator claims each YAML file under clusters/ (paths relative to clusters/).
LAUNCHER = ("aws.yaml", "gcp.yaml")
RAYCLUSTER = "kuberay/raycluster.yaml"
RAYJOB = "kuberay/rayjob.yaml"
KUBERAY = (RAYCLUSTER, RAYJOB)

COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
PUBLISHED_MOSI_EPOCH_S = 259  # published code, H200, MR 0.5 (reference facts)


def read(name: str) -> str:
    return (CLUSTERS / name).read_text()


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load(read(name))


def manifests(name: str) -> dict[str, dict[str, Any]]:
    """The documents of a multi-document manifest, by kind (one of each)."""
    docs = [d for d in yaml.safe_load_all(read(name)) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), f"{name}: two documents of one kind"
    return by_kind


def pinned(prefix: str) -> str:
    """The version constraints.txt pins for `prefix` (e.g. 'torch')."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{prefix}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"constraints.txt pins no {prefix}")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network call during offline validation: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# --- every file is claimed ---------------------------------------------------------------------


def test_every_cluster_yaml_has_a_validator() -> None:
    found = {p.relative_to(CLUSTERS).as_posix() for p in CLUSTERS.rglob("*.y*ml")}
    claimed = set(LAUNCHER) | set(KUBERAY)
    assert found - claimed == set(), "add these files to a validator in tests/test_clusters.py"
    assert claimed - found == set(), "claimed files are missing"


# --- launcher files: Ray's own schema ----------------------------------------------------------


@pytest.fixture(params=LAUNCHER)
def launcher(request: pytest.FixtureRequest, no_network: None) -> dict[str, Any]:
    """The file as `ray up` holds it right before validation (prepared, validated)."""
    config = prepare_config(copy.deepcopy(load(request.param)))
    validate_config(config)
    return config


def test_offline_validation_is_offline(no_network: None) -> None:
    """The launcher fixture validates with the network cut: prove the cut holds."""
    with pytest.raises(AssertionError, match="network call"):
        socket.create_connection(("127.0.0.1", 9))
    with pytest.raises(AssertionError, match="network call"):
        socket.socket().connect(("127.0.0.1", 9))


def test_ray_schema_rejects_a_mistake(no_network: None) -> None:
    """The validator is live: an unknown key and a wrong head type fail as `ray up` would."""
    import jsonschema

    raw = load("aws.yaml")
    raw["available_node_types"]["gpu-1"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(raw))
    raw = load("aws.yaml")
    raw["head_node_type"] = "gpu"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(raw))


def test_cpu_head_and_gpu_workers_from_zero(launcher: dict[str, Any]) -> None:
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0
    workers = {k: v for k, v in types.items() if k != launcher["head_node_type"]}
    gpus = sorted(w["resources"]["GPU"] for w in workers.values())
    assert gpus == [1, 8], "one 1-GPU and one 8-GPU worker type"
    for name, worker in workers.items():
        assert worker["min_workers"] == 0, name
        assert 0 < worker["max_workers"] <= launcher["max_workers"], name
        # mr.yaml: 2 CPUs per trial, 0.25 GPU: four trials per GPU need 8 CPUs per GPU.
        assert worker["resources"]["CPU"] >= 8 * worker["resources"]["GPU"], name


def _is_spot(provider: str, node_config: dict[str, Any]) -> bool:
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    assert isinstance(scheduling, dict), "GCE wants scheduling as an object (ray#46248)"
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible", False)


def test_spot_workers_on_demand_head(launcher: dict[str, Any]) -> None:
    provider = launcher["provider"]["type"]
    for name, node_type in launcher["available_node_types"].items():
        is_head = name == launcher["head_node_type"]
        assert _is_spot(provider, node_type["node_config"]) is not is_head, name


def test_nodes_use_cloud_identities_not_keys(launcher: dict[str, Any]) -> None:
    field = {"aws": "IamInstanceProfile", "gcp": "serviceAccounts"}[launcher["provider"]["type"]]
    for name, node_type in launcher["available_node_types"].items():
        assert field in node_type["node_config"], f"{name}: no {field}"


def test_network_is_ours_not_rays_default(launcher: dict[str, Any]) -> None:
    """Ray's auto-created AWS security group always opens SSH to every address; GCE nodes get
    the firewall of whatever network they land in. Both files name their own."""
    assert "security_group" not in launcher["provider"]
    for name, node_type in launcher["available_node_types"].items():
        node_config = node_type["node_config"]
        if launcher["provider"]["type"] == "aws":
            assert node_config.get("SecurityGroupIds"), name
        else:
            assert node_config.get("networkInterfaces"), name
            assert "imder-ray" in node_config["tags"]["items"], name


def test_token_auth_and_environment_on_every_node(launcher: dict[str, Any]) -> None:
    assert "~/.ray/auth_token" in launcher["file_mounts"]
    for role in ("head", "worker"):
        commands = "\n".join(launcher[f"{role}_setup_commands"])
        for variable in ("RAY_AUTH_MODE=token", "MLFLOW_TRACKING_URI=", "IMDER_STORAGE_PATH="):
            assert variable in commands, f"{role}: {variable}"


def test_package_and_pins_on_every_node(launcher: dict[str, Any]) -> None:
    # The cluster runs the Ray this repo is tested with, which is also the Ray `ray up` wants on
    # your machine; upgrading Ray here means updating the image tags and pins in clusters/.
    version = ray.__version__
    for role in ("head", "worker"):
        commands = "\n".join(launcher[f"{role}_setup_commands"])
        assert '"imder-sweep @ git+https://github.com/' in commands, role
        assert f'"ray[default,tune,train]=={version}"' in commands, role
        assert f"torch=={pinned('torch')}" in commands, role
    docker = launcher["docker"]
    for image in (docker["image"], docker["head_image"]):
        assert image.startswith(f"rayproject/ray:{version}-"), image
    assert docker["head_image"] != docker["image"], "the CPU head needs no CUDA image"


# --- KubeRay manifests -------------------------------------------------------------------------


def _check_cluster_spec(spec: dict[str, Any], where: str) -> None:
    assert spec["rayVersion"] == ray.__version__, where
    assert spec["enableInTreeAutoscaling"] is True, where
    assert spec["authOptions"]["mode"] == "token", where
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
    pods = [("head", head["template"]["spec"])]
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        name = group["groupName"]
        assert isinstance(group["rayStartParams"], dict), f"{where}/{name}"
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        pods.append((name, group["template"]["spec"]))
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)) > 0:
            gpu_groups.append(group)
    assert gpu_groups, f"{where}: no worker group with an nvidia.com/gpu limit"
    assert all(g["minReplicas"] == 0 for g in gpu_groups), f"{where}: GPU groups from zero"
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits, f"{where}: GPU on the head"
    for name, pod in pods:
        container = pod["containers"][0]
        assert container["image"].startswith(f"rayproject/ray:{ray.__version__}"), name
        assert pod["serviceAccountName"] == "imder-ray", f"{where}/{name}: identity, not keys"
        assert all("hostPort" not in p for p in container.get("ports", [])), name


def test_raycluster_manifest() -> None:
    docs = manifests(RAYCLUSTER)
    cr = docs["RayCluster"]
    assert cr["apiVersion"] == "ray.io/v1" and cr["metadata"]["name"]
    _check_cluster_spec(cr["spec"], RAYCLUSTER)
    assert docs["ServiceAccount"]["metadata"]["name"] == "imder-ray"


def test_rayjob_manifest_runs_the_sweep_on_the_same_cluster() -> None:
    job = manifests(RAYJOB)["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert "imder_sweep.tune" in spec["entrypoint"] and "--space" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(spec["rayClusterSpec"], RAYJOB)
    assert spec["rayClusterSpec"] == manifests(RAYCLUSTER)["RayCluster"]["spec"]
    assert manifests(RAYJOB)["ServiceAccount"] == manifests(RAYCLUSTER)["ServiceAccount"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert f"torch=={pinned('torch')}" in runtime_env["pip"]["packages"]


def test_rayjob_entrypoint_parses_with_the_sweep_cli() -> None:
    entrypoint = shlex.split(manifests(RAYJOB)["RayJob"]["spec"]["entrypoint"])
    assert entrypoint[:3] == ["python", "-m", "imder_sweep.tune"]
    args = _parse_tune(entrypoint[3:])
    assert args.space == "search_spaces/mr.yaml"
    assert args.data.startswith("s3://") and args.storage_path.startswith("s3://")


@pytest.mark.parametrize("where", ["RayCluster", "RayJob"])
def test_rays_kuberay_autoscaler_reads_the_manifest(where: str) -> None:
    try:
        from ray.autoscaler._private.kuberay.autoscaling_config import (
            _derive_autoscaling_config_from_ray_cr as derive,
        )
    except ImportError:  # private API: gone in some later Ray, the checks above still hold
        pytest.skip("this Ray has no _derive_autoscaling_config_from_ray_cr")
    if where == "RayCluster":
        cr = manifests(RAYCLUSTER)["RayCluster"]
    else:
        job = manifests(RAYJOB)["RayJob"]
        cr = {"metadata": {"name": job["metadata"]["name"]}, "spec": job["spec"]["rayClusterSpec"]}
    cr = copy.deepcopy(cr)
    # The operator reads the namespace from the API server; the manifests leave it to kubectl.
    cr["metadata"].setdefault("namespace", "default")
    config = derive(cr)  # ends in validate_config, like the launcher files
    types = config["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert "GPU" not in types["headgroup"]["resources"]
    assert types["gpu-1"]["resources"]["GPU"] == 1
    assert types["gpu-1"]["resources"]["CPU"] == 8
    assert types["gpu-1"]["min_workers"] == 0 < types["gpu-1"]["max_workers"]


# --- security: nothing open, nothing secret ----------------------------------------------------

KEY_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS credentials-file secret": re.compile(r"aws_secret_access_key"),
    "a literal secret key value": re.compile(r"AWS_SECRET_ACCESS_KEY\s*[=:]\s*[^\s$%'\"]"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}


def _all_cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTERS.rglob("*") if p.is_file())


@pytest.mark.parametrize("path", _all_cluster_files(), ids=lambda p: p.name)
def test_no_secrets_in_cluster_files(path: Path) -> None:
    text = path.read_text()
    for what, pattern in KEY_PATTERNS.items():
        assert not pattern.search(text), f"{path.name}: {what}"
    assert "RAY_AUTH_MODE=disabled" not in text, f"{path.name}: token auth turned off"


@pytest.mark.parametrize("path", _all_cluster_files(), ids=lambda p: p.name)
def test_nothing_open_to_the_internet(path: Path) -> None:
    text = path.read_text()
    assert "0.0.0.0/0" not in text and "::/0" not in text, path.name
    if path.suffix != ".yaml":
        return
    for doc in yaml.safe_load_all(text):
        for node in _walk(doc):
            # Cloud firewall rules in the file (AWS IpPermissions, GCE firewall-like sourceRanges)
            # must not reach the dashboard or MLflow ports.
            ports = {node.get(k) for k in ("FromPort", "ToPort", "port", "containerPort")}
            if node.get("IpRanges") or node.get("sourceRanges"):
                assert not ports & {8265, 5000}, f"{path.name}: {node}"
            assert node.get("type") not in ("LoadBalancer", "NodePort"), path.name
            assert node.get("kind") not in ("Ingress", "Service", "Secret"), path.name


def _walk(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        return [node, *(d for v in node.values() for d in _walk(v))]
    if isinstance(node, list):
        return [d for v in node for d in _walk(v)]
    return []


# --- docs: placeholders explained, commands real, costs consistent -----------------------------


def test_every_placeholder_is_explained_in_the_docs() -> None:
    used = set()
    for path in _all_cluster_files():
        used |= set(re.findall(r"YOUR_[A-Z0-9_]+", path.read_text()))
    table = DOCS.read_text().split("## 2.")[0]
    explained = set(re.findall(r"`(YOUR_[A-Z0-9_]+)`", table))
    assert used - explained == set()


def _bash_blocks(path: Path) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.DOTALL)
    return [line for b in blocks for line in b.replace("\\\n", " ").splitlines() if line.strip()]


def _launcher_commands(name: str) -> list[str]:
    raw = load(name)
    commands = [c for key in COMMAND_KEYS for c in raw.get(key, [])]
    for node_type in raw["available_node_types"].values():
        commands += node_type.get("initialization_commands", [])
    return commands


def _simple_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, each cut at its first operator or redirection."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current, cut = [], [], False
    for token in lexer:
        if token in (";", "&&", "||", "|", "&"):
            commands.append(current)
            current, cut = [], False
        elif cut or (token and set(token) <= set("<>&|()")):
            cut = True
        else:
            current.append(token)
    commands.append(current)
    # Drop `VAR=value` prefixes and `nohup`, which only change how the command runs.
    out = []
    for command in commands:
        while command and (
            re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", command[0]) or command[0] == "nohup"
        ):
            command = command[1:]
        if command:
            out.append(command)
    return out


def _click_options(group: click.Group, words: list[str], where: str) -> list[str]:
    command: click.Command = group
    rest = list(words)
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        command = command.commands[rest.pop(0)]
    assert not isinstance(command, click.Group), f"{where}: no such command {words}"
    known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    unknown = []
    for word in rest:
        if word == "--":
            break
        if word.startswith("-") and word.split("=", 1)[0] not in known:
            unknown.append(word)
    return unknown


def _parse_tune(argv: list[str]) -> Any:
    try:
        return tune_cli.parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"python -m imder_sweep.tune rejects {argv}") from exc


def _documented_commands() -> list[tuple[str, list[str]]]:
    lines = [(name, c) for name in LAUNCHER for c in _launcher_commands(name)]
    lines += [(p.name, line) for p in (DOCS, LOCAL) for line in _bash_blocks(p)]
    return [(where, cmd) for where, line in lines for cmd in _simple_commands(line)]


# Ray's CLI module imports Serve, whose pydantic models warn on import.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_documented_ray_and_mlflow_commands_exist() -> None:
    from mlflow.cli import cli as mlflow_cli
    from ray.scripts.scripts import cli as ray_cli

    checked = 0
    for where, command in _documented_commands():
        if command[0] == "ray":
            assert not _click_options(ray_cli, command[1:], where), f"{where}: {command}"
        elif command[0] == "mlflow":
            assert not _click_options(mlflow_cli, command[1:], where), f"{where}: {command}"
        else:
            continue
        checked += 1
    assert checked >= 15, "the command scan found too little: is the parsing broken?"


def test_documented_sweep_commands_parse() -> None:
    sweeps = 0
    for where, command in _documented_commands():
        if "imder_sweep.tune" in command:
            start = command.index("imder_sweep.tune") + 1
            assert command[start - 3 : start - 1] == ["python", "-m"], where
            _parse_tune(command[start:])
            sweeps += 1
    assert sweeps >= 4


def _sampler_nfe(solver: str, steps: int) -> int:
    """Score evaluations of one recovery, counted by running the solver on a tiny input."""
    calls = []

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.zeros_like(x)

    result = SOLVERS[solver](score, VESDE(25.0), torch.zeros(1, 2), steps, noise=torch.zeros_like)
    assert result.nfe == len(calls)
    return result.nfe


def test_cost_table_follows_the_mr_space() -> None:
    """docs/cluster.md's GPU-hours: epochs from mr.yaml, and the published epoch time scaled by
    the NFE a trial draws (100 in the published code): mean over the space's solver x steps
    choices, and the largest."""
    space = yaml.safe_load((ROOT / "search_spaces" / "mr.yaml").read_text())
    studies = len(space["studies"]["mr"])
    trials = space["search"]["num_samples"]
    epochs = space["fixed"]["train"]["epochs"]
    seeds = space["final"]["seeds"]
    text = DOCS.read_text()
    search, final = studies * trials * epochs, studies * seeds * epochs
    assert f"{studies} x {trials} x {epochs} = {search}" in text
    assert f"{studies} x {seeds} x {epochs} = {final}" in text
    nfe = [
        _sampler_nfe(solver, steps)
        for solver in space["space"]["model.sampler.solver"]["choice"]
        for steps in space["space"]["model.sampler.steps"]["choice"]
    ]
    hours = [
        round((search + final) * PUBLISHED_MOSI_EPOCH_S / 3600 * n / 100)
        for n in (100, sum(nfe) / len(nfe), max(nfe))
    ]
    assert (
        f"| **total** | {search + final} | **{hours[0]}** | **{hours[1]}** | **{hours[2]}** |"
        in text
    )
    assert f"{round(sum(nfe) / len(nfe))} on average" in text
    assert f"{PUBLISHED_MOSI_EPOCH_S} s per MOSI epoch" in text
