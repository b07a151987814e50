"""Data checks: a bounded probe before step 1, and a bound on consecutive failures while training.

**Probe** (``probe_stream``): on every rank, before the first step, a few real samples of a stream are
read from its shards and decoded through the stages training uses (decode, the run's preprocessing,
the tokenizer), in a thread bounded by ``--data-probe-timeout``. Nothing decodable among the samples
read, shards that cannot be opened (missing files, ``pipe:`` commands that fail, unreachable URLs),
a stream that yields nothing in time, or more than ``CAPTION_MISSING_MAX`` of the samples without a
caption is one error naming the flag, the shard and what was wrong. The ranks then exchange their
verdicts (``raise_on_any_rank``), so every rank stops with the error and none waits for another.

**While training** (``FailureGuard``; upstream's own ``--train-data`` loader has the same bound from
patch 0004, ``ConsecutiveErrors``, set from ``--data-failure-limit``): the error handler and the filter of a stream
count consecutive failures (a shard that cannot be read, a sample that does not decode or lacks its
image or caption); ``--data-failure-limit`` in a row stop the run with the last failures named,
instead of spinning over a broken stream. Its warnings are rate-limited.
"""
import logging
import re
import threading
import time

import webdataset as wds
from open_clip_train.data import tarfile_to_samples_nothrow

from openclip_robust.checks import require
from openclip_robust.distributed import all_gather_objects
from openclip_robust.data.shard_format import IMAGE_EXTS, has_caption, has_image
from openclip_robust.errors import UserError

CAPTION_MISSING_MAX = 0.10  # share of probed samples (with an image) that may lack the caption; more: an error
PROBE_SAMPLES = 64          # raw samples read per stream (enough to estimate caption coverage)
PROBE_SHARDS = 4            # shards tried per stream, from a rank-dependent start


class DataError(UserError, RuntimeError):
    pass


def add_args(group):
    group.add_argument("--data-failure-limit", type=int, default=200, metavar="N",
                       help="stop the run when this many consecutive samples or shards of a webdataset stream "
                            "(--ref-data, and --train-data through upstream's --wds-max-consecutive-errors unless "
                            "that is given) fail to read, decode or hold their image and caption (default 200).")
    group.add_argument("--data-probe-timeout", type=float, default=120.0, metavar="S",
                       help="seconds each rank may take, before step 1, to read and decode a few samples of "
                            "the reference and target data, and for each other file-system touch before step 1 "
                            "(listing shards, checkpoints, caches, weights) (default 120); nothing in time is an "
                            "error naming the path.")


def validate_args(args):
    require(args, "data_failure_limit", low=1)
    require(args, "data_probe_timeout", low=0, low_open=True)
    # upstream's own --train-data loader (patch 0004); a value given to upstream's flag wins
    if not getattr(args, "wds_max_consecutive_errors", 0):
        args.wds_max_consecutive_errors = args.data_failure_limit


def describe(exn):
    """An exception as one short line, without the stream objects webdataset appends to its args."""
    parts = [str(a) for a in exn.args if isinstance(a, (str, int)) and not str(a).startswith(("pipe:", "http"))]
    text = f"{type(exn).__name__}: {' '.join(parts) or exn}"
    command = re.search(r"""\(\((['"])(.+?)\1,\), .*\): exit (-?\d+)""", text)  # webdataset's Pipe: a failed command
    if command:
        return f"the command `{command.group(2)}` exited with status {command.group(3)}"
    if "empty file" in text:
        text += " (nothing came from the file, command or URL)"
    return text


class RateLimitedWarnings:
    """The first `first` warnings, then at most one per `every_s` seconds with a count of those held back."""

    def __init__(self, first=5, every_s=60.0):
        self.first, self.every_s = first, every_s
        self.count, self.held, self.last = 0, 0, 0.0

    def warn(self, message):
        self.count += 1
        now = time.monotonic()
        if self.count <= self.first or now - self.last >= self.every_s:
            held = f" ({self.held} similar warnings held back)" if self.held else ""
            logging.warning(message + held)
            self.held, self.last = 0, now
        else:
            self.held += 1


class FailureGuard:
    """The error handler and filter of one training stream; raises DataError at `limit` failures in a row.

    One per DataLoader worker process (each worker holds its own copy): the error reaches the main
    process through the DataLoader, which re-raises it there.
    """

    def __init__(self, flag, limit, need_caption=True):
        self.flag, self.limit, self.need_caption = flag, limit, need_caption
        self.in_a_row, self.missing_caption = 0, 0
        self.recent = []  # the last few failures, for the error
        self.warnings = RateLimitedWarnings()

    def _failed(self, what):
        self.in_a_row += 1
        self.recent = (self.recent + [what])[-3:]
        if self.in_a_row >= self.limit:
            raise DataError(f"openclip-robust: {self.flag}: {self.in_a_row} samples or shards in a row failed "
                            f"(--data-failure-limit {self.limit}); last: {'; '.join(self.recent)}. Fix or drop "
                            f"those shards.")
        self.warnings.warn(f"openclip-robust: {self.flag}: {what} (skipped)")

    def handler(self, exn):
        """webdataset's handler protocol: True means skip and continue."""
        self._failed(describe(exn))
        return True

    def keep(self, sample):
        """wds.select predicate: the sample holds an image (and a caption where needed)."""
        where = f"sample {sample.get('__key__')} of {sample.get('__url__')}"
        if not has_image(sample):
            self._failed(f"{where} has no image ({'/'.join(IMAGE_EXTS)})")
            return False
        if self.need_caption and not has_caption(sample):
            self.missing_caption += 1
            self._failed(f"{where} has no caption (.txt missing or blank; {self.missing_caption} so far)")
            return False
        return True

    def decoded(self, sample):
        """wds.map stage after the last decoding stage: a good sample ends the run of failures."""
        self.in_a_row = 0
        return sample


