"""Batched chat generation and dynamic batching, in-process (no server): per-row settings, stops, streaming,
deadlines, context checks, and that batching changes nothing for greedy rows."""

import threading
import time

import pytest

from runner.local.endpoint.batching import BatcherClosed, DynamicBatcher
from runner.local.endpoint.generation import ContextLengthError, GenerationJob, _RowSampling
from tests.conftest import run_batch


def _chat(text):
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


PROMPTS = ["Hi", "What is a list in Python?", "Tell me a long story about dictionaries and sets and tuples.", "Bye"]


def _job(generator, text, max_new_tokens, **kw):
    return GenerationJob(generator.encode_chat(_chat(text)), max_new_tokens, **kw)


@pytest.mark.slow
def test_batched_greedy_rows_match_one_at_a_time(generator):
    lengths = [5, 12, 3, 9]
    solo = [run_batch(generator, [_job(generator, p, n)])[0] for p, n in zip(PROMPTS, lengths)]
    batched = run_batch(generator, [_job(generator, p, n) for p, n in zip(PROMPTS, lengths)])
    for s, b, n in zip(solo, batched, lengths):
        assert b.text == s.text
        assert b.completion_tokens == s.completion_tokens
        assert b.completion_tokens <= n
        assert (b.finish_reason == "length") == (b.completion_tokens == n)


@pytest.mark.slow
def test_sampled_rows_do_not_disturb_a_greedy_row_in_the_same_batch(generator):
    solo = run_batch(generator, [_job(generator, PROMPTS[1], 10)])[0]
    mixed = run_batch(generator, [
        _job(generator, PROMPTS[0], 10, do_sample=True, temperature=1.5, top_p=0.9),
        _job(generator, PROMPTS[1], 10, do_sample=True, temperature=0.0),  # temperature 0 means greedy
        _job(generator, PROMPTS[2], 10, do_sample=True, temperature=0.7, top_k=5),
    ])
    assert mixed[1].text == solo.text
    assert mixed[0].prompt_tokens == len(generator.encode_chat(_chat(PROMPTS[0])))


@pytest.mark.slow
def test_stop_string_cuts_the_reply_and_nothing_of_it_is_streamed(generator):
    full = run_batch(generator, [_job(generator, PROMPTS[1], 30)])[0].text
    assert len(full) > 10
    stop = full[len(full) // 2: len(full) // 2 + 3]
    pieces = []
    [cut] = run_batch(generator, [_job(generator, PROMPTS[1], 30, stop=[stop], on_delta=pieces.append)])
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.find(stop)]
    assert "".join(pieces) == cut.text


@pytest.mark.slow
def test_streamed_pieces_add_up_to_the_reply(generator):
    pieces = []
    [result] = run_batch(generator, [_job(generator, PROMPTS[2], 25, on_delta=pieces.append)])
    assert len(pieces) > 1
    assert "".join(pieces) == result.text


@pytest.mark.slow
def test_deadline_and_cancellation_end_rows_without_stopping_others(generator):
    late = _job(generator, PROMPTS[0], 50, deadline=time.monotonic() - 1)
    cancelled = _job(generator, PROMPTS[1], 50)
    cancelled.cancelled.set()
    normal = _job(generator, PROMPTS[2], 4)
    results = run_batch(generator, [late, cancelled, normal])
    assert [r.finish_reason for r in results[:2]] == ["timeout", "cancelled"]
    assert results[2].finish_reason in ("length", "stop") and results[2].completion_tokens <= 4


@pytest.mark.slow
def test_context_check(generator):
    n = generator.context_length
    assert generator.check_fits(10, None) == min(256, n - 10)
    assert generator.check_fits(10, n - 10) == n - 10
    with pytest.raises(ContextLengthError, match="at most"):
        generator.check_fits(10, n - 9)
    with pytest.raises(ContextLengthError):
        generator.check_fits(n, None)


def test_row_sampling_greedy_rows_keep_only_their_argmax_and_top_p_trims():
    import torch

    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    jobs = [GenerationJob([1], 4, do_sample=False), GenerationJob([1], 4, do_sample=True, temperature=2.0),
            GenerationJob([1], 4, do_sample=True, top_p=0.5)]
    out = _RowSampling(jobs)(None, scores.clone())
    assert torch.isfinite(out[0]).tolist() == [False, True, False, False]
    assert torch.allclose(out[1], scores[1] / 2.0)
    assert torch.isfinite(out[2]).tolist() == [False, False, False, True]  # token 3 alone holds > 50% of the mass


def _fake_job(record):
    return GenerationJob([1, 2], 1, on_done=record.append)


def test_batcher_groups_concurrent_jobs_and_respects_the_max_size():
    seen, results = [], []

    def run_batch(jobs):
        seen.append(len(jobs))
        for job in jobs:
            job.on_done(("ok", len(jobs)))

    batcher = DynamicBatcher(run_batch, max_batch_size=3, window_ms=200)
    for _ in range(7):
        batcher.submit(_fake_job(results))
    deadline = time.monotonic() + 5
    while len(results) < 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    batcher.close()
    assert sum(seen) == 7 and max(seen) == 3 and len(seen) == 3
    assert batcher.stats()["largest_batch"] == 3
    with pytest.raises(BatcherClosed):
        batcher.submit(_fake_job(results))


def test_batcher_close_cancels_what_it_cannot_finish():
    release, results = threading.Event(), []

    def slow_batch(jobs):
        release.wait(5)
        for job in jobs:
            job.on_done(type("R", (), {"finish_reason": "cancelled" if job.cancelled.is_set() else "length"})())

    batcher = DynamicBatcher(slow_batch, max_batch_size=1, window_ms=0)
    running, queued = _fake_job(results), _fake_job(results)
    batcher.submit(running)
    time.sleep(0.1)
    batcher.submit(queued)
    threading.Timer(0.5, release.set).start()
    batcher.close(timeout=0.2)
    reasons = sorted(r.finish_reason for r in results)
    assert reasons == ["cancelled", "cancelled"]  # the queued one failed at once, the running one was told to stop


def test_serving_device_auto_is_the_cpu_without_a_gpu_and_cuda_is_refused():
    import torch

    from runner.local.endpoint.generation import serving_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert serving_device("auto") == "cpu" and serving_device("cpu") == "cpu"
    with pytest.raises(RuntimeError, match="deployment.device=cuda but no CUDA GPU"):
        serving_device("cuda")


def test_cudnn_attention_switch_leaves_a_cpu_machine_alone():
    import torch

    from runner.local.packing import avoid_per_shape_attention_plans

    before = torch.backends.cuda.cudnn_sdp_enabled()
    avoid_per_shape_attention_plans()
    assert torch.backends.cuda.cudnn_sdp_enabled() == (before if not torch.cuda.is_available() else False)
