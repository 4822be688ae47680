"""Fixtures for the end-to-end API tests: the serving checkpoint and a running caravan-coordinator.

The checkpoint (fixtures/serving) and its transformers reference (reference.json) are built on first
use by python/build_tokenizer.py and python/make_serving_fixture.py; both are idempotent, so later
runs only check their stamps. The coordinator binary is not built here: build it first
(`cargo build -p caravan-coordinator`), or point CARAVAN_BIN_DIR at the folder holding it.
A missing binary or a failed fixture build fails the suite; nothing is skipped.
"""
import json
import os
import socket
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
# transformers' greedy reference, shared with python/gpu_check.py; re-exported for the tests.
sys.path.append(str(REPO / "python"))
from greedy_reference import GREEDY_MARGIN, hf_greedy  # noqa: E402,F401
FIXTURES = REPO / "fixtures"
TOKENIZER_DIR = FIXTURES / "serving-tokenizer"
CHECKPOINT_DIR = FIXTURES / "serving"
READY_TIMEOUT_S = 120
STOP_TIMEOUT_S = 10
READY_RE = re.compile(r"^ready: serving (?P<model>\S+) on (?P<url>http://127\.0\.0\.1:(?P<port>\d+))\s*$")
TP_SIZES = [2, 4]


def _python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _run_script(args):
    proc = subprocess.run([_python(), *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}",
                    pytrace=False)


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    """fixtures/serving: the random-weight Llama 2 checkpoint with tokenizer and reference.json."""
    _run_script(["python/build_tokenizer.py", "--out", TOKENIZER_DIR])
    _run_script(["python/make_serving_fixture.py", "--tokenizer", TOKENIZER_DIR, "--out", CHECKPOINT_DIR])
    for name in ("config.json", "tokenizer.json", "reference.json"):
        if not (CHECKPOINT_DIR / name).is_file():
            pytest.fail(f"{CHECKPOINT_DIR / name} missing after building the fixture", pytrace=False)
    return CHECKPOINT_DIR


