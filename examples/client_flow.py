#!/usr/bin/env python3
"""The API's main flow through a client generated from its OpenAPI document.

    client_flow.py BASE_URL

`scripts/openapi-check` generates the client (openapi-python-client, package
`chat_system_client`) from docs/openapi.json and runs this against a running server:
application -> chat -> messages -> list -> search -> updates, each answer parsed into
the generated models. With ADMIN_API_KEY set (the server's), the application list too.
Exits non-zero on the first answer that is not the documented one.
"""

import os
import sys
import time
import uuid

from chat_system_client import AuthenticatedClient, Client
from chat_system_client.api.applications import (
    create_application,
    get_application,
    list_applications,
    replace_application,
    update_application,
)
from chat_system_client.api.chats import create_chat, get_chat, list_chats, update_chat
from chat_system_client.api.messages import (
    create_message,
    get_message,
    list_messages,
    replace_message,
    search_messages,
    update_message,
)
from chat_system_client.api.operations import get_health, get_readiness
from chat_system_client.models import (
    Application,
    Chat,
    CreateApplication,
    CreateChat,
    CreateMessage,
    Message,
    Problem,
    UpdateApplication,
    UpdateChat,
    UpdateMessage,
)


def expect(value, kind, what):
    """The parsed answer must be the documented model (not a Problem, not None)."""
    if not isinstance(value, kind):
        sys.exit(f"client flow: {what}: expected {kind.__name__}, got {value!r}")
    print(f"client flow: {what}: ok")
    return value


def main():
    base = sys.argv[1]
    client = Client(base_url=base, raise_on_unexpected_status=True, timeout=20.0)

    get_health.sync(client=client)
    ready = get_readiness.sync_detailed(client=client)
    if ready.status_code != 200:
        sys.exit(f"client flow: the server is not ready: {ready.content!r}")

    app = expect(
        create_application.sync(client=client, body=CreateApplication(name="client flow")),
        Application, "create an application")
    token = app.token
    expect(get_application.sync(token, client=client), Application, "get it")
    renamed = expect(
        update_application.sync(token, client=client, body=UpdateApplication(name="renamed")),
        Application, "rename it (PATCH)")
    assert renamed.name == "renamed", renamed
    expect(replace_application.sync(token, client=client, body=UpdateApplication(name="client flow")),
           Application, "rename it back (PUT)")

    key = str(uuid.uuid4())
    chat = expect(create_chat.sync(token, client=client, body=CreateChat(title="general"),
                                   idempotency_key=key), Chat, "create a chat")
    again = expect(create_chat.sync(token, client=client, body=CreateChat(title="general"),
                                    idempotency_key=key), Chat, "retry it with the same Idempotency-Key")
    assert again.number == chat.number, (chat, again)
    untitled = expect(create_chat.sync(token, client=client), Chat, "create a chat with no body")
    assert untitled.title is None, untitled
    titled = expect(update_chat.sync(token, chat.number, client=client, body=UpdateChat(title="renamed")),
                    Chat, "retitle the chat")
    assert titled.title == "renamed", titled
    expect(get_chat.sync(token, chat.number, client=client), Chat, "get the chat")
    chats = list_chats.sync(token, client=client, limit=10)
    assert isinstance(chats, list) and all(isinstance(c, Chat) for c in chats) and len(chats) == 2, chats
    print("client flow: list the chats: ok")

    first = expect(create_message.sync(token, chat.number, client=client,
                                       body=CreateMessage(body="Hello generated world")),
                   Message, "post a message")
    expect(create_message.sync(token, chat.number, client=client, body=CreateMessage(body="second")),
           Message, "post another")
    expect(get_message.sync(token, chat.number, first.number, client=client), Message, "read it back")

    deadline = time.monotonic() + 30
    while True:
        page = list_messages.sync(token, chat.number, client=client, limit=50)
        assert isinstance(page, list) and all(isinstance(m, Message) for m in page), page
        if len(page) == 2:
            break
        if time.monotonic() > deadline:
            sys.exit(f"client flow: the messages were not listed within 30 s: {page!r}")
        time.sleep(0.1)
    print("client flow: list the messages: ok")

    deadline = time.monotonic() + 30
    while True:
        found = search_messages.sync(token, chat.number, client=client, q="GENERATED wor")
        if isinstance(found, list) and [m.number for m in found] == [first.number]:
            break
        if time.monotonic() > deadline:
            sys.exit(f"client flow: search did not find the message within 30 s: {found!r}")
        time.sleep(0.1)
    print("client flow: search: ok")

    edited = expect(update_message.sync(token, chat.number, first.number, client=client,
                                        body=UpdateMessage(body="Hello, edited")),
                    Message, "edit the message (PATCH)")
    assert edited.body == "Hello, edited", edited
    expect(replace_message.sync(token, chat.number, first.number, client=client,
                                body=UpdateMessage(body="Hello, replaced")),
           Message, "edit it again (PUT)")

    missing = get_message.sync(token, chat.number, 999, client=client)
    expect(missing, Problem, "a missing message is a problem document")
    assert missing.status == 404, missing

    admin_key = os.environ.get("ADMIN_API_KEY")
    if admin_key:
        admin = AuthenticatedClient(base_url=base, token=admin_key, raise_on_unexpected_status=True)
        apps = list_applications.sync(client=admin, limit=1000)
        assert isinstance(apps, list) and all(isinstance(a, Application) for a in apps), apps
        print("client flow: list the applications (admin key): ok")
    print("client flow: passed")


if __name__ == "__main__":
    main()
