"""OpenAI's presence_penalty, frequency_penalty and logit_bias as one per-row logits processor.

As the OpenAI API defines them, on the raw logits before temperature and top-p, counting only the tokens this row
has generated so far (not the prompt):
    logits[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0);  logits[j] += logit_bias[j]
Rows without any of them are left exactly as they were.
"""

from typing import Dict, Sequence


def needs_adjusting(job) -> bool:
    return bool(job.presence_penalty or job.frequency_penalty or job.logit_bias)


class TokenPenalties:
    """Called by `generate` with (input_ids, scores); input_ids hold the (left-padded) prompts in their first
    `prompt_width` columns, then the generated tokens."""

    def __init__(self, jobs: Sequence, prompt_width: int):
        import torch

        self.prompt_width = prompt_width
        self.presence = torch.tensor([float(j.presence_penalty) for j in jobs]).unsqueeze(1)
        self.frequency = torch.tensor([float(j.frequency_penalty) for j in jobs]).unsqueeze(1)
        self.bias: Dict[int, Dict[int, float]] = {row: dict(j.logit_bias) for row, j in enumerate(jobs)
                                                  if j.logit_bias}
        self.penalised = bool((self.presence != 0).any() or (self.frequency != 0).any())

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float()
        if self.penalised:
            generated = input_ids[:, self.prompt_width:]
            counts = torch.zeros_like(scores)
            if generated.shape[1]:
                counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
            presence, frequency = self.presence.to(scores.device), self.frequency.to(scores.device)
            scores = scores - frequency * counts - presence * (counts > 0).to(scores.dtype)
        for row, bias in self.bias.items():
            ids = torch.tensor(list(bias), device=scores.device)
            scores[row, ids] += torch.tensor(list(bias.values()), device=scores.device, dtype=scores.dtype)
        return scores
