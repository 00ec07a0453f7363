"""Minirhizotron file names -> experiment, tube, window, session, capture time, operator.

Camera software writes the metadata of a frame into its file name. The de-facto standard is the
Bartz/ICAP name that Rootfly, RootSnap and most archives follow::

    <EXPERIMENT>_T<tube>_L<window>_<date>_<hhmmss>_<session>_<operator>[_<suffix>]

Real archives bend it in a few ways, all handled by one regular expression (:data:`ICAP_PATTERN`):

* numbers padded or not (``T001``/``T1``, ``L004``/``L4``, session ``004``/``4``);
* experiment names with dots, digits and underscores (``DOE.S300``, ``2016LATERALPEANUT``);
* dates as ``YYYY.MM.DD`` (ICAP), ``DD.MM.YY`` / ``YY.MM.DD`` (2-digit year, the order comes
  from configuration), ``YYYY-MM-DD`` or ``YYYYMMDD`` (CI-600/CID exports and renamed files);
* a trailing suffix after the operator (``_FRMI_01`` tile index of the PRMI switchgrass tiles,
  ``_crop``): recorded as ``tile`` (operator + suffix, e.g. ``FRMI_01``) so tiles of one frame
  keep distinct ids but share tube/window/session.

Two-digit years are the one real ambiguity: ``20.03.17`` is 20 March 2017 read day-first and
17 March 2020 read year-first. We never guess: with no configured ``date_order`` a date that is
valid both ways is an error that says so; a date valid only one way (``25.13.17``) is not
ambiguous and is read the only way it can be.

A user whose archive follows another convention passes their own regular expression with named
groups (``experiment``, ``tube``, ``window``, ``session``, ``date``, ``time``, ``operator``,
``tile``; or ``year``/``month``/``day``/``hour``/``minute``/``second`` instead of
``date``/``time``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import re
from typing import Any, Literal

DateOrder = Literal["DMY", "YMD", "MDY"]
DATE_ORDERS: tuple[str, ...] = ("DMY", "YMD", "MDY")

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
MASK_SUFFIX = "_mask"

ICAP_PATTERN = re.compile(
    r"^(?P<experiment>.+?)"
    r"_T(?P<tube>\d{1,5})"
    r"_L?(?P<window>\d{1,5})"
    r"_(?P<date>\d{4}[.\-]\d{1,2}[.\-]\d{1,2}|\d{1,2}[.\-]\d{1,2}[.\-]\d{2}|\d{8})"
    r"_(?P<time>\d{6}|\d{2}[.:\-]\d{2}[.:\-]\d{2})"
    r"(?:_(?P<session>\d{1,5}))?"
    r"(?:_(?P<operator>[^_]+))?"
    r"(?:_(?P<suffix>.+))?$"
)
"""The ICAP-family name. ``L`` before the window is optional (rhizoTrak's ``me_T23_001_...``)."""


class FilenameError(ValueError):
    """A file name that does not yield the fields we need; the message is the reject reason."""


@dataclasses.dataclass(frozen=True)
class ParsedName:
    """Fields parsed from one file name (the stem, without folder or extension)."""

    experiment: str
    tube: int
    window: int
    session: int
    captured_at: dt.datetime
    operator: str | None
    tile: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        """Plain dict with ``captured_at`` in ISO 8601 (what ``rootflow manifest parse`` prints)."""
        out: dict[str, Any] = {
            "experiment": self.experiment,
            "tube": self.tube,
            "window": self.window,
            "session": self.session,
            "captured_at": self.captured_at.isoformat(),
            "operator": self.operator,
        }
        if self.tile is not None:
            out["tile"] = self.tile
        return out


def stem_of(name: str) -> str:
    """File name without folders and without an image extension (case-insensitive)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    lower = base.lower()
    for suf in IMAGE_SUFFIXES:
        if lower.endswith(suf):
            return base[: -len(suf)]
    return base


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def is_mask_name(name: str) -> bool:
    """``<stem>_mask.<ext>``: a human (or model) mask paired with the image ``<stem>``."""
    return is_image_name(name) and stem_of(name).endswith(MASK_SUFFIX)


def parse_name(
    name: str,
    *,
    date_order: DateOrder | None = None,
    pattern: str | re.Pattern[str] | None = None,
) -> ParsedName:
    """Parse a minirhizotron file name (path and extension are ignored).

    Args:
        name: file name, path or URI.
        date_order: how to read 2-digit-year dates (``DMY``: ``20.03.17`` = 2017-03-20;
            ``YMD``: 2020-03-17; ``MDY``: US order). ``None`` accepts only dates that are valid
            in exactly one of DMY/YMD; 4-digit-year dates never need it.
        pattern: a regular expression with named groups that replaces :data:`ICAP_PATTERN`
            (matched against the stem with ``re.fullmatch``).

    Raises:
        FilenameError: naming what did not parse.
    """
    stem = stem_of(name)
    if date_order is not None and date_order not in DATE_ORDERS:
        raise FilenameError(f"date_order must be one of {list(DATE_ORDERS)}, got {date_order!r}")
    rx = re.compile(pattern) if isinstance(pattern, str) else (pattern or ICAP_PATTERN)
    m = rx.fullmatch(stem)
    if m is None:
        what = "the given pattern" if pattern is not None else (
            "<EXPERIMENT>_T<tube>_L<window>_<date>_<hhmmss>_<session>_<operator>")
        raise FilenameError(f"file name {stem!r} does not match {what}")
    g = {k: v for k, v in m.groupdict().items() if v is not None}
    for key in ("experiment", "tube", "window"):
        if key not in g:
            raise FilenameError(f"file name {stem!r}: no {key} in the name")
    captured_at = _captured_at(stem, g, date_order)
    operator = g.get("operator")
    tile = g.get("tile")
    if tile is None and g.get("suffix"):
        tile = f"{operator}_{g['suffix']}" if operator else g["suffix"]
    return ParsedName(
        experiment=g["experiment"],
        tube=_int(stem, "tube", g["tube"]),
        window=_int(stem, "window", g["window"]),
        session=_int(stem, "session", g["session"]) if "session" in g else 0,
        captured_at=captured_at,
        operator=operator,
        tile=tile,
    )


def _int(stem: str, what: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise FilenameError(f"file name {stem!r}: {what} {text!r} is not a number") from None
    if not 0 <= value < 2**31:
        raise FilenameError(f"file name {stem!r}: {what} {value} out of range")
    return value


def _captured_at(stem: str, g: dict[str, str], date_order: DateOrder | None) -> dt.datetime:
    if "date" in g:
        date = _parse_date(stem, g["date"], date_order)
    elif {"year", "month", "day"} <= g.keys():
        year = int(g["year"])
        if year < 100:
            year += 2000
        date = _make_date(stem, year, int(g["month"]), int(g["day"]), g["year"])
    else:
        raise FilenameError(f"file name {stem!r}: no date in the name")
    if "time" in g:
        digits = re.sub(r"\D", "", g["time"])
        if len(digits) != 6:
            raise FilenameError(f"file name {stem!r}: time {g['time']!r} is not hhmmss")
        hh, mm, ss = int(digits[:2]), int(digits[2:4]), int(digits[4:])
    else:
        hh, mm, ss = (int(g.get(k, 0)) for k in ("hour", "minute", "second"))
    try:
        return dt.datetime.combine(date, dt.time(hh, mm, ss))
    except ValueError as e:
        raise FilenameError(f"file name {stem!r}: invalid time {hh:02d}:{mm:02d}:{ss:02d} ({e})") from None


def _make_date(stem: str, year: int, month: int, day: int, text: str) -> dt.date:
    try:
        return dt.date(year, month, day)
    except ValueError as e:
        raise FilenameError(f"file name {stem!r}: invalid date {text!r} ({e})") from None


def _parse_date(stem: str, text: str, date_order: DateOrder | None) -> dt.date:
    parts = re.split(r"[.\-]", text)
    if len(parts) == 1:  # YYYYMMDD
        return _make_date(stem, int(text[:4]), int(text[4:6]), int(text[6:]), text)
    a, b, c = parts
    if len(a) == 4:  # 4-digit year first: unambiguous
        return _make_date(stem, int(a), int(b), int(c), text)
    x, y, z = int(a), int(b), int(c)
    readings = {
        "DMY": (2000 + z, y, x),
        "YMD": (2000 + x, y, z),
        "MDY": (2000 + z, x, y),
    }
    if date_order is not None:
        year, month, day = readings[date_order]
        try:
            return dt.date(year, month, day)
        except ValueError as e:
            raise FilenameError(
                f"file name {stem!r}: date {text!r} is not a valid {date_order} date ({e})") from None
    valid: dict[str, dt.date] = {}
    for order in ("DMY", "YMD"):
        year, month, day = readings[order]
        with contextlib.suppress(ValueError):
            valid[order] = dt.date(year, month, day)
    if len(valid) == 1:
        return next(iter(valid.values()))
    if not valid:
        raise FilenameError(f"file name {stem!r}: date {text!r} is not a valid DMY or YMD date")
    raise FilenameError(
        f"file name {stem!r}: date {text!r} is ambiguous (DMY {valid['DMY'].isoformat()} or "
        f"YMD {valid['YMD'].isoformat()}); set date_order: DMY or YMD in the experiment config "
        "(or --date-order)")
