"""Tasks and task families: what a learning problem is, and how to sample many of them."""

from metaprox.tasks.share import TaskShare
from metaprox.tasks.task import Task, TaskDataError

__all__ = ["Task", "TaskDataError", "TaskShare"]
