"""Entry point. Errors print one line and exit non-zero; ``--debug`` shows the traceback."""

from __future__ import annotations

import sys

import typer

from medlens.cli.common import err_console

app = typer.Typer(name="medlens", help="Deep learning on medical images: data to a validated, explained model.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def _register() -> None:
    from medlens.cli import (data_cmd, explain_cmd, imaging_cmd, interop_cmd, io_cmd, models_cmd, nodules_cmd, run_cmd,
                             serve_cmd, system_cmd)

    system_cmd.register(app)
    app.add_typer(data_cmd.app, name="data")
    app.add_typer(models_cmd.app, name="models")
    app.add_typer(nodules_cmd.app, name="nodules")
    run_cmd.register(app)
    io_cmd.register(app)
    explain_cmd.register(app)
    imaging_cmd.register(app)
    interop_cmd.register(app)   # fhir, pacs
    serve_cmd.register(app)     # export, serve
    from medlens.cli import federate_cmd

    federate_cmd.register(app)  # federate (simulation), federate server, federate client (issue 15)
    from medlens.cli import plan_cmd, pretrain_cmd

    plan_cmd.register(app)      # plan (issue 17; train --auto is in run_cmd)
    pretrain_cmd.register(app)  # pretrain (issue 17)


_register()


_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    """medlens command line."""
    _state["debug"] = debug


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _state["debug"] = False
    from medlens.cli.common import quiet_libraries
    from medlens.errors import MedlensError

    quiet_libraries()

    try:
        app(args=argv, prog_name="medlens", standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except MedlensError as e:
        if _state["debug"]:
            raise
        from rich.markup import escape   # a message quoting "[nan, 1.0]" must not be read as markup

        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        return 130
    except Exception as e:  # an unexpected failure: still one line unless --debug
        if _state["debug"]:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/] {type(e).__name__}: {escape(msg)} (run with --debug for the traceback)",
                          highlight=False, soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
