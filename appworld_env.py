"""AppWorld as a multi-turn environment for LOOP: task lists and scores, the prompt, and EnvPool,
which runs every episode in a fresh confined process.

    python appworld_env.py setup [--root DIR] [--force]     # build the offline mini-world (mini_world/)
    python appworld_env.py show likesong_1 [--prompt short]  # print an episode of a scripted solution
    python appworld_env.py bench [--slots 4] [--rounds 3]    # time the pool's start, reset, step, score

The real AppWorld engine (never a mock) runs either the mini-world (default: 48 tasks of our own, built
under <repo>/appworld_root) or the real AppWorld data (`appworld download data --root DIR`, then
APPWORLD_ROOT=DIR). An episode: `reset` gives the opening chat messages; each `step` runs the ```python
blocks of the agent's message and returns what they printed (cut) plus a task reminder. It ends when the
agent calls `apis.supervisor.complete_task(...)`, at the interaction limit, or when the trainer calls
`score` (its context is full); AppWorld's own unit tests for the task give the reward.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
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


# ============================================================================ task lists, metrics

def _missing_data_error(root: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"No AppWorld data under {os.path.join(root, 'data')}. Build the offline mini-world with "
        f"`python appworld_env.py setup --root {root}` (or appworld_env.setup_mini_world()), or, with "
        f"internet access, run `appworld download data --root DIR` and set APPWORLD_ROOT=DIR.")


def load_task_ids(split: str, root: str = DEFAULT_ROOT, difficulties=None) -> list[str]:
    """Task ids of a split, from `<root>/data/datasets/<split>.txt` (AppWorld's layout); with
    `difficulties`, e.g. (1, 2) for the paper's training subset, only the tasks of those."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
    if not os.path.isdir(os.path.join(root, "data", "tasks")):
        raise _missing_data_error(root)
    path = os.path.join(root, "data", "datasets", split + ".txt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No split file {path}. The mini-world has only train, dev and "
                                f"test_normal (= dev); the real AppWorld data has all of {SPLITS}.")
    with open(path) as file:
        task_ids = [line.strip() for line in file if line.strip()]
    if difficulties is None:
        return task_ids

    def difficulty(task_id):
        with open(os.path.join(root, "data", "tasks", task_id, "ground_truth", "metadata.json")) as file:
            return json.load(file)["difficulty"]
    return [t for t in task_ids if difficulty(t) in set(difficulties)]


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


# The mini-world's (mini_world/), imported when called because mini_world imports this module.
def setup_mini_world(root: str = DEFAULT_ROOT, force: bool = False) -> None:
    from mini_world.build import setup_mini_world
    setup_mini_world(root, force)


def is_mini_world(root: str = DEFAULT_ROOT) -> bool:
    from mini_world.build import is_mini_world
    return is_mini_world(root)


def solution(task_id: str, root: str = DEFAULT_ROOT) -> list[str]:
    from mini_world.scenarios import solution
    return solution(task_id)


# ==================================================================================== the prompt

SYSTEM_PROMPT = ("You are an autonomous agent. You complete a person's task by writing Python code "
                 "that calls the APIs of their apps, one small step at a time.")

# --prompt paper: the structure of the paper's prompt (App. D), in our own words: ReAct instructions, one worked
# demonstration as real assistant / user turns, then the task block, appended again after every observation. It
# gives no hint the paper's prompt does not (how to log in, page sizes): finding those out is part of each task.
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


# ========================================================================= agent code and guard

CODE_BLOCK = re.compile(r"```(?:python3?|py)\b[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
MAX_CODE_CHARS = 20_000  # longer cells are refused: AppWorld's own parse of them is slow


def extract_code(text: str) -> str | None:
    """All ```python blocks of a message, joined (as the paper does); an unclosed last block counts
    (the model may have hit its token limit). None when the message has no code."""
    blocks = [b.strip() for b in CODE_BLOCK.findall(text) if b.strip()]
    return "\n\n".join(blocks) if blocks else None


# A friendly first answer, in AppWorld's words, to code that reaches for the files or the interpreter's insides: a
# text check, easy to get around. What keeps the ground truth and the trainer out of reach is the episode's process.
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
    if len(code) > MAX_CODE_CHARS:
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
        world.environment_io.clear()  # AppWorld keeps every cell and output for logs we do not write


# ======================================================================== episodes in processes
# AppWorld freezes its process's clock (freezegun), times cells out with SIGALRM (main thread only), allows
# one open world per process and runs the agent's code in that process: so the trainer never imports it. A
# pool starts one trusted "zygote" process, which imports AppWorld and opens a world once so that later ones
# open fast; it never runs agent code nor loads a ground truth. Every episode is a fresh fork of it, confined
# (_confine), its world opened without the ground truth; every score is another fresh fork, which checks and
# scores the output databases once the episode's processes are gone. Each process talks to the pool on a
# socket of its own, in JSON (never pickle: it would run code the agent sent).

ENV_KEEP = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "LANG", "LC_ALL", "TZ")  # all the zygote gets of ours
UID_BASE = 1 << 30  # as root, an episode runs as uid UID_BASE + its pid, which nothing else has
LIMITS = {"RLIMIT_FSIZE": 64 << 20, "RLIMIT_AS": 4 << 30, "RLIMIT_CORE": 0}  # and NPROC, with a uid of its own
SQL_VERBS = {"INSERT", "UPDATE", "DELETE", "CREATE", "DROP"}  # the statements AppWorld's change logs hold
ISOLATION = ("own uid", "read-only files", "hidden ground truth", "no network", "own /proc")  # see _confine


def _send(conn, message) -> None:
    conn.send_bytes(json.dumps(message).encode())


def _recv(conn, limit: int = 1 << 26):
    return json.loads(conn.recv_bytes(limit))


def _failed(reply) -> bool:
    """A reply that says why there is none, or an error."""
    return not isinstance(reply, dict) or "error" in reply


def _remove_outputs(root: str, prefix: str) -> None:
    """Delete the output folders of a zygote's episodes (their names start with its prefix)."""
    outputs = os.path.join(root, "experiments", "outputs")
    for name in os.listdir(outputs) if os.path.isdir(outputs) else []:
        if name.startswith(prefix):
            shutil.rmtree(os.path.join(outputs, name), ignore_errors=True)


def _zygote_main(fd: int, root: str) -> None:
    """The pool's trusted process: warm AppWorld up, answer {"ready"} (or {"error"}), serve, clean up."""
    import gc
    outputs, prefix = os.path.join(root, "experiments", "outputs"), f"envpool-{os.getpid()}-"
    os.environ.update(APPWORLD_ROOT=root, HOME=os.path.join(outputs, prefix + "home"))  # for AppWorld, IPython
    conn, env = Connection(fd), dict(os.environ)
    try:
        if os.geteuid() == 0:  # episodes run as other uids: they cannot enter these folders
            for task in os.scandir(os.path.join(root, "data", "tasks")):
                if os.path.isdir(os.path.join(task.path, "ground_truth")):
                    os.chmod(os.path.join(task.path, "ground_truth"), 0o700)
        os.makedirs(os.environ["HOME"], exist_ok=True)
        import pytest  # noqa: F401  AppWorld's evaluation imports it: once here, not in every scorer
        from appworld import AppWorld
        from appworld.apps import model_lib
        world = AppWorld(task_id=sorted(os.listdir(os.path.join(root, "data", "tasks")))[0],
                         experiment_name=prefix + "warmup", load_ground_truth=False)
        world.execute("apis.supervisor.show_profile()")  # a first API call has one-time costs too
        world.close()
        AppWorld.close_all()
        model_lib.get_cached_db_engine.cache_clear()  # base databases left open read-write: not for episodes
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
    _remove_outputs(root, prefix)


def _zygote_serve(conn, root: str) -> None:
    """Requests, one at a time; those with a socket get a fresh fork, which serves it:
    {"op": "episode", "task_id", "name", ...} + socket -> {"pid"}: an episode;
    {"op": "end", "pid", "name", "sweep", "score", ...} -> kill the episode's process, then either
        {"pid"} of a scorer (+ socket, if "score") or {} once its outputs are deleted; {"op": "close"}."""
    import ctypes
    if hasattr(ctypes.CDLL(None), "prctl"):  # PR_SET_CHILD_SUBREAPER: the agent's orphans are ours to reap
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
    children = set()
    while True:
        try:
            request = _recv(conn)
        except (EOFError, OSError):
            break
        try:  # reap what ended: our children and orphans of theirs
            while pid := os.waitpid(-1, os.WNOHANG)[0]:
                children.discard(pid)
        except ChildProcessError:
            pass
        if request["op"] == "close":
            break
        if request["op"] == "end":
            if request["pid"] in children:
                os.kill(request["pid"], signal.SIGKILL)  # its PID namespace (if any) dies with it
                os.waitpid(request["pid"], 0)
                children.discard(request["pid"])
            if request.get("sweep"):  # no PID namespace: kill what runs as the episode's uid
                if not (helper := os.fork()):
                    try:
                        os.setuid(UID_BASE + request["pid"])  # never kill(-1) as root: if this fails, nothing is sent
                        os.kill(-1, signal.SIGKILL)
                    finally:
                        os._exit(0)
                os.waitpid(helper, 0)
            if not request["score"]:
                shutil.rmtree(os.path.join(root, "experiments", "outputs", request["name"]), ignore_errors=True)
                _send(conn, {})
                continue
        sock = recv_handle(conn)
        if not (pid := os.fork()):
            try:
                (_episode_main if request["op"] == "episode" else _score_main)(sock, root, request)
            finally:
                os._exit(0)
        os.close(sock)
        children.add(pid)
        _send(conn, {"pid": pid})
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _episode_main(fd: int, root: str, request: dict) -> None:
    """In a fresh fork of the zygote: confine this process, open the task's world, run the agent's cells."""
    conn = Connection(fd)
    try:
        os.setsid()  # no signals from the trainer's terminal
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):  # nothing written to the trainer's terminal or logs
            os.dup2(null, std)
        os.closerange(3, fd)  # no inherited file (the zygote's socket, ...) left for the agent
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


