"""Checkpoint schedules: the training steps at which weights are saved.

A schedule is written as comma-joined parts (whitespace around parts is ignored): ``N``,
the single step ``N``; ``start:stop:every``, ``range(start, stop, every)`` (stop exclusive,
as in Python); ``log2:N``, steps 0, 1, 2, 4, 8, ... up to ``N``, plus ``N`` itself. Or it
is the name of a preset, the whole text being the name (see :data:`PRESETS`):

* ``dense-early``: every step to 100, every 2 to 1,000, every 10 to 4,000, every 100 to
  10,000, then every 1,000 up to and including 100,000 (1,001 steps).
* ``paper``: the first 4,000 iterations studied by Frankle, Schwab & Morcos (2020),
  "The Early Phase of Neural Network Training": every step to 100, every 10 to 1,000,
  every 50 up to and including 4,000 (251 steps).
* ``pythia``: Pythia's public checkpoints: 0, 1, 2, 4, ..., 512, then every 1,000 up to
  and including 143,000 (154 steps).

Step ``s`` means the weights after ``s`` optimizer updates; step 0 (initialisation) is in
every schedule.
"""

from __future__ import annotations

import bisect
import json
import operator
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from types import MappingProxyType

__all__ = ["MAX_STEP", "MAX_STEPS", "PRESETS", "Schedule", "nearest"]

MAX_STEPS = 10_000_000  # a typo such as 0:10000000000:1 must not exhaust memory
MAX_STEP = 2**63 - 1  # steps are stored as int64 coordinates downstream

PRESETS: Mapping[str, str] = MappingProxyType(
    {
        "dense-early": "0:100:1,100:1000:2,1000:4000:10,4000:10000:100,10000:100001:1000",
        "paper": "0:100:1,100:1000:10,1000:4001:50",
        "pythia": "log2:512,1000:143001:1000",
    }
)

_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits only: no '_', '+' or other scripts
_NAME = re.compile(r"[A-Za-z][\w-]*")  # what an attempted preset name looks like
_PRESET_LIST = ", ".join(PRESETS)


