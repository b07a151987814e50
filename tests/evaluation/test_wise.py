"""WiSE-FT weight interpolation: endpoints, the mean, integer buffers, the choice of a, loading, bad input."""
import open_clip
import pytest
import torch
from open_clip.model import CLIP

from openclip_robust.demo.samples import TINY_CFG
from openclip_robust.evaluation import wise


def state_dicts():
    pre = {"w": torch.tensor([0.0, 2.0, -1.0]), "h": torch.tensor([1.0, 5.0], dtype=torch.float16),
           "b": torch.tensor([0.25], dtype=torch.bfloat16), "steps": torch.tensor(3), "mask": torch.tensor([True])}
    ft = {"module.w": torch.tensor([4.0, 6.0, 1.0]), "module.h": torch.tensor([3.0, 1.0], dtype=torch.float16),
          "module.b": torch.tensor([0.75], dtype=torch.bfloat16), "module.steps": torch.tensor(3),
          "module.mask": torch.tensor([True])}
    return pre, ft


def test_endpoints_and_the_mean():
    pre, ft = state_dicts()
    at0, at1, mid = (wise.interpolate_state_dicts(pre, ft, a) for a in (0.0, 1.0, 0.5))
    for key in ("w", "h", "b"):
        assert torch.equal(at0[key], pre[key]) and at0[key].dtype == pre[key].dtype
        assert torch.equal(at1[key], ft[f"module.{key}"])
        assert torch.equal(mid[key], ((pre[key].double() + ft[f"module.{key}"].double()) / 2).to(pre[key].dtype))
    assert mid["w"].tolist() == [2.0, 4.0, 0.0] and mid["h"].tolist() == [2.0, 3.0] and mid["b"].item() == 0.5
    assert wise.interpolate_state_dicts(pre, ft, 0.25)["w"].tolist() == [1.0, 3.0, -0.5]


def test_integer_and_bool_buffers_are_not_averaged():
    pre, ft = state_dicts()
    ft["module.steps"] = torch.tensor(7)
    mid = wise.interpolate_state_dicts(pre, ft, 0.5)
    assert mid["steps"].item() == 7 and mid["steps"].dtype == torch.int64  # copied, never (3 + 7) / 2
    assert mid["mask"].dtype == torch.bool and mid["mask"].item() is True


def test_mismatched_architectures_are_refused_naming_the_key(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="'b' has shape \\(2,\\) pre-trained vs \\(3,\\) fine-tuned"):
        wise.interpolate_state_dicts({"b": torch.zeros(2)}, {"b": torch.zeros(3)}, 0.5)
    with pytest.raises(ValueError, match="key 'c' missing from the fine-tuned model"):
        wise.interpolate_state_dicts({"c": torch.zeros(1)}, {"d": torch.zeros(1)}, 0.5)
    wider = dict(TINY_CFG, embed_dim=48)  # another architecture
    torch.save({"state_dict": CLIP(**wider).state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="different architectures.*has shape"):
        wise.wise_ft(f"local-dir:{tiny_model_dir}", str(tmp_path / "other.pt"), [0.5], out=str(tmp_path / "w.pt"))
    assert not (tmp_path / "w.pt").exists()


def test_bad_alphas(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="alphas must be in \\[0, 1\\]"):
        wise.wise_ft(f"local-dir:{tiny_model_dir}", "unused.pt", [0.5, 1.5])
    with pytest.raises(ValueError, match="several alphas need a suite"):
        wise.wise_ft(f"local-dir:{tiny_model_dir}", "unused.pt", [0.2, 0.8])


def finetuned(tiny_model_dir, path, shift=1.0):
    sd = torch.load(f"{tiny_model_dir}/open_clip_pytorch_model.bin")
    ft = {f"module.{k}": v + shift if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({"state_dict": ft, "epoch": 2, "name": "ft"}, path)
    return sd


def test_alpha_is_chosen_on_the_id_role_and_the_checkpoint_loads_in_plain_open_clip(tmp_path, tiny_model_dir,
                                                                                      monkeypatch):
    pre = finetuned(tiny_model_dir, tmp_path / "ft.pt")
    seen = []

    def id_score_peaking_at_a_0_3(model, preprocess, tokenizer, suite, *args, roles=None, **kwargs):
        a = float(model.logit_scale) - float(pre["logit_scale"])  # logit_scale moved by a * 1.0
        seen.append((round(a, 4), roles))
        return {"roles": {"id": -abs(a - 0.3)}}
    monkeypatch.setattr(wise, "evaluate_model", id_score_peaking_at_a_0_3)  # the name wise_ft calls
    res = wise.wise_ft(f"local-dir:{tiny_model_dir}", str(tmp_path / "ft.pt"), [0.1, 0.3, 0.5, 0.9],
                       out=str(tmp_path / "out" / "wise.pt"), suite="suite.json")
    assert res["alpha"] == 0.3 and [a for a, _ in seen] == [0.1, 0.3, 0.5, 0.9]
    assert all(roles == ("id",) for _, roles in seen)  # only the ID role is evaluated
    assert res["id_scores"][0.9] == pytest.approx(-0.6)

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_model_dir}")
    open_clip.load_checkpoint(model, str(tmp_path / "out" / "wise.pt"))  # strict: every key fits
    for key, value in model.state_dict().items():
        expected = pre[key] + 0.3 if pre[key].is_floating_point() else pre[key]
        assert torch.allclose(value, expected, atol=1e-6), key
    saved = torch.load(tmp_path / "out" / "wise.pt")
    assert saved["wise"]["alpha"] == 0.3 and set(saved["wise"]["id_scores"]) == {"0.1", "0.3", "0.5", "0.9"}


def test_a_single_alpha_needs_no_suite(tmp_path, tiny_model_dir):
    pre = finetuned(tiny_model_dir, tmp_path / "ft.pt", shift=2.0)
    res = wise.wise_ft(f"local-dir:{tiny_model_dir}", str(tmp_path / "ft.pt"), [0.25], out=str(tmp_path / "w.pt"))
    assert res["alpha"] == 0.25 and res["id_scores"] == {}
    assert torch.allclose(res["state_dict"]["logit_scale"], pre["logit_scale"] + 0.5)
