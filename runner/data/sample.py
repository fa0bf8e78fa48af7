"""The offline sample: synthetic conversations in exactly the ultrachat_200k schema.

No dataset hub is reachable here, so tests and the default run use conversations the project writes itself. They
are deterministic for a seed, several turns long, of varied length, some with a system message, some with
non-ASCII text — and LEARNABLE by a tiny model in a few hundred steps: every answer follows from its question by a
fixed rule (facts tables, arithmetic in words, list reversal, repetition, small translation tables), so eval loss
drops measurably and greedy replies move toward the data's answers. Pure Python and fast: the tiny model's
tokenizer is trained on these texts too.
"""

import hashlib
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

COUNTRIES = [  # country, capital, language
    ("France", "Paris", "French"), ("Spain", "Madrid", "Spanish"), ("Germany", "Berlin", "German"),
    ("Italy", "Rome", "Italian"), ("Japan", "Tokyo", "Japanese"), ("Portugal", "Lisbon", "Portuguese"),
    ("Poland", "Warsaw", "Polish"), ("Greece", "Athens", "Greek"), ("Egypt", "Cairo", "Arabic"),
    ("Kenya", "Nairobi", "Swahili"), ("Peru", "Lima", "Spanish"), ("Norway", "Oslo", "Norwegian"),
    ("Sweden", "Stockholm", "Swedish"), ("Austria", "Vienna", "German"), ("Ireland", "Dublin", "English"),
    ("Turkey", "Ankara", "Turkish"), ("Chile", "Santiago", "Spanish"), ("Vietnam", "Hanoi", "Vietnamese"),
]
THINGS = [("grass", "green"), ("the sky", "blue"), ("snow", "white"), ("coal", "black"), ("a banana", "yellow"),
          ("a tomato", "red"), ("an orange", "orange"), ("a plum", "purple"), ("chocolate", "brown"),
          ("a flamingo", "pink"), ("the sea", "blue"), ("a lemon", "yellow")]
