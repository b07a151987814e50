"""A shard never runs code and never trains on silently wrong data: only image and caption members are decoded
(a .pyd/.pickle member stays bytes), 16-bit images are scaled (not clipped to white), 32-bit and non-raster
images are refused, blank captions count as missing. Checked in the plugin's stages and in upstream's own
--train-data loader (patch 0007)."""
import io
import os
import pickle
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from openclip_robust.data.probe import FailureGuard, probe_stream
from openclip_robust.data.reference import sample_stages
from openclip_robust.data.shard_format import decode_image, decode_sample, has_caption
from tests.data.test_probe import bounded


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def png(array, mode=None):
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG") if mode else Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, samples):
    """samples: [{ext: bytes}]; keys s00000..; members written in the order given."""
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(samples):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


GREY16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)  # 0 .. 61380: a 16-bit gradient


def test_a_16_bit_png_is_scaled_not_clipped_to_white():
    img = np.asarray(decode_image(png(GREY16)))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert np.array_equal(img[..., 0], (GREY16 >> 8).astype(np.uint8))  # by hand: the top 8 bits
    assert (img == 255).mean() < 0.01   # PIL's own convert("RGB") gives 99.6% white here
    # 8-bit images are PIL's convert("RGB") unchanged
    rgb = (np.arange(16 * 16 * 3) % 256).astype(np.uint8).reshape(16, 16, 3)
    assert np.array_equal(np.asarray(decode_image(png(rgb))), rgb)


def test_32_bit_and_non_raster_images_are_refused():
    buf = io.BytesIO()
    Image.fromarray(np.ones((8, 8), np.float32) * 3.5, "F").save(buf, format="TIFF")
    with pytest.raises(ValueError, match="32-bit float image"):
        decode_image(buf.getvalue())
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # PIL would hand it to Ghostscript
    with pytest.raises(Exception, match="cannot identify image file"):
        decode_image(eps)


def test_blank_captions_are_no_captions():
    assert not has_caption({"txt": b"  \n\t"}) and not has_caption({"txt": b""}) and not has_caption({})
    assert has_caption({"txt": b" a dog "})


def crafted_shard(tmp_path, marker, n=8):
    rgb = np.full((16, 16, 3), 120, np.uint8)
    return write_tar(tmp_path / "evil.tar", [{"jpg": png(rgb), "txt": b"a photo of a dog",
                                               "pyd": pickle.dumps(Payload(marker)),
                                               "pickle": pickle.dumps(Payload(marker))} for _ in range(n)])


def test_the_plugins_stages_never_unpickle_a_member(tmp_path, tiny_model_dir):
    import webdataset as wds
    from open_clip import create_model_and_transforms, get_tokenizer
    _, _, preprocess = create_model_and_transforms(f"local-dir:{tiny_model_dir}")
    tokenizer = get_tokenizer(f"local-dir:{tiny_model_dir}")
    marker = tmp_path / "pwned"
    url = crafted_shard(tmp_path, marker)
    seen = []
    with bounded(60):
        for s in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(),
                                  *sample_stages(preprocess, tokenizer, wds.reraise_exception)):
            seen.append(s)
        assert probe_stream("--ref-data", [url], lambda h: sample_stages(preprocess, tokenizer, h)) is None
    assert len(seen) == 8 and isinstance(seen[0]["pyd"], bytes) and seen[0]["image"].shape[0] == 3
    assert not marker.exists()
    assert decode_sample({"__key__": "k", "pickle": b"\x80\x04K\x01."})["pickle"] == b"\x80\x04K\x01."


def upstream_loader(url, preprocess):
    from open_clip_train.data import get_wds_dataset
    args = SimpleNamespace(train_data=url, train_num_samples=8, dataset_resampled=False, seed=0, workers=0,
                           world_size=1, batch_size=2, train_data_upsampling_factors=None,
                           wds_max_consecutive_errors=0)
    return get_wds_dataset(args, preprocess, is_train=True,
                           tokenizer=lambda text, **_: torch.tensor([[len(text.strip())]])).dataloader


def test_upstreams_train_loader_never_unpickles_a_member(tmp_path):
    marker = tmp_path / "pwned"
    loader = upstream_loader(crafted_shard(tmp_path, marker), lambda image: torch.zeros(1))
    with bounded(60):
        batches = list(loader)
    assert len(batches) == 4 and not marker.exists()


def test_upstreams_train_loader_scales_16_bit_images_and_skips_blank_captions(tmp_path, caplog):
    samples = [{"png": png(GREY16), "txt": b"a gradient"}, {"png": png(GREY16), "txt": b"   "}] * 4
    url = write_tar(tmp_path / "mixed.tar", samples)
    loader = upstream_loader(url, lambda image: torch.from_numpy(np.asarray(image).copy()))
    with bounded(60), caplog.at_level("WARNING"):
        batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    texts = torch.cat([b[1] for b in batches])
    assert len(images) == 8                                   # --train-num-samples, from the captioned half
    assert (texts == len("a gradient")).all()                 # no blank caption reached the tokenizer
    assert np.array_equal(images[0, ..., 0].numpy(), (GREY16 >> 8).astype(np.uint8))
    assert "has no image or no caption" in caplog.text        # and the skips were logged


def test_the_guard_counts_blank_captions_as_failures():
    guard = FailureGuard("--ref-data", limit=3)
    sample = {"__key__": "k", "__url__": "u.tar", "jpg": b"x", "txt": b" "}
    assert guard.keep(sample) is False and guard.missing_caption == 1
    guard.keep(sample)
    with pytest.raises(Exception, match="--ref-data: 3 samples or shards in a row failed.*blank"):
        guard.keep(sample)


def test_the_probe_refuses_blank_captions_naming_the_flag_and_shard(tmp_path, tiny_model_dir):
    from open_clip import create_model_and_transforms, get_tokenizer
    _, _, preprocess = create_model_and_transforms(f"local-dir:{tiny_model_dir}")
    tokenizer = get_tokenizer(f"local-dir:{tiny_model_dir}")
    rgb = np.full((16, 16, 3), 9, np.uint8)
    url = write_tar(tmp_path / "blank.tar", [{"jpg": png(rgb), "txt": b" \n"} for _ in range(6)])
    with bounded(60):
        error = probe_stream("--ref-data", [url], lambda h: sample_stages(preprocess, tokenizer, h))
    assert error.startswith(f"--ref-data: no usable sample in {url}: 6 samples without a caption (.txt missing "
                            f"or blank)")
