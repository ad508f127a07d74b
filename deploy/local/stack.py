#!/usr/bin/env python3
"""The production stack on one machine, every service on loopback: `dpn stack up|down|status|env|start|stop`.

    python deploy/local/stack.py up          # or `dpn stack up`: installs what is missing, starts everything
    eval "$(python deploy/local/stack.py env)"   # the variables a user exports (also in STATE/stack.env)
    python deploy/local/stack.py status      # one line per service: up/down, from a real probe
    python deploy/local/stack.py down        # stops what `up` started, and only that

Services (start order; `down` stops them in reverse), each with its log in ``STATE/logs/<service>.log``:

- ``postgres``: PostgreSQL (Debian's) in a cluster of our own (``initdb``), MLflow's backend store: database and
  role ``mlflow``, a generated password (in ``STATE/secrets``, never on a command line: MLflow reads it from a
  ``PGPASSFILE``). As root the cluster runs as the ``postgres`` user under
  ``/var/lib/postgresql/dpn-stack/<hash of STATE>`` (a home the postgres user may enter; ``STATE/pg`` points there).
- ``s3``: moto's standalone S3 server and the bucket ``dpn``. moto holds objects in memory: ``stop s3`` (and
  ``down``) first copies every object to ``STATE/s3-snapshot`` and ``start s3`` (and ``up``) puts them back, so
  the bucket survives a restart of the S3 process as it would on a real store; objects written while it was
  down cannot exist, and uploads in flight (multipart uploads not completed) are lost, as on a crash.
- ``mlflow``: ``mlflow server`` on PostgreSQL, artifacts proxied to ``s3://dpn/mlflow`` (clients need no S3
  credentials for artifacts).
- ``ray-head``, ``ray-worker``: a Ray cluster of two nodes, node IPs 127.0.0.2 and 127.0.0.3 (Ray replaces
  127.0.0.1 by the machine's address), each with its own temp dir (two raylets sharing one session dir delete
  each other's runtime-env packages, e.g. a running job's working dir), 2 logical CPUs, a resource naming the
  node (``node_head`` / ``node_worker``) and one ``dpn_train_slot`` each (``run.resources_per_worker={dpn_train_slot:
  1}`` puts one training worker on each node). Token auth is on (``RAY_AUTH_MODE=token``, the token in
  ``STATE/secrets/ray_auth_token``): the same token guards the Jobs API. Every node process carries the stack's
  variables (S3 endpoint and keys, tracking URI, API key), as the ConfigMap and Secret do on KubeRay. Ray's
  gRPC ports listen on all interfaces (Ray has no setting for that); its HTTP endpoints are on 127.0.0.1.
- ``prometheus``: Debian's Prometheus scraping every node's metrics agent through the file Ray keeps current
  (``<head temp dir>/prom_metrics_service_discovery.json``).

``stop SERVICE [--kill]`` / ``start SERVICE`` act on one service (``--kill``: SIGKILL at once, as a crash), for
fault injection. State (ports, pids, credentials) lives in ``STATE`` (default ``~/.dpn/stack``); ``down --purge``
also deletes it and the PostgreSQL cluster.

The console gets one status line per service and step, and the variables to export (on stdout, what ``.ci/stack``
and ``eval`` read); what the services, ``ray start``, apt-get and pip print goes to their logs in ``STATE/logs``
(``install.log`` for ``deploy/local/install.sh``; ``up -v`` shows the installer's output instead).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
BUCKET = "dpn"
REGION = "us-east-1"
NODE_CPUS = 2
OBJECT_STORE_BYTES = 500_000_000
SERVICES = ("postgres", "s3", "mlflow", "ray-head", "ray-worker", "prometheus")
# port = --base-port + offset; the Ray worker-port ranges take base+1000..base+1999
PORT_OFFSETS = {
    "postgres": 432, "mlflow": 500, "s3": 900, "prometheus": 90, "serve": 800,
    "ray_gcs": 379, "ray_client": 1, "dashboard": 265, "autoscaler_metrics": 217, "dashboard_metrics": 227,
    "head_metrics": 80, "worker_metrics": 81, "head_agent": 52, "worker_agent": 53,
    "head_worker_ports": 1000, "worker_worker_ports": 1500,
}  # fmt: skip
WORKER_PORT_SPAN = 499
DEFAULT_BASE_PORT = 25000
RAY_SOCKET_ROOM = 36  # Ray's socket paths (<temp>/session_<time>/sockets/plasma_store) must fit 107 bytes


class StackError(RuntimeError):
    """A service did not start or stop; the message says which and where its log is."""


# ----------------------------------------------------------------------------------------------
# Layout, credentials and the exported variables
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the stack keeps its state, logs and data."""

    root: Path
    base_port: int = DEFAULT_BASE_PORT

    def port(self, name: str) -> int:
        return self.base_port + PORT_OFFSETS[name]

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, service: str) -> Path:
        return self.logs / f"{service}.log"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def env_file(self) -> Path:
        return self.root / "stack.env"

    @property
    def state_file(self) -> Path:
        return self.root / "stack.json"

    @property
    def ray_tmp(self) -> Path:
        """Ray's temp dirs (``head``, ``worker``): under STATE when the socket paths fit, else a short path."""
        inside = self.root / "ray"
        if len(str(inside)) <= RAY_SOCKET_ROOM:
            return inside
        return Path("/tmp") / f"dpn-stack-ray-{_digest(self.root)}"

    def ray_node_tmp(self, node: str) -> Path:
        return self.ray_tmp / node

    @property
    def pg_home(self) -> Path:
        """The PostgreSQL cluster's folder (data + socket); as root one the postgres user may enter."""
        if os.geteuid() == 0:
            return Path("/var/lib/postgresql/dpn-stack") / _digest(self.root)
        return self.root / "pg"


