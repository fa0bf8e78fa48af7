"""The compute step: device choice, refusals with messages naming the key, and the full vs LoRA memory estimate.

Memory and CUDA device counts are injected, so every refusal (GPU ones included) is exercised on this CPU machine.
"""

import json
import math

import pytest

from runner.local.compute import ComputeError, check_local_compute
from runner.memory.estimate import estimate_memory, parameter_inventory

GiB = 1024**3
# Phi-3-mini-4k-instruct's config.json (the fields the estimate reads); 3,821,079,552 parameters as published.
PHI3_MINI = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072, "num_hidden_layers": 32,
    "intermediate_size": 8192, "vocab_size": 32064, "num_attention_heads": 32, "num_key_value_heads": 32,
    "tie_word_embeddings": False, "max_position_embeddings": 4096,
}
PHI3_MINI_PARAMS = 3_821_079_552


@pytest.fixture
def phi3_dir(tmp_path):
    folder = tmp_path / "phi3-mini"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(PHI3_MINI))
    return str(folder)


def check(model_dir, *, device="cpu", gpus=0, memory=64 * GiB, cuda=0, **params):
    base = {"apply_deepspeed": False, "precision": 32, "apply_lora": False, "lora_r": 8,
            "per_device_train_batch_size": 1, "max_seq_length": 512, "num_nodes_finetune": 1}
    return check_local_compute(device=device, gpus_requested=gpus, params={**base, **params}, model_dir=model_dir,
                               available_memory_bytes=memory, cuda_devices=cuda)


# ---- refusals -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, key, hint", [
    (dict(apply_deepspeed=True), "finetune.apply_deepspeed", "apply_deepspeed=false"),
    (dict(precision=16), "finetune.precision", "precision=32"),
    (dict(num_nodes_finetune=2), "finetune.num_nodes_finetune", "num_nodes_finetune=1"),
    (dict(device="auto", gpus=2, cuda=1), "compute.gpus_per_node", "at most 1"),
    (dict(device="auto", gpus=1, cuda=0), "compute.gpus_per_node", "at most 0"),
    (dict(device="cuda", cuda=0), "compute.device", "compute.device=cpu"),
    (dict(device="cpu", gpus=2, cuda=2), "compute.gpus_per_node", "compute.gpus_per_node=0"),
])
def test_impossible_settings_are_refused_naming_the_key(tiny_model_dir, settings, key, hint):
    with pytest.raises(ComputeError) as err:
        check(str(tiny_model_dir), **settings)
    assert key in str(err.value) and hint in str(err.value)


def test_deepspeed_and_fp16_are_fine_on_cuda(tiny_model_dir):
    out = check(str(tiny_model_dir), device="auto", cuda=2, apply_deepspeed=True, precision=16)
    assert (out["device"], out["cuda_devices"], out["gpus_used"]) == ("cuda", 2, 2)  # 0 requested = all visible


def test_every_problem_is_reported_at_once(tiny_model_dir):
    with pytest.raises(ComputeError) as err:
        check(str(tiny_model_dir), apply_deepspeed=True, precision=16, num_nodes_finetune=4)
    message = str(err.value)
    for key in ("finetune.apply_deepspeed", "finetune.precision", "finetune.num_nodes_finetune"):
        assert key in message


def test_bad_headroom_and_missing_model_folder(tmp_path, tiny_model_dir):
    with pytest.raises(ComputeError, match="compute.memory_headroom"):
        check_local_compute(device="cpu", gpus_requested=0, params={}, model_dir=str(tiny_model_dir),
                            memory_headroom=1.5, available_memory_bytes=GiB)
    with pytest.raises(ComputeError, match="no config.json"):
        check(str(tmp_path))


def test_full_finetune_of_phi3_mini_does_not_fit_24_gib_but_lora_does(phi3_dir):
    with pytest.raises(ComputeError) as err:
        check(phi3_dir, memory=24 * GiB)
    message = str(err.value)
    # what (full fine-tuning, the size), why (GB needed vs allowed), what would be right (LoRA), which keys
    assert "full fine-tuning" in message and "3.82B parameters" in message
    assert "finetune.apply_lora=true" in message and "compute.memory_headroom=0.9" in message
    out = check(phi3_dir, memory=24 * GiB, apply_lora=True)
    assert out["mode"] == "lora" and out["device"] == "cpu"
    assert out["estimate_gb"]["weights"] + out["estimate_gb"]["optimizer"] < 24 * GiB / 1e9 * 0.9


