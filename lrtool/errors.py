"""The errors lrtool raises for its users, each carrying its exit code.

Core modules raise these; the CLI layer (cli.py) turns them into one `Error: ...` line on stderr and the
exit code below. Messages say what is wrong and, where it helps, what to do about it.

Exit codes (DESIGN.md): 0 success, 1 runtime error, 2 usage error, 3 quality gate failed, 130 interrupted.
"""

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_GATE = 3
EXIT_INTERRUPTED = 130


class LrtoolError(Exception):
    """A failure the user can act on. `exit_code` is what the process exits with."""

    exit_code = EXIT_RUNTIME


class UsageError(LrtoolError):
    """The command line itself is wrong: a flag value out of range, a missing or conflicting option."""

    exit_code = EXIT_USAGE


class InputError(LrtoolError):
    """An input file is missing, unreadable, truncated or malformed (messages name FILE or FILE:LINE)."""


class UnsupportedFeatureError(InputError):
    """The input uses a feature lrtool cannot represent exactly (DoRA, lora bias, pickled weights, ...)."""


class IncompatibleError(LrtoolError):
    """Inputs that are fine alone but cannot be used together (adapters for different bases, ...)."""


class OutputExistsError(LrtoolError):
    """The output path exists and --force was not given (or it is not lrtool's to replace)."""


class OutputError(LrtoolError):
    """An output could not be written (a full disk, a quota, a read-only file system)."""


class DivergedError(LrtoolError):
    """Training met a non-finite loss or weight: it stopped without writing an output."""


class QualityGateError(LrtoolError):
    """A quality gate failed (eval --fail-under, diagnose --fail-on)."""

    exit_code = EXIT_GATE


def one_line(error: BaseException) -> str:
    """An exception's message on one line (library messages span several), or its class name if empty."""
    return " ".join(str(error).split()) or type(error).__name__
