"""Shared pieces of the export tests: the pinned llama-cpp-python sdist (llama.cpp's converter and its vocab-only
GGUFs), a trained tiny model and held-out chats."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.export.converter import PIN, sha256_of


def locate_sdist(cache_dir: Path) -> Path:
    """$LLAMA_CPP_SDIST, else the pinned sdist downloaded once with pip into pytest's cache (the package registry
    is the only network the tests use)."""
    given = os.environ.get("LLAMA_CPP_SDIST")
    if given:
        path = Path(given)
        return path / PIN["sdist"] if path.is_dir() else path
    target = cache_dir / PIN["sdist"]
    if not target.is_file() or sha256_of(target) != PIN["sha256"]:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                               "--dest", str(cache_dir), f"{PIN['package']}=={PIN['version']}"],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not target.is_file():
            pytest.skip(f"the package registry did not give {PIN['sdist']}: {proc.stderr.strip()[-300:]}")
    return target


def held_out_chats(n: int, seed: int = 0):
    """Chats of the sample's test split, each ending in an assistant turn, with a system turn added to half."""
    from runner.data.sample import generate_rows

    chats = []
    for i, row in enumerate(generate_rows(n, seed, "test_sft")):
        messages = [m for m in row["messages"] if m["role"] in ("system", "user", "assistant")]
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        if i % 2 and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": "You answer briefly."}, *messages]
        chats.append(messages)
    return chats


def write_rows(folder: Path, n_train: int, n_eval: int, seed: int = 0):
    from runner.data.sample import generate_rows

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train_sft", n_train), ("test_sft", n_eval)):
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in generate_rows(n, seed + 1, split)),
                                encoding="utf-8")
    return paths


# ---- a small Phi-3 on the real Phi-3 vocabulary and chat template ------------------------------------------------

PHI3_VOCAB = "models/ggml-vocab-phi-3.gguf"  # inside the sdist's vendor/llama.cpp/


def _marked(template: str) -> str:
    """The real Phi-3 template with {% generation %} around each reply and its <|end|> (for assistant masks)."""
    plain = "{{message['content'] + '<|end|>' + '\n'}}"  # the template's string holds a real newline
    assert plain in template, template
    return template.replace(plain, "{% generation %}{{message['content'] + '<|end|>'}}{% endgeneration %}"
                                   "{{'\n'}}")


def write_sentencepiece_model(vocab_gguf: Path, dest: Path) -> None:
    """tokenizer.model (what Phi-3-mini ships and llama.cpp's converter reads) rebuilt from the vocab-only GGUF:
    the same pieces, scores and types, SentencePiece BPE with byte fallback and a dummy prefix."""
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as pb

    reader = GGUFReader(str(vocab_gguf))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    base = 32000  # Phi-3-mini's tokenizer.model holds the Llama vocabulary; <|endoftext|> etc. are added tokens
    proto = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens[:base], scores, types)):
        entry = proto.pieces.add()
        kind = 2 if i == 0 else 3 if i in (1, 2) else 6 if int(kind) == 6 else 1  # unk, <s>/</s>, bytes, normal
        entry.piece, entry.score, entry.type = piece, float(score), kind
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = base
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    dest.write_bytes(proto.SerializeToString())


def build_phi3_vocab_model(sdist: Path, folder: Path, steps: int = 240, seed: int = 0) -> Path:
    """A 2-layer Phi-3 (hidden 64) on the real Phi-3 vocabulary (32,064) and chat template, trained briefly on the
    sample chats (all tokens, plain torch loop) so its greedy replies end on <|end|>; saved with tokenizer.model."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Phi3Config, Phi3ForCausalLM

    from runner.data.sample import generate_rows
    from runner.export.converter import sdist_member

    vocab = sdist_member(sdist, PHI3_VOCAB, folder / "vocab" / Path(PHI3_VOCAB).name)
    tok = AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name)
    from gguf import GGUFReader

    tok.chat_template = GGUFReader(str(vocab)).fields["tokenizer.chat_template"].contents()
    end, pad = tok.convert_tokens_to_ids("<|end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed)
    config = Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                        original_max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=end,
                        pad_token_id=pad, tie_word_embeddings=False)
    model = Phi3ForCausalLM(config)
    chats = [[m for m in r["messages"] if m["role"] != "system"] for r in generate_rows(64, seed, "train_sft")]
    batches = [tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"][:192] for c in chats]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = [batches[(step * 4 + k) % len(batches)] for k in range(4)]
        width = max(map(len, batch))
        ids = torch.tensor([b + [pad] * (width - len(b)) for b in batch])
        labels = torch.tensor([b + [-100] * (width - len(b)) for b in batch])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=[end, pad],
                                               pad_token_id=pad)
    out = folder / "phi3-real-vocab"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_sentencepiece_model(vocab, out / "tokenizer.model")
    return out


def model_with_architecture(model_dir: Path, folder: Path, architecture: str) -> Path:
    """A copy of model_dir whose config.json names another architecture (one the converter does not cover)."""
    import shutil

    copy = folder / "odd-model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["architectures"] = [architecture]
    (copy / "config.json").write_text(json.dumps(config))
    return copy
