"""Time phrases in a Recall question read as bounds of media time (streamharness.memory.timephrases)."""

from __future__ import annotations

import random

import pytest

from streamharness.memory.timephrases import TimeScope, clock, parse_time_scope

S = 1_000
M = 60 * S
H = 60 * M
D = 24 * H
NOON = 12 * H


def bounds(question: str, now_ms: int = NOON, start_ms: int = 0) -> tuple[int | None, int | None]:
    scope = parse_time_scope(question, now_ms=now_ms, stream_start_ms=start_ms)
    return scope.from_ms, scope.to_ms


# --- clock() --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ms", "text"),
    [(0, "0:00:00"), (3_723_000, "1:02:03"), (3_723_999, "1:02:03"), (34 * H + 30 * M, "34:30:00"), (-1_000, "-0:00:01")],
)
def test_clock(ms: int, text: str) -> None:
    assert clock(ms) == text


# --- no phrase ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "question",
    ["what colour is the car?", "Who is on stage", "have you seen this before?", "was it, after all, a dog?", "the score was 2:1"],
)
def test_no_time_phrase_gives_the_question_back_with_open_bounds(question: str) -> None:
    assert parse_time_scope(question, now_ms=NOON) == TimeScope(query=question)


# --- clock times ----------------------------------------------------------------------------------


def test_at_a_clock_time_is_five_minutes_either_side() -> None:
    scope = parse_time_scope("what happened at 10:05?", now_ms=NOON)
    assert scope == TimeScope(
        query="what happened?",
        from_ms=10 * H,
        to_ms=10 * H + 10 * M,
        phrases=("at 10:05",),
        notes=("read 'at 10:05' as 10:00:00–10:10:00 (media time)",),
    )


@pytest.mark.parametrize("lead", ["around", "about", "near", "approximately", "Around", "at around", "roughly"])
def test_around_reads_like_at(lead: str) -> None:
    scope = parse_time_scope(f"who spoke {lead} 10:30?", now_ms=NOON)
    assert (scope.from_ms, scope.to_ms) == (10 * H + 25 * M, 10 * H + 35 * M)
    assert scope.query == "who spoke?"
    assert scope.phrases == (f"{lead} 10:30",)
    assert scope.notes == (f"read '{lead} 10:30' as 10:25:00–10:35:00 (media time)",)


def test_a_bare_time_is_hours_and_minutes() -> None:
    assert bounds("what was on screen 2:15") == (2 * H + 10 * M, 2 * H + 20 * M)


def test_a_time_to_the_second_is_thirty_seconds_either_side() -> None:
    scope = parse_time_scope("what was said at 14:05:30", now_ms=15 * H)
    assert (scope.from_ms, scope.to_ms) == (14 * H + 5 * M, 14 * H + 6 * M)
    assert scope.query == "what was said"


@pytest.mark.parametrize(
    ("phrase", "centre"),
    [
        ("10:30 am", 10 * H + 30 * M),
        ("10:30am", 10 * H + 30 * M),
        ("10:30 pm", 22 * H + 30 * M),
        ("10:30 p.m.", 22 * H + 30 * M),
        ("at 2pm", 14 * H),
        ("at 2 PM", 14 * H),
        ("at 12pm", 12 * H),
        ("at 12:30 a.m.", 30 * M),
        ("at 11am", 11 * H),
    ],
)
def test_am_and_pm(phrase: str, centre: int) -> None:
    assert bounds(f"what happened {phrase}?", now_ms=23 * H + 59 * M) == (centre - 5 * M, centre + 5 * M)


def test_twelve_am_is_midnight_clipped_to_the_stream_start() -> None:
    # 0:00 - 5 min is before the stream's start at 0: clipped.
    assert bounds("at 12am", now_ms=NOON) == (0, 5 * M)


def test_a_window_is_clipped_to_now() -> None:
    assert bounds("at 11:58", now_ms=NOON) == (11 * H + 53 * M, NOON)


