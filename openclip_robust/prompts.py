"""Learnable text prompts at the text encoder's input: CoOp's context and ContCoOp's class-conditioned context.

ContCoOp (seed 004, Eq. 1): a learnable context p ∈ R^{N×D} and one single-head attention layer over
X = [p, c_i] (c_i: the token embeddings of class i's name); p(c_i) = p + O[:N] with
O = Softmax(QKᵀ/√D)·V·W_O, and the class weight w_i = T([SOS, p(c_i), c_i, ".", EOS]). Without the
attention layer this is CoOp's unified context. The module holds only p and the attention weights plus a
description of the token space (tokenizer, vocabulary size, embedding width); class-name embeddings are
read from whichever model the module is inserted into, which is what lets it follow an upgraded model.

Both open_clip families are supported: ``CLIP`` (token_embedding, positional_embedding, transformer,
ln_final, text_projection on the model), ``CustomTextCLIP`` with open_clip's ``TextTransformer`` under
``model.text``, and ``CustomTextCLIP`` with an HF tower (fed ``inputs_embeds``).
"""
import hashlib
import math

import torch
import torch.nn.functional as F
from open_clip.hf_model import HFTextEncoder
from open_clip.transformer import TextTransformer, text_global_pool
from torch import nn
from torch.utils.checkpoint import checkpoint

from openclip_robust.untrusted import torch_load

FORMAT = "openclip-robust/prompt-module/1"
PLACEHOLDER = "X"  # CoOp's placeholder word: one token per context slot, replaced by the context


def unwrap(model):
    return model.module if hasattr(model, "module") else model


# -- text towers -------------------------------------------------------------------------------------
class TextTower:
    """Runs a frozen text tower from token embeddings instead of token ids."""

    def __init__(self, model):
        model = unwrap(model)
        text = getattr(model, "text", None)
        if isinstance(text, HFTextEncoder):
            self.kind, self.owner = "hf", text
            self.embedding = text.transformer.get_input_embeddings()
        elif isinstance(text, TextTransformer) or hasattr(model, "token_embedding"):
            self.kind, self.owner = "clip", text if text is not None else model
            if getattr(self.owner, "cls_emb", None) is not None:
                raise ValueError("prompt learning: text towers with an appended CLS token (CoCa) are not supported")
            self.embedding = self.owner.token_embedding
        else:
            raise ValueError(f"prompt learning: {type(model).__name__} has no text tower this module knows "
                             f"(open_clip CLIP, CustomTextCLIP with TextTransformer or an HF tower)")

    @property
    def width(self):
        return self.embedding.weight.shape[1]

    @property
    def vocab_size(self):
        return self.embedding.weight.shape[0]

    def embed(self, tokens):
        return self.embedding(tokens)

    def encode(self, embeds, tokens):
        """Unnormalised text features of token embeddings [B, L, D]; `tokens` give masks and pooling."""
        t = self.owner
        if self.kind == "hf":
            mask = (tokens != t.config.pad_token_id).long()
            out = t.transformer(inputs_embeds=embeds, attention_mask=mask)
            return t.proj(t.pooler(out, mask))
        cast = t.transformer.get_cast_dtype()
        x = embeds.to(cast) + t.positional_embedding[:embeds.shape[1]].to(cast)
        attn_mask = t.attn_mask
        if getattr(t, "use_pad_mask", False):  # TextTransformer with a padding mask
            add = t._build_additive_mask(tokens, tokens.shape[1], x.dtype)
            attn_mask = add if attn_mask is None else attn_mask[:tokens.shape[1], :tokens.shape[1]].unsqueeze(0) + add
        x = t.ln_final(t.transformer(x, attn_mask=attn_mask))
        pool = getattr(t, "pool_type", None) or getattr(t, "text_pool_type", "argmax")
        eos = getattr(t, "eos_id", None) if hasattr(t, "pool_type") else getattr(t, "text_eos_id", None)
        x = text_global_pool(x, tokens, pool, eos_token_id=eos)
        if t.text_projection is not None:
            x = t.text_projection(x) if isinstance(t.text_projection, nn.Linear) else x @ t.text_projection
        return x


