"""The errors runner raises on purpose.

Each carries a message a user can act on. The CLI turns any `RunnerError` into one line on
stderr and an exit code (2 for bad input, 1 for a failure while running); nothing else should
print a traceback at the user.
"""


class RunnerError(Exception):
    """Base class: something the user can understand and usually fix."""

    exit_code = 1


class UserInputError(RunnerError):
    """Bad input: a path that does not exist, an unknown model, an absurd context, ..."""

    exit_code = 2


class ModelNotFound(UserInputError):
    """No config.json for this model in a folder, the Hugging Face cache, or the catalog."""


class UnsupportedModel(UserInputError):
    """config.json is readable but runner cannot plan or run this architecture."""


class BackendUnavailable(RunnerError):
    """The backend's software stack or hardware is missing; the message says how to install it."""

    exit_code = 2


class DoesNotFit(RunnerError):
    """The plan says the model does not fit (or only with offload the user did not allow)."""

    exit_code = 2


class LoadError(RunnerError):
    """Loading weights failed: corrupt shard, out of memory, missing tokenizer, ..."""


class GenerationError(RunnerError):
    """Generation failed part-way through."""


class CorruptWeights(LoadError):
    """A weights file cannot be read: truncated, damaged, or not what its name says."""

    exit_code = 2
