"""The prompt-learning methods' few-shot set: exactly K per class, seeded; too few images is an error."""
import pytest

from openclip_robust.data.few_shot import sample_k_shots, scan_classes
from openclip_robust.data.shards import shard_list
from openclip_robust.demo.samples import DIGITS


def test_k_shot_exact_seeded_and_short_class_error(target_shards):
    rows = scan_classes(shard_list(target_shards))
    labels = [r[2] for r in rows]
    assert len(rows) == 64
    a, b, c = (sample_k_shots(labels, 2, s, DIGITS) for s in (0, 0, 1))
    assert sorted(labels[i] for i in a) == sorted(list(range(10)) * 2)
    assert a == b and a != c
    smallest = min(range(10), key=labels.count)
    with pytest.raises(ValueError, match=f"'{DIGITS[smallest]}' \\({labels.count(smallest)}\\)"):
        sample_k_shots(labels, labels.count(smallest) + 1, 0, DIGITS)


# -- through upstream's loop ---------------------------------------------------------------------------