def _digest(path: Path) -> str:
    return hashlib.sha256(str(path).encode()).hexdigest()[:10]


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600), whatever the umask."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)


def load_credentials(layout: Layout) -> dict[str, str]:
    """The stack's secrets, generated on the first ``up`` and reused after (the database keeps its password)."""
    path = layout.secrets / "credentials.json"
    if path.exists():
        return json.loads(path.read_text())
    creds = {
        "aws_access_key_id": "dpn" + secrets.token_hex(8),
        "aws_secret_access_key": secrets.token_urlsafe(30),
        "pg_password": secrets.token_urlsafe(24),
        "api_key": secrets.token_urlsafe(32),
    }
    write_private(path, json.dumps(creds, indent=1))
    token = layout.secrets / "ray_auth_token"
    if not token.exists():
        write_private(token, secrets.token_hex(32))
    return creds


def stack_env(layout: Layout, creds: dict[str, str]) -> dict[str, str]:
    """The variables a user (and every Ray node) exports to use the stack."""
    s3 = f"http://127.0.0.1:{layout.port('s3')}"
    dashboard = f"http://127.0.0.1:{layout.port('dashboard')}"
    return {
        "RAY_ADDRESS": dashboard,  # the Jobs API (ray job submit, serve deploy, the state API)
        "RAY_API_SERVER_ADDRESS": dashboard,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(layout.secrets / "ray_auth_token"),
        "DPN_RAY_GCS_ADDRESS": f"{HEAD_IP}:{layout.port('ray_gcs')}",  # ray status --address ...
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{layout.port('mlflow')}",
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "AWS_ENDPOINT_URL": s3,  # boto3 and pyarrow's S3 filesystem read it: plain S3 clients, no code change
        "AWS_ACCESS_KEY_ID": creds["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": creds["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": REGION,
        "DPN_S3_BUCKET": BUCKET,
        "DPN_STORAGE_PATH": f"s3://{BUCKET}/runs",  # run.storage_path: Ray Train checkpoints
        "DPN_DATA_ROOT": f"s3://{BUCKET}/data",
        "DPN_WORK_DIR": str(
            layout.root / "work"
        ),  # run.work_dir: the folder every node sees (NFS on a cluster)
        "PROMETHEUS_URL": f"http://127.0.0.1:{layout.port('prometheus')}",
        "DPN_SERVE_URL": f"http://127.0.0.1:{layout.port('serve')}",
        "DPN_API_KEY": creds["api_key"],
        "DPN_STACK_DIR": str(layout.root),
    }


def format_env(env: dict[str, str]) -> str:
    import shlex

    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())


# ----------------------------------------------------------------------------------------------
# Processes: started in their own session, stopped by process group, only ours
# ----------------------------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """``pid -> (ppid, pgid, cmdline)`` of every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        table[int(entry)] = (int(stat[1]), int(stat[2]), cmd)
    return table


def service_pids(pgid: int | None, marker: str) -> list[int]:
    """Processes of one service: the process group it was started in, with every descendant (a Ray job's
    driver runs in a session of its own). Empty when no process of the group holds ``marker`` (a path or port
    only this service uses) in its command line: a recycled group id never points at someone else's."""
    if not pgid:
        return []
    table = _proc_table()
    found = {pid for pid, (_, group, _) in table.items() if group == pgid}
    if not any(marker in table[pid][2] for pid in found):
        return []
    grew = True
    while grew:
        children = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    found.discard(os.getpid())
    return sorted(found)


def signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_processes(
    pgid: int | None, marker: str, kill: bool = False, first: int = signal.SIGTERM, leaders_only: bool = False
) -> int:
    """Stop one service: ``first`` (SIGTERM) to its processes (``leaders_only``: only to those holding ``marker``,
    e.g. PostgreSQL's postmaster, which stops its children itself), then, once the processes holding ``marker``
    have exited (15 s at most), SIGKILL to whatever is left (idle workers, server children). ``kill``: SIGKILL to
    every process at once, as a crash would. Returns how many processes there were."""
    pids = service_pids(pgid, marker)
    table = _proc_table()
    leaders = [p for p in pids if marker in table.get(p, (0, 0, ""))[2]]
    if kill:
        signal_pids(pids, signal.SIGKILL)
    else:
        signal_pids(leaders if leaders_only else pids, first)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_running(p) for p in leaders):
            time.sleep(0.2)
    signal_pids([p for p in pids if _running(p)], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    return len(pids)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited child of ours not yet reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def spawn(
    layout: Layout, service: str, argv: list[str], env: dict[str, str], user: str | None = None
) -> subprocess.Popen:
    """Start ``argv`` detached (its own session and process group), output appended to the service's log."""
    layout.logs.mkdir(parents=True, exist_ok=True)
    with open(layout.log(service), "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} start {argv[0]}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd="/" if user else str(layout.root), start_new_session=True, user=user, group=user,
        )  # fmt: skip
    return proc


def wait_for(
    what: str, probe: Callable[[], bool], timeout: float, log: Path, proc: subprocess.Popen | None = None
) -> None:
    """Poll ``probe`` until it holds; fail at ``timeout``, or as soon as ``proc`` (the service) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with status {proc.returncode} while starting; see {log}")
        time.sleep(0.5)
    raise StackError(f"{what} did not come up within {timeout:.0f} s; see {log}")


def http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 3) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def http_json(url: str, headers: dict[str, str] | None = None, timeout: float = 5) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
        return json.loads(r.read())


# ----------------------------------------------------------------------------------------------
# The services
# ----------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What every service needs: the layout, the credentials, the variables and the recorded state."""

    layout: Layout
    creds: dict[str, str]
    env: dict[str, str]
    state: dict[str, dict]

    def service_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The caller's environment without its Ray/MLflow addressing, plus ``extra``."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_", "DPN_"))}
        return {**base, **(extra or {})}

    def record(self, service: str, **info: object) -> None:
        self.state[service] = {**info, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def pg_bin(tool: str) -> str:
    """A tool of the newest PostgreSQL Debian installed (/usr/lib/postgresql/<version>/bin)."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not versions:
        raise StackError(
            "PostgreSQL is not installed: run deploy/local/install.sh (apt-get install postgresql)"
        )
    return str(versions[-1] / tool)


class Postgres:
    name = "postgres"

    def __init__(self, ctx: Context):
        self.ctx, self.home = ctx, ctx.layout.pg_home
        self.user = "postgres" if os.geteuid() == 0 else None
        self.port = ctx.layout.port("postgres")

    def _run(self, argv: list[str], stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(
            argv, input=stdin, capture_output=True, text=True, user=self.user, group=self.user, cwd="/"
        )

    def _init(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if self.user:
            shutil.chown(self.home, self.user, self.user)
        link = self.ctx.layout.root / "pg"
        if self.user and not link.is_symlink() and not link.exists():
            link.symlink_to(self.home)
        res = self._run([pg_bin("initdb"), "-D", str(self.home / "data"), "-U", "postgres", "-E", "UTF8",
                         "--auth-local=peer" if self.user else "--auth-local=trust", "--auth-host=scram-sha-256"])  # fmt: skip
        if res.returncode:
            raise StackError(f"initdb failed: {res.stderr.strip()}")

    def _create_db(self) -> None:
        password = self.ctx.creds["pg_password"].replace("'", "''")
        sql = f"CREATE ROLE mlflow LOGIN PASSWORD '{password}';\nCREATE DATABASE mlflow OWNER mlflow;\n"
        res = self._run([pg_bin("psql"), "-h", str(self.home), "-p", str(self.port), "-U", "postgres",
                         "-v", "ON_ERROR_STOP=1", "-q", "-f", "-"], stdin=sql)  # fmt: skip
        if res.returncode:
            raise StackError(f"creating MLflow's database failed: {res.stderr.strip()}")

    def start(self) -> None:
        fresh = not (self.home / "data" / "PG_VERSION").exists()
        if fresh:
            self._init()
        argv = [pg_bin("postgres"), "-D", str(self.home / "data"), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.home}"]  # fmt: skip
        proc = spawn(self.ctx.layout, self.name, argv, self.ctx.service_env(), user=self.user)
        self.ctx.record(self.name, pgid=proc.pid)
        wait_for("PostgreSQL", self.probe, 60, self.ctx.layout.log(self.name), proc)
        if fresh:
            self._create_db()

    def probe(self) -> bool:
        argv = [
            pg_bin("pg_isready"),
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-d",
            "mlflow",
            "-U",
            "mlflow",
        ]
        return subprocess.run(argv, capture_output=True).returncode == 0

    def stop(self, kill: bool = False) -> int:
        pgid = self.ctx.state.get(self.name, {}).get("pgid")
        # SIGINT to the postmaster: PostgreSQL's fast shutdown (SIGTERM waits for every client to leave)
        return stop_processes(pgid, str(self.home / "data"), kill, first=signal.SIGINT, leaders_only=True)

    def purge(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)


class S3:
    name = "s3"

    def __init__(self, ctx: Context):
        self.ctx, self.port = ctx, ctx.layout.port("s3")
        self.snapshot = ctx.layout.root / "s3-snapshot"

    def client(self):
        import boto3

        e = self.ctx.env
        return boto3.client("s3", endpoint_url=e["AWS_ENDPOINT_URL"], region_name=REGION,
                            aws_access_key_id=e["AWS_ACCESS_KEY_ID"], aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"])  # fmt: skip

    def start(self) -> None:
        moto = shutil.which("moto_server") or "moto_server"
        argv = [moto, "-H", "127.0.0.1", "-p", str(self.port)]
        proc = spawn(self.ctx.layout, self.name, argv, self.ctx.service_env())
        self.ctx.record(self.name, pgid=proc.pid)
        up = lambda: http_ok(f"http://127.0.0.1:{self.port}/moto-api/")  # noqa: E731
        wait_for("the S3 server (moto)", up, 60, self.ctx.layout.log(self.name), proc)
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=BUCKET)
        restored = self.restore()
        if restored:
            print(f"  s3: restored {restored} objects from {self.snapshot}")

    def probe(self) -> bool:
        try:
            self.client().head_bucket(Bucket=BUCKET)
            return True
        except Exception:  # noqa: BLE001 - any failure means "not up"
            return False

    def save(self) -> int:
        """Copy every object of the bucket to the snapshot folder (replacing it); returns the count. Objects are
        files numbered in ``objects/`` with their keys in ``index.json``: keys need not be paths (``a`` and
        ``a/b`` can both exist, and so do folder markers ending in ``/``)."""
        client, tmp = self.client(), self.snapshot.with_name("s3-snapshot.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "objects").mkdir(parents=True)
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
                for o in page.get("Contents", [])]  # fmt: skip
        for number, key in enumerate(keys):
            client.download_file(BUCKET, key, str(tmp / "objects" / f"{number:08d}"))
        (tmp / "index.json").write_text(json.dumps(keys))
        shutil.rmtree(self.snapshot, ignore_errors=True)
        tmp.rename(self.snapshot)  # a snapshot is complete or absent
        return len(keys)

    def restore(self) -> int:
        index = self.snapshot / "index.json"
        if not index.is_file():
            return 0
        client, keys = self.client(), json.loads(index.read_text())
        for number, key in enumerate(keys):
            client.upload_file(str(self.snapshot / "objects" / f"{number:08d}"), BUCKET, key)
        return len(keys)

    def stop(self, kill: bool = False) -> int:
        """Stop moto; a graceful stop first saves the bucket, a kill loses it (moto keeps objects in memory) and
        drops any older snapshot, which would bring back objects deleted since."""
        if kill:
            shutil.rmtree(self.snapshot, ignore_errors=True)
        elif self.probe():
            print(f"  s3: saved {self.save()} objects to {self.snapshot}")
        pgid = self.ctx.state.get(self.name, {}).get("pgid")
        return stop_processes(pgid, f"-p {self.port}", kill)

    def purge(self) -> None:
        shutil.rmtree(self.snapshot, ignore_errors=True)


class Mlflow:
    name = "mlflow"

    def __init__(self, ctx: Context):
        self.ctx, self.port = ctx, ctx.layout.port("mlflow")

    def start(self) -> None:
        layout, e = self.ctx.layout, self.ctx.env
        pgpass = layout.secrets / "pgpass"
        write_private(
            pgpass, f"127.0.0.1:{layout.port('postgres')}:mlflow:mlflow:{self.ctx.creds['pg_password']}\n"
        )
        argv = [shutil.which("mlflow") or "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", f"postgresql+psycopg2://mlflow@127.0.0.1:{layout.port('postgres')}/mlflow",
                "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--workers", "1"]  # fmt: skip
        keys = (
            "AWS_ENDPOINT_URL",
            "MLFLOW_S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        )
        env = self.ctx.service_env({"PGPASSFILE": str(pgpass), **{k: e[k] for k in keys}})
        proc = spawn(layout, self.name, argv, env)
        self.ctx.record(self.name, pgid=proc.pid)
        # the first start creates MLflow's tables in PostgreSQL (a minute on 2 cores)
        wait_for("the MLflow server", self.probe, 180, layout.log(self.name), proc)

    def probe(self) -> bool:
        return http_ok(f"http://127.0.0.1:{self.port}/health")

    def stop(self, kill: bool = False) -> int:
        pgid = self.ctx.state.get(self.name, {}).get("pgid")
        return stop_processes(pgid, f"--port {self.port}", kill)

    def purge(self) -> None:
        pass


class RayNode:
    """One raylet of the cluster: the head (GCS, dashboard, Jobs API) or the second node."""

    def __init__(self, ctx: Context, head: bool):
        self.ctx, self.head = ctx, head
        self.name = "ray-head" if head else "ray-worker"
        self.ip = HEAD_IP if head else WORKER_IP
        self.tmp = ctx.layout.ray_node_tmp("head" if head else "worker")

    def _argv(self) -> list[str]:
        p, role = self.ctx.layout.port, "head" if self.head else "worker"
        first = p(f"{role}_worker_ports")
        argv = [shutil.which("ray") or "ray", "start", "--node-ip-address", self.ip, "--temp-dir", str(self.tmp),
                "--num-cpus", str(NODE_CPUS), "--resources", json.dumps({f"node_{role}": 1, "dpn_train_slot": 1}),
                "--object-store-memory", str(OBJECT_STORE_BYTES), "--metrics-export-port", str(p(f"{role}_metrics")),
                "--dashboard-agent-listen-port", str(p(f"{role}_agent")), "--min-worker-port", str(first),
                "--max-worker-port", str(first + WORKER_PORT_SPAN), "--disable-usage-stats"]  # fmt: skip
        if self.head:
            return [*argv, "--head", "--port", str(p("ray_gcs")), "--ray-client-server-port", str(p("ray_client")),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(p("dashboard"))]  # fmt: skip
        return [*argv, "--address", self.ctx.env["DPN_RAY_GCS_ADDRESS"]]

    def node_env(self) -> dict[str, str]:
        """What every process of the node sees: the stack's variables, as a ConfigMap + Secret give a pod."""
        layout = self.ctx.layout
        cluster = {
            k: v for k, v in self.ctx.env.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
        }
        return self.ctx.service_env({
            **cluster, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "DPN_MODEL_CACHE": str(layout.root / "model-cache"), "RAY_USAGE_STATS_ENABLED": "0",
            "AUTOSCALER_METRIC_PORT": str(layout.port("autoscaler_metrics")),
            "DASHBOARD_METRIC_PORT": str(layout.port("dashboard_metrics")),
        })  # fmt: skip

    def start(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        log = self.ctx.layout.log(self.name)
        proc = spawn(self.ctx.layout, self.name, self._argv(), self.node_env())
        # `ray start` leaves the node's processes in its process group and exits
        self.ctx.record(self.name, pgid=proc.pid)
        try:
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            raise StackError(f"`ray start` of {self.name} did not return within 180 s; see {log}") from None
        if code:
            raise StackError(f"`ray start` of {self.name} failed with status {code}; see {log}")
        wait_for(f"Ray's {self.name} node", self.probe, 60, log)

    def probe(self) -> bool:
        """Its processes run here and the cluster lists it ALIVE (a killed node stays ALIVE in the GCS until its
        health checks time out, so the listing alone would call it up)."""
        pgid = self.ctx.state.get(self.name, {}).get("pgid")
        return bool(service_pids(pgid, f"{self.tmp}/")) and self.ip in alive_ray_nodes(self.ctx)

    def stop(self, kill: bool = False) -> int:
        pgid = self.ctx.state.get(self.name, {}).get("pgid")
        return stop_processes(pgid, f"{self.tmp}/", kill)

    def purge(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def alive_ray_nodes(ctx: Context) -> set[str]:
    """IPs of the cluster's ALIVE nodes, from the state API (with the cluster's token)."""
    token = Path(ctx.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    url = f"{ctx.env['RAY_ADDRESS']}/api/v0/nodes?limit=100&detail=false"
    try:
        result = http_json(url, {"Authorization": f"Bearer {token}"})["data"]["result"]["result"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return set()
    return {n["node_ip"] for n in result if n.get("state") == "ALIVE"}


class Prometheus:
    name = "prometheus"

    def __init__(self, ctx: Context):
        self.ctx, self.port = ctx, ctx.layout.port("prometheus")
        self.home = ctx.layout.root / "prometheus"

    def config(self) -> str:
        discovery = self.ctx.layout.ray_node_tmp("head") / "prom_metrics_service_discovery.json"
        return (
            "# written by deploy/local/stack.py: every Ray node's metrics agent, as Ray lists them\n"
            "global: {scrape_interval: 5s, evaluation_interval: 15s}\n"
            "scrape_configs:\n"
            "  - job_name: ray\n"
            f"    file_sd_configs: [{{files: [{json.dumps(str(discovery))}], refresh_interval: 10s}}]\n"
        )

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "prometheus.yml").write_text(self.config())
        argv = [shutil.which("prometheus") or "prometheus", f"--config.file={self.home / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.home / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=2d"]  # fmt: skip
        proc = spawn(self.ctx.layout, self.name, argv, self.ctx.service_env())
        self.ctx.record(self.name, pgid=proc.pid)
        wait_for("Prometheus", self.probe, 60, self.ctx.layout.log(self.name), proc)

    def probe(self) -> bool:
        return http_ok(f"http://127.0.0.1:{self.port}/-/ready")

    def targets_up(self) -> int:
        try:
            data = http_json(f"http://127.0.0.1:{self.port}/api/v1/targets?state=active")["data"]
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return 0
        return sum(t.get("health") == "up" for t in data.get("activeTargets", []))

    def stop(self, kill: bool = False) -> int:
        pgid = self.ctx.state.get(self.name, {}).get("pgid")
        return stop_processes(pgid, f"--config.file={self.home}", kill)

    def purge(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)


def make_services(ctx: Context) -> dict:
    return {
        "postgres": Postgres(ctx), "s3": S3(ctx), "mlflow": Mlflow(ctx),
        "ray-head": RayNode(ctx, head=True), "ray-worker": RayNode(ctx, head=False), "prometheus": Prometheus(ctx),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def open_context(root: Path, base_port: int | None) -> Context:
    """The stack at ``root``: its recorded base port (or ``base_port`` for a new one), credentials and state."""
    state_file = root / "stack.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    recorded = state.get("_stack", {}).get("base_port")
    if recorded and base_port and recorded != base_port:
        raise StackError(
            f"the stack in {root} uses --base-port {recorded}; `down --purge` it first to change ports"
        )
    layout = Layout(root, recorded or base_port or DEFAULT_BASE_PORT)
    layout.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    creds = load_credentials(layout)
    state["_stack"] = {
        "base_port": layout.base_port,
        "ray_tmp": str(layout.ray_tmp),
        "pg_home": str(layout.pg_home),
    }
    ctx = Context(layout, creds, stack_env(layout, creds), state)
    if not recorded:  # the first command on a state dir fixes its ports
        save_state(ctx)
    return ctx


def save_state(ctx: Context) -> None:
    ctx.layout.state_file.write_text(json.dumps(ctx.state, indent=1) + "\n")


def start_service(ctx: Context, service) -> None:
    if service.probe():
        print(f"  {service.name}: already up")
        return
    t0 = time.monotonic()
    try:
        service.start()
    finally:
        save_state(ctx)
    print(f"  {service.name}: up ({time.monotonic() - t0:.1f} s; log {ctx.layout.log(service.name)})")


def stop_service(ctx: Context, service, kill: bool = False) -> None:
    t0 = time.monotonic()
    count = service.stop(kill=kill)
    ctx.state.pop(service.name, None)
    save_state(ctx)
    how = "killed" if kill else "stopped"
    print(
        f"  {service.name}: {how} {count} processes ({time.monotonic() - t0:.1f} s)"
        if count
        else f"  {service.name}: not running"
    )


INSTALL_TAIL_LINES = 20  # lines of install.log a failed install shows


def run_install(layout: Layout, verbose: bool = False, script: Path = HERE / "install.sh") -> None:
    """Run ``install.sh``, its apt-get and pip output in ``STATE/logs/install.log`` (on the console if ``verbose``).

    Raises:
        StackError: it failed; the message holds the log's last lines (why: a package missing and not root,
            pip's error) and the log's path.
    """
    env = {**os.environ, "PYTHON": sys.executable}
    if verbose:
        subprocess.run(["bash", str(script)], check=True, env=env)
        return
    t0, log = time.monotonic(), layout.log("install")
    layout.logs.mkdir(parents=True, exist_ok=True)
    print(f"  install: checking for what is missing ({script.name}; log {log})", flush=True)
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {script}\n".encode())
        out.flush()
        code = subprocess.run(["bash", str(script)], stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        shown = "".join(f"\n  | {line}" for line in lines[-INSTALL_TAIL_LINES:])
        raise StackError(f"{script.name} failed with status {code}; the end of {log}:{shown}")
    print(f"  install: done ({time.monotonic() - t0:.1f} s)", flush=True)


def cmd_up(ctx: Context, args: argparse.Namespace) -> int:
    if not args.no_install:
        run_install(ctx.layout, args.verbose)
    write_private(ctx.layout.env_file, format_env(ctx.env))
    for service in make_services(ctx).values():
        start_service(ctx, service)
    print(f"\nThe stack is up. Variables (also in {ctx.layout.env_file}, or `dpn stack env`):\n")
    sys.stdout.write(format_env(ctx.env))
    return 0


def cmd_down(ctx: Context, args: argparse.Namespace) -> int:
    services = make_services(ctx)
    for name in reversed(SERVICES):
        stop_service(ctx, services[name])
    if args.purge:
        for service in services.values():
            service.purge()
        shutil.rmtree(ctx.layout.ray_tmp, ignore_errors=True)
        shutil.rmtree(ctx.layout.root, ignore_errors=True)
        print(f"  purged {ctx.layout.root} and {ctx.layout.pg_home}")
    return 0


def cmd_status(ctx: Context, args: argparse.Namespace) -> int:
    services = make_services(ctx)
    down = 0
    for name, service in services.items():
        up = service.probe()
        down += not up
        extra = f" ({service.targets_up()} scrape targets up)" if up and name == "prometheus" else ""
        print(f"{name:<11} {'up' if up else 'down'}{extra}")
    return 1 if down else 0


def cmd_env(ctx: Context, args: argparse.Namespace) -> int:
    sys.stdout.write(format_env(ctx.env))
    return 0


def cmd_start(ctx: Context, args: argparse.Namespace) -> int:
    start_service(ctx, make_services(ctx)[args.service])
    return 0


def cmd_stop(ctx: Context, args: argparse.Namespace) -> int:
    stop_service(ctx, make_services(ctx)[args.service], kill=args.kill)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The stack's command line (``dpn stack`` mounts the same)."""
    parser.add_argument("--state-dir", default=os.environ.get("DPN_STACK_DIR", "~/.dpn/stack"),
                        help="the stack's state, logs and secrets (default $DPN_STACK_DIR or ~/.dpn/stack)")  # fmt: skip
    parser.add_argument("--base-port", type=int, default=None,
                        help=f"first of the ports the stack uses (default {DEFAULT_BASE_PORT}; kept per state dir)")  # fmt: skip
    sub = parser.add_subparsers(dest="stack_command", metavar="COMMAND")
    sub.required = True
    up = sub.add_parser("up", help="install what is missing and start every service")
    up.add_argument("--no-install", action="store_true", help="skip deploy/local/install.sh")
    up.add_argument("-v", "--verbose", action="store_true",
                    help="show install.sh's apt-get and pip output (default: in STATE/logs/install.log)")  # fmt: skip
    up.set_defaults(_stack_run=cmd_up)
    down = sub.add_parser("down", help="stop every service the stack started")
    down.add_argument("--purge", action="store_true", help="also delete the state dir and the database")
    down.set_defaults(_stack_run=cmd_down)
    sub.add_parser("status", help="up/down per service (exit 1 if any is down)").set_defaults(
        _stack_run=cmd_status
    )
    sub.add_parser("env", help="print the variables to export").set_defaults(_stack_run=cmd_env)
    for verb, handler, text in (
        ("start", cmd_start, "start one service"),
        ("stop", cmd_stop, "stop one service"),
    ):
        one = sub.add_parser(verb, help=text)
        one.add_argument("service", choices=SERVICES)
        if verb == "stop":
            one.add_argument("--kill", action="store_true", help="SIGKILL at once (a crash), no S3 snapshot")
        one.set_defaults(_stack_run=handler)


def run(args: argparse.Namespace) -> int:
    """Run the chosen stack command; returns the exit status (2 when a service failed to start or stop)."""
    try:
        ctx = open_context(Path(args.state_dir).expanduser().resolve(), args.base_port)
        return int(args._stack_run(ctx, args) or 0)
    except (StackError, subprocess.CalledProcessError) as err:
        print(f"dpn stack: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack.py", description=(__doc__ or "").split("\n", 1)[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
