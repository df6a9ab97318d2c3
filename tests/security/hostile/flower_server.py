"""A hostile federated coordinator: a real Flower server process (gRPC, 127.0.0.1) that asks a medlens site
for what it must not do.

    python flower_server.py --address 127.0.0.1:PORT --mode MODE

Modes: ``epochs`` (local_epochs = 10**6), ``mu`` (proximal_mu = 1e30), ``nan`` (NaN global weights),
``silent`` (accepts the site, then never says a word), ``vanish`` (exits abruptly once the site joined).
The global weights are the site's own (Flower asks one site for them), so only the hostile part differs.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig, start_server
from flwr.server.strategy import FedAvg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--mode", required=True)
    a = ap.parse_args()

    class Evil(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            client_manager.wait_for(1)
            if a.mode == "silent":
                while True:
                    time.sleep(60)
            if a.mode == "vanish":
                os._exit(3)
            config = {"server_round": server_round, "local_epochs": 1}
            if a.mode == "epochs":
                config["local_epochs"] = 10**6
            if a.mode == "mu":
                config["proximal_mu"] = 1e30
            if a.mode == "nan":
                parameters = ndarrays_to_parameters([np.full_like(w, np.nan) if w.dtype.kind == "f" else w
                                                     for w in parameters_to_ndarrays(parameters)])
            return [(c, FitIns(parameters, config)) for c in client_manager.all().values()]

    start_server(server_address=a.address, strategy=Evil(min_fit_clients=1, min_available_clients=1,
                                                          fraction_evaluate=0.0),
                 config=ServerConfig(num_rounds=1))


if __name__ == "__main__":
    main()
