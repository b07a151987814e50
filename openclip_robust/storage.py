"""File-system touches before step 1, bounded: stuck storage (a hung network mount, a FIFO) is an error
naming the path, never a hang.

``open()``/``stat()`` on a stuck mount block in the kernel and cannot be interrupted from Python, so the
touch runs in a daemon thread that is left behind when it outlasts the bound (it does not hold the exit).
The bound is ``--data-probe-timeout`` (default 120 s), the one the data probe already uses.
"""
import threading

from openclip_robust.errors import UserError


class StorageTimeout(UserError, RuntimeError):
    pass


class Touches:
    """Where a bounded job is: the job calls ``at(path)`` before each touch, so a timeout can name it."""

    def __init__(self):
        self.path = None

    def at(self, path):
        self.path = path
        return path


def bounded(job, timeout_s, flag, default_path=None):
    """Run ``job(touches)`` with at most `timeout_s` seconds; return its value or raise what it raised.

    Past the bound: StorageTimeout naming `flag` and the path the job was touching."""
    touches, out = Touches(), {}

    def run():
        try:
            out["value"] = job(touches)
        except BaseException as e:  # re-raised in the caller's thread
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True, name=f"bounded {flag}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise StorageTimeout(
            f"{flag}: {touches.path or default_path} did not answer within {timeout_s:g} s (--data-probe-timeout): "
            f"the storage looks stuck (a hung network mount, or a FIFO/device instead of a file). Check that it "
            f"is reachable from this node, or raise --data-probe-timeout.")
    if "error" in out:
        raise out["error"]
    return out.get("value")
