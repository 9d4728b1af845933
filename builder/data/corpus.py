"""A seeded generator of English-like documents, for datasets made with no network.

Each document has a topic, an optional title and a few paragraphs of sentences drawn from a small grammar:
real English words with Zipf-like frequencies, topic words that recur within a document, names and places,
numbers, years, prices, percentages, dates, quotes and questions. The text has enough regularity for a BPE
tokenizer to learn meaningful merges and for a small model's loss to fall.

Document `i` depends only on (seed, i), so a smaller `--docs` gives a prefix of a larger one, and the same
arguments always give the same text (Python's `random.Random` seeded with a string is stable across runs).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import accumulate

NOUNS = (
    "time year people way day man thing woman life child world school state family student group country problem "
    "hand part place case week company system program question work government number night point home water room "
    "mother area money story fact month lot right study book eye job word business issue side kind head house "
    "service friend father power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war history party result "
    "change morning reason research girl guy moment air teacher force education river garden window letter market "
    "road table picture paper music island bridge forest village kitchen machine engine harbor valley mountain "
    "library station journey season weather animal bird horse stone field report museum theory method answer"
).split()

VERBS = (
    "ask call start play move like live believe bring happen provide sit stand lose pay meet include continue "
    "learn change lead understand watch follow stop create speak read allow add spend grow open walk win offer "
    "remember love consider appear buy wait serve die send expect build stay fall cut reach kill remain suggest "
    "raise pass sell require report decide pull explain carry develop hope drive return describe paint visit "
    "cook plant repair measure travel collect study borrow notice finish improve discover prepare protect"
).split()

IRREGULAR = {
    "bring": ("brought", "brings", "bringing"),
    "sit": ("sat", "sits", "sitting"),
    "stand": ("stood", "stands", "standing"),
    "lose": ("lost", "loses", "losing"),
    "pay": ("paid", "pays", "paying"),
    "meet": ("met", "meets", "meeting"),
    "lead": ("led", "leads", "leading"),
    "understand": ("understood", "understands", "understanding"),
    "speak": ("spoke", "speaks", "speaking"),
    "read": ("read", "reads", "reading"),
    "spend": ("spent", "spends", "spending"),
    "grow": ("grew", "grows", "growing"),
    "win": ("won", "wins", "winning"),
    "buy": ("bought", "buys", "buying"),
    "send": ("sent", "sends", "sending"),
    "build": ("built", "builds", "building"),
    "fall": ("fell", "falls", "falling"),
    "cut": ("cut", "cuts", "cutting"),
    "sell": ("sold", "sells", "selling"),
    "drive": ("drove", "drives", "driving"),
    "run": ("ran", "runs", "running"),
    "die": ("died", "dies", "dying"),
    "lie": ("lay", "lies", "lying"),
}

ADJECTIVES = (
    "other new good high old great big small large national young different black long little important political "
    "bad white real best right social only public sure low early able human local late hard major better economic "
    "strong possible whole free military true federal international full special easy clear recent certain "
    "personal open red difficult available likely short single medical current wrong private past foreign fine "
    "common poor natural significant similar hot dead central happy serious ready simple left physical general "
    "environmental financial blue democratic dark various entire close legal religious cold final main green "
    "nice huge popular traditional cultural quiet bright narrow ancient modern gentle careful heavy warm"
).split()

ADVERBS = (
    "also very often however too usually really early never always sometimes together likely simply generally "
    "instead actually again rather almost especially ever quickly probably already perhaps finally slowly quietly "
    "carefully recently nearly certainly clearly suddenly"
).split()

NAMES = (
    "James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara Richard Susan Joseph "
    "Jessica Thomas Sarah Charles Karen Daniel Nancy Matthew Lisa Anthony Betty Mark Helen Paul Sandra Steven "
    "Emily Andrew Donna Kevin Carol Brian Ruth George Sharon Edward Michelle Oliver Amelia Henry Grace"
).split()

SURNAMES = (
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Wilson Anderson "
    "Thomas Taylor Moore Jackson Martin Lee Thompson White Harris Clark Lewis Robinson Walker Young Allen King"
).split()

PLACES = (
    "London Paris Boston Chicago Denver Seattle Berlin Madrid Rome Vienna Dublin Oslo Lisbon Toronto Sydney "
    "Portland Austin Atlanta Phoenix Houston Glasgow Bristol Leeds Geneva Prague Warsaw Athens Cairo Nairobi Lima"
).split()

MONTHS = ("January February March April May June July August September October November December").split()

PREPOSITIONS = "in on at near with from into over under behind beside across through after before during".split()
DETERMINERS = "the the the a this that every each some".split()
CONJUNCTIONS = ("and", "but", "so", "because", "while", "although", "when", "until")
SAYING_VERBS = ("said", "asked", "explained", "added", "replied", "wrote", "noted")

TOPICS = {
    "cooking": "recipe oven flour butter sugar sauce pan onion garlic pepper salt dough soup bread dinner meal "
    "spoon bowl lemon cheese",
    "sports": "match player coach season goal score stadium league ball team fan referee tournament trophy "
    "training pitch race champion record",
    "science": "experiment cell energy particle molecule laboratory sample data theory physics chemistry "
    "protein planet star orbit measurement signal model",
    "travel": "flight hotel ticket passport beach museum tour train luggage map airport guide island coast "
    "ferry hostel route",
    "finance": "bank market price stock interest loan budget tax investor fund profit share trade credit "
    "debt dollar account",
    "garden": "seed soil flower tree rose tomato leaf root branch fence hedge compost spring harvest bee lawn pond",
    "computing": "computer software program file server network code memory processor screen keyboard "
    "database browser update password cloud chip",
    "history": "king empire castle battle treaty century army queen revolution colony ruler kingdom "
    "monument archive dynasty palace",
}

TOPIC_NAMES = tuple(TOPICS)
_SYLLABLE_ONSETS = "b c d f g h j k l m n p r s t v w z br cr dr fl gr pl pr sh st th tr".split()
_SYLLABLE_VOWELS = "a e i o u ai ea ee ou io ia".split()
_SYLLABLE_CODAS = ["", "", "", "n", "r", "l", "s", "t", "m", "nd", "st", "ng", "rk"]
_SUFFIXES = ("", "", "tion", "ism", "ology", "ite", "ium", "ance", "ment", "er")


def _zipf_weights(count: int, exponent: float = 1.05) -> list[float]:
    return list(accumulate(1.0 / (rank + 1) ** exponent for rank in range(count)))


class _Lexicon:
    """Word lists with Zipf cumulative weights, plus seeded invented words (rare technical terms)."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(f"ssm-golf-lexicon:{seed}")
        invented: list[str] = []
        seen = set(NOUNS)
        while len(invented) < 400:
            word = "".join(
                rng.choice(_SYLLABLE_ONSETS) + rng.choice(_SYLLABLE_VOWELS) + rng.choice(_SYLLABLE_CODAS)
                for _ in range(rng.randint(2, 3))
            ) + rng.choice(_SUFFIXES)
            if word not in seen:
                seen.add(word)
                invented.append(word)
        self.lists = {
            "noun": list(NOUNS),
            "verb": list(VERBS),
            "adj": list(ADJECTIVES),
            "adv": list(ADVERBS),
            "invented": invented,
        }
        for key in self.lists:
            rng.shuffle(self.lists[key])
        self.weights = {key: _zipf_weights(len(words)) for key, words in self.lists.items()}
        self.topics = {name: words.split() for name, words in TOPICS.items()}

    def pick(self, rng: random.Random, kind: str) -> str:
        return rng.choices(self.lists[kind], cum_weights=self.weights[kind])[0]


