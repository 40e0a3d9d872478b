"""Each fedn 0.33.0 workaround in fedseg.orchestration.fedn.compat, checked on its own.

These run without starting servers: the SQL fixes against fedn's own store classes
on a SQLite file, the bind patches against real (unstarted/started) servers.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy
from sqlalchemy import types

from fedseg.orchestration.fedn import compat as fedn_compat
from fedseg_clinic.errors import FedsegError


@pytest.mark.parametrize(("value", "column_type", "nullable", "expected"), [
    ("True", types.Boolean(), False, True),
    ("false", types.Boolean(), False, False),
    ("1", types.Boolean(), False, True),
    (0, types.Boolean(), False, False),
    ("3", types.Integer(), False, 3),
    ("3.0", types.Integer(), False, 3),
    (4.0, types.Integer(), True, 4),
    ("None", types.Integer(), True, None),
    ("2.5", types.Float(), True, 2.5),
    ("2026-11-26 16:00:01.500000", types.DateTime(), False,
     datetime(2026, 11, 26, 16, 0, 1, 500000)),
    ({"serveropt": "adam"}, types.String(), True, '{"serveropt": "adam"}'),
    ([1, 2], types.String(), True, "[1, 2]"),
    (None, types.String(), False, ""),
    (None, types.String(), True, None),
    ("None", types.String(), True, None),
    ("plain", types.String(), False, "plain"),
    ({"a": 1}, types.JSON(), True, {"a": 1}),
])
def test_coerce_column_value(value: object, column_type: types.TypeEngine, nullable: bool,
                             expected: object) -> None:
    assert fedn_compat.coerce_column_value(value, column_type, nullable) == expected


def test_coerce_leaves_unconvertible_values_for_the_database() -> None:
    assert fedn_compat.coerce_column_value("maybe", types.Boolean(), False) == "maybe"
    assert fedn_compat.coerce_column_value("x", types.Integer(), False) == "x"
    assert fedn_compat.coerce_column_value("not a date", types.DateTime(), False) == "not a date"


def _sqlite_session(path: Path) -> sqlalchemy.orm.sessionmaker:
    from fedn.network.storage.statestore.stores.sql.shared import MyAbstractBase

    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    MyAbstractBase.metadata.create_all(engine)
    return sqlalchemy.orm.sessionmaker(engine)


def test_sql_coercion_fixes_fedn_store_writes(tmp_path: Path) -> None:
    """Bugs 2, 4 and 7 through fedn's own ORM models on SQLite."""
    from fedn.network.storage.statestore.stores.sql.shared import (
        CombinerModel,
    )

    session_factory = _sqlite_session(tmp_path / "store.sqlite")
    _remove_sql_coercion()
    # Without the fix, SQLite refuses a str in a DateTime column (bug 2).
    with session_factory() as session:
        session.add(CombinerModel(id=str(uuid.uuid4()), address="a", name="c", port=1,
                                  updated_at=str(datetime(2026, 1, 2, 3, 4, 5))))
        with pytest.raises(sqlalchemy.exc.StatementError, match="DateTime"):
            session.commit()

    fedn_compat.install_sql_coercion()
    fedn_compat.install_sql_coercion()  # idempotent
    try:
        _write_and_check_coerced_rows(session_factory)
    finally:
        _remove_sql_coercion()


def _remove_sql_coercion() -> None:
    """Keep this test process as fedn ships (the listener is process-wide)."""
    from fedn.network.storage.statestore.stores.sql.shared import MyAbstractBase

    for name in ("before_insert", "before_update"):
        if sqlalchemy.event.contains(MyAbstractBase, name, fedn_compat._coerce_row):
            sqlalchemy.event.remove(MyAbstractBase, name, fedn_compat._coerce_row)


def _write_and_check_coerced_rows(session_factory: sqlalchemy.orm.sessionmaker) -> None:
    from fedn.network.storage.statestore.stores.sql.shared import (
        ClientModel,
        CombinerModel,
        SessionConfigModel,
    )

    with session_factory() as session:
        session.add(CombinerModel(id="comb", address="a", name="c", port="12080",
                                  updated_at=str(datetime(2026, 1, 2, 3, 4, 5))))
        session.add(ClientModel(id="cl", combiner="c", combiner_preferred=None, name="c1",
                                status="online"))
        session.add(SessionConfigModel(
            id="sc", aggregator="fedopt", aggregator_kwargs={"serveropt": "adam"},
            round_timeout="60", buffer_size="-1", delete_models_storage="True",
            clients_required="2", requested_clients="None", validate="False",
            helper_type="numpyhelper", model_id="m", rounds="3"))
        session.commit()
    with session_factory() as session:
        combiner = session.get(CombinerModel, "comb")
        assert combiner.updated_at == datetime(2026, 1, 2, 3, 4, 5)
        assert combiner.port == 12080
        assert session.get(ClientModel, "cl").combiner_preferred == ""
        config = session.get(SessionConfigModel, "sc")
        assert config.aggregator_kwargs == '{"serveropt": "adam"}'
        assert config.delete_models_storage is True
        assert config.validate is False
        assert config.requested_clients is None
        assert (config.rounds, config.round_timeout) == (3, 60)


