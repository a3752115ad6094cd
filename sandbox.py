"""Where agent code runs (EnvPool's plumbing): each episode in a fresh, confined fork of one trusted
"zygote" process, and each score in another fresh fork; `run_cell` is what happens to one cell there
(a size cap, a friendly guard, and whatever the code raises becomes the observation).

AppWorld freezes its process's clock (freezegun), times cells out with SIGALRM (main thread only), allows one
open world per process and runs the agent's code in that process: so the trainer never imports it. The zygote
imports AppWorld and opens a world once, so that later ones open fast; it never runs agent code nor loads a
ground truth. Every episode is a fresh fork of it, confined (_confine: namespaces, a uid of its own, read-only
files, rlimits), its world opened without the ground truth. Every score is another fresh fork, which scores
checked copies of the output databases (_copy_outputs) once the episode's processes are gone: no patch the
agent made in memory, and no link or stray SQL it left in its outputs, reaches the scorer. Each process talks
to the pool on a socket of its own, in JSON (never pickle: it would run code the agent sent).

What an episode gets: only PATH, PYTHONPATH, LD_LIBRARY_PATH, LANG, LC_ALL, TZ (plus its own APPWORLD_ROOT,
HOME, TMPDIR), no trainer file, 20,000 characters per cell, 64 MB per file, 4 GiB of address space,
AppWorld's alarm per cell, a deadline per request, no setuid programs; dying or hanging ends only its
episode. As root it runs as its own uid (ground truth chmod 700, at most 256 processes) unless Python or
the data sit where other users cannot enter and namespaces are missing; with Linux namespaces it also gets
read-only files except its outputs, only its own task, no network, its own PID namespace. NOT isolated:
without root or namespaces it has the trainer user's rights (ground truth, /proc/<trainer>/environ,
signals); as root without CAP_SYS_ADMIN it reaches /tmp, the network and the machine's process list;
everywhere it reads what is world-readable, uses CPU, memory and disk up to its limits, may write its own
output databases directly (scored as its final state), and shares the kernel: this is not a container.
"""
import ast
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import recv_handle, send_handle

REPO = os.path.dirname(os.path.abspath(__file__))
ENV_KEEP = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "LANG", "LC_ALL", "TZ")  # all the zygote gets of ours
UID_BASE = 1 << 30  # as root, an episode runs as uid UID_BASE + its pid, which nothing else has
LIMITS = {"RLIMIT_FSIZE": 64 << 20, "RLIMIT_AS": 4 << 30, "RLIMIT_CORE": 0}  # and NPROC, with a uid of its own
SQL_VERBS = {"INSERT", "UPDATE", "DELETE", "CREATE", "DROP"}  # the statements AppWorld's change logs hold
ISOLATION = ("own uid", "read-only files", "hidden ground truth", "no network", "own /proc")  # see _confine


def _send(conn, message) -> None:
    conn.send_bytes(json.dumps(message).encode())


def _recv(conn, limit: int = 1 << 26):
    return json.loads(conn.recv_bytes(limit))


def failed(reply) -> bool:
    """A reply that says why there is none, or an error."""
    return not isinstance(reply, dict) or "error" in reply


def _remove_outputs(root: str, prefix: str) -> None:
    """Delete the output folders of a zygote's episodes (their names start with its prefix)."""
    outputs = os.path.join(root, "experiments", "outputs")
    for name in os.listdir(outputs) if os.path.isdir(outputs) else []:
        if name.startswith(prefix):
            shutil.rmtree(os.path.join(outputs, name), ignore_errors=True)


# ============================================================================== the pool's side

def ensure_appworld_installed() -> None:
    """Run `appworld install` if it has not run: it decrypts the apps' code shipped in the wheel
    (offline, a few seconds). In a subprocess, so that this process never imports appworld."""
    package = os.path.dirname(importlib.util.find_spec("appworld").origin)
    if not os.path.isdir(os.path.join(package, "apps", "spotify")):
        subprocess.run([sys.executable, "-c", "from appworld.install import install_package; install_package()"],
                       check=True)