class ProbeResult:
    def __init__(self):
        self.shard_errors = {}        # url -> message
        self.read = 0                 # raw samples read
        self.no_image, self.no_caption, self.decoded = 0, 0, 0
        self.decode_errors = []       # (where, message), the first few
        self.examples = {}            # problem -> first 'sample KEY of URL'
        self.shards = []              # urls tried
        self.current = None           # the sample being decoded

    def shard_error(self, url, exn):
        self.shard_errors.setdefault(url, describe(exn))


def _read(result, urls, stages, need_caption, limit):
    for url in urls:
        result.shards.append(url)

        def handler(exn, url=url):
            if result.current is None:
                result.shard_error(url, exn)
            else:
                result.decode_errors.append((result.current, describe(exn)))
            return True

        def present(sample):
            result.read += 1
            result.current = f"sample {sample.get('__key__')} of {url}"
            if not has_image(sample):
                result.no_image += 1
                result.examples.setdefault("no image", result.current)
                return False
            if need_caption and not has_caption(sample):
                result.no_caption += 1
                result.examples.setdefault("no caption", result.current)
                return False
            return True

        def decoded(sample):
            result.decoded += 1
            return sample

        result.current = None
        pipeline = wds.DataPipeline(lambda: iter([{"url": url}]),
                                    lambda src: tarfile_to_samples_nothrow(src, handler=handler),
                                    wds.select(present), *stages(handler), wds.map(decoded))
        for _ in pipeline:
            if result.read >= limit:
                return
        if result.read >= limit:
            return


def probe_stream(flag, urls, stages, need_caption=True, rank=0, timeout_s=120.0, samples=PROBE_SAMPLES):
    """Read up to `samples` raw samples from a few of `urls` through `stages(handler)` (the training stages
    after the image/caption filter); return an error message, or None when the stream is usable."""
    if not urls:
        return f"{flag}: no shard listed"
    start = rank % len(urls)
    order = (urls[start:] + urls[:start])[:PROBE_SHARDS]
    result = ProbeResult()
    thread = threading.Thread(target=_read, args=(result, order, stages, need_caption, samples), daemon=True)
    began = time.monotonic()
    thread.start()
    thread.join(timeout_s)
    timed_out = thread.is_alive()  # left to finish or block on its own: a daemon thread does not hold the exit
    shards = ", ".join(result.shards) or order[0]
    if timed_out and result.decoded == 0:
        got = f"{result.read} samples read, none decoded" if result.read else "nothing read"
        return (f"{flag}: no sample decoded within --data-probe-timeout {timeout_s:g} s from {shards} ({got}); "
                f"is the storage or URL reachable from this node?")
    if result.decoded == 0:
        problems = [f"{u}: {m}" for u, m in result.shard_errors.items()]
        if result.no_image:
            problems.append(f"{result.no_image} samples without an image ({'/'.join(IMAGE_EXTS)}), e.g. "
                            f"{result.examples['no image']}")
        if result.no_caption:
            problems.append(f"{result.no_caption} samples without a caption (.txt missing or blank), e.g. "
                            f"{result.examples['no caption']}")
        if result.decode_errors:
            where, message = result.decode_errors[0]
            problems.append(f"{len(result.decode_errors)} samples that do not decode, e.g. {where}: {message}")
        if not problems:
            problems.append("the shards hold no samples")
        return f"{flag}: no usable sample in {shards}: " + "; ".join(problems)
    with_image = result.read - result.no_image
    if need_caption and with_image and result.no_caption / with_image > CAPTION_MISSING_MAX:
        return (f"{flag}: {result.no_caption} of {with_image} samples read from {shards} have no caption (.txt missing or "
                f"blank), e.g. {result.examples['no caption']}; more than {CAPTION_MISSING_MAX:.0%} missing means the "
                f"captions are not where the loader reads them (every sample needs KEY.txt beside its image)")
    skipped = result.no_caption + result.no_image + len(result.decode_errors)
    logging.info(f"openclip-robust: {flag}: probe decoded {result.decoded} of {result.read} samples from "
                 f"{len(result.shards)} shard(s) in {time.monotonic() - began:.1f} s"
                 + (f"; {skipped} skipped (missing caption or image, or not decodable)" if skipped else ""))
    for url, message in result.shard_errors.items():
        logging.warning(f"openclip-robust: {flag}: shard {url}: {message}")
    return None


def raise_on_any_rank(errors):
    """Every rank raises DataError when any rank found a problem (so none waits for another)."""
    errors = [e for e in errors if e]
    gathered = all_gather_objects("; ".join(errors) or None)
    problems = [(f"rank {r}: {e}" if len(gathered) > 1 else e) for r, e in enumerate(gathered) if e]
    if problems:
        raise DataError("openclip-robust: data probe failed before step 1: " + " | ".join(problems))
