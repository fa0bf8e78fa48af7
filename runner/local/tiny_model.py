"""The offline tiny model: a few-layer Phi-3-architecture causal LM with its own SentencePiece BPE tokenizer.

No model hub is reachable here, so the default run and the tests use a model the project builds itself: random
init (seeded), transformers' Phi3 classes, a tokenizer trained with `sentencepiece` on the sample chats plus
offline English text (shaped like Phi-3-mini's, so llama.cpp's converter takes it), and a Phi-3-style chat
template. It is written with save_pretrained, so every later step loads it exactly as it would load a downloaded
model.
"""

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional

from runner.atomic import staged_dir

SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Phi-3's layout (<|role|>\n content <|end|>\n). The {% generation %} markers let
# apply_chat_template(..., return_assistant_tokens_mask=True) mark the assistant tokens that the loss counts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

BUILDER_VERSION = 2  # bump when the recipe changes so cached builds are redone


def _default_corpus(seed: int) -> Iterable[str]:
    """Sample chats (what the model will see) plus Python's own docs, for a vocabulary of ~2k tokens."""
    try:
        from runner.data.sample import generate_rows

        for split, n in (("train_sft", 600), ("test_gen", 100)):
            for row in generate_rows(n, seed, split):
                for message in row["messages"]:
                    yield message["content"]
    except ImportError:  # the sample generator is optional for the builder itself
        pass
    import pydoc

    for topic in ("str", "list", "dict", "set", "int", "float", "tuple", "bytes", "open", "print", "sorted"):
        yield pydoc.render_doc(topic, renderer=pydoc.plaintext)


def _train_sentencepiece(corpus: Iterable[str], vocab_size: int) -> bytes:
    """A SentencePiece BPE model with byte fallback and no text normalisation, trained line by line as Llama's was
    (so no piece holds a newline and a reply's first token never fuses with the prompt's last "\\n"), and without
    a dummy prefix space (text right after a special token is tokenized as if it stood alone)."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(line for text in corpus for line in text.split("\n") if line), model_writer=model,
        model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=1 << 20, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def train_tokenizer(corpus: Iterable[str], vocab_size: int, model_max_length: int, model_file: Path):
    """Phi-3-mini's tokenizer shape on our own vocabulary: a SentencePiece BPE `tokenizer.model` (written to
    model_file) plus the chat special tokens added after it.

    Why SentencePiece and not a byte-level BPE: llama.cpp's converter accepts a byte-level (GPT-2 style) BPE only
    when the token ids of a fixed probe text hash to one it knows, which no freshly trained vocabulary does; a
    Phi-3 with a `tokenizer.model` takes the converter's SentencePiece path instead, exactly as Phi-3-mini does.
    Unlike Phi-3 no space is prepended to text (Phi-3 puts one after every special token), so the token ids of a
    chat are the ids of its parts joined; the export tells llama.cpp so (tokenizer.ggml.add_space_prefix=false).
    """
    from tokenizers import decoders, normalizers
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    model_file = Path(model_file)
    model_file.write_bytes(_train_sentencepiece(corpus, vocab_size - len(SPECIAL_TOKENS)))
    vocab, _, merges = SentencePieceExtractor(str(model_file)).extract()
    tok = LlamaTokenizer(
        vocab=vocab, merges=merges, legacy=False, add_prefix_space=False,
        bos_token="<s>", eos_token="<|end|>", unk_token="<unk>", pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t != "<|end|>" and t != "<|endoftext|>"],
        extra_special_tokens=None, add_bos_token=False, add_eos_token=False,
        model_max_length=model_max_length,
        padding_side="left",  # generation pads on the left; the trainer packs or pads explicitly
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(
    out_dir,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    vocab_size: int = 2048,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    corpus: Optional[Iterable[str]] = None,
) -> Path:
    """Build and save the tiny model + tokenizer into out_dir (whole or absent: runner.atomic.staged_dir)."""
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        tokenizer = train_tokenizer(corpus if corpus is not None else _default_corpus(seed), vocab_size,
                                    max_position_embeddings, tmp / "tokenizer.model")
        torch.manual_seed(seed)
        config = Phi3Config(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_attention_heads,
            max_position_embeddings=max_position_embeddings,
            original_max_position_embeddings=max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        model = Phi3ForCausalLM(config)
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def tiny_model_key(tiny_cfg: dict) -> str:
    blob = json.dumps({"v": BUILDER_VERSION, **tiny_cfg}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def tiny_model_path(models_dir, tiny_cfg: dict) -> Path:
    """Where the tiny model with these dimensions is cached (built or not)."""
    return Path(models_dir) / f"tiny-phi3-{tiny_model_key(tiny_cfg)}"


def ensure_tiny_model(models_dir, tiny_cfg: dict) -> tuple[Path, bool]:
    """The cached tiny model for these dimensions; built on first use. Returns (path, built_now)."""
    from runner.locks import exclusive

    path = tiny_model_path(models_dir, tiny_cfg)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path, False
    # Two runs on a fresh state root: one builds, the other waits and uses it (a second build would delete the
    # folder the first run is already loading from).
    with exclusive(path.with_name(f".{path.name}.lock")):
        if (path / "config.json").exists() and (path / "tokenizer.json").exists():
            return path, False
        build_tiny_model(path, **tiny_cfg)
    return path, True
