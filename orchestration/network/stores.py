"""The network's stores: a state store (SQL) and an object store (S3).

State store: a SQLite file in the network root, a PostgreSQL server we run
ourselves ("postgres-managed", Debian's initdb/postgres binaries, data in the
network root), or an external PostgreSQL given by URL. Object store: a local
moto S3 server (objects in memory only), or an external S3 endpoint by URL.

Each function returns the dict fedn expects under ``statestore`` or ``storage``
in its settings YAML, and for the stores we run, the process record.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedseg.orchestration.fedn.compat import sql_url
from fedseg.orchestration.network import ports
from fedseg.orchestration.network.ports import LOCALHOST, ProcessRecord
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import PRIVATE_FILE, atomic_write_json

logger = logging.getLogger(__name__)

BUCKETS = {"storage_bucket": "fedn-models", "context_bucket": "fedn-context",
           "prediction_bucket": "fedn-prediction"}
FEDN_DATABASE = "fedn_db"  # hard-coded by fedn's DatabaseConnection
POSTGRES_USER = "fedn"
SQLITE_FILE = "fedn.sqlite"
MOTO_USER = "fedseg-network"
# moto checks IAM credentials after this many requests; ours are the three that create
# the network's own user, its policy and its access key (see start_moto).
MOTO_BOOTSTRAP_ACTIONS = 3
MOTO_ADMIN_PATH = "/moto-api"


# --- state store -------------------------------------------------------------------------

def sqlite_statestore(root: Path) -> dict:
    """Fedn's statestore config for a SQLite file in the network root."""
    return {"type": "SQLite", "sqlite_config": {"dbname": str(root / SQLITE_FILE)}}


def check_sqlite_statestore(root: Path) -> None:
    """Refuse a SQLite state store file that SQLite cannot use (corrupt, truncated, junk).

    A missing file is fine (fedn creates it). Without this check fedn's schema code
    dies deep in SQLAlchemy with a traceback ("file is not a database").

    Raises:
        FedsegError: naming the file and SQLite's complaint.
    """
    path = root / SQLITE_FILE
    if not path.exists():
        return
    try:
        # Read-only URI: a check must never create or repair the file.
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise FedsegError(f"{path}: corrupt SQLite state store ({exc}); move it away to "
                          "start with an empty store") from None
    problems = [str(row[0]) for row in rows if row and row[0] != "ok"]
    if problems:
        raise FedsegError(f"{path}: corrupt SQLite state store ({problems[0]}); move it "
                          "away to start with an empty store")


def postgres_statestore(username: str, password: str, host: str, port: int) -> dict:
    """Fedn's statestore config for PostgreSQL (the database is always fedn_db)."""
    return {"type": "PostgreSQL", "postgres_config": {
        "username": username, "password": password, "host": host, "port": int(port)}}


