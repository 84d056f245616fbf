"""Errors a user can cause. Each carries one clear line: what is wrong, where, and how to fix it."""


class KDTuneError(Exception):
    """Base class for user-facing errors; the CLI prints these as one line without a traceback."""


class ConfigError(KDTuneError):
    """A config file, override or setting is wrong."""


class CheckpointError(KDTuneError):
    """A checkpoint directory, file or tensor does not match what is expected."""


class DataError(KDTuneError):
    """A dataset, column, message or tokenizer file is wrong."""
