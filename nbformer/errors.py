"""Every user-facing failure is an NbformerError: one line that names the file, tensor or
argument at fault and what was expected. The CLI prints it and exits non-zero."""


class NbformerError(Exception):
    """Base class of all errors nbformer raises on purpose."""


class ConfigError(NbformerError):
    """A model configuration is missing, unknown or inconsistent."""


class WeightsError(NbformerError):
    """A weight file is unreadable, corrupt, or disagrees with the configuration."""


class InputError(NbformerError, ValueError):
    """An argument passed to the public API (ids, masks, lengths, options) is invalid."""


class GraphError(NbformerError):
    """A graph could not be built, planned or executed (missing kernel, bad shapes)."""
