"""Each fedn 0.33.0 bug in fedseg.orchestration.fedn.compat.BUGS still exists upstream.

A test here fails once fedn fixes its bug: that is the signal to drop the workaround (and
to move FEDN_VERSION). The tests read fedn's own code or run its own classes; where a
test in test_fedn_compat.py already shows the upstream behaviour next to the fix, it is
named in UPSTREAM_TESTS_ELSEWHERE instead of repeated.
"""

from __future__ import annotations

import inspect
import re
from importlib import metadata
from pathlib import Path

import pytest
import sqlalchemy

from fedseg.orchestration.fedn import compat as fedn_compat
from fedseg_clinic.errors import FedsegError

ROOT = Path(__file__).resolve().parents[1]

# Bug number -> a test in test_fedn_compat.py that runs fedn's code without the fix too.
UPSTREAM_TESTS_ELSEWHERE = {
    2: "test_fedn_compat.py::test_sql_coercion_fixes_fedn_store_writes",
    10: "test_fedn_compat.py::test_two_combiners_reporting_at_once_keep_both_reports",
    13: "test_fedn_compat.py::test_skip_unavailable_combiners_defines_the_method_fedn_calls",
    14: "test_fedn_compat.py::test_bugs14_17_graphql_metrics_list_and_bare_bearer",
    15: "test_fedn_compat.py::test_bug15_grpc_token_only_sent_on_tls",
    16: "test_fedn_compat.py::test_bug16_health_probe_user_agent_skips_fedn_grpc_auth",
    21: "test_fedn_compat.py::test_bug21_latest_round_id_is_numeric",
    17: "test_fedn_compat.py::test_bugs14_17_graphql_metrics_list_and_bare_bearer",
    18: "test_fedn_compat.py::test_bug18_controller_methods_open_without_a_token",
    22: "test_fedn_compat.py::test_bind_api_server_lengthens_gunicorns_request_timeout",
    23: "test_fedn_compat.py::test_uncompressed_models_write_what_fedn_reads",
}


def _sqlite_session(path: Path) -> sqlalchemy.orm.sessionmaker:
    from fedn.network.storage.statestore.stores.sql.shared import MyAbstractBase

    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    MyAbstractBase.metadata.create_all(engine)
    return sqlalchemy.orm.sessionmaker(engine)


def test_every_bug_has_an_upstream_test_and_a_docs_row() -> None:
    numbers = [bug.number for bug in fedn_compat.BUGS]
    assert numbers == list(range(1, len(numbers) + 1))
    here = {int(n) for m in re.findall(r"^def test_bugs?_((?:\d+_)+)", Path(__file__).read_text(),
                                       flags=re.M) for n in m.strip("_").split("_")}
    elsewhere = set(UPSTREAM_TESTS_ELSEWHERE)
    assert here | elsewhere == set(numbers)
    for node in UPSTREAM_TESTS_ELSEWHERE.values():
        module, name = node.split("::")
        assert f"def {name}(" in (ROOT / "tests" / module).read_text()
    table = (ROOT / "docs" / "network.md").read_text()
    rows = {int(m) for m in re.findall(r"^\| (\d+)(?: \(new\))? \|", table, flags=re.M)}
    assert rows == set(numbers)


def test_check_fedn_version_refuses_an_unknown_fedn() -> None:
    assert fedn_compat.check_fedn_version() == metadata.version("fedn") == "0.33.0"
    with pytest.raises(FedsegError, match=r"fedn 0\.34\.0 is installed.*fedn==0\.33\.0"):
        fedn_compat.check_fedn_version("0.34.0")


def test_bug_1_fedn_allows_sqlalchemy_2_1() -> None:
    requirement = next(r for r in metadata.requires("fedn") if r.lower().startswith("sqlalchemy"))
    assert "<" not in requirement  # no upper bound: 2.1 (psycopg 3) is allowed


def test_bug_3_every_api_worker_runs_create_all() -> None:
    from fedn.network.storage import dbconnection

    assert "metadata.create_all(engine, checkfirst=True)" in inspect.getsource(dbconnection)


def test_bug_4_client_and_route_spell_the_combiner_differently() -> None:
    from fedn.network.api.v1 import client_routes
    from fedn.network.clients import client_v2

    assert '"preferred_combiner":' in inspect.getsource(client_v2)
    assert 'json_data.get("combiner_preferred"' in inspect.getsource(client_routes)