def test_before_and_after_a_clock_time_are_bounds_not_anchors() -> None:
    before = parse_time_scope("what colour was the car before 10:30?", now_ms=NOON)
    assert (before.from_ms, before.to_ms, before.anchor, before.anchor_side) == (None, 10 * H + 30 * M, None, None)
    assert before.query == "what colour was the car?"
    assert before.notes == ("read 'before 10:30' as up to 10:30:00 (media time)",)
    after = parse_time_scope("what colour was the car after 10:30?", now_ms=NOON)
    assert (after.from_ms, after.to_ms, after.anchor) == (10 * H + 30 * M, None, None)
    assert after.notes == ("read 'after 10:30' as from 10:30:00 on (media time)",)
    assert bounds("who came in since 9:15", now_ms=NOON) == (9 * H + 15 * M, None)
    assert bounds("who came in until 9:15", now_ms=NOON) == (None, 9 * H + 15 * M)


# --- day wrap and stream start ---------------------------------------------------------------------


def test_a_clock_time_on_the_second_day() -> None:
    # now = day 1, 12:00: "10:30" is day 1's 10:30.
    assert bounds("at 10:30", now_ms=D + NOON) == (D + 10 * H + 25 * M, D + 10 * H + 35 * M)


def test_a_clock_time_not_yet_come_today_is_the_previous_days() -> None:
    # now = 26 h (day 1, 02:00): day 1's 10:30 is still ahead, so it is day 0's.
    assert bounds("at 10:30", now_ms=26 * H) == (10 * H + 25 * M, 10 * H + 35 * M)


def test_a_clock_time_later_than_now_on_the_first_day_is_ignored() -> None:
    scope = parse_time_scope("who was there at 10:30?", now_ms=9 * H)
    assert scope == TimeScope(
        query="who was there?",
        notes=("'at 10:30' has not come yet in this stream (now is 9:00:00); searched the whole stream",),
    )


def test_a_clock_time_whose_previous_day_is_before_the_stream_start_is_ignored() -> None:
    # now = day 1, 09:00, the stream began at day 0, 12:00: day 1's 10:30 is ahead, day 0's before the start.
    scope = parse_time_scope("at 10:30", now_ms=D + 9 * H, stream_start_ms=NOON)
    assert (scope.from_ms, scope.to_ms, scope.phrases) == (None, None, ())
    assert scope.notes == ("'at 10:30' has not come yet in this stream (now is 33:00:00); searched the whole stream",)


def test_a_clock_time_before_the_stream_start_is_ignored() -> None:
    scope = parse_time_scope("at 10:30", now_ms=11 * H, stream_start_ms=10 * H + 45 * M)
    assert (scope.from_ms, scope.to_ms) == (None, None)
    assert scope.notes == (
        "'at 10:30': the latest 10:30, 10:30:00, is before the stream's start (10:45:00); searched the whole stream",
    )


def test_a_window_is_clipped_to_the_stream_start() -> None:
    assert bounds("around 10:30", now_ms=11 * H, start_ms=10 * H + 28 * M) == (10 * H + 28 * M, 10 * H + 35 * M)


def test_a_stream_stamped_in_unix_milliseconds_reads_utc_time_of_day() -> None:
    start = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
    now = start + 3 * H  # 2023-11-15 01:13:20 UTC
    midnight = 1_700_006_400_000  # 2023-11-15 00:00:00 UTC
    assert bounds("at 00:30", now_ms=now, start_ms=start) == (midnight + 25 * M, midnight + 35 * M)
    assert bounds("at 11pm", now_ms=now, start_ms=start) == (midnight - H - 5 * M, midnight - H + 5 * M)


# --- clock ranges ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "question", ["what happened between 10:00 and 11:30?", "what happened from 10:00 to 11:30?", "what happened 10:00-11:30?"]
)
def test_a_clock_range(question: str) -> None:
    scope = parse_time_scope(question, now_ms=NOON)
    assert (scope.from_ms, scope.to_ms) == (10 * H, 11 * H + 30 * M)
    assert scope.query == "what happened?"
    assert len(scope.phrases) == 1
    assert scope.notes == (f"read '{scope.phrases[0]}' as 10:00:00–11:30:00 (media time)",)


