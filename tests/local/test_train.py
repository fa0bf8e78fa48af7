"""The local trainer on the tiny model: it learns, counts LoRA vs full parameters, saves a plain model, refuses
what cannot run here."""

import dataclasses
import json

import pytest

from runner.errors import RunnerError
from runner.schema import FinetuneConfig, LocalFinetuneConfig

pytestmark = pytest.mark.slow


def default_settings(**overrides):
    """(params, local) exactly as the schema's defaults, then overrides (keys of either)."""
    from runner.finetune_params import RUNNER_KEYS

    def defaults(cls):
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls) if f.name not in RUNNER_KEYS}
    params, local = defaults(FinetuneConfig), defaults(LocalFinetuneConfig)
    for key, value in overrides.items():
        if key in params:
            params[key] = value
        elif key in local:
            local[key] = value
        else:
            raise KeyError(key)
    return params, local


def write_chat_data(folder, n_train=64, n_eval=16, seed=0):
    """train_sft.jsonl and test_sft.jsonl in folder, from the offline sample generator (ultrachat schema)."""
    from runner.data.sample import generate_rows

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train_sft", n_train), ("test_sft", n_eval)):
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in generate_rows(n, seed, split)),
                                encoding="utf-8")
    return paths


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("chat"))


def run_train(model_dir, data, out_dir, log_fn=None, **overrides):
    from runner.local.train import train

    params, local = default_settings(**overrides)
    return train(model_dir=str(model_dir), train_file=str(data["train_sft"]), eval_file=str(data["test_sft"]),
                 params=params, local=local, out_dir=str(out_dir), log_fn=log_fn, progress=False)


def test_short_training_lowers_eval_loss_and_saves_a_plain_model(tiny_model_dir, chat_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    events = []
    result = run_train(tiny_model_dir, chat_data, tmp_path / "run", log_fn=lambda m, s: events.append((s, m)),
                       num_train_epochs=2, per_device_train_batch_size=8, per_device_eval_batch_size=8,
                       learning_rate=3e-3, warmup_steps=2, lr_scheduler_type="cosine", max_seq_length=256,
                       evaluation_strategy="steps", eval_steps=8, logging_steps=4, save_steps=8,
                       save_total_limit=1)
    assert result["global_step"] == 16  # 64 rows / 8 per step * 2 epochs
    assert result["eval_loss"] < result["eval_loss_before"] - 1.0, result
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["eval_loss"], rel=1e-6)
    assert result["padding_fraction"] == 0.0 and result["packing"] is True
    assert result["tokens_per_s"] > 0 and result["train_runtime_s"] > 0
    assert result["trainable_params"] == result["total_params"] > 300_000
    json.dumps(result)  # JSON-serialisable for the run record

    # log_fn and metrics.jsonl saw the same events: eval before (step 0), train every 4 steps, eval every 8
    train_steps = [s for s, m in events if "train_loss" in m]
    eval_steps = [s for s, m in events if "eval_loss" in m]
    assert train_steps == [1, 4, 8, 12, 16] and eval_steps == [0, 8, 16]
    assert all({"train_loss", "learning_rate", "tokens_per_s"} <= set(m) for s, m in events if "train_loss" in m)
    assert all("perplexity" in m for s, m in events if "eval_loss" in m)
    lines = [json.loads(x) for x in open(result["metrics_file"])]
    assert [x["step"] for x in lines if x["kind"] == "eval"] == eval_steps
    assert lines[-1]["kind"] == "summary" and lines[-1]["global_step"] == 16

    # checkpoints: rotated to the newest one, complete; the final model is a plain transformers model
    from runner.local import checkpoints

    kept = checkpoints.list_checkpoints(result["checkpoints_dir"])
    assert [p.name for p in kept] == ["checkpoint-16"] and checkpoints.is_complete(kept[0])
    model = AutoModelForCausalLM.from_pretrained(result["final_model_dir"])
    tokenizer = AutoTokenizer.from_pretrained(result["final_model_dir"])
    assert model.config._attn_implementation == "sdpa" and model.config.use_cache
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]

    # a second run with the same data loads the tokenized cache
    again = run_train(tiny_model_dir, chat_data, tmp_path / "run", max_steps=1, max_seq_length=256,
                      evaluation_strategy="disable", eval_before_training=False)
    assert again["tokenized_cache_hit"] and again["global_step"] == 1


def _lora_size(config, r, modules):
    shapes = {  # (in, out) of the Phi-3 projections
        "qkv_proj": (config.hidden_size, 3 * config.hidden_size),
        "o_proj": (config.hidden_size, config.hidden_size),
        "gate_up_proj": (config.hidden_size, 2 * config.intermediate_size),
        "down_proj": (config.intermediate_size, config.hidden_size),
    }
    return config.num_hidden_layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in modules)


