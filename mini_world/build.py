"""Build the mini-world in AppWorld's on-disk format: API docs, base databases, tasks, test labels.

    python appworld_env.py setup [--root DIR] [--force]   # or mini_world.build.setup_mini_world(root)

Everything is generated from AppWorld's own app code and models (never committed: AppWorld's
licence) out of world.py and scenarios.py, into `<root>/data`, and built again only when this
builder, those two files or appworld's version change.
"""
import fcntl
import hashlib
import json
import os
import re
import shutil
import string
import subprocess
import sys
import time

from appworld_env import DEFAULT_ROOT, extract_code
from mini_world.scenarios import SCENARIOS, solution, template_fields
from sandbox import REPO, ensure_appworld_installed

HERE = os.path.dirname(os.path.abspath(__file__))


def is_mini_world(root: str = DEFAULT_ROOT) -> bool:
    """True if `root` holds the mini-world or no data yet (so `setup_mini_world` may build there);
    False if it holds other data, such as the real AppWorld download."""
    data = os.path.join(root, "data")
    return os.path.exists(os.path.join(data, "mini_world.json")) or not (os.path.isdir(data) and os.listdir(data))


def setup_mini_world(root: str = DEFAULT_ROOT, force: bool = False) -> None:
    """Build the mini-world under `<root>/data` unless it is built already (idempotent); refuses to
    touch a root that holds other data. The build runs in a child process: AppWorld freezes the
    clock of the process it runs in."""
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    ensure_appworld_installed()
    stamp, fingerprint = os.path.join(root, "data", "mini_world.json"), _fingerprint()
    with open(os.path.join(root, ".mini_world.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # tests in other processes may build at the same time
        if os.path.exists(stamp):
            with open(stamp) as file:
                if json.load(file).get("fingerprint") == fingerprint and not force:
                    return
        elif not is_mini_world(root):
            raise RuntimeError(f"{root}/data holds data that is not the mini-world (the real AppWorld "
                               "data?); refusing to overwrite it. Use another --root.")
        staging = os.path.join(root, ".building")
        shutil.rmtree(staging, ignore_errors=True)
        code = f"from mini_world.build import _build_world_and_exit; _build_world_and_exit({staging!r}, {fingerprint!r})"
        exit_code = subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode
        if exit_code != 0:
            raise RuntimeError(f"Building the mini-world failed (exit code {exit_code}); see above.")
        shutil.rmtree(os.path.join(root, "data"), ignore_errors=True)
        os.replace(os.path.join(staging, "data"), os.path.join(root, "data"))
        shutil.rmtree(staging, ignore_errors=True)


def _fingerprint() -> str:
    """The built world's cache key: this builder, the people and scenarios, and appworld's version."""
    from importlib.metadata import version
    digest = hashlib.sha256(version("appworld").encode())
    for name in ("build.py", "world.py", "scenarios.py"):
        with open(os.path.join(HERE, name), "rb") as file:
            digest.update(name.encode() + file.read())
    return digest.hexdigest()[:16]


def _build_world_and_exit(root: str, fingerprint: str) -> None:
    """The child process's work. It ends with os._exit: a normal interpreter shutdown after building
    these in-memory databases takes longer than the build."""
    try:
        _build_world(root, fingerprint)
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def _build_world(root: str, fingerprint: str) -> None:
    """In a child process: API docs, base databases, tasks, splits, then labels from no-op episodes."""
    started = time.time()
    os.environ["APPWORLD_ROOT"] = root
    from appworld.api_docs import prepare_api_docs
    from appworld.apps import get_all_apps
    from appworld.apps.api_lib import save_local_dbs, set_local_date_and_time, set_local_dbs, unset_local_date_and_time
    from appworld.apps.model_lib import CachedDBHandler
    from appworld.common.constants import CANARY_STRING, DB_VERSION, DEFAULT_SYSTEM_DATETIME
    from appworld.common.utils import import_models_module
    from mini_world import world as W

    data = os.path.join(root, "data")
    apps = get_all_apps()  # with admin
    M = {app: import_models_module(app) for app in apps}  # each app's SQL models, e.g. M["spotify"].Song

    def save_dbs(memory_path: str, to: str, format: str) -> None:
        save_local_dbs(from_db_home_path=memory_path, to_db_home_path=to, format=format,
                       app_names=list(apps), delete_if_exists=True, save_model_hashes=True)
        CachedDBHandler.reset()

    # 1. API docs, generated from the apps' code (never committed: AppWorld's licence)
    docs_dir = os.path.join(data, "api_docs", "standard")
    os.makedirs(docs_dir, exist_ok=True)
    api_docs = {app: prepare_api_docs(app) for app in get_all_apps(skip_admin=True)}
    for app, docs in api_docs.items():
        with open(os.path.join(docs_dir, app + ".json"), "w") as file:
            json.dump({d["api_name"]: {**d, "canary_string": CANARY_STRING} for d in docs}, file, indent=1)

    # 2. the base world, with the apps' own models; the clock is frozen so timestamps are stable
    freezer = set_local_date_and_time(DEFAULT_SYSTEM_DATETIME)
    set_local_dbs(to_db_home_path=":memory:mini_base", app_names=apps, create=True)
    for docs in api_docs.values():  # the api_docs app answers from its own table
        for doc in docs:
            doc = dict(doc)
            doc["app_name_"] = doc.pop("app_name")
            M["api_docs"].ApiDoc.create_save(**doc)
    for i, p in enumerate(W.PEOPLE):  # user ids are i + 1 in every app
        person = {k: p[k] for k in ("first_name", "last_name", "email", "phone_number", "birthday", "sex")}
        M["admin"].MainUser.create_save(**person)
        for app in ("spotify", "venmo", "simple_note", "todoist"):
            extra = {"venmo_balance": W.VENMO_BALANCE[i]} if app == "venmo" else {}
            M[app].User.create_save(first_name=p["first_name"], last_name=p["last_name"], email=p["email"],
                                    password=W.password(i, app), verified=True, **extra)
        M["phone"].User.create_save(first_name=p["first_name"], last_name=p["last_name"],
                                    phone_number=p["phone_number"], password=W.password(i, "phone"))
    for name, genre in W.ARTISTS:
        M["spotify"].Artist.create_save(name=name, genre=genre)
    for s, (title, artist, duration) in enumerate(W.SONGS):  # song ids are index + 1
        M["spotify"].Song.create_save(title=title, artist_ids=[artist + 1], duration=duration,
                                      release_date=DEFAULT_SYSTEM_DATETIME.subtract(years=1),
                                      genre=W.ARTISTS[artist][1],
                                      like_count=sum(s in liked for liked in W.LIKES.values()))
    for i in range(len(W.PEOPLE)):
        for s in W.LIBRARY[i]:
            M["spotify"].UserLibrarySong.create_save(user_id=i + 1, song_id=s + 1)
        for s in W.LIKES[i]:
            M["spotify"].SongLike.create_save(user_id=i + 1, song_id=s + 1)
        for title, content in W.NOTES[i]:
            M["simple_note"].Note.create_save(user_id=i + 1, title=title, content=content)
        for j in range(len(W.PEOPLE)):
            if j != i:
                M["venmo"].Friendship.create_save(user_id=i + 1, friend_id=j + 1)
                q = W.PEOPLE[j]
                M["phone"].Contact.create_save(user_id=i + 1, first_name=q["first_name"], last_name=q["last_name"],
                                               email=q["email"], phone_number=q["phone_number"],
                                               relationships=[W.relationship(i, j)])
        for project, titles in W.PROJECTS.items():
            pid = M["todoist"].Project.create_save(user_id=i + 1, name=project).id
            M["todoist"].ProjectCollaboratorLink.create_save(project_id=pid, user_id=i + 1)
            for k, title in enumerate(titles):
                M["todoist"].Task.create_save(project_id=pid, user_id=i + 1, title=title, priority="medium",
                                              order_index=k, is_completed=title in W.TODO_DONE[i])
    for sender, receiver, amount, description in W.VENMO_PAYMENTS:
        M["venmo"].Transaction.create_save(sender_id=sender + 1, receiver_id=receiver + 1, amount=amount,
                                           description=description)
    for sender, receiver, message in W.TEXTS:
        text_id = M["phone"].GlobalTextMessage.create_save(sender_id=sender + 1, receiver_id=receiver + 1,
                                                           message=message).id
        for user in (sender, receiver):
            M["phone"].UserTextMessage.create_save(global_text_message_id=text_id, user_id=user + 1)
    base_dbs = os.path.join(data, "base_dbs")
    save_dbs(":memory:mini_base", base_dbs, "full")

    # 3. the tasks: database changes over the base, specs, ground truth with our evaluation.py
    splits = {"train": [], "dev": []}
    for scenario in SCENARIOS:
        for n, variant in enumerate(scenario.variants, start=1):
            task_id = f"{scenario.name}_{n}"
            splits[scenario.split].append(task_id)
            i, p = variant["supervisor"], W.PEOPLE[variant["supervisor"]]
            fields = template_fields(variant)
            instruction = string.Template(scenario.instruction).substitute(fields)
            task_dir = os.path.join(data, "tasks", task_id)
            memory = f":memory:mini_task_{task_id}"
            set_local_dbs(to_db_home_path=memory, from_db_home_path=base_dbs, app_names=apps)
            S = M["supervisor"]
            supervisor = S.Supervisor.create_save(**{k: p[k] for k in ("first_name", "last_name", "email",
                                                                      "phone_number", "birthday", "sex")})
            for app in W.ACCOUNT_APPS:
                S.AccountPassword.create_save(supervisor_id=supervisor.id, account_name=app, password=W.password(i, app))
            for name, city in (("Home", p["home"]), ("Work", p["work"])):
                S.Address.create_save(supervisor_id=supervisor.id, name=name, street_address=f"{10 + i} Harbour Street",
                                      city=city, state="-", country="-", zip_code=10000 + 1000 * i)
            S.Task.create_save(supervisor_id=supervisor.id, instruction=instruction)
            if scenario.setup is not None:
                scenario.setup(lambda app, model, **kw: getattr(M[app], model).create_save(**{"user_id": i + 1, **kw}),
                               variant)
            save_dbs(memory, os.path.join(task_dir, "dbs"), "changes")
            specs = {"instruction": instruction, "datetime": DEFAULT_SYSTEM_DATETIME.isoformat(),
                     "supervisor": {k: p[k] for k in ("first_name", "last_name", "email", "phone_number")},
                     "db_version": DB_VERSION, "canary_string": CANARY_STRING}
            truth = os.path.join(task_dir, "ground_truth")
            os.makedirs(truth, exist_ok=True)
            cells = solution(task_id)
            code = "\n".join(extract_code(c) for c in cells)
            # AppWorld's statistics, here counted in the script's text (call sites, not calls made)
            metadata = {"mode": "minimal", "difficulty": scenario.difficulty, "num_apps": len(scenario.apps),
                        "num_apis": len(set(re.findall(r"apis\.\w+\.\w+", code))),
                        "num_api_calls": len(re.findall(r"apis\.\w+\.\w+\(", code)),
                        "num_solution_code_lines": len(code.splitlines())}
            private = {**variant, **scenario.private(variant)}
            files = {"specs.json": specs, "ground_truth/metadata.json": metadata,
                     "ground_truth/public_data.json": {}, "ground_truth/private_data.json": private,
                     "ground_truth/answer.json": scenario.answer(variant),
                     "ground_truth/test_data.json": None}  # labelled below, from a no-op episode
            for path, content in files.items():
                with open(os.path.join(task_dir, path), "w") as file:
                    json.dump(content, file, indent=1)
            with open(os.path.join(truth, "evaluation.py"), "w") as file:
                file.write(f"# Canary String: {CANARY_STRING}\n" + scenario.evaluation.lstrip())
    unset_local_date_and_time(freezer)
    os.makedirs(os.path.join(data, "datasets"), exist_ok=True)
    splits["test_normal"] = splits["dev"]  # no separate test set in the mini-world
    for split, task_ids in splits.items():
        with open(os.path.join(data, "datasets", split + ".txt"), "w") as file:
            file.write("\n".join(task_ids) + "\n")

    # 4. label every test as AppWorld does: run a no-op episode (open the world, evaluate it)
    from appworld import AppWorld
    for task_id in splits["train"] + splits["dev"]:
        with AppWorld(task_id=task_id, experiment_name="mini_world_labels") as world:
            tracker = world.evaluate(suppress_errors=True)
        labels = [{"requirement": t["requirement"], "label": "no_op_pass"} for t in tracker.passes]
        labels += [{"requirement": t["requirement"], "label": "no_op_fail"} for t in tracker.failures]
        if not tracker.failures:
            raise RuntimeError(f"{task_id}: a no-op episode passes every test; the task checks nothing.")
        with open(os.path.join(data, "tasks", task_id, "ground_truth", "test_data.json"), "w") as file:
            json.dump(labels, file, indent=1)
    shutil.rmtree(os.path.join(root, "experiments"), ignore_errors=True)
    with open(os.path.join(data, "mini_world.json"), "w") as file:
        json.dump({"fingerprint": fingerprint, "tasks": splits}, file, indent=1)
    print(f"mini-world: {len(splits['train'])} train and {len(splits['dev'])} dev tasks built in "
          f"{time.time() - started:.0f} s", flush=True)
