"""A network on a reachable address (TLS, tokens) and clinic kits, with real processes.

The server listens on an address that exists only on a veth pair this module creates;
the other end of the pair is in a network namespace of its own, where a clinic's
client runs (``ip netns exec``). Everything is removed afterwards. Without the right
to create namespaces (not root, no ``ip``), the tests say so and skip.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import requests
import yaml
from helpers import fedseg_cli
from test_network import (
    final_weights,
    listeners_of,
    net,
    run_session,
    seed_weights,
    upload_package_and_seed,
)

from fedseg.orchestration.netns import Netns, namespaces_unavailable
from fedseg.orchestration.network import (
    CombinerSpec,
    NetworkConfig,
    NetworkState,
    load_network_state,
    network_down,
    network_up,
)
from fedseg.orchestration.network import auth as auth_mod
from fedseg.orchestration.network import tls as tls_mod
from fedseg.orchestration.network.clinics import add_clinic, revoke_clinic
from fedseg.orchestration.network.ports import free_ports
from fedseg_clinic.errors import FedsegError

VENV_BIN = Path(sys.executable).parent


# --- the namespace ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    why = namespaces_unavailable()
    if why is not None:
        pytest.skip(why)
    ns = Netns(3)
    try:
        ns.up()
    except (subprocess.CalledProcessError, OSError) as exc:
        ns.down()
        pytest.skip(f"cannot create the test's namespaces: {exc}")
    try:
        yield ns
    finally:
        ns.down()
    assert not ns.leftovers()


def tls_config(root: Path, host: str, **overrides: object) -> NetworkConfig:
    api, s3, pg, comb = free_ports(4)
    config = NetworkConfig(root=root, api_port=api, s3_port=s3, postgres_port=pg,
                           combiners=[CombinerSpec("combiner-1", comb)],
                           startup_timeout_s=60, api_workers=1, host=host)
    for key, value in overrides.items():
        setattr(config, key, value)
    config.validate()
    return config


@pytest.fixture(scope="module")
def tls_net(netns: Netns, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkState]:
    root = tmp_path_factory.mktemp("tlsnet")
    state = network_up(tls_config(root, netns.host_ip))
    try:
        yield state
    finally:
        network_down(root)


# --- config (no processes) ----------------------------------------------------------------

def test_off_loopback_auth_cannot_be_turned_off(tmp_path: Path) -> None:
    with pytest.raises(FedsegError, match="auth cannot be turned off"):
        NetworkConfig.from_dict({"host": "10.1.2.3", "auth": False}, "net.yaml", tmp_path)
    assert NetworkConfig.from_dict({"host": "10.1.2.3"}, "net.yaml", tmp_path).tls
    assert not NetworkConfig.default(tmp_path).tls  # loopback: as before
    with pytest.raises(FedsegError, match="tls_cert, tls_key and tls_ca go together"):
        NetworkConfig.from_dict({"host": "10.1.2.3", "tls_cert": "c.pem"}, "net.yaml", tmp_path)
    with pytest.raises(FedsegError, match="host 'a b'"):
        NetworkConfig.from_dict({"host": "a b"}, "net.yaml", tmp_path)


def test_cli_refuses_no_auth_off_loopback(tmp_path: Path) -> None:
    result = fedseg_cli(["network", "up", "--root", str(tmp_path / "n"), "--host", "10.1.2.3",
                         "--no-auth"])
    assert result.exit_code == 1
    assert "auth cannot be turned off" in result.output and "Traceback" not in result.output


def test_private_ca_issues_a_server_cert_for_the_host(tmp_path: Path) -> None:
    from cryptography import x509

    files = tls_mod.prepare_tls(tmp_path, "10.9.8.7")
    assert tls_mod.certificate_hosts(files.cert) == ["10.9.8.7", "127.0.0.1"]
    assert files.key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "tls" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if not signed by the CA
    ca_before = files.ca.read_bytes()
    again = tls_mod.prepare_tls(tmp_path, "10.9.8.6")  # the CA is kept, the cert renewed
    assert again.ca.read_bytes() == ca_before
    assert tls_mod.certificate_hosts(again.cert)[0] == "10.9.8.6"
    with pytest.raises(FedsegError, match=r"not 10\.1\.1\.1"):
        tls_mod.prepare_tls(tmp_path, "10.1.1.1", files.cert, files.key, files.ca)


def test_host_not_on_this_machine_is_one_line_error(tmp_path: Path) -> None:
    # 192.0.2.0/24 (TEST-NET-1) minus what this machine has: pick one it does not own.
    own = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    host = next(f"198.51.100.{i}" for i in range(10, 250) if f"198.51.100.{i}" not in own)
    with pytest.raises(FedsegError, match=re.escape(f"host {host}: cannot listen there")):
        network_up(tls_config(tmp_path / "net", host))
    assert not (tmp_path / "net" / "network.json").exists()


# --- a TLS network ------------------------------------------------------------------------

def _heartbeat(host: str, port: int, token: str | None, ca: Path | None) -> str:
    import fedn.network.grpc.fedn_pb2 as fedn_pb2
    import fedn.network.grpc.fedn_pb2_grpc as fedn_rpc

    metadata = [("authorization", f"Bearer {token}")] if token else []
    target = f"{host}:{port}"
    channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(ca.read_bytes()))
               if ca else grpc.insecure_channel(target))
    with channel:
        beat = fedn_pb2.Heartbeat(sender=fedn_pb2.Client(name="probe", role=fedn_pb2.CLIENT,
                                                         client_id="probe"))
        try:
            fedn_rpc.ConnectorStub(channel).SendHeartbeat(beat, metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


@net
def test_tls_network_serves_https_and_grpc_over_tls_only(tls_net: NetworkState,
                                                         netns: Netns) -> None:
    state = tls_net
    assert state.api_url == f"https://{netns.host_ip}:{state.api_port}/"
    assert load_network_state(state.root).api_url == state.api_url  # network.json
    ca = Path(str(state.tls_ca))
    assert requests.get(f"{state.api_url}health", verify=str(ca), timeout=10).status_code == 200
    with pytest.raises(requests.exceptions.SSLError):  # not our CA's: refused
        requests.get(f"{state.api_url}health", timeout=10)
    plain = f"http://{netns.host_ip}:{state.api_port}/health"
    try:
        answer = requests.get(plain, timeout=10)
        got_http = answer.status_code == 200
    except requests.RequestException:
        got_http = False
    assert not got_http, "plain HTTP got an answer"
    # The operator's API client speaks HTTPS with the CA and a token.
    assert "result" in state.api_client().get_combiners()
    combiner = state.combiners[0]
    assert combiner.host == netns.host_ip
    token = state.fresh_token("client", "probe")
    assert _heartbeat(combiner.host, combiner.port, token, ca) == "OK"
    assert _heartbeat(combiner.host, combiner.port, None, ca) == "UNAUTHENTICATED"
    assert _heartbeat(combiner.host, combiner.port, token, None) == "UNAVAILABLE"  # plain
    # API and combiner listen on the chosen address only; the stores stay on loopback.
    listening = dict(((port, ip) for ip, port in listeners_of(set(state.processes.values()))))
    assert listening[state.api_port] == netns.host_ip
    assert listening[combiner.port].removeprefix("::ffff:") == netns.host_ip
    others = {p: ip for p, ip in listening.items() if p not in (state.api_port, combiner.port)}
    assert others and all(ip.removeprefix("::ffff:").startswith("127.") for ip in others.values())
    for name in ("server-key.pem", "ca-key.pem"):
        assert (state.root / "tls" / name).stat().st_mode & 0o777 == 0o600


@net
def test_clinic_kit_token_works_until_revoked(tls_net: NetworkState, tmp_path: Path) -> None:
    state = tls_net
    kit = tmp_path / "kit-a"
    result = fedseg_cli(["clinic", "add", "clinic-a", "--network", str(state.root),
                         "--out", str(kit)])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((kit / "fedn-client.yaml").read_text())
    token = config["token"]
    assert token not in result.output  # never printed
    assert (kit / "fedn-client.yaml").stat().st_mode & 0o777 == 0o600
    assert kit.stat().st_mode & 0o777 == 0o700
    assert (kit / "ca.pem").read_bytes() == Path(str(state.tls_ca)).read_bytes()
    assert config["api_url"] == f"https://{state.api_host}" and config["api_port"] == \
        state.api_port
    readme = (kit / "README.md").read_text()
    assert str(state.combiners[0].port) in readme and str(state.api_port) in readme
    ca = kit / "ca.pem"
    combiner = state.combiners[0]
    assert _heartbeat(combiner.host, combiner.port, token, ca) == "OK"
    headers = {"Authorization": f"Bearer {token}"}
    checksum = f"{state.api_url}api/v1/packages/checksum"
    assert requests.get(checksum, headers=headers, verify=str(ca), timeout=10).status_code \
        != 401
    sessions = f"{state.api_url}api/v1/sessions/"  # admin routes: not for a clinic
    assert requests.get(sessions, headers=headers, verify=str(ca), timeout=10).status_code \
        == 401
    # A second kit for the same clinic needs a revoke first.
    with pytest.raises(FedsegError, match="already has a kit"):
        add_clinic(state.root, "clinic-a", tmp_path / "kit-a2")
    result = fedseg_cli(["clinic", "revoke", "clinic-a", "--network", str(state.root)])
    assert result.exit_code == 0, result.output
    assert _heartbeat(combiner.host, combiner.port, token, ca) == "UNAUTHENTICATED"
    assert requests.get(checksum, headers=headers, verify=str(ca), timeout=10).status_code \
        == 401
    # Other tokens still work; a token of another network (other secret) never did.
    assert _heartbeat(combiner.host, combiner.port, state.fresh_token("client", "x"), ca) \
        == "OK"
    foreign = auth_mod.mint_token(auth_mod.new_secret(), "client", "clinic:x", 3600)
    assert _heartbeat(combiner.host, combiner.port, foreign, ca) == "UNAUTHENTICATED"
    with pytest.raises(FedsegError, match="already revoked"):
        revoke_clinic(state.root, "clinic-a")
    add_clinic(state.root, "clinic-a", tmp_path / "kit-a3")  # a new kit after revoking
    new_token = yaml.safe_load((tmp_path / "kit-a3" / "fedn-client.yaml").read_text())["token"]
    assert _heartbeat(combiner.host, combiner.port, new_token, ca) == "OK"
    assert (state.root / "clinics.json").stat().st_mode & 0o777 == 0o600
    assert (state.root / "revoked-tokens.json").stat().st_mode & 0o777 == 0o600


# --- a clinic in its own namespace --------------------------------------------------------

def _start_kit_client(namespace: str, kit: Path, data: Path, **extra: str
                      ) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDN_", "FEDSEG_"))}
    env.update({"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
                "FEDSEG_PYTHON": sys.executable, "FEDSEG_DATA_DIR": str(data),
                "FEDN_HOME_DIR": str(kit), **extra})
    log = open(kit / "client.log", "wb")
    try:
        return subprocess.Popen(["ip", "netns", "exec", namespace, "sh",
                                 str(kit / "run-client.sh")], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def _everything_the_server_holds(state: NetworkState) -> bytes:
    """Every object in the network's S3 buckets and every file under its folder."""
    import boto3

    cfg = state.storage["storage_config"]
    s3 = boto3.client("s3", endpoint_url=cfg["storage_endpoint"], region_name="eu-west-1",
                      aws_access_key_id=cfg["storage_access_key"],
                      aws_secret_access_key=cfg["storage_secret_key"])
    blobs = []
    for bucket in s3.list_buckets()["Buckets"]:
        for item in s3.list_objects_v2(Bucket=bucket["Name"]).get("Contents", []):
            blobs.append(s3.get_object(Bucket=bucket["Name"], Key=item["Key"])["Body"].read())
    blobs += [p.read_bytes() for p in state.root.rglob("*") if p.is_file()]
    assert len(blobs) > 5  # models, package, logs, the state store
    return b"\n".join(blobs)


