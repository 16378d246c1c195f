"""Search sees only its owner: its cost does not depend on other owners' words, and searches are limited per address."""

import sqlite3
import statistics
import time

import pytest
import webtest

import chat
from test_chat import database, isolated, postgres_url  # noqa: F401 — the autouse fixtures, and PostgreSQL

FOREIGN_ROWS = 20_000


def median_search_ms(owner, words, runs=15):
    """The median time of this owner's search, in milliseconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        chat.store.search(owner, words)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def timings(owner):
    """Median search times: a word the other owner has 20,000 times, its first 3 letters, and a word nobody has."""
    chat.store.db.execute("ANALYZE")  # PostgreSQL plans with the statistics it would have in production
    return {query: median_search_ms(owner, [query]) for query in ("zebra", "zeb", "quokka")}


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_search_time_does_not_depend_on_other_owners_messages(database):
    """Owner A's search for a word that owner B has in 20,000 messages (or its first 3 letters) takes as long as one
    for a word nobody has, and as long as before B wrote them: the match reads A's entries only."""
    mine = chat.store.create_conversation("owner-a", "Notes")
    for text in ("we saw a zebra at the zoo", "lunch plans", "a weekend hike"):
        chat.store.add_message(mine, "user", text)
    alone = timings("owner-a")
    theirs = chat.store.create_conversation("owner-b", "Sightings")
    chat.store.db.executemany(
        "INSERT INTO messages (conversation_id, role, content, created) VALUES (?, 'user', ?, 1)",
        [(theirs, f"zebra sighting number {n} near the zebu") for n in range(FOREIGN_ROWS)])
    assert len(chat.store.search("owner-b", ["zebra"])) == 20  # B's messages are in the index

    shared = timings("owner-a")

    print(f"\n{database}: alone {alone}, with {FOREIGN_ROWS} foreign rows {shared}")
    for query in ("zebra", "zeb"):
        assert shared[query] <= 2 * shared["quokka"] + 2, (query, shared)
        assert shared[query] <= 2 * alone[query] + 2, (query, alone, shared)
    assert [(row["conversation_id"], row["snippet"]) for row in chat.store.search("owner-a", ["zeb"])] == [
        (mine, "we saw a \x01zebra\x02 at the zoo")]


def old_sqlite_database(path):
    """An SQLite file at the schema before search terms carried their owner, with two owners' messages."""
    old = sqlite3.connect(path)
    old.executescript("".join(m.sqlite for m in chat.MIGRATIONS[:4]) + "PRAGMA user_version = 4;")
    for owner, conversation, text in (("owner1", "c1", "a zebra crossing"), ("owner2", "c2", "zebra stripes")):
        old.execute("INSERT INTO conversations (id, owner, title, created, updated) VALUES (?, ?, 'Zebra talk', 1, 1)",
                    (conversation, owner))
        old.execute("INSERT INTO messages (conversation_id, role, content, created) VALUES (?, 'user', ?, 1)",
                    (conversation, text))
    old.commit()
    old.close()


def old_postgres_database(url):
    """A PostgreSQL schema at the version before search terms carried their owner, with two owners' messages."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        connection.execute(chat.MIGRATIONS[3].postgresql)
        connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL); "
                           "INSERT INTO schema_version VALUES (1)")
        for owner, conversation, text in (("owner1", "c1", "a zebra crossing"), ("owner2", "c2", "zebra stripes")):
            connection.execute("INSERT INTO conversations (id, owner, title, created, updated) "
                               "VALUES (%s, %s, 'Zebra talk', 1, 1)", (conversation, owner))
            connection.execute("INSERT INTO messages (conversation_id, role, content, created) "
                               "VALUES (%s, 'user', %s, 1)", (conversation, text))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_an_old_database_upgrades_and_searches_each_owner_own_rows(kind, tmp_path, request):
    """A database from before the owner-scoped search index opens, and its old and new messages are found by their
    owner's search only, with the same highlighting."""
    if kind == "sqlite":
        old_sqlite_database(tmp_path / "old.db")
        store = chat.Store(str(tmp_path / "old.db"))
    else:
        url = request.getfixturevalue("postgres_url")
        old_postgres_database(url)
        store = chat.Store(url=url)
    try:
        hits = store.search("owner1", ["zebr"])
        assert [(row["conversation_id"], row["message_id"] is None, row["snippet"]) for row in hits] == [
            ("c1", True, "\x01Zebra\x02 talk"), ("c1", False, "a \x01zebra\x02 crossing")]
        assert [row["snippet"] for row in store.search("owner2", ["stripes"])] == ["zebra \x01stripes\x02"]
        assert store.search("owner1", ["stripes"]) == []
        new = store.add_message("c1", "user", "stripes everywhere")
        assert [row["message_id"] for row in store.search("owner1", ["stripes"])] == [new]
        assert len(store.search("owner2", ["stripes"])) == 1
    finally:
        store.close()


