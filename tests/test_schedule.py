"""Tests for ckpt_tools.schedule, checked against plain range/set references."""

import dataclasses
import json
import re
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckpt_tools import schedule as schedule_module
from ckpt_tools.schedule import MAX_STEP, MAX_STEPS, PRESETS, Schedule

# --- independent references -------------------------------------------------------------


def ref_log2(n):
    out, power = {0, n}, 1
    while power <= n:
        out.add(power)
        power *= 2
    return out


def ref_part(part):
    kind, *args = part
    if kind == "range":
        return set(range(*args))
    if kind == "log2":
        return ref_log2(args[0])
    return {args[0]}


def render_part(part):
    kind, *args = part
    if kind == "range":
        return ":".join(map(str, args))
    if kind == "log2":
        return f"log2:{args[0]}"
    return str(args[0])


def ref_steps(parts, final=None):
    steps = {0}.union(*(ref_part(p) for p in parts))
    if final is not None:
        steps = {s for s in steps if s <= final} | {final}
    return sorted(steps)


range_parts = st.builds(
    lambda start, n, every: ("range", start, start + n, every),
    st.integers(0, 3000),
    st.integers(1, 400),
    st.integers(1, 50),
)
int_parts = st.builds(lambda n: ("int", n), st.integers(0, 5000))
log2_parts = st.builds(lambda n: ("log2", n), st.integers(0, 5000))
part_lists = st.lists(st.one_of(range_parts, int_parts, log2_parts), min_size=1, max_size=6)
padding = st.sampled_from(["", " ", "\t", "  ", "\n"])


@st.composite
def schedule_texts(draw):
    parts = draw(part_lists)
    text = ",".join(draw(padding) + render_part(p) + draw(padding) for p in parts)
    return text, parts


# --- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0:5:1", list(range(5))),
        ("7", [0, 7]),
        ("0", [0]),
        (" 3:10:3 , 20 ", [0, 3, 6, 9, 20]),
        ("5:6:1", [0, 5]),
        ("8,8,0:10:4", [0, 4, 8]),
        (
            "0:100:1,100:1000:10,1000:4000:100",
            sorted({*range(100), *range(100, 1000, 10), *range(1000, 4000, 100)}),
        ),
        ("log2:512", [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]),
        ("log2:600", [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600]),
        ("log2:0", [0]),
        ("log2:1", [0, 1]),
        ("log2:3", [0, 1, 2, 3]),
    ],
)
def test_parse_examples(text, expected):
    assert list(Schedule.parse(text)) == expected


@given(schedule_texts())
def test_parse_matches_reference(case):
    text, parts = case
    s = Schedule.parse(text)
    assert list(s.steps) == ref_steps(parts)
    assert all(type(step) is int for step in s.steps)
    assert s.text == ",".join(render_part(p) for p in parts)


def test_presets():
    assert set(PRESETS) == {"dense-early", "paper", "pythia"}
    pythia = Schedule.parse("pythia")
    assert list(pythia) == sorted({0, *(2**k for k in range(10)), *range(1000, 143001, 1000)})
    assert len(pythia) == 154
    paper = Schedule.parse("paper")
    assert list(paper) == sorted({*range(100), *range(100, 1000, 10), *range(1000, 4001, 50)})
    dense = Schedule.parse("dense-early")
    assert set(range(100)) | set(range(100, 1000, 2)) <= set(dense)
    assert dense.final == 100_000
    assert Schedule.parse(" Pythia ") == pythia
    assert Schedule.parse("pythia").text == "pythia"
    with pytest.raises(TypeError):
        PRESETS["mine"] = "0:10:1"  # type: ignore[index]


# --- protocol ---------------------------------------------------------------------------


