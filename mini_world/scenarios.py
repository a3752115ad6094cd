"""The mini-world's tasks: 16 scenarios x 3 variants = 48 tasks, in AppWorld's sense of the words.

A scenario is one task template (an instruction with blanks, a check, a scripted solution); its three
tasks `<name>_1.._3` fill the blanks differently (another supervisor, another song, ...), as AppWorld's
own scenarios do. SGC counts a scenario only if all three of its tasks succeed.

Each scenario gives:
- `instruction` and `solution` cells as `string.Template`s over the variant's fields (`$title`) plus
  the supervisor's `$email` / `$phone_number`;
- `answer(variant)`: the ground-truth answer, or None when the task asks for an action;
- `evaluation`: the source of the task's `evaluation.py` (AppWorld runs it against the start and end
  databases). One `with test(...)` per requirement: the answer or the intended change, and that
  nothing else changed. The variant's fields are its `private_data`.
- `setup(add, variant)`: optional extra records for this task only (on top of the base world).

`solution(task_id)` gives a task's scripted turns; `table()` the README's table of scenarios.

Splits: train scenarios teach the skills; dev scenarios are other templates (new fields, apps or
combinations), so dev success measures generalisation, not memorisation.
"""
import string
from dataclasses import dataclass
from typing import Callable

from mini_world.world import ARTISTS, LIBRARY, LIKES, NOTES, PEOPLE, PROJECTS, SONGS, TODO_DONE, VENMO_BALANCE


@dataclass
class Scenario:
    name: str  # no "_": AppWorld's task ids are "<scenario>_<n>"
    split: str
    difficulty: int
    apps: tuple
    instruction: str
    variants: list  # three dicts; "supervisor" is an index into PEOPLE
    solution: list  # cells
    evaluation: str
    answer: Callable = lambda variant: None
    setup: Callable | None = None
    private: Callable = lambda variant: {}  # computed fields the check needs, added to private_data


# ------------------------------------------------------------------------------ shared pieces

ANSWER_EVALUATION = '''
import json


def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    with test("""The answer passed to apis.supervisor.complete_task is correct."""):
        task = models.end.supervisor.Task.all()[0]
        test.answer(json.loads(task.answer), ground_truth_answer)
    with test("""No app data was changed: the task only asks a question."""):
        test.case(models.changed_model_names(), "==", set())
'''

LOGIN = '''Let me get my {label} password from the supervisor app and log in.
```python
passwords = {{p["account_name"]: p["password"] for p in apis.supervisor.show_account_passwords()}}
{app}_token = apis.{app}.login(username="{username}", password=passwords["{app}"])["access_token"]
print("logged in to {label}")
```'''


def login(app: str, label: str, username: str = "$email") -> str:
    return LOGIN.format(app=app, label=label, username=username)


def count_pages(intro: str, items: str, call: str) -> str:
    """A cell that reads every page of a paginated API and answers with the number of items."""
    return f'''{intro}
```python
{items} = []
page = 0
while True:
    batch = {call}, page_index=page, page_limit=20)
    if not batch:
        break
    {items} += batch
    page += 1
apis.supervisor.complete_task(answer=len({items}))
```'''


def song_ids_by_artist(person: int, artist: str) -> list[int]:
    """Database ids (1-based, in SONGS order) of the person's library songs by an artist."""
    artist_index = [a[0] for a in ARTISTS].index(artist)
    return [i + 1 for i in LIBRARY[person] if SONGS[i][1] == artist_index]


# ------------------------------------------------------------------------------ train scenarios