WORDS = {  # English -> (Spanish, German, French, Japanese)
    "hello": ("hola", "hallo", "bonjour", "こんにちは"),
    "thank you": ("gracias", "danke", "merci", "ありがとう"),
    "water": ("agua", "Wasser", "eau", "水"),
    "bread": ("pan", "Brot", "pain", "パン"),
    "good night": ("buenas noches", "gute Nacht", "bonne nuit", "おやすみ"),
    "the child": ("el niño", "das Kind", "l'enfant", "子供"),
    "green": ("verde", "grün", "vert", "緑"),
    "the street": ("la calle", "die Straße", "la rue", "通り"),
}
LANGS = ["Spanish", "German", "French", "Japanese"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
ITEMS = ["apple", "river", "candle", "garden", "pencil", "window", "rocket", "violin", "kettle", "mirror",
         "lantern", "meadow", "café", "naïve", "jalapeño", "über"]
SYSTEM_PROMPTS = ["You are a concise assistant.", "Answer in one short sentence.",
                  "You are a helpful assistant. Be precise.", "Réponds brièvement, s'il te plaît."]

Turn = Tuple[str, str]


def _capital(rng: random.Random) -> List[Turn]:
    country, capital, language = rng.choice(COUNTRIES)
    turns = [(rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?"]),
              f"The capital of {country} is {capital}.")]
    if rng.random() < 0.6:
        turns.append(("And which language do people speak there?", f"In {country}, people mostly speak {language}."))
    if rng.random() < 0.3:
        turns.append((f"Tell me more about {capital}.",
                       f"{capital} is the capital of {country}. It is the seat of the government of {country}, "
                       f"and most people there speak {language}. Many visitors come to {capital} every year."))
    return turns


def _arithmetic(rng: random.Random) -> List[Turn]:
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    turns = [(f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is "
                                                           f"{NUMBERS[a + b]}.")]
    if rng.random() < 0.5:
        c = rng.randint(0, min(a + b, 10))
        turns.append((f"Now take away {NUMBERS[c]}.", f"{NUMBERS[a + b].capitalize()} minus {NUMBERS[c]} is "
                                                       f"{NUMBERS[a + b - c]}."))
    return turns


def _colour(rng: random.Random) -> List[Turn]:
    thing, colour = rng.choice(THINGS)
    turns = [(f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is usually {colour}.")]
    if rng.random() < 0.4:
        other, other_colour = rng.choice(THINGS)
        turns.append((f"What about {other}?", f"{other[0].upper() + other[1:]} is usually {other_colour}."))
    return turns


def _reverse(rng: random.Random) -> List[Turn]:
    items = rng.sample(ITEMS, rng.randint(3, 6))
    return [(f"Reverse this list: {', '.join(items)}", f"Reversed: {', '.join(reversed(items))}")]


def _repeat(rng: random.Random) -> List[Turn]:
    word = rng.choice(ITEMS)
    times = rng.randint(2, 5)
    return [(f"Say '{word}' {NUMBERS[times]} times.", " ".join([word] * times))]


def _translate(rng: random.Random) -> List[Turn]:
    english = rng.choice(sorted(WORDS))
    i = rng.randrange(len(LANGS))
    turns = [(f"How do you say '{english}' in {LANGS[i]}?", f"In {LANGS[i]}, '{english}' is '{WORDS[english][i]}'.")]
    if rng.random() < 0.5:
        j = rng.randrange(len(LANGS))
        turns.append((f"And in {LANGS[j]}?", f"In {LANGS[j]}, '{english}' is '{WORDS[english][j]}'."))
    return turns


def _units(rng: random.Random) -> List[Turn]:
    n = rng.randint(1, 20)
    unit, factor, small = rng.choice([("metres", 100, "centimetres"), ("kilograms", 1000, "grams"),
                                      ("hours", 60, "minutes"), ("minutes", 60, "seconds")])
    return [(f"How many {small} are in {n} {unit}?", f"{n} {unit} are {n * factor} {small}.")]


FAMILIES: List[Callable[[random.Random], List[Turn]]] = [_capital, _arithmetic, _colour, _reverse, _repeat,
                                                         _translate, _units]


def _conversation(rng: random.Random) -> List[Dict[str, str]]:
    turns = rng.choice(FAMILIES)(rng)
    if rng.random() < 0.35:  # several topics in one conversation, as real chats drift
        turns += rng.choice(FAMILIES)(rng)
    messages = []
    if rng.random() < 0.25:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def generate_rows(n: int, seed: int, split: str) -> List[Dict[str, Any]]:
    """`n` ultrachat-schema rows, the same for the same (seed, split), different across splits."""
    rng = random.Random(f"{seed}:{split}")
    rows = []
    for index in range(n):
        messages = _conversation(rng)
        prompt = next(m["content"] for m in messages if m["role"] == "user")
        prompt_id = hashlib.sha256(f"{split}:{seed}:{index}:{prompt}".encode()).hexdigest()
        rows.append({"prompt": prompt, "prompt_id": prompt_id, "messages": messages})
    return rows


def write_sample_dataset(download_dir, sample_rows: Dict[str, int], seed: int) -> Dict[str, Any]:
    """Write `<download_dir>/<split>.jsonl` for each split (atomically) and the manifest; returns the manifest."""
    from runner.data.download import write_manifest
    from runner.data.jsonl import write_jsonl_atomic

    download_dir = Path(download_dir)
    splits = {}
    for split, n in sample_rows.items():
        path = download_dir / f"{split}.jsonl"
        rows, digest = write_jsonl_atomic(path, generate_rows(int(n), seed, split))
        splits[split] = {"file": str(path), "rows": rows, "sha256": digest}
    request = {"source": "sample", "seed": seed, "sample_rows": dict(sample_rows), "split_percent": 100.0}
    return write_manifest(download_dir, request, splits)
