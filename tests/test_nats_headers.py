"""NATS headers read by our parser give what nats-py's own (the e-mail parser) gives: on regular
messages and on the status messages pull consumers get when a poll expires."""

from __future__ import annotations

from email.parser import BytesParser as EmailParser

import nats.aio.client as nats_client
import pytest

from shared.bus import NatsHeaders, StatusHeaderParser

BLOCKS = [
    b"Nats-Msg-Id: 3f1c\r\ncontent-type: application/json\r\ncorrelation_id: 3f1c\r\n"
    b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n",
    b"Nats-Pending-Messages: 1\r\nNats-Pending-Bytes: 0\r\n\r\n",
    b"Nats-Last-Consumer: 1016\r\nNats-Last-Stream: 1024\r\n\r\n",
    b"Pp-Dlq-Reason: not JSON: Expecting value: line 1 column 1 (char 0)\r\n\r\n",
    b"X-Spaced:   padded value  \r\n\r\n",
]


@pytest.mark.parametrize("block", BLOCKS)
def test_the_same_headers_as_the_email_parser(block: bytes) -> None:
    expected = {k.strip(): v.strip() for k, v in EmailParser().parsebytes(block).items()}
    assert NatsHeaders(block).headers == expected
    assert StatusHeaderParser().parsebytes(block) == expected


async def test_a_clients_status_messages_are_read_by_it() -> None:
    client = nats_client.Client()
    assert isinstance(client._hdr_parser, StatusHeaderParser)
    raw = (
        b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 1\r\nNats-Pending-Bytes: 0\r\n\r\n"
    )
    headers = await client._process_headers(raw)
    assert headers == {
        "Status": "408",
        "Description": "Request Timeout",
        "Nats-Pending-Messages": "1",
        "Nats-Pending-Bytes": "0",
    }


async def test_every_message_is_read_by_our_parser_and_keys_with_white_space_are_dropped() -> None:
    """Not the e-mail parser, and not nats-py's `fast_parse` path (it scans every key for white
    space): what nats-py kept from a regular message's headers is what it keeps now."""
    assert nats_client.parse_email is None  # type: ignore[attr-defined]
    client = nats_client.Client()
    raw = b"NATS/1.0\r\nNats-Msg-Id: 3f1c\r\nBad Key: x\r\n  padded :  v \r\nEmpty:\r\n\r\n"
    assert await client._process_headers(raw) == {"Nats-Msg-Id": "3f1c", "padded": "v", "Empty": ""}
