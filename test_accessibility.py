from gevent import monkey; monkey.patch_all()  # noqa: E702 — before anything imports socket (see conftest.py)

# axe-core 4 (vendored in testdata/axe/, see its README) run in Chromium on the page people see: the empty
# page, a conversation with highlighted code, a table, math, a list and a link, and the login page, each at
# desktop light, desktop dark and phone size. Every rule axe runs by default must pass: 0 violations.

import pytest  # noqa: E402

from testkit import HERE, ChatProcess, PageWatch, answer  # noqa: E402

AXE = (HERE / "testdata" / "axe" / "axe.min.js").read_text()
SCREENS = {
    "desktop light": dict(viewport={"width": 1280, "height": 800}, color_scheme="light"),
    "desktop dark": dict(viewport={"width": 1280, "height": 800}, color_scheme="dark"),
    "phone": dict(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True),
}
ANSWER = answer(
    "## Operators\n\nIn Python `a or b` gives the first true value; see ", "[the docs](https://docs.python.org/3/).\n\n",
    "- `or` stops at the first true value\n- `and` at the first false one\n\n",
    "| expression | value |\n|:--|--:|\n| `0 or 2` | 2 |\n| `1 and 0` | 0 |\n\n",
    "The area is $\\pi r^2$, and\n\n$$e^{i\\pi} + 1 = 0$$\n\n",
    "```python\n# choose a default\n@cache\ndef pick(a, b=None):\n    return a or b and not a in [1, 2.5, 'x', \"y\"]"
    "  # " + "a long comment line " * 6 + "\n```\n")


def axe_violations(page, where, found):
    """Run axe-core on the page as it is; add its violations to found, each as a line naming the rule, its help,
    its impact and the first nodes' targets."""
    page.evaluate(AXE)  # evaluate runs outside the page's CSP (script-src 'self'), which refuses inline scripts
    for v in page.evaluate("async () => (await axe.run(document)).violations"):
        targets = " ".join(str(n["target"]) for n in v["nodes"][:6])
        found.append(f"{where}: {v['id']} ({v['impact']}) {v['help']}: {len(v['nodes'])} nodes: {targets}")


def check(found):
    """Fail with every violation, one a line."""
    if found:
        pytest.fail("axe-core found:\n" + "\n".join(found), pytrace=False)


@pytest.fixture(params=list(SCREENS))
def screen(request, browser):
    """A fresh context at one of the three screens (its own cookie); yields (name, context)."""
    ctx = browser.new_context(**SCREENS[request.param])
    yield request.param, ctx
    ctx.close()


def test_axe_finds_nothing_on_the_empty_page_and_a_conversation(screen, browser, open_page, page_upstream):
    """/ first, then a conversation whose answer has a heading, inline code, a link, a list, a table, math and
    highlighted Python (operators like `a or b` too), as streamed, reloaded as /c/ID, on a phone with the drawer
    open, with a share link, and that link opened with no cookie: 0 violations each time."""
    name, ctx = screen
    page, found = open_page(ctx=ctx).page, []
    axe_violations(page, f"/ at {name}", found)
    page_upstream.serve(ANSWER)
    page.fill("#prompt", "How do `or` and `and` work in Python?")
    page.locator("#send").click()
    page.locator(".msg.assistant.done").wait_for()
    axe_violations(page, f"the first answer, just streamed, at {name}", found)
    page.reload()
    page.wait_for_function("() => window.htmx && htmx.version")
    done = page.locator(".msg.assistant.done")
    assert done.locator("pre code .ow").count() >= 3 and done.locator("table").count() == 1
    assert done.locator("math").count() >= 2 and done.locator("ul li").count() == 2 and done.locator("a[href]").count()
    axe_violations(page, f"/c/ID at {name}", found)
    if name == "phone":
        page.locator("header .menu").tap()
        page.locator("#sidebar").wait_for()
        axe_violations(page, f"/c/ID with the drawer open at {name}", found)
        page.keyboard.press("Escape")
        page.locator("#sidebar").wait_for(state="hidden")
    page.get_by_role("button", name="Share").click()
    page.locator(".shares a").wait_for()
    axe_violations(page, f"/c/ID with its share link at {name}", found)
    visitor = browser.new_context(**SCREENS[name])  # no cookie: the shared, read-only page
    try:
        shared = visitor.new_page()
        shared.goto(page.locator(".shares a").get_attribute("href"))
        shared.locator(".msg.assistant pre code .ow").first.wait_for()
        axe_violations(shared, f"/s/TOKEN at {name}", found)
    finally:
        visitor.close()
    check(found)


@pytest.fixture(scope="module")
def guarded_chat(tmp_path_factory):
    """A chat.py with CHAT_PASSWORD, so that / leads to /login, and no model server (the discard port refuses)."""
    app = ChatProcess(tmp_path_factory.mktemp("login") / "chat.log", OPENAI_BASE_URL="http://127.0.0.1:9/v1",
                      CHAT_PASSWORD="secret", NO_PROXY="127.0.0.1")
    yield app
    app.stop()


def test_axe_finds_nothing_on_the_login_page_and_the_model_server_notice(screen, guarded_chat, watches):
    """/login, /login after a wrong password (its error shown), and / once logged in, with the notice that the
    model server cannot be reached: 0 violations."""
    name, ctx = screen
    page = ctx.new_page()
    watch = PageWatch(page)
    watch.allowed_errors.append("status of 401")  # Chromium logs the wrong password's 401
    watches.append(watch)
    page.goto(guarded_chat.url + "/login")
    found = []
    axe_violations(page, f"/login at {name}", found)
    page.fill("input[type=password]", "wrong")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_load_state()
    axe_violations(page, f"/login after a wrong password at {name}", found)
    page.fill("input[type=password]", "secret")
    page.get_by_role("button", name="Log in").click()
    page.locator("#model-server .down").wait_for()
    axe_violations(page, f"/ with the model server down at {name}", found)
    check(found)
