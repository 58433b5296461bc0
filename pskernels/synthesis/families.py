"""The catalogue of workflow task families, and drawing tasks from it (no model involved).

A *family* (:class:`Family`) is a small declarative object: a name, whether it is held out of training, and a
function ``make(rng, n_workers) -> Task`` that draws one task (the shared task text, one sub-task per
worker, the synthesis prompt and, where the task has one, a ground-truth answer), each family with several
wordings. The system prompt is drawn from :data:`SYSTEM_PROMPTS`. :data:`FAMILIES` holds 20 families:
16 training families (:data:`TRAIN_FAMILIES`) and 4 held-out families (:data:`HELD_OUT_FAMILIES`) that
training must never see.

Facts a ground-truth answer depends on are stated in the workers' sub-tasks, which are part of their
branches once :func:`pskernels.synthesis.workflows.build_workflows` has the model play the workers.

Everything is deterministic: each task draws from ``random.Random(f"{seed}/{family}/{index}")``
(:func:`draw_workflows`), so a task does not depend on which other families are drawn with it.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .data import DEFAULT_TEXTS, SPLITS

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are one member of a team of assistants. Answer briefly and precisely.",
    "You are a careful worker agent. Do your part of the task and report the result.",
    "You are an AI assistant working with other assistants on a shared task. Keep your answer short.",
    "You are a reliable assistant. State facts exactly as you were given them.",
)


# ---- families ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One drawn task: the shared ``task`` (in the prefix), one ``subtasks`` entry per worker, the synthesis
    prompt and an optional ground-truth ``answer`` (a string the correct final answer contains)."""

    task: str
    subtasks: list
    synthesis: str
    answer: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """A task family: ``make(rng, n_workers) -> Task``; ``workers`` the inclusive range it supports."""

    name: str
    held_out: bool
    make: Callable[[random.Random, int], Task]
    workers: tuple = (2, 8)
    description: str = ""

    @property
    def split(self) -> str:
        return SPLITS[1] if self.held_out else SPLITS[0]


def _pick(rng, wordings):
    w = rng.randrange(len(wordings))
    return w, wordings[w]


_NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Keiko",
          "Lucas", "Maya", "Nils", "Olga", "Pedro", "Quinn", "Rosa", "Samir", "Tanja"]
_CITIES = ["Oslo", "Rome", "Madrid", "Paris", "Berlin", "Vienna", "Lisbon", "Dublin", "Athens", "Prague",
           "Warsaw", "London", "Zurich", "Helsinki", "Budapest", "Brussels"]
_JOBS = ["teacher", "nurse", "baker", "pilot", "engineer", "gardener", "lawyer", "painter", "chemist",
         "librarian", "carpenter", "journalist"]
_ITEMS = [("apples", "basket", "baskets"), ("books", "shelf", "shelves"), ("coins", "box", "boxes"),
          ("chairs", "room", "rooms"), ("eggs", "nest", "nests"), ("pencils", "drawer", "drawers"),
          ("bottles", "crate", "crates"), ("tickets", "envelope", "envelopes")]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


# 1. aggregation of numbers
_SUM = [
    ("Task: {n} workers each count the {item} in one {cont}. Their counts must be added up.",
     "Count the {item} in {cont} number {k}. Your notes say it holds {c} {item}. Report your count.",
     "How many {item} are there in all {n} {conts} together? Give the total."),
    ("We are taking stock of the {item} stored in {n} {conts}.",
     "You checked {cont} {k}: it contains {c} {item}. Report this in one sentence.",
     "Using the workers' reports, what is the total number of {item}?"),
    ("Inventory job: find out how many {item} we have across {n} {conts}.",
     "Report on {cont} #{k}, which has {c} {item} in it.",
     "Add up the reports: how many {item} are there altogether?"),
]


def _sum(rng, n):
    w, (task, sub, syn) = _pick(rng, _SUM)
    item, cont, conts = rng.choice(_ITEMS)
    counts = [rng.randint(1, 12) for _ in range(n)]
    f = dict(n=n, item=item, cont=cont, conts=conts)
    return Task(task.format(**f), [sub.format(k=k + 1, c=c, **f) for k, c in enumerate(counts)],
                syn.format(**f), str(sum(counts)), {"wording": w, "counts": counts})


# 2. comparison and ranking
_RANK = [
    ("Task: find the {word} city today. Each of {n} workers checks the weather in one city.",
     "Check the weather in {x}: the thermometer there shows {v} degrees. Report the temperature.",
     "Which city is the {word} today?", "warmest", "coldest"),
    ("A 400 metre race had {n} runners and each worker timed one of them.",
     "You timed {x}, who ran the 400 metres in {v} seconds. Report the time.",
     "Who was the {word} runner?", "slowest", "fastest"),
    ("Task: compare the price of a bicycle in {n} shops and find where it is {word}.",
     "You visited the shop in {x}, where the bicycle costs {v} euros. Report the price.",
     "In which city is the bicycle {word}?", "most expensive", "cheapest"),
]


