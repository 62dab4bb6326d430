"""`medvl submit` and `medvl jobs`: run recipes and sweeps on a Ray cluster through the Ray Jobs API.

    medvl submit jobs/digits_clip.yaml --address http://127.0.0.1:8265 [--no-wait] [key.sub=value ...]
    medvl submit jobs/sweep_digits_lr_temp.yaml --address http://HEAD:8265   # a sweep file (has `search_space`)
    medvl submit jobs/pipeline_digits_probe.yaml --address http://HEAD:8265 [--force STAGE] [--only STAGE]  # a pipeline
    medvl submit jobs/digits_clip.yaml --address ... --dry-run                # print entrypoint + runtime_env only
    medvl jobs list --address http://127.0.0.1:8265
    medvl jobs status|logs|stop JOB_ID --address http://127.0.0.1:8265

`--address` is the Ray dashboard URL (Jobs API, port 8265), default $RAY_API_SERVER_ADDRESS (as for `ray job`).

The recipe is validated here before anything is sent, then the cluster's dashboard is checked, then the job is
submitted with:
  - entrypoint `<python> -m medvl.cli train|tune|pipeline <recipe> [overrides]`. `<python>` (`--python`, default `python`)
    is looked up on the CLUSTER's PATH (the head node's Ray processes), not this machine's: give the cluster's
    interpreter path if its `python` is not the environment with ray/torch (cluster/local/start-head.sh puts the
    interpreter next to its ray CLI first on PATH).
  - runtime_env `working_dir` = this project (minus .venv, runs, .git, test-artifacts, bench/out), so `jobs/*.yaml`
    resolve on the cluster exactly as here, and `py_modules` = `platform/medvl`: that puts this checkout's medvl on
    the PYTHONPATH of the job driver AND of every Ray worker process (an entrypoint-only `PYTHONPATH=platform` would
    reach the driver but not the train workers, which would import whatever medvl the image has, or none).
  - env_vars: PYTHONUNBUFFERED, `--env KEY=VALUE`, and MLFLOW_TRACKING_URI / MEDVL_RUN_ROOT when they are set HERE.
    On a real cluster leave them unset here and let the cluster's environment provide them (KubeRay:
    cluster/kuberay/mlflow-config.yaml); a value set here overrides the cluster's for this job. Credentials are
    never sent: a job's runtime_env is readable by everyone who can list the cluster's jobs, so a password in
    MLFLOW_TRACKING_URI is stripped (the cluster supplies MLFLOW_TRACKING_USERNAME/PASSWORD) and a secret-named
    `--env` (…_TOKEN, …PASSWORD, …SECRET…) is refused. RAY_AUTH_MODE is not forwarded either: the job runs with the
    cluster's own setting.

Token auth: with RAY_AUTH_MODE=token and the token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (RAY_AUTH_MODE defaults
to `token` when either is set), `medvl submit` / `medvl jobs` send it as `Authorization: Bearer <token>` on every
Jobs API request (Ray's JobSubmissionClient does this itself); without it a token cluster answers 401.
  - dependencies: by default the cluster already has them (prebuilt image / same venv); `--pip-from-lock` adds
    runtime_env `pip` = requirements.lock without `ray` itself (the job must use the cluster's Ray).

Storage: `runtime.run_root` (or $MEDVL_RUN_ROOT) holds checkpoints, Ray Train state and the default MLflow store;
on a multi-node cluster it must be shared storage (NFS at the same path on every node, or an s3:// style URI).
Local paths in a recipe (data.corpus, ...) that point outside the uploaded project are sent as absolute paths, so
they must exist at that path on the cluster nodes (shared storage); see cluster/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import secrets
import shlex
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional

import yaml

from medvl.config import ConfigError, apply_overrides, load_recipe, load_yaml
from medvl.redact import default_ray_auth_mode, is_secret_key, redact_uri, strip_credentials, uri_secret

EXCLUDES = [".venv", "runs", ".git", "test-artifacts", "bench/out", "__pycache__", "*.egg-info", ".pytest_cache"]
"""Paths of the project never uploaded as the job's working_dir (gitignore-style, relative to the project root)."""
_EXCLUDED_TOP = {".venv", "runs", ".git", "test-artifacts", ".pytest_cache"}
PASSTHROUGH_ENV = ("MLFLOW_TRACKING_URI", "MEDVL_RUN_ROOT")
"""Submitter environment variables forwarded to the job when set."""
PATH_KEYS = ("data.corpus", "data.val_corpus", "model.config_dir", "model.pretrained")
"""Recipe keys holding local paths (resolved like medvl.config does, then made valid on the cluster)."""
STAGED_DIR = ".medvl-submit"
"""Where a recipe from outside the project is written inside the job's working directory."""
README_HINT = "see cluster/README.md"


