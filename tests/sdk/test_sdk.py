"""A client generated from openapi.yaml (openapi-python-client) against the
real server: every result is read through the generated typed models, so a
spec that drifts from the service fails here."""

from __future__ import annotations

import datetime
import time
import uuid
from http import HTTPStatus

import pytest
from websockets.sync.client import connect


@pytest.fixture(scope="module")
def api(sdk):
    """The generated package's modules, by the names the spec gives them."""
    from importlib import import_module

    class Api:
        models = import_module(f"{sdk.__name__}.models")
        types = import_module(f"{sdk.__name__}.types")

        def op(self, group: str, name: str):
            return import_module(f"{sdk.__name__}.api.{group}.{name}")

    return Api()


@pytest.fixture(scope="module")
def clients(sdk, server):
    def client(sub: str, name: str, roles: tuple[str, ...] = ()):
        return sdk.AuthenticatedClient(base_url=server.api_url, token=server.token(sub, name, roles), timeout=10)

    return {
        "alice": client("alice", "Alice"),
        "bob": client("bob", "Bob"),
        "carol": client("carol", "Carol"),
        "anonymous": sdk.AuthenticatedClient(base_url=server.api_url, token="not-a-jwt", timeout=10),
    }


def expect(response, status: HTTPStatus, model):
    assert response.status_code == status, response.content
    assert isinstance(response.parsed, model), (type(response.parsed), response.content)
    return response.parsed


def test_a_private_room_lifecycle_through_the_generated_client(api, clients, server):
    m = api.models
    alice, bob, carol = clients["alice"], clients["bob"], clients["carol"]
    create_room = api.op("rooms", "create_room")
    get_room = api.op("rooms", "get_room")
    add_member = api.op("rooms", "add_member")
    remove_member = api.op("rooms", "remove_member")
    list_members = api.op("rooms", "list_members")
    list_rooms = api.op("rooms", "list_rooms")
    send = api.op("messages", "send_message")
    history = api.op("messages", "list_messages")
    delete = api.op("messages", "delete_message")
    presence = api.op("presence", "get_presence")
    room_id = f"sdk-{uuid.uuid4().hex[:12]}"

    # Create a private room: alice owns it.
    room = expect(
        create_room.sync_detailed(
            client=alice, body=m.CreateRoom(id=room_id, name="SDK room", kind=m.NewRoomKind.PRIVATE)
        ),
        HTTPStatus.CREATED,
        m.Room,
    )
    assert (room.id, room.kind, room.name, room.owner_id) == (room_id, m.RoomKind.PRIVATE, "SDK room", "alice")
    assert isinstance(room.created_at, datetime.datetime) and room.created_at.tzinfo is not None
    taken = expect(
        create_room.sync_detailed(client=alice, body=m.CreateRoom(id=room_id, name="again", kind=m.NewRoomKind.PUBLIC)),
        HTTPStatus.CONFLICT,
        m.Error,
    )
    assert taken.code == m.ErrorCode.CONFLICT

    # Bob is not a member yet; then he is.
    denied = expect(get_room.sync_detailed(room_id, client=bob), HTTPStatus.FORBIDDEN, m.Error)
    assert denied.code == m.ErrorCode.FORBIDDEN and denied.message
    assert add_member.sync_detailed(room_id, "bob", client=alice).status_code == HTTPStatus.NO_CONTENT
    assert add_member.sync_detailed(room_id, "carol", client=alice).status_code == HTTPStatus.NO_CONTENT
    not_owner = expect(remove_member.sync_detailed(room_id, "carol", client=bob), HTTPStatus.FORBIDDEN, m.Error)
    assert not_owner.code == m.ErrorCode.FORBIDDEN
    assert remove_member.sync_detailed(room_id, "carol", client=alice).status_code == HTTPStatus.NO_CONTENT
    assert expect(get_room.sync_detailed(room_id, client=bob), HTTPStatus.OK, m.Room).id == room_id
    assert (
        expect(get_room.sync_detailed(room_id, client=carol), HTTPStatus.FORBIDDEN, m.Error).code
        == m.ErrorCode.FORBIDDEN
    )
    members = expect(list_members.sync_detailed(room_id, client=bob), HTTPStatus.OK, m.MemberList)
    by_id = {member.id: member for member in members.members}
    assert set(by_id) == {"alice", "bob"}
    assert by_id["alice"].name == "Alice"
    # The service has never seen bob: his name is absent, not null.
    assert isinstance(by_id["bob"].name, api.types.Unset)
    visible = expect(list_rooms.sync_detailed(client=bob), HTTPStatus.OK, m.RoomList)
    assert {"global", room_id} <= {r.id for r in visible.rooms}
    assert next(r for r in visible.rooms if r.id == "global").owner_id is None

    # Post five messages over REST; a repeated client_id answers the original.
    sent = []
    for i in range(1, 6):
        message = expect(
            send.sync_detailed(room_id, client=alice, body=m.SendMessage(body=f"  m{i}\r\nline 2 ", client_id=f"c{i}")),
            HTTPStatus.CREATED,
            m.Message,
        )
        assert (message.seq, message.body, message.client_id, message.room_id) == (i, f"m{i}\nline 2", f"c{i}", room_id)
        assert message.user.id == "alice" and message.user.name == "Alice"
        assert isinstance(message.deleted, api.types.Unset)
        sent.append(message)
    repeat = expect(
        send.sync_detailed(room_id, client=alice, body=m.SendMessage(body="other text", client_id="c2")),
        HTTPStatus.OK,
        m.Message,
    )
    assert (repeat.id, repeat.seq, repeat.body) == (sent[1].id, 2, sent[1].body)
    for body, code in (("   ", m.ErrorCode.INVALID_MESSAGE), ("x" * 2001, m.ErrorCode.MESSAGE_TOO_LONG)):
        error = expect(
            send.sync_detailed(room_id, client=alice, body=m.SendMessage(body=body)), HTTPStatus.BAD_REQUEST, m.Error
        )
        assert error.code == code

    # History pages, newest first then oldest first, with has_more.
    def page(**cursor) -> tuple[list[int], bool]:
        result = expect(history.sync_detailed(room_id, client=bob, **cursor), HTTPStatus.OK, m.MessagePage)
        return [message.seq for message in result.messages], result.has_more

    assert page(limit=2) == ([5, 4], True)
    assert page(limit=2, before_seq=4) == ([3, 2], True)
    assert page(limit=2, before_seq=2) == ([1], False)
    assert page(limit=3, after_seq=0) == ([1, 2, 3], True)
    assert page(limit=3, after_seq=3) == ([4, 5], False)
    assert page(after_seq=1, before_seq=4) == ([2, 3], False)
    assert page() == ([5, 4, 3, 2, 1], False)
    bad_limit = expect(history.sync_detailed(room_id, client=bob, limit=201), HTTPStatus.BAD_REQUEST, m.Error)
    assert bad_limit.code == m.ErrorCode.BAD_REQUEST

    # Delete one: only its author (or a moderator); it becomes a tombstone.
    target = sent[2]
    forbidden = expect(delete.sync_detailed(room_id, target.id, client=bob), HTTPStatus.FORBIDDEN, m.Error)
    assert forbidden.code == m.ErrorCode.FORBIDDEN
    assert delete.sync_detailed(room_id, target.id, client=alice).status_code == HTTPStatus.NO_CONTENT
    assert delete.sync_detailed(room_id, target.id, client=alice).status_code == HTTPStatus.NO_CONTENT
    missing = expect(delete.sync_detailed(room_id, "no-such-id", client=alice), HTTPStatus.NOT_FOUND, m.Error)
    assert missing.code == m.ErrorCode.NOT_FOUND
    tombstone = expect(
        history.sync_detailed(room_id, client=bob, after_seq=2, limit=1), HTTPStatus.OK, m.MessagePage
    ).messages[0]
    assert (tombstone.id, tombstone.seq, tombstone.deleted, tombstone.body) == (target.id, 3, True, "")

    # Presence: bob connects over the WebSocket, then leaves.
    assert expect(presence.sync_detailed(room_id, client=alice), HTTPStatus.OK, m.UserList).users == []
    with connect(f"{server.ws_url}/ws/chat/{room_id}?token={server.token('bob', 'Bob')}", open_timeout=10) as ws:
        ws.recv(timeout=10)  # ready
        users = expect(presence.sync_detailed(room_id, client=alice), HTTPStatus.OK, m.UserList).users
        assert [(u.id, u.name) for u in users] == [("bob", "Bob")]
    deadline = time.monotonic() + 10
    while expect(presence.sync_detailed(room_id, client=alice), HTTPStatus.OK, m.UserList).users:
        assert time.monotonic() < deadline, "bob still present after closing"
        time.sleep(0.05)


