"""Time phrases in a Recall question, read as a range of media time.

``parse_time_scope(question, now_ms=..., stream_start_ms=...)`` returns a :class:`TimeScope`: the
question with its time phrases taken out (what to search by meaning), inclusive bounds of media
time, an optional event anchor ("before the van arrived") and human-readable notes on how each
phrase was read or why it was ignored. It never raises: a phrase it cannot read is ignored with a
note.

All times are **media time** in integer milliseconds (a frame's timestamp). A clock time is read
as a time of day modulo 24 h: "10:30" is the most recent media time ``t <= now_ms`` with
``t % 86_400_000 == 10 h 30 min``; if that is before the stream's start it cannot be read (noted,
ignored). This is right for both kinds of media clock: for a stream stamped from 0 at its start,
"10:30" is 10 h 30 min into the stream (or into its second day, and so on); for a stream stamped
in Unix milliseconds it is 10:30 UTC. A "day" (for "this morning", "last night", ...) is
``media_ts // 86_400_000``: the latest one, the one that contains ``now_ms``.

Supported phrases (case-insensitive); every range is clipped to ``[stream_start_ms, now_ms]``:

* Clock times: "at 10:05", "around / about / near / approximately / roughly 10:30", a bare
  "10:30" (always hours:minutes), "10:30 am", "10:30 p.m.", "at 2pm", "at 14:05:30". A time to the
  minute (or the hour, "2pm") is a window of +-5 min around it, one to the second +-30 s; "12am" is
  0 h and "12pm" 12 h.
* Clock ranges: "between 10:00 and 11:30", "from 10:00 to 11:30" (also "until", "till", "-"),
  "10:00-10:30", "from 2 to 3pm" (the first time borrows the second's am/pm). The end is the first
  occurrence of the second time after the first, so "between 11pm and 1am" crosses midnight.
* The start of the stream: "in the first hour", "in the first 10 minutes", "during the first 30
  seconds", "first two hours" -> ``[start, start + d]``.
* The end of the stream: "in the last 10 minutes", "in the past hour", "over the last 2 hours" ->
  ``[now - d, now]``.
* Before now: "10 minutes ago", "an hour ago", "half an hour ago" -> a window of
  +-max(d / 4, 30 s) around ``now - d``.
* Parts of the latest day: "this morning" (06:00-12:00), "this afternoon" (12:00-18:00), "this
  evening" (18:00-24:00), "tonight" (18:00 on), "last night" (the previous day's 18:00 to 06:00),
  "earlier today" / "today" (the day's start to now), "yesterday" (the previous day). A part that
  lies wholly after now ("this evening" at 10:00) is noted and ignored.
* Relations on any of the above: "before / until / till / by X" -> up to the start of X;
  "after X" -> from the end of X; "since / from X" -> from the start of X. So "before 10:30" is
  ``to_ms`` = 10:30, "after the first hour" is ``from_ms`` = start + 1 h, "since 10 minutes ago"
  is ``from_ms`` = now - 10 min.
* Event anchors: "before / after / since / until <event>", the event being the rest of the clause
  (up to "?", ",", ";", "!", a full stop or the next time phrase): ``anchor`` is the event text and
  ``anchor_side`` "before" (before, until, till, prior to) or "after" (after, since); the caller
  finds the event by meaning first. Only the first anchor is used. Not anchors: nothing after the
  word ("have you seen this before?"), idioms ("after all", "before long", "since when"), and
  words that point outside the question ("after that", "since then": noted, left in the query).

Numbers in durations: digits ("1.5 hours"), one..twelve, "a"/"an", "a couple of" (2), "a few"
(3), "half an hour", "an hour and a half". Several phrases intersect; a phrase whose range does not
overlap the ones before it is noted and dropped. A malformed or impossible time ("around 25:99",
"at 10:75", "at 13pm") is noted and ignored; a bare malformed "2:1" (no "at", no am/pm) is not
taken for a time at all and stays in the query.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

MINUTE_WINDOW_MS = 5 * MINUTE_MS
"""Half-width of the window around a clock time given to the minute (or hour): "at 10:30"."""
SECOND_WINDOW_MS = 30 * SECOND_MS
"""Half-width of the window around a clock time given to the second: "at 10:30:15"."""
AGO_MIN_WINDOW_MS = 30 * SECOND_MS
"""Smallest half-width of the window around "<d> ago" (otherwise d / 4)."""


@dataclass(frozen=True)
class TimeScope:
    """What a question asks about in time; see the module docstring."""

    query: str
    """The question with the time phrase(s) taken out (what to search by meaning); never empty."""
    from_ms: int | None = None
    """Inclusive lower bound of media time; None = open."""
    to_ms: int | None = None
    """Inclusive upper bound of media time; None = open."""
    anchor: str | None = None
    """The event of "before/after/since/until <event>", to be found first by meaning."""
    anchor_side: Literal["before", "after"] | None = None
    phrases: tuple[str, ...] = ()
    """The phrases that were read, as written."""
    notes: tuple[str, ...] = ()
    """How each phrase was read, or why one was ignored."""


def clock(ms: int) -> str:
    """``"H:MM:SS"`` of a media time (3_723_000 -> ``"1:02:03"``); hours are not taken modulo 24."""
    s = abs(int(ms)) // SECOND_MS
    sign = "-" if ms < 0 and s else ""  # less than a second before 0 reads as 0:00:00
    return f"{sign}{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# --- the phrase table ----------------------------------------------------------------------------

_MERIDIEM = r"\s*[ap]\.?m\b\.?"
# A clock time as written, loosely (malformed ones are matched to be noted): H:MM[:SS][ am] or H am.
_TOK = rf"(?<![\w:.])(?:\d{{1,4}}(?::\d{{1,4}}){{1,2}}(?![\d:])(?:{_MERIDIEM})?|\d{{1,4}}{_MERIDIEM})"
# The first time of a range may also be a bare hour ("from 2 to 3pm").
_TOK_A = rf"(?<![\w:.])\d{{1,4}}(?::\d{{1,4}}){{0,2}}(?![\d:])(?:{_MERIDIEM})?"
_LEAD = r"(?:\b(?:at|around|about|near|approximately|approx\.|approx|roughly|circa)\s+|~\s*)"
_REL = r"before|until|till|by|after|since|from"
_SPAN_LEAD = r"\b(?:in|during|over|within|for|throughout)\s+"

_NUM = (
    r"(?:\d{1,6}(?:\.\d{1,3})?(?![\d.])|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve"
    r"|a\s+few|a\s+couple(?:\s+of)?|few|couple(?:\s+of)?|an?)"
)
_UNIT = r"(?:hours?|hrs?|minutes?|mins?|seconds?|secs?)\b"
_UNIT1 = r"(?:hour|minute|second)\b"
_HALF = r"(?:\s+and\s+a\s+half\b)"
# A duration with a number ("10 minutes", "half an hour"), or also a bare singular unit ("hour").
_DUR_N = rf"(?:\bhalf\s+an?\s+{_UNIT1}|\b{_NUM}\s+(?:and\s+a\s+half\s+)?{_UNIT}{_HALF}?)"
_DUR = rf"(?:{_DUR_N}|\b{_UNIT1}{_HALF}?)"

_I = re.IGNORECASE
_RANGE_BETWEEN_RE = re.compile(rf"\bbetween\s+(?P<a>{_TOK_A})\s+and\s+(?P<b>{_TOK})", _I)
_RANGE_FROM_RE = re.compile(rf"\bfrom\s+(?P<a>{_TOK_A})\s*(?:[-–—]|\b(?:to|until|till|through)\b)\s*(?P<b>{_TOK})", _I)
_RANGE_DASH_RE = re.compile(rf"{_LEAD}*(?P<a>{_TOK_A})\s*[-–—]\s*(?P<b>{_TOK})", _I)
_AGO_RE = re.compile(
    rf"(?:\b(?P<rel>{_REL})\s+|\b(?:about|around|roughly|approximately|some)\s+)?(?P<dur>{_DUR_N})\s+ago\b", _I
)
_FIRST_RE = re.compile(rf"(?:\b(?P<rel>{_REL})\s+|{_SPAN_LEAD})?(?:\bthe\s+)?(?:\bvery\s+)?\bfirst\s+(?P<dur>{_DUR})", _I)
_LAST_RE = re.compile(rf"(?:\b(?P<rel>{_REL})\s+|{_SPAN_LEAD})?(?:\bthe\s+)?\b(?:last|past|previous)\s+(?P<dur>{_DUR})", _I)
_DAY_PART_RE = re.compile(
    rf"(?:\b(?P<rel>{_REL})\s+|\b(?:during|in|over|throughout)\s+)?"
    r"\b(?P<part>this\s+morning|this\s+afternoon|this\s+evening|tonight|last\s+night|earlier\s+today|today|yesterday)\b",
    _I,
)
_CLOCK_RE = re.compile(rf"(?:\b(?P<rel>{_REL})\s+)?(?P<lead>{_LEAD}*)(?P<tok>{_TOK})", _I)

_CLOCK_PARTS_RE = re.compile(r"(?P<h>\d+)(?::(?P<m>\d+)(?::(?P<s>\d+))?)?\s*(?:(?P<ap>[ap])\.?m\.?)?", _I)
_DUR_PARTS_RE = re.compile(
    rf"(?:(?P<half>\bhalf\s+an?\s+)|(?P<num>{_NUM})\s+)?(?P<half1>and\s+a\s+half\s+)?(?P<unit>{_UNIT})(?P<half2>{_HALF})?", _I
)
_ANCHOR_RE = re.compile(r"\b(?P<kw>before|after|since|until|till|prior\s+to)\b(?P<event>(?:[^?,;!.\x00]|\.(?=\S))*)", _I)
_NEXT_ANCHOR_RE = re.compile(r"\s+(?:(?:and|but|or)\s+)?\b(?P<kw>before|after|since|until|till|prior\s+to)\b", _I)

_NUMBER_WORDS = {
    "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "few": 3, "a few": 3,
    "couple": 2, "couple of": 2, "a couple": 2, "a couple of": 2,
}  # fmt: skip
_UNIT_MS = {"h": HOUR_MS, "m": MINUTE_MS, "s": SECOND_MS}  # by the unit's first letter
# (start, end) of each part of the day, offsets from the start of the latest day.
_DAY_PARTS = {
    "this morning": (6 * HOUR_MS, 12 * HOUR_MS),
    "this afternoon": (12 * HOUR_MS, 18 * HOUR_MS),
    "this evening": (18 * HOUR_MS, 24 * HOUR_MS),
    "tonight": (18 * HOUR_MS, 24 * HOUR_MS),
    "last night": (-6 * HOUR_MS, 6 * HOUR_MS),
    "earlier today": (0, 24 * HOUR_MS),
    "today": (0, 24 * HOUR_MS),
    "yesterday": (-24 * HOUR_MS, 0),
}
_ANCHOR_SIDES: dict[str, Literal["before", "after"]] = {
    "before": "before", "until": "before", "till": "before", "prior to": "before", "after": "after", "since": "after",
}  # fmt: skip
# Events that are idioms, not events: "after all", "before long".
_NOT_EVENTS = {"all", "long", "ever", "a while", "a bit", "a moment", "a minute", "a second"}
# First words of events that point outside the question ("after that", "since then", "before it started").
_POINTERS = {"that", "this", "then", "now", "it", "which", "these", "those"}
# First words that make the rest no event: "before and after", "since when".
_NOT_EVENT_STARTS = {"and", "or", "but", "when", "what", "where", "who", "why", "how"}
_JOINER_RE = re.compile(r"[\s,;]*(?:(?:and|or|but)\b[\s,;]*)?", _I)


# --- reading ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Clocks:
    now_ms: int
    start_ms: int

    @property
    def day_ms(self) -> int:
        """Start of the latest day (the one containing now)."""
        return self.now_ms // DAY_MS * DAY_MS

    def latest(self, time_of_day_ms: int) -> int:
        """The most recent media time <= now with this time of day (may be before the stream's start)."""
        return self.now_ms - (self.now_ms - time_of_day_ms) % DAY_MS


@dataclass(frozen=True)
class _Reading:
    start: int  # span of the phrase in the question
    end: int
    lo: int | None = None  # bounds before clipping
    hi: int | None = None
    problem: str | None = None  # why the phrase cannot be read (then lo/hi are unused)


_Reader = Callable[[re.Match[str], _Clocks], _Reading | None]


def _unreadable(token: str) -> str:
    return f"could not read '{token}' as a time of day"


def _has_meridiem(token: str) -> bool:
    return bool(re.search(r"[ap]\.?m\.?$", token.strip(), _I))


def _parse_clock(token: str, borrow: str | None = None) -> tuple[int, int] | None:
    """(time of day in ms, half-width of its window), or None if malformed / impossible.

    A bare hour without am/pm is no time, unless ``borrow`` ("a"/"p") lends it a meridiem.
    """
    m = _CLOCK_PARTS_RE.fullmatch(token.strip())
    if m is None:
        return None
    h_txt, m_txt, s_txt, ap = m["h"], m["m"], m["s"], (m["ap"] or borrow)
    if len(h_txt) > 2 or (m_txt is not None and len(m_txt) != 2) or (s_txt is not None and len(s_txt) != 2):
        return None
    if m_txt is None and ap is None:
        return None
    hours, minutes, seconds = int(h_txt), int(m_txt or 0), int(s_txt or 0)
    if minutes > 59 or seconds > 59:
        return None
    if ap is not None:
        if not 1 <= hours <= 12:
            return None
        hours = hours % 12 + (12 if ap.lower() == "p" else 0)
    elif hours > 23:
        return None
    half = SECOND_WINDOW_MS if s_txt is not None else MINUTE_WINDOW_MS
    return (hours * HOUR_MS + minutes * MINUTE_MS + seconds * SECOND_MS, half)


def _not_yet(phrase: str, c: _Clocks) -> str:
    return f"'{phrase}' has not come yet in this stream (now is {clock(c.now_ms)})"


def _place(time_of_day_ms: int, phrase: str, token: str, c: _Clocks) -> int | str:
    """The media time of a clock time (the most recent <= now), or why it cannot be read."""
    t = c.latest(time_of_day_ms)
    if t >= c.start_ms:
        return t
    if c.day_ms + time_of_day_ms > c.now_ms:
        return _not_yet(phrase, c)
    return f"'{phrase}': the latest {token.strip()}, {clock(t)}, is before the stream's start ({clock(c.start_ms)})"


def _relate(rel: str | None, lo: int, hi: int) -> tuple[int | None, int | None]:
    """Bounds of "<rel> X" for X = [lo, hi]; no relation: X itself."""
    rel = rel.lower() if rel else None
    if rel is None:
        return lo, hi
    if rel == "after":
        return hi, None
    if rel in ("since", "from"):
        return lo, None
    return None, lo  # before, until, till, by


def _duration_ms(text: str) -> int:
    m = _DUR_PARTS_RE.fullmatch(text.strip())
    if m is None:  # cannot happen for text matched by _DUR; read it as one unit rather than fail
        return HOUR_MS
    if m["half"]:
        value = 0.5
    elif m["num"]:
        num = " ".join(m["num"].lower().split())
        value = float(_NUMBER_WORDS.get(num) or num)
    else:
        value = 1.0
    if m["half1"] or m["half2"]:
        value += 0.5
    return round(value * _UNIT_MS[m["unit"][0].lower()])


def _read_range(m: re.Match[str], c: _Clocks) -> _Reading | None:
    a, b = m["a"], m["b"]
    b_meridiem = re.search(r"([ap])\.?m\.?$", b.strip(), _I)
    if ":" not in a and not _has_meridiem(a) and b_meridiem is None:
        return None  # "between 2 and 3:30": not a range of clock times
    first = _parse_clock(a, borrow=b_meridiem[1] if b_meridiem else None)
    second = _parse_clock(b)
    if first is None or second is None:
        return _Reading(m.start(), m.end(), problem=_unreadable(a if first is None else b))
    lo = c.latest(first[0])
    hi = lo + (second[0] - first[0]) % DAY_MS
    if hi < c.start_ms and c.day_ms + first[0] > c.now_ms:
        return _Reading(m.start(), m.end(), problem=_not_yet(m[0], c))
    return _Reading(m.start(), m.end(), lo, hi)


def _read_clock(m: re.Match[str], c: _Clocks) -> _Reading | None:
    token = m["tok"]
    parsed = _parse_clock(token)
    if parsed is None:
        bare = not m["rel"] and not m["lead"] and not _has_meridiem(token)
        return None if bare else _Reading(m.start(), m.end(), problem=_unreadable(token.strip()))
    time_of_day, half = parsed
    t = _place(time_of_day, m[0], token, c)
    if isinstance(t, str):
        return _Reading(m.start(), m.end(), problem=t)
    lo, hi = _relate(m["rel"], t, t) if m["rel"] else (t - half, t + half)
    return _Reading(m.start(), m.end(), lo, hi)


def _read_first(m: re.Match[str], c: _Clocks) -> _Reading:
    lo, hi = _relate(m["rel"], c.start_ms, c.start_ms + _duration_ms(m["dur"]))
    return _Reading(m.start(), m.end(), lo, hi)


def _read_last(m: re.Match[str], c: _Clocks) -> _Reading:
    lo, hi = _relate(m["rel"], c.now_ms - _duration_ms(m["dur"]), c.now_ms)
    return _Reading(m.start(), m.end(), lo, hi)


def _read_ago(m: re.Match[str], c: _Clocks) -> _Reading:
    d = _duration_ms(m["dur"])
    t = c.now_ms - d
    if m["rel"]:
        lo, hi = _relate(m["rel"], t, t)
    else:
        half = max(d // 4, AGO_MIN_WINDOW_MS)
        lo, hi = t - half, t + half
    return _Reading(m.start(), m.end(), lo, hi)


def _read_day_part(m: re.Match[str], c: _Clocks) -> _Reading:
    begin, end = _DAY_PARTS[" ".join(m["part"].lower().split())]
    lo, hi = _relate(m["rel"], c.day_ms + begin, c.day_ms + end)
    return _Reading(m.start(), m.end(), lo, hi)


# Families in the order they claim text: a later one never reads inside an earlier one's phrase.
_FAMILIES: tuple[tuple[re.Pattern[str], _Reader], ...] = (
    (_RANGE_BETWEEN_RE, _read_range),
    (_RANGE_FROM_RE, _read_range),
    (_RANGE_DASH_RE, _read_range),
    (_AGO_RE, _read_ago),
    (_FIRST_RE, _read_first),
    (_LAST_RE, _read_last),
    (_DAY_PART_RE, _read_day_part),
    (_CLOCK_RE, _read_clock),
)


def _find_readings(question: str, c: _Clocks) -> list[_Reading]:
    readings: list[_Reading] = []
    for pattern, read in _FAMILIES:
        for m in pattern.finditer(question):
            if any(m.start() < r.end and r.start < m.end() for r in readings):
                continue
            reading = read(m, c)
            if reading is not None:
                readings.append(reading)
    return sorted(readings, key=lambda r: r.start)


def _span_text(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"{clock(lo)}–{clock(hi)}"
    if lo is not None:
        return f"from {clock(lo)} on"
    return f"up to {clock(hi)}" if hi is not None else "the whole stream"


def _outside(lo: int | None, hi: int | None, c: _Clocks) -> str | None:
    """Why [lo, hi] has nothing of the stream so far, or None if it has."""
    if lo is not None and lo > c.now_ms:
        return f"lies after now ({clock(c.now_ms)})"
    if hi is not None and hi < c.start_ms:
        return f"lies before the stream's start ({clock(c.start_ms)})"
    if max(c.start_ms, lo if lo is not None else c.start_ms) > min(c.now_ms, hi if hi is not None else c.now_ms):
        return f"lies outside the stream so far ({clock(c.start_ms)}–{clock(c.now_ms)})"
    return None


@dataclass(frozen=True)
class _Anchor:
    start: int  # span of "before <event>" in the question
    end: int
    event: str
    side: Literal["before", "after"]
    cut: int  # end of the text to take out of the query: up to the next anchor's word ("and" included)


def _find_anchor(masked: str, question: str) -> tuple[_Anchor | None, list[tuple[int, str]]]:
    """The first event anchor in the question, and (position, note) on the anchors not used.

    ``masked`` is the question with the time phrases already read blanked out (NUL characters), so
    an event ends where a time phrase begins and "before 10:30" is never an anchor.
    """
    found: _Anchor | None = None
    notes: list[tuple[int, str]] = []
    pos = 0
    while (m := _ANCHOR_RE.search(masked, pos)) is not None:
        event_end = cut = m.end("event")
        if (nxt := _NEXT_ANCHOR_RE.search(masked, m.start("event"), event_end)) is not None:
            event_end, cut = nxt.start(), nxt.start("kw")  # "after X and before Y": X ends at "and"
        pos = max(event_end, m.end("kw"))
        raw = question[m.start("event") : event_end]
        event = re.sub(r"\s+(?:and|or|but)$", "", raw.strip(), flags=_I)
        end = m.start("event") + len(raw) - len(raw.lstrip()) + len(event)
        phrase = question[m.start() : end]
        words = event.lower().split()
        if not words or event.lower() in _NOT_EVENTS or words[0] in _NOT_EVENT_STARTS:
            continue  # "seen it before?", "after all", "before and after", "since when"
        if words[0] in _POINTERS and len(words) <= 2:
            notes.append((m.start(), f"did not read '{phrase}' as an event: it points outside the question; left it in the query"))
        elif event[0].isdigit():
            notes.append((m.start(), f"could not read '{phrase}' as a time or an event; left it in the query"))
        elif found is not None:
            notes.append((m.start(), f"only the first event is used; left '{phrase}' in the query"))
        else:
            found = _Anchor(m.start(), end, event, _ANCHOR_SIDES[" ".join(m["kw"].lower().split())], max(end, cut))
    return found, notes


def _strip_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """The text without the spans, tidied: no doubled spaces or commas, no dangling "and"."""
    pieces: list[str] = []
    pos = 0
    for a, b in sorted(spans):
        pieces.append(text[pos:a])
        pos = max(pos, b)
    pieces.append(text[pos:])
    # A joiner left between two removed phrases ("after 10:00 and before 10:30") goes with them.
    inner = [" " if _JOINER_RE.fullmatch(p) else p for p in pieces[1:-1]]
    out = " ".join([pieces[0], *inner, pieces[-1]])
    out = re.sub(r"\s+", " ", out).strip()
    out = re.sub(r"\s+([?,;.!])", r"\1", out)
    out = re.sub(r"([,;])(?:\s*[,;])+", r"\1", out)
    out = re.sub(r"[,;]\s*(?=[?.!]|$)", "", out)
    out = re.sub(r"^[\s,;]+", "", out)
    out = re.sub(r"\s*\b(?:and|or|but)\s*(?=[?.!]*$)", "", out, flags=_I)
    out = re.sub(r"^(?:and|or|but)\b[\s,;]*", "", out, flags=_I)
    return out.strip()


def parse_time_scope(question: str, *, now_ms: int, stream_start_ms: int = 0) -> TimeScope:
    """Read the time phrases of ``question`` as bounds of media time; see the module docstring."""
    c = _Clocks(now_ms=now_ms, start_ms=stream_start_ms)
    lo_all: int | None = None
    hi_all: int | None = None
    phrases: list[tuple[int, str]] = []  # (position, phrase)
    notes: list[tuple[int, str, bool]] = []  # (position, text, ignored: gets the "what was searched" tail)
    removed: list[tuple[int, int]] = []

    readings = _find_readings(question, c)
    for r in readings:
        phrase = question[r.start : r.end]
        removed.append((r.start, r.end))
        if r.problem is not None:
            notes.append((r.start, r.problem, True))
            continue
        lo = None if r.lo is None else max(r.lo, c.start_ms)
        hi = None if r.hi is None else min(r.hi, c.now_ms)
        why = _outside(r.lo, r.hi, c)
        if why is not None:
            notes.append((r.start, f"'{phrase}' ({_span_text(r.lo, r.hi)}) {why}", True))
            continue
        new_lo = lo if lo_all is None else (lo_all if lo is None else max(lo_all, lo))
        new_hi = hi if hi_all is None else (hi_all if hi is None else min(hi_all, hi))
        if new_lo is not None and new_hi is not None and new_lo > new_hi:
            text = f"'{phrase}' ({_span_text(lo, hi)}) does not overlap the earlier time phrases ({_span_text(lo_all, hi_all)})"
            notes.append((r.start, text, True))
            continue
        lo_all, hi_all = new_lo, new_hi
        phrases.append((r.start, phrase))
        notes.append((r.start, f"read '{phrase}' as {_span_text(lo, hi)} (media time)", False))

    masked = list(question)
    for a, b in removed:
        masked[a:b] = "\x00" * (b - a)
    found, anchor_notes = _find_anchor("".join(masked), question)
    notes.extend((at, text, False) for at, text in anchor_notes)
    if found is not None:
        phrase = question[found.start : found.end]
        removed.append((found.start, found.cut))
        phrases.append((found.start, phrase))
        notes.append((found.start, f"read '{phrase}' as {found.side} the event '{found.event}' (to be found first by meaning)", False))

    tail = "searched the whole stream" if lo_all is None and hi_all is None else "ignored it"
    ordered = [f"{text}; {tail}" if ignored else text for _, text, ignored in sorted(notes, key=lambda n: n[0])]
    query = _strip_spans(question, removed) if removed else question
    if not re.search(r"\w", query):
        query = question
    return TimeScope(
        query=query,
        from_ms=lo_all,
        to_ms=hi_all,
        anchor=found.event if found else None,
        anchor_side=found.side if found else None,
        phrases=tuple(p for _, p in sorted(phrases)),
        notes=tuple(ordered),
    )