def _confine(root: str, task_id: str, name: str) -> list[str] | None:
    """Take from this process what agent code must not have, as far as the platform allows; returns what was
    taken (see ISOLATION). Forks once: the parent only waits for the confined child, and gets None."""
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

    def show_only(folder, entries):  # an empty tmpfs over `folder`, into which `entries` are bound again
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
    closed = {}  # as root: {folder that own_uid could not enter: its entries on the way to Python or the data}
    for path in {os.path.realpath(p) for p in [*sys.path, root] if root_user and os.path.exists(p)}:
        parts = path.strip("/").split("/")
        for depth in range(len(parts)):
            if not os.stat("/" + "/".join(parts[:depth])).st_mode & 0o001:
                closed.setdefault("/" + "/".join(parts[:depth]), set()).add(parts[depth])
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
    if child := os.fork():  # the first process of the new PID namespace: the agent's processes die with it
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
    databases, then delete them. No agent code ever ran in this process or its parent."""
    signal.alarm(max(1, int(request["timeout"])))  # ends this process if scoring hangs
    outputs, task_id, checked = os.path.join(root, "experiments", "outputs"), request["task_id"], request["name"] + "-checked"
    try:
        _copy_outputs(os.path.join(outputs, request["name"]), task_id, os.path.join(outputs, checked, "tasks", task_id, "dbs"))
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
    """Copy an episode's output databases, checking them on the way (what is scored is the bytes checked): no
    links, only AppWorld's files, only SQL statements that change a database (not ATTACH, ..., which reach files)."""
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
        for line in data.splitlines() if entry.name.endswith(".jsonl") else []:
            if line.strip() and json.loads(line)[0].split(None, 1)[0].upper() not in SQL_VERBS:
                raise ValueError(f"{entry.name} holds a statement that is not a change: {line[:80]!r}")
        with open(os.path.join(target, entry.name), "wb") as file:
            file.write(data)


