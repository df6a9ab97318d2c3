"""A hostile federated site: a real Flower client process (gRPC, 127.0.0.1) that answers the medlens server
with poisoned results. An insider: it may hold a valid site secret and tags its results with it.

    python flower_client.py --server 127.0.0.1:PORT --site NAME [--secret S] [--marker FILE]
                            --modes MODE[,MODE...]     (one mode per round; the last repeats)

Modes: ``huge`` (every weight 1e30), ``nan`` (NaN weights), ``shape`` (one array with a wrong shape),
``same`` (the global weights back, unchanged), ``hang`` (sleep for ever in fit, after touching --marker).
``--eval`` says what evaluate does: ``ok`` (loss 0.5), ``nan`` (a NaN loss) or ``hang`` (sleep for ever).
The result tag follows medlens' protocol (engine.federated.result_tag) re-implemented here, so the script
does not import medlens.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import time
from pathlib import Path

import numpy as np
from flwr.client import NumPyClient, start_client


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class Hostile(NumPyClient):
    def __init__(self, a) -> None:
        self.a, self.modes = a, a.modes.split(",")

    def _tag(self, metrics, kind, config, n, body):
        if self.a.secret:
            msg = json.dumps([kind, self.a.site, int(config.get("server_round", 0)), str(config.get("nonce", "")),
                              int(n), body]).encode()
            metrics["auth"] = hmac.new(self.a.secret.encode(), msg, hashlib.sha256).hexdigest()
        return metrics

    def _hang(self):
        if self.a.marker:
            Path(self.a.marker).write_text("in")
        while True:
            time.sleep(60)

    def fit(self, parameters, config):
        rnd = int(config.get("server_round", 1))
        mode = self.modes[min(rnd, len(self.modes)) - 1]
        w = [np.array(p, copy=True) for p in parameters]
        if mode == "hang":
            self._hang()
        elif mode == "huge":
            w = [np.full_like(p, 1e30) if p.dtype.kind == "f" else p for p in w]
        elif mode == "nan":
            w = [np.full_like(p, np.nan) if p.dtype.kind == "f" else p for p in w]
        elif mode == "shape":
            w[0] = np.zeros((3, 5, 7), w[0].dtype)
        return w, 100, self._tag({"site": self.a.site, "train_loss": 0.1}, "fit", config, 100, _digest(w))

    def evaluate(self, parameters, config):
        if self.a.eval == "hang":
            self._hang()
        loss = float("nan") if self.a.eval == "nan" else 0.5
        body = json.dumps([loss, 0.5])
        return loss, 20, self._tag({"site": self.a.site, "val_auc": 0.5}, "evaluate", config, 20, body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--site", required=True)
    ap.add_argument("--secret", default="")
    ap.add_argument("--modes", default="same")
    ap.add_argument("--eval", default="ok")
    ap.add_argument("--marker", default="")
    a = ap.parse_args()
    start_client(server_address=a.server, client=Hostile(a).to_client(), insecure=True)


if __name__ == "__main__":
    main()