def test_create_schema_once_makes_every_table(tmp_path: Path) -> None:
    from fedn.network.storage.statestore.stores.sql.shared import MyAbstractBase

    db = tmp_path / "fedn.sqlite"
    statestore = {"type": "SQLite", "sqlite_config": {"dbname": str(db)}}
    fedn_compat.create_schema(statestore)
    fedn_compat.create_schema(statestore)  # a second time is a no-op
    tables = set(sqlalchemy.inspect(sqlalchemy.create_engine(f"sqlite:///{db}")).get_table_names())
    assert tables == set(MyAbstractBase.metadata.tables)


def test_widen_string_columns_drops_varchar_255() -> None:
    """Bug 8: PostgreSQL enforces VARCHAR(255) on ServerFunctions source."""
    metadata = sqlalchemy.MetaData()
    table = sqlalchemy.Table("t", metadata, sqlalchemy.Column("code", sqlalchemy.String(255)),
                             sqlalchemy.Column("n", sqlalchemy.Integer),
                             sqlalchemy.Column("free", sqlalchemy.String()))
    assert fedn_compat.widen_string_columns(metadata) == ["t.code"]
    assert table.c.code.type.length is None
    assert isinstance(table.c.n.type, sqlalchemy.Integer)
    assert fedn_compat.widen_string_columns(metadata) == []


def test_create_schema_unreachable_store_is_fedseg_error(tmp_path: Path) -> None:
    statestore = {"type": "SQLite",
                  "sqlite_config": {"dbname": str(tmp_path / "missing-dir" / "x.sqlite")}}
    with pytest.raises(FedsegError, match="cannot create the fedn schema"):
        fedn_compat.create_schema(statestore)


@pytest.mark.parametrize(("statestore", "expected"), [
    ({"type": "SQLite", "sqlite_config": {"dbname": "/a/b.sqlite"}}, "sqlite:////a/b.sqlite"),
    ({"type": "PostgreSQL", "postgres_config": {"username": "u", "password": "p@ss",
                                                "host": "h", "port": 5433}},
     "postgresql://u:p%40ss@h:5433/fedn_db"),
])
def test_sql_url(statestore: dict, expected: str) -> None:
    assert fedn_compat.sql_url(statestore) == expected


def test_sql_url_rejects_mongodb() -> None:
    with pytest.raises(FedsegError, match="MongoDB"):
        fedn_compat.sql_url({"type": "MongoDB"})


@pytest.mark.parametrize(("body", "expected"), [
    ({"name": "c1", "preferred_combiner": "combiner-2"}, "combiner-2"),
    ({"name": "c1", "preferred_combiner": ""}, None),
    ({"name": "c1"}, None),
    ({"name": "c1", "combiner_preferred": "x", "preferred_combiner": "y"}, "x"),
])
def test_alias_preferred_combiner(body: dict, expected: str | None) -> None:
    fedn_compat.alias_preferred_combiner(body)
    assert body["combiner_preferred"] == expected


def test_client_add_alias_reaches_the_route() -> None:
    """The before_request hook changes the dict the route's get_json returns (bug 4)."""
    import flask

    app = flask.Flask("probe")
    seen = {}

    @app.route("/api/v1/clients/add", methods=["POST"])
    def add() -> str:
        seen.update(flask.request.get_json())
        return "ok"

    fedn_compat.install_client_add_alias(app)
    fedn_compat.install_client_add_alias(app)  # registered once
    assert len(app.before_request_funcs[None]) == 1
    answer = app.test_client().post("/api/v1/clients/add",
                                    json={"name": "c1", "preferred_combiner": "combiner-2"})
    assert answer.status_code == 200
    assert seen["combiner_preferred"] == "combiner-2"


