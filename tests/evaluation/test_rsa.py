"""RSA geometry score: invariances, a hand computation, the chunked computation, and a run on a real model."""
import logging
import math

import numpy as np
import pytest
import torch

from openclip_robust.demo.samples import photo_samples
from openclip_robust.evaluation import rsa
from openclip_robust.evaluation.suite import Run, evaluate_model, load_model


def embeddings(m=40, d=12, seed=0):
    return torch.randn(m, d, generator=torch.Generator().manual_seed(seed))


def full_matrix_rsa(a, b):
    """The definition, with whole M x M matrices in float64: Pearson of the RDMs' strict upper triangles."""
    def upper_rdm(x):
        x = x.double() / x.double().norm(dim=1, keepdim=True)
        i, j = np.triu_indices(len(x), 1)
        return (1 - x @ x.T).numpy()[i, j]
    return np.corrcoef(upper_rdm(a), upper_rdm(b))[0, 1]


def test_identical_embeddings_score_one():
    a = embeddings()
    assert rsa.rdm_correlation(a, a.clone()) == pytest.approx(1.0, abs=1e-12)


def test_a_common_rotation_and_rescaling_score_one():
    a = embeddings()
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(1)))
    scale = torch.rand(len(a), 1, generator=torch.Generator().manual_seed(2)) + 0.5  # cosine ignores norms
    assert rsa.rdm_correlation(a, (a @ rotation) * scale, block_size=7) == pytest.approx(1.0, abs=1e-6)


def test_added_noise_scores_strictly_lower_the_more_noise():
    a = embeddings()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(a.shape, generator=g)
    scores = [rsa.rdm_correlation(a, a + s * noise) for s in (0.0, 0.1, 0.5, 2.0)]
    assert scores[0] == pytest.approx(1.0, abs=1e-12)
    assert scores[0] > scores[1] > scores[2] > scores[3]


def test_equals_a_hand_computation_on_four_points():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, -1.0]])
    r = 1 / math.sqrt(2)
    # RDM = 1 - cos over pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    rdm_a = np.array([1, 1 - r, 1 - r, 1 - r, 1 + r, 1])
    rdm_b = np.array([1, 0, 1, 1, 2, 1])
    xa, xb = rdm_a - rdm_a.mean(), rdm_b - rdm_b.mean()
    expected = (xa @ xb) / math.sqrt((xa @ xa) * (xb @ xb))
    # on paper: centred RDM(b) = (0,-1,0,0,1,0), centred RDM(a) = r/3 * (1,-2,-2,-2,4,1), so
    # corr = 2r / sqrt(30 r^2 / 9 * 2) = sqrt(3/5)
    assert expected == pytest.approx(math.sqrt(3 / 5), abs=1e-12)
    for block in (1, 2, 3, 4, 512):  # the chunking must not change the value
        # the similarities are float32 (cos 45° to ~1e-8), so agreement to 1e-9 depended on the CPU's kernels
        assert rsa.rdm_correlation(a, b, block_size=block) == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("block", [1, 16, 99, 100, 101, 1000])
def test_chunked_computation_equals_the_full_matrices(block):
    a, b = embeddings(100, 8, seed=4), embeddings(100, 5, seed=5)  # dimensions may differ between models
    b[:50] += a[:50, :5]  # some shared structure
    assert rsa.rdm_correlation(a, b, block_size=block) == pytest.approx(full_matrix_rsa(a, b), abs=1e-6)  # fp32 cosines


def test_image_text_and_joint_scores():
    img_pre, txt_pre = embeddings(30, 8, 6), embeddings(30, 8, 7)
    img_ft = img_pre + 0.3 * embeddings(30, 8, 8)
    scores = rsa.rsa_scores(img_pre, txt_pre, img_ft, txt_pre)
    assert scores["text"] == pytest.approx(1.0)
    assert scores["image"] == pytest.approx(full_matrix_rsa(img_pre, img_ft), abs=1e-6)
    norm = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    joint = full_matrix_rsa(torch.cat([norm(img_pre), norm(txt_pre)]), torch.cat([norm(img_ft), norm(txt_pre)]))
    assert scores["joint"] == pytest.approx(joint, abs=1e-6) and scores["image"] < 1


def test_bad_input(caplog):
    a = embeddings(10, 4)
    with pytest.raises(ValueError, match="same samples under both models: 10 vs 5"):
        rsa.rdm_correlation(a, a[:5])
    with pytest.raises(ValueError, match="at least 3 points"):
        rsa.rdm_correlation(a[:2], a[:2])
    with pytest.raises(ValueError, match="all four inputs"):
        rsa.rsa_scores(a, a, a, a[:9])
    with caplog.at_level(logging.WARNING):
        assert math.isnan(rsa.rdm_correlation(torch.ones(5, 3), a[:5]))
    assert "constant" in caplog.text


@pytest.fixture
def photo_runs(tmp_path, tiny_model_dir):
    """A folder of real photos (x.png + x.txt, every third with a second caption line) and three Runs."""
    (tmp_path / "photos").mkdir()
    for i, sample in enumerate(photo_samples(40)):
        (tmp_path / "photos" / f"{i}.png").write_bytes(sample["png"])
        (tmp_path / "photos" / f"{i}.txt").write_text(sample["txt"] + ("\nanother caption" if i % 3 == 0 else ""))
    sd = torch.load(f"{tiny_model_dir}/open_clip_pytorch_model.bin")
    g = torch.Generator().manual_seed(0)
    moved = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({"state_dict": moved}, tmp_path / "moved.pt")
    torch.save({"state_dict": sd}, tmp_path / "same.pt")
    model = f"local-dir:{tiny_model_dir}"
    return tmp_path / "photos", [Run("pre", model), Run("same", model, str(tmp_path / "same.pt")),
                                 Run("moved", model, str(tmp_path / "moved.pt"))]


def test_rsa_runs_on_a_real_model_and_image_caption_folder(photo_runs):
    photos, (pre, *runs) = photo_runs
    scores = rsa.rsa_runs(pre, runs, str(photos), max_samples=30, block_size=16)
    assert scores["pre"] == {"image": 1.0, "text": 1.0, "joint": 1.0}
    assert scores["same"] == pytest.approx({"image": 1.0, "text": 1.0, "joint": 1.0}, abs=1e-6)
    assert all(-1 <= v < 0.9999 for v in scores["moved"].values())


def test_one_evaluation_pass_gives_rsa_runs_scores(photo_runs):
    """evaluate_model(embeddings=...) keeps the retrieval pairs RSA needs: the same scores, no second pass."""
    photos, (pre, _, moved) = photo_runs
    suite = {"datasets": [{"name": "photos", "role": "retrieval", "path": str(photos), "max_samples": 30}]}
    kept = {}
    for run in (pre, moved):
        model, preprocess, tokenizer = load_model(run.model, run.checkpoint)
        kept[run.name] = {}
        res = evaluate_model(model, preprocess, tokenizer, suite, embeddings=kept[run.name])
        image, text = kept[run.name]["photos"]
        assert image.shape == text.shape == (30, image.shape[1])  # first caption per image only
        assert res["datasets"]["photos"]["n_captions"] == 30 + 10
    expected = rsa.rsa_runs(pre, [moved], str(photos), max_samples=30, block_size=16)["moved"]
    assert rsa.rsa_scores(*kept["pre"]["photos"], *kept["moved"]["photos"]) == pytest.approx(expected, abs=1e-6)
