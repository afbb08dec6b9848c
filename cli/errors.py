"""One clear line on stderr and a non-zero exit instead of a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import typer

from ckpt_tools.resume import TrainingInterrupted
from ckpt_tools.store import LocationError, StoreError
from ckpt_tools.train import TrainingDiverged

__all__ = ["USAGE", "fail", "friendly", "state"]

USAGE = 2  # exit status for usage errors (bad option values), as typer/click use
FAILURE = 1  # exit status for everything else that went wrong


_NOT_USAGE = (StoreError, TrainingDiverged, OSError)


@dataclass
class _State:
    debug: bool = False


state = _State()


def fail(message: str, code: int = FAILURE) -> typer.Exit:
    """Print `message` as one line on stderr and return the `typer.Exit` to raise."""
    line = " ".join(str(message).split())
    typer.secho(f"error: {line}", err=True, fg="red")
    return typer.Exit(code)


def friendly(command: Callable) -> Callable:
    """Turn the expected failures of `command` into one-line errors (unless --debug)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except TrainingInterrupted as exc:
            typer.secho(" ".join(str(exc).split()), err=True, fg="yellow")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except Exception as exc:
            if state.debug:
                raise
            usage = isinstance(exc, ValueError | KeyError) and not isinstance(exc, _NOT_USAGE)
            usage = usage or isinstance(exc, LocationError)  # a bucket, credentials, endpoint
            code = USAGE if usage else FAILURE
            message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise fail(message, code) from None
        finally:
            sys.stderr.flush()

    return wrapper
