"""AppWorld as a multi-turn environment for LOOP, run in worker processes; and the offline mini-world.

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

Why worker processes: AppWorld freezes the clock of its whole process (freezegun), times cells out
with SIGALRM (main thread only) and allows one open world per process. So each world lives in a
spawned worker that answers requests over a pipe; the trainer never imports appworld, and a worker
that hangs or dies is killed and replaced without losing the other episodes.
"""
import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import string
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait

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


# AppWorld's own guard blocks open(), subprocess, os.system, ... but allows `import os`, `pathlib`
# (Path.read_text) and `import appworld`, any of which can read the ground truth on disk. This is an
# extra syntactic check of ours, not a sandbox: enough to keep a policy from stumbling on the answer.
# (What AppWorld already blocks, like open() or subprocess, is left to its guard and its messages.)
BLOCKED_MODULES = {"os", "sys", "pathlib", "appworld", "importlib", "io", "shutil", "inspect", "gc",
                   "ctypes", "builtins", "socket", "marshal"}
BLOCKED_NAMES = {"__import__", "eval", "exec", "compile", "globals", "locals", "vars"}


def guard(code: str) -> str | None:
    """An error message if the code tries to reach outside the apps, else None."""
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
        if "__" in dunder:  # obj.__class__..., getattr(obj, "__globals__"): the ways out of the shell
            return f"Execution failed. Traceback:\nAccess to {dunder[:40]!r} is not allowed."
    return None


def cap_chars(text: str, limit: int, unit: str = "characters") -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... output truncated: {len(text) - limit} more {unit} not shown]"


# ======================================================================= the worker (one process)

def _evaluation_summary(world) -> dict:
    tracker = world.evaluate(suppress_errors=True)
    return {"success": tracker.success, "pass_count": tracker.pass_count, "num_tests": tracker.num_tests,
            "passed_labels": [p["label"] for p in tracker.passes],
            "failed_labels": [f["label"] for f in tracker.failures],
            "failures": [f["requirement"] for f in tracker.failures]}


def _worker_main(conn, root: str, name: str, exec_timeout: int, max_raw_chars: int) -> None:
    """Serve requests for one world at a time: ("reset", task_id), ("step", code, evaluate),
    ("evaluate",), ("close",). Replies are ("ok", dict) or ("error", message)."""
    os.environ["APPWORLD_ROOT"] = root  # AppWorld reads it when its paths are used
    from appworld import AppWorld  # imported here only: it freezes this process's clock later

    world = None
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            break
        try:
            kind = request[0]
            if kind == "close":
                break
            if kind == "reset":
                if world is not None:
                    world.close()
                    world = None
                # experiment_name is per worker: AppWorld deletes and rewrites its output folder
                world = AppWorld(task_id=request[1], experiment_name=name, timeout_seconds=exec_timeout)
                task = world.task
                reply = {"instruction": task.instruction, "datetime": str(task.datetime),
                         "supervisor": {k: task.supervisor[k] for k in
                                        ("first_name", "last_name", "email", "phone_number")}}
            elif kind == "step":
                code, evaluate_now = request[1], request[2]
                output = guard(code) or world.execute(code)
                completed = world.task_completed()
                reply = {"output": cap_chars(output, max_raw_chars), "completed": completed}
                if completed or evaluate_now:
                    reply["evaluation"] = _evaluation_summary(world)
            elif kind == "evaluate":
                reply = {"evaluation": _evaluation_summary(world)}
            else:
                raise ValueError(f"unknown request {kind!r}")
            conn.send(("ok", reply))
        except Exception as exception:  # report, stay alive: the parent decides what to do
            conn.send(("error", f"{type(exception).__name__}: {exception}"))
    # Exit at once: a normal interpreter shutdown with a world open takes ~3 s, and nothing of the
    # world needs saving (AppWorld wrote its output databases after every cell).
    os._exit(0)


# ===================================================================================== the pool

