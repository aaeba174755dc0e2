"""The error every configuration check raises."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration file or option that cannot be used; the message names the file and the key."""
