"""``medlens federate``: federated learning with Flower (simulation, or server and client processes)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from medlens.cli.common import console, quiet_libraries


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"help_option_names": ["-h", "--help"]})
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
                 round_timeout: Optional[float] = typer.Option(None, "--round-timeout", help="server: seconds"),
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
        from medlens.errors import MedlensError

        quiet_libraries()
        mode = first if first in ("server", "client") else "simulate"
        cfg_path = config if mode != "simulate" else Path(first)
        if mode != "simulate" and config is None:
            raise MedlensError(f"medlens federate {mode} needs a config file")
        cfg = load_config(cfg_path, set_)
        say = lambda s: console.print(s, markup=False, highlight=False)  # noqa: E731
        if mode == "client":
            from medlens.workflow.federate import join_federation

            if site_data is None:
                raise MedlensError("medlens federate client needs --site-data FILE")
            join_federation(cfg, site_data=site_data, server=server, local_epochs=local_epochs,
                            root_certificate=root_cert, dp_noise=dp_noise, dp_clip=dp_clip, dp_delta=dp_delta,
                            config_file=str(cfg_path), site=site)
            say(f"site {site or site_data.stem}: federation finished")
            return
        if mode == "server":
            from medlens.workflow.federate import serve_federation

            certs = None
            if certificates:
                parts = [Path(p) for p in certificates.split(",")]
                if len(parts) != 3:
                    raise MedlensError("--certificates takes CA,CERT,KEY")
                certs = tuple(parts)
            run = serve_federation(cfg, clients=clients, rounds=rounds, address=address, strategy=strategy,
                                   local_epochs=local_epochs, min_fit_clients=min_fit_clients,
                                   round_timeout=round_timeout, certificates=certs, run_dir=run_dir,
                                   overwrite=overwrite, log=say)
        else:
            from medlens.workflow.federate import federate as simulate

            run = simulate(cfg, sites=sites, rounds=rounds, partition=partition, strategy=strategy,
                           local_epochs=local_epochs, dp_noise=dp_noise, dp_clip=dp_clip, dp_delta=dp_delta,
                           run_dir=run_dir, overwrite=overwrite, log=say)
        import json

        fed = json.loads((run / "federated.json").read_text())
        m = json.loads((run / "metrics.json").read_text())["test"]["metrics"]
        for r in fed["rounds"]:
            say(f"round {r['round']}: {r['fit_results']} site(s) fitted, {r['fit_failures']} failed, "
                f"{(r['bytes_down'] + r['bytes_up']) / 1e6:.3f} MB, global val AUC {r.get('global_val_auc')}")
        if "auc" in m:
            say(f"test AUC {m['auc']['value']:.3f} (95% CI {m['auc']['ci_low']:.3f} - {m['auc']['ci_high']:.3f}); "
                f"{fed['megabytes_sent']} MB sent")
        if fed.get("dp"):
            say(f"DP-SGD epsilon spent: {fed['dp']['epsilon']} (delta {fed['dp']['delta']})")
        console.print(f"run: [bold]{run}[/]")