def _start_without_main(process) -> None:
    """Start a spawned process without re-running the parent's main script in it.

    Spawn normally re-imports the main module in the child; under train.py that means torch and
    transformers in every AppWorld worker (measured: 720 MB instead of ~270 MB, and a first reset of
    18 s instead of 5). Our targets live in this module, so the child never needs the main module:
    hide it while the child's start-up data is taken.
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
    reminder: str  # appended to every observation
    interactions: int = 0
    done: bool = False


class EnvPool:
    """N worker processes, each holding at most one AppWorld world; slot i is worker i.

    `reset`, `step` and `score` take lists of slots and run them in parallel (send every request,
    then gather). A worker that misses its deadline or dies is killed and replaced; its episode ends with
    reward 0 and info["env_failed"]. Workers are recycled every `recycle_after` episodes because
    AppWorld's memory grows about 1.2 MB per episode (measured: 256 MB after 1, 397 MB after 121).

    reward: "fraction" of the task's unit tests that pass (the paper's); "binary", 1 if all pass;
        "progress", the fraction among the tests a no-op episode fails (AppWorld's "no_op_fail"
        labels), so that doing nothing earns 0 instead of 1/2 or 2/3.
    prompt: "paper" (the paper's structure) or "short" (a few lines, for tiny models); see PROMPTS.
    tokenizer, max_obs_tokens: observations are cut at this many tokens of the policy's tokenizer
        (in this process), or at 4 characters per token without one.
    timeout: seconds any one request may take before its worker is killed and replaced;
    exec_timeout: AppWorld's own limit per cell (SIGALRM in the worker, which survives it).
    """

    def __init__(self, size: int, root: str = DEFAULT_ROOT, *, max_interactions: int = 40,
                 reward: str = "fraction", prompt: str = "paper", tokenizer=None, max_obs_tokens: int = 3000,
                 timeout: float = 120.0, exec_timeout: int = 60, recycle_after: int = 100):
        if size < 1:
            raise ValueError("EnvPool needs at least one worker.")
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
        # `timeout` is our deadline for any one request; `exec_timeout` is AppWorld's own per-cell
        # limit (SIGALRM), shorter, so an ordinary infinite loop is stopped inside the worker,
        # which survives. Only code SIGALRM cannot interrupt (a long C call) needs the kill.
        self.timeout, self.exec_timeout = timeout, max(1, int(min(exec_timeout, timeout - 1)))
        self.recycle_after = recycle_after
        # the worker cuts huge outputs before they cross the pipe; the parent then cuts to tokens
        self.max_raw_chars = 8 * max_obs_tokens
        self._ctx = mp.get_context("spawn")
        self._started = 0  # for unique experiment names
        self._workers = [self._start_worker() for _ in range(size)]
        self._episodes: list[_Episode | None] = [None] * size

    # ------------------------------------------------------------------------ worker management
    def _start_worker(self) -> dict:
        parent_conn, child_conn = self._ctx.Pipe()
        self._started += 1
        name = f"envpool-{os.getpid()}-{id(self)}-{self._started}"
        process = self._ctx.Process(target=_worker_main, daemon=True,
                                    args=(child_conn, self.root, name, self.exec_timeout, self.max_raw_chars))
        _start_without_main(process)
        child_conn.close()
        return {"process": process, "conn": parent_conn, "episodes": 0, "name": name}

    def _stop_worker(self, slot: int, polite: bool = True) -> None:
        worker = self._workers[slot]
        if polite and worker["process"].is_alive():
            try:
                worker["conn"].send(("close",))
                worker["process"].join(5)
            except (OSError, ValueError):
                pass
        if worker["process"].is_alive():
            worker["process"].kill()
            worker["process"].join(5)
        worker["conn"].close()
        shutil.rmtree(os.path.join(self.root, "experiments", "outputs", worker["name"]), ignore_errors=True)

    def _replace_worker(self, slot: int, polite: bool = False) -> None:
        self._stop_worker(slot, polite=polite)
        self._workers[slot] = self._start_worker()

    def worker_pid(self, slot: int) -> int:
        return self._workers[slot]["process"].pid

    def _call(self, requests: dict, timeout: float) -> dict:
        """Send {slot: request} to all workers at once, then gather. Returns {slot: reply dict} or,
        for a worker that died or missed the deadline (it is replaced), {slot: ("failed", why)}."""
        results, pending = {}, {}
        for slot, request in requests.items():
            try:
                self._workers[slot]["conn"].send(request)
                pending[self._workers[slot]["conn"]] = slot
            except (OSError, ValueError) as error:
                results[slot] = ("failed", f"worker died (its pipe is broken: {error!r})")
        deadline = time.monotonic() + timeout
        while pending:
            ready = wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for conn in ready:
                slot = pending.pop(conn)
                try:
                    results[slot] = conn.recv()
                except (EOFError, OSError) as error:
                    results[slot] = ("failed", f"worker died (exit code {self._workers[slot]['process'].exitcode}): {error!r}")
        for slot in pending.values():
            results[slot] = ("failed", f"worker did not answer within {timeout:.0f} s; killed and replaced")
        for slot, result in results.items():
            if result[0] == "failed":
                self._replace_worker(slot)
        return results

    def __len__(self) -> int:
        return len(self._workers)

    # ---------------------------------------------------------------------------- the episodes
    def reset(self, slots: list[int], task_ids: list[str]) -> list[list[dict]]:
        """Open a task's world in each slot; returns each slot's opening chat messages."""
        if len(slots) != len(task_ids) or len(set(slots)) != len(slots):
            raise ValueError("reset needs distinct slots and one task id per slot.")
        for slot, task_id in zip(slots, task_ids):
            self._check_slot(slot)
            _check_task_id(self.root, task_id)
            self._episodes[slot] = None
            if self._workers[slot]["episodes"] >= self.recycle_after or not self._workers[slot]["process"].is_alive():
                self._replace_worker(slot, polite=True)
        # a fresh worker first imports appworld (~2 s) and builds its first world (~3 s)
        replies = self._call({s: ("reset", t) for s, t in zip(slots, task_ids)}, self.timeout + 30)
        retry = {s: t for s, t in zip(slots, task_ids) if replies[s][0] == "failed"}
        if retry:  # one more try on the replaced workers before giving up
            replies.update(self._call({s: ("reset", t) for s, t in retry.items()}, self.timeout + 30))
        messages = []
        for slot, task_id in zip(slots, task_ids):
            status, reply = replies[slot]
            if status != "ok":
                raise RuntimeError(f"Could not open task {task_id} in slot {slot}: {reply}")
            self._workers[slot]["episodes"] += 1
            self._episodes[slot] = _Episode(task_id, reminder(reply, self.prompt))
            messages.append(opening_messages(reply, self.prompt))
        return messages

    def step(self, slots: list[int], texts: list[str]) -> list[StepResult]:
        """Run each slot's agent message in its world; all slots in parallel."""
        if len(slots) != len(texts) or len(set(slots)) != len(slots):
            raise ValueError("step needs distinct slots and one message per slot.")
        requests, results = {}, {}
        for slot, text in zip(slots, texts):
            self._check_slot(slot)
            episode = self._episodes[slot]
            if episode is None or episode.done:
                raise ValueError(f"Slot {slot} has no running episode: call reset first.")
            episode.interactions += 1
            last = episode.interactions >= self.max_interactions
            code = extract_code(text)
            if code is not None:
                requests[slot] = ("step", code, last)
            elif last:
                requests[slot] = ("evaluate",)
            else:
                results[slot] = StepResult(self._observation(
                    "No ```python block found in your message: write your code in one.", episode), done=False)
        for slot, (status, reply) in self._call(requests, self.timeout).items():
            episode = self._episodes[slot]
            if status != "ok":
                episode.done = True
                why = reply if status == "failed" else f"worker error: {reply}"
                results[slot] = StepResult(f"The environment failed: {why}", done=True, reward=0.0,
                                           info={"env_failed": True, "error": why})
                continue
            output = reply.get("output", "No ```python block found in your message.")
            done = "evaluation" in reply
            if done and not reply.get("completed"):
                output += f"\n[Interaction limit ({self.max_interactions}) reached: the task is scored as it stands.]"
            result = StepResult(self._observation(output, episode), done=done)
            if result.done:
                episode.done = True
                self._score(result, reply["evaluation"], reply.get("completed", False))
            results[slot] = result
        return [results[slot] for slot in slots]

    def score(self, slots: list[int]) -> list[StepResult]:
        """End each slot's running episode and score it as it stands, by the task's unit tests (e.g.
        an episode cut by the policy's context limit: the official code pays it its partial credit)."""
        if len(set(slots)) != len(slots):
            raise ValueError("score needs distinct slots.")
        for slot in slots:
            self._check_slot(slot)
            if self._episodes[slot] is None or self._episodes[slot].done:
                raise ValueError(f"Slot {slot} has no running episode to score.")
            self._episodes[slot].done = True
        results = {}
        for slot, (status, reply) in self._call({s: ("evaluate",) for s in slots}, self.timeout).items():
            if status == "ok":
                results[slot] = StepResult("", done=True)
                self._score(results[slot], reply["evaluation"], completed=False)
            else:
                why = reply if status == "failed" else f"worker error: {reply}"
                results[slot] = StepResult(f"The environment failed: {why}", done=True,
                                           info={"env_failed": True, "error": why})
        return [results[slot] for slot in slots]

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < len(self._workers):
            raise ValueError(f"No slot {slot}: this pool has slots 0..{len(self._workers) - 1}.")

    def _observation(self, output: str, episode: _Episode) -> str:
        if self.tokenizer is not None:
            ids = self.tokenizer.encode(output, add_special_tokens=False)
            if len(ids) > self.max_obs_tokens:
                output = (self.tokenizer.decode(ids[: self.max_obs_tokens]) +
                          f"\n[... output truncated: {len(ids) - self.max_obs_tokens} more tokens not shown]")
        else:  # about 4 characters per token
            output = cap_chars(output, 4 * self.max_obs_tokens)
        return f"{output.rstrip()}\n\n{episode.reminder}"

    def _score(self, result: StepResult, evaluation: dict, completed: bool) -> None:
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
        result.info.update(completed=completed, failures=evaluation["failures"])

    def close(self) -> None:
        for slot in range(len(self._workers)):
            self._stop_worker(slot)

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
