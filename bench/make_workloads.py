"""Write the benchmark workloads of `agp bench` (bench/workloads/*.jsonl), deterministically.

    python bench/make_workloads.py            # rewrites the three files below

- short_chat.jsonl     200 short chat turns of varied kinds (questions, explanations,
                       lists, small writing tasks), 32-96 new tokens each
- shared_prefix.jsonl  150 questions to a support assistant whose system prompt (a
                       store's policies and catalogue, about 1,700 tokens) is the same
                       in every request: the prefix cache's case; 24 new tokens each
- long_prompts.jsonl   40 distinct reports of 700-1,000 tokens to summarise, 64 new tokens

The text is composed from hand-written templates with a seeded generator: realistic,
varied, and nothing is downloaded.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "workloads"

TOPICS = ["photosynthesis", "compound interest", "the water cycle", "black holes", "vaccines",
          "plate tectonics", "inflation", "machine learning", "the immune system", "tides",
          "supply and demand", "the French Revolution", "electric cars", "DNA replication",
          "climate change", "public key cryptography", "the stock market", "volcanoes",
          "sleep cycles", "the Roman Empire", "solar panels", "antibiotic resistance",
          "recursion", "the printing press", "ocean currents", "blockchains", "rainbows"]
PAIRS = [("a virus", "a bacterium"), ("weather", "climate"), ("a list", "a tuple in Python"),
         ("stocks", "bonds"), ("RAM", "disk storage"), ("a latte", "a cappuccino"),
         ("TCP", "UDP"), ("speed", "velocity"), ("an alligator", "a crocodile"),
         ("baking soda", "baking powder"), ("a comet", "an asteroid"), ("HTTP", "HTTPS"),
         ("a lake", "a pond"), ("empathy", "sympathy"), ("a process", "a thread")]
ACTIVITIES = ["learning to play the guitar", "running a first marathon", "saving money on groceries",
              "sleeping better", "writing a cover letter", "keeping houseplants alive",
              "studying for an exam", "starting a vegetable garden", "public speaking",
              "working from home", "learning a new language", "cooking rice",
              "training a puppy", "reducing screen time", "planning a road trip"]
THINGS = ["the sea", "autumn leaves", "a city at night", "the first snow", "an old lighthouse",
          "morning coffee", "a thunderstorm", "the moon", "a quiet library", "spring rain"]
TASKS = ["read a CSV file", "reverse a string", "sort a dictionary by value", "remove duplicates from a list",
         "count words in a text file", "check whether a number is prime", "merge two lists",
         "parse JSON", "find the largest element of a list", "format a date"]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese"]
PHRASES = ["good morning, how are you?", "where is the train station?", "thank you very much",
           "I would like a cup of tea", "see you tomorrow"]
SHORT_TEMPLATES = [
    (lambda r: f"What is the difference between {' and '.join(r.choice(PAIRS))}?", 64),
    (lambda r: f"Explain {r.choice(TOPICS)} to a ten-year-old.", 96),
    (lambda r: f"Give me three tips for {r.choice(ACTIVITIES)}.", 96),
    (lambda r: f"Write a haiku about {r.choice(THINGS)}.", 48),
    (lambda r: f"How do I {r.choice(TASKS)} in Python?", 96),
    (lambda r: f"In one sentence, what is {r.choice(TOPICS)}?", 48),
    (lambda r: f"Translate '{r.choice(PHRASES)}' into {r.choice(LANGUAGES)}.", 32),
    (lambda r: f"What are the pros and cons of {r.choice(ACTIVITIES)}?", 96),
    (lambda r: f"Name three facts about {r.choice(TOPICS)}.", 64),
    (lambda r: f"Is it true that {r.choice(TOPICS)} is hard to understand? Answer briefly.", 48),
    (lambda r: f"Write a short, friendly reminder about {r.choice(ACTIVITIES)}.", 64),
    (lambda r: f"What is {r.randint(12, 99)} times {r.randint(3, 19)}?", 32),
]

STORE_POLICY = """You are Juniper, the customer support assistant of Northwind Outfitters, an online store \
for hiking, camping and climbing gear based in Portland, Oregon. Answer the customer's question \
politely and briefly, using only the policies and the catalogue below. If the answer is not in them, \
say that you will pass the question to a human colleague. Never invent prices, discounts or dates.