@given(schedule_texts(), st.integers(-10, 9000))
def test_membership_order_len_index(case, probe):
    text, parts = case
    s, ref = Schedule.parse(text), ref_steps(parts)
    assert len(s) == len(ref)
    assert list(iter(s)) == ref
    assert s.steps == tuple(ref)
    assert s.final == ref[-1]
    assert (probe in s) == (probe in ref)
    for i in (0, len(ref) // 2, -1):
        assert s[i] == ref[i]
    assert s[1:3] == tuple(ref[1:3])
    if probe in ref:
        assert s.index(probe) == ref.index(probe)
    elif probe >= 0:
        with pytest.raises(ValueError, match=f"step {probe} is not in the schedule"):
            s.index(probe)


@given(schedule_texts(), st.integers(-10, 9000), st.integers(0, 6))
def test_nearest_matches_reference(case, probe, k):
    text, parts = case
    ref = ref_steps(parts)
    expected = sorted(sorted(ref, key=lambda s: (abs(s - probe), s))[:k])
    assert Schedule.parse(text).nearest(probe, k) == tuple(expected)


def test_nearest_and_index_message():
    assert Schedule.parse("0:42:2").nearest(37) == (34, 36, 38)  # a tie goes to the earlier
    s = Schedule.parse("0:30:10,36,38,40")
    assert s.nearest(37) == (36, 38, 40)
    assert s.nearest(37, k=0) == ()
    assert s.nearest(-5, k=2) == (0, 10)
    assert s.nearest(5, k=100) == s.steps
    with pytest.raises(ValueError, match="k must be non-negative"):
        s.nearest(5, k=-1)
    with pytest.raises(ValueError, match=r"nearest stored steps: 36, 38, 40$"):
        s.index(37)


def test_equality_hash_immutability():
    a, b = Schedule.parse("0:3:1"), Schedule.parse("0,1,2")
    assert a == b and hash(a) == hash(b)
    assert a != Schedule.parse("0:4:1")
    assert {a: 1}[b] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.text = "x"  # type: ignore[misc]
    assert "0:3:1" in repr(a) and "n_steps=3" in repr(a)


def test_constructor_validates():
    for bad in [(), (1, 2), (0, 2, 1), (0, 1, 1)]:
        with pytest.raises(ValueError):
            Schedule(bad, "x")
    with pytest.raises(TypeError):
        Schedule((0, True), "x")


# --- final ------------------------------------------------------------------------------


@given(schedule_texts(), st.integers(0, 9000))
def test_final_clipping(case, final):
    text, parts = case
    s = Schedule.parse(text, final=final)
    assert list(s) == ref_steps(parts, final)
    assert 0 in s and final in s and s.final == final
    assert Schedule.parse(text).with_final(final) == s
    assert s.text == Schedule.parse(text).text


def test_final_avoids_materialising_huge_ranges():
    s = Schedule.parse("0:1000000000000:1,log2:1000000000", final=10)
    assert list(s) == list(range(11))
    with pytest.raises(ValueError, match="final must be between 0"):
        Schedule.parse("0:10:1", final=-1)


# --- from_steps -------------------------------------------------------------------------


@given(st.lists(st.integers(0, 10_000), max_size=60), st.none() | st.integers(0, 10_000))
def test_from_steps(steps, final):
    s = Schedule.from_steps(steps, final=final)
    expected = sorted({0, *steps})
    if final is not None:
        expected = sorted({x for x in expected if x <= final} | {final})
    assert list(s) == expected
    assert Schedule.parse(s.text) == s  # the canonical text re-parses to the same steps


def test_from_steps_details():
    assert Schedule.from_steps([5, 3, 3, 100, 7, 9, 11, 13]).text == "0,3:15:2,100"
    assert Schedule.from_steps(np.arange(0, 10, 3)).steps == (0, 3, 6, 9)
    top = Schedule.from_steps([MAX_STEP - 4, MAX_STEP - 2, MAX_STEP])
    assert Schedule.parse(top.text) == top
    with pytest.raises(ValueError, match="step must be between 0"):
        Schedule.from_steps([-1])
    with pytest.raises(ValueError, match="step must be between 0"):
        Schedule.from_steps([MAX_STEP + 1])
    with pytest.raises(TypeError):
        Schedule.from_steps([1.5])


# --- JSON -------------------------------------------------------------------------------


@given(schedule_texts(), st.none() | st.integers(0, 9000))
def test_json_round_trip(case, final):
    s = Schedule.parse(case[0], final=final)
    back = Schedule.from_json(s.to_json())
    assert back == s and back.text == s.text and back.steps == s.steps
    assert json.loads(s.to_json()) == {"text": s.text, "steps": list(s.steps)}


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"text": "x"}',
        '{"text": "x", "steps": [0], "extra": 1}',
        '{"text": 3, "steps": [0]}',
        '{"text": "x", "steps": [1, 2]}',
        '{"text": "x", "steps": [0, 2, 1]}',
        '{"text": "x", "steps": [0, true]}',
        '{"text": "x", "steps": [0, 1.5]}',
        '{"text": "x", "steps": [0, -1]}',
    ],
)
def test_from_json_rejects(text):
    with pytest.raises(ValueError):
        Schedule.from_json(text)


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10:5:1", "invalid schedule part '10:5:1': stop must be greater than start"),
        ("5:5:1", "invalid schedule part '5:5:1': stop must be greater than start"),
        ("0:10:0", "invalid schedule part '0:10:0': every must be positive"),
        ("0:10:-2", "invalid schedule part '0:10:-2': every must be positive"),
        ("0:x:1", "invalid schedule part '0:x:1': stop 'x' is not an integer"),
        ("0:10:1, 1.5", "invalid schedule part '1.5': step '1.5' is not an integer"),
        ("-3", "invalid schedule part '-3': step must be non-negative"),
        ("-3:10:1", "invalid schedule part '-3:10:1': start must be non-negative"),
        ("1:2", "invalid schedule part '1:2': expected N, start:stop:every or log2:N"),
        ("1:2:3:4", "invalid schedule part '1:2:3:4': expected N"),
        ("log2:", "invalid schedule part 'log2:': N '' is not an integer"),
        ("log2:-4", "invalid schedule part 'log2:-4': N must be non-negative"),
        ("log2:1:2", "invalid schedule part 'log2:1:2': expected 'log2:N'"),
        ("log2", "invalid schedule part 'log2': expected 'log2:N'"),
        ("0:10:1,,5", "invalid schedule part '': empty part"),
        ("paper,5000", "invalid schedule part 'paper': not a number or a preset (whole text"),
        ("1_000", "invalid schedule part '1_000': step '1_000' is not an integer"),
        ("0:10000001:1", "invalid schedule part '0:10000001:1': schedule would hold more"),
        ("0:99999999999999999999:1", "stop must be at most 9223372036854775808"),
        ("", "empty schedule text"),
        (" \t ", "empty schedule text"),
    ],
)
def test_errors(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Schedule.parse(text)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="not a number or a preset") as info:
        Schedule.parse("dense_early")
    assert "'dense_early'" in str(info.value)
    assert all(name in str(info.value) for name in PRESETS)


