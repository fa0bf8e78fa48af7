"""`test.rows=N`: the deployed endpoint scored on N of the evaluation's own held-out rows, with the evaluate
step's metrics, through both routes (Azure's `/score` and the OpenAI chat route), greedy and with the evaluate
step's `max_new_tokens`, so each reply can be held against the fine-tuned reply the evaluate step generated for
the same row: train/serve parity, proven on generations.

Which rows: the first N of the evaluate step's rows.jsonl (the rows it scored, with its replies), else N rows of
the held-out split chosen by `evaluate.seed` (no evaluate replies to compare with then).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from runner.errors import RunnerError
from runner.evaluation.metrics import METRICS, RowOutput


@dataclass
class EndpointRow:
    prompt: List[Dict[str, str]]
    reference: str
    evaluate_reply: Optional[str] = None  # the evaluate step's fine-tuned reply on this row, when it ran


def rows_from_evaluation(rows_jsonl, n: int) -> List[EndpointRow]:
    out = []
    with open(rows_jsonl, encoding="utf-8") as f:
        for line in f:
            if len(out) == n:
                break
            r = json.loads(line)
            out.append(EndpointRow(r["prompt"], r["reference"], r.get("ft_reply")))
    return out


def rows_from_file(rows_file, n: int, seed: int, train_file=None) -> List[EndpointRow]:
    from runner.evaluation.rows import load_rows

    return [EndpointRow(r.prompt, r.reference) for r in load_rows(rows_file, max_rows=n, seed=seed,
                                                                   train_file=train_file)]


def pick_rows(evaluate_outputs: Optional[Dict[str, Any]], data_outputs: Optional[Dict[str, Any]],
              evaluate_cfg, n: int) -> List[EndpointRow]:
    rows_jsonl = (evaluate_outputs or {}).get("rows_jsonl")
    if rows_jsonl and Path(rows_jsonl).is_file():
        return rows_from_evaluation(rows_jsonl, n)
    from runner.evaluation.rows import rows_file_for

    rows_file, train_file = rows_file_for(data_outputs, evaluate_cfg.file)
    return rows_from_file(rows_file, n, evaluate_cfg.seed, train_file)


def route_scores(outputs: Sequence[RowOutput], references: Sequence[str], names: Sequence[str]) -> Dict[str, float]:
    """The generated metrics a route's replies allow (stop rate and reply length need the OpenAI route's
    finish_reason and token counts; /score returns text only)."""
    scores = {}
    for name in names:
        metric = METRICS[name]
        if metric.kind != "generated":
            continue
        try:
            scores[name] = round(metric.value(metric.stats(outputs, references)), 6)
        except RunnerError:  # a field this route does not return: the metric is left out
            continue
    return scores


def parity(rows: Sequence[EndpointRow], replies: Sequence[Optional[str]]) -> Optional[Dict[str, Any]]:
    """How many endpoint replies equal the evaluate step's fine-tuned reply for the same row (None: no evaluate
    replies to compare with)."""
    pairs = [(r.evaluate_reply, reply) for r, reply in zip(rows, replies) if r.evaluate_reply is not None]
    if not pairs:
        return None
    differ = [i for i, (a, b) in enumerate(pairs) if a != b]
    return {"rows": len(pairs), "equal": len(pairs) - len(differ), "differ": differ[:10]}
