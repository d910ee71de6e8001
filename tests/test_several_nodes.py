"""Several nodes on one PostgreSQL database (issue 12): two twistd processes, one store.

Node A and node B are real ``twistd -n clientid-mta`` processes on their own ports and
data folders, sharing the passwd file, the device-token key and a database of a private
PostgreSQL cluster (started for this module, since one test stops and restarts it).
What must hold across them: a device trusted through A is known on B; failures on
both spend one budget; the first-device rule picks exactly one device among logins
racing over both nodes; the database going away is 454 and comes back by itself; a
node with another key refuses to start.
"""

from __future__ import annotations

import shutil
import smtplib
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clientid_mta.devices.keys import load_or_create_server_key
from clientid_mta.devices.sqlite_store import open_sqlite_stores
from clientid_mta.smtp.clientid import device_key, parse_clientid
from tests.postgres_server import Cluster, start_cluster
from tests.serverproc import ServerProcess, login_code, run_twistd_once, submit
from tests.sink import wait_until

ALICE, ALICE_PW = "alice@example.org", "alice-password"
BOB, BOB_PW = "bob@example.org", "bob-password"
ACCEPTED, REFUSED, UNAVAILABLE = 235, 535, 454
RECOVERY = 5.0  # seconds within which logins work again once the database is back

pytestmark = pytest.mark.timeout(180)


def clientid() -> str:
    return f"UUID {uuid.uuid4()}"


def code(node: ServerProcess, user: str, password: str, token: str) -> int:
    try:
        return login_code(node, user, password, token)
    except smtplib.SMTPResponseException as refused:
        return refused.smtp_code


def node_config(shared: Path, url: str, key_file: Path) -> str:
    return (
        "[server]\nworkers = 1\n"
        f'[auth]\npasswd_file = "{shared / "passwd"}"\n'
        f'[clientid]\nkey_file = "{key_file}"\n'
        f'[store]\nurl = "{url}"\n'
        # Only the budgets under test bind: many newcomers share 127.0.0.0/24 here.
        "[throttle]\nnetwork_burst = 1000\nnetwork_checks = 64\n"
        "account_unknown_burst = 1000\n"
    )


@dataclass
class Farm:
    cluster: Cluster
    url: str
    shared: Path
    a: ServerProcess
    b: ServerProcess
    bob_device: str  # trusted through A before B started (so B's view knows it)


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    cluster = start_cluster()
    root = tmp_path_factory.mktemp("farm")
    shared = root / "shared"
    shared.mkdir()
    key_file = shared / "clientid.key"
    load_or_create_server_key(key_file)
    url = cluster.new_database()
    a = ServerProcess.create(root / "a", node_config(shared, url, key_file))
    b = ServerProcess.create(root / "b", node_config(shared, url, key_file))
    try:
        a.add_user(ALICE, ALICE_PW)
        a.add_user(BOB, BOB_PW)
        a.start()
        bob_device = clientid()
        assert code(a, BOB, BOB_PW, bob_device) == ACCEPTED  # his first device: trusted
        b.start()
        yield Farm(cluster, url, shared, a, b, bob_device)
    finally:
        a.stop()
        b.stop()
        try:
            cluster.stop("immediate")
        finally:
            shutil.rmtree(cluster.root, ignore_errors=True)
    for node in (a, b):
        assert "Traceback" not in node.output(), node.output()


def test_a_device_trusted_through_node_a_logs_in_on_node_b(farm: Farm) -> None:
    phone, laptop = clientid(), clientid()
    assert code(farm.a, ALICE, ALICE_PW, phone) == ACCEPTED  # first device: trusted on A
    assert code(farm.b, ALICE, ALICE_PW, phone) == ACCEPTED  # known on B
    assert code(farm.b, ALICE, ALICE_PW, laptop) == REFUSED  # a second one pends, on B
    assert code(farm.a, ALICE, ALICE_PW, laptop) == REFUSED  # and so on A
    listing = farm.a.admin("device", "list", ALICE)  # the admin command reads the database
    assert sorted(line.split()[2] for line in listing.splitlines()[1:]) == ["pending", "trusted"]


def test_failures_split_over_both_nodes_spend_one_budget(farm: Farm) -> None:
    """Bob's trusted device and his account have 10 attempts each (the defaults): five
    wrong passwords on A and five on B spend them; the next is 454 on either node."""
    nodes = [farm.a, farm.b] * 5
    replies = [code(node, BOB, f"wrong-{n}", farm.bob_device) for n, node in enumerate(nodes)]
    assert replies == [REFUSED] * 10
    assert code(farm.a, BOB, "wrong-a", farm.bob_device) == UNAVAILABLE
    assert code(farm.b, BOB, "wrong-b", farm.bob_device) == UNAVAILABLE
    assert code(farm.b, BOB, BOB_PW, farm.bob_device) == UNAVAILABLE  # spent is spent