# -- the search budget of a client address

def cookieless_search(address):
    """The status of one search by a browser without cookies at this address, through the proxy on loopback."""
    browser = webtest.TestApp(chat.app, extra_environ={"REMOTE_ADDR": "127.0.0.1", "HTTP_HX_REQUEST": "true"})
    headers = {"X-Forwarded-For": address} if address else {}
    return browser.get("/search", {"q": "zebra"}, headers=headers, expect_errors=True).status_int


@pytest.fixture
def no_refill(monkeypatch):
    """The per-address search budget without its refill, so that counting it never races the clock; its size."""
    monkeypatch.setattr(chat.limits.search_addresses, "rate", 0)
    return chat.limits.search_addresses.burst


def test_cookieless_searches_are_limited_per_address(no_refill):
    """New browsers at one address share its search budget: past it they get 429, while another address is served."""
    assert [cookieless_search("203.0.113.7") for _ in range(no_refill + 1)] == [200] * no_refill + [429]
    assert cookieless_search("203.0.113.7") == 429
    assert cookieless_search("198.51.100.9") == 200


def test_ipv6_addresses_in_one_64_share_the_search_budget(no_refill):
    """Every address of an IPv6 /64 counts as one client; the next /64 has a budget of its own."""
    assert {cookieless_search(f"2001:db8:7:1::{n:x}") for n in range(no_refill)} == {200}
    assert cookieless_search("2001:db8:7:1:ffff:1:2:3") == 429
    assert cookieless_search("2001:db8:7:2::1") == 200


def test_address_key_counts_ipv6_by_its_64_and_ipv4_as_it_is():
    """address_key: an IPv6 address becomes its /64 network; IPv4 and anything else stay as they are."""
    assert chat.address_key("2001:db8:7:1:aaaa:bbbb:cccc:dddd") == "2001:db8:7:1::/64"
    assert chat.address_key("2001:DB8:7:1::1") == chat.address_key("2001:db8:7:1:ffff::9")
    assert chat.address_key("203.0.113.7") == "203.0.113.7"
    assert chat.address_key("") == ""


def test_this_machine_has_no_address_budget_for_search_but_each_owner_has_one(no_refill):
    """Cookie-less searches from loopback without a proxy (the operator's tools) are not counted per address; one
    browser there still gets 429 past its own budget."""
    assert {cookieless_search(None) for _ in range(no_refill + 5)} == {200}
    browser = webtest.TestApp(chat.app, extra_environ={"REMOTE_ADDR": "127.0.0.1", "HTTP_HX_REQUEST": "true"})
    statuses = [browser.get("/search", {"q": "zebra"}, expect_errors=True).status_int for _ in range(30)]
    assert 429 in statuses


def test_search_terms_put_the_owner_key_in_front_of_every_word_sqlite_sees():
    """The keyed text has the same words as the text, each with the key in front, by SQLite's tokenizer itself: so
    every word stays findable, whatever Unicode characters surround it (accents, combining marks, emoji, CJK)."""
    import random
    rng = random.Random(7)
    alphabet = "ab Zé_-.,'\"\n\t5½" + "\u0301\u0308\u200d\u00ad" + "😀🦓✅" + "进入日本" + "ðßøΩжאب" + "\ue000\U000e0001"
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize = 'unicode61 remove_diacritics 2')")
    db.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))) for _ in range(300)]
    characters = [c for c in range(0x80, 0x30000) if not 0xD800 <= c < 0xE000]  # surrogates are not text
    texts += ["".join(chr(rng.choice(characters)) for _ in range(30)) for _ in range(100)]
    key = chat.search_key("owner-a")
    for n, text in enumerate(texts):
        db.execute("INSERT INTO t (rowid, x) VALUES (?, ?), (?, ?)", (2 * n, text, 2 * n + 1, chat.search_terms(
            "owner-a", text)))
    for n, text in enumerate(texts):
        words, keyed = ([term for term, in db.execute("SELECT term FROM v WHERE doc = ? ORDER BY offset", (doc,))]
                        for doc in (2 * n, 2 * n + 1))
        assert keyed == [key + word for word in words], repr(text)
