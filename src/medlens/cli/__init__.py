"""The ``medlens`` command line: one typer sub-app per stage, each a thin call into the library."""
