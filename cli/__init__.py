"""The `ckpt` command line."""


def main() -> None:
    """Entry point of the `ckpt` console script."""
    from ckpt_tools.cli.app import app

    app()