@pytest.mark.parametrize(("address", "port", "expected"), [
    ("[::]:12080", None, "127.0.0.1:12080"),
    ("[::]:12081", 15000, "127.0.0.1:15000"),
    ("0.0.0.0:80", None, "127.0.0.1:80"),
    ("10.0.0.5:80", None, "10.0.0.5:80"),
])
def test_rewrite_grpc_address(address: str, port: int | None, expected: str) -> None:
    assert fedn_compat.rewrite_grpc_address(address, "127.0.0.1", port) == expected


def _listening_ip(port: int) -> list[str]:
    import psutil

    return [c.laddr.ip for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


def test_bind_grpc_servers_listens_on_localhost_only() -> None:
    """fedn's combiner binds "[::]:PORT"; after the patch only loopback listens."""
    from concurrent import futures

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    original = grpc.server
    try:
        fedn_compat.bind_grpc_servers("127.0.0.1")
        fedn_compat.bind_grpc_servers("127.0.0.1")  # wraps the original, not itself
        assert grpc.server.__wrapped__ is original
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        bound = server.add_insecure_port(f"[::]:{port}")
        server.start()
        try:
            assert bound == port
            ips = _listening_ip(port)
            assert ips, "nothing listens"
            assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip in ips), ips
        finally:
            server.stop(0)
    finally:
        grpc.server = original


def test_bind_api_server_replaces_host_and_workers() -> None:
    """start_server_api passes "0.0.0.0" and os.cpu_count(); the patch overrides both."""
    code = """
import sys
from fedseg.orchestration.fedn import compat as fedn_compat
from fedn.network.api import gunicorn_app
calls = []
gunicorn_app.run_gunicorn = lambda app, host, port, workers=4: calls.append((host, port, workers))
fedn_compat.bind_api_server("127.0.0.1", 2)
gunicorn_app.run_gunicorn("app", "0.0.0.0", 8092, 16)
app = gunicorn_app.GunicornApp(object(), {"bind": "127.0.0.1:1", "workers": 1})
print(calls[0], app.cfg.control_socket_disable, app.cfg.graceful_timeout)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "('127.0.0.1', 8092, 2) True 3"


@pytest.mark.parametrize("timeout_s", [None, 45])
def test_bind_api_server_lengthens_gunicorns_request_timeout(timeout_s: int | None) -> None:
    """Bug 22: gunicorn kills a worker whose request lasts 30 s (a large model upload)."""
    args = "" if timeout_s is None else f", request_timeout_s={timeout_s}"
    code = f"""
from fedseg.orchestration.fedn import compat as fedn_compat
from fedn.network.api import gunicorn_app
plain = gunicorn_app.GunicornApp(object(), {{"bind": "127.0.0.1:1", "workers": 1}})
fedn_compat.bind_api_server("127.0.0.1", 1{args})
app = gunicorn_app.GunicornApp(object(), {{"bind": "127.0.0.1:1", "workers": 1}})
print(plain.cfg.timeout, app.cfg.timeout)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    expected = timeout_s or fedn_compat.API_REQUEST_TIMEOUT_S
    assert result.stdout.strip().splitlines()[-1] == f"30 {expected}"


def test_check_sqlalchemy_accepts_the_pinned_version() -> None:
    fedn_compat.check_sqlalchemy()  # SQLAlchemy 2.0.x is pinned


def test_sync_combiner_registry_updates_ports_and_drops_stale(tmp_path: Path) -> None:
    """Bug 9: a restarted combiner keeps its first port unless the store is synced."""
    from fedn.network.storage.statestore.stores.sql.shared import CombinerModel

    statestore = {"type": "SQLite", "sqlite_config": {"dbname": str(tmp_path / "s.sqlite")}}
    fedn_compat.create_schema(statestore)
    session_factory = sqlalchemy.orm.sessionmaker(
        sqlalchemy.create_engine(fedn_compat.sql_url(statestore)))
    with session_factory() as session:
        for name, port in (("combiner-1", 1000), ("combiner-2", 1001)):
            session.add(CombinerModel(id=name + "-id", address="127.0.0.1", name=name,
                                      port=port, parent="localhost"))
        session.commit()
    stale = fedn_compat.sync_combiner_registry(statestore, {"combiner-1": ("127.0.0.1", 2000),
                                                            "combiner-3": ("127.0.0.1", 2001)})
    assert stale == ["combiner-2"]
    with session_factory() as session:
        rows = {c.name: (c.id, c.port) for c in session.query(CombinerModel)}
    # combiner-1 keeps its id with the new port; combiner-3 registers itself on start.
    assert rows == {"combiner-1": ("combiner-1-id", 2000)}
    assert fedn_compat.sync_combiner_registry(statestore, {}) == ["combiner-1"]


