"""``medlens federate``: federated learning with Flower (simulation, or server and client processes)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

from medlens.cli.common import console, progress_step, quiet_flower, quiet_libraries, say

if TYPE_CHECKING:  # types only: nothing is imported at run time
    from medlens.config import ExperimentConfig


def federate(first: str = typer.Argument(..., help="CFG (simulation), or 'server' / 'client' followed by CFG"),
             config: Optional[Path] = typer.Argument(None, help="experiment YAML (after server/client)"),
             sites: int = typer.Option(5, "--sites", help="simulation: number of sites"),
             rounds: int = typer.Option(5, "--rounds", help="federated rounds"),
             partition: str = typer.Option("iid", "--partition",
                                           help="iid | dirichlet:ALPHA | by-patient | by-column:COL"),
             strategy: str = typer.Option("fedavg", "--strategy", help="fedavg, fedprox or fedadam"),
             local_epochs: int = typer.Option(1, "--local-epochs", help="local epochs per round"),
             run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="default: <output_dir>/<name>"),
             overwrite: bool = typer.Option(False, "--overwrite"),
             set_: List[str] = typer.Option([], "--set", help="override a config key"),
             dp_noise: Optional[float] = typer.Option(None, "--dp-noise", help="client-side DP-SGD (Opacus): "
                                                      "noise multiplier"),
             dp_clip: float = typer.Option(1.0, "--dp-clip", help="DP-SGD per-sample gradient norm bound"),
             dp_delta: float = typer.Option(1e-5, "--dp-delta", help="DP delta of the reported epsilon"),
             clients: int = typer.Option(2, "--clients", help="server: sites to wait for"),
             min_fit_clients: Optional[int] = typer.Option(None, "--min-fit-clients",
                                                           help="server: results a round needs (default all)"),
             round_timeout: float = typer.Option(3600.0, "--round-timeout",
                                                 help="server: seconds a round waits for the sites' fit "
                                                      "(and evaluate) answers; it goes on with those that "
                                                      "answered"),
             join_timeout: float = typer.Option(3600.0, "--join-timeout",
                                                help="server: seconds to wait for --clients sites to join"),
             site_secrets: Optional[Path] = typer.Option(None, "--site-secrets",
                                                         help="server: file of 'SITE SECRET' lines; only "
                                                              "results tagged with a site's secret count"),
             update_norm_factor: float = typer.Option(10.0, "--update-norm-factor",
                                                      help="server: drop an update whose distance to the "
                                                           "global model exceeds this x its norm"),
             insecure: bool = typer.Option(False, "--insecure",
                                           help="allow a non-local address without TLS (and, on the "
                                                "server, without --site-secrets)"),
             secret_file: Optional[Path] = typer.Option(None, "--secret-file",
                                                        help="client: file holding this site's secret"),
             max_local_epochs: int = typer.Option(100, "--max-local-epochs",
                                                  help="client: most local epochs a server may ask"),
             max_proximal_mu: float = typer.Option(10.0, "--max-proximal-mu",
                                                   help="client: largest FedProx mu a server may ask"),
             max_lr: float = typer.Option(1.0, "--max-lr", help="client: largest learning rate a server "
                                                                "may ask"),
             connect_timeout: float = typer.Option(60.0, "--connect-timeout",
                                                   help="client: seconds to reach the server"),
             server_timeout: float = typer.Option(7200.0, "--server-timeout",
                                                  help="client: seconds of silence from the server (while "
                                                       "this site waits) before it stops"),
             address: str = typer.Option("127.0.0.1:8080", "--address", help="server: host:port to listen on"),
             certificates: Optional[str] = typer.Option(None, "--certificates",
                                                        help="server TLS: CA,CERT,KEY files"),
             server: str = typer.Option("127.0.0.1:8080", "--server", help="client: the server's host:port"),
             root_cert: Optional[Path] = typer.Option(None, "--root-cert", help="client TLS: CA certificate"),
             site_data: Optional[Path] = typer.Option(None, "--site-data",
                                                      help="client: this site's data (MedMNIST-layout .npz)"),
             site: Optional[str] = typer.Option(None, "--site", help="client: site name in the report")) -> None:
    """Federated learning: `federate CFG` simulates --sites sites; `federate server CFG` and
    `federate client CFG --site-data FILE` run as separate processes over Flower's gRPC transport."""
    from medlens.config import load_config
    from medlens.workflow.federate import federate as simulate, serve_federation

    quiet_libraries()
    mode, cfg_path = _mode_and_config(first, config)
    cfg = load_config(cfg_path, set_)
    # Flower logs a traceback before re-raising a site's refusal; the refusal itself is our one line
    quiet_flower(logging.CRITICAL if mode == "client" else logging.ERROR)
    if mode == "client":
        return _join(cfg, cfg_path, site_data, site, server, root_cert, secret_file, local_epochs, dp_noise, dp_clip,
                     dp_delta, max_local_epochs, max_proximal_mu, max_lr, connect_timeout, server_timeout, insecure)
    certs = _certificates(certificates) if mode == "server" else None
    with progress_step("federated rounds", rounds) as report:
        if mode == "server":
            run = serve_federation(cfg, clients=clients, rounds=rounds, address=address, strategy=strategy,
                                   local_epochs=local_epochs, min_fit_clients=min_fit_clients,
                                   round_timeout=round_timeout, join_timeout=join_timeout, certificates=certs,
                                   site_secrets=site_secrets, update_norm_factor=update_norm_factor,
                                   insecure=insecure, run_dir=run_dir, overwrite=overwrite, log=say, progress=report)
        else:
            run = simulate(cfg, sites=sites, rounds=rounds, partition=partition, strategy=strategy,
                           local_epochs=local_epochs, dp_noise=dp_noise, dp_clip=dp_clip, dp_delta=dp_delta,
                           run_dir=run_dir, overwrite=overwrite, log=say, progress=report)
    _print_federation(run)


