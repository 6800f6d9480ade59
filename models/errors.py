"""The error a bad model configuration raises, for models/config.py and models/rope.py alike."""


class ConfigError(ValueError):
    """A model configuration that names an unsupported or inconsistent setting."""