def test_twelve_first_logins_racing_over_both_nodes_trust_exactly_one_device(
    farm: Farm,
) -> None:
    carol = f"carol-{uuid.uuid4().hex[:8]}@example.org"
    farm.a.add_user(carol, "carol-password")
    tokens = [clientid() for _ in range(12)]
    replies: dict[str, int] = {}
    start = threading.Barrier(len(tokens))

    def log_in(number: int, token: str) -> None:
        start.wait(30)
        replies[token] = code((farm.a, farm.b)[number % 2], carol, "carol-password", token)

    threads = [threading.Thread(target=log_in, args=item) for item in enumerate(tokens)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(replies.values()) == [ACCEPTED] + [REFUSED] * 11
    listing = farm.b.admin("device", "list", carol)
    states = sorted(line.split()[2] for line in listing.splitlines()[1:])
    assert states == ["pending"] * 11 + ["trusted"]


def test_the_database_stopped_mid_run_is_454_and_logins_come_back(farm: Farm) -> None:
    trusted = _trusted_device(farm)
    session = farm.a.smtp()
    session.user, session.password = ALICE, ALICE_PW
    session.docmd("CLIENTID", trusted)
    assert session.auth("PLAIN", session.auth_plain)[0] == ACCEPTED
    farm.cluster.stop("fast")
    try:
        for node in (farm.a, farm.b):
            assert code(node, ALICE, ALICE_PW, trusted) == UNAVAILABLE
            assert code(node, ALICE, "wrong", clientid()) == UNAVAILABLE
        # A session logged in before keeps sending: the message is stored (250).
        submit(session, ALICE, BOB, b"Subject: while the database is down\r\n\r\nhi\r\n")
        session.quit()
    finally:
        farm.cluster.start()
    back = time.monotonic()
    for node in (farm.a, farm.b):

        def logs_in(node: ServerProcess = node) -> bool | None:
            return code(node, ALICE, ALICE_PW, trusted) == ACCEPTED or None

        wait_until(logs_in, RECOVERY, "logins to work again", interval=0.2)
    assert time.monotonic() - back < 2 * RECOVERY + 5  # both nodes, one after the other
    assert any(b"while the database is down" in m.as_bytes() for m in farm.a.messages(BOB))
    for node in (farm.a, farm.b):
        output = node.output()
        assert output.count("cannot be reached") == 1, output  # once per change of state
        assert output.count("is reachable again") == 1, output
        assert "error connecting" not in output  # the pool's own line per attempt
        assert "cannot write the audit log now" not in output  # said by the store, once
        assert "Traceback" not in output


def _trusted_device(farm: Farm) -> str:
    """A token of a device Alice trusts (made so through the admin command)."""
    token = clientid()
    farm.a.admin("device", "add", ALICE, "UUID", stdin=token.split()[1] + "\n")
    return token


def test_a_node_with_another_key_refuses_to_start_naming_the_problem(
    farm: Farm, tmp_path: Path
) -> None:
    other = ServerProcess.create(
        tmp_path / "c", node_config(farm.shared, farm.url, tmp_path / "other.key")
    )
    status, output = run_twistd_once(other.root, other.config.source)
    assert status != 0
    lines = [line for line in output.splitlines() if "clientid-mta:" in line]
    assert len(lines) == 1, output
    assert "[clientid] key_file" in lines[0] and "another device-token key" in lines[0]
    assert "Traceback" not in output
    listed = other.cli("device", "list", ALICE)  # nor does the admin command use it
    assert listed.returncode == 1 and listed.stderr.count("\n") == 1
    assert "another device-token key" in listed.stderr


def test_store_copy_moves_a_sqlite_store_and_a_node_on_postgresql_knows_its_devices(
    farm: Farm, tmp_path: Path
) -> None:
    """``store copy --to URL`` from a populated SQLite store; then a node on the copy
    recognises the same devices."""
    single = ServerProcess.create(
        tmp_path / "single", f'[clientid]\nkey_file = "{farm.shared / "clientid.key"}"\n'
    )
    single.add_user(ALICE, ALICE_PW)
    key = load_or_create_server_key(farm.shared / "clientid.key")
    phone = clientid()
    sqlite = open_sqlite_stores(single.config.clientid.device_store)
    try:
        sqlite.devices.register(
            ALICE, device_key(key, parse_clientid(phone.encode())), "UUID", "n", True
        )
        sqlite.devices.register(ALICE, "ab" * 32, "UUID", "n", True)  # pending
    finally:
        sqlite.close()
    target = farm.cluster.new_database()
    copied = single.cli("store", "copy", "--to", target)
    assert copied.returncode == 0, copied.stderr
    assert "devices: 2" in copied.stdout.splitlines()
    again = single.cli("store", "copy", "--to", target)  # never merged by accident
    assert again.returncode == 1 and "copy into an empty database" in again.stderr

    moved = ServerProcess.create(
        tmp_path / "moved",
        f'[auth]\npasswd_file = "{single.config.auth.passwd_file}"\n'
        f'[clientid]\nkey_file = "{farm.shared / "clientid.key"}"\n[store]\nurl = "{target}"\n',
    )
    moved.start()
    try:
        assert code(moved, ALICE, ALICE_PW, phone) == ACCEPTED
        assert code(moved, ALICE, ALICE_PW, clientid()) == REFUSED  # not a first device
    finally:
        moved.stop()
    status = moved.cli("store", "status")
    assert status.returncode == 0, status.stderr
    assert "schema version: 1 (latest 1)" in status.stdout
    assert "matches" in status.stdout