class SubmitError(RuntimeError):
    """Submission cannot proceed; the message names the address, file or setting at fault."""


# --------------------------------------------------------------------------- project + address


def project_root() -> Path:
    """The checkout this medvl is imported from (platform/medvl -> ../..)."""
    import medvl
    root = Path(medvl.__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file() or not (root / "platform" / "medvl").is_dir():
        raise SubmitError(f"medvl is imported from {Path(medvl.__file__).parent}, which is not inside a project "
                          "checkout (pyproject.toml next to platform/medvl); medvl submit uploads the checkout "
                          "as the job's working_dir, so run it from an editable install (./dev setup)")
    return root


def normalize_address(address: Optional[str]) -> str:
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS") or "").strip()
    if not address:
        raise SubmitError("no cluster address: pass --address http://HOST:8265 (the Ray dashboard / Jobs API) or "
                          "set RAY_API_SERVER_ADDRESS")
    if address.startswith("ray://"):
        raise SubmitError(f"{address} is a Ray Client address; medvl submit talks to the Jobs API on the dashboard "
                          "port, e.g. --address http://HOST:8265")
    if "://" not in address:
        address = "http://" + address
    address = address.rstrip("/")
    parsed = urllib.parse.urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SubmitError(f"--address {address!r} is not an http(s)://HOST:PORT URL of a Ray dashboard")
    return address


def _is_loopback(address: str) -> bool:
    host = urllib.parse.urlparse(address).hostname or ""
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def _auth_headers() -> dict[str, str]:
    """The token header Ray's own clients would send (only when RAY_AUTH_MODE=token)."""
    try:
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
        return dict(get_auth_headers_if_auth_enabled({}))
    except Exception:  # noqa: BLE001 - private API; without it the check just sends no token
        return {}


def check_reachable(address: str, timeout: float = 5.0) -> str:
    """GET <address>/api/version; return the cluster's Ray version or raise SubmitError saying why not."""
    url = f"{address}/api/version"
    req = urllib.request.Request(url, headers=_auth_headers())
    hint = f"is the cluster up? {README_HINT}"
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise SubmitError(
                f"Ray dashboard at {address} refused the request (HTTP 401, no token sent): the cluster has token "
                "authentication on; set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token (RAY_AUTH_MODE "
                "then defaults to token; see cluster/README.md for where each cluster keeps it)") from None
        if e.code == 403:
            raise SubmitError(
                f"Ray dashboard at {address} refused the request (HTTP 403): the token in "
                f"{'RAY_AUTH_TOKEN' if os.environ.get('RAY_AUTH_TOKEN') else 'RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token'}"
                " is not this cluster's") from None
        raise SubmitError(f"{address} answered HTTP {e.code} on /api/version; is that the Ray dashboard port "
                          f"(default 8265, not the GCS port 6379)? {README_HINT}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(reason, socket.gaierror):
            why = f"cannot resolve host {urllib.parse.urlparse(address).hostname!r}"
        elif isinstance(reason, (TimeoutError, socket.timeout)):
            why = f"no answer within {timeout:.0f}s"
        else:
            why = str(reason)
        raise SubmitError(f"cannot reach Ray dashboard at {address} ({why}); {hint}") from None
    except (TimeoutError, socket.timeout):
        raise SubmitError(f"cannot reach Ray dashboard at {address} (no answer within {timeout:.0f}s); "
                          f"{hint}") from None
    except (ConnectionError, OSError) as e:
        raise SubmitError(f"cannot reach Ray dashboard at {address} ({e}); {hint}") from None
    try:
        return str(json.loads(body)["ray_version"])
    except (ValueError, KeyError, TypeError):
        raise SubmitError(f"{address}/api/version did not answer like a Ray dashboard (got {body[:80]!r}); "
                          "is that the dashboard port (default 8265)?") from None


def _client(address: str):
    from ray.job_submission import JobSubmissionClient
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - ConnectionError/RuntimeError from the version handshake
        raise SubmitError(f"cannot open a Jobs API client for {address}: {e}; {README_HINT}") from None


# --------------------------------------------------------------------------- the job plan (no network)


@dataclasses.dataclass
class JobPlan:
    kind: str
    """`train` (a recipe), `tune` (a sweep file) or `pipeline` (a pipeline recipe: top-level `stages`)."""
    name: str
    recipe_path: Path
    entrypoint: str
    """What Ray runs (a shell command line on the head node)."""
    command: str
    """The medvl command inside the entrypoint (without the staging of an outside recipe)."""
    runtime_env: dict[str, Any]
    submission_id: str
    metadata: dict[str, str]
    notes: list[str] = dataclasses.field(default_factory=list)
    """Warnings about paths and storage, printed before submitting."""


def is_sweep_file(data: dict) -> bool:
    return "search_space" in data


def _get(d: dict, dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _ray_would_skip(p: Path, root: Path) -> bool:
    """Whether Ray's working_dir packaging leaves `p` out: our `excludes`, Ray's default excludes, and every
    .gitignore / .rayignore on the way down, checked with Ray's own matchers the way its directory walk does."""
    import logging

    from ray._private import ray_constants
    from ray._private.runtime_env import packaging
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    quiet = logging.getLogger("medvl.submit.ignorefiles")
    quiet.setLevel(logging.WARNING)
    excludes = [packaging._get_excludes(root, ray_constants.get_runtime_env_default_excludes() + EXCLUDES)]
    node = root
    for part in (None, *p.relative_to(root).parts):
        node = node / part if part else node
        if node.is_dir():
            excludes += packaging.get_excludes_from_ignore_files(node, include_gitignore, logger=quiet)
        if any(e(node) for e in excludes):
            return True
    return False


def _uploaded_relpath(p: Path, root: Path) -> Optional[str]:
    """`p` relative to the project root if the job's working_dir upload contains it, else None."""
    p = p.resolve()
    try:
        rel = p.relative_to(root)
    except ValueError:
        return None
    try:
        skipped = _ray_would_skip(p, root)
    except (ImportError, AttributeError):  # Ray's private packaging API moved: fall back to our own excludes
        parts = rel.parts
        skipped = bool(parts) and (parts[0] in _EXCLUDED_TOP or rel.as_posix().startswith("bench/out")
                                   or "__pycache__" in parts or any(x.endswith(".egg-info") for x in parts))
    return None if skipped else (rel.as_posix() or ".")


def _yaml_scalar(v: str) -> str:
    """An override value that the cluster's YAML parsing turns back into exactly `v`."""
    try:
        if yaml.safe_load(v) == v:
            return v
    except yaml.YAMLError:
        pass
    return json.dumps(v)


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:40] or "job"


def _pip_from_lock(root: Path) -> list[str]:
    lock = root / "requirements.lock"
    if not lock.is_file():
        raise SubmitError(f"--pip-from-lock: {lock} not found")
    pkgs = []
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name = re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0].lower()
        if name == "ray":  # the job must run on the cluster's own Ray; a second copy breaks the worker protocol
            continue
        pkgs.append(line)
    return pkgs


def _cluster_path(key: str, local: Path, root: Path, address: Optional[str], notes: list[str]) -> str:
    """The value a local path must have in the job: relative to the project copy if it is uploaded with it,
    else the absolute path (which then has to exist on the cluster nodes)."""
    rel = _uploaded_relpath(local, root)
    if rel is not None:
        return rel  # travels with the working_dir; the job's cwd is the project copy
    if not local.exists():
        notes.append(f"{key}: {local} does not exist on this machine; it must exist at that path on the cluster "
                     "nodes")
    elif address and not _is_loopback(address):
        notes.append(f"{key}: {local} is not uploaded with the project; it must be on shared storage at the "
                     "same path on every cluster node (or use an s3:// URI)")
    return str(local)


def _path_overrides(raw: dict, recipe, root: Path, address: Optional[str], notes: list[str],
                    environ: dict[str, str]) -> dict[str, str]:
    """Overrides that make the recipe's local paths (raw values, resolved in `recipe`) valid in the job."""
    fixed: dict[str, str] = {}
    for key in PATH_KEYS:
        raw_v = _get(raw, key)
        if not isinstance(raw_v, str) or not raw_v or "://" in raw_v:
            continue
        section, attr = key.split(".")
        cluster_v = _cluster_path(key, Path(getattr(getattr(recipe, section), attr)), root, address, notes)
        if cluster_v != raw_v:
            fixed[key] = cluster_v
    _run_root_note(recipe.runtime.run_root, environ, notes)
    return fixed


def _pipeline_path_overrides(p, root: Path, address: Optional[str], notes: list[str]) -> dict[str, str]:
    """`<stage>.<key>` overrides that make a pipeline's relative paths (from its file or a stage's base file)
    valid in the job: relative to the uploaded project copy, else absolute (shared storage)."""
    from medvl.config import get_path
    fixed: dict[str, str] = {}
    for name, node in p.stages.items():
        cfg = node.stage.config_dict()
        for key, raw_v in node.relative_paths.items():
            local = get_path(cfg, key)
            if not isinstance(local, str) or not local:
                continue
            cluster_v = _cluster_path(f"{name}.{key}", Path(local), root, address, notes)
            if cluster_v != raw_v:
                fixed[f"{name}.{key}"] = cluster_v
    return fixed


def _run_root_note(run_root: str, environ: dict[str, str], notes: list[str]) -> None:
    if not environ.get("MEDVL_RUN_ROOT") and "://" not in run_root and not os.path.isabs(run_root):
        notes.append(f"runtime.run_root is the relative path {run_root!r} and MEDVL_RUN_ROOT is not set here: "
                     "unless the cluster sets MEDVL_RUN_ROOT, checkpoints and the default MLflow store land in "
                     "the job's temporary working directory on the head node and are lost with it; point "
                     "MEDVL_RUN_ROOT or runtime.run_root at shared storage")


def plan_job(recipe_path: str, overrides: list[str] | None = None, *, python: str = "python",
             pip_from_lock: bool = False, extra_env: dict[str, str] | None = None,
             submission_id: Optional[str] = None, address: Optional[str] = None,
             environ: Optional[dict[str, str]] = None, pipeline_args: Optional[list[str]] = None) -> JobPlan:
    """Validate a recipe, sweep or pipeline file locally and build the job's entrypoint and runtime_env.
    `pipeline_args` (`--only S`, `--force S`) are passed to `medvl pipeline`."""
    overrides = list(overrides or [])
    pipeline_args = list(pipeline_args or [])
    environ = dict(os.environ if environ is None else environ)
    root = project_root()
    path = Path(recipe_path)
    raw = load_yaml(path)  # ConfigError names the file when missing / not a mapping
    notes: list[str] = []
    staged = _uploaded_relpath(path, root) is None
    staged_text: Optional[str] = None
    fixed: dict[str, str] = {}

    if is_sweep_file(raw):
        kind = "tune"
        missing = [k for k in ("base", "search_space") if k not in raw]
        if missing:
            raise ConfigError(f"{path}: a sweep file needs top-level `base` and `search_space` "
                              f"(missing: {', '.join(missing)})")
        from medvl.data.corpus import CorpusError
        from medvl.tune.spec import base_recipe, is_pipeline_sweep, load_sweep, resolve_base, validate_sweep
        spec = load_sweep(path, overrides)  # SweepError (a ConfigError) names the key
        try:
            recipe = validate_sweep(spec)  # search space vs recipe types, metric, scheduler, base recipe
        except CorpusError as e:
            # the corpus may exist only on the cluster's shared storage; everything else was checked
            recipe = base_recipe(spec)
            notes.append(f"the sweep's objective metric was not checked against the corpus, which is not "
                         f"readable here ({e}); `medvl tune` checks it on the cluster")
        name = spec.sweep_name
        base_path = resolve_base(spec)
        base_v = None
        if _uploaded_relpath(base_path, root) is None:
            base_v = _cluster_path("base", base_path, root, address, notes)
        elif staged:  # the sweep file moves to .medvl-submit/, so name its base relative to the project root
            base_v = _uploaded_relpath(base_path, root)
        if base_v is not None and base_v != spec.base:
            fixed["base"] = base_v
        if is_pipeline_sweep(recipe):  # `base:` is a pipeline: its stages' paths, as `<stage>.<key>` overrides
            fixed.update(_pipeline_path_overrides(recipe, root, address, notes))
            _run_root_note(recipe.runtime.run_root, environ, notes)
        else:
            base_raw = apply_overrides(load_yaml(base_path), dict(spec.overrides))
            fixed.update(_path_overrides(base_raw, recipe, root, address, notes, environ))
    elif "stages" in raw:
        kind = "pipeline"
        from medvl.pipelines import dump_pipeline, load_pipeline
        from medvl.pipelines.runner import plan_pipeline
        p = load_pipeline(path, overrides)  # keys, types, kinds, inputs, cycles: PipelineError names them
        name = p.name
        if pipeline_args:
            only = [v for k, v in zip(pipeline_args[::2], pipeline_args[1::2]) if k == "--only"]
            force = [v for k, v in zip(pipeline_args[::2], pipeline_args[1::2]) if k == "--force"]
            for opt, names in (("--only", only), ("--force", force)):
                for s_ in names:
                    if s_ not in p.stages:
                        raise ConfigError(f"{opt} {s_}: no stage named {s_!r} (stages: {', '.join(p.stages)})")
        try:
            plan_pipeline(p, [], [])  # every input file and corpus fingerprinted: a missing one is named here
        except ConfigError as e:
            notes.append(f"the pipeline's inputs were not checked here ({e}); `medvl pipeline` checks them on "
                         f"the cluster (they may live on its shared storage)")
        fixed.update(_pipeline_path_overrides(p, root, address, notes))
        _run_root_note(p.runtime.run_root, environ, notes)
        if staged:  # its stages' base files stay here: ship the pipeline with them merged (paths absolute)
            staged_text = dump_pipeline(load_pipeline(path))
    else:
        kind = "train"
        recipe = load_recipe(path, overrides)  # full validation: unknown keys, types, value checks
        name = recipe.name
        fixed.update(_path_overrides(apply_overrides(raw, overrides), recipe, root, address, notes, environ))
    if pipeline_args and kind != "pipeline":
        raise ConfigError(f"--only / --force apply to pipeline recipes; {path} is a {kind} file")
    cluster_overrides = [ov for ov in overrides if ov.split("=", 1)[0].strip() not in fixed]
    cluster_overrides += [f"{k}={_yaml_scalar(v)}" for k, v in fixed.items()]

    uri = environ.get("MLFLOW_TRACKING_URI")
    if uri and uri_secret(uri):
        notes.append(f"MLFLOW_TRACKING_URI={redact_uri(uri)} carries a password: it is NOT sent with the job (a "
                     f"job's runtime_env is readable by everyone who can list the cluster's jobs); the job gets "
                     f"{strip_credentials(uri)} and the cluster must provide MLFLOW_TRACKING_USERNAME / "
                     f"MLFLOW_TRACKING_PASSWORD (KubeRay: the medvl-mlflow-auth Secret)")
    if uri and address and not _is_loopback(address) and re.search(r"//(localhost|127\.)", uri):
        notes.append(f"MLFLOW_TRACKING_URI={uri} is forwarded to the job, but on the cluster that host is the "
                     "cluster node itself; unset it here to use the cluster's own setting")

    sid = submission_id or f"medvl-{_slug(name)}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    env_vars = {"PYTHONUNBUFFERED": "1"}  # RAY_AUTH_MODE: the cluster's own (forwarding could contradict it)
    for k in PASSTHROUGH_ENV:
        if environ.get(k):
            env_vars[k] = strip_credentials(environ[k])
    for k in extra_env or {}:
        if is_secret_key(k) or uri_secret(extra_env[k]):
            raise SubmitError(f"--env {k}=...: credentials are not sent with a job (its runtime_env is readable by "
                              f"everyone who can list the cluster's jobs); set {k} in the cluster's environment "
                              f"instead (KubeRay: a Secret, see cluster/README.md)")
    env_vars.update(extra_env or {})

    prefix = ""
    if not staged:
        recipe_arg = _uploaded_relpath(path, root)
    else:
        # Not part of the uploaded project (e.g. a file in /tmp or under runs/): ship its text in the job's env and
        # write it into the job's working directory first. Its local paths were made absolute above.
        recipe_arg = f"{STAGED_DIR}/{sid}.yaml"
        env_vars["MEDVL_SUBMIT_RECIPE"] = staged_text if staged_text is not None else path.read_text()
        prefix = (f"mkdir -p {STAGED_DIR} && printf '%s\\n' \"$MEDVL_SUBMIT_RECIPE\" > {shlex.quote(recipe_arg)} "
                  "&& ")
    command = shlex.join([python, "-m", "medvl.cli", kind, recipe_arg, *cluster_overrides, *pipeline_args])
    entrypoint = prefix + command

    runtime_env: dict[str, Any] = {
        "working_dir": str(root),
        "excludes": list(EXCLUDES),
        "py_modules": [str(root / "platform" / "medvl")],
        "env_vars": env_vars,
    }
    if pip_from_lock:
        runtime_env["pip"] = {"packages": _pip_from_lock(root), "pip_check": False}
        if os.path.isabs(python):
            notes.append(f"--python {python} bypasses the virtualenv that --pip-from-lock builds; use the default "
                         "`python` to run inside it")
    metadata = {"medvl_kind": kind, "medvl_name": name, "medvl_recipe": str(path)}
    return JobPlan(kind, name, path, entrypoint, command, runtime_env, sid, metadata, notes)


# --------------------------------------------------------------------------- waiting


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-n:])


