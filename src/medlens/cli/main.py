"""Entry point: the ``medlens`` app, composed here from the command modules. Errors print one line and exit
non-zero; ``--debug`` shows the traceback.

Every command is a module-level function of a ``*_cmd.py`` module (or of its module-level sub-app: ``data``,
``models``, ``nodules``, ``pacs``); this module lists them in the order ``medlens --help`` shows them. The command
modules import only the standard library, typer, rich and ``medlens.cli.common`` at module level, and each command
imports what it runs in its body, so ``medlens --help`` loads none of the library (docs/ARCHITECTURE.md,
"Imports").
"""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from medlens.cli import (data_cmd, explain_cmd, federate_cmd, gateway_cmd, imaging_cmd, interop_cmd, io_cmd,
                         models_cmd, nodules_cmd, plan_cmd, predict_cmd, pretrain_cmd, run_cmd, serve_cmd, system_cmd)
from medlens.cli.common import SHORT_HELP, err_console, quiet_libraries

app = typer.Typer(name="medlens", help="Deep learning on medical images: data to a validated, explained model.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

app.command("doctor")(system_cmd.doctor)
app.command("train")(run_cmd.train)
app.command("evaluate")(run_cmd.evaluate)
app.command("recalibrate")(run_cmd.recalibrate)
app.command("compare")(run_cmd.compare)
app.command("predict")(predict_cmd.predict)
app.command("segment")(predict_cmd.segment)
app.command("report")(run_cmd.report)
app.command("info")(io_cmd.info)
app.command("convert")(io_cmd.convert)
app.command("deid")(io_cmd.deid)
app.command("view")(io_cmd.view)
app.command("explain")(explain_cmd.explain)
app.command("process")(imaging_cmd.process)
app.command("register")(imaging_cmd.register_images)
app.command("features")(imaging_cmd.features)
app.command("fhir")(interop_cmd.fhir)
app.command("export")(serve_cmd.export)
app.command("serve")(serve_cmd.serve)
app.command("federate", context_settings=SHORT_HELP)(federate_cmd.federate)
app.command("plan")(plan_cmd.plan)
app.command("pretrain", context_settings=SHORT_HELP)(pretrain_cmd.pretrain)
app.command("gateway")(gateway_cmd.gateway)
app.add_typer(data_cmd.app, name="data")
app.add_typer(models_cmd.app, name="models")
app.add_typer(nodules_cmd.app, name="nodules")
app.add_typer(interop_cmd.pacs_app, name="pacs")

_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    """medlens command line."""
    _state["debug"] = debug


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _state["debug"] = False
    from medlens.errors import MedlensError

    quiet_libraries()

    try:
        app(args=argv, prog_name="medlens", standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except MedlensError as e:
        if _state["debug"]:
            raise
        # escape: a message quoting "[nan, 1.0]" must not be read as markup
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        return 130
    except Exception as e:  # an unexpected failure: still one line unless --debug
        if _state["debug"]:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        err_console.print(f"[bold red]error:[/] {type(e).__name__}: {escape(msg)} (run with --debug for the traceback)",
                          highlight=False, soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
