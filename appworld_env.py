"""AppWorld as a multi-turn environment for LOOP, in confined processes; and the offline mini-world.

    python appworld_env.py setup [--root DIR] [--force]   # build the mini-world (offline, ~30 s)
    python appworld_env.py show likesong_1 [--prompt short]  # print an episode of a scripted solution

Two settings, one code path (the real AppWorld engine, never a mock):
- the mini-world (default): our own 48 tasks over invented people (`mini_world/`), written in
  AppWorld's on-disk format under `<repo>/appworld_root` by `setup_mini_world()`;
- the real AppWorld data: `appworld download data --root DIR`, then `APPWORLD_ROOT=DIR`.

An episode: `reset` gives the opening chat messages (see PROMPTS: `paper`, the default, has
instructions, a worked demonstration as chat turns, then the task); each `step` takes the agent's
message, runs its ```python blocks in the task's world and returns what they printed (truncated)
plus a reminder of the task. The episode ends when the agent calls `apis.supervisor.complete_task(...)`,
at the interaction limit, or when the trainer calls `score` (its context is full); then AppWorld's
own unit tests for the task decide the reward.

Why processes: AppWorld freezes the clock of its whole process (freezegun), times cells out with
SIGALRM (main thread only), allows one open world per process, and runs the agent's code in its own
process. So the trainer never imports appworld; each episode runs in a fresh process that cannot
reach the ground truth or the trainer, and is scored in another (see "episodes in processes"); a
process that hangs or dies ends only its own episode.
"""
import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import recv_handle, send_handle

REPO = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ROOT = os.environ.get("APPWORLD_ROOT") or os.path.join(REPO, "appworld_root")
SPLITS = ("train", "dev", "test_normal", "test_challenge")
REWARDS = ("fraction", "binary", "progress")
BUILD_VERSION = 2  # bump when the builder below changes what it writes (the cache key includes it)


# ============================================================================ task lists, metrics

def _missing_data_error(root: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"No AppWorld data under {os.path.join(root, 'data')}. Build the offline mini-world with "
        f"`python appworld_env.py setup --root {root}` (or appworld_env.setup_mini_world()), or, with "
        f"internet access, run `appworld download data --root DIR` and set APPWORLD_ROOT=DIR.")