def parse_postgres_url(url: str) -> dict:
    """Fedn's statestore config from ``postgresql://user:password@host:port/fedn_db``.

    Raises:
        FedsegError: Not a postgresql URL, missing parts, or a database other than fedn_db.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise FedsegError(f"postgres_url {_hide_password(url)!r}: scheme must be postgresql://")
    if not parts.username or parts.password is None or not parts.hostname:
        raise FedsegError(f"postgres_url {_hide_password(url)!r}: needs user, password and host")
    database = parts.path.lstrip("/")
    if database not in ("", FEDN_DATABASE):
        raise FedsegError(f"postgres_url {_hide_password(url)!r}: fedn 0.33.0 always uses the "
                          f"database {FEDN_DATABASE!r}, not {database!r}")
    return postgres_statestore(parts.username, parts.password, parts.hostname,
                               parts.port or 5432)


def _hide_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def check_postgres(statestore: dict, timeout_s: int = 5) -> None:
    """Connect to the fedn database of a PostgreSQL statestore, or raise FedsegError."""
    import psycopg2

    pg = statestore["postgres_config"]
    try:
        conn = psycopg2.connect(host=pg["host"], port=int(pg["port"]), user=pg["username"],
                                password=pg["password"], dbname=FEDN_DATABASE,
                                connect_timeout=timeout_s)
    except psycopg2.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedsegError(f"state store postgresql://{pg['username']}@{pg['host']}:{pg['port']}"
                          f"/{FEDN_DATABASE} unreachable: {first}") from exc
    conn.close()


def find_postgres_bindir() -> Path | None:
    """The folder holding initdb and postgres (Debian: /usr/lib/postgresql/N/bin)."""
    initdb = shutil.which("initdb")
    if initdb is None:
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not candidates:
            return None
        initdb = str(candidates[-1])
    bindir = Path(initdb).resolve().parent
    return bindir if (bindir / "postgres").is_file() else None


def _require_traversable(path: Path, user: str) -> None:
    """Raise FedsegError if ``user`` (not root) cannot reach ``path``."""
    entry = pwd.getpwnam(user)
    for folder in [path, *path.parents]:
        if not folder.exists():
            continue
        info = folder.stat()
        if info.st_uid == entry.pw_uid:
            continue
        others_x = info.st_mode & stat.S_IXOTH
        group_x = info.st_mode & stat.S_IXGRP and info.st_gid == entry.pw_gid
        if not (others_x or group_x):
            raise FedsegError(f"the {user} user cannot enter {folder} (mode "
                              f"{stat.S_IMODE(info.st_mode):o}); put the network root for "
                              "managed PostgreSQL under a folder others may enter")


def start_managed_postgres(root: Path, port: int, timeout_s: float) -> tuple[ProcessRecord, dict]:
    """Initialise (first time) and start a PostgreSQL server for this network.

    Data lives in root/postgres/data; it listens on 127.0.0.1:port only, with no
    Unix socket. As root, initdb refuses to run, so the server runs as the
    ``postgres`` user on a folder it owns (Popen's ``user=``: the recorded pid is
    postgres itself, not a runuser/su wrapper).

    Returns:
        The server's process record and fedn's statestore config.

    Raises:
        FedsegError: No PostgreSQL binaries, initdb failed, or the server did not start.
    """
    bindir = find_postgres_bindir()
    if bindir is None:
        raise FedsegError("statestore postgres-managed needs PostgreSQL's initdb and postgres "
                          "(Debian package postgresql); none found on PATH or in "
                          "/usr/lib/postgresql")
    pg_root = root / "postgres"
    data_dir = pg_root / "data"
    credentials_file = pg_root / "credentials.json"
    as_user = "postgres" if os.geteuid() == 0 else None
    pg_root.mkdir(parents=True, exist_ok=True)
    os.chmod(pg_root, 0o755)
    if as_user is not None:
        _require_traversable(pg_root, as_user)
    if not (data_dir / "PG_VERSION").is_file():
        password = secrets.token_urlsafe(24)
        _initdb(bindir, data_dir, pg_root, password, as_user)
        _write_private_json(credentials_file, {"username": POSTGRES_USER, "password": password})
    try:
        credentials = json.loads(credentials_file.read_text())
    except (OSError, ValueError) as exc:
        raise FedsegError(f"{credentials_file}: cannot read the PostgreSQL credentials "
                          f"({exc}); remove {data_dir} to start afresh") from exc
    argv = [str(bindir / "postgres"), "-D", str(data_dir), "-p", str(port),
            "-c", f"listen_addresses={LOCALHOST}", "-c", "unix_socket_directories="]
    record = ports.spawn("postgres", argv, cwd=pg_root, log=root / "logs" / "postgres.log",
                         env=_plain_env(), port=port, user=as_user,
                         stop_signal=signal.SIGINT)  # fast shutdown; SIGTERM waits for clients
    statestore = postgres_statestore(credentials["username"], credentials["password"],
                                     LOCALHOST, port)
    try:
        ports.wait_ready(record, lambda: _postgres_accepts(statestore), timeout_s,
                         f"PostgreSQL on {LOCALHOST}:{port}")
        _create_database(statestore)
    except BaseException:
        ports.stop(record)
        raise
    return record, statestore


def _initdb(bindir: Path, data_dir: Path, pg_root: Path, password: str,
            as_user: str | None) -> None:
    pwfile = pg_root / "initdb.pw"
    pwfile.write_text(password + "\n")
    os.chmod(pwfile, 0o600)
    if as_user is not None:
        entry = pwd.getpwnam(as_user)
        for path in (pg_root, pwfile):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    argv = [str(bindir / "initdb"), "-D", str(data_dir), "-U", POSTGRES_USER,
            f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions"]
    log = pg_root.parent / "logs" / "initdb.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log, "ab") as log_file:
            result = subprocess.run(argv, cwd=pg_root, env=_plain_env(), stdout=log_file,
                                    stderr=subprocess.STDOUT, user=as_user, check=False,
                                    timeout=300)
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        shutil.rmtree(data_dir, ignore_errors=True)
        raise FedsegError(f"initdb failed for {data_dir} (exit {result.returncode}); read {log}")


def _postgres_accepts(statestore: dict) -> bool:
    import psycopg2

    pg = statestore["postgres_config"]
    try:
        conn = psycopg2.connect(host=pg["host"], port=int(pg["port"]), user=pg["username"],
                                password=pg["password"], dbname="postgres", connect_timeout=2)
    except psycopg2.OperationalError:
        return False
    conn.close()
    return True


def _create_database(statestore: dict) -> None:
    import psycopg2

    pg = statestore["postgres_config"]
    conn = psycopg2.connect(host=pg["host"], port=int(pg["port"]), user=pg["username"],
                            password=pg["password"], dbname="postgres", connect_timeout=5)
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (FEDN_DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f"CREATE DATABASE {FEDN_DATABASE}")
    finally:
        conn.close()


# --- object store ------------------------------------------------------------------------

def s3_storage(endpoint: str, access_key: str, secret_key: str, region: str) -> dict:
    """Fedn's storage config for an S3 endpoint (BOTO3; key is storage_endpoint)."""
    secure = endpoint.startswith("https://")
    return {"storage_type": "BOTO3", "storage_config": {
        "storage_endpoint": endpoint, "storage_access_key": access_key,
        "storage_secret_key": secret_key, "storage_region": region,
        "storage_secure_mode": secure, "storage_verify_ssl": secure, **BUCKETS}}


