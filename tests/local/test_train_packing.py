"""Padding-free packing keeps conversations apart; batches are reproducible per (seed, epoch)."""

import pytest
import torch

from runner.local.packing import (
    PaddedCollator,
    TokenBudgetBatchSampler,
    batch_token_counts,
    pack_conversations,
    packed_batch,
    register_packed_attention,
)


@pytest.fixture(scope="module")
def conversations(tiny_model_dir):
    from transformers import AutoTokenizer

    from runner.data.prepare import tokenize_conversation

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chats = [
        [{"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The Danube."}],
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello there, friend!"},
         {"role": "assistant", "content": "Hello! How can I help you today?"}],
        [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."},
         {"role": "user", "content": "Backwards?"}, {"role": "assistant", "content": "Three, two, one."}],
    ]
    return [tokenize_conversation(c, tok, None) for c in chats]


def _model(model_dir, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn)
    return model.eval()


def _alone(model, conv):
    with torch.no_grad():
        return model(input_ids=torch.tensor([conv["input_ids"]]), use_cache=False).logits[0]


@pytest.mark.parametrize("attn", ["packed_sdpa", "sdpa"])
def test_logits_inside_a_packed_row_equal_the_conversation_alone(tiny_model_dir, conversations, attn):
    if attn == "packed_sdpa":
        register_packed_attention()
    model = _model(tiny_model_dir, attn)
    batch = pack_conversations(conversations)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), packed_batch():
        packed = model(**inputs, use_cache=False).logits[0]
    bounds = batch["cu_seq_lens_q"].tolist()
    for conv, start, end in zip(conversations, bounds[:-1], bounds[1:]):
        torch.testing.assert_close(packed[start:end], _alone(model, conv), atol=1e-5, rtol=1e-4)

    # The check can fail: the same row without restarting positions (plain concatenation) mixes conversations.
    with torch.no_grad():
        mixed = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert (mixed[bounds[1]:bounds[2]] - _alone(model, conversations[1])).abs().max() > 1e-2


def test_packed_sdpa_outside_a_packed_batch_is_plain_sdpa(tiny_model_dir, conversations):
    register_packed_attention()
    packed_model, plain = _model(tiny_model_dir, "packed_sdpa"), _model(tiny_model_dir, "sdpa")
    ids = torch.tensor([conversations[2]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(packed_model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_pack_layout(conversations):
    batch = pack_conversations(conversations)
    lengths = [len(c["input_ids"]) for c in conversations]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert batch["cu_seq_lens_q"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    labels = batch["labels"][0].tolist()
    starts = batch["cu_seq_lens_q"].tolist()[:-1]
    assert all(labels[s] == -100 for s in starts)  # no token is predicted across a boundary
    assert sum(x != -100 for x in labels) == sum(sum(x != -100 for x in c["labels"]) for c in conversations)
    assert batch_token_counts(batch) == (sum(lengths), sum(lengths))  # no padding at all


def test_padded_collator_counts_padding(conversations):
    batch = PaddedCollator(pad_token_id=0)(conversations)
    lengths = [len(c["input_ids"]) for c in conversations]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch_token_counts(batch) == (sum(lengths), 3 * max(lengths))
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert PaddedCollator(0, pad_to=64)(conversations)["input_ids"].shape == (3, 64)


def test_batches_depend_on_seed_and_epoch_only():
    lengths = [5, 9, 3, 7, 11, 2, 8, 6, 4, 10]
    a = TokenBudgetBatchSampler(lengths, batch_size=3, seed=1)
    b = TokenBudgetBatchSampler(lengths, batch_size=3, seed=1)
    assert a.batches(0) == b.batches(0) and a.batches(1) == b.batches(1)
    assert a.batches(0) != a.batches(1)
    for epoch in (0, 1):
        flat = sorted(i for batch in a.batches(epoch) for i in batch)
        assert flat == list(range(10)) and len(a.batches(epoch)) == 4
    a.set_epoch(1)
    assert list(iter(a)) == b.batches(1)
    capped = TokenBudgetBatchSampler(lengths, batch_size=5, max_tokens=15, seed=0)
    for batch in capped.batches(0):
        assert len(batch) <= 5 and (sum(lengths[i] for i in batch) <= 15 or len(batch) == 1)
    assert TokenBudgetBatchSampler(lengths, 4, shuffle=False).batches() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