# -- token space ---------------------------------------------------------------------------------------
def _vocab(tokenizer):
    if hasattr(tokenizer, "encoder") and isinstance(tokenizer.encoder, dict):  # open_clip SimpleTokenizer
        return "openai-clip-bpe", tokenizer.encoder
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "get_vocab"):  # open_clip HFTokenizer
        where = str(getattr(inner, "name_or_path", "")).rstrip("/").split("/")[-1]
        return f"{type(inner).__name__}:{where}", inner.get_vocab()
    raise ValueError(f"prompt learning: cannot read the vocabulary of tokenizer {type(tokenizer).__name__}")


def token_space(model, tokenizer):
    """What a prompt module depends on: tokenizer (name + vocabulary hash), vocabulary size, embedding width."""
    name, vocab = _vocab(tokenizer)
    digest = hashlib.sha256("\n".join(f"{k}\t{v}" for k, v in sorted(vocab.items(), key=lambda kv: kv[1]))
                            .encode("utf-8")).hexdigest()[:16]
    tower = TextTower(model)
    return {"tokenizer": name, "vocab_sha256": digest, "vocab_size": tower.vocab_size, "width": tower.width}


def check_token_space(expected, actual, where="the model"):
    keys = ("width", "vocab_size", "vocab_sha256")
    if any(expected[k] != actual[k] for k in keys):
        show = lambda s: f"tokenizer {s['tokenizer']} (vocab {s['vocab_sha256']}), vocab size {s['vocab_size']}, width {s['width']}"
        raise ValueError(f"prompt module token space differs from {where}'s: module has {show(expected)}; "
                         f"{where} has {show(actual)}. A prompt module only works in a model with the same "
                         f"tokenizer, vocabulary and embedding width")


# -- class prompts (frozen, per model and class list) -------------------------------------------------
class ClassPrompts:
    """Token ids and frozen token embeddings of "X ... X {name}." for every class, and the name embeddings."""

    def __init__(self, tower, tokenizer, classnames, n_ctx, device="cpu"):
        self.classnames, self.n_ctx = list(classnames), n_ctx
        pad = int(tokenizer([""])[0, -1])  # "" → start, end, then padding
        prefix = " ".join([PLACEHOLDER] * n_ctx)
        tokens = tokenizer([f"{prefix} {c}." for c in classnames]).to(device)
        lengths = (tokens != pad).sum(1)
        name_len = (tokenizer(list(classnames)) != pad).sum(1).to(device) - 2
        placeholder = tokens[0, 1]
        for i, c in enumerate(classnames):
            if lengths[i] >= tokens.shape[1]:
                raise ValueError(f"class name {c!r} with {n_ctx} context tokens does not fit the context "
                                 f"length {tokens.shape[1]}: shorten it or lower --prompt-n-ctx")
            if lengths[i] - n_ctx - 3 != name_len[i] or not bool((tokens[i, 1:n_ctx + 1] == placeholder).all()):
                raise ValueError(f"class name {c!r}: its prompt does not tokenize as start, {n_ctx} context "
                                 f"tokens, the name, '.', end (tokenizer {type(tokenizer).__name__})")
        self.tokens, self.tower = tokens, tower
        longest = int(name_len.max())
        name_tokens = torch.zeros(len(classnames), longest, dtype=tokens.dtype, device=device)
        self.name_mask = torch.zeros(len(classnames), longest, dtype=torch.bool, device=device)
        for i, n in enumerate(name_len.tolist()):
            name_tokens[i, :n] = tokens[i, n_ctx + 1:n_ctx + 1 + n]
            self.name_mask[i, :n] = True
        with torch.no_grad():  # the names only ([C, longest name, D]): full prompts are embedded per chunk
            self.names = tower.embed(name_tokens).detach()

    def embeds(self, ids):
        """Frozen token embeddings [len(ids), L, D] of those classes' prompts."""
        with torch.no_grad():
            return self.tower.embed(self.tokens[ids]).detach()

    def __len__(self):
        return len(self.classnames)