def start_moto(root: Path, port: int, region: str, timeout_s: float) -> tuple[ProcessRecord, dict]:
    """Start moto's S3 on 127.0.0.1:port with IAM authentication, create the buckets.

    moto checks signatures against its own IAM once INITIAL_NO_AUTH_ACTION_COUNT
    requests have been served; the first three create the network's own IAM user, an
    allow-all policy and an access key, so every later request needs those
    credentials (wrong keys: InvalidAccessKeyId / SignatureDoesNotMatch, anonymous:
    403). moto's own admin API (/moto-api: reset, reset-auth, a data dump) is not
    behind IAM, so :func:`serve_moto` answers 403 there. Objects live in memory only.
    """
    try:
        import moto.server  # noqa: F401 - only to fail early with a clear message
    except ImportError:
        raise FedsegError("s3 moto needs moto[server] installed (PyPI)") from None
    env = {**_plain_env(), "INITIAL_NO_AUTH_ACTION_COUNT": str(MOTO_BOOTSTRAP_ACTIONS)}
    record = ports.spawn("moto", [sys.executable, "-m", "fedseg.orchestration.network.stores",
                                  "moto", "--port", str(port)], cwd=root,
                         log=root / "logs" / "moto.log", env=env, port=port)
    endpoint = f"http://{LOCALHOST}:{port}"
    try:
        ports.wait_ready(record, lambda: ports.port_is_listening(port), timeout_s,
                         f"S3 on {LOCALHOST}:{port}")
        access_key, secret_key = _moto_credentials(endpoint, region)
        storage = s3_storage(endpoint, access_key, secret_key, region)
        ensure_buckets(storage)
    except BaseException:
        ports.stop(record)
        raise
    return record, storage


