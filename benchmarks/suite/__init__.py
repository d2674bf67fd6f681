"""The issue-15 task suite (benchmark-side, not shipped in the wheel); see tasks.py."""

from benchmarks.suite.tasks import SUITE, TUNING_TASKS, SuiteTask, task

__all__ = ["SUITE", "TUNING_TASKS", "SuiteTask", "task"]
