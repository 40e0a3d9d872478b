"""Large models through the API server: gunicorn's request timeout (fedn bug 22), the
one-line error when the API gives no answer, and a 64 MB model up and down for real."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from test_network import make_config, net

from fedseg.orchestration import session as session_mod
from fedseg.orchestration.network import NetworkConfig, network_down, network_up
from fedseg_clinic.errors import FedsegError

PACKAGE_DIR = Path(__file__).resolve().parent / "fednpkg_numpy"


def test_api_request_timeout_is_a_checked_network_key(tmp_path: Path) -> None:
    config = NetworkConfig.from_dict({"api_request_timeout_s": "900"}, "net.yaml", tmp_path)
    assert config.api_request_timeout_s == 900
    assert NetworkConfig.default(tmp_path).api_request_timeout_s == 600
    with pytest.raises(FedsegError, match=r"net\.yaml: api_request_timeout_s 10 must be"):
        NetworkConfig.from_dict({"api_request_timeout_s": 10}, "net.yaml", tmp_path)
    with pytest.raises(FedsegError, match="api_request_timeout_s must be an integer"):
        NetworkConfig.from_dict({"api_request_timeout_s": "soon"}, "net.yaml", tmp_path)


class _KilledWorker(http.server.BaseHTTPRequestHandler):
    """Answers every request the way a killed gunicorn worker does: no JSON body."""

    def _empty(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        self.send_response(502)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_GET = _empty  # noqa: N815  (http.server's method names)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def dead_api() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _KilledWorker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_upload_without_an_answer_is_a_one_line_error(dead_api: int, tmp_path: Path) -> None:
    from fedn.network.api.client import APIClient

    package = tmp_path / "package.tgz"
    package.write_bytes(b"x" * 1024)
    api = APIClient("127.0.0.1", dead_api)
    with pytest.raises(FedsegError) as info:
        session_mod.upload_package_and_seed(api, package, tmp_path / "seed.npz", "x")
    message = str(info.value)
    assert message.startswith(f"{package}: package upload (0 MB) got no answer")
    assert "api_request_timeout_s" in message and "logs/api.log" in message
    assert "\n" not in message


@pytest.fixture
def big_seed(tmp_path: Path) -> Path:
    from fedn.utils.helpers.helpers import get_helper

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(4 * 1024 * 1024, dtype=np.float32) for _ in range(4)]
    return Path(get_helper("numpyhelper").save(weights, str(tmp_path / "seed.npz")))


@net
def test_a_64_mb_model_goes_up_and_down_through_the_api(tmp_path: Path,
                                                        big_seed: Path) -> None:
    """The API server runs with the network's request timeout, and a 64 MB model (16M
    parameters) is uploaded, stored in S3 and downloaded again bit for bit."""
    root = tmp_path / "net"
    state = network_up(make_config(root, api_request_timeout_s=120))
    try:
        api_proc = psutil.Process(state.processes["api"])
        argv = api_proc.cmdline()
        assert argv[argv.index("--request-timeout") + 1] == "120"
        api = state.api_client()
        package = session_mod.build_package(PACKAGE_DIR, tmp_path / "package.tgz")
        model_id = session_mod.upload_package_and_seed(api, package, big_seed, "big")
        back = session_mod.download_model(api, model_id, tmp_path / "back.npz")
        with np.load(big_seed) as sent, np.load(back) as got:
            assert sorted(sent.files) == sorted(got.files)
            for key in sent.files:
                np.testing.assert_array_equal(sent[key], got[key])
        assert "WORKER TIMEOUT" not in (root / "logs" / "api.log").read_text()
    finally:
        network_down(root)