## Orders and payment
Orders can be placed on the website or through the mobile app, at any hour. We accept Visa, \
Mastercard, American Express, PayPal and Northwind gift cards; we do not accept cash on delivery or \
cryptocurrencies. An order can be changed or cancelled free of charge until it has been packed, which \
usually happens within two hours on working days. Once packed, an order can no longer be changed, but \
it can be returned after delivery. Prices include sales tax where the law requires it; the total is \
shown before payment. Price matching is offered for identical items sold by authorised retailers in \
the United States, within fourteen days of purchase, on presentation of the competitor's listing.

## Shipping
Standard shipping within the contiguous United States takes three to five working days and is free \
for orders over 75 dollars; below that it costs 6.95 dollars. Express shipping takes one to two working \
days and costs 19.95 dollars. We ship to Alaska, Hawaii and Canada in seven to twelve working days for \
24.95 dollars; we do not ship to other countries yet. Orders placed before noon Pacific time on a \
working day leave our warehouse the same day. Every parcel has a tracking number, sent by email when \
the parcel leaves the warehouse. Fuel canisters and bear spray can only travel by ground and are not \
available for express shipping or for delivery outside the contiguous United States.

## Returns and exchanges
Unused items in their original packaging can be returned within 60 days of delivery for a full refund. \
Used items can be returned within 30 days if they are faulty. Members of the Northwind Trail Club get \
90 days for unused items. Return labels are free for exchanges and for faulty items; for other returns \
we deduct 5.95 dollars from the refund. Refunds reach the original payment method within five to ten \
working days after the parcel arrives at our warehouse. Gift cards, personalised items, opened food \
and fuel canisters cannot be returned. Exchanges for another size or colour are shipped as soon as the \
returned item has been scanned by the carrier.

## Warranty and repairs
All tents, backpacks and sleeping bags carry a two-year warranty against defects in materials and \
workmanship; Northwind's own brand, Ridgeline, carries a lifetime warranty on the same terms. Damage \
from accidents, normal wear, animals or fire is not covered, but our repair workshop fixes zippers, \
seams and tent poles at cost, usually within three weeks. To open a warranty claim the customer sends \
the order number and two photographs of the defect to repairs@northwind.example.

## Northwind Trail Club
Membership is free. Members collect one point per dollar spent, and 500 points are worth a 25 dollar \
voucher. Members get early access to the spring and autumn sales, free express shipping on orders over \
150 dollars, and the longer return window. Points expire after 24 months without a purchase.

## Catalogue (prices in US dollars)
- Ridgeline Summit 2 tent: two-person, three-season, 1.6 kg, freestanding, two doors; 329.
- Ridgeline Basecamp 4 tent: four-person, three-season, 4.2 kg, vestibule for gear; 449.
- Alder 55 backpack: 55 litres, adjustable torso length, rain cover included; 219.
- Alder 35 backpack: 35 litres, hip-belt pockets, hydration sleeve; 159.
- Kestrel daypack: 22 litres, ventilated back panel, comes in four colours; 89.
- Glacier down sleeping bag: comfort limit minus 5 degrees Celsius, 850 g, 800-fill down; 389.
- Meadow synthetic sleeping bag: comfort limit plus 4 degrees Celsius, 1.1 kg, machine washable; 129.
- Cirrus inflatable sleeping pad: R-value 4.2, 480 g, repair kit included; 149.
- Ember backpacking stove: 80 g, boils a litre of water in three and a half minutes; 59.
- Fuel canister, 230 g isobutane-propane mix: ground shipping only; 8.50.
- Talus trekking poles, pair: aluminium, cork grips, 520 g; 119.
- Basalt approach shoes: sticky rubber soles, men's and women's sizes 5 to 14; 139.
- Cascade rain jacket: three-layer waterproof membrane, pit zips, packable hood; 249.
- Switchback fleece: 200-weight recycled polyester, full zip; 79.
- Quartz headlamp: 400 lumens, USB-C rechargeable, red light mode; 49.
- Lumen camp lantern: 250 lumens, doubles as a power bank; 39.
- Bear canister: 11.5 litres, approved in most national parks; 84.
- Bear spray: ground shipping only, contiguous United States only; 52.
- Water filter, squeeze type: filters 0.1 micron, 1-litre pouch; 42.
- First-aid kit, trail size: 64 items, waterproof pouch; 35.
- Northwind gift card: 25, 50, 100 or 250 dollars, delivered by email, never expires.

