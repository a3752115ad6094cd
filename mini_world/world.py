"""The people and app content of the offline mini-world (all invented), as plain data.

`build.py` turns this into AppWorld base databases with the apps' own models; `scenarios.py` asks
questions about it. Change anything here and the set-up step builds the world again (its cache key
hashes this file).
"""

# Six people; each has an account in every app we use, with its own password. Any of them can be
# the supervisor of a task (scenarios pick one per variant).
PEOPLE = [
    dict(first_name="Maya", last_name="Chen", email="maya.chen@example.com", phone_number="2025550147",
         birthday="1991-03-27", sex="female", home="Porto", work="Braga"),
    dict(first_name="Omar", last_name="Haddad", email="omar.haddad@example.com", phone_number="3125550182",
         birthday="1987-11-04", sex="male", home="Tampere", work="Espoo"),
    dict(first_name="Lena", last_name="Novak", email="lena.novak@example.com", phone_number="4155550163",
         birthday="1995-06-29", sex="female", home="Ljubljana", work="Maribor"),
    dict(first_name="Tomas", last_name="Reyes", email="tomas.reyes@example.com", phone_number="6175550128",
         birthday="1983-01-15", sex="male", home="Valencia", work="Alicante"),
    dict(first_name="Priya", last_name="Nair", email="priya.nair@example.com", phone_number="2065550191",
         birthday="1993-09-08", sex="female", home="Kochi", work="Pune"),
    dict(first_name="Jonas", last_name="Berg", email="jonas.berg@example.com", phone_number="5035550110",
         birthday="1989-07-21", sex="male", home="Bergen", work="Oslo"),
]

# Apps where everyone has an account (the supervisor app holds the passwords).
ACCOUNT_APPS = ["spotify", "venmo", "simple_note", "todoist", "phone"]


def password(person_index: int, app: str) -> str:
    """A distinct, deterministic password per person and app (at least 5 characters, as apps ask)."""
    return f"{PEOPLE[person_index]['first_name'].lower()}-{app.replace('_', '')}-{4211 + 97 * person_index}"


def full_name(person_index: int) -> str:
    return PEOPLE[person_index]["first_name"] + " " + PEOPLE[person_index]["last_name"]


# ---------------------------------------------------------------------------------------- spotify
ARTISTS = [("Velvet Harbor", "indie"), ("Nora Quill", "pop"), ("Copper Tides", "rock"), ("Dune Echo", "electronic")]
# (title, artist index, duration in seconds)
SONGS = [
    ("Salt and Lanterns", 0, 214), ("Northbound Static", 0, 187), ("Glass Orchard", 0, 243),
    ("Paper Moons", 1, 198), ("Quiet Arithmetic", 1, 176), ("Summer Ledger", 1, 221),
    ("Iron Lullaby", 2, 265), ("Harbor Lights Again", 2, 232), ("Slow Comet", 2, 301),
    ("Sand Cathedral", 3, 254), ("Neon Tidewater", 3, 209), ("Last Train to Nowhere", 3, 238),
]
# song indices in each person's library (sizes differ, so "how many" questions differ per person)
LIBRARY = {
    0: [0, 1, 3, 6, 9, 10, 11],
    1: [2, 4, 5, 7],
    2: [0, 1, 2, 3, 4, 8, 9, 10, 11],
    3: [5, 6, 8, 9, 11],
    4: [0, 2, 3, 6, 7, 8, 10, 11],
    5: [1, 4, 7],
}
# songs each person already likes
LIKES = {0: [0, 6], 1: [4], 2: [3, 9], 3: [1, 5, 11], 4: [2], 5: [7, 3]}

# ------------------------------------------------------------------------------------ simple_note
# (title, content) per person
NOTES = {
    0: [("Groceries", "oat milk\nlemons\nrice"), ("Book ideas", "a lighthouse keeper who collects maps"),
        ("Packing list", "charger\npassport\nsocks")],
    1: [("Groceries", "coffee\neggs"), ("Running plan", "5k on Tuesday, 10k on Sunday"),
        ("Gift ideas", "a kite for Sami"), ("Meeting notes", "ship the beta in June"),
        ("Recipes", "lentil soup with cumin")],
    2: [("Garden", "plant tulips in October"), ("Quotes", "simple is better than complex")],
    3: [("Car", "oil change at 60k"), ("Movies", "watch the old westerns"), ("Bills", "rent on the 1st"),
        ("Travel", "visit Sevilla in spring")],
    4: [("Reading", "finish the poetry collection")],
    5: [("Boat", "repaint the hull"), ("Fishing", "buy new line"), ("Work", "fix the deploy script"),
        ("Ideas", "a cabin weekend"), ("Cooking", "try the salmon recipe"), ("Music", "learn three chords")],
}

# ------------------------------------------------------------------------------------------ venmo
VENMO_BALANCE = {0: 241.5, 1: 87.25, 2: 1320.0, 3: 15.75, 4: 402.1, 5: 64.0}
# (sender, receiver, amount, description): some history, so the apps do not look empty
VENMO_PAYMENTS = [(0, 1, 12.5, "lunch"), (1, 2, 30.0, "concert tickets"), (2, 0, 8.0, "coffee"),
                  (3, 4, 45.0, "train tickets"), (5, 3, 20.0, "pizza night")]

# ---------------------------------------------------------------------------------------- todoist
# project name -> list of (task title, completed); every person has the same projects with these tasks,
# except that completion differs per person (see TODO_DONE)
PROJECTS = {
    "Home": ["Fix the leaking tap", "Water the plants", "Book a dentist appointment", "Return library books",
             "Clean the balcony"],
    "Work": ["Prepare the quarterly slides", "Review the budget draft", "Update the team wiki",
             "Plan the offsite"],
}
# for each person: titles already completed
TODO_DONE = {
    0: ["Water the plants", "Update the team wiki"],
    1: ["Fix the leaking tap", "Return library books", "Clean the balcony", "Plan the offsite"],
    2: ["Prepare the quarterly slides"],
    3: ["Water the plants", "Book a dentist appointment", "Review the budget draft", "Update the team wiki"],
    4: [],
    5: ["Clean the balcony", "Plan the offsite", "Prepare the quarterly slides"],
}

# ------------------------------------------------------------------------------------------ phone
# everyone has everyone else as a contact; relationship by pair parity, to have some variety
def relationship(a: int, b: int) -> str:
    return "friend" if (a + b) % 2 else "coworker"


# (sender, receiver, message)
TEXTS = [(1, 0, "Are we still on for Friday?"), (0, 1, "Yes, see you at seven."),
         (2, 4, "Thanks for the book!"), (5, 2, "Call me when you land."), (3, 5, "Running late, sorry.")]
