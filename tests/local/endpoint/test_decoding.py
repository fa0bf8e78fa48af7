"""The shrinking decoding loop: the same greedy tokens as transformers' generate, and a row whose client went away
(or that ended) leaves its batch at the next step instead of riding it to the end."""

import pytest

from runner.local.endpoint.generation import GenerationJob
from tests.conftest import run_batch

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Tell me about lists, sets and tuples."}]
OTHER = [{"role": "user", "content": "Hi"}]


def test_greedy_tokens_match_transformers_generate(generator):
    import torch

    prompt = generator.encode_chat(CHAT)
    [ours] = run_batch(generator, [GenerationJob(prompt, 20)])
    with torch.inference_mode():
        out = generator.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                       max_new_tokens=20, do_sample=False, eos_token_id=generator.eos_ids,
                                       pad_token_id=generator.pad_id, temperature=None, top_p=None, top_k=None)
    theirs = [t for t in out[0, len(prompt):].tolist() if t not in generator.eos_ids]
    assert ours.text == generator.tokenizer.decode(theirs, skip_special_tokens=True)


def test_a_cancelled_row_stops_costing_forward_passes(generator):
    sizes = []
    generator.on_forward = sizes.append
    try:
        pieces = []
        gone = GenerationJob(generator.encode_chat(CHAT), 40, do_sample=True, temperature=0.7)

        def client_leaves(piece):  # the client goes away after its third piece of text
            pieces.append(piece)
            if len(pieces) == 3:
                gone.cancelled.set()

        gone.on_delta = client_leaves
        stays = [GenerationJob(generator.encode_chat(OTHER), 40, logit_bias={300: 100.0}) for _ in range(2)]
        results = run_batch(generator, [gone, *stays])
    finally:
        generator.on_forward = None
    assert results[0].finish_reason == "cancelled"
    assert [r.completion_tokens for r in results[1:]] == [40, 40]  # forced token: never an early end
    assert sizes[0] == 3 and sizes[-1] == 2 and len(sizes) == 40
    dropped_at = sizes.index(2)
    assert dropped_at <= results[0].completion_tokens + 1  # the very next step after the cancel was seen
    assert sizes[dropped_at:] == [2] * (40 - dropped_at)  # and it never came back


def test_rows_that_end_early_leave_the_batch_too(generator):
    sizes = []
    generator.on_forward = sizes.append
    try:
        short = GenerationJob(generator.encode_chat(OTHER), 3, logit_bias={300: 100.0})
        long = GenerationJob(generator.encode_chat(CHAT), 12, logit_bias={300: 100.0})
        results = run_batch(generator, [short, long])
    finally:
        generator.on_forward = None
    assert [r.completion_tokens for r in results] == [3, 12]
    assert sizes == [2, 2, 2] + [1] * 9
