"""The errors a user can cause, one type per concern, so the entry points can say what
went wrong ("checkpoint error: ...", not "config error: ...") and exit with status 2.

Every message names the field, file or flag at fault and how to fix it.
"""

from __future__ import annotations


class ForgeError(Exception):
    """Base of every user-fixable error; entry points print ``<kind>: <message>``."""

    kind = "error"


class ConfigError(ForgeError, ValueError):
    """A config file, an override or a parallel layout that cannot work."""

    kind = "config error"


class CheckpointError(ForgeError):
    """A checkpoint directory that cannot be read, resumed from or written to."""

    kind = "checkpoint error"


class DataError(ForgeError, ValueError):
    """A dataset, corpus file or tokenizer that cannot be used as given."""

    kind = "data error"


class ConvertError(ForgeError, ValueError):
    """A checkpoint or Hugging Face directory that cannot be converted as asked."""

    kind = "conversion error"