def _moto_credentials(endpoint: str, region: str) -> tuple[str, str]:
    """Create the network's IAM user and access key in a fresh moto (its free requests).

    Raises:
        FedsegError: moto refused (someone else used its free requests first).
    """
    import boto3
    import botocore.exceptions

    # Any key works for the free bootstrap requests; these are never valid afterwards.
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=region,
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    policy = {"Version": "2012-10-17",
              "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    try:
        iam.create_user(UserName=MOTO_USER)
        iam.put_user_policy(UserName=MOTO_USER, PolicyName="fedseg-network",
                            PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=MOTO_USER)["AccessKey"]
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise FedsegError(f"S3 endpoint {endpoint}: cannot create the network's credentials "
                          f"({exc})") from None
    return str(key["AccessKeyId"]), str(key["SecretAccessKey"])


def serve_moto(host: str, port: int) -> None:
    """Run moto's server (blocks) with its unauthenticated admin API refused.

    Reads INITIAL_NO_AUTH_ACTION_COUNT from the environment (moto reads it at import).
    """
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    os.environ.setdefault("MOTO_PORT", str(port))
    backend = DomainDispatcherApplication(create_backend_app)

    def app(environ: dict, start_response: Any) -> Any:
        if str(environ.get("PATH_INFO", "")).startswith(MOTO_ADMIN_PATH):
            # reset-auth would switch authentication off; data.json lists every object.
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"moto admin API disabled by fedseg\n"]
        if "HTTP_AUTHORIZATION" not in environ and "X-Amz-Signature" not in str(
                environ.get("QUERY_STRING", "")):
            # Anonymous: moto's IAM check dies on the missing header (KeyError -> 500).
            start_response("403 Forbidden", [("Content-Type", "application/xml")])
            return [b"<Error><Code>AccessDenied</Code><Message>anonymous access refused"
                    b"</Message></Error>"]
        return backend(environ, start_response)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run_simple(host, port, app, threaded=True, request_handler=MotoRequestHandler)


def ensure_buckets(storage: dict, timeout_s: int = 5) -> None:
    """Create fedn's buckets if missing (also proves the endpoint answers).

    Raises:
        FedsegError: The endpoint is unreachable or refuses the credentials.
    """
    import boto3
    import botocore.config
    import botocore.exceptions

    cfg = storage["storage_config"]
    client = boto3.client(
        "s3", endpoint_url=cfg["storage_endpoint"], aws_access_key_id=cfg["storage_access_key"],
        aws_secret_access_key=cfg["storage_secret_key"], region_name=cfg["storage_region"],
        verify=cfg["storage_verify_ssl"],
        config=botocore.config.Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                                      retries={"max_attempts": 1}))
    try:
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for key in BUCKETS:
            if cfg[key] not in existing:
                if cfg["storage_region"] == "us-east-1":
                    client.create_bucket(Bucket=cfg[key])
                else:
                    client.create_bucket(Bucket=cfg[key], CreateBucketConfiguration={
                        "LocationConstraint": cfg["storage_region"]})
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise FedsegError(f"object store {cfg['storage_endpoint']} unusable: {exc}") from exc


# --- helpers -----------------------------------------------------------------------------

def _plain_env() -> dict[str, str]:
    """A small environment for store processes (no fedn or AWS settings leak in)."""
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "HOME")
    return {key: os.environ[key] for key in keep if key in os.environ}


def _write_private_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data, PRIVATE_FILE)


def _main(argv: list[str] | None = None) -> None:
    """``python -m fedseg.orchestration.network.stores moto --port N`` (see serve_moto)."""
    import argparse

    parser = argparse.ArgumentParser(prog="fedseg-stores")
    sub = parser.add_subparsers(dest="store", required=True)
    moto = sub.add_parser("moto", help="moto's S3 on 127.0.0.1 with IAM auth")
    moto.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    serve_moto(LOCALHOST, args.port)


if __name__ == "__main__":
    _main()


__all__ = ["check_postgres", "ensure_buckets", "parse_postgres_url", "postgres_statestore",
           "s3_storage", "sql_url", "sqlite_statestore", "start_managed_postgres", "start_moto"]
