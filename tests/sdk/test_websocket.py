"""asyncapi.yaml against the running server: every frame the service sends
during a scripted session must be one of the document's server messages and
valid for its payload schema, and every frame sent must be valid for the
document's client messages. Handshake refusals must be the listed ones."""

from __future__ import annotations

import json
from contextlib import ExitStack

import httpx
import pytest
from jsonschema import Draft7Validator, FormatChecker
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from test_specs import frame_types


class Frames:
    """Validators for one direction, by frame `type`."""

    def __init__(self, asyncapi: dict, action: str):
        self.validators = {
            kind: Draft7Validator(
                {"$ref": message["payload"]["$ref"], "components": asyncapi["components"]},
                format_checker=FormatChecker(),
            )
            for kind, message in frame_types(asyncapi, action).items()
        }

    def check(self, frame: dict) -> dict:
        kind = frame.get("type")
        assert kind in self.validators, f"frame type {kind!r} is not in asyncapi.yaml: {frame}"
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in self.validators[kind].iter_errors(frame)]
        assert not errors, f"{kind} frame does not match asyncapi.yaml: {errors}\n{frame}"
        return frame


class Peer:
    """A WebSocket client that checks both directions against the document."""

    def __init__(self, ws: ClientConnection, incoming: Frames, outgoing: Frames):
        self.ws, self.incoming, self.outgoing = ws, incoming, outgoing

    def send(self, frame: dict) -> None:
        self.ws.send(json.dumps(self.outgoing.check(frame)))

    def send_raw(self, text: str) -> None:
        self.ws.send(text)

    def recv(self) -> dict:
        return self.incoming.check(json.loads(self.ws.recv(timeout=10)))

    def next_of(self, kind: str) -> dict:
        for _ in range(50):
            frame = self.recv()
            if frame["type"] == kind:
                return frame
        raise AssertionError(f"no {kind} frame")


@pytest.fixture(scope="module")
def peers(asyncapi, server):
    incoming, outgoing = Frames(asyncapi, "send"), Frames(asyncapi, "receive")
    opened = ExitStack()

    def open_peer(room: str, token: str, how: str, query: str = "") -> Peer:
        url = f"{server.ws_url}/ws/chat/{room}"
        options: dict = {"open_timeout": 10}
        if how == "header":
            options["additional_headers"] = {"Authorization": f"Bearer {token}"}
        elif how == "subprotocol":
            options["subprotocols"] = ["chat.v1", f"bearer.{token}"]
        else:
            query = f"token={token}&{query}"
        ws = opened.enter_context(connect(f"{url}?{query}" if query else url, **options))
        if how == "subprotocol":
            assert ws.subprotocol == "chat.v1"
        return Peer(ws, incoming, outgoing)

    with opened:
        yield open_peer


def test_a_session_speaks_only_frames_of_the_asyncapi_document(peers, server):
    alice_token = server.token("alice", "Alice")
    alice = peers("global", alice_token, "header")
    ready = alice.recv()
    assert ready["type"] == "ready" and "resumed" not in ready
    assert ready["room"] == {"id": "global", "kind": "global", "name": "Global"}

    bob = peers("global", server.token("bob", "Bob"), "subprotocol")
    assert bob.recv()["type"] == "ready"
    assert alice.next_of("join")["user"] == {"id": "bob", "name": "Bob"}
    carol = peers("global", server.token("carol", "Carol"), "query")
    assert carol.recv()["type"] == "ready"
    alice.next_of("join")
    bob.next_of("join")

    # A send: ack to the sender, message to everyone; a retry gets the same ack.
    alice.send({"type": "message", "body": "gl hf", "client_id": "k1"})
    frames = [alice.recv(), alice.recv()]
    ack = next(f for f in frames if f["type"] == "ack")
    message = next(f for f in frames if f["type"] == "message")
    assert (ack["client_id"], ack["id"], ack["seq"]) == ("k1", message["id"], message["seq"])
    assert bob.next_of("message")["id"] == message["id"]
    alice.send({"type": "message", "body": "gl hf", "client_id": "k1"})
    assert alice.next_of("ack") == ack

    # Typing, ping, refresh.
    bob.send({"type": "typing"})
    assert alice.next_of("typing")["user"]["id"] == "bob"
    alice.send({"type": "ping"})
    assert alice.next_of("pong") == {"type": "pong"}
    alice.send({"type": "refresh", "token": server.token("alice", "Alice", ttl="2h")})
    assert "expires_at" in alice.next_of("refreshed")
    alice.send({"type": "refresh", "token": server.token("bob", "Bob")})
    assert alice.next_of("error")["code"] == "forbidden"

    # Refused frames: errors, the connection stays open.
    alice.send_raw("not json")
    assert alice.next_of("error")["code"] == "bad_request"
    alice.send({"type": "message", "body": "   ", "client_id": "k2"})
    invalid = alice.next_of("error")
    assert (invalid["code"], invalid["client_id"]) == ("invalid_message", "k2")
    alice.send({"type": "message", "body": "x" * 2001})
    assert alice.next_of("error")["code"] == "message_too_long"
    # Out of the document's bounds on purpose: the error echoes the key.
    alice.send_raw(json.dumps({"type": "message", "body": "x", "client_id": ""}))
    out_of_bounds = alice.next_of("error")
    assert (out_of_bounds["code"], out_of_bounds["client_id"]) == ("bad_request", "")

    # A deletion through REST reaches every connection.
    response = httpx.delete(
        f"{server.api_url}/rooms/global/messages/{message['id']}",
        headers={"Authorization": f"Bearer {alice_token}"},
        timeout=10,
    )
    assert response.status_code == 204
    deleted = bob.next_of("message_deleted")
    assert (deleted["id"], deleted["seq"]) == (message["id"], message["seq"])

    # Resume: the deleted message is replayed as message_deleted.
    again = peers("global", server.token("dave", "Dave"), "query", query="since=0")
    resumed = again.recv()
    assert (resumed["type"], resumed["resumed"]) == ("ready", True)
    assert again.recv() == {"type": "message_deleted", "room_id": "global", "id": message["id"], "seq": message["seq"]}

    # Leaving.
    carol.ws.close()
    assert alice.next_of("leave")["user"]["id"] == "carol"


@pytest.mark.parametrize(
    ("room", "query", "status"),
    [
        ("bad%20room", "", 400),
        ("global", "since=-1", 400),
        ("global", "", 401),
        ("nowhere", "", 404),
        ("dm:x:y", "", 403),
    ],
)
def test_handshake_refusals_are_the_documented_ones(asyncapi, server, room, query, status):
    listed = {entry["status"]: entry["code"] for entry in asyncapi["channels"]["room"]["x-handshake-errors"]}
    if status != 401:
        query = f"token={server.token('alice')}&{query}"
    with pytest.raises(InvalidStatus) as refused, connect(f"{server.ws_url}/ws/chat/{room}?{query}", open_timeout=10):
        pass
    response = refused.value.response
    assert response.status_code == status
    assert json.loads(response.body)["code"] == listed[status]