def test_a_clock_range_is_clipped_to_now() -> None:
    assert bounds("between 10:00 and 11:30", now_ms=11 * H) == (10 * H, 11 * H)


def test_a_clock_range_across_midnight() -> None:
    assert bounds("between 11pm and 1am", now_ms=26 * H) == (23 * H, 25 * H)


def test_the_first_time_of_a_range_borrows_the_seconds_meridiem() -> None:
    assert bounds("from 2 to 3pm", now_ms=16 * H) == (14 * H, 15 * H)


def test_a_range_with_a_bad_time_is_ignored() -> None:
    scope = parse_time_scope("between 10:00 and 11:70", now_ms=NOON)
    assert (scope.from_ms, scope.to_ms) == (None, None)
    assert scope.notes == ("could not read '11:70' as a time of day; searched the whole stream",)


# --- the first / the last -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phrase", "duration"),
    [
        ("in the first hour", H),
        ("in the first 10 minutes", 10 * M),
        ("during the first 30 seconds", 30 * S),
        ("first two hours", 2 * H),
        ("in the first an hour", H),
        ("within the first 1.5 hours", 90 * M),
        ("in the first half an hour", 30 * M),
        ("in the FIRST Twelve Minutes", 12 * M),
    ],
)
def test_the_first_part_of_the_stream(phrase: str, duration: int) -> None:
    start = 2 * H
    scope = parse_time_scope(f"who spoke {phrase}?", now_ms=10 * H, stream_start_ms=start)
    assert (scope.from_ms, scope.to_ms) == (start, start + duration)
    assert scope.query == "who spoke?"
    assert scope.phrases == (phrase,)


def test_the_first_part_is_clipped_to_now() -> None:
    scope = parse_time_scope("in the first hour", now_ms=20 * M)
    assert (scope.from_ms, scope.to_ms) == (0, 20 * M)
    assert scope.notes == ("read 'in the first hour' as 0:00:00–0:20:00 (media time)",)


def test_after_the_first_hour() -> None:
    assert bounds("what happened after the first hour?", now_ms=5 * H) == (H, None)


@pytest.mark.parametrize(
    ("phrase", "duration"),
    [("in the last 10 minutes", 10 * M), ("in the past hour", H), ("over the last 2 hours", 2 * H), ("for the past few minutes", 3 * M)],
)
def test_the_last_part_of_the_stream(phrase: str, duration: int) -> None:
    now = 5 * H
    scope = parse_time_scope(f"did anyone enter {phrase}?", now_ms=now)
    assert (scope.from_ms, scope.to_ms) == (now - duration, now)
    assert scope.query == "did anyone enter?"
    assert scope.phrases == (phrase,)


def test_the_last_part_is_clipped_to_the_stream_start() -> None:
    assert bounds("over the last 2 hours", now_ms=3 * H, start_ms=2 * H) == (2 * H, 3 * H)


# --- ago ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phrase", "back", "half"),
    [
        ("10 minutes ago", 10 * M, 150 * S),
        ("an hour ago", H, 15 * M),
        ("half an hour ago", 30 * M, 450 * S),
        ("a minute ago", M, 30 * S),  # d/4 = 15 s < 30 s
        ("an hour and a half ago", 90 * M, 1350 * S),
        ("two hours ago", 2 * H, 30 * M),
    ],
)
def test_ago_is_a_window_around_now_minus_d(phrase: str, back: int, half: int) -> None:
    now = 5 * H
    scope = parse_time_scope(f"what did he say {phrase}?", now_ms=now)
    assert (scope.from_ms, scope.to_ms) == (now - back - half, now - back + half)
    assert scope.query == "what did he say?"


def test_ago_exact_note() -> None:
    scope = parse_time_scope("10 minutes ago", now_ms=2 * H)
    assert scope.notes == ("read '10 minutes ago' as 1:47:30–1:52:30 (media time)",)
    assert scope.query == "10 minutes ago"  # nothing else left: the question itself


