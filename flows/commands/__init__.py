"""Each module here adds one or more subcommands to `flows.cli.app` on import."""

from flows.commands import compare as compare  # noqa: F401
from flows.commands import core as core  # noqa: F401
from flows.commands import data as data  # noqa: F401
from flows.commands import pipeline as pipeline  # noqa: F401
from flows.commands import train as train  # noqa: F401
from flows.commands import tune as tune  # noqa: F401
from flows.commands import validate as validate  # noqa: F401