def _online(state: NetworkState) -> set[str]:
    clients = state.api_client().get_clients().get("result", [])
    return {c["name"] for c in clients if c.get("status") == "online"}


def _client_ids(state: NetworkState) -> set[str]:
    """Every client id the API has seen (online or not)."""
    return {str(c["client_id"]) for c in state.api_client().get_clients().get("result", [])}


def _new_online_ids(state: NetworkState, names: list[str], before: set[str]) -> list[str]:
    """Ids of the clients named ``names`` that came online after ``before`` was taken.

    The module's network is shared: an earlier test's clients of the same names stay
    "online" for a few seconds after they stop, and a session that selects them waits for
    their updates until its round timeout.
    """
    clients = state.api_client().get_clients().get("result", [])
    return sorted(str(c["client_id"]) for c in clients
                  if c.get("name") in names and c.get("status") == "online"
                  and str(c["client_id"]) not in before)


@net
def test_three_clinics_in_their_own_namespaces_train_a_round_over_tls(
        tls_net: NetworkState, netns: Netns, tmp_path: Path) -> None:
    state = tls_net
    upload_package_and_seed(state, tmp_path / "work")
    data = tmp_path / "data"
    data.mkdir()
    marker = f"clinic-data-{secrets.token_hex(16)}".encode()
    (data / "case-0001.nii").write_bytes(marker * 64)
    names = [f"clinic-ns{i}" for i in range(len(netns.names))]
    kits = [add_clinic(state.root, name, tmp_path / f"kit-{name}") for name in names]
    # Refused: a revoked kit, another network's token, a kit trusting another CA.
    revoked = add_clinic(state.root, "clinic-gone", tmp_path / "kit-gone")
    revoke_clinic(state.root, "clinic-gone")
    foreign = tmp_path / "kit-foreign"
    shutil.copytree(kits[0], foreign)
    config = yaml.safe_load((foreign / "fedn-client.yaml").read_text())
    config.update(name="clinic-foreign", client_id=str(uuid.uuid4()),
                  token=auth_mod.mint_token(auth_mod.new_secret(), "client", "x", 3600))
    (foreign / "fedn-client.yaml").write_text(yaml.safe_dump(config))
    other_ca = add_clinic(state.root, "clinic-otherca", tmp_path / "kit-otherca")
    tls_mod.create_ca(tmp_path / "other-ca", "another CA")
    shutil.copy(tmp_path / "other-ca" / "ca.pem", other_ca / "ca.pem")
    procs = [_start_kit_client(ns, kit, data) for ns, kit in zip(netns.names, kits, strict=True)]
    procs += [_start_kit_client(netns.names[1], kit, data)
              for kit in (revoked, foreign, other_ca)]
    try:
        deadline = time.monotonic() + 120
        while set(names) - _online(state) and time.monotonic() < deadline:
            for proc, kit in zip(procs, kits, strict=False):
                assert proc.poll() is None, (kit / "client.log").read_text()[-2000:]
            time.sleep(0.5)
        assert set(names) <= _online(state), (kits[-1] / "client.log").read_text()[-2000:]
        session_id = run_session(state, rounds=1, min_clients=len(names))  # "Finished"
        weights = final_weights(state, session_id, tmp_path / "work")
        assert any(not np.array_equal(w, s) for w, s in zip(weights, seed_weights(), strict=True))
        assert _online(state) & {"clinic-gone", "clinic-foreign", "clinic-otherca"} == set()
        for kit in (revoked, foreign):  # refused at the API: revoked / other network's token
            assert "Connect to FEDn Api - Unauthorized" in (kit / "client.log").read_text()
        # The server's certificate does not verify against another CA: no connection.
        assert "CERTIFICATE_VERIFY_FAILED" in (other_ca / "client.log").read_text()
        assert marker not in _everything_the_server_holds(state)
        for kit in kits:  # each reached the server over HTTPS, from its own namespace
            log = (kit / "client.log").read_text()
            assert f"https://{netns.host_ip}:" in log
            token = yaml.safe_load((kit / "fedn-client.yaml").read_text())["token"]
            assert token not in log  # never logged
    finally:
        for proc in procs:
            _stop(proc)