# -- the module --------------------------------------------------------------------------------------
class PromptModule(nn.Module):
    """Context p [N, D] and, for ContCoOp, one single-head attention layer (no biases)."""

    def __init__(self, n_ctx, width, attention=True, token_space=None, init_text=None, ctx_init=None):
        super().__init__()
        self.token_space = dict(token_space or {})
        self.init_text = init_text
        ctx = torch.empty(n_ctx, width)
        if ctx_init is None:
            nn.init.normal_(ctx, std=0.02)  # CoOp's random init
        else:
            ctx.copy_(ctx_init)
        self.ctx = nn.Parameter(ctx)
        self.attention = attention
        if attention:  # nn.Linear's default init is Kaiming (uniform), as the paper states
            self.q, self.k, self.v, self.o = (nn.Linear(width, width, bias=False) for _ in range(4))

    @property
    def n_ctx(self):
        return self.ctx.shape[0]

    def contexts(self, names, name_mask):
        """Per-class contexts [C, N, D] from name embeddings [C, L, D] (padded; name_mask marks real tokens)."""
        ctx = self.ctx.to(names.dtype)
        c, n, d = names.shape[0], self.n_ctx, ctx.shape[1]
        if not self.attention:
            return ctx.expand(c, n, d)
        x = torch.cat([ctx.expand(c, n, d), names], dim=1)                    # X = [p, c_i]
        keep = torch.cat([name_mask.new_ones(c, n), name_mask], dim=1)
        scores = self.q(ctx) @ self.k(x).transpose(1, 2) / math.sqrt(d)      # queries of p only: O[:N]
        attn = scores.masked_fill(~keep[:, None, :], float("-inf")).softmax(-1)
        return ctx + self.o(attn @ self.v(x))

    # -- file -----------------------------------------------------------------------------------------
    def save(self, path, **extra):
        torch.save({"format": FORMAT, "n_ctx": self.n_ctx, "width": self.ctx.shape[1], "attention": self.attention,
                    "token_space": self.token_space, "init_text": self.init_text,
                    "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}, **extra}, path)

    @classmethod
    def load(cls, path, map_location="cpu"):
        blob = torch_load(path, map_location=map_location)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ValueError(f"{path} is not a prompt module file ({FORMAT})")
        module = cls(blob["n_ctx"], blob["width"], blob["attention"], blob["token_space"], blob["init_text"])
        module.load_state_dict(blob["state_dict"])
        return module

    def check(self, model, tokenizer, where="the model"):
        check_token_space(self.token_space, token_space(model, tokenizer), where)


def class_weights(module, tower, prompts, chunk=256, classes=None):
    """L2-normalised class weights [C, E]: T([SOS, p(c_i), c_i, ".", EOS]) for every class, `chunk` at a time.

    Memory: the full prompts are embedded per chunk, so what is held for all C classes is the token ids
    [C, L], the name embeddings [C, longest name, D] and the output [C, E]. Under autograd with more
    than one chunk, each chunk runs inside activation checkpointing: only one chunk's text-tower activations (chunk × L × width per
    layer) are alive at once, forward and backward; the backward recomputes them (one extra text forward).
    """
    idx = torch.arange(len(prompts), device=prompts.tokens.device) if classes is None else classes
    n = module.n_ctx

    def run(ids, *params):
        ctx = module.contexts(prompts.names[ids], prompts.name_mask[ids])
        e = prompts.embeds(ids)
        x = torch.cat([e[:, :1], ctx.to(e.dtype), e[:, n + 1:]], dim=1)
        return tower.encode(x, prompts.tokens[ids])

    out, chunks = [], idx.split(chunk)
    for ids in chunks:
        if torch.is_grad_enabled() and len(chunks) > 1:  # one chunk: nothing to save by recomputing
            out.append(checkpoint(run, ids, *module.parameters(), use_reentrant=False))
        else:
            out.append(run(ids))
    return F.normalize(torch.cat(out).float(), dim=-1)


@torch.no_grad()
def zeroshot_weights(tower, tokenizer, classnames, template="a photo of a {c}.", chunk=256, device="cpu"):
    """Normalised weights of one hand-written template per class (KgCoOp's w_zs), chunked."""
    tokens = tokenizer([template.format(c=c) for c in classnames]).to(device)
    return F.normalize(torch.cat([tower.encode(tower.embed(t), t) for t in tokens.split(chunk)]).float(), dim=-1)