def wait_for_job(client, job_id: str, *, follow_logs: bool = True, poll_s: float = 2.0,
                 timeout_s: Optional[float] = None, out=None) -> str:
    """Poll until the job is terminal (printing new log text as it appears); return the final status name."""
    out = out or sys.stdout
    seen = 0
    last_status = None
    t0 = time.monotonic()
    while True:
        status = client.get_job_status(job_id)
        if follow_logs:
            logs = client.get_job_logs(job_id) or ""
            if len(logs) < seen:
                seen = 0
            if len(logs) > seen:
                out.write(logs[seen:])
                out.flush()
                seen = len(logs)
        if status != last_status:
            print(f"[medvl] job {job_id}: {status.value}", file=out, flush=True)
            last_status = status
        if status.is_terminal():
            return status.value
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"job {job_id} still {status.value} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def _report_failure(client, job_id: str, status: str) -> None:
    try:
        info = client.get_job_info(job_id)
        msg = info.message or ""
    except Exception:  # noqa: BLE001
        msg = ""
    try:
        logs = client.get_job_logs(job_id) or ""
    except Exception:  # noqa: BLE001
        logs = ""
    print(f"medvl submit: job {job_id} {status}{': ' + msg if msg else ''}", file=sys.stderr)
    if logs:
        print(f"---- last lines of the job's log ----\n{_tail(logs)}\n----", file=sys.stderr)


