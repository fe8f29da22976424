"""
The seed's debug levels: a channel logs at or above its level, and below it
nothing is built.
"""

from __future__ import annotations

from dtable._log import debug_channel


def test_channel_at_its_level_logs(logs):
    debug_channel("dtable.wire", 3, 3).debug("frame {kind}", kind="Ping")
    [event] = logs.matching(lambda e: e.get("log_namespace") == "dtable.wire")
    assert event["kind"] == "Ping" and event["log_level"].name == "debug"


def test_channel_below_its_level_is_silent(logs):
    for debug in (0, 1, 2):
        debug_channel("dtable.wire", 3, debug).debug("frame {kind}", kind="Ping")
    assert logs.matching(lambda e: e.get("log_namespace") == "dtable.wire") == []
