"""finetune.local.chunked_loss: the loss over chunks of labelled tokens (runner/local/loss.py) equals the model's
own loss (transformers' ForCausalLMLoss over the full fp32 logits), and so do all the gradients, for LoRA and full
fine-tuning on packed batches of the tiny Phi-3; the Trainer path gives the same training run; the memory
estimate's logits term drops when it is on."""

import pytest
import torch

from runner.memory import terms as memory
from runner.local.loss import chunked_causal_lm_loss, head_input_capture, output_head
from tests.local.test_train import default_settings, write_chat_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("chunked_data"), n_train=16, n_eval=4)


@pytest.fixture(scope="module")
def packed(tiny_model_dir, data, tmp_path_factory):
    from transformers import AutoTokenizer

    from runner.data.prepare import tokenize_file_with_stats
    from runner.local.packing import pack_conversations

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ds, _ = tokenize_file_with_stats(data["train_sft"], tokenizer, 128, cache_dir=tmp_path_factory.mktemp("tok"),
                                     progress=False)
    batch = pack_conversations([ds[i] for i in range(6)])
    assert batch["input_ids"].shape[0] == 1 and "cu_seq_lens_q" in batch  # six conversations in one packed row
    return batch


def _model(model_dir, lora: bool):
    from runner.local.trainer import apply_lora as _apply_lora, load_model as _load_model
    from runner.local.translate import translate

    torch.manual_seed(0)
    model, packing = _load_model(str(model_dir), packing=True, trust_remote_code=False, ignore_mismatched_sizes=False)
    assert packing
    model.config.use_cache = False
    if lora:
        params, local = default_settings(apply_lora=True, lora_dropout=0.0)
        model = _apply_lora(model, translate(params, local).lora)
        for name, p in model.named_parameters():  # start the adapters away from B=0 so every gradient is non-zero
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    model.train()
    return model


def _loss_and_grads(model, batch, chunked: bool, num_items):
    from runner.local.packing import packed_batch

    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with packed_batch():
        if chunked:
            head = output_head(model)
            with head_input_capture(head) as captured:
                out = model(**inputs, use_cache=False)
            assert out.logits.shape[-2] == 0  # the model computed no logits at all
            loss = chunked_causal_lm_loss(captured.hidden, head, batch["labels"], num_items_in_batch=num_items,
                                          chunk_tokens=7)  # many chunks, the last one short
        else:
            loss = model(**inputs, labels=batch["labels"], num_items_in_batch=num_items, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("normalised", [True, False], ids=["num_items", "mean"])
def test_loss_and_gradients_equal_the_standard_path(tiny_model_dir, packed, lora, normalised):
    model = _model(tiny_model_dir, lora)
    num_items = torch.tensor(int((packed["labels"][:, 1:] != -100).sum()) + 5) if normalised else None
    loss_std, grads_std = _loss_and_grads(model, packed, False, num_items)
    loss_chk, grads_chk = _loss_and_grads(model, packed, True, num_items)
    assert torch.allclose(loss_std, loss_chk, rtol=1e-5, atol=1e-6), (loss_std, loss_chk)
    assert grads_std.keys() == grads_chk.keys() and grads_std
    for name in grads_std:
        assert grads_std[name].abs().sum() > 0 or lora is False, name
        assert torch.allclose(grads_std[name], grads_chk[name], rtol=1e-4, atol=1e-6), name


def test_no_labelled_token_gives_the_standard_nan():
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    loss = chunked_causal_lm_loss(hidden, head, torch.full((1, 5), -100))
    assert torch.isnan(loss)


@pytest.mark.slow
def test_training_with_chunked_loss_matches(tiny_model_dir, data, tmp_path, monkeypatch):
    """The Trainer path (RunnerTrainer.compute_loss, gradient accumulation, packing): the same losses."""
    from runner.local import loss as loss_mod
    from runner.local.train import train

    calls = []
    original = loss_mod.chunked_causal_lm_loss
    monkeypatch.setattr(loss_mod, "chunked_causal_lm_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    results = {}
    for on in (False, True):
        params, local = default_settings(max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                         learning_rate=2e-3, max_seq_length=128, evaluation_strategy="disable",
                                         logging_steps=1, save_steps=100, seed=3, chunked_loss=on, apply_lora=True)
        results[on] = train(model_dir=str(tiny_model_dir), train_file=str(data["train_sft"]),
                            eval_file=str(data["test_sft"]), params=params, local=local,
                            out_dir=str(tmp_path / f"on{on}"), progress=False)
    off, on = results[False], results[True]
    assert len(calls) == 3 * 2  # only the chunked run, once per micro-batch: 3 steps x 2 accumulated
    assert on["global_step"] == off["global_step"] == 3
    assert on["train_loss_mean"] == pytest.approx(off["train_loss_mean"], rel=1e-4)
    assert on["eval_loss"] == pytest.approx(off["eval_loss"], rel=1e-4)
    assert on["eval_loss"] != pytest.approx(on["eval_loss_before"], rel=1e-3)  # it did train


def test_memory_estimate_logits_term_drops():
    dims = memory.model_dims(memory.KNOWN_CONFIGS["Phi-3-mini-4k-instruct"])
    linears = [("model.layers.0.self_attn.qkv_proj", 3072)]
    for lora in (True, False):
        std = memory.activation_terms(dims, linears, lora=lora, half=True)
        chk = memory.activation_terms(dims, linears, lora=lora, half=True, chunked_loss=True, tokens=8192)
        assert std["logits_and_loss"] == 12 * dims["vocab"]
        # one chunk's 12 x vocab x CHUNK_TOKENS bytes spread over the micro-batch's tokens
        assert chk["logits_and_loss"] == pytest.approx(12 * dims["vocab"] * 1024 / 8192)
        assert sum(chk.values()) < sum(std.values()) - 10 * dims["vocab"]
        # a micro-batch no larger than one chunk gains nothing on the logits, but never costs more than before
        small = memory.activation_terms(dims, linears, lora=lora, half=True, chunked_loss=True, tokens=512)
        assert small["logits_and_loss"] == 12 * dims["vocab"]
        ckpt = memory.checkpointed_terms(chk, dims, weights_16bit=lora, lora=lora)
        assert ckpt["logits_and_loss"] == chk["logits_and_loss"] and "chunked_loss_inputs" in ckpt
        # tokens unknown: the conservative standard figure
        unknown = memory.activation_terms(dims, linears, lora=lora, half=True, chunked_loss=True)
        assert unknown["logits_and_loss"] == 12 * dims["vocab"]