# --------------------------------------------------------------------------- medvl submit


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for it in items:
        if "=" not in it or not it.split("=", 1)[0]:
            raise SubmitError(f"--env {it!r} must look like KEY=VALUE")
        k, v = it.split("=", 1)
        env[k] = v
    return env


def _quiet_packaging_logs() -> None:
    """Ray logs every .gitignore it honours and warns that .git/.venv are excluded by default (we exclude them
    anyway); keep its 'Uploading package' lines only."""
    import logging
    for name in ("ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir"):
        logging.getLogger(name).setLevel(logging.ERROR)


AGENT_NOT_READY = ("Cannot connect to host", "Connect call failed")
"""In a Jobs API error: the head could not reach the job agent of the node it chose (a node that has just started
and whose agent does not listen yet). The job was not created, so the same submission can be sent again."""


def submit_with_retry(client, plan: "JobPlan", address: str, wait_s: float = 60.0, pause_s: float = 2.0) -> str:
    """`client.submit_job(...)`, sent again while the Jobs API answers that its job agent is not reachable yet
    (`AGENT_NOT_READY`, seen on a cluster whose nodes had just joined), for up to `wait_s` seconds; any other
    error is a `SubmitError` at once."""
    t0 = time.time()
    said = False
    while True:
        try:
            return client.submit_job(entrypoint=plan.entrypoint, submission_id=plan.submission_id,
                                     runtime_env=plan.runtime_env, metadata=plan.metadata)
        except Exception as e:  # noqa: BLE001 - upload / runtime_env / duplicate id errors from the Jobs API
            transient = any(m in str(e) for m in AGENT_NOT_READY)
            if not transient or time.time() - t0 + pause_s > wait_s:
                waited = f" (after {time.time() - t0:.0f} s of retries)" if said else ""
                raise SubmitError(f"the Jobs API at {address} rejected the submission{waited}: {e}") from None
            if not said:
                print(f"medvl submit: note: the cluster's job agent is not reachable yet (a node that has just "
                      f"started?); retrying for up to {wait_s:.0f} s", file=sys.stderr, flush=True)
                said = True
            time.sleep(pause_s)