def test_shorten_round_polling_scales_fedn_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedn.network.combiner import roundhandler
    from fedn.network.controller import control

    monkeypatch.setattr(roundhandler.RoundHandler, "run", roundhandler.RoundHandler.run)
    monkeypatch.setattr(control, "wait_random", control.wait_random)
    seen: list[float] = []

    def fake_run(self: object, polling_interval: float = 1.0) -> None:
        seen.append(polling_interval)

    monkeypatch.setattr(roundhandler.RoundHandler, "run", fake_run)
    fedn_compat.shorten_round_polling(0.1)
    fedn_compat.shorten_round_polling(0.1)  # idempotent: wraps the original, not itself
    roundhandler.RoundHandler.run(object())
    assert seen == [pytest.approx(0.1)]
    waits = [control.wait_random(min=1.0, max=2.0)(None) for _ in range(50)]
    assert all(0.1 <= w <= 0.2 for w in waits)


def _unwrapped(owner: type, name: str) -> object:
    """fedn's own method (an earlier test in this process may have patched it)."""
    method = getattr(owner, name)
    return getattr(method, "__wrapped__", method)


def _round_report(name: str) -> dict:
    """What a combiner's RoundHandler appends to a round's ``combiners``."""
    config = {"aggregator": "fedavg", "round_timeout": 60, "buffer_size": -1,
              "delete_models_storage": True, "clients_required": 1, "validate": True,
              "helper_type": "numpyhelper", "task": "training", "round_id": "1", "rounds": 1,
              "_job_id": f"job-{name}", "session_id": None, "model_id": "m1"}
    return {"config": config, "round_id": "1", "model_id": "m1", "time_exec_training": 1.0,
            "status": "Success", "name": name,
            "data": {"nr_expected_updates": 1, "nr_required_updates": 1, "timeout": 60.0,
                     "time_combination": 0.1,
                     "aggregation_time": {"nr_aggregated_models": 1,
                                          "time_model_aggregation": 0.0,
                                          "time_model_load": 0.0}}}


def _pending_round_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         merged: bool = False) -> tuple[Any, Any]:
    """fedn's SQL round store on a fresh SQLite file with model m1 and round 1 pending.

    Returns:
        (the store, its session factory).
    """
    import datetime

    from fedn.network.storage.statestore.stores.dto.round import RoundDTO
    from fedn.network.storage.statestore.stores.round_store import SQLRoundStore
    from fedn.network.storage.statestore.stores.sql.shared import ModelModel

    for name in ("_update_orm_model_from_dto", "_combiners_to_dict_list", "get"):
        monkeypatch.setattr(SQLRoundStore, name, _unwrapped(SQLRoundStore, name))
    if merged:
        fedn_compat.merge_round_combiners()
    session_factory = _sqlite_session(tmp_path / "fedn.sqlite")
    with session_factory() as session:
        session.add(ModelModel(id="m1", name="m", active=True,
                               committed_at=datetime.datetime.now()))
        session.commit()
    store = SQLRoundStore(session_factory)
    store.add(RoundDTO(round_id="1", status="Pending"))
    return store, session_factory


@pytest.mark.parametrize("merged", [False, True])
def test_two_combiners_reporting_at_once_keep_both_reports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, merged: bool) -> None:
    """Bug 10: the second of two concurrent round updates deleted the first report."""
    store, _ = _pending_round_store(tmp_path, monkeypatch, merged)
    # Both combiners read the round before either writes (as when they finish together).
    first, second = store.get("1"), store.get("1")
    first.combiners.append(_round_report("combiner-1"))
    store.update(first)
    second.combiners.append(_round_report("combiner-2"))
    store.update(second)
    names = sorted(c.name for c in store.get("1").combiners)
    assert names == (["combiner-1", "combiner-2"] if merged else ["combiner-2"])
    # Each kept report keeps its round config (fedn's reader refuses one without).
    reports = store.get("1").to_dict()["combiners"]
    assert sorted(r["config"]["_job_id"] for r in reports) == sorted(
        f"job-{name}" for name in names)
    # A later full write (the controller setting the status) neither drops nor doubles.
    final = store.get("1")
    final.status = "Success"
    store.update(final)
    assert len(store.get("1").combiners) == (2 if merged else 1)


