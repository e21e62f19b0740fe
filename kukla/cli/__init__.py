"""The `kukla` command line (Typer)."""
