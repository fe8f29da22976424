"""
Fixtures shared by the suite.
"""

from __future__ import annotations

import pytest
from twisted.logger import globalLogPublisher

from dtable.testing import LogCapture


@pytest.fixture
def logs():
    """
    Every log event emitted during the test (a L{LogCapture}).
    """
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)