def test_since_ago_is_a_lower_bound() -> None:
    assert bounds("who spoke since 10 minutes ago", now_ms=2 * H) == (110 * M, None)


def test_ago_before_the_stream_start_is_ignored() -> None:
    scope = parse_time_scope("what happened 2 hours ago?", now_ms=H)
    assert (scope.from_ms, scope.to_ms) == (None, None)
    assert scope.notes == (
        "'2 hours ago' (-1:30:00–-0:30:00) lies before the stream's start (0:00:00); searched the whole stream",
    )


# --- parts of the day -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phrase", "now", "expected"),
    [
        ("this morning", D + 15 * H, (D + 6 * H, D + 12 * H)),
        ("this morning", D + 9 * H, (D + 6 * H, D + 9 * H)),
        ("this afternoon", D + 15 * H, (D + 12 * H, D + 15 * H)),
        ("this evening", D + 20 * H, (D + 18 * H, D + 20 * H)),
        ("tonight", D + 20 * H, (D + 18 * H, D + 20 * H)),
        ("last night", D + 10 * H, (18 * H, D + 6 * H)),
        ("earlier today", D + 10 * H, (D, D + 10 * H)),
        ("yesterday", D + 10 * H, (0, D)),
    ],
)
def test_parts_of_the_latest_day(phrase: str, now: int, expected: tuple[int, int]) -> None:
    scope = parse_time_scope(f"who was there {phrase}?", now_ms=now)
    assert (scope.from_ms, scope.to_ms) == expected
    assert scope.query == "who was there?"
    assert scope.phrases == (phrase,)


def test_last_night_is_clipped_to_the_stream_start() -> None:
    assert bounds("last night", now_ms=D + 10 * H, start_ms=20 * H) == (20 * H, D + 6 * H)


def test_a_part_of_the_day_after_now_is_ignored() -> None:
    scope = parse_time_scope("who came this evening?", now_ms=10 * H)
    assert scope == TimeScope(
        query="who came?",
        notes=("'this evening' (18:00:00–24:00:00) lies after now (10:00:00); searched the whole stream",),
    )


def test_a_part_of_the_day_before_the_stream_start_is_ignored() -> None:
    scope = parse_time_scope("this morning", now_ms=15 * H, stream_start_ms=13 * H)
    assert (scope.from_ms, scope.to_ms) == (None, None)
    assert scope.notes == (
        "'this morning' (6:00:00–12:00:00) lies before the stream's start (13:00:00); searched the whole stream",
    )


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("since this morning", (6 * H, None)),  # since X: from X's start
        ("after this morning", (12 * H, None)),  # after X: from X's end
        ("until this afternoon", (None, 12 * H)),  # before / until X: up to X's start
        ("before the last 10 minutes", (None, 15 * H - 10 * M)),
        ("after last night", (6 * H, None)),
    ],
)
def test_relations_on_spans(question: str, expected: tuple[int | None, int | None]) -> None:
    assert bounds(question, now_ms=15 * H) == expected


def test_before_a_number_that_is_no_time_is_no_anchor() -> None:
    scope = parse_time_scope("what happened before 9?", now_ms=NOON)
    assert (scope.anchor, scope.from_ms, scope.to_ms, scope.query) == (None, None, None, "what happened before 9?")
    assert scope.notes == ("could not read 'before 9' as a time or an event; left it in the query",)


# --- event anchors --------------------------------------------------------------------------------


def test_before_an_event() -> None:
    scope = parse_time_scope("what colour was the car before the van arrived?", now_ms=NOON)
    assert scope == TimeScope(
        query="what colour was the car?",
        anchor="the van arrived",
        anchor_side="before",
        phrases=("before the van arrived",),
        notes=("read 'before the van arrived' as before the event 'the van arrived' (to be found first by meaning)",),
    )


