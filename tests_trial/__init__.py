"""
Tests that run under trial's asynchronous TestCase, as an application that
embeds dtable would write them. Run with: python -m twisted.trial tests_trial
(they are kept apart from the pytest suite, which owns the reactor through
pytest-twisted).
"""
