"""The speed levers of finetune.local (issue 12): packed_attention=varlen and compile.

varlen's kernel (torch.nn.attention.varlen.varlen_attn, flash attention) runs on CUDA only. Here it is replaced by
a double made with mock.create_autospec from the real function, so a call with a wrong name, argument or keyword
fails as it would for real, whose side effect is the same arithmetic (causal attention per conversation in the
kernel's (tokens, heads, head_dim) layout, checking the layout and the int32 bounds the real kernel requires). What
is tested is this project's plumbing around the kernel: layouts, bounds, causal keywords, the return shape; the
kernel's own speed and numerics on a GPU are bench/gpu_train.py's (contender runner-varlen)."""

from typing import Optional, Tuple
from unittest import mock

import pytest
import torch

from runner.errors import RunnerError
from runner.local.packing import pack_conversations, packed_batch, register_packed_attention
from tests.local.test_train import chat_data, default_settings, run_train  # noqa: F401  (chat_data: a fixture)
from tests.local.test_train_packing import _alone, _model, conversations  # noqa: F401  (conversations: a fixture)


def _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert query.dim() == 3 and key.shape == query.shape == value.shape, "varlen takes (tokens, heads, head_dim)"
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
    assert tuple(window_size) == (-1, 0), "causal is window (-1, 0) in this torch"
    bounds = cu_seq_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == query.shape[0]
    assert max_q == max_k == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (t[start:end].transpose(0, 1)[None] for t in (query, key, value))
        parts.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[0]
                     .transpose(0, 1))
    return torch.cat(parts)


@pytest.fixture
def varlen_double(monkeypatch):
    import torch.nn.attention.varlen as varlen

    double = mock.create_autospec(varlen.varlen_attn, side_effect=_reference_varlen)
    monkeypatch.setattr(varlen, "varlen_attn", double)
    return double


# ---- a compilable double: the kernel as a custom op, as torch's own varlen_attn is -------------------------------
# torch.compile must trace the layer around the kernel in one graph (a checkpointed layer allows no graph break), so
# this double is opaque to the compiler the way the real op is: a custom op with a fake (shape) implementation and a
# backward of its own, written out, since autograd does not run inside a custom op.

@torch.library.custom_op("ftrun_test::varlen_attention", mutates_args=())
def _varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, longest: int,
               scale: Optional[float]) -> torch.Tensor:
    return _reference_varlen(q, k, v, bounds, bounds, longest, longest, scale=scale, window_size=(-1, 0)).clone()


@_varlen_op.register_fake
def _(q, k, v, bounds, longest, scale):
    return torch.empty_like(q)


@torch.library.custom_op("ftrun_test::varlen_attention_backward", mutates_args=())
def _varlen_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor,
                        scale: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    cuts = bounds.tolist()
    for a, b in zip(cuts[:-1], cuts[1:]):
        qs, ks, vs, gs = (t[a:b].transpose(0, 1) for t in (q, k, v, grad))  # (heads, L, head_dim)
        sc = scale if scale is not None else qs.shape[-1] ** -0.5
        causal = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        probs = torch.softmax(((qs @ ks.transpose(-1, -2)) * sc).masked_fill(~causal, float("-inf")), dim=-1)
        dv[a:b] = (probs.transpose(-1, -2) @ gs).transpose(0, 1)
        dprobs = gs @ vs.transpose(-1, -2)
        dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True))
        dq[a:b] = ((dscores @ ks) * sc).transpose(0, 1)
        dk[a:b] = ((dscores.transpose(-1, -2) @ qs) * sc).transpose(0, 1)
    return dq, dk, dv


@_varlen_backward_op.register_fake
def _(grad, q, k, v, bounds, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save_for_backward(ctx, inputs, output):
    q, k, v, bounds, _, scale = inputs
    ctx.save_for_backward(q, k, v, bounds)
    ctx.scale = scale


def _varlen_backward(ctx, grad):
    return (*_varlen_backward_op(grad, *ctx.saved_tensors, ctx.scale), None, None, None)


_varlen_op.register_autograd(_varlen_backward, setup_context=_save_for_backward)


def _compilable_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                       window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert tuple(window_size) == (-1, 0)
    return _varlen_op(query, key, value, cu_seq_q, max_q, scale)


def _loss_and_grads(model, batch):
    model.zero_grad()
    with packed_batch():
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_varlen_attention_equals_per_conversation_attention(tiny_model_dir, conversations, varlen_double):
    name = register_packed_attention("varlen")
    assert name == "packed_varlen"
    varlen_model = _model(tiny_model_dir, name)
    batch = pack_conversations(conversations)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), packed_batch():
        packed = varlen_model(**inputs, use_cache=False).logits[0]
    layers = varlen_model.config.num_hidden_layers
    assert varlen_double.call_count == layers  # one kernel call per layer for the whole row
    bounds = batch["cu_seq_lens_q"].tolist()
    for conv, start, end in zip(conversations, bounds[:-1], bounds[1:]):
        torch.testing.assert_close(packed[start:end], _alone(varlen_model, conv), atol=1e-5, rtol=1e-4)
    assert varlen_double.call_count == layers  # alone (no bounds): stock sdpa, not the kernel

    # training: loss and every gradient equal the per-conversation attention's
    per_conversation = _model(tiny_model_dir, register_packed_attention("per_conversation")).train()
    varlen_loss, varlen_grads = _loss_and_grads(varlen_model.train(), batch)
    loss, grads = _loss_and_grads(per_conversation, batch)
    torch.testing.assert_close(varlen_loss, loss)
    assert varlen_grads.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(varlen_grads[name], grads[name], atol=1e-6, rtol=1e-4)

    # under gradient checkpointing the backward recomputes each layer: the kernel runs again, with the same bounds
    varlen_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    varlen_double.reset_mock()
    ckpt_loss, ckpt_grads = _loss_and_grads(varlen_model, batch)
    assert varlen_double.call_count == 2 * layers
    torch.testing.assert_close(ckpt_loss, loss)
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], atol=1e-6, rtol=1e-4)


