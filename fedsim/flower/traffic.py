"""What a Flower run's server exchanges with its devices: messages and their serialised bytes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message
from flwr.common.serde import recorddict_to_proto


def content_bytes(message: Message) -> int:
    """The serialised size of a message's content (its ``RecordDict`` as Flower sends it), in bytes."""
    if message.has_error():
        return 0
    return int(recorddict_to_proto(message.content).ByteSize())


@dataclass
class Traffic:
    """Counts of the server's ``train`` traffic: messages and content bytes each way.

    ``device_rounds`` counts a device once per round it was sent work, so
    ``(bytes_sent + bytes_received) / device_rounds`` is a device's traffic per round. The
    counts are this ServerApp's: a resumed job counts from where it picked up.
    """

    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    device_rounds: int = 0

    def sent(self, messages: Iterable[Message]) -> None:
        """Count messages the server sends."""
        for m in messages:
            self.messages_sent += 1
            self.bytes_sent += content_bytes(m)

    def received(self, messages: Iterable[Message]) -> None:
        """Count replies the server receives."""
        for m in messages:
            self.messages_received += 1
            self.bytes_received += content_bytes(m)

    def to_dict(self) -> dict[str, float | int]:
        """The counts, and the bytes per device and round (``summary.json["flower"]["traffic"]``)."""
        per = (self.bytes_sent + self.bytes_received) / self.device_rounds if self.device_rounds else 0.0
        return {
            "messages_sent": self.messages_sent,
            "messages_received": self.messages_received,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "device_rounds": self.device_rounds,
            "bytes_per_device_round": round(per, 1),
        }
