"""The export (runner/export/): merged weights, GGUF through llama.cpp's own converter, an Ollama Modelfile,
and the refusals. The GGUF checks load each file in llama.cpp itself (llama-cpp-python)."""

import errno
import json
import sys

import pytest

from runner.export import chat_template as ct
from runner.export.errors import ExportError
from runner.export.gotemplate import render_ollama
from runner.export.modelfile import modelfile_text, parse_modelfile
from tests.export.helpers import held_out_chats, write_rows


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """The tiny model fine-tuned with LoRA (+ embeddings and head) until its replies end on <|end|>; the adapter is
    kept beside the merged final model."""
    from tests.local.test_train import run_train

    data = write_rows(tmp_path_factory.mktemp("export-data"), 480, 16)
    out = tmp_path_factory.mktemp("export-train") / "run"
    return run_train(tiny_model_dir, data, out, num_train_epochs=10, per_device_train_batch_size=8,
                     learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=10, max_seq_length=512,
                     evaluation_strategy="disable", eval_before_training=False, save_steps=10_000,
                     apply_lora=True, merge_lora_weights=False, lora_modules_to_save=["lm_head", "embed_tokens"])


@pytest.fixture(scope="module")
def exported(trained, sdist, tmp_path_factory):
    from runner.export.pipeline import export_model

    out = tmp_path_factory.mktemp("export-out")
    record = export_model(trained["final_model_dir"], out, ["merged", "gguf_f16", "gguf_q8_0"], name="tiny-phi3-sample",
                          converter=str(sdist), cache_dir=out.parent / "converter-cache",
                          check_chats=held_out_chats(6))  # the export's own llama.cpp re-check
    return out, record


CHATS_WITH_SYSTEM = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "What is tea?\nBriefly."}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "  two spaces"},
     {"role": "assistant", "content": "ok."}, {"role": "user", "content": "And {{ braces }}?"}],
    [{"role": "system", "content": "Multi\nline\nsystem"}, {"role": "user", "content": "\u00e9t\u00e9 \U0001F680"}],
]


# ---- chat template and Modelfile (no llama.cpp needed) ------------------------------------------------------------