def test_revocation_list_refuses_revoked_jti_and_rereads_on_change(tmp_path: Path) -> None:
    import jwt

    from fedseg.orchestration.network.revocation import (
        RevocationAwareJwt,
        _RevocationList,
        revoke,
    )

    secret = auth_mod.new_secret()
    path = tmp_path / "revoked-tokens.json"
    checker = RevocationAwareJwt(_RevocationList(path))
    token_a = auth_mod.mint_token(secret, "client", "clinic:a", 3600, jti="a" * 32)
    token_b = auth_mod.mint_token(secret, "client", "clinic:b", 3600, jti="b" * 32)
    assert checker.decode(token_a, secret, algorithms=["HS256"])["sub"] == "clinic:a"
    revoke(path, "a" * 32, "a")
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(jwt.InvalidTokenError, match="revoked"):
        checker.decode(token_a, secret, algorithms=["HS256"])
    assert checker.decode(token_b, secret, algorithms=["HS256"])["sub"] == "clinic:b"
    assert checker.ExpiredSignatureError is jwt.ExpiredSignatureError  # as fedn uses it
    path.write_text("{ damaged")  # a damaged list keeps the last one read: still refused
    with pytest.raises(jwt.InvalidTokenError, match="revoked"):
        checker.decode(token_a, secret, algorithms=["HS256"])


