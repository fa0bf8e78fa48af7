"""The local evaluator on the tiny model: honest when nothing changed, `worse` for a damaged model, the adapter
switched off is exactly the base, and the replies are the endpoint's own."""

import json

import pytest

from runner.evaluation.stats import BETTER, UNCLEAR, WORSE
from runner.local.evaluator import EvaluatorSettings, evaluate

pytestmark = pytest.mark.slow

QUICK = dict(max_rows=12, max_new_tokens=10, batch_size=6, resamples=200, seed=3)


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    from runner.data.sample import generate_rows

    path = tmp_path_factory.mktemp("eval") / "test_sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in generate_rows(20, 42, "test_sft")), encoding="utf-8")
    return path


def _save_variant(tiny_model_dir, out, change):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    change(model)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def damaged_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with every weight scaled by 4: its logits are sharp and wrong."""
    import torch

    def scale(model):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(4.0)
    return _save_variant(tiny_model_dir, tmp_path_factory.mktemp("damaged") / "model", scale)


def _adapter(tiny_model_dir, out, perturb: bool):
    """A LoRA adapter (with the head in modules_to_save, as the tiny recipe trains it); fresh (B = 0, so exactly the
    base) or with random B and a changed head."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"],
                                                  modules_to_save=["lm_head"]))
    if perturb:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    p.add_(torch.randn_like(p) * 0.5)
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_fine_tuned_equal_to_base_is_no_clear_difference_everywhere(tiny_model_dir, eval_file):
    messages = []
    evaluation = evaluate(base_dir=tiny_model_dir, ft_dir=tiny_model_dir, rows_file=eval_file,
                          settings=EvaluatorSettings(**QUICK), progress=messages.append)
    assert len(evaluation.rows) == 12 and evaluation.info["mode"] == "merged"
    assert {c.metric for c in evaluation.comparisons} >= {"loss", "rouge_l", "bleu", "chrf", "exact_match"}
    for c in evaluation.comparisons:
        assert c.verdict == UNCLEAR and c.ci_low <= 0 <= c.ci_high, c
    assert [o.reply for o in evaluation.base] == [o.reply for o in evaluation.ft]
    assert any("rows/s" in m for m in messages) and "12/12 rows" in messages[-1]


def test_fresh_lora_adapter_is_no_clear_difference(tiny_model_dir, eval_file, tmp_path):
    adapter = _adapter(tiny_model_dir, tmp_path / "adapter", perturb=False)
    evaluation = evaluate(base_dir=tiny_model_dir, adapter_dir=adapter, rows_file=eval_file,
                          settings=EvaluatorSettings(**QUICK), progress=None)
    assert evaluation.info["mode"] == "adapter"
    assert all(c.verdict == UNCLEAR and c.ci_low <= 0 <= c.ci_high for c in evaluation.comparisons)


def test_adapter_switched_off_scores_exactly_the_base(tiny_model_dir, eval_file, tmp_path):
    """disable_adapter() on the one loaded model gives the base's own scores and replies; the adapter on differs."""
    adapter = _adapter(tiny_model_dir, tmp_path / "adapter", perturb=True)
    settings = EvaluatorSettings(**{**QUICK, "metrics": ["loss", "token_accuracy", "rouge_l"]})
    with_adapter = evaluate(base_dir=tiny_model_dir, adapter_dir=adapter, rows_file=eval_file, settings=settings,
                            progress=None)
    alone = evaluate(base_dir=tiny_model_dir, ft_dir=tiny_model_dir, rows_file=eval_file, settings=settings,
                     progress=None)
    for a, b in zip(with_adapter.base, alone.base):
        assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-4) and a.reply == b.reply
    assert with_adapter.comparison("loss").ft != pytest.approx(with_adapter.comparison("loss").base, rel=1e-3)