@pytest.mark.parametrize(
    ("question", "event", "side", "query"),
    [
        ("who was on stage after the lights went out?", "the lights went out", "after", "who was on stage?"),
        ("Since the lights went out, who entered?", "the lights went out", "after", "who entered?"),
        ("what was playing until the speaker left; who clapped?", "the speaker left", "before", "what was playing; who clapped?"),
        ("what was said prior to the break", "the break", "before", "what was said"),
        ("what happened after this man left", "this man left", "after", "what happened"),
    ],
)
def test_anchor_sides_and_query(question: str, event: str, side: str, query: str) -> None:
    scope = parse_time_scope(question, now_ms=NOON)
    assert (scope.anchor, scope.anchor_side, scope.query) == (event, side, query)
    assert (scope.from_ms, scope.to_ms) == (None, None)


def test_an_anchor_ends_where_a_time_phrase_begins() -> None:
    scope = parse_time_scope("what happened after the van arrived in the last hour?", now_ms=5 * H)
    assert (scope.anchor, scope.anchor_side) == ("the van arrived", "after")
    assert (scope.from_ms, scope.to_ms) == (4 * H, 5 * H)
    assert scope.query == "what happened?"
    assert scope.phrases == ("after the van arrived", "in the last hour")


def test_only_the_first_anchor_is_used() -> None:
    scope = parse_time_scope("what happened after the van arrived and before the car left?", now_ms=NOON)
    assert (scope.anchor, scope.anchor_side) == ("the van arrived", "after")
    assert scope.query == "what happened before the car left?"
    assert scope.notes == (
        "read 'after the van arrived' as after the event 'the van arrived' (to be found first by meaning)",
        "only the first event is used; left 'before the car left' in the query",
    )


@pytest.mark.parametrize("question", ["what happened after that?", "what was said before then?", "who came since then"])
def test_an_anchor_pointing_outside_the_question_is_not_used(question: str) -> None:
    scope = parse_time_scope(question, now_ms=NOON)
    assert (scope.anchor, scope.anchor_side, scope.query, scope.phrases) == (None, None, question, ())
    assert len(scope.notes) == 1
    assert "points outside the question" in scope.notes[0]


@pytest.mark.parametrize("question", ["have you seen this before?", "seen him before, or not", "before long, what?", "since when is the door open?"])
def test_non_temporal_before_is_no_anchor(question: str) -> None:
    assert parse_time_scope(question, now_ms=NOON) == TimeScope(query=question)


# --- malformed times ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "token", "query"),
    [
        ("what happened around 25:99?", "25:99", "what happened?"),
        ("who was there at 10:75", "10:75", "who was there"),
        ("at 13pm who spoke?", "13pm", "who spoke?"),
        ("at 0am who spoke?", "0am", "who spoke?"),
        ("what happened at 10:5?", "10:5", "what happened?"),
        ("what happened at 24:00?", "24:00", "what happened?"),
        ("what happened at 10:30:61?", "10:30:61", "what happened?"),
    ],
)
def test_malformed_times_are_noted_and_ignored(question: str, token: str, query: str) -> None:
    scope = parse_time_scope(question, now_ms=NOON)
    assert scope == TimeScope(
        query=query, notes=(f"could not read '{token}' as a time of day; searched the whole stream",)
    )


def test_a_malformed_time_beside_a_good_one() -> None:
    scope = parse_time_scope("at 10:75 in the last hour", now_ms=5 * H)
    assert (scope.from_ms, scope.to_ms) == (4 * H, 5 * H)
    assert scope.notes == (
        "could not read '10:75' as a time of day; ignored it",
        "read 'in the last hour' as 4:00:00–5:00:00 (media time)",
    )


# --- several phrases ------------------------------------------------------------------------------


def test_several_phrases_intersect() -> None:
    scope = parse_time_scope("who spoke this afternoon in the last 2 hours?", now_ms=13 * H)
    assert (scope.from_ms, scope.to_ms) == (12 * H, 13 * H)
    assert scope.phrases == ("this afternoon", "in the last 2 hours")
    assert scope.query == "who spoke?"