def _rank(rng, n):
    w, (task, sub, syn, hi_word, lo_word) = _pick(rng, _RANK)
    xs = rng.sample(_CITIES if w != 1 else _NAMES, n)
    lo, hi = [(-5, 35), (50, 90), (150, 900)][w]
    vs = rng.sample(range(lo, hi + 1), n)
    high = rng.random() < 0.5
    best = max(range(n), key=vs.__getitem__) if high else min(range(n), key=vs.__getitem__)
    word = hi_word if high else lo_word
    return Task(task.format(n=n, word=word), [sub.format(x=x, v=v) for x, v in zip(xs, vs)],
                syn.format(word=word), xs[best], {"wording": w, "values": vs, "highest": high})


# 3. retrieval of one fact among N branch documents
_RETRIEVE = [
    ("Task: {n} workers each read one personnel file and summarise it.",
     "Summarise this file in one sentence: \"{doc}\"",),
    ("We received {n} short profiles. Each worker reads one profile.",
     "Read the profile and restate its key facts: {doc}",),
    ("Task: prepare notes on {n} people. Every worker handles one person's record.",
     "Here is the record: {doc} Write a short note about this person.",),
]
_RETRIEVE_Q = [("In which city does {name} live?", "city"), ("What is {name}'s job?", "job"),
               ("In which year was {name} born?", "year")]


def _retrieve(rng, n):
    w, (task, sub) = _pick(rng, _RETRIEVE)
    names, cities = rng.sample(_NAMES, n), rng.sample(_CITIES, n)
    jobs, years = [rng.choice(_JOBS) for _ in range(n)], rng.sample(range(1950, 2005), n)
    docs = [f"{a} lives in {c}, works as a {j} and was born in {y}." for a, c, j, y in zip(names, cities, jobs, years)]
    k = rng.randrange(n)
    q, key = rng.choice(_RETRIEVE_Q)
    if key == "job" and jobs.count(jobs[k]) > 1:  # the answer must not be guessable from another file
        q, key = _RETRIEVE_Q[0]
    answer = {"city": cities[k], "job": jobs[k], "year": str(years[k])}[key]
    return Task(task.format(n=n), [sub.format(doc=d) for d in docs], q.format(name=names[k]), answer,
                {"wording": w, "asked": names[k], "field": key})


# 4. majority vote over verdicts
_VOTE_TOPICS = ["open a second office in {city}", "move the team meeting to {day}", "buy a new coffee machine",
                "hire two more engineers", "switch to a four-day week", "cancel the summer party"]
_VOTE = [
    ("Task: a committee of {n} reviewers votes on whether to {topic}.",
     "You are reviewer {k}. You decided to vote \"{v}\" because {r}. State your vote and your reason.",
     "What is the majority decision of the committee? Answer with the winning vote.", ("approve", "reject")),
    ("Proposal: {topic}. Each of {n} team members gives a verdict.",
     "Your verdict is \"{v}\": {r}. Explain your verdict briefly.",
     "Count the verdicts. Which verdict has the majority?", ("accept", "decline")),
    ("We must decide whether to {topic}. {n} advisers were asked.",
     "As adviser {k} you are \"{v}\", since {r}. Give your recommendation.",
     "Which recommendation did most advisers give?", ("in favour", "against")),
]
_REASONS = ["the budget allows it", "it saves time", "the risks seem small", "the team asked for it",
            "it costs too much", "the timing is bad", "there is no clear benefit", "it adds work"]


