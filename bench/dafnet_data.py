"""Writes ``pysteer/recipes/data/edits.jsonl``: the project's sequential-editing set, in the shape of
ZsRE / CounterFact, built from facts the embedded model (SmolLM2-135M-Instruct) knows.

Three templated relations over countries and cities: a country's capital, a country's official
language, the country a city is in. A fact is kept only when the model's greedy continuation of the
edit prompt starts with the true answer's tokens ("it knows it"); its new target is another answer of
the same relation (a counterfactual, as in CounterFact), drawn with a fixed seed. Each record carries
two paraphrases of the prompt (generality) and two locality prompts from a pool of general-knowledge
questions that name no country or city, with the model's own greedy answer before any edit
(locality: the edited model must keep that answer). Records are split by subject into disjoint
``train`` (meta-training the editor) and ``eval`` (the sequential-editing report) parts, with the
three relations mixed in both.

Run ``python bench/dafnet_data.py`` to regenerate (greedy, seeded, deterministic; a few minutes on CPU).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "pysteer" / "recipes" / "data" / "edits.jsonl"
EVAL_SIZE = 100  # edits in the report's sequence; the rest meta-trains the editor
SEED = 0

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "Hungary": "Budapest",
    "Sweden": "Stockholm",
    "Norway": "Oslo",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Ireland": "Dublin",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Argentina": "Buenos Aires",
    "Cuba": "Havana",
    "Mexico": "Mexico City",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "India": "New Delhi",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Turkey": "Ankara",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Czech Republic": "Prague",
    "Switzerland": "Bern",
    "South Korea": "Seoul",
    "Indonesia": "Jakarta",
    "Philippines": "Manila",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
    "Nigeria": "Abuja",
    "Ethiopia": "Addis Ababa",
    "Morocco": "Rabat",
    "Saudi Arabia": "Riyadh",
    "Syria": "Damascus",
    "Lebanon": "Beirut",
    "Pakistan": "Islamabad",
    "Afghanistan": "Kabul",
    "United Kingdom": "London",
    "Scotland": "Edinburgh",
    "Iceland": "Reykjavik",
    "Croatia": "Zagreb",
    "Nepal": "Kathmandu",
    "Uganda": "Kampala",
    "Bangladesh": "Dhaka",
    "Sri Lanka": "Colombo",
    "New Zealand": "Wellington",
    "Estonia": "Tallinn",
    "Latvia": "Riga",
    "Cyprus": "Nicosia",
    "Tunisia": "Tunis",
}
LANGUAGES = {
    "France": "French",
    "Germany": "German",
    "Italy": "Italian",
    "Spain": "Spanish",
    "Japan": "Japanese",
    "Russia": "Russian",
    "Egypt": "Arabic",
    "Greece": "Greek",
    "Portugal": "Portuguese",
    "Austria": "German",
    "Poland": "Polish",
    "Hungary": "Hungarian",
    "Netherlands": "Dutch",
    "Thailand": "Thai",
    "Vietnam": "Vietnamese",
    "Peru": "Spanish",
    "Chile": "Spanish",
    "Argentina": "Spanish",
    "Cuba": "Spanish",
    "Mexico": "Spanish",
    "Turkey": "Turkish",
    "Romania": "Romanian",
    "Czech Republic": "Czech",
    "Indonesia": "Indonesian",
    "Colombia": "Spanish",
    "Venezuela": "Spanish",
    "Morocco": "Arabic",
    "Saudi Arabia": "Arabic",
    "Israel": "Hebrew",
    "Syria": "Arabic",
    "Lebanon": "Arabic",
    "Brazil": "Portuguese",
    "United Kingdom": "English",
    "Iceland": "Icelandic",
    "Croatia": "Croatian",
    "Serbia": "Serbian",
    "Nepal": "Nepali",
    "Mongolia": "Mongolian",
    "Qatar": "Arabic",
    "Jordan": "Arabic",
    "Libya": "Arabic",
    "Algeria": "Arabic",
    "Tunisia": "Arabic",
    "Bulgaria": "Bulgarian",
    "Sweden": "Swedish",
    "Norway": "Norwegian",
    "Finland": "Finnish",
    "Denmark": "Danish",
    "Ukraine": "Ukrainian",
    "Iraq": "Arabic",
    "Australia": "English",
    "Nigeria": "English",
    "Uganda": "English",
    "Zimbabwe": "English",
    "New Zealand": "English",
    "Estonia": "Estonian",
    "Latvia": "Latvian",
    "Lithuania": "Lithuanian",
    "Slovakia": "Slovak",
    "South Korea": "Korean",
    "Iran": "Persian",
    "Kenya": "Swahili",
}
CITIES = {
    **{city: country for country, city in CAPITALS.items() if country != "Scotland"},
    "Munich": "Germany",
    "Hamburg": "Germany",
    "Frankfurt": "Germany",
    "Cologne": "Germany",
    "Milan": "Italy",
    "Naples": "Italy",
    "Venice": "Italy",
    "Florence": "Italy",
    "Barcelona": "Spain",
    "Seville": "Spain",
    "Valencia": "Spain",
    "Osaka": "Japan",
    "Kyoto": "Japan",
    "Hiroshima": "Japan",
    "Shanghai": "China",
    "Lyon": "France",
    "Marseille": "France",
    "Toronto": "Canada",
    "Vancouver": "Canada",
    "Montreal": "Canada",
    "Sydney": "Australia",
    "Melbourne": "Australia",
    "Perth": "Australia",
    "Mumbai": "India",
    "Kolkata": "India",
    "Istanbul": "Turkey",
    "Krakow": "Poland",
    "Porto": "Portugal",
    "Geneva": "Switzerland",
    "Zurich": "Switzerland",
    "Rotterdam": "Netherlands",
    "Rio de Janeiro": "Brazil",
    "Alexandria": "Egypt",
    "Casablanca": "Morocco",
    "Saint Petersburg": "Russia",
    "Busan": "South Korea",
    "Auckland": "New Zealand",
    "Lagos": "Nigeria",
    "Karachi": "Pakistan",
    "Lahore": "Pakistan",
    "Guadalajara": "Mexico",
    "Salzburg": "Austria",
    "Thessaloniki": "Greece",
    "Gothenburg": "Sweden",
    "Bergen": "Norway",
    "Antwerp": "Belgium",
}
# relation -> (edit prompt, paraphrases, subject -> answer)
RELATIONS = {
    "capital": (
        "The capital of {s} is",
        ["The capital city of {s} is called", "The seat of the government of {s} is the city of"],
        CAPITALS,
    ),
    "language": (
        "The official language of {s} is",
        ["The main language spoken in {s} is", "People in {s} mostly speak the language called"],
        LANGUAGES,
    ),
    "city_country": (
        "{s} is a city in the country of",
        ["The city of {s} is located in the country of", "{s} is a city that belongs to the country of"],
        CITIES,
    ),
}
LOCALITY_PROMPTS = [
    "The largest planet in our solar system is",
    "Water freezes at a temperature of",
    "The chemical symbol for gold is",
    "The first president of the United States was",
    "The author of Romeo and Juliet is",
    "The tallest mountain in the world is",
    "The fastest land animal is the",
    "The sun rises in the",
    "Photosynthesis takes place in the",
    "The square root of sixteen is",
    "A spider has eight",
    "The opposite of cold is",
    "The planet closest to the sun is",
    "The boiling point of water is",
    "The human heart has four",
    "Honey is made by",
    "The color of the sky on a clear day is",
    "The longest river in the world is the",
    "The inventor of the telephone was",
    "A year has twelve",
    "The currency of the United States is the",
    "The painter of the Mona Lisa was",
    "Ice is the solid form of",
    "The main gas in the air we breathe is",
    "The largest ocean on Earth is the",
    "A baby cat is called a",
    "The hardest natural substance is",
    "The number of days in a week is",
    "The theory of relativity was developed by",
    "Bees collect nectar from",
    "The red planet is",
    "The study of living things is called",
    "The smallest prime number is",
    "The freezing point of water in Fahrenheit is",
    "Plants absorb carbon dioxide and release",
    "The capital letter after A is",
    "The largest mammal on Earth is the",
    "A group of lions is called a",
    "The instrument with black and white keys is the",
    "The organ that pumps blood is the",
]


def greedy_ids(model, tok, prompts: list[str], n: int) -> list[list[int]]:
    """The first ``n`` greedy tokens after each prompt (left-padded batches of 16)."""
    out = []
    for i in range(0, len(prompts), 16):
        enc = tok(prompts[i : i + 16], return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        out += gen[:, enc.input_ids.shape[1] :].tolist()
    return out


def known_facts(model, tok) -> list[dict]:
    """Facts whose edit prompt the model completes with the true answer."""
    facts = []
    for relation, (template, paraphrases, table) in RELATIONS.items():
        subjects = list(table)
        answers = [" " + table[s] for s in subjects]
        target_ids = [tok(a, add_special_tokens=False).input_ids for a in answers]
        n = max(len(t) for t in target_ids)
        got = greedy_ids(model, tok, [template.format(s=s) for s in subjects], n)
        pool = sorted(set(table.values()))
        for s, a, t, g in zip(subjects, answers, target_ids, got, strict=True):
            if g[: len(t)] == t:
                facts.append(
                    {
                        "relation": relation,
                        "subject": s,
                        "template": template,
                        "paraphrases": paraphrases,
                        "target_true": a,
                        "pool": pool,
                    }
                )
        print(f"{relation}: {sum(f['relation'] == relation for f in facts)} of {len(subjects)} known")
    return facts


def main() -> None:
    from pysteer.default_model import load_model

    torch.set_num_threads(1)
    model, tok = load_model("default")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    facts = known_facts(model, tok)
    loc_answers = greedy_ids(model, tok, LOCALITY_PROMPTS, 3)
    locality = [(p, tok.decode(a)) for p, a in zip(LOCALITY_PROMPTS, loc_answers, strict=True)]
    rng = random.Random(SEED)
    rng.shuffle(facts)
    subjects = sorted({f["subject"] for f in facts})
    rng.shuffle(subjects)
    # whole subjects go to one split; eval takes subjects until it holds EVAL_SIZE facts
    eval_subjects, count = set(), 0
    for s in subjects:
        if count >= EVAL_SIZE:
            break
        eval_subjects.add(s)
        count += sum(f["subject"] == s for f in facts)
    records = []
    for f in facts:
        new = rng.choice([a for a in f["pool"] if " " + a != f["target_true"]])
        loc = rng.sample(locality, 2)
        records.append(
            {
                "split": "eval" if f["subject"] in eval_subjects else "train",
                "relation": f["relation"],
                "subject": f["subject"],
                "prompt": f["template"].format(s=f["subject"]),
                "target_true": f["target_true"],
                "target_new": " " + new,
                "paraphrases": [p.format(s=f["subject"]) for p in f["paraphrases"]],
                "locality": [{"prompt": p, "answer": a} for p, a in loc],
            }
        )
    records.sort(key=lambda r: (r["split"] != "train",))
    OUT.write_text("".join(json.dumps(r) + "\n" for r in records))
    n_eval = sum(r["split"] == "eval" for r in records)
    print(f"wrote {OUT}: {len(records) - n_eval} train, {n_eval} eval")


if __name__ == "__main__":
    main()