SCENARIOS = [
    Scenario(
        name="birthday", split="train", difficulty=1, apps=("supervisor",),
        instruction="What is my date of birth? Answer in YYYY-MM-DD format.",
        variants=[dict(supervisor=0), dict(supervisor=1), dict(supervisor=2)],
        answer=lambda v: PEOPLE[v["supervisor"]]["birthday"],
        evaluation=ANSWER_EVALUATION,
        solution=['''My birthday is in my supervisor profile.
```python
profile = apis.supervisor.show_profile()
apis.supervisor.complete_task(answer=profile["birthday"])
```'''],
    ),
    Scenario(
        name="homecity", split="train", difficulty=1, apps=("supervisor",),
        instruction="In which city is my home address?",
        variants=[dict(supervisor=0), dict(supervisor=1), dict(supervisor=2)],
        answer=lambda v: PEOPLE[v["supervisor"]]["home"],
        evaluation=ANSWER_EVALUATION,
        solution=['''My home address is in the supervisor app.
```python
addresses = apis.supervisor.show_addresses()
home = [a for a in addresses if a["name"] == "Home"][0]
apis.supervisor.complete_task(answer=home["city"])
```'''],
    ),
    Scenario(
        name="notecount", split="train", difficulty=1, apps=("simple_note",),
        instruction="How many notes do I have in Simple Note?",
        variants=[dict(supervisor=0), dict(supervisor=1), dict(supervisor=2)],
        answer=lambda v: len(NOTES[v["supervisor"]]),
        evaluation=ANSWER_EVALUATION,
        solution=[login("simple_note", "Simple Note"),
                  count_pages("Now count the notes, page by page.", "notes",
                              "apis.simple_note.search_notes(access_token=simple_note_token")],
    ),
    Scenario(
        name="librarycount", split="train", difficulty=1, apps=("spotify",),
        instruction="How many songs are in my Spotify song library?",
        variants=[dict(supervisor=3), dict(supervisor=4), dict(supervisor=5)],
        answer=lambda v: len(LIBRARY[v["supervisor"]]),
        evaluation=ANSWER_EVALUATION,
        solution=[login("spotify", "Spotify"),
                  count_pages("Now count the songs in my library, page by page.", "songs",
                              "apis.spotify.show_song_library(access_token=spotify_token")],
    ),
    Scenario(
        name="likedcount", split="train", difficulty=1, apps=("spotify",),
        instruction="How many songs have I liked on Spotify?",
        variants=[dict(supervisor=3), dict(supervisor=4), dict(supervisor=5)],
        answer=lambda v: len(LIKES[v["supervisor"]]),
        evaluation=ANSWER_EVALUATION,
        solution=[login("spotify", "Spotify"),
                  count_pages("Now count the songs I liked, page by page.", "liked",
                              "apis.spotify.show_liked_songs(access_token=spotify_token")],
    ),
    Scenario(
        name="contactphone", split="train", difficulty=1, apps=("phone",),
        instruction="What is the phone number of my contact $contact?",
        variants=[dict(supervisor=0, contact="Jonas Berg"), dict(supervisor=1, contact="Priya Nair"),
                  dict(supervisor=2, contact="Tomas Reyes")],
        answer=lambda v: next(p["phone_number"] for p in PEOPLE
                              if p["first_name"] + " " + p["last_name"] == v["contact"]),
        evaluation=ANSWER_EVALUATION,
        solution=[login("phone", "phone", username="$phone_number"), '''Look the contact up.
```python
contacts = apis.phone.search_contacts(access_token=phone_token, query="$contact", page_limit=20)
contact = [c for c in contacts if c["first_name"] + " " + c["last_name"] == "$contact"][0]
apis.supervisor.complete_task(answer=contact["phone_number"])
```'''],
    ),
    Scenario(
        name="likesong", split="train", difficulty=2, apps=("spotify",),
        instruction='Like the song "$title" on Spotify.',
        variants=[dict(supervisor=0, title="Quiet Arithmetic"), dict(supervisor=1, title="Sand Cathedral"),
                  dict(supervisor=2, title="Iron Lullaby")],
        evaluation='''
def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    user = models.end.spotify.User.find_one(email=main_user.email)
    song = models.end.spotify.Song.find_one(title=private_data.title)
    with test("""The supervisor now likes the requested song on Spotify."""):
        test.case(models.end.spotify.SongLike.exists(user_id=user.id, song_id=song.id), "==", True)
    with test("""No other song was liked or unliked."""):
        added, _, removed = models.changed_records("spotify.SongLike")
        test.case({like.song_id for like in added} - {song.id}, "==", set())
        test.case(len(removed), "==", 0)
    with test("""Nothing else changed outside Spotify's songs and likes."""):
        test.case(models.changed_model_names(ignore=["spotify.SongLike", "spotify.Song"]), "==", set())
''',
        solution=[login("spotify", "Spotify"), '''Find the song by its title, like it, and finish.
```python
results = apis.spotify.search_songs(query="$title", page_limit=20)
song = [s for s in results if s["title"] == "$title"][0]
print(apis.spotify.like_song(song_id=song["song_id"], access_token=spotify_token))
apis.supervisor.complete_task()
```'''],
    ),
    Scenario(
        name="venmopay", split="train", difficulty=2, apps=("venmo",),
        instruction='Send $$$amount to $friend on Venmo with the description "$description".',
        variants=[dict(supervisor=0, friend="Lena Novak", amount=14, description="movie night"),
                  dict(supervisor=1, friend="Tomas Reyes", amount=22.5, description="book club"),
                  dict(supervisor=2, friend="Maya Chen", amount=9, description="bus fare")],
        evaluation='''
def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    me = models.end.venmo.User.find_one(email=main_user.email)
    added, updated, removed = models.changed_records("venmo.Transaction")
    with test("""Exactly one new Venmo payment was made, from the supervisor, and none was removed or edited."""):
        test.case(len(added), "==", 1)
        test.case(added[0].sender_id, "==", me.id)
        test.case(len(updated) + len(removed), "==", 0)
    with test("""The payment goes to the requested friend, with the requested amount and description."""):
        receiver = models.end.venmo.User.find_one(id=added[0].receiver_id)
        test.case(receiver.first_name + " " + receiver.last_name, "==", private_data.friend)
        test.case(added[0].amount, "==", private_data.amount, tolerance=0.01)
        test.case(added[0].description, "==", private_data.description, normalize_text=True)
    with test("""Nothing else changed outside Venmo's users, payments and notifications."""):
        ignore = ["venmo.Transaction", "venmo.User", "venmo.Notification"]
        test.case(models.changed_model_names(ignore=ignore), "==", set())
''',
        solution=[login("venmo", "Venmo"), '''Find the friend's email, then send the money.
```python
people = apis.venmo.search_users(access_token=venmo_token, query="$friend", page_limit=20)
friend = [p for p in people if p["first_name"] + " " + p["last_name"] == "$friend"][0]
print(apis.venmo.create_transaction(receiver_email=friend["email"], amount=$amount, description="$description", access_token=venmo_token))
apis.supervisor.complete_task()
```'''],
    ),
    Scenario(
        name="finishtodo", split="train", difficulty=2, apps=("todoist",),
        instruction='Mark the task "$title" in my Todoist project "$project" as completed.',
        variants=[dict(supervisor=0, project="Home", title="Fix the leaking tap"),
                  dict(supervisor=1, project="Work", title="Review the budget draft"),
                  dict(supervisor=2, project="Home", title="Return library books")],
        evaluation='''
def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    user = models.end.todoist.User.find_one(email=main_user.email)
    project = models.end.todoist.Project.find_one(user_id=user.id, name=private_data.project)
    task = models.end.todoist.Task.find_one(project_id=project.id, title=private_data.title)
    with test("""The requested Todoist task is now completed."""):
        test.case(task.is_completed, "==", True)
    with test("""No other Todoist task was added, removed or changed."""):
        added, updated, removed = models.changed_records("todoist.Task")
        test.case({t.id for t in updated} - {task.id}, "==", set())
        test.case(len(added) + len(removed), "==", 0)
    with test("""Nothing else changed outside Todoist's tasks."""):
        test.case(models.changed_model_names(ignore=["todoist.Task"]), "==", set())
''',
        solution=[login("todoist", "Todoist"), '''Find the project, then the task in it, and mark it completed.
```python
projects = apis.todoist.show_projects(access_token=todoist_token, page_limit=20)
project = [p for p in projects if p["name"] == "$project"][0]
tasks = apis.todoist.show_tasks(project_id=project["project_id"], access_token=todoist_token)
task = [t for t in tasks["no_section_tasks"] if t["title"] == "$title"][0]
print(apis.todoist.update_task(task_id=task["task_id"], is_completed=True, access_token=todoist_token))
apis.supervisor.complete_task()
```'''],
    ),
    Scenario(
        name="artistplaylist", split="train", difficulty=3, apps=("spotify",),
        instruction='Create a Spotify playlist named "$playlist" with every song from my song library '
                    'by $artist.',
        variants=[dict(supervisor=0, artist="Dune Echo", playlist="Night Drive"),
                  dict(supervisor=2, artist="Velvet Harbor", playlist="Harbor Days"),
                  dict(supervisor=4, artist="Copper Tides", playlist="Loud Mornings")],
        private=lambda v: dict(song_ids=song_ids_by_artist(v["supervisor"], v["artist"])),
        evaluation='''
def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    user = models.end.spotify.User.find_one(email=main_user.email)
    playlists = models.end.spotify.Playlist.find_all(user_id=user.id, title=private_data.playlist)
    with test("""Exactly one playlist with the requested name now exists for the supervisor."""):
        test.case(len(playlists), "==", 1)
    with test("""The playlist holds exactly the library songs by the requested artist."""):
        links = models.end.spotify.PlaylistSong.find_all(playlist_id=playlists[0].id)
        test.case(sorted(link.song_id for link in links), "==", sorted(private_data.song_ids))
    with test("""Nothing else changed outside Spotify's playlists."""):
        ignore = ["spotify.Playlist", "spotify.PlaylistSong"]
        test.case(models.changed_model_names(ignore=ignore), "==", set())
''',
        solution=[login("spotify", "Spotify"), '''Collect my library, keeping the songs by the artist.
```python
songs = []
page = 0
while True:
    batch = apis.spotify.show_song_library(access_token=spotify_token, page_index=page, page_limit=20)
    if not batch:
        break
    songs += [s for s in batch if "$artist" in [a["name"] for a in s["artists"]]]
    page += 1
print([s["title"] for s in songs])
```''', '''Now create the playlist and add those songs.
```python
playlist_id = apis.spotify.create_playlist(title="$playlist", access_token=spotify_token)["playlist_id"]
for s in songs:
    apis.spotify.add_song_to_playlist(playlist_id=playlist_id, song_id=s["song_id"], access_token=spotify_token)
apis.supervisor.complete_task()
```'''],
    ),
    # -------------------------------------------------------------------------- dev scenarios
    Scenario(
        name="workcity", split="dev", difficulty=1, apps=("supervisor",),
        instruction="In which city is my work address?",
        variants=[dict(supervisor=3), dict(supervisor=4), dict(supervisor=5)],
        answer=lambda v: PEOPLE[v["supervisor"]]["work"],
        evaluation=ANSWER_EVALUATION,
        solution=['''My work address is in the supervisor app.
```python
addresses = apis.supervisor.show_addresses()
work = [a for a in addresses if a["name"] == "Work"][0]
apis.supervisor.complete_task(answer=work["city"])
```'''],
    ),
    Scenario(
        name="venmobalance", split="dev", difficulty=1, apps=("venmo",),
        instruction="What is my current Venmo balance?",
        variants=[dict(supervisor=3), dict(supervisor=4), dict(supervisor=5)],
        answer=lambda v: VENMO_BALANCE[v["supervisor"]],
        evaluation=ANSWER_EVALUATION,
        solution=[login("venmo", "Venmo"), '''Read the balance and answer with it.
```python
balance = apis.venmo.show_venmo_balance(access_token=venmo_token)["venmo_balance"]
apis.supervisor.complete_task(answer=balance)
```'''],
    ),
    Scenario(
        name="writenote", split="dev", difficulty=2, apps=("simple_note",),
        instruction='Create a note in Simple Note titled "$title" with the content "$content".',
        variants=[dict(supervisor=3, title="Dentist", content="Tuesday at 9"),
                  dict(supervisor=4, title="Wifi", content="the password is on the router"),
                  dict(supervisor=5, title="Reminder", content="renew the boat license")],
        evaluation='''
def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    user = models.end.simple_note.User.find_one(email=main_user.email)
    added, updated, removed = models.changed_records("simple_note.Note")
    with test("""Exactly one note was added for the supervisor, and no note was edited or removed."""):
        test.case(len(added), "==", 1)
        test.case(added[0].user_id, "==", user.id)
        test.case(len(updated) + len(removed), "==", 0)
    with test("""The new note has the requested title and content."""):
        test.case(added[0].title, "==", private_data.title, normalize_text=True)
        test.case(added[0].content, "==", private_data.content, normalize_text=True)
    with test("""Nothing else changed outside Simple Note's notes."""):
        test.case(models.changed_model_names(ignore=["simple_note.Note"]), "==", set())
''',
        solution=[login("simple_note", "Simple Note"), '''Create the note.
```python
print(apis.simple_note.create_note(title="$title", content="$content", access_token=simple_note_token))
apis.supervisor.complete_task()
```'''],
    ),
    Scenario(
        name="textcontact", split="dev", difficulty=2, apps=("phone",),
        instruction='Send a text message saying "$message" to $contact using my phone.',
        variants=[dict(supervisor=3, contact="Priya Nair", message="Dinner at eight?"),
                  dict(supervisor=4, contact="Omar Haddad", message="I found your keys."),
                  dict(supervisor=5, contact="Maya Chen", message="Happy birthday!")],
        evaluation='''
def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    me = models.end.phone.User.find_one(phone_number=main_user.phone_number)
    added, updated, removed = models.changed_records("phone.GlobalTextMessage")
    with test("""Exactly one text message was sent, by the supervisor."""):
        test.case(len(added), "==", 1)
        test.case(added[0].sender_id, "==", me.id)
        test.case(len(updated) + len(removed), "==", 0)
    with test("""It went to the requested contact with the requested words."""):
        receiver = models.end.phone.User.find_one(id=added[0].receiver_id)
        test.case(receiver.first_name + " " + receiver.last_name, "==", private_data.contact)
        test.case(added[0].message, "==", private_data.message, normalize_text=True)
    with test("""Nothing else changed outside the phone's text messages."""):
        ignore = ["phone.GlobalTextMessage", "phone.UserTextMessage"]
        test.case(models.changed_model_names(ignore=ignore), "==", set())
''',
        solution=[login("phone", "phone", username="$phone_number"),
                  '''Find the contact's number and send the text.
```python
contacts = apis.phone.search_contacts(access_token=phone_token, query="$contact", page_limit=20)
contact = [c for c in contacts if c["first_name"] + " " + c["last_name"] == "$contact"][0]
print(apis.phone.send_text_message(phone_number=contact["phone_number"], message="$message", access_token=phone_token))
apis.supervisor.complete_task()
```'''],
    ),
    Scenario(
        name="opentodos", split="dev", difficulty=2, apps=("todoist",),
        instruction='How many tasks in my Todoist project "$project" are not completed yet?',
        variants=[dict(supervisor=3, project="Home"), dict(supervisor=4, project="Work"),
                  dict(supervisor=5, project="Work")],
        answer=lambda v: len([t for t in PROJECTS[v["project"]] if t not in TODO_DONE[v["supervisor"]]]),
        evaluation=ANSWER_EVALUATION,
        solution=[login("todoist", "Todoist"), '''Find the project and count its open tasks.
```python
projects = apis.todoist.show_projects(access_token=todoist_token, page_limit=20)
project = [p for p in projects if p["name"] == "$project"][0]
tasks = apis.todoist.show_tasks(project_id=project["project_id"], access_token=todoist_token)
open_tasks = [t for t in tasks["no_section_tasks"] if not t["is_completed"]]
apis.supervisor.complete_task(answer=len(open_tasks))
```'''],
    ),
    Scenario(
        name="likefromnote", split="dev", difficulty=3, apps=("simple_note", "spotify"),
        instruction='Like on Spotify every song listed in my Simple Note note titled "Songs to like" '
                    '(one title per line).',
        variants=[dict(supervisor=3, titles=["Glass Orchard", "Neon Tidewater"]),
                  dict(supervisor=4, titles=["Salt and Lanterns", "Quiet Arithmetic", "Slow Comet"]),
                  dict(supervisor=5, titles=["Summer Ledger", "Northbound Static"])],
        # the note lives only in this task's database, written by `setup`
        setup=lambda add, v: add("simple_note", "Note", title="Songs to like", content="\n".join(v["titles"])),
        evaluation='''
def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    user = models.end.spotify.User.find_one(email=main_user.email)
    wanted = {models.end.spotify.Song.find_one(title=title).id for title in private_data.titles}
    added, _, removed = models.changed_records("spotify.SongLike")
    with test("""Every song listed in the note is now liked by the supervisor."""):
        liked = {like.song_id for like in models.end.spotify.SongLike.find_all(user_id=user.id)}
        test.case(wanted - liked, "==", set())
    with test("""No song outside the note was liked, and nothing was unliked."""):
        test.case({like.song_id for like in added} - wanted, "==", set())
        test.case(len(removed), "==", 0)
    with test("""Nothing else changed outside Spotify's songs and likes."""):
        test.case(models.changed_model_names(ignore=["spotify.SongLike", "spotify.Song"]), "==", set())
''',
        solution=[login("simple_note", "Simple Note"), '''Read the note with the song titles.
```python
found = apis.simple_note.search_notes(access_token=simple_note_token, query="Songs to like", page_limit=20)
note = [n for n in found if n["title"] == "Songs to like"][0]
titles = apis.simple_note.show_note(note_id=note["note_id"], access_token=simple_note_token)["content"].splitlines()
print(titles)
```''', login("spotify", "Spotify"), '''Like each listed song.
```python
for title in titles:
    results = apis.spotify.search_songs(query=title, page_limit=20)
    song = [s for s in results if s["title"] == title][0]
    apis.spotify.like_song(song_id=song["song_id"], access_token=spotify_token)
apis.supervisor.complete_task()
```'''],
    ),
]