def submit_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="medvl submit", description="Submit a recipe or sweep to a Ray cluster "
                                "(Ray Jobs API). " + README_HINT)
    p.add_argument("recipe", help="recipe YAML (jobs/*.yaml), sweep file (top-level `search_space`) or pipeline "
                                  "(top-level `stages`)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=3e-4")
    p.add_argument("--address", help="Ray dashboard URL, e.g. http://127.0.0.1:8265 (default $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--no-logs", action="store_true", help="while waiting, print status changes only")
    p.add_argument("--python", default="python",
                   help="interpreter for the entrypoint, looked up on the CLUSTER (default: `python` on its PATH)")
    deps = p.add_mutually_exclusive_group()
    deps.add_argument("--image-has-deps", dest="pip_from_lock", action="store_false",
                      help="the cluster already has the pinned dependencies (default)")
    deps.add_argument("--pip-from-lock", dest="pip_from_lock", action="store_true",
                      help="install requirements.lock (minus ray) into the job's runtime_env")
    # both options share `dest`; argparse would take the first one's default (store_false -> True): pip was on
    p.set_defaults(pip_from_lock=False)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra job environment variable")
    p.add_argument("--submission-id", help="job id to use (default medvl-<name>-<time>-<hex>)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the job; contact no cluster")
    p.add_argument("--only", action="append", default=[], metavar="STAGE", help="pipelines: rebuild only this stage")
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="pipelines: rebuild this stage")
    a = p.parse_intermixed_args(argv)  # overrides may follow options
    pipeline_args = [x for s_ in a.only for x in ("--only", s_)] + [x for s_ in a.force for x in ("--force", s_)]
    os.environ["RAY_AUTH_MODE"] = default_ray_auth_mode()  # `token` when RAY_AUTH_TOKEN(_PATH) is set

    try:
        address = None if a.dry_run and not a.address else normalize_address(a.address)
        plan = plan_job(a.recipe, a.overrides, python=a.python, pip_from_lock=a.pip_from_lock,
                        extra_env=_parse_env(a.env), submission_id=a.submission_id, address=address,
                        pipeline_args=pipeline_args)
        for note in plan.notes:
            print(f"medvl submit: note: {note}", file=sys.stderr)
        if a.dry_run:
            shown = json.loads(json.dumps(plan.runtime_env))
            if "pip" in shown:
                shown["pip"]["packages"] = f"<{len(shown['pip']['packages'])} pins from requirements.lock>"
            print(json.dumps({"submission_id": plan.submission_id, "entrypoint": plan.entrypoint,
                              "runtime_env": shown, "metadata": plan.metadata}, indent=2))
            return 0
        version = check_reachable(address)
        import ray
        if version != ray.__version__:
            print(f"medvl submit: note: the cluster runs Ray {version}, this machine Ray {ray.__version__}",
                  file=sys.stderr)
        client = _client(address)
        _quiet_packaging_logs()
        job_id = submit_with_retry(client, plan, address)
    except (ConfigError, SubmitError) as e:
        print(f"medvl submit: error: {e}", file=sys.stderr)
        return 2

    print(f"submitted {plan.kind} job {job_id} to {address}")
    print(f"  command: {plan.command}")
    print(f"  status: medvl jobs status {job_id} --address {address}")
    print(f"  logs:   medvl jobs logs {job_id} --address {address} --follow")
    print(f"  stop:   medvl jobs stop {job_id} --address {address}")
    print(f"job_id={job_id}", flush=True)
    if a.no_wait:
        return 0
    t0 = time.time()
    try:
        status = wait_for_job(client, job_id, follow_logs=not a.no_logs)
    except KeyboardInterrupt:
        print(f"\nmedvl submit: stopped waiting; job {job_id} keeps running on the cluster "
              f"(medvl jobs stop {job_id} --address {address} to end it)", file=sys.stderr)
        return 130
    if status == "SUCCEEDED":
        print(f"[medvl] job {job_id} SUCCEEDED in {time.time() - t0:.0f}s")
        return 0
    _report_failure(client, job_id, status)
    return 1


