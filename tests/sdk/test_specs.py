"""The two committed documents: valid for independent validators, and shaped
the way SDK generators and client developers need them."""

from __future__ import annotations

import os
import subprocess

import pytest
from jsonschema import Draft7Validator, FormatChecker
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_openapi

from conftest import ROOT, SDK_DIR

JSON = "application/json; charset=utf-8"
OPERATIONS = {
    "listRooms",
    "createRoom",
    "getRoom",
    "listMembers",
    "addMember",
    "removeMember",
    "listMessages",
    "sendMessage",
    "deleteMessage",
    "getPresence",
    "openDirectRoom",
}
ROOM_ID = "^[A-Za-z0-9_.:-]{1,128}$"
USER_ID = "^[A-Za-z0-9_.:@-]{1,128}$"
CLIENT_FRAMES = {"message", "typing", "ping", "refresh"}
SERVER_FRAMES = {
    "ready",
    "message",
    "ack",
    "message_deleted",
    "join",
    "leave",
    "typing",
    "error",
    "pong",
    "refreshed",
}
CLOSE_CODES = {1000, 1001, 1007, 1008, 1009, 1012, 1013, 4001, 4003, 4008, 4029}


def operations(openapi: dict):
    for path, item in openapi["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def resolve(document: dict, ref: str) -> dict:
    node = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


# --- OpenAPI -------------------------------------------------------------------


def test_openapi_is_valid_for_openapi_spec_validator(openapi):
    validate_openapi(openapi)


def test_every_operation_is_named_summarised_secured_and_typed(openapi):
    seen = set()
    for path, method, op in operations(openapi):
        where = f"{method.upper()} {path}"
        seen.add(op["operationId"])
        assert op.get("summary"), where
        assert op.get("tags"), where
        assert op["security"] == [{"BearerAuth": []}], where
        for status, response in op["responses"].items():
            assert response["description"], f"{where} {status}"
            for media, content in response.get("content", {}).items():
                assert media == JSON, f"{where} {status}"
                # Named schemas only: no InlineResponse200-style types.
                assert set(content["schema"]) == {"$ref"}, f"{where} {status}"
            if status.startswith(("4", "5")):
                assert response["content"][JSON]["schema"]["$ref"] == "#/components/schemas/Error", where
        for status in ("400", "401", "403", "404", "429", "503"):
            assert status in op["responses"], f"{where} lacks {status}"
        assert "RETRY-AFTER" in op["responses"]["429"]["headers"], where
        if "requestBody" in op:
            assert set(op["requestBody"]["content"][JSON]["schema"]) == {"$ref"}, where
    assert seen == OPERATIONS


def test_parameters_declare_their_limits_and_examples(openapi):
    for path, method, op in operations(openapi):
        for param in op.get("parameters", []):
            where = f"{method.upper()} {path} {param['name']}"
            schema = param["schema"]
            assert param.get("description"), where
            assert "example" in schema or "default" in schema, where
            if param["name"] == "room_id":
                assert (schema["pattern"], schema["minLength"], schema["maxLength"]) == (ROOM_ID, 1, 128), where
            elif param["name"] == "user_id":
                assert (schema["pattern"], schema["minLength"], schema["maxLength"]) == (USER_ID, 1, 128), where
            elif param["name"] in ("before_seq", "after_seq"):
                assert schema["type"] == "integer" and schema["minimum"] == 0, where
            elif param["name"] == "limit":
                assert (schema["minimum"], schema["maximum"], schema["default"]) == (1, 200, 50), where


def test_schemas_are_named_with_examples_real_enums_and_formats(openapi):
    schemas = openapi["components"]["schemas"]
    for name, schema in schemas.items():
        if schema["type"] == "object":
            assert schema.get("example"), f"{name} has no example"
            # The example is a valid instance of its own schema (OpenAPI 3.0
            # dialect: `nullable`).
            validator = OAS30Validator({**schema, "components": openapi["components"]}, format_checker=FormatChecker())
            errors = [e.message for e in validator.iter_errors(schema["example"])]
            assert not errors, f"{name}: {errors}"
    assert schemas["RoomKind"]["enum"] == ["global", "public", "private", "direct"]
    assert schemas["NewRoomKind"]["enum"] == ["public", "private"]
    assert schemas["Room"]["properties"]["kind"] == {"$ref": "#/components/schemas/RoomKind"}
    assert schemas["Error"]["properties"]["code"] == {"$ref": "#/components/schemas/ErrorCode"}
    for owner, field in (("Room", "created_at"), ("Message", "created_at")):
        assert schemas[owner]["properties"][field]["format"] == "date-time", owner
    assert schemas["Room"]["properties"]["owner_id"]["nullable"] is True
    assert "owner_id" in schemas["Room"]["required"]
    assert schemas["Room"]["properties"]["id"]["pattern"] == ROOM_ID
    assert schemas["User"]["properties"]["id"]["pattern"] == USER_ID
    assert openapi["components"]["securitySchemes"]["BearerAuth"] == {
        **openapi["components"]["securitySchemes"]["BearerAuth"],
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }


def test_message_bodies_have_no_length_limits_the_server_would_answer_generically(openapi):
    # Empty and over-long bodies must reach the service's own checks, which
    # answer invalid_message and message_too_long rather than bad_request.
    body = openapi["components"]["schemas"]["SendMessage"]["properties"]["body"]
    assert not {"minLength", "maxLength", "pattern"} & set(body)


# --- AsyncAPI ------------------------------------------------------------------


def payload_schema(asyncapi: dict, message: dict) -> dict:
    return resolve(asyncapi, message["payload"]["$ref"])


def frame_types(asyncapi: dict, action: str) -> dict[str, dict]:
    """`type` value → message object, for the operations with this action."""
    found = {}
    for op in asyncapi["operations"].values():
        if op["action"] != action:
            continue
        for ref in op["messages"]:
            message = resolve(asyncapi, resolve(asyncapi, ref["$ref"])["$ref"])
            kind = payload_schema(asyncapi, message)["properties"]["type"]["const"]
            found[kind] = message
    return found


def test_asyncapi_has_the_required_top_level_fields(asyncapi, openapi):
    assert asyncapi["asyncapi"] == "3.0.0"
    assert asyncapi["info"]["title"]
    assert asyncapi["info"]["version"] == openapi["info"]["version"]
    assert asyncapi["defaultContentType"] == "application/json"
    channel = asyncapi["channels"]["room"]
    assert channel["address"] == "/ws/chat/{room_id}"
    assert set(channel["parameters"]) == {"room_id"}
    assert set(channel["bindings"]["ws"]["query"]["properties"]) == {"token", "since"}
    assert set(asyncapi["components"]["securitySchemes"]) == {"bearerHeader", "bearerSubprotocol", "tokenQuery"}


def test_asyncapi_describes_every_frame_of_the_contract(asyncapi):
    assert set(frame_types(asyncapi, "receive")) == CLIENT_FRAMES
    assert set(frame_types(asyncapi, "send")) == SERVER_FRAMES


def test_asyncapi_codes_match_the_contract_and_the_rest_api(asyncapi, openapi):
    channel = asyncapi["channels"]["room"]
    assert {entry["code"] for entry in channel["x-close-codes"]} == CLOSE_CODES
    assert {entry["status"] for entry in channel["x-handshake-errors"]} == {400, 401, 403, 404, 429, 503}
    rest_codes = openapi["components"]["schemas"]["ErrorCode"]["enum"]
    assert asyncapi["components"]["schemas"]["ErrorCode"]["enum"] == rest_codes
    for entry in channel["x-handshake-errors"]:
        assert entry["code"] in rest_codes


def test_asyncapi_examples_are_valid_frames(asyncapi):
    for name, message in asyncapi["components"]["messages"].items():
        assert message.get("examples"), name
        validator = Draft7Validator(
            {"$ref": message["payload"]["$ref"], "components": asyncapi["components"]},
            format_checker=FormatChecker(),
        )
        for example in message["examples"]:
            errors = [e.message for e in validator.iter_errors(example["payload"])]
            assert not errors, f"{name}: {errors}"


def test_asyncapi_is_valid_for_the_asyncapi_parser():
    node_dir = os.environ.get("CHAT_SDK_NODE_DIR")
    if not node_dir:
        pytest.skip("CHAT_SDK_NODE_DIR unset: run tests/sdk/run.sh, which installs @asyncapi/parser")
    result = subprocess.run(
        ["node", str(SDK_DIR / "validate_asyncapi.cjs"), node_dir, str(ROOT / "asyncapi.yaml")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