# ===================================================================================== the pool

@dataclass
class StepResult:
    observation: str  # the next user message: what the code printed (cut), then the task reminder
    done: bool
    reward: float = 0.0  # once done, in the pool's reward mode
    success: bool = False
    pass_count: int = 0
    num_tests: int = 0
    info: dict = field(default_factory=dict)  # e.g. {"env_failed": True, "error": "..."}


@dataclass
class _Episode:
    task_id: str
    name: str  # AppWorld's experiment name: the outputs are in experiments/outputs/<name>
    pid: int  # of its process; once it is scored, of its scorer
    conn: Connection  # to that process
    info: dict = field(default_factory=dict)  # the task's specs shown to the agent
    interactions: int = 0
    completed: bool = False
    done: bool = False


class EnvPool:
    """`size` episode slots, each episode in a fresh process of its own; `reset`, `step` and `score` serve
    lists of slots in parallel. Whatever the agent's code is or does is an observation; an episode whose
    process dies or misses its deadline ends with reward 0 and info["env_failed"].

    reward: "fraction" of the task's unit tests that pass (the paper's); "binary", 1 if all pass;
        "progress", the fraction among the tests a no-op episode fails (AppWorld's "no_op_fail"
        labels), so that doing nothing earns 0 instead of 1/2 or 2/3.
    prompt: see PROMPTS. tokenizer, max_obs_tokens: observations are cut at this many tokens of the
        policy's tokenizer, or at 4 characters per token without one.
    timeout: seconds one request (open a world, run a cell, score) may take before the episode fails
        and its process is killed; exec_timeout: AppWorld's own limit per cell (SIGALRM, which the
        episode survives); start_timeout: seconds the pool's one start of AppWorld may take (tried twice).
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
        self.timeout, self.start_timeout = timeout, start_timeout
        self.exec_timeout = max(1, int(min(exec_timeout, timeout - 1)))  # AppWorld's alarm first: the episode goes on
        self.max_raw_chars = 8 * max_obs_tokens  # huge outputs are cut in the episode, before the socket
        self.isolation = None  # what the episodes' processes are kept from: known at the first reset
        self._episodes: list[_Episode | None] = [None] * size
        self._count, self._zygote = 0, None
        self._start_zygote()

    def __len__(self) -> int:
        return len(self._episodes)

    def worker_pid(self, slot: int) -> int | None:
        """The pid of the process running the slot's episode (for tests that kill it)."""
        episode = self._episodes[slot]
        return None if episode is None or episode.done else episode.pid

    # ---------------------------------------------------------------------------- the episodes
    def reset(self, slots: list[int], task_ids: list[str]) -> list[list[dict]]:
        """Start a task's episode in each slot (ending any still running there); returns the opening messages."""
        self._check(slots, task_ids)
        for task_id in task_ids:
            _check_task_id(self.root, task_id)
        for slot in slots:
            if self._episodes[slot] is not None and not self._episodes[slot].done:
                self._end(slot)
        replies = self._open(dict(zip(slots, task_ids)))
        replies.update(self._open({s: t for s, t in zip(slots, task_ids) if _failed(replies[s])}))  # once more
        messages = []
        for slot, task_id in zip(slots, task_ids):
            reply = replies[slot]
            if _failed(reply):
                raise RuntimeError(f"Could not open task {task_id} in slot {slot}: "
                                   f"{reply['error'] if isinstance(reply, dict) else reply}")
            if self.isolation is None:
                self.isolation = reply["isolation"]
                if missing := sorted(set(ISOLATION) - set(self.isolation)):
                    print(f"EnvPool: agent code runs without: {', '.join(missing)} (this platform does not "
                          "allow them; see the README's Isolation section)", file=sys.stderr)
            episode = self._episodes[slot]
            episode.info = {k: reply[k] for k in ("instruction", "datetime", "supervisor")}
            messages.append(opening_messages(episode.info, self.prompt))
        return messages

    def step(self, slots: list[int], texts: list[str]) -> list[StepResult]:
        """Run each slot's agent message in its world; at complete_task or the interaction limit, its episode
        ends and is scored."""
        self._check(slots, texts, running=True)
        requests, replies = {}, {}
        for slot, text in zip(slots, texts):
            self._episodes[slot].interactions += 1
            code = extract_code(text)
            if code is None:
                replies[slot] = {"output": "No ```python block found in your message: write your code in one.",
                                 "hidden": 0, "completed": False}
            else:
                requests[slot] = {"code": code}
        replies.update(self._exchange(requests, self.timeout))
        results = {}
        for slot in slots:
            episode, reply = self._episodes[slot], replies[slot]
            try:
                output, hidden, completed = str(reply["output"]), int(reply["hidden"]), reply["completed"] is True
            except (KeyError, TypeError, ValueError):
                why = reply if isinstance(reply, str) else "its process sent a malformed reply"
                results[slot] = StepResult(f"The environment failed: {why}", True, info={"env_failed": True, "error": why})
                if not episode.done:  # a reply that is a dict but not a step's
                    self._end(slot)
                continue
            episode.completed = completed
            done = completed or episode.interactions >= self.max_interactions
            if done and not completed:
                output += f"\n[Interaction limit ({self.max_interactions}) reached: the task is scored as it stands.]"
            results[slot] = StepResult(self._observation(output, hidden, episode.info), done)
        self._score({s: r for s, r in results.items() if r.done and not r.info.get("env_failed")})
        return [results[slot] for slot in slots]

    def score(self, slots: list[int]) -> list[StepResult]:
        """End each slot's running episode and score its world as it stands (e.g. the agent's context is full)."""
        self._check(slots, running=True)
        results = {slot: StepResult("", True) for slot in slots}
        self._score(results)
        return [results[slot] for slot in slots]

    def _score(self, results: dict) -> None:
        """End the episodes of {slot: StepResult}, each scored by a fresh process, and fill in the rewards."""
        for slot, result in results.items():
            episode = self._episodes[slot]
            result.info["completed"] = episode.completed
            if episode.conn.poll(0):  # readable now: its process died (or says what it was not asked)
                result.info.update(env_failed=True, error="scoring failed: its process died before the episode ended")
                self._end(slot)
            else:  # the scorer, killed if it hangs
                episode.conn, episode.pid = self._end(slot, score=True)
        scored = [slot for slot, result in results.items() if not result.info.get("env_failed")]
        for slot, evaluation in self._exchange(dict.fromkeys(scored), self.timeout + 5).items():
            self._episodes[slot].conn.close()
            result = results[slot]
            if isinstance(evaluation, str):  # the scorer died or hung: not the agent's doing
                result.info.update(env_failed=True, error=f"scoring failed: {evaluation}")
            elif "error" in evaluation:  # the agent's outputs could not be scored: they score 0
                result.info.update(error=f"the episode's outputs could not be scored: {evaluation['error']}")
            else:
                result.success, result.pass_count = evaluation["success"], evaluation["pass_count"]
                result.num_tests, result.info["failures"] = evaluation["num_tests"], evaluation["failures"]
                if self.reward == "binary":
                    result.reward = float(result.success)
                elif self.reward == "fraction":
                    result.reward = result.pass_count / max(1, result.num_tests)
                else:  # progress: only the tests a no-op episode fails count
                    passed = evaluation["passed_labels"].count("no_op_fail")
                    total = passed + evaluation["failed_labels"].count("no_op_fail")
                    result.reward = passed / total if total else float(result.success)

    def _check(self, slots: list[int], per_slot: list | None = None, running: bool = False) -> None:
        if len(set(slots)) != len(slots) or (per_slot is not None and len(per_slot) != len(slots)):
            raise ValueError("EnvPool needs distinct slots, and one task id or message per slot.")
        for slot in slots:
            if not 0 <= slot < len(self._episodes):
                raise ValueError(f"No slot {slot}: this pool has slots 0..{len(self._episodes) - 1}.")
            if running and (self._episodes[slot] is None or self._episodes[slot].done):
                raise ValueError(f"Slot {slot} has no running episode: call reset first.")

    def _observation(self, output: str, hidden: int, info: dict) -> str:
        """The output cut at max_obs_tokens (`hidden` characters were cut already), a note of it, the reminder."""
        shown = output
        if self.tokenizer is not None:
            ids = self.tokenizer.encode(output, add_special_tokens=False)
            if len(ids) > self.max_obs_tokens:
                shown = self.tokenizer.decode(ids[: self.max_obs_tokens])
        elif len(output) > 4 * self.max_obs_tokens:  # about 4 characters per token
            shown = output[: 4 * self.max_obs_tokens]
        if hidden or shown is not output:
            shown += f"\n[... output truncated: {len(output) + hidden - len(shown)} more characters not shown]"
        return f"{shown.rstrip()}\n\n{reminder(info, self.prompt)}"

    # ------------------------------------------------------------------------- the processes
    def _start_zygote(self) -> None:
        """Start the zygote in a minimal environment; one that dies or misses start_timeout is tried once more."""
        for attempt in range(2):
            ours, theirs = socket.socketpair()
            command = [sys.executable, "-c", f"import sys; sys.path[0] = {REPO!r}; import appworld_env; "
                                             f"appworld_env._zygote_main({theirs.fileno()}, {self.root!r})"]
            process = subprocess.Popen(command, pass_fds=[theirs.fileno()], cwd=REPO, start_new_session=True,
                                       env={k: os.environ[k] for k in ENV_KEEP if k in os.environ})
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
        _remove_outputs(self.root, f"envpool-{process.pid}-")  # what it left, if it could not clean up

    def _ask_zygote(self, message: dict, fork: bool = False):
        """Send the zygote a request; with `fork`, also a socket for the process it forks: returns (our end, its pid).
        A zygote that died or hangs is replaced (its episodes died with it) and asked again, once."""
        ours, theirs = socket.socketpair() if fork else (None, None)
        try:
            for attempt in range(2):
                process, conn = self._zygote
                try:
                    _send(conn, message)
                    if fork:
                        send_handle(conn, theirs.fileno(), process.pid)
                    if conn.poll(self.timeout):
                        reply = _recv(conn)
                        return (Connection(ours.detach()), reply["pid"]) if fork else reply
                except (EOFError, OSError):
                    pass
                if attempt:
                    raise RuntimeError("AppWorld's zygote process failed twice in a row.")
                self._stop_zygote(polite=False)
                self._start_zygote()
        finally:
            if fork:
                theirs.close()

    def _open(self, tasks: dict) -> dict:
        """A fresh episode process for each {slot: task_id}; returns {slot: its first reply, or why none}."""
        for slot, task_id in tasks.items():
            self._count += 1
            name = f"envpool-{self._zygote[0].pid}-{self._count}"
            conn, pid = self._ask_zygote({"op": "episode", "task_id": task_id, "name": name, "exec_timeout":
                                          self.exec_timeout, "max_raw_chars": self.max_raw_chars}, fork=True)
            self._episodes[slot] = _Episode(task_id, name, pid, conn)
        return self._exchange(dict.fromkeys(tasks), self.timeout)

    def _end(self, slot: int, score: bool = False):
        """End the slot's episode (or its scoring): kill its process, then delete its outputs, or with
        `score` have a fresh process score them, and return (a socket to it, its pid)."""
        episode = self._episodes[slot]
        episode.done = True
        episode.conn.close()
        isolation = self.isolation or ()
        sweep = "own uid" in isolation and "read-only files" not in isolation  # no PID namespace to die with
        return self._ask_zygote({"op": "end", "pid": episode.pid, "name": episode.name, "task_id": episode.task_id,
                                 "sweep": sweep, "score": score, "timeout": self.timeout}, fork=score)

    def _exchange(self, messages: dict, timeout: float) -> dict:
        """Send {slot: message (or None)} to the slots' processes and gather their replies until the deadline:
        {slot: the reply, or a string saying why there is none}. A process that sent none, or an error, is killed."""
        replies, pending = {}, {}
        for slot, message in messages.items():
            conn = self._episodes[slot].conn
            try:
                if message is not None:
                    _send(conn, message)
                pending[conn] = slot
            except OSError as error:
                replies[slot] = f"its process died ({error!r})"
        deadline = time.monotonic() + timeout
        while pending and (ready := wait(list(pending), max(0.0, deadline - time.monotonic()))):
            for conn in ready:
                slot = pending.pop(conn)
                try:
                    reply = _recv(conn, 12 * self.max_raw_chars + (1 << 16))
                    replies[slot] = reply if isinstance(reply, dict) else "its process sent a malformed reply"
                except (EOFError, OSError, ValueError) as error:
                    replies[slot] = f"its process died ({error!r})"
        for slot in pending.values():
            replies[slot] = f"its process did not answer within {timeout:.0f} s; it was killed"
        for slot, reply in replies.items():
            if _failed(reply):
                self._end(slot)
        return replies

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


