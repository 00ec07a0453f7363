"""File-name parsing: every real folder's names, the documented variants, and bad names."""

from __future__ import annotations

import datetime as dt
import os

import pytest

from rootflow.io.filenames import FilenameError, is_mask_name, parse_name, stem_of

D = dt.datetime


@pytest.mark.parametrize(
    ("name", "order", "expected"),
    [
        # Bartz/ICAP, 4-digit year
        ("EXP_T001_L003_2019.07.12_101500_004_ABC.jpg", None,
         dict(experiment="EXP", tube=1, window=3, session=4, captured_at=D(2019, 7, 12, 10, 15),
              operator="ABC", tile=None)),
        # SegRoot: DD.MM.YY
        ("Untitled_T002_L002_20.03.17_115856_001_Untitled.jpg", "DMY",
         dict(experiment="Untitled", tube=2, window=2, session=1,
              captured_at=D(2017, 3, 20, 11, 58, 56), operator="Untitled", tile=None)),
        # PRMI switchgrass: unpadded numbers, dotted experiment, tile suffix
        ("DOE.S300_T312_L2_09.08.17_114706_1_FRMI_01.png", "DMY",
         dict(experiment="DOE.S300", tube=312, window=2, session=1,
              captured_at=D(2017, 8, 9, 11, 47, 6), operator="FRMI", tile="FRMI_01")),
        ("DOE.S300_T112_L4_22.05.17_123606_1_FRMI", "DMY",
         dict(experiment="DOE.S300", tube=112, window=4, session=1,
              captured_at=D(2017, 5, 22, 12, 36, 6), operator="FRMI", tile=None)),
        # PRMI peanut: experiment starting with digits
        ("2016LATERALPEANUT_T064_L018_2016.06.30_153725_006_BAZ.jpg", None,
         dict(experiment="2016LATERALPEANUT", tube=64, window=18, session=6,
              captured_at=D(2016, 6, 30, 15, 37, 25), operator="BAZ", tile=None)),
        # CI-600 / renamed exports: ISO or compact dates
        ("FIELD_A_T001_L001_2021-06-01_101500_002_JD.tiff", None,
         dict(experiment="FIELD_A", tube=1, window=1, session=2,
              captured_at=D(2021, 6, 1, 10, 15), operator="JD", tile=None)),
        ("proj_T010_L012_20210601_101500_001_xy.png", None,
         dict(experiment="proj", tube=10, window=12, session=1,
              captured_at=D(2021, 6, 1, 10, 15), operator="xy", tile=None)),
        # rhizoTrak sample: no 'L' before the window
        ("me_T23_001_25.02.15_000000_1_njo.jpg", "DMY",
         dict(experiment="me", tube=23, window=1, session=1, captured_at=D(2015, 2, 25),
              operator="njo", tile=None)),
        # RootDetector crop: suffix after the operator, YY.MM.DD read year-first when configured
        ("PD_T088_L004_17.10.18_140056_014_SS_crop.tiff", "YMD",
         dict(experiment="PD", tube=88, window=4, session=14,
              captured_at=D(2017, 10, 18, 14, 0, 56), operator="SS", tile="SS_crop")),
        ("s3://bucket/a/b/X_T1_L2_2020.01.02_030405_6_OP.JPG", None,
         dict(experiment="X", tube=1, window=2, session=6, captured_at=D(2020, 1, 2, 3, 4, 5),
              operator="OP", tile=None)),
    ],
)
def test_known_patterns(name: str, order, expected: dict) -> None:
    p = parse_name(name, date_order=order)
    assert {k: getattr(p, k) for k in expected} == expected


def test_ambiguous_two_digit_year_is_an_error_not_a_guess() -> None:
    with pytest.raises(FilenameError, match="ambiguous.*2017-03-20.*2020-03-17.*date_order"):
        parse_name("Untitled_T002_L002_20.03.17_115856_001_Untitled")
    assert parse_name("Untitled_T002_L002_20.03.17_115856_001_Untitled",
                      date_order="YMD").captured_at.date() == dt.date(2020, 3, 17)
    assert parse_name("A_T1_L1_03.04.17_000000_1_X", date_order="MDY").captured_at.date() == \
        dt.date(2017, 3, 4)


@pytest.mark.parametrize(
    ("name", "order", "match"),
    [
        ("random_photo.jpg", None, "does not match"),
        ("EXP_T001_2019.07.12_101500_004_ABC", None, "does not match"),
        ("EXP_T001_L003_2019.13.12_101500_004_ABC", None, "invalid date"),
        ("EXP_T001_L003_2019.07.12_251500_004_ABC", None, "invalid time"),
        ("EXP_T001_L003_31.02.17_101500_004_ABC", "DMY", "not a valid DMY date"),
        ("EXP_T001_L003_45.45.45_101500_004_ABC", None, "not a valid DMY or YMD"),
        ("EXP_T001_L003_2019.07.12_101500_004_ABC", "XYZ", "date_order must be"),
    ],
)
def test_bad_names(name: str, order, match: str) -> None:
    with pytest.raises(FilenameError, match=match):
        parse_name(name, date_order=order)


def test_user_pattern_overrides() -> None:
    rx = (r"(?P<experiment>[A-Z]+)-tube(?P<tube>\d+)-win(?P<window>\d+)-"
          r"(?P<year>\d{4})(?P<month>\d\d)(?P<day>\d\d)")
    p = parse_name("FARM-tube7-win12-20200915.png", pattern=rx)
    assert (p.experiment, p.tube, p.window, p.session, p.captured_at, p.operator) == \
        ("FARM", 7, 12, 0, D(2020, 9, 15), None)
    with pytest.raises(FilenameError, match="does not match the given pattern"):
        parse_name("EXP_T001_L003_2019.07.12_101500_004_ABC", pattern=rx)
    with pytest.raises(FilenameError, match="no date"):
        parse_name("FARM-tube7-win12", pattern=r"(?P<experiment>\w+)-tube(?P<tube>\d+)-win(?P<window>\d+)")


def test_masks_and_stems() -> None:
    assert is_mask_name("a/X_T1_L2_2020.01.02_030405_6_OP_mask.png")
    assert not is_mask_name("X_T1_L2_2020.01.02_030405_6_OP.png")
    assert not is_mask_name("notes_mask.txt")
    assert stem_of("s3://b/k/name.TIFF") == "name"


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("folder", "order", "n", "experiments", "first_date"),
    [
        ("segroot_soybean", "DMY", 19, {"Untitled"}, dt.date(2017, 3, 20)),
        ("prmi_peanut", None, 65, {"2016LATERALPEANUT"}, dt.date(2016, 5, 26)),
        ("prmi_switchgrass", "DMY", 23, {"DOE.S300"}, dt.date(2017, 8, 9)),
    ],
)
def test_every_real_name_parses(real_data, folder, order, n, experiments, first_date) -> None:
    names = sorted(f for f in os.listdir(real_data / folder)
                   if f.lower().endswith((".jpg", ".png")) and not is_mask_name(f))
    assert len(names) == n
    parsed = [parse_name(f, date_order=order) for f in names]
    assert {p.experiment for p in parsed} == experiments
    assert min(p.captured_at.date() for p in parsed) == first_date
    assert all(p.tube > 0 and p.window > 0 and p.operator for p in parsed)
    if folder == "prmi_switchgrass":
        assert all(p.tile and p.tile.startswith("FRMI_") for p in parsed)
        assert {p.window for p in parsed} == {2, 3, 7}