def test_bound_report_wait_gives_fedn_s_endless_retry_a_stop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug 12: the controller's wait for combiner reports had no stop condition."""
    import tenacity
    from fedn.network.controller import control

    monkeypatch.setattr(control, "retry", control.retry)
    monkeypatch.setattr(control.Control, "round", control.Control.round)
    fedn_compat.bound_report_wait(0.3)
    fedn_compat.bound_report_wait(0.3)  # idempotent: wraps fedn's, not itself
    calls: list[float] = []

    # The same decorator call as fedn's check_combiners_done_reporting.
    @control.retry(wait=control.wait_random(min=0.01, max=0.02),
                   retry=control.retry_if_exception_type(KeyError))
    def never_reported() -> None:
        calls.append(time.monotonic())
        raise KeyError("Combiners have not yet reported.")

    started = time.monotonic()
    with pytest.raises(tenacity.RetryError):
        never_reported()
    assert 0.3 <= time.monotonic() - started < 2.0 and len(calls) > 3

    # A retry that has its own stop keeps it.
    @control.retry(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_none(),
                   retry=control.retry_if_exception_type(KeyError))
    def twice() -> None:
        calls.append(0.0)
        raise KeyError

    calls.clear()
    with pytest.raises(tenacity.RetryError):
        twice()
    assert len(calls) == 2


def test_skip_unavailable_combiners_defines_the_method_fedn_calls(
        caplog: pytest.LogCaptureFixture) -> None:
    """Bug 13: fedn calls a method no class defines when a combiner does not answer."""
    import inspect

    from fedn.network.controller import controlbase

    source = inspect.getsource(controlbase.ControlBase.get_participating_combiners)
    assert "self._handle_unavailable_combiner(combiner)" in source
    had = "_handle_unavailable_combiner" in vars(controlbase.ControlBase)
    fedn_compat.skip_unavailable_combiners()
    try:
        with caplog.at_level("WARNING"):
            controlbase.ControlBase._handle_unavailable_combiner(object(), "combiner-2")
        assert "combiner combiner-2 is unavailable" in caplog.text
    finally:
        if not had:
            del controlbase.ControlBase._handle_unavailable_combiner


# --- bug 14: GraphQL and metrics/list answer without a token ------------------------------

_API_AUTH_PROBE = """
import json, sys, time
import jwt
from fedn.network.api import server
from fedseg.orchestration.fedn import compat as fedn_compat
secret = sys.argv[1]
app = server.app
client = app.test_client()
def probe(headers):
    return {
        "graphql": client.post("/api/v1/graphql", json={"query": "{ __typename }"},
                               headers=headers).status_code,
        "metrics_list": client.post("/api/v1/metrics/list", json={}, headers=headers).status_code,
        "sessions": client.get("/api/v1/sessions/", headers=headers).status_code,
        "health": client.get("/health", headers=headers).status_code,
    }
now = int(time.time())
expired = jwt.encode({"role": "admin", "iat": now - 20, "exp": now - 10}, secret, "HS256")
forged = jwt.encode({"role": "admin", "iat": now}, "x" * 64, "HS256")
client_role = jwt.encode({"role": "client", "iat": now}, secret, "HS256")
admin = jwt.encode({"role": "admin", "iat": now, "exp": now + 60}, secret, "HS256")
out = {"upstream_open": fedn_compat.unprotected_endpoints(app), "before": probe({})}
bare = {"Authorization": "Bearer"}
out["bare_before"] = client.post("/api/v1/clients/add", json={}, headers=bare).status_code
fedn_compat.refuse_empty_bearer(app)
fedn_compat.refuse_empty_bearer(app)  # idempotent
out["bare_after"] = client.post("/api/v1/clients/add", json={}, headers=bare).status_code
out["hooks"] = len(app.before_request_funcs.get(None, []))
out["guarded"] = fedn_compat.require_token_everywhere(app)
out["after_open"] = fedn_compat.unprotected_endpoints(app)
for name, token in (("none", None), ("expired", expired), ("forged", forged),
                    ("client", client_role), ("admin", admin)):
    out[name] = probe({"Authorization": f"Bearer {token}"} if token else {})
print(json.dumps(out))
"""