# ------------------------------------------------------------------------------ scripted solutions

def find_variant(task_id: str) -> tuple[Scenario, dict]:
    """The scenario and variant of a mini-world task id, `<scenario>_<n>`."""
    name, _, number = task_id.rpartition("_")
    for scenario in SCENARIOS:
        if scenario.name == name and number.isdigit() and 1 <= int(number) <= len(scenario.variants):
            return scenario, scenario.variants[int(number) - 1]
    raise ValueError(f"{task_id!r} is not a mini-world task (see mini_world/scenarios.py); scripted "
                     "solutions exist only for those.")


def template_fields(variant: dict) -> dict:
    """What the `$` blanks of an instruction or solution are filled with: the variant's fields and
    the supervisor's email and phone number."""
    person = PEOPLE[variant["supervisor"]]
    return {**variant, "email": person["email"], "phone_number": person["phone_number"]}


def solution(task_id: str) -> list[str]:
    """The scripted correct assistant turns of a mini-world task (one ```python block each)."""
    scenario, variant = find_variant(task_id)
    return [string.Template(cell).substitute(template_fields(variant)) for cell in scenario.solution]


def table() -> str:
    """The scenarios as a Markdown table (mini_world/README.md holds it; a test checks it is current)."""
    rows = ["| tasks | split | difficulty | apps | instruction (first variant) | the scripted solution's steps |",
            "|---|---|---|---|---|---|"]
    for s in SCENARIOS:
        instruction = string.Template(s.instruction).substitute(template_fields(s.variants[0]))
        steps = " / ".join(cell.split("\n", 1)[0] for cell in solution(f"{s.name}_1"))
        rows.append(f"| {s.name}_1..{len(s.variants)} | {s.split} | {s.difficulty} | {', '.join(s.apps)} | "
                    f"{instruction} | {steps} |")
    return "\n".join(rows)