def test_headroom_is_applied_to_the_available_memory(phi3_dir):
    lora = check(phi3_dir, memory=20 * GiB, apply_lora=True)
    state_gb = sum(lora["estimate_gb"][k] for k in ("weights", "gradients", "optimizer"))
    assert 20 * GiB / 1e9 * 0.9 > state_gb  # fits at 0.9 ...
    with pytest.raises(ComputeError, match="compute.memory_headroom=0.5"):  # ... but not at 0.5
        check_local_compute(device="cpu", gpus_requested=0, params={"apply_lora": True}, model_dir=phi3_dir,
                            memory_headroom=0.5, available_memory_bytes=20 * GiB)


# ---- the estimate ---------------------------------------------------------------------------------------------------
def test_phi3_mini_full_vs_lora_magnitudes(phi3_dir):
    full = check(phi3_dir, memory=1024 * GiB)
    lora = check(phi3_dir, memory=1024 * GiB, apply_lora=True, lora_r=8)
    assert full["params_total"] == PHI3_MINI_PARAMS == lora["params_total"]
    assert full["params_trainable"] == PHI3_MINI_PARAMS
    # r * (in + out) for qkv (3072->9216), o (3072->3072), gate_up (3072->16384), down (8192->3072), 32 layers
    assert lora["params_trainable"] == 32 * 8 * ((3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072))
    full_state = sum(full["estimate_gb"][k] for k in ("weights", "gradients", "optimizer"))
    lora_state = sum(lora["estimate_gb"][k] for k in ("weights", "gradients", "optimizer"))
    assert 60 < full_state < 62  # 16 bytes per parameter with AdamW
    assert full["estimate_gb"]["optimizer"] == pytest.approx(2 * full["estimate_gb"]["weights"], rel=1e-3)
    assert 15 < lora_state < 16  # the fp32 frozen weights dominate; adapters + moments ~0.15 GB
    assert lora["estimate_gb"]["optimizer"] < 0.2
    json.dumps(full), json.dumps(lora)  # the run record stores them


def test_lora_rank_and_targets_change_the_trainable_count(phi3_dir):
    shapes, cfg, source = parameter_inventory(phi3_dir)
    assert source == "config.json"
    r8 = estimate_memory(shapes, cfg, {"lora_r": 8}, apply_lora=True)["params_trainable"]
    r16 = estimate_memory(shapes, cfg, {"lora_r": 16}, apply_lora=True)["params_trainable"]
    qkv = estimate_memory(shapes, cfg, {"lora_r": 8}, apply_lora=True,
                          lora_target_modules=["qkv_proj"])["params_trainable"]
    saved = estimate_memory(shapes, cfg, {"lora_r": 8}, apply_lora=True,
                            lora_modules_to_save=["lm_head", "embed_tokens"])["params_trainable"]
    assert r16 == 2 * r8
    assert qkv == 32 * 8 * (3072 + 9216)
    assert saved == r8 + 2 * 32064 * 3072


def test_deepspeed_shards_state_across_gpus(phi3_dir):
    one = check(phi3_dir, device="cuda", cuda=1, memory=80 * GiB, precision=16, apply_deepspeed=True,
                deepspeed_stage=3)
    four = check(phi3_dir, device="cuda", cuda=4, memory=80 * GiB, precision=16, apply_deepspeed=True,
                 deepspeed_stage=3)
    assert four["gpus_used"] == 4
    assert four["estimate_gb"]["optimizer"] == pytest.approx(one["estimate_gb"]["optimizer"] / 4, rel=1e-3)
    assert four["estimate_gb"]["weights"] == pytest.approx(one["estimate_gb"]["weights"] / 4, rel=1e-3)
    with pytest.raises(ComputeError, match="per GPU"):  # the same model on one 24 GiB GPU does not fit
        check(phi3_dir, device="cuda", cuda=1, memory=24 * GiB, precision=16)


def test_safetensors_headers_agree_with_config_arithmetic(tiny_model_dir, tmp_path):
    shapes, cfg, source = parameter_inventory(str(tiny_model_dir))
    assert source == "safetensors headers"
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    from_config = check(str(config_only))
    from_headers = check(str(tiny_model_dir))
    assert from_headers["params_total"] == from_config["params_total"] == 344_384
    assert from_headers["params_source"] == "safetensors headers"


def test_lora_trainable_count_matches_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.base_model.model.parameters() if not p.requires_grad)
    out = check_local_compute(device="cpu", gpus_requested=0, params={"apply_lora": True, "lora_r": 4},
                              model_dir=str(tiny_model_dir), available_memory_bytes=GiB,
                              lora_target_modules=targets)
    assert out["params_trainable"] == trainable
    assert out["params_total"] == total


def test_detected_memory_on_this_machine(tiny_model_dir):
    out = check_local_compute(device="cpu", gpus_requested=0, params={}, model_dir=str(tiny_model_dir))
    assert out["device"] == "cpu" and out["gpus_used"] == 0
    assert out["memory_available_gb"] > 0.1
    assert out["estimate_gb"]["total"] < out["memory_budget_gb"]


