"""A FEDn server side as real local processes: ``network_up``, ``network_down``, status.

One network lives in one folder (its root)::

    root/network.json         state of the running network (pids, ports, tokens; 0600)
    root/jwt-secret           the network's JWT signing secret (auth on; 0600)
    root/network-config.yaml  the NetworkConfig it was started with
    root/fedn-settings.yaml   fedn's store settings (STATESTORE_CONFIG/MODELSTORAGE_CONFIG)
    root/fedn.sqlite          the SQLite state store (statestore: sqlite)
    root/postgres/            managed PostgreSQL data (statestore: postgres-managed)
    root/logs/<name>.log      one log per process
    root/fedn-home/           FEDN_HOME_DIR of the server processes
    root/models/<combiner>/   each combiner's temporary model files (FEDN_MODEL_DIR)

Processes: stores we run (moto, postgres), the hooks service (optional), the API
server, the combiners. fedn's servers are started through
:mod:`fedseg.orchestration.fedn.launch`, which applies our fedn 0.33.0 workarounds
and binds 127.0.0.1 only (or the config's ``host``, with TLS).

Modules: ``config`` (NetworkConfig and the file names), ``state`` (network.json),
``processes`` (up, down, status), ``stores`` (SQL and S3 stores), ``auth`` (tokens),
``ports`` (free ports, process records), ``tls`` (private CA, server certificate),
``clinics`` (per-clinic tokens and kits), ``revocation`` (revoked tokens).
"""

from fedseg.orchestration.network.config import (
    CONFIG_FILE,
    SECRET_FILE,
    STATE_FILE,
    CombinerSpec,
    NetworkConfig,
)
from fedseg.orchestration.network.processes import (
    combiner_model_dir,
    network_down,
    network_status,
    network_up,
)
from fedseg.orchestration.network.state import CombinerState, NetworkState, load_network_state

__all__ = ["CONFIG_FILE", "SECRET_FILE", "STATE_FILE", "CombinerSpec", "CombinerState",
           "NetworkConfig", "NetworkState", "combiner_model_dir", "load_network_state",
           "network_down", "network_status", "network_up"]