def test_bug_5_start_session_leaves_rounds_out() -> None:
    from fedn.network.api.client import APIClient

    source = inspect.getsource(APIClient.start_session)
    config = source[source.index('"session_config": {'):source.index("},", source.index(
        '"session_config": {'))]
    assert "rounds" in inspect.signature(APIClient.start_session).parameters
    assert '"rounds"' not in config


@pytest.mark.parametrize(("number", "column", "value"), [
    (6, "validate", "False"),
    (7, "aggregator_kwargs", {"serveropt": "adam"}),
])
def test_bugs_6_7_fedn_s_columns_refuse_what_fedn_sends(
        tmp_path: Path, number: int, column: str, value: object) -> None:
    """fedn sends strings for booleans (6) and dicts for strings (7); its own ORM refuses."""
    from fedn.network.storage.statestore.stores.sql.shared import (
        MyAbstractBase,
        SessionConfigModel,
    )

    assert not sqlalchemy.event.contains(MyAbstractBase, "before_insert",
                                         fedn_compat._coerce_row)
    fields = {"id": "sc", "aggregator": "fedavg", "round_timeout": 60, "buffer_size": -1,
              "delete_models_storage": True, "clients_required": 1, "validate": True,
              "helper_type": "numpyhelper", "model_id": "m", "rounds": 1, column: value}
    session_factory = _sqlite_session(tmp_path / f"bug{number}.sqlite")
    with session_factory() as session:
        session.add(SessionConfigModel(**fields))
        with pytest.raises(sqlalchemy.exc.StatementError):
            session.commit()


def test_bug_8_server_functions_column_is_varchar_255() -> None:
    from fedn.network.storage.statestore.stores.sql import shared

    # fedn's source, not its metadata: a network started in this test process
    # (tests/test_deployment.py, test_network.py) has already widened the metadata.
    source = inspect.getsource(shared.SessionConfigModel)
    assert "server_functions: Mapped[Optional[str]] = mapped_column(String(255))" in source


def test_bug_9_a_known_combiner_name_keeps_its_stored_port() -> None:
    from fedn.network.combiner import combiner

    source = inspect.getsource(combiner.Combiner.__init__)
    assert 'if self.db.combiner_store.get_by_name(config["name"]) is None:' in source
    assert "combiner_store.update" not in source


def test_bug_11_every_combiner_shares_one_model_folder() -> None:
    from fedn.network.storage.models import tempmodelstorage

    assert 'os.environ.get("FEDN_MODEL_DIR", "/tmp/models")' in inspect.getsource(
        tempmodelstorage)


def test_bug_12_report_wait_retries_without_a_stop() -> None:
    from fedn.network.controller import control

    source = inspect.getsource(control.Control)
    wait = source[source.index("def check_combiners_done_reporting") - 120:
                  source.index("def check_combiners_done_reporting")]
    assert "@retry(" in wait and "stop=" not in wait



def test_bug_19_client_tls_only_on_port_443_and_private_ca_drops_token() -> None:
    from fedn.network.clients import grpc_handler

    source = inspect.getsource(grpc_handler.GrpcHandler)
    assert "if port == GRPC_SECURE_PORT:" in source and grpc_handler.GRPC_SECURE_PORT == 443
    secure = inspect.getsource(grpc_handler.GrpcHandler._init_secure_channel)
    root_branch = secure[secure.index("FEDN_GRPC_ROOT_CERT_PATH"):secure.index("return")]
    assert "GrpcAuth" not in root_branch  # the private-CA branch attaches no token


def test_bug_20_a_failed_package_train_uploads_none() -> None:
    """Upstream: the package client turns a failing train entry point into ``None``,
    ``update_local_model`` uploads it unchecked, and the upload raises (AttributeError),
    which leaves fedn's task stream."""
    from fedn.network.clients.client_v2 import Client
    from fedn.network.clients.fedn_client import FednClient
    from fedn.network.clients.grpc_handler import GrpcHandler

    process = inspect.getsource(Client._process_training_request)
    assert "out_model = None" in process  # a failed entry point yields no model
    update = inspect.getsource(getattr(FednClient.update_local_model, "__wrapped__",
                                       FednClient.update_local_model))
    upload = update.index("self.send_model_to_combiner(model=out_model")
    assert "out_model is None" not in update[:upload]  # nothing checks it before upload
    send = inspect.unwrap(GrpcHandler.send_model_to_combiner)
    with pytest.raises(AttributeError):
        send(object.__new__(GrpcHandler), None, "update-id")  # None.stream(...)
