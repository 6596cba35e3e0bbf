"""The errors that several parts of minillm raise and the command lines catch, in a module that imports nothing.

    ConfigError       an option value, or a model configuration, that cannot work: a usage error
    DataError         a corpus or a token file that cannot be read or is too small to train on
    CheckpointError   a checkpoint that cannot be read or written
    PretrainedError   a GPT-2 directory that cannot be read or written

They live here, not beside the code that raises them (options.py and model.py, data.py,
checkpoint.py, hf.py), so that naming one costs no import of that code: cli.py sorts every
error into an exit status without importing the model, and memory.py refuses a model too large
for the machine without importing the model that asks it. An error of one part alone stays with
that part: TokenIdError in layers/embedding.py, TokenizerError in tokenizers/bpe.py.
"""


class ConfigError(ValueError):
    """An option value, or a model configuration, that cannot work."""


class DataError(ValueError):
    """A corpus that cannot be read or is too small to train on."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written."""


class PretrainedError(ValueError):
    """A GPT-2 directory that cannot be read or written."""