SMOLLM2_DIR = REPO / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """models/smollm2-135m-instruct: the trained SmolLM2-135M-Instruct, fetched and converted by
    python/fetch_smollm2.py (a no-op once done; scripts/setup.sh runs it too)."""
    proc = subprocess.run([_python(), "python/fetch_smollm2.py", "--out", str(SMOLLM2_DIR)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SMOLLM2_DIR


@pytest.fixture(scope="session")
def reference(checkpoint) -> dict:
    with open(checkpoint / "reference.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def coordinator_bin() -> Path:
    bin_dir = Path(os.environ.get("CARAVAN_BIN_DIR", REPO / "target" / "debug"))
    path = bin_dir / "caravan-coordinator"
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{path} not found or not executable: build it with `cargo build -p caravan-coordinator` "
                    "or set CARAVAN_BIN_DIR", pytrace=False)
    return path


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    model: str
    tp: int
    process: subprocess.Popen
    stderr_path: str
    stdout_lines: list = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stderr_tail(self, chars: int = 6000) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-chars:]


def _pump_stdout(stream, lines: list, q: "queue.Queue"):
    # Keeps draining after the ready line so the coordinator never blocks on a full pipe.
    for line in stream:
        lines.append(line)
        q.put(line)
    q.put(None)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_group(pgid: int):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop(proc: subprocess.Popen) -> list:
    """SIGTERM the coordinator, then make sure it and its workers are gone; returns what went wrong.

    The coordinator runs in its own session, so its process group id is its pid and the workers it
    spawns are in that group (unless they leave it). Anything still alive after the grace period is
    SIGKILLed, and reported.
    """
    problems = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            problems.append(f"coordinator did not exit within {STOP_TIMEOUT_S}s of SIGTERM; killed")
            _kill_group(proc.pid)
            proc.wait()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _group_alive(proc.pid):
        if time.monotonic() > deadline:
            problems.append(f"worker processes outlived the coordinator by {STOP_TIMEOUT_S}s; killed")
            _kill_group(proc.pid)
            break
        time.sleep(0.05)  # waiting for processes that are not our children to exit
    return problems


@pytest.fixture(scope="module", params=TP_SIZES, ids=[f"tp{n}" for n in TP_SIZES])
def server(request, checkpoint, coordinator_bin):
    tp = request.param
    stderr_file = tempfile.NamedTemporaryFile(prefix=f"caravan-coordinator-tp{tp}-", suffix=".log",
                                              delete=False)
    cmd = [str(coordinator_bin), "--model", str(checkpoint), "--tp", str(tp), "--local-workers",
           "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=stderr_file, text=True, encoding="utf-8", errors="replace",
                            start_new_session=True)
    stderr_file.close()
    lines: list = []
    q: "queue.Queue" = queue.Queue()
    threading.Thread(target=_pump_stdout, args=(proc.stdout, lines, q), daemon=True).start()

    def stderr_tail():
        with open(stderr_file.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-6000:]

    def fail(why):
        _stop(proc)
        pytest.fail(f"`{' '.join(cmd)}` {why}\nstdout: {''.join(lines)[-2000:]}\n"
                    f"stderr ({stderr_file.name}):\n{stderr_tail()}", pytrace=False)

    match = None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while match is None:
        try:
            # Wake up at least every second to notice an exit even if a worker holds stdout open.
            line = q.get(timeout=1.0)
        except queue.Empty:
            line = ""
        if line is None or proc.poll() is not None:
            fail(f"exited (status {proc.wait()}) before printing its ready line")
        if time.monotonic() > deadline:
            fail(f"printed no ready line within {READY_TIMEOUT_S}s")
        match = READY_RE.match(line)
        if match is None and line.startswith("ready:"):
            fail(f"printed a malformed ready line {line!r}; expected `ready: serving <model> on http://127.0.0.1:<port>`")

    srv = Server(url=match["url"], model=match["model"], tp=tp, process=proc,
                 stderr_path=stderr_file.name, stdout_lines=lines)
    try:
        assert srv.model == checkpoint.name, f"ready line names model {srv.model!r}, expected {checkpoint.name!r}"
        yield srv
    finally:
        exited_early = proc.poll()
        problems = _stop(proc)
        if exited_early is not None:
            problems.insert(0, f"coordinator exited during the tests (status {exited_early})")
        if problems:
            pytest.fail("; ".join(problems) + f"\nstderr ({stderr_file.name}):\n{stderr_tail()}", pytrace=False)
        os.unlink(stderr_file.name)


# ---------------------------------------------------------------------------------------------------
# Helpers for tests that start their own coordinators


def sse_lines(resp: httpx.Response):
    """The lines of a streamed (server-sent events) response, split only at LF (a CR before it
    dropped), as Caravan's server ends them. httpx's `iter_lines` also splits at U+2028, U+0085
    and the other breaks of `str.splitlines`, which a token's text may hold inside a JSON string."""
    pending = b""
    for chunk in resp.iter_bytes():
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode("utf-8")
    if pending:
        yield pending.removesuffix(b"\r").decode("utf-8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_path(name: str) -> Path:
    path = Path(os.environ.get("CARAVAN_BIN_DIR", REPO / "target" / "debug")) / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{path} not found: build it with `cargo build --workspace --bins`", pytrace=False)
    return path


class Coordinator:
    """A caravan-coordinator process in its own session, its stdout pumped into a queue."""

    def __init__(self, args, env=None):
        self.log = tempfile.NamedTemporaryFile(prefix="caravan-coordinator-", suffix=".log", delete=False)
        self.cmd = [str(bin_path("caravan-coordinator")), *map(str, args)]
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, start_new_session=True, env=env)
        self.log.close()
        self.lines, self.queue = [], queue.Queue()
        threading.Thread(target=_pump_stdout, args=(self.proc.stdout, self.lines, self.queue), daemon=True).start()

    def stderr(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-6000:]

    def wait_ready(self) -> str:
        """The URL from the ready line."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self.queue.get(timeout=1.0)
            except queue.Empty:
                line = ""
            if line is None or self.proc.poll() is not None:
                break
            match = READY_RE.match(line)
            if match:
                return match["url"]
        pytest.fail(f"`{' '.join(self.cmd)}` did not become ready\nstderr:\n{self.stderr()}", pytrace=False)

    def stop(self):
        problems = _stop(self.proc)
        assert not problems, "; ".join(problems) + "\n" + self.stderr()
        os.unlink(self.log.name)


def children(pid: int) -> list:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def wait_for_status(http: httpx.Client, path: str, status: int, deadline_s: float):
    """Polls GET `path` until it answers `status`; returns the response (fails after the deadline)."""
    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = http.get(path)
            if last.status_code == status:
                return last
        except httpx.TransportError as e:
            last = e
        time.sleep(0.05)  # polling a status that changes asynchronously, with a deadline
    pytest.fail(f"GET {path} did not answer {status} within {deadline_s}s; last: {last!r}", pytrace=False)


def ctl_status(url: str) -> dict:
    """`caravanctl status --json` against `url`, parsed."""
    proc = subprocess.run([str(bin_path("caravanctl")), "--url", url, "--json", "status"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"caravanctl status failed: {proc.stderr}"
    return json.loads(proc.stdout)


def stream_text(client, model, prompt, max_tokens, out, **options):
    """Streams a completion into `out` (chunks, then "text" and "finish", or "error")."""
    chunks = out.setdefault("chunks", [])
    try:
        options = dict(options)
        extra_body = {"ignore_eos": True, **options.pop("extra_body", {})}
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=True,
                                           extra_body=extra_body, **options)
        for chunk in stream:
            chunks.append(chunk)
        out["text"] = "".join(c.choices[0].text for c in chunks)
        out["finish"] = chunks[-1].choices[0].finish_reason if chunks else None
    except Exception as e:  # noqa: BLE001 - a dropped connection (httpx) fails the test too
        out["error"] = e


def wait_for_chunks(outs, threads, count, deadline_s=60.0):
    """Waits until every stream in `outs` has `count` chunks (fails if one ends first)."""
    deadline = time.monotonic() + deadline_s
    while not all(len(o.get("chunks", [])) >= count for o in outs):
        assert time.monotonic() < deadline and all(t.is_alive() for t in threads), \
            f"a stream ended before {count} chunks: {[o.get('error') for o in outs]}"
        time.sleep(0.01)  # polling the streams' progress, with a deadline


def listening_pid(pids, port: int) -> int:
    """The process among `pids` listening on TCP `port` (its socket inodes against /proc/net/tcp)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue  # closed since the listing
            if target.startswith("socket:[") and target[len("socket:["):-1] in inodes:
                return pid
    raise AssertionError(f"none of {pids} listens on port {port}")


def wait_for_spares(url: str, count: int) -> dict:
    """Polls `caravanctl status` until `count` spares are registered; returns the status."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        status = ctl_status(url)
        if len(status["spares"]) == count:
            return status
        assert time.monotonic() < deadline, f"expected {count} spares: {status}"
        time.sleep(0.1)  # polling registration, with a deadline


def greedy_text(client, model: str, ref: dict) -> str:
    """The greedy completion of reference case `ref`'s prompt, as long as its reference."""
    out = client.completions.create(model=model, prompt=ref["prompt"], temperature=0,
                                    max_tokens=len(ref["gen_ids"]))
    return out.choices[0].text


class Load:
    """Client threads streaming the greedy reference completions until stopped; every request's
    outcome is kept: the text and finish reason, or the exception."""

    def __init__(self, url, model, refs, threads=3, timeout_s=60.0):
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=timeout_s, max_retries=0)
        self.model, self.refs = model, refs
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)
        self.results = []  # (ref, text, finish_reason, error)
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, i):
        n = i
        while not self.stop.is_set():
            ref = self.refs[n % len(self.refs)]
            n += 1
            text, finish, error = "", None, None
            try:
                stream = self.client.completions.create(model=self.model, prompt=ref["prompt"],
                                                        max_tokens=len(ref["gen_ids"]), temperature=0,
                                                        stream=True)
                for chunk in stream:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
            except Exception as e:  # noqa: BLE001 - a dropped connection (httpx) counts as an error too
                error = e
            with self.lock:
                self.results.append((ref, text, finish, error))
                self.done.notify_all()
            if error is not None:
                self.stop.wait(0.1)  # back off while the server refuses, rather than spin

    def wait_for(self, count, deadline_s):
        with self.lock:
            assert self.done.wait_for(lambda: len(self.results) >= count, deadline_s), \
                f"only {len(self.results)} of {count} requests finished in {deadline_s} s"

    def count(self):
        with self.lock:
            return len(self.results)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join()
        return self.results


def metrics(http: httpx.Client) -> dict:
    """The coordinator's /metrics, sample name (with labels) to value."""
    out = {}
    for line in http.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_for_metric(http: httpx.Client, name: str, predicate, deadline_s: float = 10.0):
    """Polls /metrics until sample `name` satisfies `predicate`; returns its value."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = metrics(http).get(name)
        if value is not None and predicate(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{name} = {value} after {deadline_s}s", pytrace=False)
        time.sleep(0.05)  # polling a sample the engine updates asynchronously, with a deadline


def continuation_text(tokenizer, prompt_ids, gen_ids):
    """The text `gen_ids` add after the prompt, as the server streams it (the first word keeps
    its space), without a dangling partial character."""
    prefix = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + gen_ids, skip_special_tokens=True)
    return full[len(prefix):].rstrip("\ufffd")
