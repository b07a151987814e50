"""The webdataset sample format read in one place: tar grouping, image keys, local URLs."""
import io
import tarfile

from openclip_robust.data.reference import first_sample_ok
from openclip_robust.data.shard_format import IMAGE_KEYS, has_image, image_of, is_local, tar_samples


def write_tar(path, names):
    with tarfile.open(path, "w") as tar:
        for name in names:
            if name.endswith("/"):
                info = tarfile.TarInfo(name.rstrip("/"))
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    return path


def test_tar_samples_groups_consecutive_members_by_path_before_the_first_dot(tmp_path):
    path = write_tar(tmp_path / "s.tar", ["a.jpg", "a.TXT", "a.seg.png", "sub/", "sub/a.png", "b.txt", "a.cls"])
    with tarfile.open(path) as tar:
        got = [(key, sorted(exts)) for key, exts in tar_samples(tar)]
    # the same base in another folder is another sample; a key seen again later starts a new sample
    assert got == [("a", ["jpg", "seg.png", "txt"]), ("sub/a", ["png"]), ("b", ["txt"]), ("a", ["cls"])]


def test_image_keys_follow_upstreams_order():
    assert IMAGE_KEYS == "jpg;png;jpeg;webp"
    assert image_of({"webp": 1, "png": 2, "txt": 3}) == 2
    assert image_of({"txt": 3}) is None
    assert has_image({"jpeg": 0}) and not has_image({"txt": 0, "cls": 1})


def test_is_local():
    assert is_local("/data/000.tar") and is_local("shards/{000..009}.tar")
    assert not is_local("s3://bucket/000.tar") and not is_local("pipe:curl -s http://x/0.tar")


def test_first_sample_ok_reads_only_the_first_sample(tmp_path):
    assert first_sample_ok(write_tar(tmp_path / "ok.tar", ["x.webp", "x.txt", "y.cls"]))
    assert not first_sample_ok(write_tar(tmp_path / "notxt.tar", ["x.png", "y.txt"]))
    assert not first_sample_ok(write_tar(tmp_path / "dirs.tar", ["x/", "x/a.png", "a.txt"]))
    (tmp_path / "bad.tar").write_bytes(b"not a tar")
    assert not first_sample_ok(tmp_path / "bad.tar")