def test_damaged_model_is_worse_and_the_undamaged_better(tiny_model_dir, damaged_dir, eval_file, tmp_path):
    from runner.evaluation.report import write_outputs

    settings = EvaluatorSettings(**QUICK)
    damaged = evaluate(base_dir=tiny_model_dir, ft_dir=damaged_dir, rows_file=eval_file, settings=settings,
                       progress=None)
    assert damaged.comparison("loss").verdict == WORSE and damaged.comparison("perplexity").verdict == WORSE
    assert damaged.comparison("loss").ci_low > 0
    repaired = evaluate(base_dir=damaged_dir, ft_dir=tiny_model_dir, rows_file=eval_file, settings=settings,
                        progress=None)
    assert repaired.comparison("loss").verdict == BETTER
    paths = write_outputs(damaged, tmp_path / "evaluate")
    doc = json.loads(open(paths["metrics_json"]).read())
    assert doc["verdicts"]["loss"] == WORSE
    # the register gate on this metric refuses it, and passes the repaired one
    from runner.evaluation.gate import improvement_refusal
    from runner.evaluation.report import metrics_document

    assert "Loss is worse than the base model" in improvement_refusal(doc, "loss")
    assert improvement_refusal(metrics_document(repaired), "loss") is None


def test_replies_are_the_endpoints_greedy_replies(tiny_model_dir, eval_file):
    """Train/serve parity on generations: each fine-tuned reply equals ChatGenerator.generate_one on the row."""
    from runner.local.endpoint.generation import ChatGenerator

    evaluation = evaluate(base_dir=tiny_model_dir, ft_dir=tiny_model_dir, rows_file=eval_file,
                          settings=EvaluatorSettings(**{**QUICK, "max_rows": 4, "metrics": ["rouge_l", "stop_rate"]}),
                          progress=None)
    generator = ChatGenerator.from_uri(str(tiny_model_dir))
    for row, out in zip(evaluation.rows, evaluation.ft):
        single = generator.generate_one(row.prompt, max_new_tokens=QUICK["max_new_tokens"])
        assert out.reply == single.text and out.stopped == (single.finish_reason == "stop")


def test_time_budget_stops_after_a_batch_on_paired_rows(tiny_model_dir, eval_file):
    messages = []
    evaluation = evaluate(base_dir=tiny_model_dir, ft_dir=tiny_model_dir, rows_file=eval_file,
                          settings=EvaluatorSettings(**{**QUICK, "time_budget_s": 1e-6}), progress=messages.append)
    assert evaluation.info["stopped_early"] and evaluation.info["rows_scored"] == 6
    assert evaluation.info["rows_selected"] == 12 and len(evaluation.base) == len(evaluation.ft) == 6
    assert any("time budget" in m for m in messages)


def test_rows_longer_than_the_context_are_refused_before_generation(tiny_model_dir, tmp_path):
    from runner.evaluation.rows import EvaluationDataError

    long_prompt = " ".join(["word"] * 3000)
    path = tmp_path / "long.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "ok"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EvaluationDataError, match=r"1 of 2 rows do not fit the model's context of 1024 tokens.*"
                                                  r"long.jsonl:2 \(prompt \d+ tokens"):
        evaluate(base_dir=tiny_model_dir, ft_dir=tiny_model_dir, rows_file=path,
                 settings=EvaluatorSettings(**QUICK), progress=None)


def test_teacher_forced_sums_match_transformers_own_loss_row_by_row(tiny_model_dir, eval_file):
    """Batched and padded, each row's loss over its reference turn equals the model's own loss on that row alone
    with labels on the reference turn only (earlier assistant turns are prompt, not scored)."""
    import torch
    from transformers import AutoModelForCausalLM

    from runner.evaluation.rows import load_rows
    from runner.local.endpoint.generation import ChatGenerator
    from runner.local.evaluator import encode_rows, teacher_forced_batch

    generator = ChatGenerator.from_uri(str(tiny_model_dir))
    rows = load_rows(eval_file, max_rows=4, seed=0)
    encoded = encode_rows(rows, generator, max_new_tokens=8, context_length=1024, teacher_forced=True,
                          generated=True)
    batched = teacher_forced_batch(generator.model, encoded, generator.pad_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for row, e, (nll, n, hits) in zip(rows, encoded, batched):
        labels = torch.tensor([e.labels])
        reference_ids = generator.tokenizer(row.reference, add_special_tokens=False)["input_ids"]
        assert n == len(reference_ids) + 1  # the reference's tokens and the end-of-turn token that closes it
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([e.input_ids]), labels=labels).loss
        assert nll / n == pytest.approx(float(alone), rel=1e-4)
        assert 0 <= hits <= n
