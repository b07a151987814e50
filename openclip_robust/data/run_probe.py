"""The probe of a run's data before step 1 (data/probe.py): the reference stream, and with a robust
loss the target webdataset shards, each read through the stages its training loader decodes with."""
import webdataset as wds
from open_clip_train.data import expand_urls

from openclip_robust.data.image_only import is_webdataset
from openclip_robust.data.probe import probe_stream, raise_on_any_rank
from openclip_robust.data.reference import sample_stages
from openclip_robust.data.shard_format import IMAGE_KEYS, decode_sample


def image_stages(preprocess):
    def stages(handler):
        return [wds.map(decode_sample, handler=handler), wds.rename(image=IMAGE_KEYS),
                wds.map_dict(image=preprocess, handler=handler)]
    return stages


def check_run_data(args, method, ref_urls, preprocess_fns, tokenizer):
    """Probe on this rank, then raise DataError on every rank if any rank's data is unusable."""
    preprocess_train, preprocess_val = preprocess_fns
    errors = []
    timeout = args.data_probe_timeout
    if method.needs_reference and ref_urls:
        errors.append(probe_stream("--ref-data", ref_urls, lambda h: sample_stages(preprocess_val, tokenizer, h),
                                   rank=args.rank, timeout_s=timeout))
    if method.target_samples and args.train_data and is_webdataset(args):
        urls, _ = expand_urls(args.train_data)
        captions = method.target_samples == "image+caption"
        stages = (lambda h: sample_stages(preprocess_train, tokenizer, h)) if captions else image_stages(preprocess_train)
        errors.append(probe_stream("--train-data", urls, stages, need_caption=captions, rank=args.rank,
                                   timeout_s=timeout))
    raise_on_any_rank(errors)