@pytest.mark.slow  # torch.compile of the tiny model's layers: ~30 s
def test_varlen_layers_compile_as_one_graph_even_under_checkpointing(tiny_model_dir, conversations, monkeypatch):
    """compile + checkpointing + varlen: the layer around the kernel has no graph break, so dynamo compiles the
    checkpointed layer (with per-conversation attention it compiles nothing: refused, see compile_refusal); loss and
    gradients equal eager per-conversation attention's."""
    import torch.nn.attention.varlen as varlen
    from torch._dynamo.utils import counters

    from runner.local.speed import compile_decoder_layers

    monkeypatch.setattr(varlen, "varlen_attn", _compilable_varlen)
    batch = pack_conversations(conversations)
    loss, grads = _loss_and_grads(_model(tiny_model_dir, register_packed_attention("per_conversation")).train(), batch)
    for checkpointing in (False, True):
        model = _model(tiny_model_dir, register_packed_attention("varlen")).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        compile_decoder_layers(model)
        counters.clear()
        compiled_loss, compiled_grads = _loss_and_grads(model, batch)
        assert counters["stats"]["unique_graphs"] >= 1, checkpointing
        assert not counters["graph_break"], dict(counters["graph_break"])
        torch.testing.assert_close(compiled_loss, loss)
        for name in grads:
            torch.testing.assert_close(compiled_grads[name], grads[name], atol=1e-6, rtol=1e-4)


def test_unknown_packed_attention_is_refused():
    with pytest.raises(ValueError, match="packed_attention='flash'"):
        register_packed_attention("flash")


def _refusals(device, **overrides):
    from runner.local.translate import translate

    return translate(*default_settings(**overrides)).refusals(device)


def test_levers_are_refused_before_loading_where_they_cannot_run():
    assert _refusals("cpu") == []
    assert _refusals("cpu", compile=True) == []  # compiles on CPU too (inductor's C++ backend), only slowly
    [cpu] = _refusals("cpu", packed_attention="varlen")
    assert "needs a CUDA GPU" in cpu and "packed_attention=per_conversation" in cpu
    [unpacked] = _refusals("cuda", packed_attention="varlen", packing=False)
    assert "needs finetune.local.packing=true" in unpacked
    [no_cuda] = _refusals("cuda", packed_attention="varlen", precision=16)  # this machine has no CUDA device
    assert "needs a CUDA GPU" in no_cuda
    [deepspeed] = [e for e in _refusals("cuda", compile=True, apply_deepspeed=True) if "compile" in e]
    assert "not supported with DeepSpeed" in deepspeed
    # under checkpointing a layer compiles only as one graph: per-conversation attention would compile nothing
    [nothing] = _refusals("cpu", compile=True, gradient_checkpointing=True)
    assert "would compile nothing" in nothing and "packed_attention=varlen" in nothing
    assert [e for e in _refusals("cuda", compile=True, gradient_checkpointing=True, packed_attention="varlen")
            if "compile" in e] == []  # (varlen itself is refused here: this machine has no CUDA)
    assert _refusals("cpu", compile=True, gradient_checkpointing=True, packing=False) == []
    assert _refusals("cpu", compile=True, gradient_checkpointing="auto") == []  # decided (and checked) at run time
    from runner.local.translate import translate

    with pytest.raises(RunnerError, match="packed_attention=varlen .* needs a CUDA GPU"):
        translate(*default_settings(packed_attention="varlen")).check("cpu")


