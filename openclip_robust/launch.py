"""Upstream's entry point called in this process, as ``python -m open_clip_train.main ARGV`` runs it."""
import logging

from open_clip_train.main import main


def run_main(argv):
    """main(argv)'s return value. main() adds a log-file handler to the root logger on every call: it is
    removed afterwards, so that several runs in one process do not log into each other's files."""
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        return main(list(argv))
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
                handler.close()


def train(argv):
    """run_main, failing loudly: main() returns -1 (after logging why) when the run's log folder exists."""
    status = run_main(argv)
    if status:
        raise SystemExit(f"open_clip_train.main returned {status}")