def _vote(rng, n):
    w, (task, sub, syn, (yes, no)) = _pick(rng, _VOTE)
    topic = rng.choice(_VOTE_TOPICS).format(city=rng.choice(_CITIES), day=rng.choice(_DAYS))
    major = rng.randint(n // 2 + 1, n)
    win = rng.random() < 0.5
    votes = [yes if win else no] * major + [no if win else yes] * (n - major)
    rng.shuffle(votes)
    subs = [sub.format(k=k + 1, v=v, r=rng.choice(_REASONS[:4] if v == yes else _REASONS[4:]))
            for k, v in enumerate(votes)]
    return Task(task.format(n=n, topic=topic), subs, syn, yes if win else no, {"wording": w, "votes": votes})


# 5. merging lists
_GOODS = ["bread", "milk", "eggs", "rice", "tomatoes", "cheese", "onions", "butter", "pasta", "apples", "coffee",
          "lemons", "carrots", "yogurt", "flour", "honey"]
_MERGE = [
    ("Task: {n} flatmates each wrote down what they need from the supermarket.",
     "Your list: {items}. Tell the others what you need.",
     "Merge all the lists into one shopping list without duplicates.", False),
    ("We are planning a picnic. {n} friends each say what to bring.",
     "You want to bring {items}. Say what you will bring.",
     "How many different things will be brought to the picnic in total?", True),
    ("Task: collect the ingredients {n} cooks need for tonight's dinner.",
     "The ingredients for your dish are {items}. List them.",
     "Write one combined list of all ingredients, each ingredient once.", False),
]


def _merge(rng, n):
    w, (task, sub, syn, count) = _pick(rng, _MERGE)
    lists = [rng.sample(_GOODS, rng.randint(2, 4)) for _ in range(n)]
    merged = sorted({g for lst in lists for g in lst})
    items = lambda lst: ", ".join(lst[:-1]) + " and " + lst[-1]  # noqa: E731
    return Task(task.format(n=n), [sub.format(items=items(lst)) for lst in lists], syn,
                str(len(merged)) if count else None, {"wording": w, "lists": lists, "merged": merged})


# 6. summaries
def _sentences(text):
    return [s.strip().rstrip(".") + "." for s in text.split(". ") if s.strip()]


_SUMMARY = [
    ("Task: summarise a text. It was split into {n} parts, one for each worker.",
     "Summarise this part in one sentence: \"{part}\"",
     "Using the workers' summaries, write a short summary of the whole text."),
    ("We need a brief summary of a document. Each of {n} workers reads one passage.",
     "Your passage: {part} Give its main point.",
     "Combine the main points into a summary of at most three sentences."),
    ("Task: write an abstract. The source was divided among {n} readers.",
     "Read: \"{part}\" What is this passage about?",
     "Write a two-sentence abstract of the full source from the readers' notes."),
]


def _summary(rng, n):
    w, (task, sub, syn) = _pick(rng, _SUMMARY)
    text = rng.choice(DEFAULT_TEXTS)
    sents = _sentences(text)
    n = min(n, len(sents))
    cuts = sorted(rng.sample(range(1, len(sents)), n - 1)) if n > 1 else []
    parts = [" ".join(sents[a:b]) for a, b in zip([0] + cuts, cuts + [len(sents)])]
    return Task(task.format(n=n), [sub.format(part=p) for p in parts], syn, None,
                {"wording": w, "text": DEFAULT_TEXTS.index(text)})


# 7. plans
_PLAN_GOALS = [
    ("a relaxed one-day visit to {city} for a family with two children",
     ["a museum or monument for the morning", "where to eat lunch", "an outdoor activity for the afternoon",
      "how to get around the city", "what to pack for the day", "a place for dinner", "a rainy-day alternative",
      "a souvenir to buy"]),
    ("a birthday party for a ten-year-old",
     ["the invitations", "the food", "two party games", "the decorations", "the cake", "the music",
      "a small present for each guest", "the schedule of the afternoon"]),
    ("moving to a new flat in {city}",
     ["packing the kitchen", "hiring a van", "changing the address", "cleaning the old flat", "setting up the "
      "internet", "arranging the furniture", "meeting the neighbours", "the budget for the move"]),
    ("the launch of a small online shop",
     ["the product photos", "the prices", "the delivery options", "the opening offer", "the social media posts",
      "customer support", "the website text", "the first week's goals"]),
]
_PLAN = [
    ("Task: plan {goal}.", "Your part: suggest {piece}.", "Combine the workers' answers into one short final plan."),
    ("We are preparing {goal}. Each worker plans one aspect.", "Plan {piece} in two or three sentences.",
     "Write the complete plan, step by step, using every worker's suggestion."),
    ("Task: make a checklist for {goal}.", "Write the checklist items for {piece}.",
     "Merge the workers' items into one ordered checklist."),
]


def _plan(rng, n):
    w, (task, sub, syn) = _pick(rng, _PLAN)
    goal, pieces = rng.choice(_PLAN_GOALS)
    goal = goal.format(city=rng.choice(_CITIES))
    return Task(task.format(goal=goal), [sub.format(piece=p) for p in rng.sample(pieces, n)], syn, None,
                {"wording": w, "goal": goal})


# 8. free-form synthesis
_QUESTIONS = ["Should a small town build a new library?", "Is working from home good for a company?",
              "How can a school reduce its energy use?", "What makes a city pleasant to live in?",
              "Should children learn to program at school?", "How should a family spend a free weekend?"]
_ROLES = ["a teacher", "a parent", "an economist", "a student", "a doctor", "an engineer", "a shop owner",
          "a retired person", "a journalist", "a city planner"]
_FREE = [
    ("Question for the team: {q}", "Answer from the point of view of {role}, in two sentences.",
     "Write one balanced paragraph that answers the question using all the viewpoints above."),
    ("Task: collect opinions on this question: {q}", "You are {role}. Give your opinion and one reason.",
     "Summarise the opinions and give a final recommendation."),
    ("Discussion topic: {q} Each worker argues from a different role.", "Argue briefly as {role}.",
     "What is the overall conclusion of the discussion?"),
]


def _free(rng, n):
    w, (task, sub, syn) = _pick(rng, _FREE)
    return Task(task.format(q=rng.choice(_QUESTIONS)), [sub.format(role=r) for r in rng.sample(_ROLES, n)], syn,
                None, {"wording": w})


# 9. attribution (which worker said it)
_OBJECTS = ["a golden key", "an old map", "a red umbrella", "a silver watch", "a blue notebook", "a broken phone",
            "a wooden box", "a green scarf", "a pair of glasses", "a leather wallet"]
_PLACES = ["the attic", "the garden", "the garage", "the cellar", "the kitchen", "the library", "the car park",
           "the office", "the station", "the beach"]
_ATTR = [
    ("Task: {n} searchers each look through one place for lost things.",
     "You are {name}. You searched {place} and found {obj}. Report your search.",
     "Who found {obj}?"),
    ("A team of {n} volunteers is sorting the lost and found.",
     "Your name is {name}. In {place} you came across {obj}. Tell the team.",
     "Which volunteer came across {obj}? Give the name."),
    ("Task: each of {n} inspectors reports what they found today.",
     "Inspector {name}: you checked {place}; the only item there was {obj}. Write your report.",
     "Name the inspector who reported {obj}."),
]


def _attr(rng, n):
    w, (task, sub, syn) = _pick(rng, _ATTR)
    names, places, objs = rng.sample(_NAMES, n), rng.sample(_PLACES, n), rng.sample(_OBJECTS, n)
    k = rng.randrange(n)
    return Task(task.format(n=n), [sub.format(name=a, place=p, obj=o) for a, p, o in zip(names, places, objs)],
                syn.format(obj=objs[k]), names[k], {"wording": w, "worker": k + 1})


# 10. timeline
_EVENTS = ["the opening of the new bridge", "the first jazz festival", "the founding of the football club",
           "the great flood", "the building of the town hall", "the arrival of the railway",
           "the first marathon", "the closing of the old mine", "the founding of the university",
           "the opening of the zoo"]
_TIMELINE = [
    ("Task: put the history of {city} in order. Each of {n} workers researched one event.",
     "Look up {event}. The records say it happened in {year}. Report the year.",
     "Which of these events in {city} happened first?"),
    ("We are writing a timeline of {city}. {n} researchers each dated one event.",
     "You found that {event} took place in {year}. Write one sentence about it.",
     "Which event is the most recent one?"),
    ("Task: date {n} events from the past of {city}.",
     "Your event: {event}; the archive gives the year {year}. Report it.",
     "What happened earliest?"),
]


def _timeline(rng, n):
    w, (task, sub, syn) = _pick(rng, _TIMELINE)
    city, events, years = rng.choice(_CITIES), rng.sample(_EVENTS, n), rng.sample(range(1820, 2020), n)
    pick = max if w == 1 else min
    k = pick(range(n), key=years.__getitem__)
    return Task(task.format(n=n, city=city), [sub.format(event=e, year=y) for e, y in zip(events, years)],
                syn.format(city=city), events[k].removeprefix("the "), {"wording": w, "years": years})


# 11. intersection of constraints (held out)
_INTERSECT = [
    ("Task: find a day when all {n} colleagues can meet. Each worker asks one colleague.",
     "You asked {name}, who is free on {days}. Report the free days.",
     "On which day can everyone meet?"),
    ("We want to schedule a call with {n} partners. Each worker checks one partner's calendar.",
     "{name}'s calendar is open on {days}. Tell the others.",
     "Which day works for all partners?"),
    ("Task: pick a day for the team dinner that suits all {n} people.",
     "{name} says: \"I can come on {days}.\" Pass this on.",
     "Which is the only day that suits everybody?"),
]


def _intersect(rng, n):
    w, (task, sub, syn) = _pick(rng, _INTERSECT)
    common = rng.choice(_DAYS)
    others = [d for d in _DAYS if d != common]
    frees = [{common} for _ in range(n)]
    for d in others:  # each other day is free for some people, never for all
        who = [i for i in range(n) if rng.random() < 0.5]
        if len(who) == n:
            who.pop(rng.randrange(n))
        for i in who:
            frees[i].add(d)
    names = rng.sample(_NAMES, n)
    days = [[d for d in _DAYS if d in f] for f in frees]
    fmt = lambda ds: ds[0] if len(ds) == 1 else ", ".join(ds[:-1]) + " and " + ds[-1]  # noqa: E731
    return Task(task.format(n=n), [sub.format(name=a, days=fmt(ds)) for a, ds in zip(names, days)], syn, common,
                {"wording": w, "free": days})


# 12. conflicting reports (held out)
_CONFLICT = [
    ("Task: find out when the last train to {city} leaves tonight. {n} workers each checked one source.",
     "At {t} you read on {src} that the last train leaves at {v}. Report it with the time you checked.",
     "The reports disagree. Later reports replace earlier ones. When does the last train leave?"),
    ("Several sources give the opening time of the {city} museum tomorrow. {n} workers checked them.",
     "You checked {src} at {t}: it says the museum opens at {v}. Report this.",
     "Which opening time is correct, given that the most recent report is the right one?"),
    ("Task: the start time of the concert in {city} changed during the day. {n} workers report what they saw.",
     "{src}, checked at {t}, gives the start time as {v}. Pass it on.",
     "The latest information wins. At what time does the concert start?"),
]
_SOURCES = ["the website", "the notice board", "the mobile app", "the newspaper", "the radio", "a poster",
            "the phone hotline", "an email"]


def _conflict(rng, n):
    w, (task, sub, syn) = _pick(rng, _CONFLICT)
    city = rng.choice(_CITIES)
    checks = sorted(rng.sample(range(8 * 60, 18 * 60, 5), n))  # times the sources were read
    values = rng.sample([f"{h}:{m:02d}" for h in range(18, 24) for m in (0, 15, 30, 45)], n)
    srcs = [rng.choice(_SOURCES) for _ in range(n)]
    order = list(range(n))
    rng.shuffle(order)  # the latest report is not always the last worker
    hhmm = lambda t: f"{t // 60}:{t % 60:02d}"  # noqa: E731
    subs = [sub.format(t=hhmm(checks[j]), src=srcs[j], v=values[j]) for j in order]
    subs = [s[0].upper() + s[1:] for s in subs]
    return Task(task.format(n=n, city=city), subs, syn, values[n - 1],
                {"wording": w, "order": order, "values": values})


# 13. code-review verdicts (held out)
_FILES = [("parse.py", "def parse(s):\n    return int(s.strip())"),
          ("mathutil.py", "def mean(xs):\n    return sum(xs) / len(xs)"),
          ("cache.py", "def get(d, k):\n    return d.get(k)"),
          ("names.py", "def initials(name):\n    return ''.join(p[0] for p in name.split())"),
          ("dates.py", "def is_leap(y):\n    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)"),
          ("files.py", "def read(path):\n    with open(path) as f:\n        return f.read()"),
          ("price.py", "def total(items):\n    return sum(i.price for i in items)"),
          ("text.py", "def words(s):\n    return s.split()"),
          ("retry.py", "def retry(f, n=3):\n    for _ in range(n):\n        try:\n            return f()\n"
                       "        except OSError:\n            pass")]
_REVIEW = [
    ("Task: review pull request #{pr}. It changes {n} files; each reviewer checks one.",
     "Review {f}:\n{code}\nThe tests for this file {res}. Give your verdict.",
     "Which file must be fixed before the pull request can be merged?"),
    ("Code review of change {pr}: {n} reviewers, one file each.",
     "File {f}:\n{code}\nCI result for it: {res}. Approve or request changes?",
     "Summarise the review: which file blocks the merge?"),
    ("Task: decide whether pull request #{pr} can be merged. Each of {n} reviewers looks at one file.",
     "Look at {f}:\n{code}\nIts unit tests {res}. Write a one-line review.",
     "Name the file that needs changes."),
]


def _review(rng, n):
    w, (task, sub, syn) = _pick(rng, _REVIEW)
    n = min(n, len(_FILES))
    files = rng.sample(_FILES, n)
    bad = rng.randrange(n)
    ok, fail = ("all tests passed", "2 tests failed") if w == 1 else ("all pass", "fail with an error")
    subs = [sub.format(f=f, code=c, res=fail if i == bad else ok) for i, (f, c) in enumerate(files)]
    return Task(task.format(n=n, pr=rng.randint(100, 999)), subs, syn, files[bad][0], {"wording": w, "failing": bad})


# 14. translation merges (held out)
_PHRASES = ["The weather is nice today.", "We are going to the market.", "My brother has a small dog.",
            "The train leaves at nine.", "I would like a cup of tea.", "The museum is closed on Mondays.",
            "She reads a book every week.", "The children play in the park.", "Our house has a red door.",
            "Dinner is ready at seven."]
_LANGS = ["French", "German", "Spanish", "Italian"]
_TRANSLATE = [
    ("Task: translate a short text into {lang}. It has {n} sentences; each worker translates one.",
     "Translate sentence {k} into {lang}: \"{s}\"",
     "Put the translated sentences together, in order, as one {lang} text."),
    ("We need a note of {n} sentences in {lang}. Each translator gets one sentence.",
     "Your sentence (number {k}): {s} Give its {lang} translation.",
     "Write the complete {lang} note from the translations."),
    ("Task: {n} translators share the work of translating a message into {lang}.",
     "Translate into {lang}: \"{s}\"",
     "Assemble the full {lang} message."),
]


def _translate(rng, n):
    w, (task, sub, syn) = _pick(rng, _TRANSLATE)
    lang, sents = rng.choice(_LANGS), rng.sample(_PHRASES, n)
    return Task(task.format(n=n, lang=lang), [sub.format(k=k + 1, lang=lang, s=s) for k, s in enumerate(sents)],
                syn.format(lang=lang), None, {"wording": w, "sentences": sents, "language": lang})


# 15. counting the workers whose report matches
_COUNT = [
    ("Task: {n} inspectors each check one lift in the tower block.",
     "You inspected lift {k}. It is {state}. Report its state.",
     "How many lifts are {target}?", ("working", "out of order")),
    ("We phoned {n} shops to ask whether they still have the new phone.",
     "You called the shop in {x}: the phone is {state} there. Report it.",
     "In how many shops is the phone {target}?", ("in stock", "sold out")),
    ("Task: {n} gardeners each look at one apple tree in the orchard.",
     "Tree {k} in your row {state}. Tell the others.",
     "How many of the trees {target}?", ("carries fruit this year", "has no fruit this year")),
]


def _count(rng, n):
    w, (task, sub, syn, states) = _pick(rng, _COUNT)
    target = rng.choice(states)
    got = [rng.choice(states) for _ in range(n)]
    xs = rng.sample(_CITIES, n)
    subs = [sub.format(k=k + 1, x=x, state=s) for k, (x, s) in enumerate(zip(xs, got))]
    return Task(task.format(n=n), subs, syn.format(target=target), str(got.count(target)),
                {"wording": w, "states": got, "target": target})


# 16. a chain whose links are known to different workers (multi-hop)
_CHAIN = [
    ("Task: trace a parcel through the depots. Each of {n} workers read the log of one depot.",
     "The log of the {a} depot says: parcels from there are sent on to {b}. Report this.",
     "The parcel was posted in {start}. In which city does it end up?", _CITIES),
    ("A treasure hunt has {n} clues; each worker found one of them.",
     "The clue hidden in {a} reads: \"Go next to {b}.\" Pass the clue on.",
     "The hunt starts in {start}. Where does it end?", _PLACES),
    ("Task: find out who heard the rumour last. Each of {n} workers interviewed one person.",
     "{a} told you that they passed the rumour on to {b}. Report what {a} said.",
     "{start} started the rumour. Who heard it last?", _NAMES),
]


def _chain(rng, n):
    w, (task, sub, syn, pool) = _pick(rng, _CHAIN)
    nodes = rng.sample(pool, n + 1)
    links = list(zip(nodes, nodes[1:]))
    rng.shuffle(links)  # the workers' order is not the chain's order
    subs = [sub.format(a=a, b=b) for a, b in links]
    subs = [s[0].upper() + s[1:] for s in subs]
    return Task(task.format(n=n), subs, syn.format(start=nodes[0]), nodes[-1].removeprefix("the "),
                {"wording": w, "chain": nodes})


# 17. the odd one out
_ODD = [
    ("Task: {n} people each measured the length of the same table.",
     "You are {name}. Your tape measure says the table is {v} cm long. Report your measurement.",
     "Whose measurement differs from all the others?", lambda r: r.randint(120, 220)),
    ("Each of {n} clerks holds a copy of the same rental contract.",
     "Clerk {name}: your copy says the monthly rent is {v} euros. Tell the others.",
     "One copy of the contract does not match. Which clerk has it?", lambda r: r.randrange(600, 1500, 10)),
    ("Task: {n} colleagues compare the time on their watches.",
     "{name}, your watch shows {v}. Say what time it shows.",
     "Whose watch shows a different time from everyone else's?",
     lambda r: f"{r.randint(8, 17)}:{r.randrange(0, 60, 5):02d}"),
]


def _odd(rng, n):
    w, (task, sub, syn, draw) = _pick(rng, _ODD)
    same = draw(rng)
    other = same
    while other == same:
        other = draw(rng)
    names = rng.sample(_NAMES, n)
    k = rng.randrange(n)
    subs = [sub.format(name=a, v=other if i == k else same) for i, a in enumerate(names)]
    return Task(task.format(n=n), subs, syn, names[k], {"wording": w, "odd": k + 1, "values": [same, other]})


# 18. the one item below a threshold
_LOW = [
    ("Task: check the stock of {n} products in the warehouse. Each worker counts one product.",
     "You counted the {x}: {v} packs are left. Report the stock.",
     "Which product has fewer than {th} packs left and must be reordered?", _GOODS, (2, 30), 10),
    ("The battery levels of {n} devices in the office are being checked.",
     "The {x} shows {v} percent battery. Report the level.",
     "Which device is below {th} percent and needs charging?",
     ["laptop", "tablet", "projector remote", "phone", "camera", "speaker", "headset", "keyboard"], (3, 99), 20),
    ("Task: {n} teachers each marked one student's exam.",
     "You marked the exam of {x}, who scored {v} points out of 100. Report the score.",
     "Which student scored under {th} points and failed?", _NAMES, (20, 100), 50),
]


def _low(rng, n):
    w, (task, sub, syn, pool, (lo, hi), th) = _pick(rng, _LOW)
    xs = rng.sample(pool, n)
    k = rng.randrange(n)
    vs = [rng.randint(lo, th - 1) if i == k else rng.randint(th, hi) for i in range(n)]
    return Task(task.format(n=n), [sub.format(x=x, v=v) for x, v in zip(xs, vs)], syn.format(th=th), xs[k],
                {"wording": w, "values": vs, "threshold": th})


# 19. one reply composed of the workers' answers
_FACTS = [("delivery", "delivery takes {d} working days"), ("returns", "items can be returned within {r} days"),
          ("payment", "we accept card and bank transfer"), ("warranty", "the warranty lasts {y} years"),
          ("sizes", "the jacket comes in sizes S to XL"), ("colours", "it is available in black, blue and green"),
          ("discount", "members get {p} percent off"), ("opening hours", "the shop opens at {h} on weekdays")]
_REPLY = [
    ("Task: answer a customer's email. It asks {n} questions; each worker answers one.",
     "Answer the customer's question about {topic}. The facts: {fact}.",
     "Write the reply email to the customer, answering every question."),
    ("A client wrote to support with {n} questions. Each agent handles one topic.",
     "Topic: {topic}. Our policy: {fact}. Draft the answer.",
     "Combine the agents' drafts into one friendly reply."),
    ("Task: prepare the answer to a message from a customer with {n} questions.",
     "Explain our {topic}: {fact}. Keep it short.",
     "Write a single reply that covers all the points above."),
]


def _reply(rng, n):
    w, (task, sub, syn) = _pick(rng, _REPLY)
    n = min(n, len(_FACTS))
    vals = dict(d=rng.randint(2, 7), r=rng.choice([14, 30, 60]), y=rng.randint(1, 5), p=rng.choice([5, 10, 15]),
                h=rng.choice(["8:00", "9:00", "10:00"]))
    subs = [sub.format(topic=t, fact=f.format(**vals)) for t, f in rng.sample(_FACTS, n)]
    return Task(task.format(n=n), subs, syn, None, {"wording": w})


# 20. weighing arguments for and against
_OPTIONS = ["buying an electric car", "moving the office to the city centre", "renting instead of buying a flat",
            "learning a second language", "adopting a dog", "replacing the old server with a cloud service"]
_ARGS = {True: ["it saves money in the long run", "it is better for the environment", "it makes daily life easier",
                "it opens new opportunities", "people enjoy it"],
         False: ["it is expensive at first", "it takes a lot of time", "it brings new risks",
                 "it is hard to undo", "it needs space we do not have"]}
_PROS = [
    ("Task: weigh the arguments about {opt}. Each of {n} workers brings one argument.",
     "Your argument is {side}: {arg}. Explain it in one or two sentences.",
     "List the pros and cons and say whether {opt} is a good idea."),
    ("We are discussing {opt}. {n} advisers each add one point.",
     "Make this point, which speaks {side}: {arg}.",
     "Weigh the points above and give a recommendation."),
    ("Task: prepare a decision note on {opt} from {n} short arguments.",
     "Write one sentence arguing {side}: {arg}.",
     "Write the decision note: the arguments for, the arguments against and a conclusion."),
]


def _pros(rng, n):
    w, (task, sub, syn) = _pick(rng, _PROS)
    opt = rng.choice(_OPTIONS)
    n_for = rng.randint(max(0, n - len(_ARGS[False])), min(n, len(_ARGS[True])))
    sides = [True] * n_for + [False] * (n - n_for)
    rng.shuffle(sides)
    args = {s: rng.sample(_ARGS[s], len(_ARGS[s])) for s in (True, False)}
    subs = [sub.format(side="in favour" if s else "against", arg=args[s].pop()) for s in sides]
    return Task(task.format(n=n, opt=opt), subs, syn.format(opt=opt), None, {"wording": w, "for": sides})


FAMILIES = {f.name: f for f in (
    Family("sum", False, _sum, description="aggregation of numbers stated by different workers"),
    Family("rank", False, _rank, description="comparison and ranking: highest / lowest value"),
    Family("retrieve", False, _retrieve, description="retrieval of one fact among N branch documents"),
    Family("vote", False, _vote, description="majority vote over the workers' verdicts"),
    Family("merge_lists", False, _merge, description="merging overlapping lists (or counting distinct items)"),
    Family("summary", False, _summary, workers=(2, 5), description="summary of a text split among workers"),
    Family("plan", False, _plan, description="a plan assembled from the workers' parts"),
    Family("freeform", False, _free, description="free-form synthesis of viewpoints"),
    Family("attribution", False, _attr, description="which worker reported a given thing"),
    Family("timeline", False, _timeline, description="earliest / latest of dated events"),
    Family("count", False, _count, description="how many workers report a given state"),
    Family("chain", False, _chain, description="a chain whose links are known to different workers (multi-hop)"),
    Family("odd_one_out", False, _odd, workers=(3, 8), description="the one worker whose value differs"),
    Family("below_threshold", False, _low, description="the one item under a threshold"),
    Family("reply", False, _reply, description="one reply composed of the workers' answers to sub-questions"),
    Family("pros_cons", False, _pros, description="weighing arguments for and against, with a recommendation"),
    Family("intersect", True, _intersect, description="intersection of constraints (the one common day)"),
    Family("conflict", True, _conflict, description="conflicting reports: the latest one wins"),
    Family("code_review", True, _review, description="code-review verdicts: which file blocks the merge"),
    Family("translate", True, _translate, description="merging sentence-by-sentence translations"),
)}
TRAIN_FAMILIES = tuple(n for n, f in FAMILIES.items() if not f.held_out)
HELD_OUT_FAMILIES = tuple(n for n, f in FAMILIES.items() if f.held_out)


def select_families(families=None) -> list[Family]:
    """``families``: None / ``"all"`` (every family), ``"train"``, ``"held_out"``, a comma-separated string or
    a list of names or :class:`Family` objects. Raises ``ValueError`` on an unknown name or an empty choice."""
    if families is None or families == "all":
        names = list(FAMILIES)
    elif families == "train":
        names = list(TRAIN_FAMILIES)
    elif families == "held_out":
        names = list(HELD_OUT_FAMILIES)
    elif isinstance(families, str):
        names = [x.strip() for x in families.split(",") if x.strip()]
    else:
        names = list(families)
    out = []
    for f in names:
        if isinstance(f, Family):
            out.append(f)
        elif f in FAMILIES:
            out.append(FAMILIES[f])
        else:
            raise ValueError(f"families: unknown family {f!r}, expected 'all', 'train', 'held_out' or names "
                             f"from {sorted(FAMILIES)}")
    if not out:
        raise ValueError("families: expected at least one family")
    return out


# ---- drawing tasks (no model) -----------------------------------------------------------------------
@dataclass(frozen=True)
class WorkflowSpec:
    """A drawn workflow before the workers run: what :func:`build_workflows` renders and generates from."""

    id: str
    family: str
    split: str
    system: str
    task: Task


def draw_workflows(families=None, n_per_family: int = 1, *, seed: int = 0, n_workers=(2, 8)) -> list[WorkflowSpec]:
    """Draw ``n_per_family`` tasks of every selected family (:func:`select_families`), round-robin (the first
    task of every family, then the second, ...: any tail of the list mixes the families).
    ``n_workers`` (inclusive range) is intersected with each family's own range. Deterministic in ``seed``.

    >>> specs = draw_workflows(["vote", "sum"], 2, seed=0)
    >>> [s.id for s in specs]
    ['workflow-vote-0-0', 'workflow-sum-0-0', 'workflow-vote-0-1', 'workflow-sum-0-1']
    >>> task = specs[0].task
    >>> len(task.subtasks), task.answer
    (2, 'decline')
    >>> print(task.subtasks[0])
    Your verdict is "decline": it costs too much. Explain your verdict briefly.
    >>> print(task.synthesis)
    Count the verdicts. Which verdict has the majority?
    """
    lo, hi = n_workers
    if not 1 <= lo <= hi:
        raise ValueError(f"n_workers: expected 1 <= lo <= hi, got {n_workers}")
    if n_per_family < 0:
        raise ValueError(f"n_per_family: expected >= 0, got {n_per_family}")
    fams = select_families(families)
    ranges = {}
    for fam in fams:
        ranges[fam.name] = a, b = max(lo, fam.workers[0]), min(hi, fam.workers[1])
        if a > b:
            raise ValueError(f"n_workers: {n_workers} does not overlap family {fam.name!r}'s range {fam.workers}")
    out = []
    for i in range(n_per_family):
        for fam in fams:
            rng = random.Random(f"{seed}/{fam.name}/{i}")
            n = rng.randint(*ranges[fam.name])
            system = rng.choice(SYSTEM_PROMPTS)
            task = fam.make(rng, n)
            out.append(WorkflowSpec(f"workflow-{fam.name}-{seed}-{i}", fam.name, fam.split, system, task))
    return out
