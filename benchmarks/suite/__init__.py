"""The issue-15 task suite (benchmark-side, not shipped in the wheel); see tasks.py."""

from benchmarks.suite.tasks import SUITE, SuiteTask, task

__all__ = ["SUITE", "SuiteTask", "task"]
