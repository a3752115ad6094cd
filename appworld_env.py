"""AppWorld as a multi-turn environment for LOOP: task lists and scores (TGC, SGC), the prompts, and
EnvPool, which runs many episodes at once, each in a fresh confined process (sandbox.py runs the agent's
code; a reader of the paper can skip it).

    python appworld_env.py setup [--root DIR] [--force]   # build the offline mini-world (mini_world/)

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
import sys
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import sandbox

DEFAULT_ROOT = os.environ.get("APPWORLD_ROOT") or os.path.join(sandbox.REPO, "appworld_root")
SPLITS = ("train", "dev", "test_normal", "test_challenge")
REWARDS = ("fraction", "binary", "progress")


# ============================================================================ task lists, metrics

def _missing_data_error(root: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"No AppWorld data under {os.path.join(root, 'data')}. Build the offline mini-world with "
        f"`python appworld_env.py setup --root {root}` (or mini_world.build.setup_mini_world()), or, with "
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
    folder = os.path.join(root, "data", "tasks", task_id)
    if not os.path.isfile(os.path.join(folder, "specs.json")):
        splits = [p for s in SPLITS if os.path.exists(p := os.path.join(root, "data", "datasets", s + ".txt"))]
        raise ValueError(f"Unknown task id {task_id!r}: it is in none of the split files {splits} and has no "
                         f"folder {folder}.")


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
        return (f"(Your task: {info['instruction']} Reply with one ```python block; "
                "end with apis.supervisor.complete_task.)")
    return f"As a reminder, my task:\n{task_block(info)}"


# ============================================================================= the agent's code

CODE_BLOCK = re.compile(r"```(?:python3?|py)\b[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str | None:
    """All ```python blocks of a message, joined (as the paper does); an unclosed last block counts
    (the model may have hit its token limit). None when the message has no code."""
    blocks = [b.strip() for b in CODE_BLOCK.findall(text) if b.strip()]
    return "\n\n".join(blocks) if blocks else None


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
    """`size` episode slots; `reset`, `step` and `score` serve lists of slots in parallel, each episode in a
    fresh confined process (sandbox.py). Whatever the agent's code is or does is an observation; an episode
    whose process dies or misses its deadline ends with reward 0 and info["env_failed"].

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
        sandbox.ensure_appworld_installed()
        self.root = os.path.abspath(root)
        self.max_interactions, self.reward, self.prompt = max_interactions, reward, prompt
        self.tokenizer, self.max_obs_tokens, self.timeout = tokenizer, max_obs_tokens, timeout
        self.exec_timeout = max(1, int(min(exec_timeout, timeout - 1)))  # AppWorld's alarm first: the episode goes on
        self.max_raw_chars = 8 * max_obs_tokens  # huge outputs are cut in the episode, before the socket
        self.isolation = None  # what the episodes' processes are kept from (see sandbox.ISOLATION): known at reset
        self._episodes: list[_Episode | None] = [None] * size
        self._zygote = sandbox.Zygote(self.root, timeout, start_timeout)  # forks every episode and scorer

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
        replies.update(self._open({s: t for s, t in zip(slots, task_ids) if sandbox.failed(replies[s])}))  # once more
        messages = []
        for slot, task_id in zip(slots, task_ids):
            reply = replies[slot]
            if sandbox.failed(reply):
                raise RuntimeError(f"Could not open task {task_id} in slot {slot}: "
                                   f"{reply['error'] if isinstance(reply, dict) else reply}")
            if self.isolation is None:
                self.isolation = reply["isolation"]
                if missing := sorted(set(sandbox.ISOLATION) - set(self.isolation)):
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
                results[slot] = StepResult(f"The environment failed: {why}", True,
                                           info={"env_failed": True, "error": why})
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

    # ---------------------------------------------------------- the episodes' processes (sandbox.py)
    def _open(self, tasks: dict) -> dict:
        """A fresh episode process for each {slot: task_id}; returns {slot: its first reply, or why none}."""
        for slot, task_id in tasks.items():
            name, conn, pid = self._zygote.open(task_id, self.exec_timeout, self.max_raw_chars)
            self._episodes[slot] = _Episode(task_id, name, pid, conn)
        return self._exchange(dict.fromkeys(tasks), self.timeout)

    def _end(self, slot: int, score: bool = False):
        """End the slot's episode (or its scoring): kill its process, then delete its outputs, or with
        `score` have a fresh process score them, and return (a socket to it, its pid)."""
        episode = self._episodes[slot]
        episode.done = True
        episode.conn.close()
        return self._zygote.end(episode.pid, episode.name, episode.task_id, self.isolation or (), score)

    def _exchange(self, messages: dict, timeout: float) -> dict:
        """Send {slot: message (or None)} to the slots' processes and gather their replies until the deadline:
        {slot: the reply, or a string saying why there is none}. A process that sent none, or an error, is killed."""
        replies = sandbox.exchange({slot: (self._episodes[slot].conn, message) for slot, message in messages.items()},
                                   timeout, limit=12 * self.max_raw_chars + (1 << 16))
        for slot, reply in replies.items():
            if sandbox.failed(reply):
                self._end(slot)
        return replies

    def close(self) -> None:
        for episode in self._episodes:
            if episode is not None:
                episode.conn.close()
        self._zygote.stop(polite=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":  # the offline mini-world's builder (mini_world/build.py)
    parser = argparse.ArgumentParser(description="Build the offline mini-world (mini_world/).")
    parser.add_argument("command", choices=("setup",))
    parser.add_argument("--root", default=DEFAULT_ROOT, help="AppWorld root (its data is in ROOT/data)")
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    args = parser.parse_args()
    from mini_world.build import setup_mini_world  # mini_world imports this module
    setup_mini_world(args.root, force=args.force)
    print(f"mini-world ready in {os.path.join(os.path.abspath(args.root), 'data')}")
