"""Real FEDn networks on this machine: up, a 2-round session with 2 clients, down.

Each bring-up costs seconds, so one network per scenario, shared by its tests
(module-scoped fixtures). Ports are picked free at run time so that several
engineers' test runs on one machine do not collide.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import requests
from click.testing import CliRunner

from fedseg.cli import cli
from fedseg.orchestration.fedn import compat as fedn_compat
from fedseg.orchestration.network import (
    CombinerSpec,
    CombinerState,
    NetworkConfig,
    NetworkState,
    combiner_model_dir,
    load_network_state,
    network_down,
    network_status,
    network_up,
    ports,
    stores,
)
from fedseg.orchestration.network import auth as auth_mod
from fedseg.orchestration.network.ports import free_port, free_ports
from fedseg.orchestration.network.stores import find_postgres_bindir
from fedseg_clinic.errors import FedsegError

PACKAGE_DIR = Path(__file__).resolve().parent / "fednpkg_numpy"
VENV_BIN = Path(sys.executable).parent
SESSION_TIMEOUT_S = 120.0


def net(func: Callable[..., None]) -> Callable[..., None]:
    """Mark a test that starts real FEDn server processes."""
    return pytest.mark.slow(pytest.mark.network(func))


def make_config(root: Path, n_combiners: int = 1, **overrides: object) -> NetworkConfig:
    api, s3, pg, *comb = free_ports(3 + n_combiners)
    config = NetworkConfig(
        root=root, api_port=api, s3_port=s3, postgres_port=pg,
        combiners=[CombinerSpec(f"combiner-{i + 1}", p) for i, p in enumerate(comb)],
        startup_timeout_s=60, api_workers=1)
    for key, value in overrides.items():
        setattr(config, key, value)
    config.validate()
    return config


# --- a tiny numpy experiment ------------------------------------------------------------

def seed_weights() -> list[np.ndarray]:
    return [np.zeros((2, 3)), np.arange(4, dtype=float)]


def upload_package_and_seed(state: NetworkState, work: Path) -> None:
    from fedn.cli.package_cmd import create_tar_with_ignore
    from fedn.utils.helpers.helpers import get_helper

    work.mkdir(parents=True, exist_ok=True)
    tgz = work / "package.tgz"
    create_tar_with_ignore(str(PACKAGE_DIR), str(tgz))
    seed = work / "seed.npz"
    get_helper("numpyhelper").save(seed_weights(), str(seed))
    client = state.api_client()
    answer = client.set_active_package(str(tgz), helper="numpyhelper", name="numpy-test")
    assert answer.get("success", True) is not False, answer
    answer = client.set_active_model(str(seed))
    assert answer.get("success", True) is not False, answer


def start_clients(state: NetworkState, names: list[str], work: Path, token: str | None,
                  preferred: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """fedn's `client start` processes (package route: token in a 0600 file, not argv)."""
    from fedseg.orchestration.clients import ClientSpec, client_argv, write_package_config

    procs = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDN_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in fedn.yaml
    for name in names:
        cwd = work / name
        cwd.mkdir(parents=True, exist_ok=True)
        spec = ClientSpec(name, cwd)
        combiner = (preferred or {}).get(name)
        write_package_config(cwd, spec, state.api_url, token, combiner, str(uuid.uuid4()))
        argv = client_argv("package", spec, state.api_url, "", cwd, token, combiner)
        log = open(cwd / "client.log", "wb")
        procs.append(subprocess.Popen(argv, cwd=cwd, env={**env, "FEDN_HOME_DIR": str(cwd)},
                                      stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        log.close()
    return procs


def stop_clients(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def wait_for_clients(state: NetworkState, n: int, timeout_s: float = 60.0) -> list[dict]:
    client = state.api_client()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        online = [c for c in client.get_clients().get("result", [])
                  if c.get("status") == "online"]
        if len(online) >= n:
            return online
        time.sleep(0.5)
    raise AssertionError(f"only {len(online)} of {n} clients online after {timeout_s} s")


# Sent as the session's server_functions; runs in the hooks process.
STEP_HOOK = """
from fedn.network.combiner.hooks.allowed_import import ServerFunctionsBase


class ServerFunctions(ServerFunctionsBase):
    \"\"\"Sends every client the same step each round.

    Longer than 255 characters on purpose: fedn declares session_configs.server_functions
    as VARCHAR(255), which PostgreSQL enforces (SQLite does not).
    \"\"\"

    def client_settings(self, global_model):
        return {"step": 3.0}
"""


def run_session(state: NetworkState, rounds: int, min_clients: int,
                server_functions: str | None = None) -> str:
    client = state.api_client()
    model_id = client.get_active_model()["model_id"]
    session_id = fedn_compat.start_session(client, rounds, model_id=model_id,
                                           min_clients=min_clients, round_timeout=60,
                                           server_functions=server_functions)
    deadline = time.monotonic() + SESSION_TIMEOUT_S
    while time.monotonic() < deadline:
        if client.get_session_status(session_id) == "Finished":
            return session_id
        time.sleep(0.5)
    raise AssertionError(f"session {session_id} not finished after {SESSION_TIMEOUT_S} s")


def final_weights(state: NetworkState, session_id: str, work: Path) -> list[np.ndarray]:
    from fedn.utils.helpers.helpers import get_helper

    client = state.api_client()
    models = client.get_models(session_id=session_id)["result"]
    latest = max(models, key=lambda m: m["committed_at_ts"] if "committed_at_ts" in m
                 else m["committed_at"])
    path = work / "final.npz"
    client.download_model(latest["model_id"], str(path))
    return get_helper("numpyhelper").load(str(path))


def listeners_of(pids: set[int]) -> list[tuple[str, int]]:
    """(ip, port) of every listening socket owned by the given pids (and children)."""
    all_pids = set(pids)
    for pid in pids:
        try:
            all_pids |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            continue
    return [(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in all_pids]


def assert_all_stopped(state: NetworkState) -> None:
    for record in state.records.values():
        assert not ports.is_alive(record), f"{record.name} still alive"
        assert not ports._session_members(record.pid), f"{record.name} left children"


def experiment(state: NetworkState, work: Path, names: list[str], *,
               preferred: dict[str, str] | None = None,
               min_clients: int | None = None,
               server_functions: str | None = None) -> tuple[str, list[dict]]:
    """Package + seed, clients, a 2-round session; returns (session id, online clients).

    min_clients is per combiner in fedn (a combiner joins a round only with that many
    active clients of its own), so split clients need min_clients=1.
    """
    upload_package_and_seed(state, work)
    procs = start_clients(state, names, work, state.client_token, preferred)
    try:
        online = wait_for_clients(state, len(names))
        session_id = run_session(state, rounds=2, min_clients=min_clients or len(names),
                                 server_functions=server_functions)
    finally:
        stop_clients(procs)
    return session_id, online


# --- SQLite + moto, one combiner --------------------------------------------------------

@pytest.fixture(scope="module")
def sqlite_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkState]:
    root = tmp_path_factory.mktemp("net-sqlite")
    state = network_up(make_config(root))
    yield state
    if (root / "network.json").exists():
        network_down(root)


@net
def test_sqlite_network_runs_two_rounds(sqlite_net: NetworkState, tmp_path: Path) -> None:
    session_id, _ = experiment(sqlite_net, tmp_path, ["c1", "c2"])
    client = sqlite_net.api_client()
    models = client.get_models(session_id=session_id)["result"]
    assert len(models) == 2
    rounds = client.get_rounds()["result"]
    assert len(rounds) == 2
    # fedavg of two clients that both add 1 each round: seed + 2.
    weights = final_weights(sqlite_net, session_id, tmp_path)
    for got, seed in zip(weights, seed_weights(), strict=True):
        np.testing.assert_allclose(got, seed + 2.0)


@net
def test_sqlite_network_listens_on_localhost_only(sqlite_net: NetworkState) -> None:
    listening = listeners_of(set(sqlite_net.processes.values()))
    our_ports = {rec.port for rec in sqlite_net.records.values()}
    assert our_ports <= {port for _ip, port in listening}
    assert_loopback(listening)


def assert_loopback(listening: list[tuple[str, int]]) -> None:
    for ip, port in listening:
        # gRPC's socket is dual-stack: 127.0.0.1 shows as ::ffff:127.0.0.1 (still loopback).
        address = ipaddress.ip_address(ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        assert address.is_loopback, f"port {port} listens on {ip}"
        assert ip not in ("0.0.0.0", "::")


@net
def test_auth_network_with_hooks_listens_on_localhost_only(auth_net: NetworkState) -> None:
    listening = listeners_of(set(auth_net.processes.values()))
    assert {rec.port for rec in auth_net.records.values()} <= {p for _ip, p in listening}
    assert_loopback(listening)


@net
def test_status_reports_every_process(sqlite_net: NetworkState) -> None:
    status = network_status(sqlite_net.root)
    assert status["up"] is True
    assert set(status["processes"]) == {"moto", "api", "combiner-1"}
    assert status["processes"]["api"]["port"] == sqlite_net.api_port
    assert status["statestore"]["kind"] == "sqlite"
    assert load_network_state(sqlite_net.root).api_url == sqlite_net.api_url


@net
def test_second_up_in_same_root_is_refused(sqlite_net: NetworkState) -> None:
    config = make_config(sqlite_net.root)
    with pytest.raises(FedsegError, match="already up"):
        network_up(config)


@net
def test_port_in_use_names_port_and_owner(sqlite_net: NetworkState, tmp_path: Path) -> None:
    config = make_config(tmp_path / "other", api_port=sqlite_net.api_port)
    with pytest.raises(FedsegError, match=rf"api_port {sqlite_net.api_port} is already in use "
                                          r"by pid \d+"):
        network_up(config)
    assert not (tmp_path / "other" / "network.json").exists()


# --- faults that need no running network ------------------------------------------------

@net
def test_unreachable_postgres_url_is_one_line_error(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    config = make_config(tmp_path, statestore="postgres-url",
                         postgres_url=f"postgresql://fedn:pw@127.0.0.1:{port}/fedn_db")
    with pytest.raises(FedsegError, match=f"127.0.0.1:{port}/fedn_db unreachable") as info:
        network_up(config)
    assert "\n" not in str(info.value)
    # moto was started first and must have been stopped again.
    assert ports.is_port_free(config.s3_port)
    assert not (tmp_path / "network.json").exists()


@net
def test_unreachable_s3_url_is_one_line_error(tmp_path: Path) -> None:
    port = free_port()
    config = make_config(tmp_path, s3="url", s3_endpoint=f"http://127.0.0.1:{port}",
                         s3_access_key="a", s3_secret_key="b")
    with pytest.raises(FedsegError, match=f"object store http://127.0.0.1:{port} unusable"):
        network_up(config)


@net
def test_down_after_crashed_process_cleans_up(tmp_path: Path) -> None:
    state = network_up(make_config(tmp_path))
    api = state.records["api"]
    workers = ports._session_members(api.pid)
    assert workers, "gunicorn should have forked a worker"
    os.kill(api.pid, signal.SIGKILL)  # the master dies, its worker is left behind
    time.sleep(0.5)
    assert network_status(tmp_path)["up"] is False
    stopped = network_down(tmp_path)
    assert "api" not in stopped or not psutil.pid_exists(api.pid)
    assert {"moto", "combiner-1"} <= set(stopped)
    assert_all_stopped(state)
    for worker in workers:
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    with pytest.raises(FedsegError, match="no network state"):
        network_down(tmp_path)


# --- two combiners with auth on ---------------------------------------------------------

@pytest.fixture(scope="module")
def auth_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkState]:
    root = tmp_path_factory.mktemp("net-auth")
    state = network_up(make_config(root, n_combiners=2, auth=True, hooks=True,
                                   hooks_port=free_port()))
    yield state
    network_down(root)
    assert_all_stopped(state)


@net
def test_auth_refuses_requests_without_token(auth_net: NetworkState) -> None:
    url = f"{auth_net.api_url}api/v1/clients/add"
    answer = requests.post(url, json={"name": "intruder", "client_id": "x"}, timeout=5)
    assert answer.status_code == 401
    answer = requests.get(f"{auth_net.api_url}api/v1/models/", timeout=5,
                          headers={"Authorization": f"Bearer {auth_net.client_token}"})
    assert answer.status_code == 401  # a client token is no admin token


@net
def test_auth_client_without_token_is_refused(auth_net: NetworkState, tmp_path: Path) -> None:
    procs = start_clients(auth_net, ["nobody"], tmp_path, token=None)
    try:
        time.sleep(4)
        names = [c["name"] for c in auth_net.api_client().get_clients().get("result", [])]
        assert "nobody" not in names
    finally:
        stop_clients(procs)


@net
def test_two_combiners_with_auth_and_hooks_run_two_rounds(auth_net: NetworkState,
                                                tmp_path: Path) -> None:
    preferred = {"c1": "combiner-1", "c2": "combiner-2"}
    session_id, online = experiment(auth_net, tmp_path, ["c1", "c2"], preferred=preferred,
                                    min_clients=1, server_functions=STEP_HOOK)
    assert {c["name"]: c["combiner"] for c in online} == preferred
    client = auth_net.api_client()
    assert len(client.get_models(session_id=session_id)["result"]) == 2
    rounds = client.get_rounds()["result"]
    # Both combiners took part in every round of the session.
    assert all(len(r["combiners"]) == 2 for r in rounds), rounds
    # Each combiner keeps its temporary model files in a folder of its own (fedn's
    # shared default let one combiner delete the other's global model mid-round).
    dirs = {c.name: psutil.Process(c.pid).environ()["FEDN_MODEL_DIR"]
            for c in auth_net.combiners}
    assert dirs == {c.name: str(combiner_model_dir(auth_net.root, c.name))
                    for c in auth_net.combiners}
    # The hooks service sent step 3 to every client in both rounds.
    weights = final_weights(auth_net, session_id, tmp_path)
    np.testing.assert_allclose(weights[1], seed_weights()[1] + 6.0)


# --- closed by default: every route class refuses missing, wrong and expired tokens -----

def _tokens(state: NetworkState, role: str) -> dict[str, str | None]:
    """none / forged (other secret) / expired (right secret) / valid tokens for ``role``."""
    secret = (state.root / "jwt-secret").read_text().strip()
    return {"none": None,
            "forged": auth_mod.mint_token(auth_mod.new_secret(), role, "mallory", 600),
            "expired": auth_mod.mint_token(secret, role, "late", lifetime_s=-30),
            "valid": state.fresh_token(role, "tester")}


def _rest_status(state: NetworkState, method: str, path: str, token: str | None,
                 body: dict | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answer = requests.request(method, f"{state.api_url}{path}", json=body, headers=headers,
                              timeout=10)
    return answer.status_code


def _grpc_status(combiner: CombinerState, token: str | None,
                 user_agent: str | None = None) -> str:
    import fedn.network.grpc.fedn_pb2 as fedn_pb2
    import fedn.network.grpc.fedn_pb2_grpc as fedn_rpc

    options = [("grpc.primary_user_agent", user_agent)] if user_agent else []
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(f"{combiner.host}:{combiner.port}", options=options) as channel:
        beat = fedn_pb2.Heartbeat(sender=fedn_pb2.Client(name="probe", role=fedn_pb2.CLIENT,
                                                         client_id="probe"))
        try:
            fedn_rpc.ConnectorStub(channel).SendHeartbeat(beat, metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


def _grpc_control_status(combiner: CombinerState, token: str | None) -> str:
    import fedn.network.grpc.fedn_pb2 as fedn_pb2
    import fedn.network.grpc.fedn_pb2_grpc as fedn_rpc

    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(f"{combiner.host}:{combiner.port}") as channel:
        try:
            fedn_rpc.ControlStub(channel).Stop(fedn_pb2.ControlRequest(), metadata=metadata,
                                               timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


def test_network_is_closed_by_default(tmp_path: Path) -> None:
    config = NetworkConfig.default(tmp_path / "net")
    assert config.auth and config.token_lifetime_s == 24 * 3600
    with pytest.raises(FedsegError, match="token_lifetime_s 5 must be between"):
        NetworkConfig.from_dict({"token_lifetime_s": 5}, "net.yaml", tmp_path)


@net
def test_every_route_class_refuses_missing_wrong_and_expired_tokens(
        auth_net: NetworkState) -> None:
    admin, client = _tokens(auth_net, "admin"), _tokens(auth_net, "client")
    routes = [  # (route class, method, path, body, token role)
        ("rest admin", "GET", "api/v1/sessions/", None, admin),
        ("graphql", "POST", "api/v1/graphql", {"query": "{ sessions { session_id } }"}, admin),
        ("metrics list", "POST", "api/v1/metrics/list", {}, admin),
        ("models", "GET", "api/v1/models/", None, admin),
        ("client add", "POST", "api/v1/clients/add", {"name": "x", "client_id": "x"}, client),
        ("package checksum", "GET", "api/v1/packages/checksum", None, client),
    ]
    for route, method, path, body, tokens in routes:
        for kind in ("none", "forged", "expired"):
            code = _rest_status(auth_net, method, path, tokens[kind], body)
            assert code == 401, (route, kind, code)
        code = _rest_status(auth_net, method, path, tokens["valid"], body)
        assert code != 401, (route, "valid", code)
    assert _rest_status(auth_net, "GET", "health", None) == 200  # readiness probe only
    for combiner in auth_net.combiners:
        for kind in ("none", "forged", "expired"):
            assert _grpc_status(combiner, client[kind]) == "UNAUTHENTICATED", kind
        assert _grpc_status(combiner, None, user_agent="grpc_health_probe") == "UNAUTHENTICATED"
        assert _grpc_status(combiner, admin["valid"]) == "PERMISSION_DENIED"
        assert _grpc_status(combiner, client["valid"]) == "OK"
        # The Control service (start/stop rounds): the API server's controller token only.
        for kind in ("none", "forged", "expired", "valid"):
            code = _grpc_control_status(combiner, client[kind])
            assert code in ("UNAUTHENTICATED", "PERMISSION_DENIED"), (kind, code)


@net
def test_no_token_or_secret_in_any_command_line(auth_net: NetworkState, tmp_path: Path) -> None:
    token = auth_net.fresh_token("client", "ps-check")
    assert token is not None
    upload_package_and_seed(auth_net, tmp_path / "work")
    procs = start_clients(auth_net, ["ps1"], tmp_path, token)
    try:
        wait_for_clients(auth_net, 1)  # it registered and streams tasks: token accepted
        secret = (auth_net.root / "jwt-secret").read_text().strip()
        leaked = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            line = " ".join(proc.info["cmdline"] or [])
            for name, value in (("token", token), ("client token", auth_net.client_token),
                                ("admin token", auth_net.admin_token), ("secret", secret)):
                if value and value in line:
                    leaked.append((proc.info["pid"], name))
        assert leaked == []
        # The client did get its token: its config file, owner-only.
        config = tmp_path / "ps1" / "fedn-client.yaml"
        assert token in config.read_text() and config.stat().st_mode & 0o777 == 0o600
    finally:
        stop_clients(procs)
    for name in ("network.json", "jwt-secret", "fedn-settings.yaml", "network-config.yaml"):
        assert (auth_net.root / name).stat().st_mode & 0o777 == 0o600, name


@net
def test_s3_refuses_wrong_credentials(auth_net: NetworkState) -> None:
    import boto3
    import botocore.exceptions

    cfg = auth_net.storage["storage_config"]

    def list_with(access: str, secret: str) -> str:
        s3 = boto3.client("s3", endpoint_url=cfg["storage_endpoint"], region_name="eu-west-1",
                          aws_access_key_id=access, aws_secret_access_key=secret)
        try:
            s3.list_buckets()
        except botocore.exceptions.ClientError as exc:
            return str(exc.response["Error"]["Code"])
        return "OK"

    assert list_with(cfg["storage_access_key"], cfg["storage_secret_key"]) == "OK"
    assert list_with("fedseg", "fedseg-moto-secret") == "InvalidAccessKeyId"  # old fixed key
    assert list_with(cfg["storage_access_key"], "wrong") == "SignatureDoesNotMatch"
    endpoint = cfg["storage_endpoint"]
    assert requests.get(f"{endpoint}/fedn-models", timeout=5).status_code == 403  # anonymous
    # moto's admin API would switch authentication off or dump every object.
    assert requests.post(f"{endpoint}/moto-api/reset-auth", data=b"1000",
                         timeout=5).status_code == 403
    assert requests.get(f"{endpoint}/moto-api/data.json", timeout=5).status_code == 403
    assert list_with("fedseg", "fedseg-moto-secret") == "InvalidAccessKeyId"


@net
def test_expired_state_tokens_are_renewed_on_load(auth_net: NetworkState) -> None:
    import json

    import jwt

    path = auth_net.root / "network.json"
    original = path.read_text()
    expired = _tokens(auth_net, "admin")["expired"]
    try:
        path.write_text(json.dumps({**json.loads(original), "admin_token": expired}))
        assert _rest_status(auth_net, "GET", "api/v1/models/", expired) == 401
        loaded = load_network_state(auth_net.root)
        claims = jwt.decode(loaded.admin_token, options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == int(auth_net.token_lifetime_s)
        assert claims["exp"] > time.time() + 3600
        assert _rest_status(auth_net, "GET", "api/v1/models/", loaded.admin_token) == 200
    finally:
        path.write_text(original)
        os.chmod(path, 0o600)


# --- managed PostgreSQL ----------------------------------------------------------------

@net
@pytest.mark.postgres
def test_managed_postgres_network_runs_two_rounds(tmp_path: Path) -> None:
    if find_postgres_bindir() is None:
        pytest.skip("PostgreSQL's initdb/postgres are not installed")
    # The postgres user must be able to enter the root (pytest's tmp is 0700).
    root = Path(tempfile.mkdtemp(prefix="fedseg-pg-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        state = network_up(make_config(root, statestore="postgres-managed", hooks=True,
                                       hooks_port=free_port()))
        try:
            assert state.statestore["type"] == "PostgreSQL"
            # ServerFunctions source > 255 characters: needs fedn_compat's bug 8 fix.
            session_id, _ = experiment(state, tmp_path, ["c1", "c2"],
                                       server_functions=STEP_HOOK)
            assert len(state.api_client().get_models(session_id=session_id)["result"]) == 2
            weights = final_weights(state, session_id, tmp_path)
            np.testing.assert_allclose(weights[0], seed_weights()[0] + 6.0)
        finally:
            stopped = network_down(root)
        assert stopped == ["combiner-1", "api", "hooks", "postgres", "moto"]
        assert_all_stopped(state)
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


@net
@pytest.mark.postgres
def test_external_postgres_and_s3_by_url_are_left_running(tmp_path: Path) -> None:
    """postgres-url + s3 url: down stops only what up started, not the stores."""
    if find_postgres_bindir() is None:
        pytest.skip("PostgreSQL's initdb/postgres are not installed")
    stores_root = Path(tempfile.mkdtemp(prefix="fedseg-ext-", dir="/tmp"))
    os.chmod(stores_root, 0o755)
    pg_port, s3_port = free_ports(2)
    started = []
    try:
        pg_record, statestore = stores.start_managed_postgres(stores_root, pg_port, 60)
        started.append(pg_record)
        moto_record, storage = stores.start_moto(stores_root, s3_port, "eu-west-1", 60)
        started.append(moto_record)
        pg = statestore["postgres_config"]
        url = f"postgresql://{pg['username']}:{pg['password']}@127.0.0.1:{pg_port}/fedn_db"
        bad = make_config(tmp_path, statestore="postgres-url",
                          postgres_url=url.replace(pg["password"], "wrong"))
        with pytest.raises(FedsegError, match=r"unreachable: .*password") as info:
            network_up(bad)
        assert "wrong" not in str(info.value)  # passwords stay out of messages
        s3 = storage["storage_config"]
        config = make_config(tmp_path, statestore="postgres-url", postgres_url=url, s3="url",
                             s3_endpoint=s3["storage_endpoint"],
                             s3_access_key=s3["storage_access_key"],
                             s3_secret_key=s3["storage_secret_key"])
        state = network_up(config)
        assert set(state.processes) == {"api", "combiner-1"}
        assert state.api_client().get_combiners()["count"] == 1
        assert network_down(tmp_path) == ["combiner-1", "api"]
        assert ports.is_alive(pg_record) and ports.is_alive(moto_record)
    finally:
        for record in reversed(started):
            ports.stop(record)
        subprocess.run(["rm", "-rf", str(stores_root)], check=False)


# --- the CLI ---------------------------------------------------------------------------

@net
def test_cli_up_status_down_then_up_again_on_kept_store(tmp_path: Path) -> None:
    config = make_config(tmp_path / "net", n_combiners=2)
    config_file = tmp_path / "network.yaml"
    import yaml

    config_file.write_text(yaml.safe_dump(config.to_dict()))
    runner = CliRunner()
    result = runner.invoke(cli, ["network", "up", "--config", str(config_file), "--auth"])
    assert result.exit_code == 0, result.output
    try:
        result = runner.invoke(cli, ["network", "status", "--root", str(config.root)])
        assert result.exit_code == 0, result.output
        assert "combiner-1" in result.output and "alive" in result.output
        assert "auth on" in result.output
    finally:
        result = runner.invoke(cli, ["network", "down", "--root", str(config.root)])
    assert result.exit_code == 0, result.output
    assert "stopped" in result.output
    result = runner.invoke(cli, ["network", "down", "--root", str(config.root)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "no network state" in result.output

    # The SQLite store survived; one combiner on a new port must replace both (bug 9).
    again = make_config(config.root)
    state = network_up(again)
    try:
        stored = state.api_client().get_combiners()["result"]
        assert [(c["name"], c["port"]) for c in stored] == [
            ("combiner-1", again.combiners[0].port)]
    finally:
        network_down(config.root)


@pytest.mark.parametrize("damage", ["junk", "torn-header", "truncated", "bad-pages"])
def test_cli_up_refuses_corrupt_sqlite_store(tmp_path: Path, damage: str) -> None:
    config = make_config(tmp_path / "net")
    config.root.mkdir(parents=True)
    store = config.root / "fedn.sqlite"
    if damage == "junk":
        store.write_bytes(b"this is not a database\n" * 200)
    else:
        # A real SQLite file with several pages, then damaged in place.
        import sqlite3

        conn = sqlite3.connect(store)
        conn.execute("CREATE TABLE t (x TEXT)")
        conn.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 100)
        conn.execute("CREATE INDEX ix ON t (x)")
        conn.commit()
        conn.close()
        data = bytearray(store.read_bytes())
        if damage == "torn-header":
            data[0:16] = b"\x00" * 16
        elif damage == "truncated":
            del data[len(data) // 2:]
        else:
            for offset in range(4096, len(data), 4096):  # page headers after the first
                data[offset:offset + 8] = b"\xff" * 8
        store.write_bytes(bytes(data))
    config_file = tmp_path / "network.yaml"
    import yaml

    config_file.write_text(yaml.safe_dump(config.to_dict()))
    result = CliRunner(mix_stderr=False).invoke(cli, ["network", "up", "--config",
                                                      str(config_file)])
    if result.exit_code == 0:
        network_down(config.root)  # came up on a damaged store: stop it, then fail
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{store}: corrupt SQLite state store (" in lines[0]
    # Refused before anything started, and nothing was written over the damaged file.
    assert not (config.root / "network.json").exists()
    assert all(ports.is_port_free(p) for p in config.ports().values())


# --- process handling (plain processes, no FEDn) ---------------------------------------

def test_stop_ends_the_whole_process_group(tmp_path: Path) -> None:
    record = ports.spawn("sh", ["/bin/sh", "-c", "sleep 60 & sleep 60"], cwd=tmp_path,
                         log=tmp_path / "sh.log", env={"PATH": os.environ["PATH"]})
    deadline = time.monotonic() + 10
    while not ports._session_members(record.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    children = ports._session_members(record.pid)
    assert children, "the shell should have started its sleeps"
    assert ports.stop(record, timeout_s=5) is True
    assert not ports.is_alive(record)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    assert ports.stop(record) is False  # already gone


def test_stop_never_signals_a_reused_pid(tmp_path: Path) -> None:
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        # A record whose pid is now someone else's (its creation time differs).
        record = ports.ProcessRecord(name="old", pid=victim.pid, create_time=1.0, port=None,
                                     log=str(tmp_path / "x.log"))
        assert not ports.is_alive(record)
        assert ports.stop(record, timeout_s=1) is False
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_process_record_roundtrip() -> None:
    record = ports.ProcessRecord("postgres", 12, 3.5, 5433, "/x/postgres.log",
                                 stop_signal=int(signal.SIGINT))
    assert ports.ProcessRecord.from_dict(record.to_dict()) == record


def test_spawn_missing_program_is_fedseg_error(tmp_path: Path) -> None:
    with pytest.raises(FedsegError, match="cannot start ghost"):
        ports.spawn("ghost", [str(tmp_path / "no-such-program")], cwd=tmp_path,
                    log=tmp_path / "g.log", env={})


def test_free_ports_are_distinct_and_bindable() -> None:
    chosen = free_ports(5)
    assert len(set(chosen)) == 5
    assert all(ports.is_port_free(p) for p in chosen) and ports.is_port_free(free_port())