def _mode_and_config(first: str, config: Path | None) -> tuple[str, Path]:
    """``federate CFG`` simulates; ``federate server CFG`` and ``federate client CFG`` run one process."""
    from medlens.errors import MedlensError

    if first not in ("server", "client"):
        return "simulate", Path(first)
    if config is None:
        raise MedlensError(f"medlens federate {first} needs a config file")
    return first, config


def _certificates(text: str | None) -> tuple[Path, Path, Path] | None:
    """``--certificates CA,CERT,KEY`` of the server."""
    from medlens.errors import MedlensError

    if not text:
        return None
    parts = [Path(p) for p in text.split(",")]
    if len(parts) != 3:
        raise MedlensError("--certificates takes CA,CERT,KEY")
    return parts[0], parts[1], parts[2]


def _join(cfg: ExperimentConfig, cfg_path: Path, site_data: Path | None, site: str | None, server: str,
          root_cert: Path | None, secret_file: Path | None, local_epochs: int, dp_noise: float | None, dp_clip: float,
          dp_delta: float, max_local_epochs: int, max_proximal_mu: float, max_lr: float, connect_timeout: float,
          server_timeout: float, insecure: bool) -> None:
    """``federate client``: this site joins the server's rounds; its data stay here."""
    from medlens.engine.federated import ClientLimits
    from medlens.errors import MedlensError
    from medlens.workflow.federate import join_federation

    logging.getLogger("flwr").setLevel(logging.CRITICAL)
    if site_data is None:
        raise MedlensError("medlens federate client needs --site-data FILE")
    if max_local_epochs < 1 or not max_proximal_mu >= 0 or not max_lr > 0:
        raise MedlensError("--max-local-epochs must be at least 1, --max-proximal-mu at least 0 and "
                           "--max-lr positive")
    join_federation(cfg, site_data=site_data, server=server, local_epochs=local_epochs,
                    root_certificate=root_cert, dp_noise=dp_noise, dp_clip=dp_clip, dp_delta=dp_delta,
                    config_file=str(cfg_path), site=site, secret_file=secret_file,
                    limits=ClientLimits(max_local_epochs, max_proximal_mu, max_lr),
                    connect_timeout=connect_timeout, server_timeout=server_timeout, insecure=insecure)
    say(f"site {site or site_data.stem}: federation finished")


def _print_federation(run: Path) -> None:
    """Per round: sites fitted, failed and dropped, megabytes, global validation AUC; then the test AUC and DP."""
    from medlens.errors import MedlensError

    fed = json.loads((run / "federated.json").read_text())
    m = json.loads((run / "metrics.json").read_text())["test"]["metrics"]
    for r in fed["rounds"]:
        say(f"round {r['round']}: {r['fit_results']} site(s) fitted, {r['fit_failures']} failed, "
            f"{r.get('fit_rejected', 0)} update(s) dropped, {(r['bytes_down'] + r['bytes_up']) / 1e6:.3f} MB, "
            f"global val AUC {r.get('global_val_auc')}")
    if "auc" in m:
        say(f"test AUC {m['auc']['value']:.3f} (95% CI {m['auc']['ci_low']:.3f} - {m['auc']['ci_high']:.3f}); "
            f"{fed['megabytes_sent']} MB sent")
    if fed.get("dp"):
        say(f"DP-SGD epsilon spent: {fed['dp']['epsilon']} (delta {fed['dp']['delta']})")
    console.print(f"run: [bold]{run}[/]")
    if fed.get("status") == "failed":
        raise MedlensError(f"federated run marked failed in run.json: {fed['failure']}")