def test_bugs14_17_graphql_metrics_list_and_bare_bearer(tmp_path: Path) -> None:
    """Upstream: both routes answer without a token; the fix refuses missing, expired,
    forged and client-role tokens there (401) and lets an admin token through."""
    import json
    import os
    import secrets as secrets_module

    secret = secrets_module.token_hex(32)
    env = {**os.environ, "FEDN_JWT_SECRET_KEY": secret}
    result = subprocess.run([sys.executable, "-c", _API_AUTH_PROBE, secret], capture_output=True,
                            text=True, timeout=120, check=False, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # The upstream bug still exists in fedn 0.33.0: no token needed on these two.
    assert out["upstream_open"] == ["graphql_endpoint", "metric.list_metrics"]
    assert out["before"]["graphql"] == 200 and out["before"]["metrics_list"] != 401
    assert out["before"]["sessions"] == 401
    assert out["guarded"] == ["graphql_endpoint", "metric.list_metrics"]
    assert out["after_open"] == []
    for refused in ("none", "expired", "forged", "client"):
        assert out[refused]["graphql"] == 401, (refused, out[refused])
        assert out[refused]["metrics_list"] == 401, (refused, out[refused])
        assert out[refused]["sessions"] == 401, (refused, out[refused])
        assert out[refused]["health"] == 200
    assert out["admin"]["graphql"] == 200
    assert out["admin"]["metrics_list"] != 401  # reaches the route (no store here: 500)
    # Bug 17: "Bearer" without a token crashed fedn's decorator (500); now 401.
    assert out["bare_before"] == 500 and out["bare_after"] == 401 and out["hooks"] == 1


# --- bugs 15 and 16: gRPC tokens ----------------------------------------------------------

def _jwt(secret: str, role: str, lifetime_s: int = 60) -> str:
    import jwt

    now = int(time.time())
    return jwt.encode({"role": role, "iat": now - 1, "exp": now + lifetime_s}, secret, "HS256")


def _grpc_server_with_fedn_auth() -> tuple[object, int]:
    """A real gRPC server with fedn's JWTInterceptor and two fedn methods (bytes in/out)."""
    from concurrent import futures

    from fedn.network.grpc.auth import JWTInterceptor

    echo = grpc.unary_unary_rpc_method_handler(lambda request, _ctx: b"ok")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         interceptors=[JWTInterceptor()])
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("fedn.Connector", {"SendHeartbeat": echo}),
        grpc.method_handlers_generic_handler("fedn.Control", {"Start": echo})))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _call(port: int, metadata: list[tuple[str, str]], user_agent: str | None = None,
          method: str = "/fedn.Connector/SendHeartbeat", channel: object = None) -> str:
    """Call a method; "OK" or the status code's name."""
    options = [("grpc.primary_user_agent", user_agent)] if user_agent else []
    if channel is not None:
        try:
            channel.unary_unary(method)(b"x", metadata=metadata, timeout=10)  # type: ignore
        except grpc.RpcError as exc:
            return exc.code().name
        return "OK"
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        call = channel.unary_unary(method)
        try:
            call(b"x", metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


def test_bug16_health_probe_user_agent_skips_fedn_grpc_auth(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream: any caller claiming user agent grpc_health_probe needs no token; the
    guard refuses it, and still refuses missing, expired, forged and wrong-role tokens."""
    import secrets as secrets_module

    from fedn.network.grpc import auth as fedn_grpc_auth

    secret = secrets_module.token_hex(32)
    monkeypatch.setattr(fedn_grpc_auth, "SECRET_KEY", secret)
    monkeypatch.setattr(grpc, "server", grpc.server)  # restored after the test
    probe = "grpc_health_probe"
    server, port = _grpc_server_with_fedn_auth()
    try:
        assert _call(port, []) == "UNAUTHENTICATED"
        assert _call(port, [], user_agent=probe) == "OK"  # the upstream bug
    finally:
        server.stop(0)
    fedn_compat.install_grpc_auth_guard()
    server, port = _grpc_server_with_fedn_auth()
    try:
        assert _call(port, [], user_agent=probe) == "UNAUTHENTICATED"
        assert _call(port, []) == "UNAUTHENTICATED"
        bearer = lambda token: [("authorization", f"Bearer {token}")]  # noqa: E731
        assert _call(port, bearer(_jwt(secret, "client", lifetime_s=-10))) == "UNAUTHENTICATED"
        assert _call(port, bearer(_jwt("y" * 64, "client"))) == "UNAUTHENTICATED"
        assert _call(port, bearer(_jwt(secret, "admin"))) == "PERMISSION_DENIED"
        assert _call(port, bearer(_jwt(secret, "client"))) == "OK"
    finally:
        server.stop(0)


def test_bug15_grpc_token_only_sent_on_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream: GrpcHandler on a plain port sends no token; patched, it does and a
    combiner with fedn's interceptor accepts its calls."""
    import secrets as secrets_module

    from fedn.network.clients.grpc_handler import GrpcHandler
    from fedn.network.grpc import auth as fedn_grpc_auth

    secret = secrets_module.token_hex(32)
    token = _jwt(secret, "client")
    monkeypatch.setattr(fedn_grpc_auth, "SECRET_KEY", secret)
    monkeypatch.setattr(GrpcHandler, "__init__", GrpcHandler.__init__)  # restored after
    server, port = _grpc_server_with_fedn_auth()
    try:
        plain = GrpcHandler("127.0.0.1", port, "c1", token, "combiner-1")
        assert not any(key == "authorization" for key, _ in plain.metadata)  # the bug
        assert _call(port, plain.metadata) == "UNAUTHENTICATED"
        plain.channel.close()
        fedn_compat.attach_grpc_token()
        fedn_compat.attach_grpc_token()  # idempotent
        fixed = GrpcHandler("127.0.0.1", port, "c1", token, "combiner-1")
        assert [v for k, v in fixed.metadata if k == "authorization"] == [f"Bearer {token}"]
        assert _call(port, fixed.metadata) == "OK"
        fixed.channel.close()
    finally:
        server.stop(0)


def test_bug18_controller_methods_open_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream: Control/Start (and the other controller methods) need no token at a
    combiner that checks tokens; closed, they need the API server's controller token,
    which the patched fedn Channel sends on every call."""
    import secrets as secrets_module

    from fedn.network.combiner import interfaces
    from fedn.network.grpc import auth as fedn_grpc_auth

    secret = secrets_module.token_hex(32)
    start = "/fedn.Control/Start"
    monkeypatch.setattr(fedn_grpc_auth, "SECRET_KEY", secret)
    monkeypatch.setattr(fedn_grpc_auth, "ENDPOINT_WHITELIST",
                        list(fedn_grpc_auth.ENDPOINT_WHITELIST))
    monkeypatch.setattr(interfaces.Channel, "__init__", interfaces.Channel.__init__)
    server, port = _grpc_server_with_fedn_auth()
    try:
        assert _call(port, [], method=start) == "OK"  # the upstream bug
        removed = fedn_compat.close_controller_whitelist()
        assert sorted(removed) == sorted(fedn_compat.CONTROLLER_METHODS)
        assert _call(port, [], method=start) == "UNAUTHENTICATED"
        bearer = lambda token: [("authorization", f"Bearer {token}")]  # noqa: E731
        assert _call(port, bearer(_jwt(secret, "client")), method=start) == "PERMISSION_DENIED"
        assert _call(port, bearer(_jwt(secret, "controller", -10)),
                     method=start) == "UNAUTHENTICATED"
        unsigned = interfaces.Channel("127.0.0.1", port).get_channel()
        assert _call(port, [], method=start, channel=unsigned) == "UNAUTHENTICATED"
        fedn_compat.sign_controller_calls()
        signed = interfaces.Channel("127.0.0.1", port).get_channel()
        assert _call(port, [], method=start, channel=signed) == "OK"
    finally:
        server.stop(0)


def test_bug21_latest_round_id_is_numeric(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """fedn sorts round ids as strings ('9' > '10'); the patch takes the numeric maximum."""
    from fedn.network.storage.statestore.stores.round_store import SQLRoundStore
    from fedn.network.storage.statestore.stores.sql.shared import RoundModel

    session_factory = _sqlite_session(tmp_path / "rounds.sqlite")
    with session_factory() as session:
        for i in range(1, 11):
            session.add(RoundModel(id=str(i), status="Finished"))
        session.commit()
    store = SQLRoundStore(session_factory)
    assert store.get_latest_round_id() == 9  # fedn as shipped: the next id repeats 10
    monkeypatch.setattr(SQLRoundStore, "get_latest_round_id",
                        SQLRoundStore.get_latest_round_id)  # undone after the test
    fedn_compat.numeric_round_ids()
    assert store.get_latest_round_id() == 10
    assert SQLRoundStore(_sqlite_session(tmp_path / "empty.sqlite")).get_latest_round_id() == 0


def test_a_report_stored_twice_is_read_once(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug 10, second symptom: overlapping rewrites by two combiners left one combiner's
    report in the store twice (seen with 3 combiners); the controller, which waits for
    exactly one report per combiner, failed the round. Read back, each report is once."""
    from fedn.network.storage.statestore.stores.sql.shared import RoundModel

    store, session_factory = _pending_round_store(tmp_path, monkeypatch)
    for name in ("combiner-1", "combiner-2", "combiner-3"):
        current = store.get("1")
        current.combiners.append(_round_report(name))
        store.update(current)
    # The state the race left: combiner-1's report a second time, as its own rows.
    with session_factory() as session:
        entity = session.get(RoundModel, "1")
        again = _round_report("combiner-1")
        again["config"]["is_sl_inference"] = False  # as fedn's round store fills it in
        entity.combiners.append(fedn_compat._round_combiner_model(again))
        session.commit()
    assert len(store.get("1").combiners) == 4  # fedn as it is: 4 reports, 3 combiners
    fedn_compat.merge_round_combiners()
    reports = store.get("1").combiners
    assert sorted(c.name for c in reports) == ["combiner-1", "combiner-2", "combiner-3"]
    later = store.get("1")  # a later full write keeps one of each
    later.status = "Success"
    store.update(later)
    assert len(store.get("1").combiners) == 3


@pytest.mark.parametrize("torn", ["config", "data"])
def test_a_report_caught_without_its_config_is_left_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torn: str) -> None:
    """Bug 10, third symptom: a read overlapping a rewrite saw a report whose round config
    (or data) row was just deleted; fedn's reader raised "Invalid key: config_job_id"
    ("Missing field data"), which ended a combiner's round thread for good. Read now
    without that report."""
    from fedn.network.storage.statestore.stores.shared import MissingFieldError
    from fedn.network.storage.statestore.stores.sql.shared import (
        RoundCombinerDataModel,
        RoundCombinerModel,
        RoundConfigModel,
    )

    store, session_factory = _pending_round_store(tmp_path, monkeypatch)
    for name in ("combiner-1", "combiner-2"):
        current = store.get("1")
        current.combiners.append(_round_report(name))
        store.update(current)
    with session_factory() as session:  # a row of combiner-2's deleted under the reader
        row = session.query(RoundCombinerModel).filter_by(name="combiner-2").one()
        if torn == "config":
            session.query(RoundConfigModel).filter_by(id=row.round_config_id).delete()
        else:
            session.query(RoundCombinerDataModel).filter_by(id=row.data_id).delete()
        session.commit()
    with pytest.raises((ValueError, MissingFieldError),
                       match=r"Invalid key: config_job_id|Missing field data"):
        store.get("1")  # fedn as it is
    fedn_compat.merge_round_combiners()
    assert [c.name for c in store.get("1").combiners] == ["combiner-1"]


def test_uncompressed_models_write_what_fedn_reads(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug 23: fedn's numpy helper compressed every model; written plain now, read the same."""
    import zipfile

    import numpy as np
    from fedn.utils.helpers.helpers import get_helper
    from fedn.utils.helpers.plugins import numpyhelper

    from fedseg_clinic.model.npz import write_npz
    from fedseg_clinic.model.weights import load_weights_npz

    monkeypatch.setattr(numpyhelper.Helper, "save", _unwrapped(numpyhelper.Helper, "save"))
    helper = get_helper("numpyhelper")
    weights = [np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros(1000, np.float32)]
    compressed = helper.save(weights, str(tmp_path / "fedn.npz"))
    fedn_compat.uncompressed_models()
    fedn_compat.uncompressed_models()  # idempotent
    plain = helper.save(weights)  # no path: fedn's temporary file
    assert plain.endswith(".npz") and plain != compressed
    for path, method in ((compressed, zipfile.ZIP_DEFLATED), (plain, zipfile.ZIP_STORED)):
        with zipfile.ZipFile(path) as archive:
            assert {i.compress_type for i in archive.infolist()} == {method}
        for got, want in zip(helper.load(path), weights, strict=True):
            np.testing.assert_array_equal(got, want)
    Path(plain).unlink()
    # The clinic side writes the same form; fedn's helper and ours read either.
    handle = tmp_path / "clinic.npz"
    with open(handle, "wb") as out:
        write_npz(weights, out)
    with zipfile.ZipFile(handle) as archive:
        assert [i.filename for i in archive.infolist()] == ["0.npy", "1.npy"]
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
    for got, want in zip(load_weights_npz(Path(compressed)), weights, strict=True):
        np.testing.assert_array_equal(got, want)
    # The servers stay free of TensorFlow (a combiner with it: +500 MB, measured).
    code = ("import sys; from fedseg.orchestration.fedn import compat; "
            "compat.uncompressed_models(); print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"