def test_generation_markers_are_removed_without_changing_the_text(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    stripped = ct.strip_generation_markers(tok.chat_template)
    assert "{% generation %}" in tok.chat_template and "generation %}" not in stripped
    for chat in CHATS_WITH_SYSTEM:
        assert tok.apply_chat_template(chat, chat_template=stripped, tokenize=False, add_generation_prompt=True) == \
            tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    marked = "{%- generation -%} x {% endgeneration %}"
    assert ct.strip_generation_markers(marked) == "{%- if true -%} x "


def test_modelfile_template_renders_the_chat_template_for_chats_with_a_system_turn(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = ct.strip_generation_markers(tok.chat_template)
    render = ct.tokenizer_renderer(tok, template)
    parts = ct.analyse(render, tok.all_special_tokens)
    ends = ct.end_tokens(parts, tok.eos_token, [])
    parsed = parse_modelfile(modelfile_text("m-q8_0.gguf", parts, ends))
    assert parsed["FROM"] == "./m-q8_0.gguf" and parsed["stop"] == ["<|end|>"] and "SYSTEM" not in parsed
    for chat in CHATS_WITH_SYSTEM:
        assert render_ollama(parsed["TEMPLATE"], chat) == render(chat, True), chat


QWEN_LIKE = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>"
             "\\n' }}{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
             "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_a_default_system_prompt_becomes_the_modelfile_system_and_renders_alike():
    render = ct._jinja_render(QWEN_LIKE, {})
    parts = ct.analyse(render, ["<|im_end|>", "<|endoftext|>"])
    assert parts.default_system == "You are a helpful assistant."
    parsed = parse_modelfile(modelfile_text("m.gguf", parts, ct.end_tokens(parts, "<|endoftext|>", [])))
    assert parsed["SYSTEM"] == "You are a helpful assistant." and parsed["stop"] == ["<|im_end|>", "<|endoftext|>"]
    for chat in [*CHATS_WITH_SYSTEM, [{"role": "user", "content": "no system here"}]]:
        assert render_ollama(parsed["TEMPLATE"], chat, parsed["SYSTEM"]) == render(chat, True)


def test_a_template_that_is_not_fixed_text_around_messages_is_refused():
    odd = "{% for m in messages %}{{ m['role'] }}{% if loop.index is even %}!{% endif %}: {{ m['content'] }}\n" \
          "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(ExportError, match="chat template"):
        ct.analyse(ct._jinja_render(odd, {}), [])


# ---- refusals -------------------------------------------------------------------------------------------------------

def test_unknown_format_is_refused_by_the_export_and_the_schema(tmp_path):
    from runner.export.pipeline import export_model
    from runner.schema import ConfigError, validate
    from tests.conftest import compose_cfg

    with pytest.raises(ExportError, match="'gguf_q5'.*merged, gguf_f16, gguf_q8_0, gguf_q4_k_m"):
        export_model(tmp_path, tmp_path / "out", ["merged", "gguf_q5"], name="x")
    with pytest.raises(ConfigError, match="export.formats has unknown format"):
        validate(compose_cfg(["export.formats=[merged,onnx]"]))
    with pytest.raises(ConfigError, match="export.check_chats=-1 is out of range"):
        validate(compose_cfg(["export.check_chats=-1"]))


def test_a_model_never_trained_is_refused(tmp_path):
    from runner.export.pipeline import export_model

    with pytest.raises(ExportError, match="never trained or registered"):
        export_model(tmp_path / "no-such-run" / "final_model", tmp_path / "out", ["merged"], name="x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="holds no trained model"):
        export_model(tmp_path / "empty", tmp_path / "out", ["merged"], name="x")
    assert not (tmp_path / "out").exists()


def test_an_architecture_the_converter_does_not_cover_is_refused_before_writing(tiny_model_dir, sdist, tmp_path):
    from runner.export.pipeline import export_model
    from tests.export.helpers import model_with_architecture

    model = model_with_architecture(tiny_model_dir, tmp_path, "NotARealModelForCausalLM")
    with pytest.raises(ExportError, match="does not cover the architecture 'NotARealModelForCausalLM'"):
        export_model(model, tmp_path / "out", ["merged", "gguf_q8_0"], name="x", converter=str(sdist),
                     cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_a_converter_sdist_with_another_hash_is_refused(tmp_path):
    from runner.export.converter import PIN, locate_converter

    fake = tmp_path / PIN["sdist"]
    fake.write_bytes(b"not the pinned sdist")
    with pytest.raises(ExportError, match="not the pinned"):
        locate_converter(str(fake), tmp_path / "cache")
    with pytest.raises(ExportError, match="expected llama_cpp_python"):
        locate_converter(str(tmp_path / "nothing-here"), tmp_path / "cache")


def test_the_converter_comes_from_the_pinned_sdist_in_the_cache(sdist, tmp_path, monkeypatch):
    import subprocess

    from runner.export import converter

    (tmp_path / "download").mkdir()
    (tmp_path / "download" / sdist.name).symlink_to(sdist)  # as a previous `pip download` left it
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("no pip call when the sdist is cached"))
    conv = converter.locate_converter(None, tmp_path)
    assert conv.script.is_file() and (conv.root / "conversion" / "phi.py").is_file()
    assert "from the package registry (sha256 checked)" in conv.origin
    assert {"Phi3ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM"} <= conv.architectures()
    assert not (conv.root / "src").exists()  # only the converter's files are extracted


def test_q4_k_m_without_the_llama_cpp_library_is_refused_naming_it(tiny_model_dir, tmp_path, monkeypatch):
    from runner.export.pipeline import export_model

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(ExportError, match="llama-cpp-python==0.3.36"):
        export_model(tiny_model_dir, tmp_path / "out", ["gguf_q4_k_m"], name="x")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_is_refused_before_writing(tiny_model_dir, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from runner.export import files
    from runner.export.pipeline import export_model

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(ExportError, match="not enough disk space for the merged model"):
        export_model(tiny_model_dir, tmp_path / "out", ["merged"], name="x")
    assert not (tmp_path / "out" / "merged").exists()
    assert shutil is files.shutil


def test_a_disk_filling_up_mid_write_leaves_nothing_under_the_final_name(tmp_path):
    from runner.export.files import staged_file

    final = tmp_path / "model-q8_0.gguf"
    with pytest.raises(ExportError, match="disk filled up while writing model-q8_0.gguf"):
        with staged_file(final) as tmp:
            tmp.write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


# ---- merged ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_merged_model_reloads_with_the_adapter_models_logits(trained, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.export.pipeline import export_model

    record = export_model(trained["adapter_dir"], tmp_path / "out", ["merged"], name="x")
    merged_dir = tmp_path / "out" / "merged"
    assert record["outputs"]["merged"]["path"] == str(merged_dir)
    names = set(record["outputs"]["merged"]["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "generation_config.json",
            "chat_template.jinja"} <= names
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                        trained["adapter_dir"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(merged_dir)
    worst = 0.0
    for chat in held_out_chats(6):
        ids = torch.tensor([tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]])
        with torch.no_grad():
            worst = max(worst, (adapter(ids).logits - merged(ids).logits).abs().max().item())
    print(f"\nmerged vs adapter: max |logit difference| {worst:.3g}")
    assert worst < 1e-4, worst
    # and the fine-tune's own final model went through the same save (tokenizer.model included)
    from pathlib import Path

    assert (Path(trained["final_model_dir"]) / "tokenizer.model").is_file()


# ---- GGUF in llama.cpp ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_export_writes_the_formats_with_sizes_and_sha256(exported):
    from runner.export.gguf import read_metadata

    out, record = exported
    assert json.loads((out / "export.json").read_text()) == json.loads(json.dumps(record))
    assert set(record["outputs"]) == {"merged", "gguf_f16", "gguf_q8_0"}
    for fmt in ("gguf_f16", "gguf_q8_0"):
        info = record["outputs"][fmt]
        assert info["bytes"] > 100_000 and len(info["sha256"]) == 64
        meta = read_metadata(info["path"])
        assert meta["general.architecture"] == "phi3"
        assert "generation %}" not in meta["tokenizer.chat_template"]
        assert meta["tokenizer.ggml.eos_token_id"] == 2043  # <|end|>
        assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_space_prefix"] is False
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary left behind
    modelfile = parse_modelfile((out / "gguf" / "Modelfile").read_text())
    assert modelfile["FROM"] == "./tiny-phi3-sample-q8_0.gguf" and modelfile["stop"] == ["<|end|>"]
    assert record["ollama"]["command"] == f"ollama create tiny-phi3-sample -f {out / 'gguf' / 'Modelfile'}"


@pytest.mark.slow
@pytest.mark.parametrize("fmt, floor, same_floor", [("gguf_f16", 1.0, 6), ("gguf_q8_0", 0.99, 5)])
def test_gguf_in_llama_cpp_matches_transformers(exported, fmt, floor, same_floor):
    """The export's own re-check (runner/export/checks.py, recorded in export.json) on 6 held-out chats."""
    pytest.importorskip("llama_cpp")
    out, record = exported
    report = record["checks"][fmt]
    print(f"\ntiny {fmt}: {report}")
    assert json.loads((out / "export.json").read_text())["checks"][fmt] == json.loads(json.dumps(report))
    assert report["chats"] == 6 and report["tokenization_mismatches"] == []
    assert report["positions"] > 100
    assert report["agreement"] >= floor, report
    # the GGUF stops where transformers stops (same_reply compares the text and whether each stopped): on every chat
    # in f16; q8_0 may flip one greedy token (agreement >= 0.99) and so one reply. How many replies end on <|end|>
    # within the token cap depends on the training run (seen: 5 or 6 of 6).
    assert report["same_reply"] >= same_floor, report
    assert report["stopped"] >= report["chats"] // 2, report


# ---- the same on the real Phi-3 vocabulary and template -------------------------------------------------------------

@pytest.fixture(scope="module")
def phi3_exported(sdist, tmp_path_factory):
    from runner.export.pipeline import export_model
    from tests.export.helpers import build_phi3_vocab_model

    folder = tmp_path_factory.mktemp("phi3-vocab")
    model_dir = build_phi3_vocab_model(sdist, folder)
    record = export_model(model_dir, folder / "out", ["gguf_f16", "gguf_q8_0"], name="phi3-vocab",
                          converter=str(sdist), cache_dir=folder / "cache")
    return model_dir, folder / "out", record


@pytest.mark.slow
@pytest.mark.parametrize("fmt, floor, same_floor", [("gguf_f16", 1.0, 6), ("gguf_q8_0", 0.99, 5)])
def test_real_phi3_vocabulary_and_template_gguf_matches_transformers(phi3_exported, fmt, floor, same_floor):
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.export.checks import compare, load_gguf
    from tests.export.helpers import _marked

    model_dir, out, record = phi3_exported
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == 32064 and tok.convert_tokens_to_ids("<|end|>") == 32007
    chats = [[m for m in c if m["role"] != "system"] for c in held_out_chats(6)]  # the template drops them
    report = compare(load_gguf(record["outputs"][fmt]["path"]), model, tok, chats,
                     mask_template=_marked(tok.chat_template), end_tokens=record["chat_template"]["end_tokens"])
    print(f"\nphi-3 vocab {fmt}: {report.as_dict()}")
    assert report.tokenization_mismatches == []
    assert report.agreement >= floor, report.as_dict()
    # stops where transformers stops (see test_gguf_in_llama_cpp_matches_transformers); 240 steps: 6 of 6 stopped
    assert report.same_reply >= same_floor, report.replies
    assert report.stopped >= len(chats) // 2, report.replies
    modelfile = parse_modelfile((out / "gguf" / "Modelfile").read_text())
    assert modelfile["stop"][0] == "<|end|>"
    for chat in chats[:5]:
        prompt = chat[:-1]
        assert render_ollama(modelfile["TEMPLATE"], prompt) == \
            tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