def test_direct_rooms_and_errors_through_the_generated_client(api, clients):
    m = api.models
    open_dm = api.op("rooms", "open_direct_room")
    get_room = api.op("rooms", "get_room")
    list_rooms = api.op("rooms", "list_rooms")
    alice, bob = clients["alice"], clients["bob"]

    first = open_dm.sync_detailed("bob", client=alice)
    room = expect(first, HTTPStatus.CREATED, m.Room)
    assert (room.id, room.kind, room.owner_id) == ("dm:alice:bob", m.RoomKind.DIRECT, None)
    again = expect(open_dm.sync_detailed("alice", client=bob), HTTPStatus.OK, m.Room)
    assert again.id == room.id
    assert "dm:alice:bob" in {
        r.id for r in expect(list_rooms.sync_detailed(client=bob), HTTPStatus.OK, m.RoomList).rooms
    }
    assert (
        expect(open_dm.sync_detailed("alice", client=alice), HTTPStatus.BAD_REQUEST, m.Error).code
        == m.ErrorCode.BAD_REQUEST
    )

    malformed = expect(get_room.sync_detailed("not a room", client=alice), HTTPStatus.BAD_REQUEST, m.Error)
    assert malformed.code == m.ErrorCode.BAD_REQUEST
    missing = expect(get_room.sync_detailed("nowhere", client=alice), HTTPStatus.NOT_FOUND, m.Error)
    assert missing.code == m.ErrorCode.NOT_FOUND
    anonymous = expect(get_room.sync_detailed("global", client=clients["anonymous"]), HTTPStatus.UNAUTHORIZED, m.Error)
    assert anonymous.code == m.ErrorCode.UNAUTHORIZED
