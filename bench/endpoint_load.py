"""Load benchmark of the local endpoint: N concurrent clients against the running endpoint (dynamic batching),
side by side with the baseline of one-at-a-time `model.generate` in-process on the same model and prompts.

    python bench/endpoint_load.py                      # tiny model built offline, 16 clients, 128 requests
    python bench/endpoint_load.py --clients 16 --requests 256 --max-new-tokens 64 --model <save_pretrained folder>

Prints requests/s of both, their ratio, p50/p99 latency and errors (must be 0; the exit code is 1 otherwise).
Both sides decode greedily with the same max_new_tokens and the same stop tokens, and use the same torch thread
count, so they do the same work; the token totals are printed to show it.
"""

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

TOPICS = ["lists", "dictionaries", "sets", "tuples", "strings", "files", "sorting", "classes"]
ASKS = ["What are {t} in Python?", "Give me a tip about {t}.", "How do I loop over {t}?", "Explain {t} to a child.",
        "When should I avoid {t}?", "Write one sentence about {t}.", "Compare {t} with arrays.", "Why use {t}?"]


def prompts(n: int):
    out = []
    for i in range(n):
        ask = ASKS[(i // len(TOPICS)) % len(ASKS)].format(t=TOPICS[i % len(TOPICS)])
        out.append([{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": f"{ask} (#{i})"}])
    return out


def model_folder(model):
    """(the model folder to serve, the temporary folder to clean up or None): `model`, else the offline tiny model
    built into a temporary folder."""
    if model:
        return Path(model), None
    from runner.local.tiny_model import build_tiny_model

    tmp = tempfile.TemporaryDirectory(prefix="bench-tiny-")
    print("building the offline tiny model ...", flush=True)
    return build_tiny_model(Path(tmp.name) / "tiny-phi3"), tmp


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def run_endpoint(model_dir, chats, args):
    import httpx

    from runner.local.endpoint.manager import read_key, start_endpoint, stop_endpoint
    from runner.local.endpoint.settings import EndpointSettings

    state_dir = Path(tempfile.mkdtemp(prefix="bench-endpoint-"))
    state = start_endpoint(EndpointSettings(name="bench-endpoint", deployments={"demo": str(model_dir)},
                                            traffic={"demo": 100}, max_batch_size=args.max_batch_size,
                                            batch_window_ms=args.batch_window_ms), state_dir=state_dir)
    headers = {"Authorization": f"Bearer {read_key(state)}"}
    url = state["url"] + "/v1/chat/completions"
    latencies, errors, tokens = [], [], []
    lock, next_index = threading.Lock(), iter(range(len(chats)))

    def ask(client, chat):
        body = {"model": "demo", "messages": chat, "max_tokens": args.max_new_tokens, "temperature": 0}
        started = time.perf_counter()
        r = client.post(url, json=body, headers=headers, timeout=300)
        return time.perf_counter() - started, r

    def client_loop():
        with httpx.Client() as client:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                try:
                    elapsed, r = ask(client, chats[i])
                except Exception as exc:  # a dropped connection counts as an error, not a crash of the bench
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    if r.status_code == 200:
                        latencies.append(elapsed)
                        tokens.append(r.json()["usage"]["completion_tokens"])
                    else:
                        errors.append(f"{r.status_code}: {r.text[:200]}")

    try:
        with httpx.Client() as warm:  # first-request costs (lazy imports, allocator) are not load
            for chat in chats[:2]:
                ask(warm, chat)
        before = httpx.get(state["url"] + "/health/ready", headers=headers).json()["batching"][0]
        started = time.perf_counter()
        threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        after = httpx.get(state["url"] + "/health/ready", headers=headers).json()["batching"][0]
    finally:
        stop_endpoint(state["name"], state_dir=state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)  # only the server log is left there
    batches = after["batches"] - before["batches"]
    served = after["requests"] - before["requests"]
    return {"wall": wall, "latencies": latencies, "errors": errors, "tokens": sum(tokens),
            "note": f"{batches} generate batches, mean size {served / max(batches, 1):.1f}, "
                    f"largest {after['largest_batch']}"}


def run_baseline(model_dir, chats, args):
    """One request at a time through plain model.generate: the way a naive server would serve them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.local.endpoint.generation import END_TOKEN, set_torch_threads

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    set_torch_threads(None, model)  # the same rule the server uses
    eos = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_TOKEN)})

    def generate(chat):
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        tokenizer.decode(new, skip_special_tokens=True)
        return len(new)

    for chat in chats[:2]:
        generate(chat)
    latencies, tokens = [], 0
    started = time.perf_counter()
    for chat in chats:
        t0 = time.perf_counter()
        tokens += generate(chat)
        latencies.append(time.perf_counter() - t0)
    return {"wall": time.perf_counter() - started, "latencies": latencies, "errors": [], "tokens": tokens,
            "note": f"{torch.get_num_threads()} torch thread(s), batch size 1"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=128, help="requests in total (each side gets the same prompts)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-window-ms", type=float, default=10.0)
    p.add_argument("--model", default=None, help="a save_pretrained folder (default: the offline tiny model)")
    args = p.parse_args(argv)

    model_dir, tmp = model_folder(args.model)
    chats = prompts(args.requests)
    print(f"{args.requests} requests, greedy, max_new_tokens={args.max_new_tokens}; endpoint: {args.clients} "
          f"concurrent clients, max_batch_size={args.max_batch_size}, window {args.batch_window_ms} ms", flush=True)
    endpoint = run_endpoint(model_dir, chats, args)
    baseline = run_baseline(model_dir, chats, args)

    rows = [("one-at-a-time generate (baseline)", baseline), (f"endpoint, {args.clients} clients", endpoint)]
    print(f"\n{'':36s} {'requests':>8s} {'errors':>6s} {'seconds':>8s} {'req/s':>7s} {'tokens':>7s} "
          f"{'p50 ms':>8s} {'p99 ms':>8s}")
    for label, r in rows:
        done = len(r["latencies"])
        print(f"{label:36s} {done:8d} {len(r['errors']):6d} {r['wall']:8.2f} {done / r['wall']:7.1f} "
              f"{r['tokens']:7d} {percentile(r['latencies'], 50) * 1000:8.0f} "
              f"{percentile(r['latencies'], 99) * 1000:8.0f}   {r['note']}")
    ratio = (len(endpoint["latencies"]) / endpoint["wall"]) / (len(baseline["latencies"]) / baseline["wall"])
    print(f"\nthroughput ratio endpoint / baseline: {ratio:.1f}x (target >= 4x: {'met' if ratio >= 4 else 'NOT met'})")
    for e in endpoint["errors"][:5]:
        print("error:", e)
    if tmp:
        tmp.cleanup()
    return 1 if endpoint["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
