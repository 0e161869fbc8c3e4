#!/usr/bin/env python
"""Writes examples/data/tiny_corpus.txt: procedurally generated prose from a fixed seed.

Every word list and sentence template below was written for this repository; the output is a small
corpus of simple village stories (a few hundred KB) with enough regular structure (names that recur,
agreement of pronouns, dialogue, quotes that close) for a tiny character-level model to learn from.

    python examples/data/make_corpus.py [--seed 1234] [--kb 300] [--out examples/data/tiny_corpus.txt]

train_tiny.py calls generate() itself when the text file is missing, so the file is a convenience.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

PEOPLE = [
    ("Ada", "she", "her"), ("Bram", "he", "his"), ("Cora", "she", "her"), ("Dov", "he", "his"),
    ("Elin", "she", "her"), ("Fenn", "he", "his"), ("Greta", "she", "her"), ("Hugo", "he", "his"),
    ("Ines", "she", "her"), ("Jory", "he", "his"), ("Kai", "they", "their"), ("Lena", "she", "her"),
    ("Milo", "he", "his"), ("Nell", "she", "her"), ("Oren", "he", "his"), ("Pia", "she", "her"),
]
TRADES = ["baker", "miller", "weaver", "smith", "ferryman", "beekeeper", "clockmaker", "shepherd",
          "potter", "lamplighter", "gardener", "carpenter", "fisher", "cartographer", "cooper", "tailor"]
PLACES = ["the mill by the river", "the old bridge", "the market square", "the orchard on the hill",
          "the lighthouse", "the edge of the pine wood", "the harbour wall", "the chapel steps",
          "the salt marsh", "the bakery on Lantern Lane", "the quarry", "the north meadow",
          "the well at the crossroads", "the tower with the broken clock", "the reed beds", "the inn"]
OBJECTS = ["a brass key", "a jar of honey", "a folded map", "a copper kettle", "a bundle of letters",
           "a wooden flute", "a lantern", "a basket of pears", "a blue ribbon", "a clay bowl",
           "a spool of thread", "a silver spoon", "a sack of flour", "a compass", "a loaf of rye bread",
           "a small bell", "a coil of rope", "a pair of boots", "a pot of ink", "a bag of seeds"]
WEATHER = ["The morning was grey and still.", "Rain tapped on every roof in the village.",
           "A warm wind came up from the south.", "Fog lay low over the fields.",
           "The sky was clear and the frost was sharp.", "Clouds raced over the hills all day.",
           "It was the first bright day of spring.", "Snow had fallen in the night.",
           "The evening light turned the river gold.", "Thunder rolled somewhere far to the west."]
FEELINGS = ["glad", "worried", "tired", "curious", "proud", "restless", "calm", "puzzled",
            "hopeful", "cross", "shy", "cheerful"]
TIMES = ["At dawn", "Before noon", "In the afternoon", "Near sunset", "Late that night",
         "On the third day", "The next morning", "When the bells rang", "After supper", "Soon after"]
VERBS_PAST = ["found", "carried", "mended", "lost", "hid", "polished", "sold", "borrowed", "painted",
              "wrapped", "counted", "returned"]
SAYINGS = ["A slow river still reaches the sea.", "Bread shared is bread doubled.",
           "Count the sheep before you sleep.", "A crooked fence still keeps the goats in.",
           "The lamp does not ask who lit it.", "Every key was once a lump of ore.",
           "Rain today, apples tomorrow.", "A good knot is worth two ropes."]
QUESTIONS = ["Have you seen {obj}?", "Will you come with me to {place}?", "Why are you so {feel}?",
             "Who left {obj} at {place}?", "Is it far to {place}?", "Can you keep a secret?"]
ANSWERS = ["I saw it at {place} this morning.", "Not today, I have work to finish.",
           "Only if we are back before dark.", "Ask the {trade}; {they2} will know.",
           "I am {feel}, that is all.", "Yes, and I will tell no one."]


class Village:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.trade = {name: rng.choice(TRADES) for name, _, _ in PEOPLE}

    def person(self):
        return self.rng.choice(PEOPLE)

    def sentence(self) -> str:
        r = self.rng
        name, they, their = self.person()
        other, they2, _ = self.person()
        while other == name:
            other, they2, _ = self.person()
        place, obj, feel = r.choice(PLACES), r.choice(OBJECTS), r.choice(FEELINGS)
        verb = r.choice(VERBS_PAST)
        kind = r.randrange(9)
        if kind == 0:
            return f"{r.choice(TIMES)}, {name} the {self.trade[name]} walked to {place}."
        if kind == 1:
            return f"{name} {verb} {obj} and put it beside the door."
        if kind == 2:
            return f"{name} felt {feel}, because {other} had not come back from {place}."
        if kind == 3:
            q = r.choice(QUESTIONS).format(obj=obj, place=place, feel=feel)
            a = r.choice(ANSWERS).format(place=place, feel=feel, trade=self.trade[other], they2=they2)
            return f'"{q}" asked {name}. "{a}" said {other}.'
        if kind == 4:
            return f"{name} told {other} the old saying: \"{r.choice(SAYINGS)}\""
        if kind == 5:
            return (f"The {self.trade[other]} gave {name} {obj}, and {they} thanked "
                    f"{'them' if they2 == 'they' else ('him' if they2 == 'he' else 'her')}.")
        if kind == 6:
            n = r.randint(2, 40)
            return f"{name} counted {n} steps between {place} and {their} front gate."
        if kind == 7:
            return f"{name} and {other} sat at {place} until the {r.choice(['stars', 'lamps', 'gulls'])} came out."
        return r.choice(WEATHER)

    def paragraph(self) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randint(3, 7)))

    def story(self, number: int) -> str:
        name, _, _ = self.person()
        title = f"Story {number}: {name} and {self.rng.choice(OBJECTS)}"
        paras = [self.paragraph() for _ in range(self.rng.randint(2, 5))]
        return title + "\n\n" + "\n\n".join(paras) + "\n"


def generate(seed: int = 1234, kb: int = 300) -> str:
    """About `kb` kilobytes of text, the same for the same seed."""
    rng = random.Random(seed)
    village = Village(rng)
    parts, size, n = [], 0, 1
    while size < kb * 1000:
        s = village.story(n)
        parts.append(s)
        size += len(s) + 1
        n += 1
    return "\n".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--kb", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tiny_corpus.txt")
    args = ap.parse_args()
    text = generate(args.seed, args.kb)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text)} characters, {len(set(text))} distinct)")


if __name__ == "__main__":
    main()