def test_after_and_before_make_a_range() -> None:
    scope = parse_time_scope("what happened after 10:00 and before 10:30 near the door?", now_ms=NOON)
    assert (scope.from_ms, scope.to_ms) == (10 * H, 10 * H + 30 * M)
    assert scope.query == "what happened near the door?"


def test_a_later_phrase_that_does_not_overlap_is_dropped() -> None:
    scope = parse_time_scope("who was there at 10:30, in the last 10 minutes?", now_ms=NOON)
    assert (scope.from_ms, scope.to_ms) == (10 * H + 25 * M, 10 * H + 35 * M)
    assert scope.phrases == ("at 10:30",)
    assert scope.query == "who was there?"
    assert scope.notes == (
        "read 'at 10:30' as 10:25:00–10:35:00 (media time)",
        "'in the last 10 minutes' (11:50:00–12:00:00) does not overlap the earlier time phrases (10:25:00–10:35:00); ignored it",
    )


# --- never raises ---------------------------------------------------------------------------------

ODD = [
    "",
    " ",
    "?",
    "::::",
    "at",
    "before",
    "after after after",
    "at 99999999999:99999999",
    "in the last 999999 hours",
    "in the first 0 minutes",
    "0 seconds ago",
    "between and",
    "between 10:00 and",
    "from 10:00 to",
    "10:00-",
    "-10:00",
    "~~~~~~~~~~10:30",
    "at 1:2:3:4:5",
    "at 10:30 pm pm am",
    "a.m. p.m.",
    "12 pm 12 am 0 pm",
    "last night this morning tonight this evening yesterday today",
    "before 10:30 after 11:00 since 9 until",
    "\x00before\x00the\x00van",
    "before, after; since? until!",
    "🚗 before 🚐 arrived",
    "ÄT 10:30 ÜBER",
    "at ١٠:٣٠",
    "half half half an hour ago ago",
    "an hour and a half and a half ago",
    "1.5.5 hours ago",
    "in the last 1.999 minutes",
    "what happened " * 200 + "at 10:30",
]
TOKENS = [
    "at", "around", "before", "after", "since", "until", "between", "and", "from", "to", "in", "the", "first",
    "last", "past", "hour", "hours", "minutes", "an", "half", "a", "ago", "10:30", "25:99", "2pm", "13pm", "12am",
    "14:05:30", "this", "morning", "evening", "tonight", "night", "today", "earlier", "two", "1.5", ",", "?", ";",
    "van", "arrived", "-", "that", "p.m.", "0:00", "23:59", "few",
]  # fmt: skip


def _check(question: str, now_ms: int, start_ms: int) -> None:
    scope = parse_time_scope(question, now_ms=now_ms, stream_start_ms=start_ms)
    assert isinstance(scope, TimeScope)
    assert scope.query == question or (scope.query and scope.query.strip())
    if start_ms <= now_ms:
        if scope.from_ms is not None:
            assert start_ms <= scope.from_ms <= now_ms
        if scope.to_ms is not None:
            assert start_ms <= scope.to_ms <= now_ms
        if scope.from_ms is not None and scope.to_ms is not None:
            assert scope.from_ms <= scope.to_ms
    for phrase in scope.phrases:
        assert phrase in question


@pytest.mark.parametrize("question", ODD)
def test_odd_strings_never_raise(question: str) -> None:
    for now_ms, start_ms in [(NOON, 0), (0, 0), (26 * H, 2 * H), (5 * H, 10 * H), (-5 * H, 0), (1_700_000_000_000, 1_699_990_000_000)]:
        _check(question, now_ms, start_ms)


def test_random_junk_never_raises() -> None:
    rng = random.Random(20240611)
    for _ in range(3000):
        words = rng.choices(TOKENS, k=rng.randint(1, 12))
        question = " ".join(words)
        now_ms = rng.randint(0, 3 * D)
        _check(question, now_ms, rng.randint(0, now_ms))
    alphabet = "0123456789:apm. ,?;-~abefhinorstu"
    for _ in range(2000):
        question = "".join(rng.choices(alphabet, k=rng.randint(0, 40)))
        _check(question, rng.randint(0, 2 * D), 0)
