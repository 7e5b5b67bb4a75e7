"""Issue 11, defect 9 and its class: no path component under the state directory is followed.

Threat model (ARCHITECTURE.md): someone who can write into the state directory (another
container on the shared volume) swaps a folder the service keeps its files in for a link to a
folder elsewhere, a regular file or a FIFO. The service must not create, rename or delete
anything outside the state directory; it says clearly what is wrong (a start-up that refuses,
naming the folder relative to the state directory; a 503 with a JSON body at run time), and
nothing it acknowledged is lost once an operator puts the folder back. The state directory
itself is the operator's choice and may be a link (to a volume).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from sf_lifecycle.testing import ServerProcess

from ._harness import sink_rows

pytestmark = pytest.mark.integration
JSON = {"content-type": "application/json"}
#: Every folder the library creates under the state directory.
FOLDERS = ["sessions", "feedback", "feedback/quarantine"]
ENV = {"SF_DRAIN_DELAY_MS": "0", "SF_DRAIN_INTERVAL_MS": "30"}


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry below `root`: (size, mtime_ns), so any change shows."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def plant(path: Path, kind: str, outside: Path) -> None:
    """Replace whatever is at `path` by a link to `outside`, a regular file or a FIFO."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "link":
        path.symlink_to(outside, target_is_directory=True)
    elif kind == "file":
        path.write_bytes(b"not a folder\n")
    else:
        os.mkfifo(path)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the state directory, with the files an attacker would aim at."""
    victim = tmp_path / "outside"
    (victim / "quarantine").mkdir(parents=True)
    (victim / "s1.log").write_text("precious\n")
    (victim / "s1.lock").write_text("")
    (victim / "important.txt").write_text("do not touch\n")
    return victim


@pytest.fixture
def state(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.mark.parametrize("kind", ["link", "file", "fifo"])
@pytest.mark.parametrize("folder", FOLDERS)
def test_start_up_refuses_a_folder_that_is_a_link_a_file_or_a_fifo(
    state: Path, outside: Path, folder: str, kind: str
) -> None:
    """Steps: plant `kind` where the service keeps `folder`; start a real server; it exits
    non-zero within seconds with a log naming the folder relative to the state directory; the
    link's target is byte-for-byte unchanged and nothing was created through it."""
    plant(state / folder, kind, outside)
    before = listing(outside)
    server = ServerProcess(state_dir=state, env=ENV)
    try:
        server.start()
        code = server.wait(30)
        logs = server.logs()
    finally:
        server.close()
    assert code != 0, logs
    assert f"{folder!r} in the state directory is" in logs, logs
    assert "refusing to use it" in logs
    assert listing(outside) == before


@pytest.fixture
def running(state: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(state_dir=state, env=ENV)
    try:
        server.start()
        server.wait_ready()
        yield server
    finally:
        server.close()


def post(server: ServerProcess, path: str, body: object) -> tuple[int, dict[str, object]]:
    status, _, raw = server.get(path, method="POST", body=json.dumps(body).encode(), headers=JSON)
    return status, json.loads(raw)


@pytest.mark.parametrize("folder", ["sessions", "feedback"])
def test_a_folder_swapped_for_a_link_at_run_time_is_refused_and_nothing_is_lost(
    running: ServerProcess, state: Path, outside: Path, folder: str
) -> None:
    """Steps:
    1. a running server accepts a feedback record and a session event;
    2. the folder is moved aside (inside the state directory) and a link to an outside folder
       takes its name;
    3. publishing to the session and posting feedback answer 503 with a JSON body (for the
       swapped folder); nothing is created, renamed or deleted in the link's target;
    4. SIGTERM; the operator removes the link and moves the folder back; a restart delivers
       every acknowledged record once and replays the session's events.
    """
    server = running
    assert post(server, "/api/feedback", {"n": 1})[0] == 202
    status, body = post(server, "/api/session/events?session=s1", {"e": 1})
    assert status == 201
    first_event = body["id"]
    before = listing(outside)

    os.rename(state / folder, state / f"{folder}.moved")
    (state / folder).symlink_to(outside, target_is_directory=True)

    if folder == "sessions":
        status, body = post(server, "/api/session/events?session=s1", {"e": 2})
        assert status == 503, body
        assert "state directory is unsafe" in str(body["detail"]), body
        assert "'sessions'" in str(body["detail"])
        assert str(state) not in str(body)  # no absolute path
        acked = ["n1"]
    else:
        status, body = post(server, "/api/feedback", {"n": 2})
        # The record may still fit the open segment (its descriptor is inside the moved
        # folder): then it is acknowledged and must not be lost; a new file is refused.
        assert status in (202, 503), body
        if status == 503:
            assert body["code"] == "disk_write_failed", body
        acked = ["n1"] + (["n2"] if status == 202 else [])
    assert listing(outside) == before

    server.send_signal(signal.SIGTERM)
    server.wait(30)
    assert listing(outside) == before

    (state / folder).unlink()
    os.rename(state / f"{folder}.moved", state / folder)
    again = ServerProcess(state_dir=state, env=ENV)
    try:
        again.start()
        again.wait_ready()
        status, body = post(again, "/api/feedback", {"n": 3})
        assert status == 202
        again.send_signal(signal.SIGTERM)
        again.wait(30)
    finally:
        again.close()
    rows = [json.loads(b)["n"] for _, b in sink_rows(state)]
    assert sorted(rows) == sorted([int(a[1:]) for a in acked] + [3]), rows
    log = (state / "sessions" / "s1.log").read_text().splitlines()
    assert json.loads(log[1])["seq"] == int(str(first_event).split("-")[1])
    assert listing(outside) == before