@net
def test_operator_supplied_certificates(netns: Netns, tmp_path: Path) -> None:
    hospital = tmp_path / "hospital-pki"
    tls_mod.create_ca(hospital, "hospital CA")
    cert, key = tls_mod.issue_server_cert(hospital, [netns.host_ip])
    root = tmp_path / "net"
    state = network_up(tls_config(root, netns.host_ip, tls_cert=cert, tls_key=key,
                                  tls_ca=hospital / "ca.pem"))
    try:
        assert state.tls_ca == str(hospital / "ca.pem")
        assert not (root / "tls").exists()  # no CA of fedseg's own
        answer = requests.get(f"{state.api_url}health", verify=str(hospital / "ca.pem"),
                              timeout=10)
        assert answer.status_code == 200
        kit = add_clinic(root, "clinic-h", tmp_path / "kit")
        assert (kit / "ca.pem").read_bytes() == (hospital / "ca.pem").read_bytes()
        combiner = state.combiners[0]
        token = yaml.safe_load((kit / "fedn-client.yaml").read_text())["token"]
        assert _heartbeat(combiner.host, combiner.port, token, kit / "ca.pem") == "OK"
    finally:
        network_down(root)


@net
def test_keep_secret_lets_clinic_kits_survive_a_restart(netns: Netns, tmp_path: Path) -> None:
    root = tmp_path / "net"
    config = tls_config(root, netns.host_ip, keep_secret=True)
    network_up(config)
    try:
        kit = add_clinic(root, "clinic-k", tmp_path / "kit")
        gone = add_clinic(root, "clinic-g", tmp_path / "kit-g")
        revoke_clinic(root, "clinic-g")
    finally:
        network_down(root)
    assert (root / "jwt-secret").stat().st_mode & 0o777 == 0o600  # kept, owner only
    state = network_up(config)
    try:
        combiner = state.combiners[0]
        ca = kit / "ca.pem"
        assert ca.read_bytes() == Path(str(state.tls_ca)).read_bytes()  # the CA is kept
        token = yaml.safe_load((kit / "fedn-client.yaml").read_text())["token"]
        assert _heartbeat(combiner.host, combiner.port, token, ca) == "OK"
        revoked = yaml.safe_load((gone / "fedn-client.yaml").read_text())["token"]
        assert _heartbeat(combiner.host, combiner.port, revoked, ca) == "UNAUTHENTICATED"
    finally:
        network_down(root)
    # Without keep_secret a restart ends every earlier token.
    config.keep_secret = False
    state = network_up(config)
    try:
        combiner = state.combiners[0]
        assert _heartbeat(combiner.host, combiner.port, token, ca) == "UNAUTHENTICATED"
    finally:
        network_down(root)
    assert not (root / "jwt-secret").exists()


