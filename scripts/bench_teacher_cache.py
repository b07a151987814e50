"""What a teacher cache costs a training rank: bytes per sample, open time, RSS, look-up time.

    .venv/bin/python scripts/bench_teacher_cache.py --out /tmp/bench-cache   # 2.9M keys, d = 512 image + text

Writes a synthetic reference cache (``openclip_robust.teachers.cache``'s format 3: one file per data
shard, with each row's content digest and each file's checksum) of --keys keys in shards of --per-shard, for each --dtypes entry (one at a time, deleted after;
a dtype whose cache would exceed --disk-gb is measured at the most whole shards that fit, and the row
says so). Then, each in a fresh process so that RSS is its own: (1) one rank as training opens it:
the manifest, then every --ranks-th shard's file (the shards that rank streams) through the cache's
open-shard limit, each checked against its checksum, looking one key up in each (which builds that
shard's key -> row map); (2) the look-up of a batch of --batch samples as a loader worker makes it
(``attach``, which checks the sample's digest over its --image-bytes image and caption, + ``rows_of``
per sample, then stacked), from the shards left open; (3) for comparison, a global key -> (shard, row)
index over every shard (what format 1 built in every process). RSS: /proc/self/status VmRSS. Files
are in the page cache after writing (warm), as on a node whose ranks share them. Prints one table.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

import torch

from openclip_robust.teachers import cache as teacher_cache

FEATURES = ("image_features", "text_features")


def rss_mb():
    """{"rss", "anon", "file"} in MB: all resident memory, the process's own, and mapped file pages
    (the page cache's, shared by every process that maps them)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {name: int(fields[key].split()[0]) / 1024
            for name, key in (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile"))}


def grown(before):
    now = rss_mb()
    return {k: now[k] - before[k] for k in now}


def sample(url, key, image_bytes):
    """A synthetic raw sample: `image_bytes` bytes of image (the same for every key) and a caption."""
    return {"__url__": url, "__key__": key, "jpg": b"\xff" * image_bytes, "txt": f"caption {key}".encode()}


def write(out, keys, per_shard, dim, dtype, image_bytes):
    """A complete format-3 reference cache of `keys` synthetic keys; returns seconds to write."""
    start = time.perf_counter()
    n_shards = -(-keys // per_shard)
    urls = [f"/data/ref/{i:06d}.tar" for i in range(n_shards)]
    files = teacher_cache.shard_file_names(urls)
    os.makedirs(os.path.join(out, teacher_cache.SHARD_DIR), exist_ok=True)
    counts, checksums, data_digests, gen = [], [], [], torch.Generator().manual_seed(0)
    for i, name in enumerate(files):
        n = min(per_shard, keys - i * per_shard)
        rows = {f: torch.randn(n, dim, generator=gen).to(teacher_cache.DTYPES[dtype]) for f in FEATURES}
        names = [f"{i * per_shard + j:09d}" for j in range(n)]
        digests = torch.frombuffer(bytearray(b"".join(teacher_cache.sample_digest(sample(urls[i], k, image_bytes))
                                                      for k in names)), dtype=torch.uint8).reshape(n, -1)
        teacher_cache._save_atomic({"keys": names, "digests": digests, **rows}, os.path.join(out, name))
        counts.append(n)
        checksums.append(teacher_cache.sha256_of_file(os.path.join(out, name)))
        data_digests.append(teacher_cache.shard_data_digest(digests))
    manifest = {"format": teacher_cache.FORMAT_VERSION, "kind": "reference", "provenance": {}, "dtype": dtype,
                "dims": {f: dim for f in FEATURES}, "shards": urls, "files": files, "counts": counts,
                "samples": keys, "checksums": checksums, "data_digests": data_digests}
    with open(os.path.join(out, teacher_cache.MANIFEST), "w") as f:
        json.dump(manifest, f)
    return time.perf_counter() - start


def measure_rank(out, ranks, batch, repeats, image_bytes):
    """One rank: open, the shards it streams, batch look-ups (run in its own process)."""
    rss0 = rss_mb()
    start = time.perf_counter()
    cache = teacher_cache.TeacherCache(out)
    manifest_s = time.perf_counter() - start
    mine = cache.manifest["shards"][::ranks]
    start = time.perf_counter()
    for url in mine:
        shard = cache.shard(url)
        shard.row(shard.keys[0])
    shards_s = time.perf_counter() - start
    rss_open = grown(rss0)
    open_now = mine[-teacher_cache.OPEN_SHARDS:]  # what the open-shard limit keeps
    rng, times = random.Random(0), []
    for _ in range(repeats):
        samples = []
        for _ in range(batch):
            url = rng.choice(open_now)
            samples.append(sample(url, rng.choice(cache.shard(url).keys), image_bytes))
        start = time.perf_counter()
        rows = [cache.rows_of(cache.attach(s)) for s in samples]
        out_rows = [torch.stack(col) for col in zip(*rows)]
        times.append(time.perf_counter() - start)
    assert out_rows[0].shape == (batch, cache.manifest["dims"]["image_features"])
    return {"manifest_s": manifest_s, "rank_shards": len(mine), "shards_s": shards_s, "rss_open_mb": rss_open,
            "rss_after_lookups_mb": grown(rss0), "lookup_ms": 1e3 * sorted(times)[len(times) // 2]}


def measure_global(out):
    """Format 1's way: every key of every shard in one dict, per process."""
    rss0 = rss_mb()
    start = time.perf_counter()
    cache = teacher_cache.TeacherCache(out)
    index, shards = {}, []
    for p, url in enumerate(cache.manifest["shards"]):
        shard = teacher_cache.ShardRows(cache.file_of(url), FEATURES, cache._damaged)
        shards.append(shard)
        index.update({key: (p, row) for row, key in enumerate(shard.keys)})
    return {"global_s": time.perf_counter() - start, "global_rss_mb": grown(rss0), "global_keys": len(index)}


def child(what, out, a):
    cmd = [sys.executable, __file__, "--child", what, "--out", out, "--ranks", str(a.ranks), "--batch", str(a.batch),
           "--repeats", str(a.repeats), "--image-bytes", str(a.image_bytes)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="scratch folder (each cache is deleted after it is measured)")
    p.add_argument("--keys", type=int, default=2_900_000)
    p.add_argument("--per-shard", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512, help="d of the image and of the text features")
    p.add_argument("--dtypes", default="fp16,fp32")
    p.add_argument("--disk-gb", type=float, default=6.5, help="largest cache written")
    p.add_argument("--ranks", type=int, default=8, help="the measured rank streams 1 in RANKS shards")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20, help="batch look-ups timed (median)")
    p.add_argument("--image-bytes", type=int, default=30_000,
                   help="bytes of each sample's image that attach's digest reads (a 256 px JPEG: ~15-30 kB)")
    p.add_argument("--child", choices=("rank", "global"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_flush_denormal(True)
    if a.child:
        print(json.dumps(measure_rank(a.out, a.ranks, a.batch, a.repeats, a.image_bytes) if a.child == "rank"
                         else measure_global(a.out)))
        return
    rows = []
    for dtype in a.dtypes.split(","):
        row_bytes = 2 * a.dim * teacher_cache.DTYPES[dtype].itemsize
        fit = int(a.disk_gb * 1e9 // row_bytes) // a.per_shard * a.per_shard
        keys = min(a.keys, fit)
        out = os.path.join(a.out, dtype)
        shutil.rmtree(out, ignore_errors=True)
        write_s = write(out, keys, a.per_shard, a.dim, dtype, a.image_bytes)
        disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
        rows.append({"dtype": dtype, "keys": keys, "shards": -(-keys // a.per_shard), "write_s": write_s,
                     "bytes_per_sample": disk / keys, "disk_gb": disk / 1e9, **child("rank", out, a),
                     **child("global", out, a)})
        shutil.rmtree(out)
    print(f"{a.keys} keys requested, {a.per_shard} per shard, d = {a.dim} image + {a.dim} text, 1 rank of "
          f"{a.ranks}, batch {a.batch}, {a.image_bytes} image bytes per sample, open-shard limit {teacher_cache.OPEN_SHARDS}, warm page cache")
    print("| dtype | keys | shards | bytes / sample | disk (GB) | open: manifest (s) | open: the rank's shards (s) "
          "| RSS per rank: own + mapped file (MB) | look-up of a batch (ms) | global index: time (s) "
          "| global index: own RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rss, old = r["rss_after_lookups_mb"], r["global_rss_mb"]
        print(f"| {r['dtype']} | {r['keys']:,} | {r['shards']} | {r['bytes_per_sample']:.1f} | {r['disk_gb']:.2f} "
              f"| {r['manifest_s']:.3f} | {r['shards_s']:.2f} ({r['rank_shards']} shards) "
              f"| {rss['anon']:.0f} + {rss['file']:.0f} | {r['lookup_ms']:.2f} | {r['global_s']:.1f} "
              f"| {old['anon']:.0f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
