#!/usr/bin/env python3
"""Loads restored fine-tunes with Hugging Face transformers, as a user would.

usage: check-hf-load.py UDELTA_BINARY MINILM_DIR WORK_DIR

For the real MiniLM pair (MINILM_DIR/base, MINILM_DIR/ft, fetched by scripts/fetch-minilm.sh)
and for a tiny LLaMA made here (sharded, with an added token, a chat template and generation
settings of its own), compresses the fine-tuned directory against the base with udelta-gpu,
decompresses it, and checks that AutoModel / AutoTokenizer (and GenerationConfig) load the
restored directory as they load the fine-tune: same config, same tensor names, shapes and
dtypes, same tokenization, same chat template, and outputs close to the fine-tune's.
Exits non-zero on any difference. Needs torch and transformers (see .ci/run).
"""
import json
import os
import subprocess
import sys

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer, GenerationConfig

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "udelta restores <tool> calls"]


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def round_trip(udelta, base, ft, work, name):
    """compress + decompress; returns the restored directory."""
    packed = os.path.join(work, name + ".udelta")
    restored = os.path.join(work, name + "-restored")
    run(udelta, "compress", "--base", base, "--finetuned", ft, "-o", packed,
        "--adapter", "cpu", "--sparsity", "0.9", "-q", "--force", "--json")
    run(udelta, "decompress", packed, "--base", base, "-o", restored, "-q", "--force")
    return restored


def fail(name, what):
    sys.exit(f"{name}: {what}")


def compare_models(name, ft, restored, min_cosine):
    """Same config and state-dict layout; hidden states close to the fine-tune's."""
    config = lambda d: {k: v for k, v in AutoConfig.from_pretrained(d).to_dict().items()
                        if k != "_name_or_path"}  # the directory's own path
    if config(ft) != config(restored):
        fail(name, "configs differ")
    a = AutoModel.from_pretrained(ft).eval()
    b = AutoModel.from_pretrained(restored).eval()
    sa, sb = a.state_dict(), b.state_dict()
    layout = lambda sd: {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    if layout(sa) != layout(sb):
        fail(name, "tensor names, shapes or dtypes differ")
    exact = sum(torch.equal(sa[k], sb[k]) for k in sa)
    tok = AutoTokenizer.from_pretrained(restored)
    batch = tok(SENTENCES, return_tensors="pt", padding=True)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ha = a(**batch).last_hidden_state.flatten()
        hb = b(**batch).last_hidden_state.flatten()
    cos = torch.nn.functional.cosine_similarity(ha, hb, dim=0).item()
    print(f"{name}: {len(sa)} tensors ({exact} bit-identical), hidden-state cosine {cos:.4f}")
    if not cos >= min_cosine:
        fail(name, f"hidden states far from the fine-tune's (cosine {cos:.4f} < {min_cosine})")


def compare_tokenizers(name, ft, restored):
    a, b = AutoTokenizer.from_pretrained(ft), AutoTokenizer.from_pretrained(restored)
    if type(a) is not type(b) or len(a) != len(b):
        fail(name, f"tokenizers differ: {type(a).__name__}/{len(a)} vs {type(b).__name__}/{len(b)}")
    for s in SENTENCES:
        if a(s)["input_ids"] != b(s)["input_ids"]:
            fail(name, f"tokenization of {s!r} differs")
    if a.chat_template != b.chat_template:
        fail(name, "chat templates differ")


def tiny_llama(work):
    """A sharded tiny LLaMA base and a fine-tune with an added token, its own chat template
    and generation settings."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w.strip(".").lower() for s in SENTENCES for w in s.split()} - {"<tool>"})
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    base, ft = os.path.join(work, "llama-base"), os.path.join(work, "llama-ft")
    model.save_pretrained(base, max_shard_size="100KB")
    tok.save_pretrained(base)
    GenerationConfig(temperature=0.6, do_sample=True).save_pretrained(base)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("proj.weight"):
                p.add_(0.002 * torch.randn_like(p))
    tok.add_tokens(["<tool>"])
    model.resize_token_embeddings(len(tok))
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    model.save_pretrained(ft, max_shard_size="100KB")
    tok.save_pretrained(ft)
    GenerationConfig(temperature=0.2, do_sample=True, max_new_tokens=7).save_pretrained(ft)
    if not os.path.exists(os.path.join(ft, "model.safetensors.index.json")):
        fail("tiny-llama", "the fine-tune is not sharded")
    return base, ft


def main():
    udelta, minilm, work = sys.argv[1:4]
    os.makedirs(work, exist_ok=True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    ft = os.path.join(minilm, "ft")
    restored = round_trip(udelta, os.path.join(minilm, "base"), ft, work, "minilm")
    compare_tokenizers("minilm", ft, restored)
    compare_models("minilm", ft, restored, 0.95)  # 0.989 measured
    with open(os.path.join(restored, "1_Pooling", "config.json")) as f:
        json.load(f)

    base, ft = tiny_llama(work)
    restored = round_trip(udelta, base, ft, work, "tiny-llama")
    compare_tokenizers("tiny-llama", ft, restored)
    compare_models("tiny-llama", ft, restored, 0.9)  # random weights: 0.944 measured
    if GenerationConfig.from_pretrained(ft).to_dict() != GenerationConfig.from_pretrained(restored).to_dict():
        fail("tiny-llama", "generation configs differ")
    print("restored directories load as the fine-tunes do")


if __name__ == "__main__":
    main()
