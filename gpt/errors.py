"""Errors a user can cause. The launcher prints them as one short message, without a traceback."""


class UserError(Exception):
    """Something the user can fix: bad config, missing data, impossible topology, corrupt checkpoint."""


class ConfigError(UserError):
    """A config key holds a value that cannot work; the message names the key, the value and what is valid."""

    def __init__(self, key: str, value: object, valid: str):
        self.key, self.value, self.valid = key, value, valid
        super().__init__(f"{key}={value!r} is not valid: {valid}")