def _plural(noun: str) -> str:
    if noun.endswith(("s", "sh", "ch", "x", "z")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    if noun in ("man", "woman"):
        return noun[:-2] + "en"
    if noun == "child":
        return "children"
    if noun == "person":
        return "people"
    return noun + "s"


def _verb_forms(verb: str) -> tuple[str, str, str]:
    """(past, third person singular, present participle)."""
    if verb in IRREGULAR:
        return IRREGULAR[verb]
    if verb.endswith("e"):
        past, ing = verb + "d", verb[:-1] + "ing"
    elif verb.endswith("y") and verb[-2:-1] not in "aeiou":
        past, ing = verb[:-1] + "ied", verb + "ing"
    else:
        past, ing = verb + "ed", verb + "ing"
    third = verb + "es" if verb.endswith(("s", "sh", "ch", "x", "o")) else verb + "s"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        third = verb[:-1] + "ies"
    return past, third, ing


class _DocumentWriter:
    """State for one document: its random stream, topic words and the people it mentions."""

    def __init__(self, lexicon: _Lexicon, rng: random.Random) -> None:
        self.lex = lexicon
        self.rng = rng
        self.topic = rng.choice(TOPIC_NAMES)
        self.topic_words = lexicon.topics[self.topic]
        self.people = [f"{rng.choice(NAMES)} {rng.choice(SURNAMES)}" for _ in range(rng.randint(1, 3))]
        self.places = [rng.choice(PLACES) for _ in range(2)]
        self.terms = [lexicon.pick(rng, "invented") for _ in range(rng.randint(0, 3))]

    def noun(self) -> str:
        roll = self.rng.random()
        if roll < 0.35:
            return self.rng.choice(self.topic_words)
        if roll < 0.40 and self.terms:
            return self.rng.choice(self.terms)
        return self.lex.pick(self.rng, "noun")

    def noun_phrase(self, plural: bool | None = None) -> str:
        rng = self.rng
        plural = rng.random() < 0.3 if plural is None else plural
        noun = self.noun()
        adjective = self.lex.pick(rng, "adj") + " " if rng.random() < 0.45 else ""
        if plural:
            head = _plural(noun)
            det = rng.choice(("the", "some", "many", "these", "", "", str(rng.randint(2, 12))))
        else:
            head = noun
            det = rng.choice(DETERMINERS)
            if det == "a" and (adjective or head)[0] in "aeiou":
                det = "an"
        return f"{det} {adjective}{head}".strip()

    def subject(self) -> tuple[str, bool]:
        roll = self.rng.random()
        if roll < 0.25:
            return self.rng.choice(self.people).split()[self.rng.randint(0, 1)], False
        if roll < 0.35:
            return self.rng.choice(("we", "they", "I", "you")), True
        plural = self.rng.random() < 0.3
        return self.noun_phrase(plural), plural

    def number(self) -> str:
        rng = self.rng
        kind = rng.randint(0, 6)
        if kind == 0:
            return str(rng.randint(1900, 2030))
        if kind == 1:
            return f"${rng.randint(1, 999)}.{rng.randint(0, 99):02d}"
        if kind == 2:
            return f"{rng.randint(1, 99)}%"
        if kind == 3:
            return f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1950, 2030)}"
        if kind == 4:
            return f"{rng.randint(1, 12)}:{rng.choice(('00', '15', '30', '45'))}"
        if kind == 5:
            return f"{rng.randint(1, 999):,}" if rng.random() < 0.5 else f"{rng.randint(1000, 999999):,}"
        return f"{rng.randint(0, 9)}.{rng.randint(0, 99)}"

    def clause(self) -> str:
        rng = self.rng
        subject, plural = self.subject()
        verb = self.lex.pick(rng, "verb")
        past, third, ing = _verb_forms(verb)
        tense = rng.random()
        if tense < 0.45:
            verb_phrase = past
        elif tense < 0.75:
            verb_phrase = verb if plural or subject in ("I", "you") else third
        elif tense < 0.88:
            verb_phrase = f"will {verb}"
        else:
            verb_phrase = ("were " if plural or subject == "you" else "was ") + ing
        if rng.random() < 0.2:
            verb_phrase = f"{self.lex.pick(rng, 'adv')} {verb_phrase}"
        parts = [subject, verb_phrase, self.noun_phrase()]
        if rng.random() < 0.5:
            parts += [rng.choice(PREPOSITIONS), self.noun_phrase()]
        if rng.random() < 0.15:
            parts += ["in", rng.choice(self.places)]
        if rng.random() < 0.2:
            parts += ["for", self.number()]
        return " ".join(parts)

    def sentence(self) -> str:
        rng = self.rng
        form = rng.random()
        if form < 0.45:
            text = self.clause()
        elif form < 0.65:
            text = f"{self.clause()}, {rng.choice(CONJUNCTIONS)} {self.clause()}"
        elif form < 0.72:
            year = rng.randint(1800, 2030)
            text = f"in {year}, {self.clause()}"
        elif form < 0.80:
            items = [self.noun_phrase() for _ in range(rng.randint(3, 4))]
            text = f"{self.subject()[0]} needed {', '.join(items[:-1])} and {items[-1]}"
        elif form < 0.88:
            quoted = self.clause()
            quoted = quoted[0].upper() + quoted[1:]
            text = f'"{quoted}," {rng.choice(SAYING_VERBS)} {rng.choice(self.people)}'
        elif form < 0.94:
            verb = self.lex.pick(rng, "verb")
            text = f"{rng.choice(('why', 'how', 'when', 'where'))} did {self.noun_phrase()} {verb} {self.noun_phrase()}"
            return text[0].upper() + text[1:] + "?"
        else:
            text = f"the {self.noun()} {rng.choice(('is', 'was', 'seems'))} {self.lex.pick(rng, 'adj')}"
            return text[0].upper() + text[1:] + "!"
        return text[0].upper() + text[1:] + "."

    def title(self) -> str:
        words = [self.lex.pick(self.rng, "adj"), self.rng.choice(self.topic_words)]
        if self.rng.random() < 0.5:
            words += [self.rng.choice(("and", "of", "in")), self.noun()]
        return " ".join(w if w in ("and", "of", "in") else w.capitalize() for w in words)

    def document(self) -> str:
        rng = self.rng
        paragraphs = []
        if rng.random() < 0.4:
            paragraphs.append(self.title())
        for _ in range(rng.randint(1, 5)):
            paragraphs.append(" ".join(self.sentence() for _ in range(rng.randint(2, 7))))
        return "\n\n".join(paragraphs)


def generate_documents(count: int, seed: int = 0, start: int = 0) -> Iterator[str]:
    """Yield documents `start .. start + count - 1` of the corpus for `seed`."""
    if count < 0 or start < 0:
        raise ValueError("count and start must be non-negative")
    lexicon = _Lexicon(seed)
    for index in range(start, start + count):
        yield _DocumentWriter(lexicon, random.Random(f"ssm-golf-doc:{seed}:{index}")).document()
