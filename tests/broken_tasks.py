"""A QUEUE_TASK_MODULES module whose import fails, for tests/integration/test_startup.py."""

raise RuntimeError("broken on purpose\nthis second line is not repeated")