def test_size_guard():
    assert MAX_STEPS == 10_000_000
    with pytest.raises(ValueError, match="more than 10,000,000 steps"):
        Schedule.parse(f"0:{2**63}:1")  # would overflow len(range(...))
    with pytest.raises(ValueError, match=re.escape("part '0:5000000:1'")):
        Schedule.parse("0:5000001:1,0:5000000:1")  # counted before de-duplication
    with mock.patch.object(schedule_module, "MAX_STEPS", 100), pytest.raises(ValueError):
        Schedule.from_steps(range(10**12))


def assert_good_error(err, text):
    message = str(err)
    assert "\n" not in message and len(message.splitlines()) == 1
    if not text.strip():
        assert message.startswith("empty schedule text")
        return
    parts = {text.strip()} | {p.strip() for p in text.split(",")}
    assert message.startswith("invalid schedule part ")
    assert any(repr(p) in message for p in parts), message


@given(st.text(max_size=40))
def test_garbage_text_only_raises_value_error(text):
    # A small step cap keeps an accidentally valid, huge schedule cheap.
    with mock.patch.object(schedule_module, "MAX_STEPS", 100_000):
        try:
            Schedule.parse(text)
        except ValueError as err:
            assert_good_error(err, text)


@given(
    st.text(alphabet="0123456789:,- \tlog2pear\n", max_size=40),
    st.none() | st.integers(0, 3000),
)
def test_near_miss_text_only_raises_value_error(text, final):
    with mock.patch.object(schedule_module, "MAX_STEPS", 100_000):
        try:
            s = Schedule.parse(text, final=final)
        except ValueError as err:
            assert_good_error(err, text)
        else:
            assert s.steps[0] == 0 and list(s) == sorted(set(s))