def ensure_appworld_installed() -> None:
    """Run `appworld install` if it has not run: it decrypts the apps' code shipped in the wheel
    (offline, a few seconds). In a subprocess, so that this process never imports appworld."""
    import importlib.util
    package = os.path.dirname(importlib.util.find_spec("appworld").origin)
    if not os.path.isdir(os.path.join(package, "apps", "spotify")):
        subprocess.run([sys.executable, "-c", "from appworld.install import install_package; install_package()"],
                       check=True)


# ====================================================================================== the CLI

def bench(root: str, slots: int, rounds: int) -> None:
    """Print what the environment costs: the pool's start, then `rounds` times a reset, a step (one
    API call) and a score of `slots` episodes at once."""
    train = load_task_ids("train", root)
    tasks, ids = [train[i % len(train)] for i in range(slots)], list(range(slots))
    cell = '```python\nprint(apis.supervisor.show_profile()["first_name"])\n```'
    start, times = time.perf_counter(), {"reset": [], "step": [], "score": []}
    with EnvPool(slots, root) as pool:
        print(f"pool start (the zygote imports AppWorld, opens a world): {time.perf_counter() - start:.2f} s")
        for _ in range(rounds):
            for op, call in (("reset", lambda: pool.reset(ids, tasks)), ("step", lambda: pool.step(ids, [cell] * slots)),
                             ("score", lambda: pool.score(ids))):
                start = time.perf_counter()
                call()
                times[op].append(time.perf_counter() - start)
    for op, seconds in times.items():
        print(f"{op} of {slots} episodes at once, s per round: {' '.join(f'{s:.2f}' for s in seconds)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("setup", "show", "bench"))
    parser.add_argument("task_id", nargs="?", help="show: the task whose scripted solution plays an episode")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="AppWorld root (its data is in ROOT/data)")
    parser.add_argument("--force", action="store_true", help="setup: rebuild even if already built")
    parser.add_argument("--prompt", default="paper", choices=tuple(PROMPTS), help="show: the prompt")
    parser.add_argument("--slots", type=int, default=4, help="bench: episodes at once")
    parser.add_argument("--rounds", type=int, default=3, help="bench: rounds of reset, step and score")
    args = parser.parse_args()
    if args.command == "setup":
        setup_mini_world(args.root, force=args.force)
        print(f"mini-world ready in {os.path.join(os.path.abspath(args.root), 'data')}")
    elif args.command == "show":
        if args.task_id is None:
            parser.error("show needs a task id, e.g. likesong_1")
        from mini_world.play import show_episode
        show_episode(args.task_id, args.root, args.prompt)
    else:
        bench(args.root, args.slots, args.rounds)


if __name__ == "__main__":
    main()
