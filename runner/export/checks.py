"""llama.cpp against transformers on the same chats: the exported GGUF must tokenize alike, predict the same next
token at every assistant position (teacher forcing) and, formatting chats with the template embedded in the GGUF,
stop its greedy replies on the end-of-turn token. Used by the tests and by the export's own check."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class CheckReport:
    chats: int = 0
    tokenization_mismatches: List[int] = field(default_factory=list)  # indexes of chats that differ
    positions: int = 0  # assistant positions compared
    agreeing: int = 0
    stopped: int = 0  # greedy replies that ended on the end token
    same_reply: int = 0  # greedy replies equal to transformers' greedy reply
    replies: List[Dict[str, str]] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        return self.agreeing / self.positions if self.positions else 0.0

    def as_dict(self) -> Dict:
        return {"chats": self.chats, "tokenization_mismatches": self.tokenization_mismatches,
                "positions": self.positions, "agreeing": self.agreeing, "agreement": self.agreement,
                "stopped": self.stopped, "same_reply": self.same_reply}


def load_gguf(path, n_ctx: int = 1024):
    """The GGUF in llama.cpp (llama-cpp-python), with every position's logits kept for teacher forcing."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0)


def _assistant_mask(tokenizer, messages, template: Optional[str]):
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, chat_template=template,
                                        return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def compare(llm, model, tokenizer, chats: List[List[Dict[str, str]]], *, max_new_tokens: int = 48,
            mask_template: Optional[str] = None, end_tokens: Optional[List[str]] = None) -> CheckReport:
    """Compare llm (a loaded GGUF) with the transformers model on chats (each ending in an assistant turn).
    mask_template: a template with {% generation %} markers to find the assistant positions (default: the
    tokenizer's); end_tokens: what ends a reply on the transformers side (default: its EOS), as the export's stop
    list says."""
    import numpy as np
    import torch

    report = CheckReport(chats=len(chats))
    end_ids = {tokenizer.convert_tokens_to_ids(t) for t in end_tokens} if end_tokens else {tokenizer.eos_token_id}
    for i, chat in enumerate(chats):
        text = tokenizer.apply_chat_template(chat, tokenize=False, chat_template=mask_template)
        hf_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) != hf_ids:
            report.tokenization_mismatches.append(i)
        ids, mask = _assistant_mask(tokenizer, chat, mask_template)
        # position p predicts token p+1: compare where the predicted token is an assistant token
        positions = [p for p in range(len(ids) - 1) if mask[p + 1]]
        llm.reset()
        llm.eval(ids)
        ours = np.asarray(llm.scores[: len(ids)]).argmax(-1)
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits[0].argmax(-1).numpy()
        report.positions += len(positions)
        report.agreeing += int(sum(ours[p] == theirs[p] for p in positions))
        _greedy(llm, model, tokenizer, chat[:-1], max_new_tokens, end_ids, report)
    return report


def _greedy(llm, model, tokenizer, prompt_chat, max_new_tokens, end_ids, report: CheckReport) -> None:
    """llama.cpp formats the chat with the template embedded in the GGUF (its own chat handler)."""
    import torch

    out = llm.create_chat_completion(messages=prompt_chat, temperature=0.0, top_k=1, repeat_penalty=1.0,
                                     max_tokens=max_new_tokens)
    choice = out["choices"][0]
    ours = choice["message"]["content"] or ""
    prompt = tokenizer.apply_chat_template(prompt_chat, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=sorted(end_ids), pad_token_id=tokenizer.pad_token_id)
    new = gen[0, prompt["input_ids"].shape[1]:].tolist()
    theirs = tokenizer.decode([t for t in new if t not in end_ids], skip_special_tokens=False)
    hf_stopped = bool(new) and new[-1] in end_ids
    report.stopped += int(choice["finish_reason"] == "stop")
    ours, theirs = ours.replace("\ufffd", ""), theirs.replace("\ufffd", "")  # a cut UTF-8 sequence
    report.same_reply += int(ours == theirs and hf_stopped == (choice["finish_reason"] == "stop"))
    report.replies.append({"llama_cpp": ours, "transformers": theirs, "finish_reason": choice["finish_reason"]})
