"""`ckpt record`: train a built-in model on a dataset and record it densely."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ckpt_tools.cli.errors import USAGE, fail, friendly
from ckpt_tools.cli.location import StorageOptions, store_location
from ckpt_tools.store import Codec, Location
from ckpt_tools.train import TrainConfig, train, with_overrides

__all__ = ["record"]


class Device(StrEnum):
    """Where to train."""

    cpu = "cpu"
    cuda = "cuda"


def default_out(config: TrainConfig) -> Path:
    """A descriptive store name under ``runs/``, e.g. ``runs/resnet20-digits-s0-1000.zarr``."""
    return Path("runs") / f"{config.model}-{config.dataset}-s{config.seed}-{config.steps}.zarr"


def progress_bar(total: int, label: str) -> Progress:
    """The rich progress bar used by the training commands."""
    return Progress(
        TextColumn(f"[bold]{label}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
    )


_RESUMABLE_OPTIONS = (
    "model",
    "dataset",
    "data_root",
    "steps",
    "batch_size",
    "lr",
    "seed",
    "width",
    "schedule",
    "eval_schedule",
    "device",
)


def _resume(
    ctx: typer.Context, path: Location, *, quiet: bool, interval: float, options: dict
) -> None:
    from ckpt_tools.resume import resume_run, resume_status

    given = {}
    for name in _RESUMABLE_OPTIONS:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name == "COMMANDLINE":
            value = ctx.params[name]
            if isinstance(value, Device):
                value = value.value
            elif isinstance(value, Path):
                value = str(value)
            given[name] = value
    status = resume_status(path)
    if status.complete:
        typer.echo(f"{path}: the run is complete (step {status.config.steps}); nothing to resume")
        return
    start = status.from_step or 0
    with progress_bar(status.config.steps, f"resuming {path.name}") as bar:
        task = bar.add_task(
            "train",
            total=status.config.steps,
            completed=start,
            loss=float("nan"),
            visible=not quiet,
        )
        result = resume_run(
            path,
            overrides=given,
            resume_interval=interval,
            recorder_options=options,
            on_step=lambda step, loss: bar.update(task, completed=step, loss=loss),
        )
    acc = result.final_eval.get("test_accuracy")
    summary = f", test accuracy {acc:.4f}" if acc is not None else ""
    typer.echo(f"resumed {path} from step {start}: recorded up to step {result.last_step}{summary}")


def _recorder_options(host_memory, writers, include, exclude) -> dict:
    from ckpt_tools.recording.budget import parse_bytes

    options = {"writers": writers, "include": include or None, "exclude": exclude or None}
    if host_memory is not None:
        try:
            options["host_memory"] = parse_bytes(host_memory)
        except ValueError as exc:
            raise fail(f"--host-memory: {exc}", USAGE) from None
    return {k: v for k, v in options.items() if v is not None}


@friendly
def record(
    ctx: typer.Context,
    model: Annotated[
        str, typer.Option(help="Built-in model, e.g. resnet20, vgg11, lenet300, convnet.")
    ] = TrainConfig.model,
    dataset: Annotated[
        str, typer.Option(help="digits (embedded), fashion-mnist, mnist, cifar10, cifar100, svhn.")
    ] = TrainConfig.dataset,
    data_root: Annotated[
        Path | None, typer.Option(help="Directory holding the dataset files.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer updates to train.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per update.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of initialisation and data order.")] = None,
    width: Annotated[int | None, typer.Option(help="Model width (first-stage channels).")] = None,
    augment: Annotated[
        bool | None,
        typer.Option(
            "--augment/--no-augment",
            help="Random crop (pad 4 at 32x32, 2 at 28x28, 1 below) and horizontal flip of "
            "training images, a pure function of (seed, step); default: on for CIFAR and "
            "SVHN only.",
        ),
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Shrink images to this side in pixels by area averaging, e.g. 14 for Fashion-"
            "MNIST (default: native).",
        ),
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Option(
            help="Checkpoint schedule: text form (0:100:1,100:1000:10) or preset (dense-early, "
            "paper, pythia)."
        ),
    ] = None,
    eval_schedule: Annotated[
        str | None, typer.Option(help="Steps at which to evaluate on the test split (sparser).")
    ] = None,
    device: Annotated[Device, typer.Option(help="Device to train on.")] = Device.cpu,
    out: Annotated[
        str | None,
        typer.Option(
            help="Store to write: a path or an s3://bucket/prefix/run.zarr URL (default: "
            "runs/<model>-<dataset>-s<seed>-<steps>.zarr)."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing recorded history.")] = False,
    resume: Annotated[
        str | None,
        typer.Option(
            help="Continue the interrupted run in this store (a path or a URL), bit for bit."
        ),
    ] = None,
    resume_interval: Annotated[
        float, typer.Option(min=0.0, help="Seconds between resume points (0: after every update).")
    ] = 30.0,
    codec: Annotated[
        Codec,
        typer.Option(
            help="How weights are stored: lz4 (lossless, default) or none (uncompressed, least "
            "CPU; run `ckpt compact` later)."
        ),
    ] = Codec.lz4,
    host_memory: Annotated[
        str | None,
        typer.Option(
            help="Host memory the recording may hold, e.g. 2GiB (default: a quarter of the RAM, "
            "at most 4 GiB)."
        ),
    ] = None,
    writers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Writer processes that compress and write (default: the cores training leaves "
            "free, at least 1).",
        ),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option(
            help="Record only tensors whose names match this glob (repeatable), e.g. '*attn*'."
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="Do not record tensors whose names match this glob (repeatable)."),
    ] = None,
    optimizer_state: Annotated[
        bool,
        typer.Option(
            help="Also record SGD's momentum buffer of every weight at each recorded step "
            "(optim_momentum_buffer)."
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Train a model and record dense checkpoints into a Zarr store.

    Ctrl-C stops at the next step with a resume point; `--resume RUN.zarr` continues.
    """
    options = _recorder_options(host_memory, writers, include, exclude)
    if resume is not None:
        if out is not None or overwrite:
            raise fail("--resume continues the store it names; drop --out/--overwrite", USAGE)
        codec_source = ctx.get_parameter_source("codec")
        if codec_source is not None and codec_source.name == "COMMANDLINE":
            raise fail("--resume keeps the codec the run was recorded with; drop --codec", USAGE)
        _resume(
            ctx,
            store_location(resume, storage_options),
            quiet=quiet,
            interval=resume_interval,
            options=options,
        )
        return
    if device is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            raise fail("--device cuda given but no CUDA device is available", USAGE)
    config = with_overrides(
        TrainConfig(),
        model=model,
        dataset=dataset,
        data_root=str(data_root) if data_root else None,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        width=width,
        schedule=schedule,
        eval_schedule=eval_schedule,
        device=device.value,
        augment=augment,
        resolution=resolution,
    )
    config.checkpoint_schedule()  # malformed schedules fail before any work
    if config.resolution is not None:
        _check_resolution(config)
    config.evaluation_schedule()
    if out is None:
        default_out(config).parent.mkdir(parents=True, exist_ok=True)
    out = store_location(out or str(default_out(config)), storage_options)
    if optimizer_state:  # a resumed run keeps the setting it was recorded with
        options["optimizer_state"] = True
    with progress_bar(config.steps, f"{config.model} on {config.dataset}") as bar:
        task = bar.add_task("train", total=config.steps, loss=float("nan"), visible=not quiet)
        result = train(
            config,
            out,
            overwrite=overwrite,
            resume_interval=resume_interval,
            codec=codec.value,
            recorder_options=options,
            on_step=lambda step, loss: bar.update(task, completed=step, loss=loss),
        )
    acc = result.final_eval.get("test_accuracy")
    summary = f", test accuracy {acc:.4f}" if acc is not None else ""
    typer.echo(f"recorded {out} (group '{result.group}', last step {result.last_step}{summary})")


def _check_resolution(config: TrainConfig) -> None:
    """Fail before any work when --resolution exceeds the dataset's native size."""
    from ckpt_tools.data import load

    try:
        load(config.dataset, root=config.data_root, resolution=config.resolution)
    except ValueError as exc:
        raise fail(f"--resolution: {exc}", USAGE) from None