def test_varlen_on_a_cuda_machine_needs_16_bit_and_a_torch_that_has_it(monkeypatch):
    import builtins

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what a GPU machine answers
    assert _refusals("cuda", packed_attention="varlen", precision=16) == []
    [fp32] = _refusals("cuda", packed_attention="varlen", precision=32)
    assert "needs finetune.precision=16, not 32" in fp32
    real_import = builtins.__import__

    def no_varlen(name, *args, **kwargs):  # a torch older than 2.10
        if name == "torch.nn.attention.varlen":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_varlen)
    [old] = _refusals("cuda", packed_attention="varlen", precision=16)
    assert "needs torch >= 2.10" in old


def test_compile_finds_the_decoder_layers_through_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from runner.local.speed import compile_decoder_layers, decoder_layers

    model = get_peft_model(_model(tiny_model_dir, "sdpa"), LoraConfig(target_modules=["qkv_proj"], r=4))
    keys = list(model.state_dict())
    assert compile_decoder_layers(model) == model.config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
    assert list(model.state_dict()) == keys  # compiled in place: nothing renamed, so saving and merging are as before

    with pytest.raises(RunnerError, match="no decoder layers"):
        compile_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.slow
def test_auto_checkpointing_that_would_compile_nothing_is_refused_before_loading(tiny_model_dir, chat_data, tmp_path,
                                                                                  monkeypatch):
    from runner.local import recipe

    loaded = []
    monkeypatch.setattr(recipe.LocalRecipe, "_gradient_checkpointing", lambda self: True)  # "auto" chose it
    monkeypatch.setattr("runner.local.trainer.load_model", lambda *a, **k: loaded.append(1))
    with pytest.raises(RunnerError, match="would compile nothing"):
        run_train(tiny_model_dir, chat_data, tmp_path, compile=True, gradient_checkpointing="auto", max_steps=1)
    assert loaded == []


@pytest.mark.slow
def test_padded_batches_compile_under_checkpointing(tiny_model_dir, chat_data, tmp_path):
    """The checkpointed layer is one graph: dynamo compiles it, and the losses are eager's."""
    from torch._dynamo.utils import counters

    settings = dict(max_steps=3, per_device_train_batch_size=4, learning_rate=2e-3, max_seq_length=128,
                    evaluation_strategy="disable", eval_before_training=False, logging_steps=1, save_steps=100,
                    packing=False, gradient_checkpointing=True)
    counters.clear()
    compiled = run_train(tiny_model_dir, chat_data, tmp_path / "on", compile=True, **settings)
    assert counters["stats"]["unique_graphs"] > 0
    eager = run_train(tiny_model_dir, chat_data, tmp_path / "off", compile=False, **settings)
    assert compiled["gradient_checkpointing"] is True
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-3)


@pytest.mark.slow
def test_compiled_layers_train_to_the_same_losses(tiny_model_dir, chat_data, tmp_path):
    """LoRA, six optimizer steps with compile on and off: the same losses (up to the fused kernels' rounding); the
    merged model saves with the base model's keys; the compiled run resumes from its checkpoint to step 8."""
    import json

    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    settings = dict(apply_lora=True, max_steps=6, per_device_train_batch_size=4, learning_rate=2e-3,
                    max_seq_length=128, evaluation_strategy="disable", eval_before_training=False, logging_steps=1,
                    save_steps=3)
    runs = {}
    for on in (False, True):
        counters.clear()
        runs[on] = run_train(tiny_model_dir, chat_data, tmp_path / f"compile-{on}", compile=on, **settings)
        graphs = counters["stats"]["unique_graphs"]
        assert (graphs > 0) == on, graphs  # dynamo compiled graphs only when asked to

    def losses(result):
        events = [json.loads(line) for line in open(result["metrics_file"])]
        return [e["train_loss"] for e in events if e.get("kind") == "train" and "train_loss" in e]

    eager, compiled = losses(runs[False]), losses(runs[True])
    assert len(eager) == 6
    assert compiled == pytest.approx(eager, rel=1e-3)
    assert runs[True]["lora_merged"] is True
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    saved = AutoModelForCausalLM.from_pretrained(runs[True]["final_model_dir"])
    assert list(saved.state_dict()) == list(base.state_dict())

    resumed = run_train(tiny_model_dir, chat_data, tmp_path / "compile-True", compile=True,
                        **{**settings, "max_steps": 8, "resume_from_checkpoint": True})
    assert resumed["resumed_from"].endswith("checkpoint-6") and resumed["global_step"] == 8


@pytest.mark.slow
def test_the_compute_step_refuses_a_lever_before_the_data_step(tmp_path):
    """Through the CLI: varlen on this CPU-only machine stops the workflow at step 3, before any data is fetched."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "FTRUN_HOME": str(tmp_path / "home"), "CI": "1"}
    proc = subprocess.run([sys.executable, "-m", "runner.cli", "finetune.local.packed_attention=varlen",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "packed_attention=varlen runs PyTorch's flash-attention varlen kernel, which needs a CUDA GPU" in proc.stderr
    assert "[3/12] compute" in proc.stdout and "[4/12] data" not in proc.stdout
    assert not list((tmp_path / "home").rglob("*.jsonl"))  # no split written
