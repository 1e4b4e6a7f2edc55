"""The bridge's roster in process, against a stand-in for the SuperLink's grid: in a DP run, a node's
check-in again after a failed or missing reply (a withheld event) is withheld as well, in its log
line and its count; in a run without DP it is logged. The same on a real SuperLink:
``tests/flower/test_deploy.py::test_killed_supernode_and_corrupt_replies``."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable

import pytest
from flwr.app import Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsim.flower.records import METRICS_KEY, ParamLayout
from fedsim.flower.strategy import FlowerGridExecutor
from fedsim.models import build_model


class _Grid:
    """What the roster asks of Flower's grid: the listed nodes, check-ins answered at once.

    ``nodes``: node id -> the device id it claims; a node in ``failing`` answers with an error.
    """

    def __init__(self, nodes: dict[int, int]) -> None:
        self.nodes = dict(nodes)
        self.failing: set[int] = set()
        self.asked: dict[str, int] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            ids.append(uuid.uuid4().hex)
            self.asked[ids[-1]] = message.metadata.dst_node_id
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        replies = []
        for msg_id in ids:
            node = self.asked.pop(msg_id)
            metadata = Metadata(
                run_id=1, message_id=uuid.uuid4().hex, src_node_id=node, dst_node_id=0, reply_to_message_id=msg_id,
                group_id="", created_at=time.time(), ttl=60.0, message_type=MessageType.QUERY,
            )
            if node in self.failing:
                replies.append(Message(metadata=metadata, error=Error(code=1, reason="node unavailable")))
            else:
                content = RecordDict({METRICS_KEY: MetricRecord({"device-id": self.nodes[node]})})
                replies.append(Message(metadata=metadata, content=content))
        return replies


@pytest.fixture
def executor(monkeypatch: pytest.MonkeyPatch) -> FlowerGridExecutor:
    # a ServerApp's identity, which Flower sets before it runs one (messages carry it)
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    layout = ParamLayout.of(build_model("logreg", num_features=4, num_classes=2, seed=0))
    return FlowerGridExecutor(
        layout=layout, num_devices=3, chunk_size=8, run_seed=0, limit=None, job_id="job", sections={}, min_nodes=3,
        checkin_timeout=5.0,
    )


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "flwr.fedsim"]


@pytest.mark.parametrize("private", [True, False], ids=["dp", "no-dp"])
def test_a_check_in_after_a_failed_reply_is_withheld_in_a_dp_run(
    executor: FlowerGridExecutor, caplog: pytest.LogCaptureFixture, private: bool
) -> None:
    caplog.set_level(logging.INFO, logger="flwr.fedsim")
    executor.private = private
    grid = _Grid({11: 0, 12: 1, 13: 2})
    executor.refresh_roster(grid, wait=True)
    assert executor.roster == {11: 0, 12: 1, 13: 2}
    assert sum("checked in as device" in line for line in _lines(caplog)) == 3

    # round 1: node 12's reply was an error (collect drops it); before round 2 it checks in again
    executor.next_round = 2
    executor.drop(12)
    assert executor.roster == {11: 0, 13: 2}
    assert executor.public_roster() == ({11: 0, 12: 1, 13: 2} if private else {11: 0, 13: 2})
    executor.refresh_roster(grid, wait=False)
    assert executor.roster == {11: 0, 12: 1, 13: 2}
    public = _lines(caplog)
    assert sum("checked in as device" in line for line in public) == (3 if private else 4)
    assert executor.events["checkins"] == 4  # exact
    withheld = executor.take_private_events()
    if private:
        assert executor.events["withheld_checkins"] == 1
        assert [(e["event"], e["device"], e["node"], e["round"]) for e in withheld] == [("checkin", 1, 12, 2)]
        assert withheld[0]["message"] == "fedsim: node 12 checked in as device 1"
    else:
        assert withheld == [] and "fedsim: node 12 checked in as device 1" in public


def test_a_withdrawn_node_keeps_its_public_place_until_it_leaves_the_grid(
    executor: FlowerGridExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    """In a DP run, what follows from a withheld failure alone is withheld, and the public record
    goes on as if the node were on the roster: its failed check-in again is private, its device id
    stays its own (another node's claim is refused, as it would be), it leaves when it leaves."""
    caplog.set_level(logging.INFO, logger="flwr.fedsim")
    executor.private = True
    grid = _Grid({11: 0, 12: 1, 13: 2})
    executor.refresh_roster(grid, wait=True)
    caplog.clear()

    executor.next_round = 4
    executor.drop(13)  # round 3: no reply from node 13
    grid.failing.add(13)  # its check-in again fails too
    grid.nodes[14] = 2  # and a new node claims its device
    executor.refresh_roster(grid, wait=False)
    assert executor.roster == {11: 0, 12: 1} and executor.public_roster() == {11: 0, 12: 1, 13: 2}
    public = _lines(caplog)
    assert public == ["fedsim: node 14 claimed device 2, which node 13 holds: claim refused (the first claim stands)"]
    assert [(e["event"], e["node"]) for e in executor.take_private_events()] == [("checkin_failed", 13)]
    assert executor.events["duplicate_claim"] == 1 and executor.events["withheld_duplicate_claim"] == 0

    # node 13 leaves the grid: public (availability), and node 14 gets device 2
    caplog.clear()
    del grid.nodes[13]
    executor.refresh_roster(grid, wait=False)
    assert _lines(caplog) == ["fedsim: node 13 (device 2) left", "fedsim: node 14 checked in as device 2"]
    assert executor.roster == executor.public_roster() == {11: 0, 12: 1, 14: 2}
    assert executor.take_private_events() == []