## Tone
Be warm and concise: two or three sentences are usually enough. Address the customer by name if they \
give it. Do not discuss competitors except for price matching. End with an offer to help further."""

CUSTOMERS = ["Maya", "Daniel", "Priya", "Tom", "Lucia", "Kenji", "Aisha", "Oliver", "Sofia", "Marcus"]
ITEMS = ["Ridgeline Summit 2 tent", "Alder 55 backpack", "Glacier down sleeping bag", "Ember stove",
         "Quartz headlamp", "Cascade rain jacket", "Talus trekking poles", "Cirrus sleeping pad",
         "Kestrel daypack", "bear canister", "Basalt approach shoes", "water filter"]
STATES = ["Texas", "Alaska", "Hawaii", "Maine", "Colorado", "Ontario", "Florida", "Vermont"]
SUPPORT_QUESTIONS = [
    lambda r: f"Hi, I'm {r.choice(CUSTOMERS)}. How long does standard shipping to {r.choice(STATES)} take?",
    lambda r: f"Can I return the {r.choice(ITEMS)} if I have already used it once?",
    lambda r: f"How much does the {r.choice(ITEMS)} cost, and is it in stock?",
    lambda r: f"My {r.choice(ITEMS)} has a broken zipper after {r.randint(3, 20)} months. What can I do?",
    lambda r: f"Do you ship fuel canisters to {r.choice(STATES)}?",
    lambda r: f"I ordered {r.randint(1, 4)} items an hour ago. Can I still change the size of one?",
    lambda r: f"What is the difference between the {r.choice(ITEMS)} and the {r.choice(ITEMS)}?",
    lambda r: f"How many points do I need for a voucher, and what is it worth? I spent {r.randint(50, 900)} dollars.",
    lambda r: f"Is shipping free if my order is {r.randint(20, 140)} dollars?",
    lambda r: f"Which sleeping bag would you recommend for camping at {r.randint(-8, 12)} degrees Celsius?",
    lambda r: f"Do you accept {r.choice(['PayPal', 'cash', 'Bitcoin', 'Apple Pay', 'gift cards'])}?",
    lambda r: f"A competitor sells the {r.choice(ITEMS)} for {r.randint(20, 60)} dollars less. Can you match it?",
]

PEOPLE = ["Dr. Elena Varga", "Samuel Okafor", "Ingrid Holm", "Rafael Moreno", "Chen Wei",
          "Harriet Blake", "Yusuf Demir", "Anna Kowalska", "Luis Ferreira", "Grace Mutua"]
ORGS = ["the city water authority", "a regional hospital network", "a mid-sized logistics firm",
        "the university's physics department", "a family-owned bakery chain", "a wind-farm operator",
        "the public library system", "a software start-up", "a coastal fishing cooperative",
        "a school district", "a museum of natural history", "a bicycle manufacturer"]
SUBJECTS = ["energy use", "staff turnover", "customer complaints", "delivery times", "budget overruns",
            "water quality", "visitor numbers", "equipment failures", "student attendance", "waste volumes"]
SENTENCES = [
    "In the {q} quarter, {org} reported that {subject} had {trend} by {n} percent compared with the same period last year.",
    "{person}, who leads the review, said the change was driven mostly by {cause}.",
    "The board had expected a smaller shift and asked for a detailed breakdown by site before its next meeting.",
    "Three of the {k} sites accounted for nearly half of the change, the largest being the one opened in {year}.",
    "A survey of {m} employees found that {p} percent considered the new procedures clearer than the old ones.",
    "Critics argued that the figures hid seasonal effects, since the winter months had been unusually {weather}.",
    "The report recommends {action}, at an estimated cost of {cost} thousand dollars over two years.",
    "{person} cautioned that the recommendation rests on data from a single year and should be revisited.",
    "Earlier attempts to address {subject} in {year} were abandoned when funding was redirected to {other}.",
    "Staff interviewed for the report described the main difficulty as {difficulty}.",
    "If the trend continues, {subject} would return to its {year} level within roughly {k} years.",
    "The appendix lists {k} smaller measures, most of which can be introduced without new spending.",
    "An external auditor checked a sample of {m} records and found errors in {p} of them, all minor.",
    "Neighbouring organisations have seen similar patterns, which suggests that {cause} is a regional factor.",
    "The next review is scheduled for {month}, when the first results of the pilot should be available.",
    "Several managers asked for clearer guidance on who owns {subject} once the pilot ends.",
]
FILL = dict(
    q=["first", "second", "third", "fourth"], trend=["risen", "fallen", "grown", "dropped"],
    cause=["a new scheduling system", "higher fuel prices", "an ageing workforce", "a change of supplier",
           "unusually wet weather", "new safety rules", "a software migration", "stronger demand"],
    weather=["cold", "mild", "wet", "dry", "stormy"],
    action=["hiring two additional coordinators", "replacing the oldest equipment first",
            "a six-month pilot at two sites", "publishing monthly figures", "training every team lead"],
    other=["building repairs", "a new website", "emergency staffing", "the pension fund"],
    difficulty=["keeping records consistent across sites", "the lack of a single owner",
                "slow approval of purchases", "training new staff quickly", "outdated software"],
    month=["March", "June", "September", "November", "January"],
)


def _sentence(r: random.Random, org: str, subject: str) -> str:
    t = r.choice(SENTENCES)
    values = {k: r.choice(v) for k, v in FILL.items()}
    values.update(org=org, subject=subject, person=r.choice(PEOPLE), n=r.randint(2, 38),
                  k=r.randint(3, 12), m=r.randint(40, 900), p=r.randint(5, 85),
                  year=r.randint(2009, 2023), cost=r.randint(40, 950))
    return t.format(**values)


def short_chat(r: random.Random, n: int = 200) -> list[dict]:
    out = []
    for _ in range(n):
        make, max_tokens = r.choice(SHORT_TEMPLATES)
        out.append({"messages": [{"role": "user", "content": make(r)}], "max_tokens": max_tokens})
    return out


def shared_prefix(r: random.Random, n: int = 150) -> list[dict]:
    return [{"messages": [{"role": "system", "content": STORE_POLICY},
                          {"role": "user", "content": r.choice(SUPPORT_QUESTIONS)(r)}],
             "max_tokens": 24} for _ in range(n)]


def long_prompts(r: random.Random, n: int = 40) -> list[dict]:
    out = []
    for i in range(n):
        org, subject = r.choice(ORGS), r.choice(SUBJECTS)
        paragraphs = []
        for _ in range(r.randint(6, 8)):
            paragraphs.append(" ".join(_sentence(r, org, subject) for _ in range(r.randint(4, 6))))
        title = f"Internal report {i + 1}: {subject} at {org}"
        prompt = (f"{title}\n\n" + "\n\n".join(paragraphs) +
                  "\n\nSummarise the report above in three short bullet points.")
        out.append({"messages": [{"role": "user", "content": prompt}], "max_tokens": 64})
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in (("short_chat", short_chat), ("shared_prefix", shared_prefix),
                       ("long_prompts", long_prompts)):
        rows = make(random.Random(f"agp-{name}"))
        path = OUT / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                        encoding="utf-8")
        print(f"{path}: {len(rows)} requests")


if __name__ == "__main__":
    main()