class Zygote:
    """The pool's handle on its zygote: start and stop it, have it fork an episode, end or score one.
    A zygote that dies or hangs is replaced (its episodes died with it) and asked again, once."""

    def __init__(self, root: str, timeout: float, start_timeout: float):
        self.root, self.timeout, self.start_timeout = root, timeout, start_timeout
        self.process, self.conn, self.count = None, None, 0
        self.start()

    def start(self) -> None:
        """Start the zygote in a minimal environment; one that dies or misses start_timeout is tried once more."""
        for attempt in range(2):
            ours, theirs = socket.socketpair()
            command = [sys.executable, "-c", f"import sys; sys.path[0] = {REPO!r}; import sandbox; "
                                             f"sandbox.zygote_main({theirs.fileno()}, {self.root!r})"]
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
                self.process, self.conn = process, conn
                return
            process.kill()
            process.wait()
            conn.close()
            if "error" in reply or attempt:
                raise RuntimeError(f"AppWorld did not start for {self.root}: {reply.get('error') or reply['failed']}"
                                   f"{' (tried twice)' if attempt else ''}\nCheck that `python -c 'import appworld'` "
                                   "works and that the data there is complete.")

    def stop(self, polite: bool = True) -> None:
        """Politely, the zygote kills its episodes and deletes their outputs; we delete whatever it left."""
        if self.process is None:
            return
        try:
            if polite:
                _send(self.conn, {"op": "close"})
                self.process.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.process.kill()
        self.process.wait()
        self.conn.close()
        _remove_outputs(self.root, f"envpool-{self.process.pid}-")
        self.process = None

    def ask(self, message: dict, fork: bool = False):
        """Send the zygote a request; with `fork`, also a socket for the process it forks: returns (our end, its pid)."""
        ours, theirs = socket.socketpair() if fork else (None, None)
        try:
            for attempt in range(2):
                try:
                    _send(self.conn, message)
                    if fork:
                        send_handle(self.conn, theirs.fileno(), self.process.pid)
                    if self.conn.poll(self.timeout):
                        reply = _recv(self.conn)
                        return (Connection(ours.detach()), reply["pid"]) if fork else reply
                except (EOFError, OSError):
                    pass
                if attempt:
                    raise RuntimeError("AppWorld's zygote process failed twice in a row.")
                self.stop(polite=False)
                self.start()
        finally:
            if fork:
                theirs.close()

    def open(self, task_id: str, exec_timeout: int, max_raw_chars: int) -> tuple[str, Connection, int]:
        """A fresh episode process for the task: returns (its name, a socket to it, its pid)."""
        self.count += 1
        name = f"envpool-{self.process.pid}-{self.count}"  # AppWorld's experiment name: its outputs' folder
        conn, pid = self.ask({"op": "episode", "task_id": task_id, "name": name, "exec_timeout": exec_timeout,
                              "max_raw_chars": max_raw_chars}, fork=True)
        return name, conn, pid

    def end(self, pid: int, name: str, task_id: str, isolation, score: bool = False):
        """Kill an episode's process, then delete its outputs, or with `score` have a fresh process
        score them, and return (a socket to it, its pid)."""
        sweep = "own uid" in isolation and "read-only files" not in isolation  # no PID namespace to die with
        return self.ask({"op": "end", "pid": pid, "name": name, "task_id": task_id, "sweep": sweep,
                         "score": score, "timeout": self.timeout}, fork=score)


def exchange(requests: dict, timeout: float, limit: int) -> dict:
    """Send {key: (socket, message or None)} and gather the replies (at most `limit` bytes each) until the
    deadline: {key: the reply, or a string saying why there is none}."""
    replies, pending = {}, {}
    for key, (conn, message) in requests.items():
        try:
            if message is not None:
                _send(conn, message)
            pending[conn] = key
        except OSError as error:
            replies[key] = f"its process died ({error!r})"
    deadline = time.monotonic() + timeout
    while pending and (ready := wait(list(pending), max(0.0, deadline - time.monotonic()))):
        for conn in ready:
            key = pending.pop(conn)
            try:
                reply = _recv(conn, limit)
                replies[key] = reply if isinstance(reply, dict) else "its process sent a malformed reply"
            except (EOFError, OSError, ValueError) as error:
                replies[key] = f"its process died ({error!r})"
    for key in pending.values():
        replies[key] = f"its process did not answer within {timeout:.0f} s; it was killed"
    return replies


# ======================================================================= what happens to a cell

MAX_CODE_CHARS = 20_000  # longer cells are refused: AppWorld's own parse of them is slow
# A friendly first answer, in AppWorld's words, to code that reaches for the files or the interpreter's insides: a
# text check, easy to get around. What keeps the ground truth and the trainer out of reach is the episode's process.
BLOCKED_MODULES = {"os", "sys", "pathlib", "appworld", "importlib", "io", "shutil", "inspect", "gc",
                   "ctypes", "builtins", "socket", "marshal"}
BLOCKED_NAMES = {"__import__", "eval", "exec", "compile", "globals", "locals", "vars"}


def guard(code: str) -> str | None:
    """An error message if the code plainly tries to reach outside the apps, else None."""
    if "ground_truth" in code:
        return "Execution failed. Traceback:\nAccess to the task's ground truth is not allowed."
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None  # AppWorld reports syntax errors itself
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if bad := sorted({name.split(".")[0] for name in names} & BLOCKED_MODULES):
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
    head = "Execution failed. Traceback:\n"
    if len(code) > MAX_CODE_CHARS:
        return f"{head}The code has {len(code)} characters; the limit is {MAX_CODE_CHARS}. Write smaller blocks."
    try:
        code.encode("utf-8")
        ast.parse(code)
    except UnicodeEncodeError as error:
        return f"{head}The code is not valid Unicode (character {error.start} is a lone surrogate)."
    except (MemoryError, RecursionError):
        return f"{head}The code is nested too deeply to be parsed."
    except SyntaxError:
        pass  # AppWorld reports it in its own words
    try:
        return guard(code) or world.execute(code)
    except BaseException as error:  # AppWorld catches Exception only: KeyboardInterrupt, SystemExit...
        world.safety_guard.disable()  # what execute() would have done after the cell
        world._save_state(world.output_db_home_path_on_disk)
        return f"{head}{type(error).__name__}: {error}"
    finally:
        world.environment_io.clear()  # AppWorld keeps every cell and output for logs we do not write


# ============================================================================ the zygote's side

def zygote_main(fd: int, root: str) -> None:
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