def load_task_ids(split: str, root: str = DEFAULT_ROOT, difficulties=None) -> list[str]:
    """Task ids of a split, read from `<root>/data/datasets/<split>.txt` (AppWorld's layout).

    `difficulties`, e.g. (1, 2) for the paper's training subset, keeps tasks whose ground-truth
    metadata has that difficulty.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
    data = os.path.join(root, "data")
    if not os.path.isdir(os.path.join(data, "tasks")):
        raise _missing_data_error(root)
    path = os.path.join(data, "datasets", split + ".txt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No split file {path}. The mini-world has only train, dev and "
                                f"test_normal (= dev); the real AppWorld data has all of {SPLITS}.")
    with open(path) as file:
        task_ids = [line.strip() for line in file if line.strip()]
    if difficulties is not None:
        task_ids = [t for t in task_ids if _metadata(root, t)["difficulty"] in set(difficulties)]
    return task_ids


def is_mini_world(root: str = DEFAULT_ROOT) -> bool:
    """True if `root` holds the mini-world or no data yet (so `setup_mini_world` may build it there);
    False if it holds other data, such as the real AppWorld download."""
    data = os.path.join(root, "data")
    return os.path.exists(os.path.join(data, "mini_world.json")) or not (os.path.isdir(data) and os.listdir(data))


def _metadata(root: str, task_id: str) -> dict:
    with open(os.path.join(root, "data", "tasks", task_id, "ground_truth", "metadata.json")) as file:
        return json.load(file)


def _check_task_id(root: str, task_id: str) -> None:
    """A clear error for an unknown task id, naming the split files it was looked for in."""
    if os.path.isfile(os.path.join(root, "data", "tasks", task_id, "specs.json")):
        return
    if not os.path.isdir(os.path.join(root, "data", "tasks")):
        raise _missing_data_error(root)
    split_files = [os.path.join(root, "data", "datasets", s + ".txt") for s in SPLITS]
    raise ValueError(f"Unknown task id {task_id!r}: it is in none of the split files "
                     f"{[p for p in split_files if os.path.exists(p)]} and has no folder "
                     f"{os.path.join(root, 'data', 'tasks', task_id)}.")


def task_metrics(task_ids: list[str], successes: list[bool]) -> dict:
    """AppWorld's two scores: TGC, the share of tasks that succeed, and SGC, the share of scenarios
    (the task id before its last "_") all of whose tasks succeed.

    >>> task_metrics(["a_1", "a_2", "b_1"], [True, True, False])
    {'tgc': 0.6666666666666666, 'sgc': 0.5}
    """
    if len(task_ids) != len(successes) or not task_ids:
        raise ValueError("task_metrics needs one success flag per task id, and at least one task.")
    by_scenario = {}
    for task_id, success in zip(task_ids, successes):
        by_scenario.setdefault(task_id.rsplit("_", 1)[0], []).append(bool(success))
    return {"tgc": sum(map(bool, successes)) / len(successes),
            "sgc": sum(all(s) for s in by_scenario.values()) / len(by_scenario)}


def solution(task_id: str, root: str = DEFAULT_ROOT) -> list[str]:
    """The scripted correct assistant turns for a mini-world task (one ```python cell each)."""
    scenario, variant = _find_variant(task_id)
    fields = _template_fields(variant)
    return [string.Template(cell).substitute(fields) for cell in scenario.solution]


def _find_variant(task_id: str):
    from mini_world.scenarios import SCENARIOS
    name, _, number = task_id.rpartition("_")
    for scenario in SCENARIOS:
        if scenario.name == name and number.isdigit() and 1 <= int(number) <= len(scenario.variants):
            return scenario, scenario.variants[int(number) - 1]
    raise ValueError(f"{task_id!r} is not a mini-world task (see mini_world/scenarios.py); scripted "
                     "solutions exist only for those.")


def _template_fields(variant: dict) -> dict:
    from mini_world.world import PEOPLE
    person = PEOPLE[variant["supervisor"]]
    return {**variant, "email": person["email"], "phone_number": person["phone_number"]}


# ==================================================================================== the prompt

SYSTEM_PROMPT = ("You are an autonomous agent. You complete a person's task by writing Python code "
                 "that calls the APIs of their apps, one small step at a time.")

# --prompt paper: the structure of the paper's prompt (App. D), in our own words: ReAct instructions,
# one worked demonstration as real assistant / user turns, then the task block, which is appended
# again after every observation. The instructions give no hint the paper's prompt does not give
# (how to log in, page sizes): finding those out from the API docs is part of each task.
REACT_INSTRUCTIONS = '''I am your supervisor. Do my task below on your own, through the APIs of my apps (spotify, venmo, gmail, ...) in a Python shell. We take turns: you write a short thought and one ```python block; I run the block and show you what it printed; you decide the next step from what you saw, and so on until the task is done.

The variable `apis` holds the apps. Three APIs describe everything else:
- apis.api_docs.show_app_descriptions(): the apps and what they are for,
- apis.api_docs.show_api_descriptions(app_name=...): the APIs of one app,
- apis.api_docs.show_api_doc(app_name=..., api_name=...): the parameters and response of one API.

Guidelines:
1. One ```python block per reply, small enough to check its result before the next step. Variables stay defined from one block to the next.
2. Read an API's documentation before you first call it. Never make up an API, a parameter or a value you have not seen (a password, an email address, an id).
3. My personal details (profile, addresses, payment cards, the passwords of my accounts) are in the supervisor app.
4. When the task is done, call apis.supervisor.complete_task(answer=...) if the task asks for information, or apis.supervisor.complete_task() if it asks for an action. This ends the task.

First, a worked example: another person, another task.'''

# The demonstration: an invented person and an invented task on an app the mini-world does not use.
# Its outputs are illustrative (abridged API docs); nothing here comes from any task's ground truth.
DEMO_TASK = {"datetime": "2023-05-18T14:30:00",
             "supervisor": {"first_name": "Rosa", "last_name": "Lindqvist", "email": "rosa.lindqvist@example.net",
                            "phone_number": "7195550134"},
             "instruction": "Which of my Splitwise groups has the most members? Answer with the group's name."}
DEMO_TURNS = [  # (assistant message, what the shell printed); the last turn ends the task
    ('''Splitwise keeps the groups. Which of its APIs deal with groups, and how do I log in?
```python
print([api["name"] for api in apis.api_docs.show_api_descriptions(app_name="splitwise") if "group" in api["name"] or api["name"] == "login"])
```''',
     "['login', 'show_groups', 'create_group', 'show_group', 'delete_group', 'update_group', 'undelete_group', "
     "'add_member_to_group', 'remove_member_from_group', 'exit_group', 'accept_group_invitation', "
     "'show_group_expenses', 'show_no_group_expenses', 'show_group_payments', 'show_no_group_payments', "
     "'show_group_balance', 'show_groups_balance']"),
    ('''show_groups should list my groups. Before calling anything, let me read how login and show_groups are called.
```python
print(apis.api_docs.show_api_doc(app_name="splitwise", api_name="login"))
print(apis.api_docs.show_api_doc(app_name="splitwise", api_name="show_groups"))
```''',
     str({"api_name": "login", "parameters": [
             {"name": "username", "type": "string", "required": True, "description": "Your account email."},
             {"name": "password", "type": "string", "required": True}],
          "response_schemas": {"success": {"access_token": "string", "token_type": "string"}}}) + "\n" +
     str({"api_name": "show_groups", "parameters": [
             {"name": "access_token", "type": "string", "required": True},
             {"name": "page_index", "type": "integer", "required": False, "default": 0},
             {"name": "page_limit", "type": "integer", "required": False}],
          "response_schemas": {"success": [{"group_id": 1, "name": "string",
                                            "members": [{"name": "string", "email": "user@example.com"}]}]}})),
    ('''Login needs my email and my Splitwise password, which the supervisor app keeps.
```python
passwords = {p["account_name"]: p["password"] for p in apis.supervisor.show_account_passwords()}
token = apis.splitwise.login(username="rosa.lindqvist@example.net", password=passwords["splitwise"])["access_token"]
print("logged in")
```''',
     "logged in"),
    ('''The groups come one page at a time: I read pages until one comes back empty, then count each group's members.
```python
groups, page = [], 0
while True:
    batch = apis.splitwise.show_groups(access_token=token, page_index=page)
    if not batch:
        break
    groups += batch
    page += 1
print([(g["name"], len(g["members"])) for g in groups])
```''',
     "[('Flat 3B', 3), ('Lisbon weekend', 5), ('Climbing club', 9), ('Book circle', 4), ('Office lunch', 6)]"),
    ('''Climbing club has the most members (9), and the task asks for its name.
```python
apis.supervisor.complete_task(answer="Climbing club")
```''', None),
]

SHORT_INSTRUCTIONS = '''Complete my task with Python. Reply with one ```python block each turn; `apis` gives my apps. Passwords: apis.supervisor.show_account_passwords(). Log in: apis.<app>.login(username=<my email, or my phone number for the phone app>, password=...)["access_token"]. Finish with apis.supervisor.complete_task(answer=...) for a question, or apis.supervisor.complete_task() for an action.'''

PROMPTS = {  # name -> what it is (train.py prints it at start-up)
    "paper": "the paper's structure: ReAct instructions, a worked demonstration as chat turns, the whole task "
             "block after every observation",
    "short": "a few lines of instructions and a one-line task reminder, for small models; the offline default",
}


def task_block(info: dict) -> str:
    """The task: date, who the supervisor is, the instruction. Built from the task's specs only."""
    s = info["supervisor"]
    return (f"Date and time: {info['datetime']}\n"
            f"Me: {s['first_name']} {s['last_name']}, email {s['email']}, phone number {s['phone_number']}\n"
            f"Task: {info['instruction']}")


def opening_messages(info: dict, prompt: str = "paper") -> list[dict]:
    """The chat messages an episode starts with. After the system message, user and assistant
    alternate (the demonstration's turns included), as ChatML and stricter chat templates expect."""
    system = {"role": "system", "content": SYSTEM_PROMPT}
    if prompt == "short":
        return [system, {"role": "user", "content": f"{SHORT_INSTRUCTIONS}\n\n{task_block(info)}"}]
    if prompt != "paper":
        raise ValueError(f"Unknown prompt {prompt!r}; expected one of {tuple(PROMPTS)}.")
    messages = [system, {"role": "user", "content": f"{REACT_INSTRUCTIONS}\n\n{task_block(DEMO_TASK)}"}]
    for turn, output in DEMO_TURNS:
        messages.append({"role": "assistant", "content": turn})
        if output is not None:
            messages.append({"role": "user", "content": output})
    return messages + [{"role": "user", "content": f"The example is over. Now my task.\n{task_block(info)}"}]


def reminder(info: dict, prompt: str = "paper") -> str:
    """Appended to every observation (as the paper does), so the task stays in view: the whole
    task block for `paper`, the instruction alone for `short`."""
    if prompt == "short":
        return f"(Your task: {info['instruction']} Reply with one ```python block; end with apis.supervisor.complete_task.)"
    return f"As a reminder, my task:\n{task_block(info)}"


# ======================================================================== agent code, guard, output

CODE_BLOCK = re.compile(r"```(?:python3?|py)\b[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str | None:
    """All ```python blocks of a message, joined (as the paper does); an unclosed last block counts
    (the model may have hit its token limit). None when the message has no code."""
    blocks = [b.strip() for b in CODE_BLOCK.findall(text) if b.strip()]
    return "\n\n".join(blocks) if blocks else None


# A friendly first message for code that reaches for the file system or the interpreter's insides,
# in AppWorld's words. It is a text check, easy to get around, and not what keeps the answer away:
# that is the episode's process (see "episodes in processes" below and the README's "Isolation").
BLOCKED_MODULES = {"os", "sys", "pathlib", "appworld", "importlib", "io", "shutil", "inspect", "gc",
                   "ctypes", "builtins", "socket", "marshal"}
BLOCKED_NAMES = {"__import__", "eval", "exec", "compile", "globals", "locals", "vars"}


def guard(code: str) -> str | None:
    """An error message if the code plainly tries to reach outside the apps, else None."""
    import ast
    if "ground_truth" in code:
        return "Execution failed. Traceback:\nAccess to the task's ground truth is not allowed."
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None  # AppWorld reports syntax errors itself
    for node in ast.walk(tree):
        modules = []
        if isinstance(node, ast.Import):
            modules = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [(node.module or "").split(".")[0]]
        bad = sorted(set(modules) & BLOCKED_MODULES)
        if bad:
            return f"Execution failed. Traceback:\nUsage of the following module is not allowed: {bad[0]}."
        if isinstance(node, ast.Name) and node.id in BLOCKED_NAMES:
            return f"Execution failed. Traceback:\nUsage of the following function is not allowed: {node.id}."
        dunder = (node.attr if isinstance(node, ast.Attribute) else
                  node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else "")
        if "__" in dunder:
            return f"Execution failed. Traceback:\nAccess to {dunder[:40]!r} is not allowed."
    return None


def run_cell(world, code: str) -> str:
    """Run agent code in an open world; whatever the code is or does, the answer is an observation."""
    import ast
    failed = "Execution failed. Traceback:\n"
    if len(code) > MAX_CODE_CHARS:  # refused before AppWorld's own parse, which takes ~40 s per MB
        return f"{failed}The code has {len(code)} characters; the limit is {MAX_CODE_CHARS}. Write smaller blocks."
    try:
        code.encode("utf-8")
        ast.parse(code)
    except UnicodeEncodeError as error:
        return f"{failed}The code is not valid Unicode (character {error.start} is a lone surrogate)."
    except (MemoryError, RecursionError):
        return f"{failed}The code is nested too deeply to be parsed."
    except SyntaxError:
        pass  # AppWorld reports it in its own words
    try:
        return guard(code) or world.execute(code)
    except BaseException as error:  # AppWorld catches Exception only: KeyboardInterrupt, SystemExit...
        world.safety_guard.disable()  # what execute() would have done after the cell
        world._save_state(world.output_db_home_path_on_disk)
        return f"{failed}{type(error).__name__}: {error}"
    finally:
        world.environment_io.clear()  # AppWorld keeps every cell and output for its logs, which we do not write


# ======================================================================== episodes in processes
#
# AppWorld freezes the clock of its whole process (freezegun), times cells out with SIGALRM (main
# thread only), allows one open world per process, and runs the agent's code in that process. So:
# - one trusted "zygote" process per pool, started with a minimal environment, imports AppWorld and
#   opens (then closes) one world, so that the next worlds open in ~0.1 s instead of ~3 s; it never
#   runs agent code and never loads a ground truth;
# - each episode is a fresh fork of it that serves that one episode and dies with it, confined
#   (see _confine) and with its world opened without the ground truth;
# - each score is another fresh fork, which checks and scores the output databases that the
#   episode's world saved after every cell, after the episode's processes are gone.
# The trainer never imports appworld; it talks to each process over its own socket, in JSON (never
# pickle: that would run code the agent sent).

MAX_CODE_CHARS = 20_000
ENV_KEEP = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "LANG", "LC_ALL", "TZ")  # all of the trainer's the zygote gets
UID_BASE = 1 << 30  # as root, an episode runs as uid UID_BASE + its pid: a uid nothing else has
LIMITS = {"RLIMIT_FSIZE": 64 << 20, "RLIMIT_AS": 4 << 30, "RLIMIT_CORE": 0}  # NPROC too, with an own uid
SQL_VERBS = {"INSERT", "UPDATE", "DELETE", "CREATE", "DROP"}  # what AppWorld's change tracker records
ISOLATION = ("own uid", "read-only files", "hidden ground truth", "no network", "own /proc")  # see _confine


def _send(conn, message) -> None:
    conn.send_bytes(json.dumps(message).encode())


def _recv(conn, limit: int = 1 << 26):
    return json.loads(conn.recv_bytes(limit))


def _zygote_main(fd: int, root: str) -> None:
    """The pool's trusted process: warm up, answer {"ready"} or {"error"}, serve, clean up."""
    import gc
    outputs = os.path.join(root, "experiments", "outputs")
    prefix = f"envpool-{os.getpid()}-"
    os.environ.update(APPWORLD_ROOT=root, HOME=os.path.join(outputs, prefix + "home"))  # for AppWorld, IPython
    conn, env = Connection(fd), dict(os.environ)
    try:
        if os.geteuid() == 0:  # episodes run as other uids: they cannot enter these folders
            tasks = os.path.join(root, "data", "tasks")
            for task_id in os.listdir(tasks):
                if os.path.isdir(os.path.join(tasks, task_id, "ground_truth")):
                    os.chmod(os.path.join(tasks, task_id, "ground_truth"), 0o700)
        os.makedirs(os.environ["HOME"], exist_ok=True)
        import pytest  # noqa: F401  AppWorld's evaluation imports it: once here, not in every scorer
        from appworld import AppWorld
        from appworld.apps import model_lib
        world = AppWorld(task_id=sorted(os.listdir(os.path.join(root, "data", "tasks")))[0],
                         experiment_name=prefix + "warmup", load_ground_truth=False)
        world.execute("apis.supervisor.show_profile()")  # a first API call has its own one-time costs
        world.close()
        AppWorld.close_all()
        # that world left the base databases open read-write (as root) in caches: an episode would inherit them
        model_lib.get_cached_db_engine.cache_clear()
        model_lib.get_direct_cached_sqlite3_connection.cache_clear()
        os.environ.clear()
        os.environ.update(env)  # what appworld's import added goes (it loads .env files)
        gc.collect()
        gc.freeze()  # forks share these pages instead of copying them as the collector touches them
    except BaseException as error:
        _send(conn, {"error": f"{type(error).__name__}: {error}"})
    else:
        _send(conn, {"ready": True})
        _zygote_serve(conn, root)
    for name in os.listdir(outputs) if os.path.isdir(outputs) else []:
        if name.startswith(prefix):
            shutil.rmtree(os.path.join(outputs, name), ignore_errors=True)


def _zygote_serve(conn, root: str) -> None:
    """Requests, one at a time: {"op": "episode", ...} with a socket -> {"pid"}: fork an episode;
    {"op": "end", "pid", "name", "score", ...} (with a socket if "score") -> {} or {"pid"}: kill the
    episode's process, then fork a scorer or delete its outputs; {"op": "close"}."""
    import ctypes
    if hasattr(ctypes.CDLL(None), "prctl"):  # PR_SET_CHILD_SUBREAPER: orphaned agent processes are ours to reap
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
    outputs, children = os.path.join(root, "experiments", "outputs"), set()
    while True:
        try:
            request = _recv(conn)
        except (EOFError, OSError):
            break
        while True:  # reap what ended, its own children and the orphans of its children's children
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            children.discard(pid)
        if request["op"] == "close":
            break
        if request["op"] == "end" and request["pid"] in children:
            os.kill(request["pid"], signal.SIGKILL)  # its PID namespace (if any) dies with it
            os.waitpid(request["pid"], 0)
            children.discard(request["pid"])
        if request["op"] == "end" and request.get("sweep"):  # no PID namespace: kill what it started, by its uid
            helper = os.fork()
            if helper == 0:
                try:
                    os.setuid(UID_BASE + request["pid"])  # never kill(-1) as root: if this fails, nothing is sent
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(helper, 0)
        if request["op"] == "end" and not request["score"]:
            shutil.rmtree(os.path.join(outputs, request["name"]), ignore_errors=True)
            _send(conn, {})
            continue
        sock = recv_handle(conn)
        pid = os.fork()
        if pid == 0:
            main = _episode_main if request["op"] == "episode" else _score_main
            try:
                main(sock, root, request)
            finally:
                os._exit(0)
        os.close(sock)
        children.add(pid)
        _send(conn, {"pid": pid})
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _episode_main(fd: int, root: str, request: dict) -> None:
    """In a fresh fork of the zygote: confine this process, open the task's world, serve the episode."""
    conn = Connection(fd)
    try:
        os.setsid()  # no signals from the trainer's terminal
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):  # nothing written to the trainer's terminal or logs
            os.dup2(null, std)
        os.closerange(3, fd)  # inherited files (the zygote's socket, ...) the agent must not reach
        os.closerange(fd + 1, 1 << 16)
        isolation = _confine(root, request["task_id"], request["name"])
        if isolation is None:
            return  # the parent of the agent's process, which has now ended
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the file size limit, a write fails instead
        from appworld import AppWorld
        world = AppWorld(task_id=request["task_id"], experiment_name=request["name"], load_ground_truth=False,
                         timeout_seconds=request["exec_timeout"])
        world.save_logs = lambda: None  # nobody reads AppWorld's logs, and their writer fails on some outputs
        task = world.task
        _send(conn, {"instruction": task.instruction, "datetime": str(task.datetime), "isolation": isolation,
                     "supervisor": {k: task.supervisor[k] for k in ("first_name", "last_name", "email", "phone_number")}})
    except BaseException as error:
        _send(conn, {"error": f"{type(error).__name__}: {error}"})
        return
    limit = request["max_raw_chars"]
    while True:
        try:
            code = _recv(conn)["code"]
        except (EOFError, OSError):
            return
        try:
            output = run_cell(world, code)
        except BaseException as error:  # in AppWorld's own work after a cell that broke the world
            output = f"Execution failed. Traceback:\n{type(error).__name__}: {error}"
        output = output.encode("utf-8", "replace").decode()  # no lone surrogates
        try:
            completed = world.task_completed()
        except BaseException:
            completed = False
        _send(conn, {"output": output[:limit], "hidden": max(0, len(output) - limit), "completed": completed})


def _closed_folders(paths: list[str]) -> dict:
    """{folder: the entries in it on the way to `paths`}, for each folder on the way that users other
    than its owner cannot enter (e.g. a home folder holding Python or the data)."""
    closed = {}
    for path in {os.path.realpath(p) for p in paths if os.path.exists(p)}:
        parts = path.strip("/").split("/")
        for depth in range(len(parts)):
            folder = "/" + "/".join(parts[:depth])
            if not os.stat(folder).st_mode & 0o001:
                closed.setdefault(folder, set()).add(parts[depth])
    return closed


def _confine(root: str, task_id: str, name: str) -> list[str] | None:
    """Take from this process what agent code must not have, as far as the platform allows; returns
    what was taken (see ISOLATION and the README's "Isolation"). Forks once: the parent only waits
    for the confined child and gets None back."""
    import ctypes
    import resource
    libc = ctypes.CDLL(None, use_errno=True)
    MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 0x4000, 0x40000
    NEWNS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000

    def call(function, *args):
        if function(*args) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))

    def prctl(option, value):
        if hasattr(libc, "prctl"):  # Linux only
            call(libc.prctl, option, value, 0, 0, 0)

    def mount(source, target, kind=None, flags=0, options=None):
        call(libc.mount, source.encode(), target.encode(), kind and kind.encode(), flags, options and options.encode())

    def set_read_only(path, read_only, recursive):  # mount_setattr(2), system call 442 on every architecture
        attr = (ctypes.c_uint64 * 4)(int(read_only), int(not read_only), 0, 0)
        call(libc.syscall, 442, -100, path.encode(), 0x8000 if recursive else 0, attr, ctypes.sizeof(attr))

    def show_only(folder, entries):  # over `folder`, an empty one, into which `entries` are bound again
        handles = {entry: os.open(os.path.join(folder, entry), os.O_PATH) for entry in entries}
        mount("tmpfs", folder, "tmpfs", 0, "size=64k,mode=755")
        for entry, handle in handles.items():
            target = os.path.join(folder, entry)
            if os.path.isdir(f"/proc/self/fd/{handle}"):
                os.mkdir(target)
            else:
                open(target, "w").close()
            mount(f"/proc/self/fd/{handle}", target, flags=MS_BIND | MS_REC)

    prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG: dies with the zygote (and its child with it, below)
    root_user, uid, gid = os.geteuid() == 0, os.getuid(), os.getgid()
    own_uid = UID_BASE + os.getpid()  # as root: a uid nothing else has
    closed = _closed_folders([*sys.path, root]) if root_user else {}  # closed to that uid
    tasks, out = os.path.join(root, "data", "tasks"), os.path.join(root, "experiments", "outputs", name)
    os.mkdir(out, 0o700)
    if root_user:
        os.chown(out, own_uid, own_uid)
    try:  # as root, namespaces need CAP_SYS_ADMIN; otherwise, unprivileged user namespaces
        call(libc.unshare, NEWNS | NEWIPC | NEWPID | NEWNET | (0 if root_user else NEWUSER))
        if not root_user:
            for file, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{file}", "w") as handle:
                    handle.write(text)
        namespaces = True
    except (OSError, AttributeError):
        namespaces = False
    child = os.fork()  # the first process of the new PID namespace: all the agent's processes die with it
    if child:
        os.closerange(3, 1 << 16)  # the socket too: the trainer sees the episode end when the child does
        os.waitpid(child, 0)
        return None
    prctl(1, int(signal.SIGKILL))
    isolation = []
    if namespaces:
        try:
            mount("none", "/", flags=MS_REC | MS_PRIVATE)
            for folder in sorted(closed, key=len):  # outer folders first
                show_only(folder, closed[folder])
            closed = {}
            show_only(tasks, [task_id])
            if os.path.isdir(os.path.join(tasks, task_id, "ground_truth")):
                mount("tmpfs", os.path.join(tasks, task_id, "ground_truth"), "tmpfs", 0, "size=4k")
            show_only(os.path.dirname(out), [name])
            set_read_only("/", True, recursive=True)
            set_read_only(out, False, recursive=False)
            try:
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                isolation.append("own /proc")
            except OSError:
                pass  # some containers refuse a new /proc in a user namespace
            if not root_user:  # a new user namespace locks the mounts above: the agent cannot undo them
                call(libc.unshare, NEWUSER | NEWNS)
            isolation += ["read-only files", "hidden ground truth", "no network"]
        except OSError:
            pass
    if root_user and not closed:  # with Python or the data in a closed folder, the own uid could not import
        resource.setrlimit(resource.RLIMIT_NPROC, (256, 256))  # counted per uid: this one alone
        os.setgroups([])
        os.setgid(own_uid)
        os.setuid(own_uid)
        prctl(1, int(signal.SIGKILL))  # a change of uid cleared it
        isolation.append("own uid")
    for limit, value in LIMITS.items():
        resource.setrlimit(getattr(resource, limit), (value, value))
    prctl(38, 1)  # PR_SET_NO_NEW_PRIVS: no setuid programs
    os.environ.update(HOME=out, TMPDIR=out)  # where IPython, sqlite and tempfile write
    os.chdir(out)
    return isolation


def _score_main(fd: int, root: str, request: dict) -> None:
    """In a fresh fork of the zygote: score an ended episode from a checked copy of its output
    databases, then delete them. The agent's code never ran in this process or its parent."""
    signal.alarm(max(1, int(request["timeout"])))  # ends this process if scoring hangs
    outputs, task_id = os.path.join(root, "experiments", "outputs"), request["task_id"]
    checked = request["name"] + "-checked"
    try:
        _copy_outputs(os.path.join(outputs, request["name"]), task_id,
                      os.path.join(outputs, checked, "tasks", task_id, "dbs"))
        from appworld.evaluator import evaluate_task
        tracker = evaluate_task(task_id, checked, suppress_errors=True, save_report=False)
        reply = {"success": tracker.success, "pass_count": tracker.pass_count, "num_tests": tracker.num_tests,
                 "passed_labels": [p["label"] for p in tracker.passes],
                 "failed_labels": [f["label"] for f in tracker.failures],
                 "failures": [f["requirement"] for f in tracker.failures]}
    except Exception as error:  # the agent can write its output folder: broken outputs score 0
        reply = {"error": f"{type(error).__name__}: {error}"}
    for name in (request["name"], checked):
        shutil.rmtree(os.path.join(outputs, name), ignore_errors=True)
    _send(Connection(fd), reply)


def _copy_outputs(folder: str, task_id: str, target: str) -> None:
    """Copy the output databases of an episode, checking them on the way: no links, only AppWorld's
    files, only SQL statements that change a database (not ATTACH, VACUUM INTO, ..., which reach
    files). What is checked is what is scored: the copy is made from the bytes checked."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    for part in ("tasks", task_id, "dbs"):
        fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
    os.makedirs(target, 0o700)
    for entry in os.scandir(fd):
        if not (entry.is_file(follow_symlinks=False) and
                (entry.name.endswith(".jsonl") or entry.name == "model_hashes.json")):
            raise ValueError(f"unexpected {entry.name!r} among the output databases")
        with open(entry.name, "rb", opener=lambda path, flags: os.open(path, flags | os.O_NOFOLLOW, dir_fd=fd)) as file:
            data = file.read()
        if entry.name.endswith(".jsonl"):
            for line in data.splitlines():
                if line.strip() and json.loads(line)[0].split(None, 1)[0].upper() not in SQL_VERBS:
                    raise ValueError(f"{entry.name} holds a statement that is not a change: {line[:80]!r}")
        with open(os.path.join(target, entry.name), "wb") as file:
            file.write(data)


# ===================================================================================== the pool

def _start_without_main(process) -> None:
    """Start a spawned process without re-running the parent's main script in it.

    Spawn normally re-imports the main module in the child; under train.py that means torch and
    transformers in the child. Our targets live in this module, so the child never needs the main
    module: hide it while the child's start-up data is taken.
    """
    main = sys.modules["__main__"]
    saved = {name: main.__dict__[name] for name in ("__file__", "__spec__") if name in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        process.start()
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


@dataclass
class StepResult:
    observation: str  # the text for the next user message (output, truncated, plus a task reminder)
    done: bool
    reward: float = 0.0  # set when done, by the pool's reward mode
    success: bool = False
    pass_count: int = 0
    num_tests: int = 0
    info: dict = field(default_factory=dict)  # e.g. {"env_failed": True, "error": "..."}


@dataclass
class _Episode:
    task_id: str
    info: dict  # the task's specs shown to the agent: instruction, datetime, supervisor
    name: str  # AppWorld's experiment name: its output databases are under experiments/outputs/<name>
    pid: int
    conn: object
    interactions: int = 0
    completed: bool = False
    done: bool = False


class EnvPool:
    """`size` episode slots, each episode in a fresh process (see "episodes in processes" above).

    `reset`, `step` and `score` take lists of slots and run them in parallel (send every request, then
    gather). Whatever the agent's code is or does in its process is an observation; an episode whose
    process dies or misses its deadline ends with reward 0 and info["env_failed"].

    reward: "fraction" of the task's unit tests that pass (the paper's); "binary", 1 if all pass;
        "progress", the fraction among the tests a no-op episode fails (AppWorld's "no_op_fail"
        labels), so that doing nothing earns 0 instead of 1/2 or 2/3.
    prompt: "paper" (the paper's structure) or "short" (a few lines, for tiny models); see PROMPTS.
    tokenizer, max_obs_tokens: observations are cut at this many tokens of the policy's tokenizer
        (in this process), or at 4 characters per token without one.
    timeout: seconds any one request (open a world, run a cell, score) may take before the episode
        is failed and its process killed; exec_timeout: AppWorld's own limit per cell (SIGALRM in the
        episode's process, which survives it); start_timeout: seconds the first start of AppWorld
        may take (one import for the whole pool; a loaded machine slows it down), tried twice.
    """

    def __init__(self, size: int, root: str = DEFAULT_ROOT, *, max_interactions: int = 40,
                 reward: str = "fraction", prompt: str = "paper", tokenizer=None, max_obs_tokens: int = 3000,
                 timeout: float = 120.0, exec_timeout: int = 60, start_timeout: float = 600.0):
        if size < 1:
            raise ValueError("EnvPool needs at least one slot.")
        if reward not in REWARDS:
            raise ValueError(f"Unknown reward {reward!r}; expected one of {REWARDS}.")
        if prompt not in PROMPTS:
            raise ValueError(f"Unknown prompt {prompt!r}; expected one of {tuple(PROMPTS)}.")
        if not os.path.isdir(os.path.join(root, "data", "tasks")):
            raise _missing_data_error(root)
        ensure_appworld_installed()
        self.root = os.path.abspath(root)
        self.max_interactions, self.reward, self.prompt = max_interactions, reward, prompt
        self.tokenizer, self.max_obs_tokens = tokenizer, max_obs_tokens
        # AppWorld's alarm stops an ordinary infinite loop inside the episode, which goes on; only
        # code SIGALRM cannot interrupt (a long C call) needs our deadline and the kill
        self.timeout, self.exec_timeout = timeout, max(1, int(min(exec_timeout, timeout - 1)))
        self.start_timeout = start_timeout
        self.max_raw_chars = 8 * max_obs_tokens  # the episode cuts huge outputs before they cross the socket
        self.isolation = None  # what the episodes' processes are kept from (the README's "Isolation")
        self._episodes: list[_Episode | None] = [None] * size
        self._count = 0
        self._zygote = None
        self._start_zygote()

    # ------------------------------------------------------------------------- the processes
    def _start_zygote(self) -> None:
        """Start the zygote. A slow start is waited for (start_timeout) and one that dies or misses
        that deadline is tried again; an error that AppWorld reports is raised at once."""
        for attempt in range(2):
            ours, theirs = socket.socketpair()
            command = [sys.executable, "-c", f"import sys; sys.path[0] = {REPO!r}; import appworld_env; "
                                             f"appworld_env._zygote_main({theirs.fileno()}, {self.root!r})"]
            env = {k: os.environ[k] for k in ENV_KEEP if k in os.environ}
            process = subprocess.Popen(command, pass_fds=[theirs.fileno()], env=env, cwd=REPO, start_new_session=True)
            theirs.close()
            conn = Connection(ours.detach())
            try:
                reply = _recv(conn) if conn.poll(self.start_timeout) else {
                    "failed": f"it did not answer within {self.start_timeout:.0f} s (start_timeout)"}
            except (EOFError, OSError) as error:
                reply = {"failed": f"it died (exit code {process.wait()}): {error!r}"}
            if "ready" in reply:
                self._zygote = (process, conn)
                return
            process.kill()
            process.wait()
            conn.close()
            if "error" in reply or attempt:
                raise RuntimeError(f"AppWorld did not start for {self.root}: {reply.get('error') or reply['failed']}"
                                   f"{' (tried twice)' if attempt else ''}\nCheck that `python -c 'import appworld'` "
                                   "works and that the data there is complete.")

    def _zygote_request(self, message: dict, fd: int | None = None) -> dict:
        for attempt in range(2):
            process, conn = self._zygote
            try:
                _send(conn, message)
                if fd is not None:
                    send_handle(conn, fd, process.pid)
                if conn.poll(self.timeout):
                    return _recv(conn)
            except (EOFError, OSError):
                pass
            if attempt:  # the zygote died or hangs (its episodes died with it): start another
                break
            self._stop_zygote(polite=False)
            self._start_zygote()
        raise RuntimeError("AppWorld's zygote process failed twice in a row.")

    def _stop_zygote(self, polite: bool) -> None:
        process, conn = self._zygote
        try:
            if polite:
                _send(conn, {"op": "close"})  # it kills its episodes and deletes their outputs
                process.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        process.kill()
        process.wait()
        conn.close()
        self._zygote = None
        outputs = os.path.join(self.root, "experiments", "outputs")
        for name in os.listdir(outputs) if os.path.isdir(outputs) else []:  # what it left, if it could not clean up
            if name.startswith(f"envpool-{process.pid}-"):
                shutil.rmtree(os.path.join(outputs, name), ignore_errors=True)

    def _exchange(self, conns: dict, messages: dict, timeout: float) -> dict:
        """Send each slot's message (if any) on its socket, then gather one reply per slot until the
        deadline. Returns {slot: reply dict, or a string saying why there is none}."""
        replies, pending = {}, {}
        for slot, conn in conns.items():
            try:
                if slot in messages:
                    _send(conn, messages[slot])
                pending[conn] = slot
            except OSError as error:
                replies[slot] = f"its process died ({error!r})"
        deadline = time.monotonic() + timeout
        while pending:
            ready = wait(list(pending), max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for conn in ready:
                slot = pending.pop(conn)
                try:
                    reply = _recv(conn, 12 * self.max_raw_chars + (1 << 16))
                    replies[slot] = reply if isinstance(reply, dict) else "its process sent a malformed reply"
                except (EOFError, OSError, ValueError) as error:
                    replies[slot] = f"its process died ({error!r})"
        for slot in pending.values():
            replies[slot] = f"its process did not answer within {timeout:.0f} s; it was killed"
        return replies

    def _end(self, slots: list[int], score: bool) -> dict:
        """End the slots' episodes (their processes are killed); if `score`, score each as it stands.
        Returns {slot: evaluation dict, or a string saying why there is none}."""
        conns, replies = {}, {}
        for slot in slots:
            episode = self._episodes[slot]
            episode.done = True
            scoring = score and not episode.conn.poll(0)  # readable now: its process died (or says what it was not asked)
            if score and not scoring:
                replies[slot] = "its process died before the episode ended"
            episode.conn.close()
            ours, theirs = socket.socketpair() if scoring else (None, None)
            isolation = self.isolation or ()
            sweep = "own uid" in isolation and "read-only files" not in isolation
            reply = self._zygote_request({"op": "end", "pid": episode.pid, "name": episode.name, "score": scoring,
                                          "task_id": episode.task_id, "timeout": self.timeout, "sweep": sweep},
                                         theirs and theirs.fileno())
            if scoring:
                theirs.close()
                conns[slot] = Connection(ours.detach())
                episode.pid = reply["pid"]  # the scorer's, to kill if it misses the deadline
        replies.update(self._exchange(conns, {}, self.timeout + 5))
        for slot, conn in conns.items():
            conn.close()
            if not isinstance(replies[slot], dict):
                self._zygote_request({"op": "end", "pid": self._episodes[slot].pid, "score": False,
                                      "name": self._episodes[slot].name})
        return replies

    def _open(self, tasks: dict) -> dict:
        """Start a fresh episode process for each {slot: task_id}; returns {slot: its first reply or why not}."""
        for slot, task_id in tasks.items():
            ours, theirs = socket.socketpair()
            self._count += 1
            name = f"envpool-{self._zygote[0].pid}-{self._count}"
            reply = self._zygote_request({"op": "episode", "task_id": task_id, "name": name,
                                          "exec_timeout": self.exec_timeout, "max_raw_chars": self.max_raw_chars},
                                         theirs.fileno())
            theirs.close()
            self._episodes[slot] = _Episode(task_id, {}, name, reply["pid"], Connection(ours.detach()))
        replies = self._exchange({s: self._episodes[s].conn for s in tasks}, {}, self.timeout)
        for slot, reply in replies.items():
            if not isinstance(reply, dict) or "error" in reply:
                self._end([slot], score=False)
        return replies

    def worker_pid(self, slot: int) -> int | None:
        """The pid of the process running the slot's episode (for tests that kill it)."""
        episode = self._episodes[slot]
        return None if episode is None or episode.done else episode.pid

    def __len__(self) -> int:
        return len(self._episodes)

    # ---------------------------------------------------------------------------- the episodes
    def reset(self, slots: list[int], task_ids: list[str]) -> list[list[dict]]:
        """Start a task's episode in each slot (ending any still running there); returns each slot's
        opening chat messages."""
        if len(slots) != len(task_ids) or len(set(slots)) != len(slots):
            raise ValueError("reset needs distinct slots and one task id per slot.")
        for slot, task_id in zip(slots, task_ids):
            self._check_slot(slot)
            _check_task_id(self.root, task_id)
        running = [s for s in slots if self._episodes[s] is not None and not self._episodes[s].done]
        self._end(running, score=False)
        replies = self._open(dict(zip(slots, task_ids)))
        failed = {s: t for s, t in zip(slots, task_ids) if not isinstance(replies[s], dict) or "error" in replies[s]}
        if failed:  # once more, in fresh processes, before giving up
            replies.update(self._open(failed))
        messages = []
        for slot, task_id in zip(slots, task_ids):
            reply = replies[slot]
            if not isinstance(reply, dict) or "error" in reply:
                raise RuntimeError(f"Could not open task {task_id} in slot {slot}: "
                                   f"{reply['error'] if isinstance(reply, dict) else reply}")
            if self.isolation is None:
                self.isolation = reply["isolation"]
                missing = sorted(set(ISOLATION) - set(self.isolation))
                if missing:
                    print(f"EnvPool: agent code runs without: {', '.join(missing)} (this platform does not "
                          "allow them; see the README's Isolation section)", file=sys.stderr)
            episode = self._episodes[slot]
            episode.info = {k: reply[k] for k in ("instruction", "datetime", "supervisor")}
            messages.append(opening_messages(episode.info, self.prompt))
        return messages

    def step(self, slots: list[int], texts: list[str]) -> list[StepResult]:
        """Run each slot's agent message in its world; all slots in parallel. An episode ends when
        the agent calls complete_task or at the interaction limit, and is then scored."""
        if len(slots) != len(texts) or len(set(slots)) != len(slots):
            raise ValueError("step needs distinct slots and one message per slot.")
        requests, replies = {}, {}
        for slot, text in zip(slots, texts):
            self._running(slot).interactions += 1
            code = extract_code(text)
            if code is None:
                replies[slot] = {"output": "No ```python block found in your message: write your code in one.",
                                 "hidden": 0, "completed": False}
            else:
                requests[slot] = {"code": code}
        replies.update(self._exchange({s: self._episodes[s].conn for s in requests}, requests, self.timeout))
        results, failed = {}, []
        for slot in slots:
            episode, reply = self._episodes[slot], replies[slot]
            try:
                output, hidden, completed = str(reply["output"]), int(reply["hidden"]), reply["completed"] is True
            except (KeyError, TypeError, ValueError):
                why = reply if isinstance(reply, str) else "its process sent a malformed reply"
                results[slot] = StepResult(f"The environment failed: {why}", done=True, info={"env_failed": True, "error": why})
                failed.append(slot)
                continue
            episode.completed = completed
            done = completed or episode.interactions >= self.max_interactions
            if done and not completed:
                output += f"\n[Interaction limit ({self.max_interactions}) reached: the task is scored as it stands.]"
            results[slot] = StepResult(self._observation(output, episode, hidden), done=done)
        self._end(failed, score=False)
        self._score({s: r for s, r in results.items() if r.done and s not in failed})
        return [results[slot] for slot in slots]

    def score(self, slots: list[int]) -> list[StepResult]:
        """End each slot's running episode and score its world as it stands (e.g. when the agent's
        context is full)."""
        if len(set(slots)) != len(slots):
            raise ValueError("score needs distinct slots.")
        results = {slot: StepResult("", done=True) for slot in slots if self._running(slot)}
        self._score(results)
        return [results[slot] for slot in slots]

    def _score(self, results: dict) -> None:
        """End the episodes of {slot: StepResult} and fill in their rewards from AppWorld's tests."""
        for slot, evaluation in self._end(list(results), score=True).items():
            result = results[slot]
            result.info["completed"] = self._episodes[slot].completed
            if isinstance(evaluation, str):  # the scorer died or hung: not the agent's doing
                result.info.update(env_failed=True, error=f"scoring failed: {evaluation}")
            elif "error" in evaluation:  # the agent's outputs could not be scored: they score 0
                result.info.update(error=f"the episode's outputs could not be scored: {evaluation['error']}")
            else:
                result.success, result.pass_count = evaluation["success"], evaluation["pass_count"]
                result.num_tests = evaluation["num_tests"]
                if self.reward == "binary":
                    result.reward = float(result.success)
                elif self.reward == "fraction":
                    result.reward = result.pass_count / max(1, result.num_tests)
                else:  # progress: only the tests a no-op episode fails count
                    passed = evaluation["passed_labels"].count("no_op_fail")
                    total = passed + evaluation["failed_labels"].count("no_op_fail")
                    result.reward = passed / total if total else float(result.success)
                result.info["failures"] = evaluation["failures"]

    def _running(self, slot: int) -> _Episode:
        self._check_slot(slot)
        episode = self._episodes[slot]
        if episode is None or episode.done:
            raise ValueError(f"Slot {slot} has no running episode: call reset first.")
        return episode

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < len(self._episodes):
            raise ValueError(f"No slot {slot}: this pool has slots 0..{len(self._episodes) - 1}.")

    def _observation(self, output: str, episode: _Episode, hidden: int = 0) -> str:
        """The output cut at max_obs_tokens (`hidden` characters were cut already), a note saying how
        much was cut, and the task reminder."""
        shown = output
        if self.tokenizer is not None:
            ids = self.tokenizer.encode(output, add_special_tokens=False)
            if len(ids) > self.max_obs_tokens:
                shown = self.tokenizer.decode(ids[: self.max_obs_tokens])
        elif len(output) > 4 * self.max_obs_tokens:  # about 4 characters per token
            shown = output[: 4 * self.max_obs_tokens]
        if hidden or shown is not output:
            shown += f"\n[... output truncated: {len(output) + hidden - len(shown)} more characters not shown]"
        return f"{shown.rstrip()}\n\n{reminder(episode.info, self.prompt)}"

    def close(self) -> None:
        for episode in self._episodes:
            if episode is not None:
                episode.conn.close()
        if self._zygote is not None:
            self._stop_zygote(polite=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()



# ============================================================================ the mini-world build

def ensure_appworld_installed() -> None:
    """Run `appworld install` if it has not run: it decrypts the apps' code shipped in the wheel
    (offline, ~3 s). In a subprocess, so that this process never imports appworld."""
    import importlib.util
    import subprocess
    package = os.path.dirname(importlib.util.find_spec("appworld").origin)
    if not os.path.isdir(os.path.join(package, "apps", "spotify")):
        subprocess.run([sys.executable, "-c", "from appworld.install import install_package; install_package()"],
                       check=True)


def _fingerprint() -> str:
    """Cache key of the built world: our task definitions, the builder version, appworld's version."""
    digest = hashlib.sha256(f"build {BUILD_VERSION}".encode())
    folder = os.path.join(REPO, "mini_world")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as file:
                digest.update(name.encode() + file.read())
    from importlib.metadata import version
    digest.update(version("appworld").encode())
    return digest.hexdigest()[:16]


def setup_mini_world(root: str = DEFAULT_ROOT, force: bool = False) -> None:
    """Build the offline mini-world under `<root>/data`, unless it is already built (idempotent).

    Runs in a spawned child process: building uses AppWorld, which freezes its process's clock.
    Refuses to touch a root that holds other data (e.g. the real AppWorld download).
    """
    import fcntl
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    ensure_appworld_installed()
    stamp = os.path.join(root, "data", "mini_world.json")
    fingerprint = _fingerprint()
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
        process = mp.get_context("spawn").Process(target=_build_world_and_exit, args=(staging, fingerprint))
        _start_without_main(process)
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"Building the mini-world failed (exit code {process.exitcode}); see above.")
        shutil.rmtree(os.path.join(root, "data"), ignore_errors=True)
        os.replace(os.path.join(staging, "data"), os.path.join(root, "data"))
        shutil.rmtree(staging, ignore_errors=True)


def _build_world_and_exit(root: str, fingerprint: str) -> None:
    # os._exit: the normal interpreter shutdown of a process that built all these in-memory
    # databases takes longer than the build itself (~40 s measured)
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
    from mini_world.scenarios import SCENARIOS

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
            fields = _template_fields(variant)
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


def show_episode(task_id: str, root: str = DEFAULT_ROOT, prompt: str = "paper") -> None:
    """Print a whole episode of a mini-world task played by its scripted solution: what the agent
    sees, what it writes, and how AppWorld scores it."""
    with EnvPool(1, root, prompt=prompt) as pool:
        for message in pool.reset([0], [task_id])[0]:
            print(f"----- {message['role']}\n{message['content']}")
        for turn in solution(task_id, root):
            result = pool.step([0], [turn])[0]
            print(f"----- assistant\n{turn}\n----- user (observation)\n{result.observation}")
            if result.done:
                print(f"----- done: reward {result.reward}, success {result.success}, "
                      f"{result.pass_count}/{result.num_tests} tests passed")
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    setup = commands.add_parser("setup", help="build the offline mini-world")
    setup.add_argument("--force", action="store_true", help="rebuild even if already built")
    show = commands.add_parser("show", help="print an episode of a task played by its scripted solution")
    show.add_argument("task_id")
    show.add_argument("--prompt", default="paper", choices=tuple(PROMPTS))
    for command in (setup, show):
        command.add_argument("--root", default=DEFAULT_ROOT, help="AppWorld root (its data is in ROOT/data)")
    args = parser.parse_args()
    if args.command == "setup":
        setup_mini_world(args.root, force=args.force)
        print(f"mini-world ready in {os.path.join(os.path.abspath(args.root), 'data')}")
    else:
        show_episode(args.task_id, args.root, args.prompt)


if __name__ == "__main__":
    # Run as the module `appworld_env`, not as `__main__`: spawned children start without the main
    # module (see _start_without_main) and must find the functions they run by their module's name.
    import appworld_env
    appworld_env.main()
