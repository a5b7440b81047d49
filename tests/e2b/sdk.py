"""E2B's Python SDK (PyPI `e2b`, the version tests/run pins), unmodified, against
`banger e2b serve`: run by tests/e2b.rs as a member of group banger, in the test bus's network
namespace, with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY pointing at the facade.

    sdk.py main TEMPLATE      everything one user does with sandboxes, step by step
    sdk.py other SANDBOX_ID   a second user's key: the first user's sandbox is not there

Each step prints `ok: <what>`; the first failure raises (exit status 1 with its traceback).
"""

import asyncio
import datetime
import json
import os
import sys
import threading
import time

import httpx
from e2b.api.client.api.sandboxes import get_v_2_sandboxes_sandbox_id_logs
from e2b.api.client.models import LogsDirection
from e2b.api.client_sync import get_api_client
from e2b.connection_config import ConnectionConfig
from protobuf import Oneof
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    FileType,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxQuery,
    SandboxState,
    TimeoutException,
)


def ok(what):
    print(f"ok: {what}", flush=True)


def wait_for(what, limit, ready):
    """Polls `ready` until it is true (a condition, never a sleep standing for one)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {limit} s waiting for {what}")


async def watch_streaming(sandbox_id):
    sbx = await AsyncSandbox.connect(sandbox_id)
    seen = asyncio.Event()
    names = []

    def on_event(e):
        names.append(e.name)
        if e.name == "streamed.txt":
            seen.set()

    handle = await sbx.files.watch_dir("/home/user/w", on_event=on_event)
    await sbx.files.write("/home/user/w/streamed.txt", "s")
    await asyncio.wait_for(seen.wait(), 20)
    await handle.stop()
    r = await sbx.commands.run("echo async")
    assert r.stdout == "async\n", r


def main(template):
    # Creation: metadata and environment variables are the sandbox's.
    sbx = Sandbox.create(
        template=template,
        timeout=900,
        metadata={"suite": "banger", "run": "1"},
        envs={"GREETING": "hello"},
    )
    ok(f"create {sbx.sandbox_id} from {template}")
    info = sbx.get_info()
    assert info.metadata == {"suite": "banger", "run": "1"}, info.metadata
    assert info.template_id == template, info
    assert info.state.value == "running", info.state
    ok("get_info: metadata, template, running")

    # Commands: output, exit status, environment, user and working directory.
    r = sbx.commands.run("echo $GREETING; echo to-err >&2")
    assert (r.stdout, r.stderr, r.exit_code) == ("hello\n", "to-err\n", 0), r
    try:
        sbx.commands.run("echo partial; exit 3")
        raise AssertionError("exit 3 raised nothing")
    except CommandExitException as e:
        assert e.exit_code == 3 and e.stdout == "partial\n", e
    ok("commands.run: stdout, stderr, exit codes")
    r = sbx.commands.run("pwd; whoami")
    assert r.stdout == "/home/user\nuser\n", r.stdout
    r = sbx.commands.run("whoami; pwd", user="root", cwd="/tmp")
    assert r.stdout == "root\n/tmp\n", r.stdout
    r = sbx.commands.run('echo "$ONE $GREETING"', envs={"ONE": "1"})
    assert r.stdout == "1 hello\n", r.stdout
    ok("commands.run: user (default `user`), cwd, envs over the sandbox's")
    try:
        sbx.commands.run("sleep 30", timeout=2)
        raise AssertionError("a command over its timeout raised nothing")
    except TimeoutException:
        pass
    ok("commands.run: timeout")

    # Background commands outlive their stream; they are listed, reattached, fed and killed.
    h = sbx.commands.run("for i in 1 2 3 4 5 6; do echo line$i; sleep 0.5; done", background=True)
    pid = h.pid
    h.disconnect()
    listed = [p.pid for p in sbx.commands.list()]
    assert pid in listed, (pid, listed)
    again = sbx.commands.connect(pid)
    r = again.wait()
    assert r.exit_code == 0 and "line6" in r.stdout, r
    wait_for("the finished command to leave the list", 10,
             lambda: pid not in [p.pid for p in sbx.commands.list()])
    ok("background: disconnect, list, connect again, wait")
    h = sbx.commands.run("read a; read b; echo got:$a:$b", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "one\n")
    sbx.commands.send_stdin(h.pid, "two\n")
    r = h.wait()
    assert r.stdout == "got:one:two\n", r.stdout
    h = sbx.commands.run("cat; echo end", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "abc")
    sbx.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.stdout == "abcend\n", r.stdout
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.stream_input(h.pid, (f"chunk{i}\n" for i in range(50)))
    sbx.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.stdout == "".join(f"chunk{i}\n" for i in range(50)), r.stdout
    ok("stdin: send_stdin in order, stream_input (a client stream), close_stdin")
    h = sbx.commands.run("sleep 300", background=True)
    assert sbx.commands.kill(h.pid)
    try:
        h.wait()
        raise AssertionError("a killed command ended well")
    except CommandExitException as e:
        assert e.exit_code != 0, e
    assert not sbx.commands.kill(h.pid), "a second kill found the process"
    ok("kill")

    # A terminal: input, size, kill.
    out = bytearray()
    got = threading.Event()

    def on_data(data):
        out.extend(data)
        if b"30 100" in out:
            got.set()

    term = sbx.pty.create(PtySize(rows=24, cols=80))

    def follow():
        try:
            term.wait(on_pty=on_data)
        except CommandExitException:
            pass  # the kill below ends it

    threading.Thread(target=follow, daemon=True).start()
    sbx.pty.resize(term.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(term.pid, b"stty size\n")
    assert got.wait(30), bytes(out)
    assert sbx.pty.kill(term.pid)
    ok("pty: create, resize, input, kill")

    # Files: text and bytes, listing, stat, exists, directories, rename, remove, watch.
    info = sbx.files.write("notes/a.txt", "some text\n")
    assert info.path == "/home/user/notes/a.txt", info
    assert sbx.files.read("/home/user/notes/a.txt") == "some text\n"
    blob = bytes(range(256)) * 1000
    sbx.files.write("/home/user/blob.bin", blob)
    assert bytes(sbx.files.read("/home/user/blob.bin", format="bytes")) == blob
    r = sbx.commands.run("stat -c '%U %s' /home/user/blob.bin")
    assert r.stdout == f"user {len(blob)}\n", r.stdout
    entries = {e.name: e for e in sbx.files.list("/home/user")}
    assert entries["blob.bin"].type == FileType.FILE and entries["blob.bin"].size == len(blob)
    assert entries["notes"].type == FileType.DIR
    deep = [e.path for e in sbx.files.list("/home/user", depth=2)]
    assert "/home/user/notes/a.txt" in deep, deep
    assert sbx.files.exists("/home/user/notes/a.txt")
    assert not sbx.files.exists("/home/user/nope")
    st = sbx.files.get_info("/home/user/notes/a.txt")
    assert st.size == 10 and st.owner == "user", st
    assert sbx.files.make_dir("/home/user/d/e/f")
    assert not sbx.files.make_dir("/home/user/d/e/f"), "make_dir of an existing directory"
    moved = sbx.files.rename("/home/user/notes/a.txt", "/home/user/d/moved.txt")
    assert moved.path == "/home/user/d/moved.txt", moved
    sbx.files.remove("/home/user/d")
    assert not sbx.files.exists("/home/user/d")
    try:
        sbx.files.read("/etc/shadow-nope")
        raise AssertionError("reading a missing file raised nothing")
    except NotFoundException:
        pass
    try:
        sbx.files.write("/root/forbidden.txt", "x")
        raise AssertionError("user wrote into /root")
    except Exception as e:
        assert "ermission" in str(e), e
    assert sbx.files.write("/root/as-root.txt", "x", user="root").path == "/root/as-root.txt"
    ok("files: write/read text and bytes, list, depth, stat, exists, mkdir, rename, remove, users")
    # The sync SDK polls a watcher; the async one streams WatchDir.
    sbx.files.make_dir("/home/user/w")
    watch = sbx.files.watch_dir("/home/user", recursive=True)
    sbx.files.write("/home/user/w/new.txt", "new")
    events = []
    wait_for("the watcher's events", 20, lambda: events.extend(
        (e.name, e.type.value) for e in watch.get_new_events()) or ("w/new.txt", "create") in events)
    watch.stop()
    ok(f"watch_dir (polling): {events[:3]}")
    asyncio.run(watch_streaming(sbx.sandbox_id))
    ok("watch_dir (stream, AsyncSandbox)")

    # Connect's binary protobuf codec: connectrpc's own clients (its default codec), as any
    # Connect client may call envd, not only the SDK's JSON.
    from e2b.envd.filesystem import filesystem_connect, filesystem_pb
    from e2b.envd.process import process_connect, process_pb
    url = os.environ["E2B_SANDBOX_URL"]
    hdrs = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983",
            "X-Access-Token": sbx._envd_access_token}
    fs_client = filesystem_connect.FilesystemClientSync(url)
    st = fs_client.stat(filesystem_pb.StatRequest(path="/home/user/blob.bin"), headers=hdrs)
    assert st.entry.size == len(blob) and st.entry.name == "blob.bin", st
    proc_client = process_connect.ProcessClientSync(url)
    events = list(proc_client.start(process_pb.StartRequest(process=process_pb.ProcessConfig(
        cmd="/bin/sh", args=["-c", "echo binary; exit 5"])), headers=hdrs))
    out, ends = b"", []
    for e in events:
        match e.event.event:
            case Oneof(field="data", value=data):
                match data.output:
                    case Oneof(field="stdout", value=chunk):
                        out += chunk
            case Oneof(field="end", value=end):
                ends.append(end)
    assert out == b"binary\n" and ends and ends[0].exit_code == 5, events
    ok("binary protobuf: a unary and a streaming call through connectrpc's default codec")

    # A guest port through the facade: by E2B's headers and by PORT-ID.DOMAIN as a host.
    host = sbx.get_host(8080)
    assert host == f"8080-{sbx.sandbox_id}.{sbx.sandbox_domain}", host
    api = os.environ["E2B_API_URL"]
    token = sbx.traffic_access_token
    wait_for("the guest's httpd", 30, lambda: httpx.get(
        f"{api}/passwd", headers={"Host": host, "e2b-traffic-access-token": token}).status_code == 200)
    r = httpx.get(f"{api}/passwd", headers={"Host": host, "e2b-traffic-access-token": token})
    assert "user:x:1000" in r.text, r.text
    r = httpx.get(f"{api}/passwd", headers={
        "E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8080", "e2b-traffic-access-token": token})
    assert "user:x:1000" in r.text, r.text
    r = httpx.get(f"{api}/passwd", headers={"Host": host})
    assert r.status_code == 401, r
    ok("get_host: the guest's port 8080 by host and by headers; none without the token")

    # Listing by metadata and state.
    found = Sandbox.list(query=SandboxQuery(metadata={"suite": "banger"})).next_items()
    assert [s.sandbox_id for s in found] == [sbx.sandbox_id], found
    assert found[0].metadata["run"] == "1"
    assert Sandbox.list(query=SandboxQuery(metadata={"suite": "other"})).next_items() == []
    ok("list: by metadata")

    # Metrics: what the guest's own kernel counts; logs: what it printed on its console.
    [m] = sbx.get_metrics()
    shape = sbx.get_info()
    assert m.cpu_count == shape.cpu_count, (m, shape)
    assert 0 < m.mem_used < m.mem_total <= shape.memory_mb << 20, (m, shape)
    assert 0 < m.disk_used < m.disk_total and 0 <= m.cpu_used_pct <= 100, m
    ok(f"get_metrics: {m.cpu_count} CPU, {m.mem_used >> 20}/{m.mem_total >> 20} MiB, "
       f"{m.disk_used >> 20}/{m.disk_total >> 20} MiB of disk, {m.cpu_used_pct} % busy")
    sbx.commands.run("echo e2b-console-marker > /dev/console", user="root")
    api = get_api_client(ConnectionConfig())

    def marker_logged():
        r = get_v_2_sandboxes_sandbox_id_logs.sync_detailed(
            sbx.sandbox_id, client=api, search="e2b-console-marker", limit=5,
            direction=LogsDirection.BACKWARD)
        assert r.status_code == 200, r
        return [e.message for e in r.parsed.logs] == ["e2b-console-marker"]

    wait_for("the console line in the sandbox's logs", 20, marker_logged)
    r = get_v_2_sandboxes_sandbox_id_logs.sync_detailed(sbx.sandbox_id, client=api, limit=3)
    assert r.status_code == 200 and len(r.parsed.logs) == 3, r
    r = get_v_2_sandboxes_sandbox_id_logs.sync_detailed(sbx.sandbox_id, client=api, limit=0)
    assert r.status_code == 400, r
    ok("logs: the console, searched, limited, newest first; a bad limit refused")

    # Pause and connect (resume).
    sbx.files.write("/home/user/state.txt", "kept")
    assert sbx.pause()
    assert Sandbox.get_info(sbx.sandbox_id).state.value == "paused"
    again = Sandbox.connect(sbx.sandbox_id)
    assert again.commands.run("cat /home/user/state.txt").stdout == "kept"
    ok("pause, connect resumes")

    # Without memory: the VM stops; connect boots it again with its files.
    assert again.pause(mode="filesystem")
    assert Sandbox.get_info(sbx.sandbox_id).state.value == "paused"
    again = Sandbox.connect(sbx.sandbox_id)
    assert again.commands.run("cat /home/user/state.txt").stdout == "kept"
    ok("pause without memory stops, connect boots again")

    # Snapshot: a template of its own; fork: sandboxes going on from this one.
    snap = sbx.create_snapshot()
    ok(f"create_snapshot: {snap.snapshot_id}")
    from_snap = Sandbox.create(template=snap.snapshot_id, timeout=300)
    assert from_snap.commands.run("cat /home/user/state.txt").stdout == "kept"
    ok("create from the snapshot")
    forks = sbx.fork(count=2, timeout=300)
    assert len(forks) == 2 and all(isinstance(f, Sandbox) for f in forks), forks
    for f in forks:
        assert f.commands.run("cat /home/user/state.txt").stdout == "kept"
    # Listing: pages, order, state and start filters over the source and its two forks.
    mine = SandboxQuery(metadata={"suite": "banger"})
    pager = Sandbox.list(query=mine, limit=1)
    pages = []
    while pager.has_next:
        pages.append([s.sandbox_id for s in pager.next_items()])
    assert len(pages) == 3 and all(len(p) == 1 for p in pages), pages
    assert sorted(sum(pages, [])) == sorted([sbx.sandbox_id] + [f.sandbox_id for f in forks])
    assert forks[1].pause()
    paused = Sandbox.list(query=SandboxQuery(metadata={"suite": "banger"},
                                              state=[SandboxState.PAUSED])).next_items()
    assert [s.sandbox_id for s in paused] == [forks[1].sandbox_id], paused
    later = Sandbox.list(query=SandboxQuery(
        metadata={"suite": "banger"},
        started_after=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1),
    )).next_items()
    assert later == [], later
    ok("list: pages of one (nextToken), state and startedAfter filters")
    for f in forks:
        f.kill()
    from_snap.kill()
    listed = [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]
    assert listed == [snap.snapshot_id], listed
    assert [s.snapshot_id for s in sbx.list_snapshots().next_items()] == listed
    assert Sandbox.list_snapshots(sandbox_id="nosuch").next_items() == []
    assert Sandbox.delete_snapshot(snap.snapshot_id)
    assert Sandbox.list_snapshots().next_items() == []
    assert not Sandbox.delete_snapshot(snap.snapshot_id)
    ok("fork: two sandboxes with the source's files; once they went, so did the fork's "
       "snapshot; list_snapshots, delete_snapshot")

    # A lifetime: a sandbox whose timeout runs out is gone (bangerd ends it).
    short = Sandbox.create(template=template, timeout=3)
    wait_for("the sandbox whose lifetime ran out to go", 90,
             lambda: short.sandbox_id not in [s.sandbox_id for s in Sandbox.list().next_items()])
    ok("timeout: the sandbox is deleted when its lifetime runs out")
    # At its timeout a sandbox pauses (E2B's autoPause), and a request wakes it (autoResume).
    lc = Sandbox.create(template=template, timeout=4,
                        lifecycle={"on_timeout": "pause", "auto_resume": True})
    assert lc.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": True}
    lc.files.write("/home/user/lc.txt", "before")
    wait_for("the sandbox to pause at its timeout", 90,
             lambda: Sandbox.get_info(lc.sandbox_id).state.value == "paused")
    assert lc.commands.run("cat /home/user/lc.txt").stdout == "before"
    lc_info = Sandbox.get_info(lc.sandbox_id)
    assert lc_info.state.value == "running" and lc_info.end_at.timestamp() > time.time(), lc_info
    lc.kill()
    # Paused without memory (stopped) at its timeout; without autoResume only connect wakes it.
    fs = Sandbox.create(template=template, timeout=4,
                        lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}})
    assert fs.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": False}
    fs.files.write("/home/user/fs.txt", "kept")
    wait_for("the sandbox to stop at its timeout", 90,
             lambda: Sandbox.get_info(fs.sandbox_id).state.value == "paused")
    try:
        fs.commands.run("true")
        raise AssertionError("a command reached a paused sandbox without autoResume")
    except Exception as e:
        assert "start it first" in str(e) or "paused" in str(e), e
    assert Sandbox.connect(fs.sandbox_id).commands.run("cat /home/user/fs.txt").stdout == "kept"
    fs.kill()
    ok("lifecycle: pause at the timeout and resume on a request; filesystem pause, connect boots")
    sbx.set_timeout(600)
    assert Sandbox.get_info(sbx.sandbox_id).end_at.timestamp() > time.time() + 500
    ok("set_timeout")

    # Bad input: an unknown template, a wrong key, a missing sandbox.
    try:
        Sandbox.create(template="no-such-template")
        raise AssertionError("an unknown template made a sandbox")
    except Exception as e:
        assert template in str(e) and "not found" in str(e), e
    try:
        Sandbox.list(api_key="e2b_" + "0" * 40).next_items()
        raise AssertionError("a wrong key listed sandboxes")
    except AuthenticationException:
        pass
    try:
        Sandbox.connect("inosuchsandbox000000")
        raise AssertionError("a missing sandbox connected")
    except NotFoundException:
        pass
    ok("refused: unknown template (names those there are), wrong key, missing sandbox")

    print("SANDBOX " + json.dumps({"id": sbx.sandbox_id}), flush=True)


def base(_):
    """E2B's default template: `Sandbox.create()` names none."""
    sbx = Sandbox.create(timeout=600, request_timeout=600)
    assert sbx.get_info().template_id == "base"
    r = sbx.commands.run("whoami; pwd; sudo -n whoami")
    assert r.stdout == "user\n/home/user\nroot\n", r.stdout
    for tool in ("python3 --version", "pip3 --version", "git --version", "curl --version"):
        sbx.commands.run(tool)
    r = sbx.commands.run("python3 -c 'print(6 * 7)'")
    assert r.stdout == "42\n", r.stdout
    sbx.files.write("made.txt", "by user")
    assert sbx.commands.run("stat -c %U /home/user/made.txt").stdout == "user\n"
    sbx.kill()
    ok("base: Debian with python3, pip, git, curl; user in /home/user with passwordless sudo")


def other(sandbox_id):
    """A second user, with a facade and key of their own."""
    assert Sandbox.list().next_items() == [], "another user's sandboxes are listed"
    for attempt in (
        lambda: Sandbox.connect(sandbox_id),
        lambda: Sandbox.get_info(sandbox_id),
        lambda: Sandbox.kill(sandbox_id) or (_ for _ in ()).throw(NotFoundException("killed nothing")),
    ):
        try:
            attempt()
            raise AssertionError("another user's sandbox was reached")
        except NotFoundException:
            pass
    ok("another user's sandbox: not listed, not found, not killed")


if __name__ == "__main__":
    {"main": main, "other": other, "base": base}[sys.argv[1]](sys.argv[2] if len(sys.argv) > 2 else "")