def test_lora_vs_full_parameter_counts(tiny_model_dir, chat_data, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    short = dict(max_steps=2, max_seq_length=128, evaluation_strategy="disable", eval_before_training=False,
                 apply_lora=True, lora_r=8, lora_alpha=16, lora_target_modules=targets)

    lora = run_train(tiny_model_dir, chat_data, tmp_path / "lora", **short)
    assert lora["trainable_params"] == _lora_size(config, 8, targets)
    assert lora["total_params"] == base + lora["trainable_params"]

    embed = config.vocab_size * config.hidden_size
    saved = run_train(tiny_model_dir, chat_data, tmp_path / "lora_save", merge_lora_weights=False,
                      lora_modules_to_save=["lm_head", "embed_tokens"], **short)
    assert saved["trainable_params"] == _lora_size(config, 8, targets) + 2 * embed  # trainable copies of both
    assert saved["total_params"] == base + saved["trainable_params"]
    assert saved["lora_merged"] is False and "adapter_config.json" in os_listdir(saved["adapter_dir"])

    full = run_train(tiny_model_dir, chat_data, tmp_path / "full", max_steps=2, max_seq_length=128,
                     evaluation_strategy="disable", eval_before_training=False)
    assert full["trainable_params"] == full["total_params"] == base

    for result in (lora, saved):  # merged: the final model is the base architecture, nothing of PEFT left
        merged = AutoModelForCausalLM.from_pretrained(result["final_model_dir"])
        assert sum(p.numel() for p in merged.parameters()) == base
        assert not any("lora" in name for name, _ in merged.named_parameters())
    with pytest.raises(RunnerError, match="lora_target_modules.*module names in this model"):
        run_train(tiny_model_dir, chat_data, tmp_path / "bad", **{**short, "lora_target_modules": ["q_proj"]})


def os_listdir(path):
    import os

    return os.listdir(path)


@pytest.mark.parametrize("overrides, message", [
    ({"precision": 16}, "precision=16 needs a CUDA GPU"),
    ({"apply_deepspeed": True}, "apply_deepspeed=true needs CUDA"),
    ({"metric_for_best_model": "f1"}, "metric_for_best_model='f1'"),
    ({"apply_lora": True, "apply_deepspeed": True, "deepspeed_stage": 3}, "apply_lora=true with .*deepspeed_stage=3"),
])
def test_impossible_settings_are_refused_before_loading(overrides, message, tmp_path):
    # No model folder and no data exist: the refusal must come before anything is read.
    with pytest.raises(RunnerError, match=message):
        run_train(tmp_path / "no-model", {"train_sft": tmp_path / "x", "test_sft": None}, tmp_path / "out",
                  **overrides)


def test_early_stopping_stops_and_keeps_the_best_checkpoint(tiny_model_dir, chat_data, tmp_path):
    # No evaluation can improve on the first by more than the threshold: patience 1 stops at the second one.
    result = run_train(tiny_model_dir, chat_data, tmp_path / "es", num_train_epochs=4, learning_rate=2e-3,
                       per_device_train_batch_size=8, max_seq_length=128, evaluation_strategy="steps",
                       eval_steps=2, logging_steps=2, save_steps=100, apply_early_stopping=True,
                       early_stopping_patience=1, early_stopping_threshold=10.0)
    assert result["stopped_early"] and result["global_step"] < 32
    assert (result["best_step"], result["global_step"]) == (2, 4)
    assert result["loaded_best_checkpoint"].endswith(f"checkpoint-{result['best_step']}")
    assert result["eval_loss"] == pytest.approx(result["best_eval_loss"], rel=1e-4)


@pytest.mark.parametrize("overrides, steps, eval_at", [
    # 64 rows, 8 per micro-batch: 8 micro-batches per epoch
    ({"gradient_accumulation_steps": 2, "num_train_epochs": 2}, 8, [4, 8]),  # epoch evals at 4 and 8
    ({"optim": "adafactor", "logging_strategy": "epoch", "lr_scheduler_type": "linear"}, 8, [8]),
    ({"packing": False, "pad_to_max_length": True, "evaluation_strategy": "steps",
      "evaluation_steps_interval": 0.5}, 8, [4, 8]),  # half an epoch between evaluations
    ({"max_tokens_per_batch": 200}, None, None),  # a token budget splits batches: more, smaller steps
])
def test_finetune_keys_are_honoured(tiny_model_dir, chat_data, tmp_path, overrides, steps, eval_at):
    events = []
    settings = dict(per_device_train_batch_size=8, per_device_eval_batch_size=8, max_seq_length=128,
                    learning_rate=2e-3, evaluation_strategy="epoch", eval_before_training=False, logging_steps=2)
    settings.update(overrides)
    result = run_train(tiny_model_dir, chat_data, tmp_path / "run", log_fn=lambda m, s: events.append((s, m)),
                       **settings)
    if steps is not None:
        assert result["global_step"] == steps
        assert [s for s, m in events if "eval_loss" in m] == eval_at
    else:
        assert result["global_step"] > 8 and result["steps_per_epoch"] == result["global_step"]
    if overrides.get("packing") is False:
        assert result["packing"] is False and 0.0 < result["padding_fraction"] < 1.0
    if overrides.get("logging_strategy") == "epoch":
        assert [s for s, m in events if "train_loss" in m] == [1, 8]  # first step, then the epoch's end
    assert result["eval_loss"] is not None and result["eval_loss"] == result["eval_loss"]  # not NaN
