"""Errors the user can fix (bad data, a checkpoint that is not this run's, stuck storage, a loss gone NaN):
printed as one line, exit status 2, so the error is the last thing a user reads.

Each such error class derives from ``UserError``. ``install_excepthook`` (called when a robust run's flags
are validated) prints an uncaught one as ``openclip-robust: error: <Type>: <message>`` and exits with 2;
with upstream's ``--debug`` or ``OPENCLIP_ROBUST_TRACEBACK=1`` the full traceback is printed as usual.
Every other exception keeps Python's own report.
"""
import logging
import os
import sys

TRACEBACK_ENV = "OPENCLIP_ROBUST_TRACEBACK"


class UserError(Exception):
    """Marks an error whose message says what to fix: no traceback needed."""


def one_line(exc):
    """The message as one line. An error re-raised from a DataLoader worker carries the worker's traceback in
    its message ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): its last line is
    the original error."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in lines[0] + "".join(lines[1:2]):
        return lines[-1].strip()
    return f"{type(exc).__name__}: {' '.join(line.strip() for line in lines)}"


def install_excepthook(debug=False):
    if debug or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        return
    previous = sys.excepthook

    def hook(kind, exc, tb):
        if not isinstance(exc, UserError):
            return previous(kind, exc, tb)
        logging.shutdown()  # flush what was logged before the line that ends the run
        sys.stdout.flush()
        # the process's own stderr: torch.distributed's excepthook calls this one with sys.stderr swapped
        # for a buffer it would print (prefixed by rank) after this hook returned, which it does not
        print(f"openclip-robust: error: {one_line(exc)}  (traceback: --debug or {TRACEBACK_ENV}=1)",
              file=sys.__stderr__, flush=True)
        os._exit(2)  # an excepthook cannot set the exit status otherwise (Python exits with 1)

    sys.excepthook = hook