# --------------------------------------------------------------------------- medvl jobs


def _fmt_ms(ms: Optional[int]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def jobs_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="medvl jobs", description="Inspect and control jobs on a Ray cluster.")
    sub = p.add_subparsers(dest="action", required=True)

    def add(name: str, help_: str, with_id: bool = True):
        sp = sub.add_parser(name, help=help_)
        if with_id:
            sp.add_argument("job_id", help="submission id printed by medvl submit (job_id=...)")
        sp.add_argument("--address", help="Ray dashboard URL (default $RAY_API_SERVER_ADDRESS)")
        return sp

    add("status", "status, message and times of a job")
    lg = add("logs", "print a job's log")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    lg.add_argument("--tail", type=int, default=0, help="only the last N lines")
    st = add("stop", "stop a running job")
    st.add_argument("--wait", action="store_true", help="wait until it is STOPPED")
    add("list", "all jobs of the cluster", with_id=False)
    a = p.parse_args(argv)
    os.environ["RAY_AUTH_MODE"] = default_ray_auth_mode()

    try:
        address = normalize_address(a.address)
        check_reachable(address)
        client = _client(address)
        if a.action == "list":
            jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
            ids = [j.submission_id or j.job_id or "-" for j in jobs]
            w = max([len("JOB ID"), *map(len, ids)])
            print(f"{'JOB ID':<{w}}  {'STATUS':<10} {'STARTED':<19}  ENTRYPOINT")
            for jid, j in zip(ids, jobs):
                ep = j.entrypoint.split("&& ")[-1]  # without the staging of an outside recipe
                print(f"{jid:<{w}}  {j.status.value:<10} {_fmt_ms(j.start_time):<19}  {ep[:100]}")
            return 0
        try:
            info = client.get_job_info(a.job_id)
        except Exception as e:  # noqa: BLE001 - 404 comes back as RuntimeError
            raise SubmitError(f"no job {a.job_id!r} on the cluster at {address} ({e})") from None
        if a.action == "status":
            print(f"{a.job_id}: {info.status.value}")
            if info.message:
                print(f"  message:    {info.message}")
            print(f"  entrypoint: {info.entrypoint.split('&& ')[-1]}")
            print(f"  started:    {_fmt_ms(info.start_time)}   ended: {_fmt_ms(info.end_time)}")
            if info.metadata:
                print(f"  metadata:   {info.metadata}")
            return 0
        if a.action == "logs":
            if a.follow:
                status = wait_for_job(client, a.job_id, follow_logs=True)
                return 0 if status == "SUCCEEDED" else 1
            logs = client.get_job_logs(a.job_id) or ""
            text = _tail(logs, a.tail) if a.tail else logs
            print(text, end="" if text.endswith("\n") else "\n")
            return 0
        if a.action == "stop":
            if info.status.is_terminal():
                print(f"{a.job_id} already {info.status.value}")
                return 0
            client.stop_job(a.job_id)
            print(f"stop requested for {a.job_id}")
            if a.wait:
                status = wait_for_job(client, a.job_id, follow_logs=False, poll_s=1.0)
                print(f"{a.job_id}: {status}")
            return 0
    except SubmitError as e:
        print(f"medvl jobs: error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(submit_main(sys.argv[1:]))
