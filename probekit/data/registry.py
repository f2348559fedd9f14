"""Former home of the task table, kept so that ``from probekit.data.registry import short_name`` still works.

Import from :mod:`probekit.data` (or :mod:`probekit.data.task`) instead; this module goes once no caller is left.
"""

from __future__ import annotations

from probekit.data.task import Task, get_task, list_tasks, register_task, short_name

__all__ = ["Task", "get_task", "list_tasks", "register_task", "short_name"]