# --- fedseg run against a TLS network -----------------------------------------------------

def _toy_run(folder: Path, name: str, route: str) -> dict:
    """A toy experiment (tests/toy_clinic_app.py or the numpy test package), 2 clinics."""
    import json

    from fedseg_clinic.cases import FORMAT_VERSION

    tests = Path(__file__).resolve().parent
    for client in ("clinic-1", "clinic-2"):
        (folder / client).mkdir(parents=True, exist_ok=True)
        (folder / client / "manifest.json").write_text(json.dumps(
            {"clinic": client, "cases": [], "format_version": FORMAT_VERSION}))
    doc: dict = {
        "name": name, "seed": 3,
        "data": {"clinics": {c: str(folder / c) for c in ("clinic-1", "clinic-2")}},
        "seed_builder": "toy_clinic_app:build_seed",
        "session": {"rounds": 2, "round_timeout": 120, "min_clients": 2},
        "clients": {"route": route, "app": "toy_clinic_app:ToyApp.from_environment",
                    "env": {"PYTHONPATH": str(tests)}},
    }
    if route == "package":
        doc["package"] = str(tests / "fednpkg_numpy")
    return doc


@net
@pytest.mark.parametrize("route", ["callback", "package"])
def test_fedseg_run_on_a_tls_network(tls_net: NetworkState, tmp_path: Path,
                                     route: str) -> None:
    """`fedseg run --network` on a network with TLS: its clients get the CA (both routes)."""
    from fedseg.orchestration.experiment import parse_experiment
    from fedseg.orchestration.runlog import pivot, read_rounds
    from fedseg.orchestration.runner import run_experiment

    exp = parse_experiment(_toy_run(tmp_path / "exp", f"tls-{route}", route), source="test")
    result = run_experiment(exp, tmp_path / "runs", network_root=tls_net.root)
    assert result.status == "finished", result
    table = pivot(read_rounds(result.run_dir))
    for k in (1, 2):
        for client in ("clinic-1", "clinic-2"):
            assert table[(k, client)]["num_examples"] > 0
    for client in ("clinic-1", "clinic-2"):
        log = (result.run_dir / "clients" / client / "client.log").read_text()
        assert "CERTIFICATE_VERIFY_FAILED" not in log and "UNAVAILABLE" not in log


