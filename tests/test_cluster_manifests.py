"""cluster/: every manifest parses and carries what a launch needs; the shell scripts are valid bash.

These check structure only (no Kubernetes or AWS here): the fields KubeRay / the cluster launcher require, the GPU
limits, the shared volume at the same path on head and workers, and MLflow/run-root settings from a ConfigMap or
Secret. The local scripts are exercised for real by tests/test_submit.py's slow test.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
SCRIPTS = sorted(CLUSTER.rglob("*.sh"))


def _docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _by_kind(path: Path, kind: str) -> dict:
    found = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.relative_to(ROOT)}: expected one {kind}, found {len(found)}"
    return found[0]


def _containers(pod_template: dict, where: str) -> list[dict]:
    cs = pod_template.get("spec", {}).get("containers") or []
    assert cs, f"{where}: no containers in the pod template"
    return cs


def _check_cluster_spec(spec: dict, where: str) -> None:
    """A RayCluster spec (also a RayJob's rayClusterSpec): head + GPU workers, shared volume, MLflow env."""
    head = spec.get("headGroupSpec")
    assert isinstance(head, dict), f"{where}: headGroupSpec missing"
    assert isinstance(head.get("rayStartParams"), dict), f"{where}: headGroupSpec.rayStartParams missing"
    head_cs = _containers(head.get("template", {}), f"{where}.headGroupSpec")
    for c in head_cs:
        assert c.get("image"), f"{where}: head container {c.get('name')} has no image"
    groups = spec.get("workerGroupSpecs")
    assert groups, f"{where}: workerGroupSpecs missing"
    gpu_groups = []
    for g in groups:
        gw = f"{where}.workerGroupSpecs[{g.get('groupName')}]"
        assert g.get("groupName"), f"{gw}: groupName missing"
        assert isinstance(g.get("rayStartParams"), dict), f"{gw}: rayStartParams missing"
        for c in _containers(g.get("template", {}), gw):
            assert c.get("image"), f"{gw}: container {c.get('name')} has no image"
            limits = (c.get("resources") or {}).get("limits") or {}
            if "nvidia.com/gpu" in limits:
                assert int(limits["nvidia.com/gpu"]) >= 1, f"{gw}: nvidia.com/gpu limit must be >= 1"
                gpu_groups.append(g)
    assert gpu_groups, f"{where}: no worker group with an nvidia.com/gpu limit"

    # the shared volume: a PVC mounted at the same path in the head and in every worker group
    def shared_mounts(template: dict, w: str) -> dict[str, str]:
        vols = {v["name"]: v for v in template.get("spec", {}).get("volumes") or []}
        pvc_vols = {n for n, v in vols.items() if "persistentVolumeClaim" in v}
        mounts = {}
        for c in _containers(template, w):
            for m in c.get("volumeMounts") or []:
                if m["name"] in pvc_vols:
                    mounts[vols[m["name"]]["persistentVolumeClaim"]["claimName"]] = m["mountPath"]
        assert mounts, f"{w}: no PersistentVolumeClaim volume mounted"
        return mounts

    head_mounts = shared_mounts(head["template"], f"{where}.headGroupSpec")
    for g in groups:
        gm = shared_mounts(g["template"], f"{where}.workerGroupSpecs[{g['groupName']}]")
        assert gm == head_mounts, (f"{where}: worker group {g['groupName']} mounts {gm}, the head mounts "
                                   f"{head_mounts}; shared storage must be at the same path everywhere")

    # MLflow tracking URI (and the run root) from a ConfigMap or Secret, in every container
    for name, template in [("head", head["template"])] + [(g["groupName"], g["template"]) for g in groups]:
        for c in _containers(template, f"{where}.{name}"):
            env = {e["name"]: e for e in c.get("env") or []}
            for var in ("MLFLOW_TRACKING_URI", "MEDVL_RUN_ROOT"):
                src = (env.get(var) or {}).get("valueFrom") or {}
                assert "configMapKeyRef" in src or "secretKeyRef" in src, \
                    f"{where}.{name}: {var} must come from a ConfigMap or Secret (valueFrom)"
            # token auth on by default, the explicit value agreeing with authOptions (KubeRay keeps an explicit
            # RAY_AUTH_MODE, so "disabled" here would silently switch authOptions off)
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", \
                f"{where}.{name}: RAY_AUTH_MODE must be set explicitly to token"
            tok = env.get("RAY_AUTH_TOKEN")
            assert tok is None or "secretKeyRef" in (tok.get("valueFrom") or {}), \
                f"{where}.{name}: RAY_AUTH_TOKEN must come from a Secret, never a literal"
    assert (spec.get("authOptions") or {}).get("mode") == "token", f"{where}: authOptions.mode must be token"


def test_cluster_dir_has_the_expected_files():
    for rel in ("local/start-head.sh", "local/start-worker.sh", "local/stop.sh", "kuberay/raycluster.yaml",
                "kuberay/rayjob.yaml", "kuberay/mlflow-config.yaml", "launcher/aws.yaml", "README.md"):
        assert (CLUSTER / rel).is_file(), f"cluster/{rel} missing"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses(path):
    docs = _docs(path)
    assert docs, f"{path}: no YAML documents"
    for d in docs:
        assert isinstance(d, dict), f"{path}: a document is not a mapping"


def test_raycluster():
    path = CLUSTER / "kuberay" / "raycluster.yaml"
    rc = _by_kind(path, "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["metadata"]["name"]
    _check_cluster_spec(rc["spec"], "RayCluster")
    # the PVC it mounts is defined in the same file and is ReadWriteMany
    pvc = _by_kind(path, "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "shared PVC must be ReadWriteMany"
    claim = rc["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert pvc["metadata"]["name"] in {v.get("persistentVolumeClaim", {}).get("claimName") for v in claim}
    assert rc["spec"]["headGroupSpec"]["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    assert rc["spec"]["authOptions"] == {"mode": "token"}  # KubeRay generates the token Secret


def test_rayjob():
    rj = _by_kind(CLUSTER / "kuberay" / "rayjob.yaml", "RayJob")
    assert rj["apiVersion"] == "ray.io/v1"
    spec = rj["spec"]
    assert "medvl.cli train jobs/" in spec["entrypoint"], "entrypoint must run a recipe from jobs/"
    recipe = spec["entrypoint"].split("medvl.cli train ", 1)[1].split()[0]
    assert (ROOT / recipe).is_file(), f"RayJob entrypoint names {recipe}, which is not in the repo"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    renv = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(renv, dict) and renv["env_vars"]["RAY_AUTH_MODE"]
    _check_cluster_spec(spec["rayClusterSpec"], "RayJob.rayClusterSpec")


def test_rayjob_entrypoint_recipe_and_overrides_validate():
    """The recipe + overrides the RayJob runs are valid (checked like `medvl submit` does, locally)."""
    import shlex

    from medvl.config import load_recipe
    rj = _by_kind(CLUSTER / "kuberay" / "rayjob.yaml", "RayJob")
    argv = shlex.split(rj["spec"]["entrypoint"])
    i = argv.index("train")
    recipe = load_recipe(ROOT / argv[i + 1], argv[i + 2:])
    workers = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert recipe.train.use_gpu and recipe.train.num_workers <= workers["maxReplicas"]


def test_mlflow_config_feeds_the_cluster():
    path = CLUSTER / "kuberay" / "mlflow-config.yaml"
    cm = _by_kind(path, "ConfigMap")
    secret = _by_kind(path, "Secret")
    assert cm["data"]["MLFLOW_TRACKING_URI"].startswith(("http://", "https://"))
    assert cm["data"]["MEDVL_RUN_ROOT"].startswith("/")
    assert set(secret["stringData"]) >= {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    # every configMapKeyRef / secretKeyRef in the cluster manifests points at a key defined here
    refs = {"configMapKeyRef": (cm["metadata"]["name"], set(cm["data"])),
            "secretKeyRef": (secret["metadata"]["name"], set(secret["stringData"]))}
    rc = _by_kind(CLUSTER / "kuberay" / "raycluster.yaml", "RayCluster")["spec"]
    rj = _by_kind(CLUSTER / "kuberay" / "rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]
    for spec in (rc, rj):
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for t in templates:
            for c in t["spec"]["containers"]:
                for e in c.get("env") or []:
                    for kind, (name, keys) in refs.items():
                        ref = (e.get("valueFrom") or {}).get(kind)
                        if ref:
                            assert ref["name"] == name and ref["key"] in keys, f"{e['name']}: dangling {kind} {ref}"


def test_launcher_config():
    cfg = _docs(CLUSTER / "launcher" / "aws.yaml")[0]
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert cfg.get(key), f"launcher/aws.yaml: {key} missing or empty"
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types, "head_node_type must name an entry of available_node_types"
    workers = [n for n in types if n != cfg["head_node_type"]]
    assert workers and all("max_workers" in types[n] for n in workers)
    for name, t in types.items():
        assert t["node_config"].get("InstanceType"), f"{name}: node_config.InstanceType missing"
    gpu_types = [n for n in workers if types[n]["node_config"]["InstanceType"].split(".")[0][0] in "gp"]
    assert gpu_types, "no GPU (g*/p* instance) worker type"
    setup = "\n".join(cfg["setup_commands"])
    assert "requirements.lock" in setup, "setup_commands must install the pinned dependencies"
    assert "pip install" in setup and "-e" in setup, "setup_commands must install the project"
    assert "MEDVL_RUN_ROOT" in setup and "MLFLOW_TRACKING_URI" in setup
    # token auth on every node: the launching machine's token file copied everywhere, RAY_AUTH_MODE=token
    assert "RAY_AUTH_MODE=token" in setup and "RAY_AUTH_MODE=disabled" not in setup
    mounts = cfg["file_mounts"]
    assert any(remote.endswith("/.ray/auth_token") for remote in mounts), "the Ray token file must be file-mounted"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-port=8265" in head_start
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_shell_scripts_parse_and_are_executable(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, f"bash -n {script}: {r.stderr}"
    assert os.access(script, os.X_OK), f"{script} is not executable"
    assert "RAY_AUTH_MODE" in script.read_text(), f"{script} must set RAY_AUTH_MODE explicitly"


def test_start_head_script_builds_the_documented_ray_start():
    text = (CLUSTER / "local" / "start-head.sh").read_text()
    for flag in ("--head", "--port", "--dashboard-host", "--dashboard-port", "--num-cpus", "--temp-dir"):
        assert flag in text, f"start-head.sh does not pass {flag}"
    assert "--address" in (CLUSTER / "local" / "start-worker.sh").read_text()


def test_scripts_print_usage_and_reject_unknown_options():
    for name in ("start-head.sh", "start-worker.sh", "stop.sh"):
        s = CLUSTER / "local" / name
        r = subprocess.run([str(s), "--help"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and name in r.stdout, f"{name} --help: {r.stdout}{r.stderr}"
    r = subprocess.run([str(CLUSTER / "local" / "start-head.sh"), "--bogus"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "--bogus" in r.stderr


def test_start_head_refuses_an_open_jobs_api_without_token_auth():
    """The Jobs API runs arbitrary code: serving it beyond loopback needs token auth (or an explicit --insecure);
    refused before `ray start` runs."""
    head = str(CLUSTER / "local" / "start-head.sh")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    for argv, extra in (([head, "--dashboard-host", "0.0.0.0", "--auth", "disabled"], {}),
                        ([head, "--dashboard-host", "0.0.0.0"], {"RAY_AUTH_MODE": "disabled"})):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, env={**env, **extra, "RAY": "/bin/false"})
        assert r.returncode == 2, r.stdout + r.stderr
        assert "refusing to serve the Jobs API on 0.0.0.0 without authentication" in r.stderr
        assert "--auth token" in r.stderr
    r = subprocess.run([head, "--auth", "maybe"], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 2 and "--auth must be token or disabled" in r.stderr
    text = (CLUSTER / "local" / "start-head.sh").read_text()
    assert 'DASH_HOST=127.0.0.1' in text, "the dashboard must bind to loopback by default"