@dataclass(frozen=True, repr=False)
class Schedule:
    """A sorted, de-duplicated, immutable set of training steps.

    Build one with :meth:`parse`, :meth:`from_steps` or :meth:`from_json`. Membership is
    O(1) (a frozenset), so ``step in schedule`` is cheap inside a training loop. Two
    schedules are equal when they hold the same steps, whatever text they came from.

    Attributes:
        steps: The steps in increasing order; always starts with 0.
        text: The text the schedule was parsed from (parts stripped of whitespace, a
            preset by its name), or a canonical compact text for :meth:`from_steps`.
            After clipping (``final``) it records where the steps came from; ``steps``
            is authoritative.
    """

    steps: tuple[int, ...]
    text: str = field(compare=False)
    _members: frozenset[int] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        steps = self.steps
        if not isinstance(self.text, str):
            raise TypeError(f"schedule text must be a str, got {type(self.text).__name__}")
        if not isinstance(steps, tuple) or any(type(s) is not int for s in steps):
            raise TypeError("schedule steps must be a tuple of ints")
        if not steps or steps[0] != 0:
            raise ValueError("invalid schedule steps: they must start with step 0")
        if not all(map(operator.lt, steps, islice(steps, 1, None))):
            raise ValueError("invalid schedule steps: they must be strictly increasing")
        if steps[-1] > MAX_STEP or len(steps) > MAX_STEPS:
            raise ValueError(f"invalid schedule steps: over {MAX_STEPS:,} or past 2**63 - 1")
        object.__setattr__(self, "_members", frozenset(steps))

    @classmethod
    def parse(cls, text: str, *, final: int | None = None) -> Schedule:
        """Parse a schedule from its compact text or a preset name.

        Args:
            text: Comma-joined parts (``N``, ``start:stop:every``, ``log2:N``) or the name
                of a preset in :data:`PRESETS` (case-insensitive).
            final: The final training step. When given, steps after it are dropped and
                ``final`` itself is added.

        Returns:
            The schedule; it always contains step 0 (and ``final`` when given).

        Raises:
            ValueError: On malformed text (the one-line message names the bad part), an
                unknown preset, a negative ``final``, or more than :data:`MAX_STEPS`
                steps (counted part by part after clipping, before de-duplication).
        """
        if not isinstance(text, str):
            raise TypeError(f"schedule text must be a str, got {type(text).__name__}")
        limit = MAX_STEP if final is None else _check_step(final, "final")
        body = text.strip()
        if not body:
            raise ValueError(
                "empty schedule text; expected parts such as '0:100:1,100:1000:10' "
                f"or a preset: {_PRESET_LIST}"
            )
        name = body.lower()
        parts = [part.strip() for part in PRESETS.get(name, body).split(",")]
        members = {0} if final is None else {0, limit}
        total = 0
        for part in parts:
            steps = _parse_part(part, limit)
            # Count arithmetically: len() of a range beyond sys.maxsize overflows.
            total += _range_len(steps) if isinstance(steps, range) else len(steps)
            if total > MAX_STEPS:
                raise _part_error(part, f"schedule would hold more than {MAX_STEPS:,} steps")
            members.update(steps)
        return cls(tuple(sorted(members)), name if name in PRESETS else ",".join(parts))

    @classmethod
    def from_steps(cls, steps: Iterable[int], *, final: int | None = None) -> Schedule:
        """Build a schedule from explicit steps, in any order, duplicates allowed.

        Args:
            steps: Non-negative integer steps; step 0 is added if absent.
            final: As in :meth:`parse`.

        Returns:
            The schedule, with a canonical compact :attr:`text`.

        Raises:
            TypeError: If a step is not an integer.
            ValueError: If a step is negative or past 2**63 - 1, or there are more than
                :data:`MAX_STEPS` distinct steps.
        """
        members = {0}
        for step in steps:
            members.add(_check_step(step, "step"))
            if len(members) > MAX_STEPS:
                raise ValueError(f"schedule would hold more than {MAX_STEPS:,} steps")
        if final is not None:
            limit = _check_step(final, "final")
            members = {s for s in members if s <= limit} | {limit}
        ordered = tuple(sorted(members))
        return cls(ordered, _compact_text(ordered))

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        """Read a schedule written by :meth:`to_json`.

        Raises:
            ValueError: If ``text`` is not such JSON or its steps are not a valid schedule.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"invalid schedule JSON: {err}") from err
        if not isinstance(data, dict) or set(data) != {"text", "steps"}:
            raise ValueError("invalid schedule JSON: expected an object with keys text, steps")
        steps, source = data["steps"], data["text"]
        if not isinstance(source, str) or not isinstance(steps, list):
            raise ValueError("invalid schedule JSON: text must be a string, steps a list")
        if any(type(s) is not int for s in steps):  # rejects floats and booleans
            raise ValueError("invalid schedule JSON: steps must be integers")
        return cls(tuple(steps), source)

    def to_json(self) -> str:
        """Return the schedule as JSON text holding both :attr:`text` and the step list."""
        return json.dumps({"text": self.text, "steps": list(self.steps)}, separators=(",", ":"))

    def with_final(self, final: int) -> Schedule:
        """Return a copy holding only the steps ``<= final``, plus ``final`` itself."""
        final = _check_step(final, "final")
        end = bisect.bisect_right(self.steps, final)
        kept = self.steps[:end]
        return Schedule(kept if kept[-1] == final else (*kept, final), self.text)

    @property
    def final(self) -> int:
        """The last (largest) step."""
        return self.steps[-1]

    def index(self, step: int) -> int:
        """Return the position of ``step`` in :attr:`steps`.

        Raises:
            ValueError: If ``step`` is not stored; the message names the nearest steps.
        """
        step = operator.index(step)
        if step not in self._members:
            nearest = ", ".join(map(str, self.nearest(step)))
            raise ValueError(
                f"step {step} is not in the schedule ({len(self)} steps, 0..{self.final}); "
                f"nearest stored steps: {nearest}"
            )
        return bisect.bisect_left(self.steps, step)

    def nearest(self, step: int, k: int = 3) -> tuple[int, ...]:
        """Return the ``k`` stored steps nearest to ``step``, in increasing order.

        Ties in distance go to the earlier step. Fewer than ``k`` are returned only when
        the schedule holds fewer than ``k`` steps.
        """
        return nearest(self.steps, step, k)

    def __contains__(self, step: object) -> bool:
        return step in self._members

    def __iter__(self) -> Iterator[int]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int | slice) -> int | tuple[int, ...]:
        return self.steps[i]  # an int for an int index, a tuple for a slice

    def __repr__(self) -> str:
        text = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return f"Schedule(text={text!r}, n_steps={len(self)}, final={self.final})"


def _part_error(part: str, reason: str) -> ValueError:
    return ValueError(f"invalid schedule part {part!r}: {reason}")


def _check_step(value: int, what: str) -> int:
    """Return ``value`` as an int, checked to be a storable step."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{what} must be an integer, got {type(value).__name__}")
    step = operator.index(value)
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"{what} must be between 0 and 2**63 - 1, got {step}")
    return step