# --- the real compute package through clinic kits ----------------------------------------

DP_SETTINGS = {
    "model": {"levels": 2, "base_filters": 4, "groups": 2},
    "training": {"learning_rate": 0.003, "local_steps": 2, "batch_size": 2,
                 "patch_size": [16, 16, 16]},
    "privacy": {"enabled": True, "noise_multiplier": 1.0, "l2_norm_clip": 1.0},
    "validation": {"patch_size": [16, 16, 16], "overlap": 0.0, "batch_size": 4},
}


@net
def test_dp_session_of_three_clinic_kits_with_the_compute_package(
        tls_net: NetworkState, netns: Netns, tmp_path: Path) -> None:
    """3 clinics, each in its namespace with its kit and its own phantom data, train the
    tiny U-Net with DP through `fedn client start` (warm workers) over TLS; the round
    log read back from the server has every client's training and validation, and no
    byte window of their data files is anywhere on the server."""
    from fedseg.orchestration import collect
    from fedseg.orchestration.fedn import compat as fedn_compat
    from fedseg.orchestration.phantoms import generate_benchmark, preset_spec
    from fedseg.orchestration.runner import default_package_dir
    from fedseg.orchestration.session import build_package
    from fedseg_clinic.model.seed import write_seed_weights
    from fedseg_clinic.settings import settings_from_mapping

    state = tls_net
    names = [f"clinic-{i + 1}" for i in range(len(netns.names))]
    generate_benchmark(preset_spec("non-iid", clinics=len(names), patients=3, size=32,
                                   seed=5), tmp_path / "data")
    settings_file = tmp_path / "clinic-settings.yaml"
    settings_file.write_text(yaml.safe_dump(DP_SETTINGS))
    seed = write_seed_weights(settings_from_mapping(DP_SETTINGS, "test").model,
                              tmp_path / "seed.npz", seed=1)
    api = state.api_client()
    answer = api.set_active_package(str(build_package(default_package_dir(),
                                                      tmp_path / "package.tgz")),
                                    helper="numpyhelper", name="fedseg")
    assert answer.get("success", True) is not False, answer
    assert api.set_active_model(str(seed)).get("success", True) is not False
    seed_id = api.get_active_model()["model_id"]
    kits = [add_clinic(state.root, name, tmp_path / f"kit-{name}") for name in names]
    seen_before = _client_ids(state)
    env = {"FEDSEG_SETTINGS": str(settings_file), "TF_CPP_MIN_LOG_LEVEL": "2",
           "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
    procs = [_start_kit_client(ns, kit, tmp_path / "data" / name, **env)
             for ns, kit, name in zip(netns.names, kits, names, strict=True)]
    try:
        deadline = time.monotonic() + 180
        while len(_new_online_ids(state, names, seen_before)) < len(names) \
                and time.monotonic() < deadline:
            for proc, kit in zip(procs, kits, strict=True):
                assert proc.poll() is None, (kit / "client.log").read_text()[-2000:]
            time.sleep(0.5)
        client_ids = _new_online_ids(state, names, seen_before)
        assert len(client_ids) == len(names)
        session_id = fedn_compat.start_session(api, 1, model_id=seed_id,
                                               min_clients=len(names), round_timeout=300,
                                               client_ids=client_ids)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            log = collect.collect_session(api, session_id, seed_id, names)
            rows = {(r.round, r.client, r.metric): r.value for r in log.records}
            if all((1, n, "val_dice_mean") in rows for n in names):
                break
            time.sleep(2)
        for name in names:  # the round log: training (with DP) and validation per clinic
            assert rows[(1, name, "num_examples")] >= 2
            assert 0 < rows[(1, name, "epsilon")] < float("inf")
            assert rows[(1, name, "noise_multiplier")] == 1.0
            assert 0 <= rows[(1, name, "val_dice_mean")] <= 1
        # Only updates and metrics crossed: no window of any CT or mask file of any clinic's
        # data folder is anywhere on the server (S3 objects, state store, logs).
        held = _everything_the_server_holds(state)
        windows = [blob[len(blob) // 2:len(blob) // 2 + 64]
                   for name in names
                   for path in sorted((tmp_path / "data" / name).rglob("*"))
                   if path.suffix in {".npy", ".npz"}
                   for blob in [path.read_bytes()]]
        assert len(windows) >= 2 * len(names) and all(len(w) == 64 for w in windows)
        assert not [w for w in windows if w in held]
        for kit in kits:  # each clinic trained in its warm worker, over HTTPS/TLS
            log_text = (kit / "client.log").read_text()
            assert f"https://{netns.host_ip}:" in log_text
            assert "warm_worker" in log_text  # startup's summary names the worker
            (worker_log,) = (kit / "package").rglob("warm-*.log")
            assert "train done" in worker_log.read_text()
    finally:
        for proc in procs:
            _stop(proc)
    for kit in kits:  # the workers stopped with their clients
        assert not list((kit / "package").rglob("warm-*.pid"))
