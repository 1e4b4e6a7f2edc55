"""Device ids bound to SuperNode keys: the device key roster and a real deployment.

* the roster file: keys in OpenSSH and PEM form give the same fingerprint; every malformed line
  is refused with the file, the line and the problem;
* a real SuperLink with ``--enable-supernode-auth`` and SuperNodes on 127.0.0.1, each node
  with its own key: a node whose key was never registered cannot connect at all; an impostor
  whose key *was* registered (registration proves a key, not which device it may speak for)
  claims device 0 *before* the honest node connects (so "the first claim stands" alone would
  hand it the device) and is refused and counted, never trains; the honest node, holding the
  key issued for device 0, is admitted and trains every round.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsim.errors import ScenarioError
from fedsim.flower.device import DeviceLedger
from fedsim.flower.identity import fingerprint, load_device_keys

from .harness import FlowerCluster, check_ran, read_run, running_cluster
from .test_deploy import dp_ftrl_scenario


def make_key(path: Path) -> str:
    """A SuperNode key pair: the private key (OpenSSH format) at ``path``, the public key at
    ``path.pub``; returns the public key line."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = public.decode("ascii") + f" {path.stem}"
    path.with_name(path.name + ".pub").write_text(line + "\n", encoding="ascii")
    return line


def write_roster(path: Path, keys: dict[int, str]) -> Path:
    path.write_text("partition-id,public-key\n" + "".join(f"{d},{k}\n" for d, k in keys.items()), encoding="utf-8")
    return path


def test_roster_reads_openssh_and_pem_keys(tmp_path: Path) -> None:
    line = make_key(tmp_path / "k0")
    key = serialization.load_ssh_public_key(" ".join(line.split()[:2]).encode())
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert fingerprint(line) == fingerprint(pem) == fingerprint(pem.decode())
    other = make_key(tmp_path / "k1")
    roster = load_device_keys(write_roster(tmp_path / "r.csv", {0: line, 1: other}), num_devices=2)
    assert roster == {0: fingerprint(pem), 1: fingerprint(other)}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("device,key\n0,x\n", "line 1: expected the header"),
        ("partition-id,public-key\nzero,KEY0\n", "line 2: partition-id 'zero' is not an integer"),
        ("partition-id,public-key\n5,KEY0\n", "line 2: partition-id 5 is outside [0, 2)"),
        ("partition-id,public-key\n0,KEY0\n0,KEY1\n", "line 3: partition-id 0 is listed twice"),
        ("partition-id,public-key\n0,KEY0\n1,KEY0\n", "line 3: device 1 has the same public key as device 0"),
        ("partition-id,public-key\n0,ssh-rsa AAAA\n", "line 2: public-key of device 0 is not an EC public key"),
        ("partition-id,public-key\n0,KEY0,extra\n", "line 2: expected 2 fields, got 3"),
        ("partition-id,public-key\n", "lists no device"),
    ],
)
def test_bad_rosters_name_file_line_and_problem(tmp_path: Path, content: str, message: str) -> None:
    content = content.replace("KEY0", make_key(tmp_path / "a")).replace("KEY1", make_key(tmp_path / "b"))
    path = tmp_path / "roster.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ScenarioError) as err:
        load_device_keys(path, num_devices=2)
    assert str(path) in str(err.value) and message in str(err.value)
    with pytest.raises(ScenarioError, match="file not found"):
        load_device_keys(tmp_path / "missing.csv", num_devices=2)


@pytest.fixture
def cluster(tmp_path: Path):
    # SuperNodes with their own keys, and SuperNode authentication, need TLS; and this deployment
    # runs its apps as Flower does by default (a fresh process per ServerApp and per message,
    # loaded from the installed app, not the warm executors the other deployment tests use)
    with running_cluster(tmp_path / "cluster", tls=True, supernode_auth=True, warm=False) as c:
        yield c


@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_an_impostor_without_the_device_key_is_refused_even_when_it_claims_first(cluster: FlowerCluster, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    roster = write_roster(tmp_path / "devices.csv", {0: make_key(keys / "device-0"), 1: make_key(keys / "device-1")})
    for device in (0, 1):  # the issuer registers the devices' keys with the SuperLink
        cluster.register_supernode(keys / f"device-{device}.pub")
    make_key(keys / "impostor")
    cluster.register_supernode(keys / "impostor.pub")
    make_key(keys / "stranger")  # never registered
    scenario_file = dp_ftrl_scenario(tmp_path / "flower-keys.toml", devices=2, per_round=2, rounds=3, k=3)
    out = tmp_path / "run"
    impostor_state = tmp_path / "impostor-state"
    # a stranger, whose key the SuperLink does not know, is turned away by the SuperLink itself
    stranger = cluster.start_supernode(1, name="stranger-1", private_key=keys / "stranger", **{"state-dir": str(tmp_path / "s")})
    # the impostor (registered key, not device 0's) connects first and claims device 0; device
    # 1's honest node is there too
    cluster.start_supernode(0, name="impostor-0", private_key=keys / "impostor", **{"state-dir": str(impostor_state)})
    cluster.start_supernode(1, private_key=keys / "device-1")
    name = cluster.start_run(
        {"scenario": str(scenario_file), "out-dir": str(out), "device-keys": str(roster), "min-nodes": 2,
         "checkin-timeout": 240.0, "round-timeout": 120.0}
    )
    cluster.start_supernode(0, private_key=keys / "device-0")  # the honest node of device 0, later
    proc = cluster.wait_run(name, timeout=400)
    check_ran(proc, cluster)
    assert (out / "summary.json").exists(), proc.stdout[-6000:]
    run = read_run(out)
    s = run["summary"]
    assert s["rounds"] == 3 and s["flower"]["devices"] == 2
    assert s["flower"]["unauthenticated_claim"] >= 1
    assert "its SuperNode key is not the one issued for it: claim refused" in proc.stdout
    assert [d["clients"] for d in run["diagnostics"]] == [2, 2, 2]  # both honest nodes trained throughout
    assert cluster.procs[stranger].wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in cluster.log(stranger)
    job = s["flower"]["job_id"]
    assert DeviceLedger(tmp_path / "s", 1, job).rounds() == []  # it never trained
    assert DeviceLedger(cluster.state_dir(0), 0, job).rounds() == [0, 1, 2]
    assert DeviceLedger(impostor_state, 0, job).rounds() == []
