"""Dates as operators read them: ISO order, 24 h, to the second (Django's English default,
"Nov. 25, 2026, 6 p.m.", hides the seconds a call's events are told apart by)."""

DATETIME_FORMAT = "Y-m-d H:i:s"
SHORT_DATETIME_FORMAT = "Y-m-d H:i:s"
DATE_FORMAT = "Y-m-d"
SHORT_DATE_FORMAT = "Y-m-d"
TIME_FORMAT = "H:i:s"
