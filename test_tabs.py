from gevent import monkey; monkey.patch_all()  # noqa: E702 — before anything imports socket (see conftest.py)

# Two tabs agree (issue 23, item 9): a tab whose conversation got new turns from another tab is told so
# when it sends, keeps its words and is offered a reload; it never forks the conversation unseen. Edit,
# Regenerate and ‹ › still branch on purpose. WebTest clients over chat.app and the fake upstream.

import re  # noqa: E402

import chat  # noqa: E402
from testkit import (  # noqa: E402
    HX, alerts, answer, db_rows, elements, plain_app, read_events, wait_until)


def messages():
    """(id, parent_id, role, content) of every stored message, oldest first."""
    return db_rows("SELECT id, parent_id, role, content FROM messages ORDER BY id")


def shown_parent(fragment):
    """The composer's parent (the leaf the page shows) in a page or fragment."""
    return re.search(r'id="parent" value="(\d*)"', fragment).group(1)


def answered(client, prompt, conversation=None, **fields):
    """Send a prompt as the page does and read its answer to the end; returns (conversation id, parent shown)."""
    response = client.post("/streaming", {"prompt": prompt, **({"conversation": conversation} if conversation else {}),
                                          **fields}, headers=HX)
    stream_id = re.search(r'sse-connect="/events\?stream=([\w-]+)"', response.text).group(1)
    read_events(client, stream_id)
    return conversation or response.headers["HX-Push-Url"].removeprefix("/c/"), shown_parent(response.text)


def all_finished():
    """True when no answer is being written."""
    return all(s.finished for s in chat.streams.by_id.values())


def test_a_tab_that_is_behind_is_refused_with_its_words_kept_and_a_reload(client, upstream):
    """Tab 2 adds a turn; tab 1, still showing the answer before it, gets 409, a sentence and a Reload link."""
    upstream.serve(answer("A1"))
    conversation, tab_one = answered(client, "Q1")
    upstream.serve(answer("A2"))
    answered(client, "Q2 from tab two", conversation, parent=tab_one)
    stored, asked = messages(), len(upstream.requests)

    response = client.post("/streaming", {"prompt": "Q3 from tab one", "conversation": conversation,
                                          "parent": tab_one}, headers=HX, status=409)

    assert alerts(response.text) and chat.BEHIND in alerts(response.text)[0]
    assert [a.attrs["href"] for a in elements(response.text, "a")] == [f"/c/{conversation}"]
    assert messages() == stored and len(upstream.requests) == asked  # nothing stored, nothing asked
    page = client.get(f"/c/{conversation}").text  # the reload: tab two's turn, and the parent follows it
    assert "Q2 from tab two" in page and shown_parent(page) == str(stored[-1][0])
    upstream.serve(answer("A3"))
    answered(client, "Q3 from tab one", conversation, parent=shown_parent(page))
    assert [r[3] for r in messages()][-4:] == ["Q2 from tab two", "A2", "Q3 from tab one", "A3"]
    assert len({r[1] for r in messages()}) == len(messages())  # one line: no message has two children


def test_without_javascript_a_tab_that_is_behind_gets_the_page_again_with_its_draft(upstream):
    """A plain form: 409 and the page as it is now (with tab two's turn), the words in the box, an alert."""
    plain = plain_app()
    upstream.serve(answer("A1"))
    conversation = plain.post("/streaming", {"prompt": "Q1"}, status=303).headers["Location"].rsplit("/", 1)[1]
    wait_until(all_finished, what="the first answer")
    tab_one = shown_parent(plain.get(f"/c/{conversation}").text)
    upstream.serve(answer("A2"))
    plain.post("/streaming", {"prompt": "Q2 from tab two", "conversation": conversation, "parent": tab_one},
               status=303)
    wait_until(all_finished, what="the second answer")

    page = plain.post("/streaming", {"prompt": "Q3 from tab one", "conversation": conversation,
                                     "parent": tab_one}, status=409).text

    assert chat.BEHIND in alerts(page)
    assert [t.text for t in elements(page, "textarea", id="prompt")] == ["Q3 from tab one"]
    assert "Q2 from tab two" in page and shown_parent(page) == str(messages()[-1][0])
    upstream.serve(answer("A3"))
    plain.post("/streaming", {"prompt": "Q3 from tab one", "conversation": conversation,
                              "parent": shown_parent(page)}, status=303)
    wait_until(lambda: messages()[-1][3] == "A3" and all_finished(), what="the third answer")


def test_edit_regenerate_and_switching_versions_still_branch_on_purpose(client, upstream):
    """Each sets the leaf the page shows, and a send from there goes through; a tab on another branch's
    leaf sends too (that forks nothing)."""
    upstream.serve(answer("First answer"))
    conversation, _ = answered(client, "Q")
    upstream.serve(answer("Second answer"))
    fragment = client.post(f"/c/{conversation}/regenerate", headers=HX).text
    wait_until(all_finished, what="the regenerated answer")
    second = shown_parent(fragment)
    upstream.serve(answer("After the second"))
    answered(client, "more", conversation, parent=second)

    first = next(r[0] for r in messages() if r[3] == "First answer")
    fragment = client.post(f"/c/{conversation}/branch", {"to": first}, headers=HX).text
    assert shown_parent(fragment) == str(first)
    upstream.serve(answer("After the first"))
    answered(client, "again", conversation, parent=str(first))
    assert [m["content"] for m in upstream.last.json["messages"]] == ["Q", "First answer", "again"]

    question = next(r[0] for r in messages() if r[3] == "again")
    upstream.serve(answer("Edited answer"))
    fragment = client.post(f"/c/{conversation}/edit", {"message": question, "prompt": "again, edited"},
                           headers=HX).text
    wait_until(all_finished, what="the edited answer")
    upstream.serve(answer("On the edit"))
    answered(client, "and on", conversation, parent=shown_parent(fragment))
    assert [m["content"] for m in upstream.last.json["messages"]][-3:] == ["again, edited", "Edited answer", "and on"]

    stale_leaf = next(r[0] for r in messages() if r[3] == "After the second")  # a leaf of another branch
    upstream.serve(answer("Still fine"))
    answered(client, "from the old branch", conversation, parent=str(stale_leaf))
    assert [m["content"] for m in upstream.last.json["messages"]][-2:] == ["After the second", "from the old branch"]
