"""Progress of dask computations on a rich progress bar, on any scheduler.

Analyses run one dask computation each, on whichever scheduler is active. On the local
schedulers a dask callback counts finished tasks; on a ``dask.distributed`` cluster a
scheduler plugin counts them and publishes the counts as events the client subscribes
to. Where the plugin cannot be installed (a remote scheduler without ckpt-tools), the
bar only shows elapsed time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from dask.callbacks import Callback
from distributed.diagnostics.plugin import SchedulerPlugin
from rich.progress import Progress, TaskID

__all__ = ["TOPIC", "TaskCounter", "track"]

TOPIC = "ckpt-progress"
"""The scheduler event topic carrying ``{"total": tasks, "done": tasks}``."""


class TaskCounter(SchedulerPlugin):
    """Scheduler plugin: counts tasks submitted and finished, published on `TOPIC`."""

    name = TOPIC

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.total = self.done = 0
        self._last = 0.0
        self.scheduler = None

    async def start(self, scheduler) -> None:  # noqa: D102
        self.scheduler = scheduler

    def update_graph(self, scheduler, *, tasks=(), **kwargs) -> None:  # noqa: D102
        self.scheduler = scheduler
        self.total += len(tasks)
        self._publish(force=True)

    def transition(self, key, start, finish, *args, **kwargs) -> None:  # noqa: D102
        if finish in ("memory", "erred"):
            self.done += 1
            self._publish()

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.scheduler is not None and (force or now - self._last >= self.interval):
            self._last = now
            self.scheduler.log_event(TOPIC, {"total": self.total, "done": self.done})


class _LocalCounter(Callback):
    def __init__(self, on_change):
        super().__init__()
        self.total = self.done = 0
        self._on_change = on_change

    def _start_state(self, dsk, state):
        self.total += sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self._on_change(self.total, self.done)

    def _posttask(self, key, result, dsk, state, worker_id):
        self.done += 1
        self._on_change(self.total, self.done)


@contextlib.contextmanager
def track(bar: Progress, task: TaskID, client=None) -> Iterator[None]:
    """Advance `task` of `bar` with the dask tasks that run inside the block.

    Args:
        bar: The rich progress bar.
        task: Its task to advance (its total becomes the number of dask tasks).
        client: The ``distributed.Client`` in use, or None for the local schedulers.
    """
    lock = threading.Lock()
    base: dict[str, int] = {}

    def show(total: int, done: int) -> None:
        with lock:
            base.setdefault("total", total if client is not None else 0)
            base.setdefault("done", done if client is not None else 0)
            bar.update(task, total=max(total - base["total"], 1),
                       completed=done - base["done"])

    if client is None:
        with _LocalCounter(show):
            yield
        return
    if not _install(client):
        yield
        return
    state = client.run_on_scheduler(_counts)
    show(state["total"], state["done"])
    client.subscribe_topic(TOPIC, lambda event: show(event[1]["total"], event[1]["done"]))
    try:
        yield
        state = client.run_on_scheduler(_counts)
        show(state["total"], state["done"])
    finally:
        client.unsubscribe_topic(TOPIC)


def _counts(dask_scheduler=None) -> dict[str, int]:
    plugin = dask_scheduler.plugins[TOPIC]
    return {"total": plugin.total, "done": plugin.done}


def _install(client) -> bool:
    try:
        if TOPIC not in client.run_on_scheduler(lambda dask_scheduler: list(
                dask_scheduler.plugins)):
            client.register_plugin(TaskCounter(), name=TOPIC)
    except Exception:  # a scheduler that cannot import ckpt-tools: elapsed time only
        return False
    return True