def test_weights_counted_in_the_dtype_the_trainer_holds(phi3_dir):
    """A frozen LoRA base loads 16-bit (base_weights_dtype), full fine-tuning under plain AMP keeps fp32
    weights and grads, DeepSpeed casts to 16-bit and keeps an fp32 master copy: both full cases are 16 bytes/param."""
    from runner.memory.estimate import base_weights_dtype

    shapes, cfg, _ = parameter_inventory(phi3_dir)
    total = sum(math.prod(s) for s in shapes.values())
    bf16 = {"bf16": True, "fp16": False}
    lora = {"precision": 16, "apply_lora": True, "lora_r": 8}
    assert base_weights_dtype(lora, {}, bf16) == "bfloat16"
    assert base_weights_dtype(lora, {}, {"bf16": False, "fp16": True}) == "float16"
    assert base_weights_dtype(lora, {"lora_modules_to_save": ["lm_head"]}, bf16) == "float32"
    assert base_weights_dtype({**lora, "apply_deepspeed": True}, {}, bf16) == "float32"  # DeepSpeed casts it
    assert base_weights_dtype({"precision": 16}, {}, bf16) == "float32"
    assert base_weights_dtype(lora, {}, {"bf16": False, "fp16": False}) == "float32"  # CPU / precision 32

    half_lora = estimate_memory(shapes, cfg, lora, apply_lora=True)["bytes"]
    fp32_lora = estimate_memory(shapes, cfg, {**lora, "precision": 32}, apply_lora=True)["bytes"]
    saved_lora = estimate_memory(shapes, cfg, lora, apply_lora=True, lora_modules_to_save=["lm_head"])["bytes"]
    assert 2 * total < half_lora["weights"] < 2.05 * total  # + fp32 adapters
    assert 4 * total < fp32_lora["weights"] < 4.05 * total
    assert saved_lora["weights"] > 4 * total  # the saved module keeps the base fp32
    amp = estimate_memory(shapes, cfg, {"precision": 16}, apply_lora=False)["bytes"]
    ds = estimate_memory(shapes, cfg, {"precision": 16, "apply_deepspeed": True}, apply_lora=False)["bytes"]
    assert amp["weights"] == 4 * total and amp["gradients"] == 4 * total
    assert ds["weights"] == 2 * total and ds["gradients"] == 2 * total
    assert amp["state"] == ds["state"] == 16 * total


# ---- the micro-batch verdict in the compute step ---------------------------------------------------------------------
def test_outputs_carry_what_the_finetune_step_runs(tiny_model_dir):
    out = check(str(tiny_model_dir), per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert (out["per_device_train_batch_size"], out["gradient_accumulation_steps"]) == (4, 2)
    assert out["gradient_checkpointing"] is False and out["auto_fit_applied"] is False
    assert out["tokens_per_micro_batch"] == 4 * 512
    est = out["estimate_gb"]
    assert est["total"] == est["total_without_checkpointing"] > est["total_with_checkpointing"]
    assert out["memory_fit"]["fits_without_checkpointing"] is True
    json.dumps(out)  # the run record stores it


def test_micro_batch_too_big_for_ram_is_a_warning_on_cpu_and_refused_on_gpu(phi3_dir):
    """System RAM: a warning naming the largest micro-batch (swap may carry it); a GPU: refused before loading."""
    lora = dict(apply_lora=True, per_device_train_batch_size=8, max_seq_length=2048)
    out = check_local_compute(device="cpu", gpus_requested=0, model_dir=phi3_dir, available_memory_bytes=64 * GiB,
                              gradient_checkpointing=False, params={"precision": 32, "lora_r": 8, **lora})
    assert any("does not fit" in w and "finetune.local.auto_fit=true" in w for w in out["warnings"])
    assert out["per_device_train_batch_size"] == 8  # not applied without auto_fit
    fitted = check_local_compute(device="cpu", gpus_requested=0, model_dir=phi3_dir,
                                 available_memory_bytes=64 * GiB, gradient_checkpointing=False, auto_fit=True,
                                 params={"precision": 32, "lora_r": 8, **lora})
    assert fitted["auto_fit_applied"] and fitted["per_device_train_batch_size"] < 8
    assert fitted["per_device_train_batch_size"] * fitted["gradient_accumulation_steps"] == 8
    assert fitted["estimate_gb"]["total"] <= fitted["memory_budget_gb"]
    with pytest.raises(ComputeError, match="does not fit"):
        check_local_compute(device="cuda", gpus_requested=0, model_dir=phi3_dir, available_memory_bytes=64 * GiB,
                            cuda_devices=1, gradient_checkpointing=False,
                            params={"precision": 16, "lora_r": 8, **lora})
