"""Errors of the data stage. Each message names the file, row or key, and the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sla_core.data.validate import ValidationReport


class DataError(Exception):
    """Base class for every error of the data stage."""


class ConfigError(DataError, ValueError):
    """A task description (YAML or TaskSpec) is wrong."""


class DataSourceError(DataError):
    """A source cannot be read: missing file or column, unknown format, hub unreachable."""


class DataValidationError(DataError):
    """Rows failed validation under the task's policy; nothing was written."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        super().__init__(report.format())
