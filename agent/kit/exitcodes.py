"""Process exit codes, so that systemd can tell a bad config (do not restart) from a crash."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    CRASH = 1
    USAGE = 2  # bad command line (argparse's own code)
    CONFIG = 78  # EX_CONFIG: the config, a key or the model store is unusable; fix it first
    UNAVAILABLE = 69  # EX_UNAVAILABLE: the broker could not be reached
    KEY_EXISTS = 73  # EX_CANTCREAT: keygen refuses to overwrite an existing key
