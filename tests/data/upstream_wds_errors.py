"""Reads upstream's own webdataset loader (`get_wds_dataset`, with patch 0004's --wds-max-consecutive-errors)
over the shards named on the command line and prints, as JSON, how many batches came and the error if one
was raised. A script, so each upstream line's venv can run it: tests/data/test_probe.py (release) and
tests/main/ (main)."""
import json
import sys
from types import SimpleNamespace

import torch
from open_clip_train.data import get_wds_dataset


def read(spec, limit, batches):
    args = SimpleNamespace(train_data=spec, train_num_samples=64, dataset_resampled=True, seed=0, workers=0,
                           world_size=1, batch_size=2, train_data_upsampling_factors=None,
                           wds_max_consecutive_errors=limit)
    loader = get_wds_dataset(args, lambda image: torch.zeros(3, 4, 4), is_train=True,
                             tokenizer=lambda text, **_: torch.zeros(1, 4, dtype=torch.long)).dataloader
    got, error = 0, None
    try:
        for _ in zip(range(batches), loader):
            got += 1
    except RuntimeError as e:
        error = str(e)
    return {"batches": got, "error": error}


if __name__ == "__main__":
    print(json.dumps(read(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