def _number(part: str, text: str, what: str, *, positive: bool = False, top: int = MAX_STEP) -> int:
    """Parse one integer field of ``part``, naming the part in any error."""
    text = text.strip()
    if not _INTEGER.fullmatch(text):
        raise _part_error(part, f"{what} {text!r} is not an integer")
    digits = text.lstrip("-0")  # check these before int() so absurd input is cheap to reject
    if text.startswith("-") or (positive and not digits):
        bound = "positive" if positive else "non-negative"
        raise _part_error(part, f"{what} must be {bound}, got {text}")
    if len(digits) > 19 or int(text) > top:
        raise _part_error(part, f"{what} must be at most {top}")
    return int(text)


def _parse_part(part: str, limit: int) -> range | list[int]:
    """Return the steps ``<= limit`` that one part describes."""
    if not part:
        raise _part_error(part, "empty part (stray comma?)")
    fields = part.split(":")
    if fields[0].strip().lower() == "log2":
        if len(fields) != 2:
            raise _part_error(part, "expected 'log2:N'")
        n = _number(part, fields[1], "N")
        steps = [0, *(2**k for k in range(n.bit_length())), n]
        return [s for s in steps if s <= limit]
    if len(fields) == 1:
        if _NAME.fullmatch(part):
            raise _part_error(part, f"not a number or a preset (whole text only): {_PRESET_LIST}")
        step = _number(part, fields[0], "step")
        return [step] if step <= limit else []
    if len(fields) != 3:
        raise _part_error(part, "expected N, start:stop:every or log2:N")
    start = _number(part, fields[0], "start")
    stop = _number(part, fields[1], "stop", top=MAX_STEP + 1)
    every = _number(part, fields[2], "every", positive=True)
    if stop <= start:
        raise _part_error(part, "stop must be greater than start")
    return range(start, min(stop, limit + 1), every)


def _range_len(steps: range) -> int:
    return max(0, -((steps.start - steps.stop) // steps.step))


def _compact_text(steps: tuple[int, ...]) -> str:
    """Return compact text for sorted steps: runs of 3+ equal gaps become start:stop:every."""
    parts, i, n = [], 0, len(steps)
    while i < n:
        j = i + 1  # steps[i:j + 1] is an arithmetic run
        while j + 1 < n and steps[j + 1] - steps[j] == steps[i + 1] - steps[i]:
            j += 1
        if j - i >= 2:
            every = steps[i + 1] - steps[i]
            stop = min(steps[j] + every, MAX_STEP + 1)  # still past steps[j]
            parts.append(f"{steps[i]}:{stop}:{every}")
            i = j + 1
        else:
            parts.append(str(steps[i]))
            i += 1
    return ",".join(parts)


def nearest(steps: Sequence[int], step: int, k: int = 3) -> tuple[int, ...]:
    """The ``k`` steps of the increasing `steps` nearest to `step`, in increasing order.

    Ties in distance go to the earlier step; fewer than ``k`` only when `steps` holds
    fewer. Every "nearest stored steps" message uses it (`Schedule.nearest`).
    """
    step, k = operator.index(step), operator.index(k)
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k}")
    steps = [int(s) for s in steps]
    lo = hi = bisect.bisect_left(steps, step)  # the answer is the window steps[lo:hi]
    while hi - lo < k and (lo > 0 or hi < len(steps)):
        if hi == len(steps) or (lo > 0 and step - steps[lo - 1] <= steps[hi] - step):
            lo -= 1
        else:
            hi += 1
    return tuple(steps[lo:hi])
