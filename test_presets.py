from gevent import monkey; monkey.patch_all()  # noqa: E702 — before anything imports socket (see conftest.py)

# Named presets of the composer's options (issue 23, item 6): saved per owner, chosen to fill the fields, deleted;
# with htmx and as plain forms; and the options panel's folded summary, which always lists what is set.

import re  # noqa: E402

import pytest  # noqa: E402

import chat  # noqa: E402
from testkit import HX, alerts, answer, db_rows, elements, htmx_app, plain_app, read_events  # noqa: E402


OPTIONS = {"model": "big-model", "system": "Answer like a <pirate> & be brief", "temperature": "0.3",
           "top_p": "0.9", "max_tokens": "128"}


def fields(page):
    """The options panel's fields as a page shows them: model, system prompt, the three parameters, summary."""
    (model,) = [o.attrs["value"] for o in elements(page, "option") if "selected" in o.attrs and
                o.attrs.get("value") is not None][:1] or [None]
    return {"model": model, "system": elements(page, "textarea", name="system")[0].text,
            **{n: elements(page, "input", name=n)[0].attrs.get("value", "") for n in chat.PARAMETERS},
            "summary": elements(page, "summary", id="options-summary")[0].text}


@pytest.mark.both_databases
def test_a_preset_is_saved_chosen_and_deleted_with_htmx(client, upstream):
    """Save the composer's options under a name (escaped), choose it to fill the fields, delete it; per owner."""
    picker = client.post("/presets", {**OPTIONS, "preset_name": "  Pirate  <b>mode</b> ", "prompt": "unsent"}).text
    assert 'id="presets-picker"' in picker and "<b>" not in picker and "Pirate &lt;b&gt;mode&lt;/b&gt;" in picker
    assert db_rows("SELECT name, model, system_prompt, temperature, top_p, max_tokens FROM presets") == [
        ("Pirate <b>mode</b>", "big-model", OPTIONS["system"], 0.3, 0.9, 128)]
    assert db_rows("SELECT COUNT(*) FROM conversations") == [(0,)]  # saving sends nothing
    client.post("/presets", {"preset_name": "Plain", "system": "", "temperature": "", "model": ""})
    page = client.get("/").text
    assert "open" not in elements(page, "details", cls="options")[0].attrs
    chosen = client.get("/", {"preset": "Pirate <b>mode</b>"}).text  # what the picker's form asks (hx-select)
    assert "open" in elements(chosen, "details", id="options")[0].attrs
    assert fields(chosen) == {"model": "big-model", "system": OPTIONS["system"], "temperature": "0.3",
                              "top_p": "0.9", "max_tokens": "128",
                              "summary": "Model and options · system prompt, temperature, top p, max tokens"}
    assert fields(client.get("/", {"preset": "Plain"}).text)["summary"] == "Model and options"
    other = htmx_app()  # another browser: another owner
    assert "Pirate" not in other.get("/").text
    other.post("/presets/delete", {"preset": "Plain"})
    assert len(db_rows("SELECT name FROM presets")) == 2
    picker = client.post("/presets/delete", {"preset": "Plain"}).text
    assert db_rows("SELECT name FROM presets") == [("Pirate <b>mode</b>",)] and ">Plain<" not in picker


def test_a_saved_preset_replaces_one_of_the_same_name_and_bad_fields_are_refused(client):
    """The same name again replaces it; no name, bad numbers or too many presets: a readable 4xx, nothing saved."""
    client.post("/presets", {"preset_name": "A", "temperature": "0.1"})
    client.post("/presets", {"preset_name": "A", "temperature": "0.5", "system": "new"})
    assert db_rows("SELECT name, temperature, system_prompt FROM presets") == [("A", 0.5, "new")]
    assert "name" in alerts(client.post("/presets", {"preset_name": "  ", "temperature": "1"}, status=400).text)[0]
    assert "Temperature" in alerts(client.post("/presets", {"preset_name": "B", "temperature": "9"}, status=400).text)[0]
    for n in range(chat.PRESETS_PER_OWNER - 1):
        client.post("/presets", {"preset_name": f"p{n}"})
    client.post("/presets", {"preset_name": "one too many"}, status=409)
    assert len(db_rows("SELECT name FROM presets")) == chat.PRESETS_PER_OWNER


def test_presets_work_as_plain_forms_without_javascript(upstream):
    """No JavaScript: Save posts the composer (303 to the page, the preset chosen), Use is a GET, Delete a form."""
    plain = plain_app()
    page = plain.get("/").text
    (save,) = elements(page, "button", cls="save-preset")
    assert save.attrs["formaction"] == "/presets" and "formnovalidate" in save.attrs
    assert elements(page, "form", id="presets")[0].attrs["method"] == "get"
    stored = plain.post("/presets", {**OPTIONS, "preset_name": "Terse"}, status=303).headers["Location"]
    assert stored.endswith("/?preset=Terse")
    chosen = plain.get("/?preset=Terse").text
    assert fields(chosen)["temperature"] == "0.3" and fields(chosen)["system"] == OPTIONS["system"]
    assert [o.text for o in elements(chosen, "option") if "selected" in o.attrs][-1] == "Terse"
    (use,) = [b for b in elements(chosen, "button") if b.text == "Use"]
    assert use.attrs["form"] == "presets" and elements(chosen, "select", id="preset")[0].attrs["form"] == "presets"
    plain.post("/presets/delete", {"preset": "Terse"}, status=303)
    assert db_rows("SELECT name FROM presets") == []
    assert 'id="preset"' not in plain.get("/").text


def test_a_browser_s_presets_follow_it_into_its_account(client, monkeypatch):
    """An anonymous browser's presets become its account's at the first sign-in, like its conversations."""
    client.post("/presets", {"preset_name": "Mine", "temperature": "0.2"})
    anonymous = db_rows("SELECT owner FROM presets")[0][0]
    chat.store.adopt(anonymous, "account-owner")
    assert db_rows("SELECT owner, name FROM presets") == [("account-owner", "Mine")]


def test_the_options_summary_lists_what_is_set_after_sending_and_after_an_error(client, upstream):
    """The folded summary updates with the answer (out of band), stays true on a page after a form error, and the
    panel is folded then too; the options' fields are what the conversation uses."""
    upstream.serve(answer("ok"))
    response = client.post("/streaming", {"prompt": "hi", "temperature": "0.4", "system": "Be kind"}, headers=HX)
    (summary,) = elements(response.text, "summary", id="options-summary")
    assert summary.attrs["hx-swap-oob"] == "true" and summary.text == "Model and options · system prompt, temperature"
    conversation = response.headers["HX-Push-Url"].removeprefix("/c/")
    read_events(client, re.search(r"stream=([\w-]+)", response.text).group(1))
    plain = plain_app()
    for cookie in client.cookiejar:  # the same browser, its JavaScript off
        plain.set_cookie(cookie.name, cookie.value)
    refused = plain.post("/streaming", {"prompt": "x", "conversation": conversation, "temperature": "7"}, status=400)
    assert "Temperature" in alerts(refused.text)[0]
    assert "open" not in elements(refused.text, "details", cls="options")[0].attrs
    assert fields(refused.text)["summary"] == "Model and options · system prompt, temperature"
    page = client.get(f"/c/{conversation}").text
    assert fields(page)["temperature"] == "0.4" and fields(page)["summary"].endswith("system prompt, temperature")
