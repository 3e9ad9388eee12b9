"""The errors that tell the user what to change, as opposed to bugs.

A `UserError` is a refusal: its message is one sentence naming the config key or the file:line at fault and what to
do about it, and that sentence is all the user needs. run.py prints it alone and exits with status 2
(HYDRA_FULL_ERROR=1 shows the stack too); any other exception is a bug and keeps its traceback.

The bottom floor (ARCHITECTURE.md): any module may raise these, and this one imports nothing. Kinds that belong to
one module subclass UserError there: data.download.DownloadError, module.NonFiniteLossError.
"""


class UserError(ValueError):
    """An error that tells the user what to change: a config key or value, a data file's line, a missing file."""


class ConfigError(UserError):
    """A config choice or value that cannot work; the message names the key and what to set instead.
    (Also importable as marco_lightning.config.ConfigError.)"""


class DataFormatError(UserError):
    """A data file does not have the expected format; the message names file:line and what was expected.
    (Also importable as marco_lightning.data.formats.DataFormatError.)"""


class MissingFileError(UserError, FileNotFoundError):
    """An input file or folder the config names is not there; the message names the key and how to make it or
    point at it. Still a FileNotFoundError (an OSError), so `except FileNotFoundError` catches it."""


class ExistingFileError(UserError, FileExistsError):
    """An output file or folder is there already and holds something else; the message says how to replace it or
    where else to write. Still a FileExistsError (an OSError)."""
