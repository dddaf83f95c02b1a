"""The dashboard and the client page in headless Chromium (Debian's, installed by `make test`)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from dragoman.client import SessionClient
from tests.e2e.peers import ScriptedNode
from tests.e2e.test_node_plane import one_utterance, ws

pytestmark = [pytest.mark.e2e, pytest.mark.browser]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
SPEECH = Path(__file__).resolve().parents[2] / "src/dragoman/demo/audio/speech-zh.wav"
BASE_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]

if CHROMIUM is None:
    pytest.skip("chromium is not installed (make test installs it)", allow_module_level=True)


@pytest.fixture
async def browser():
    from playwright.async_api import async_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=[
            *BASE_ARGS, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={SPEECH}", "--autoplay-policy=no-user-gesture-required"])
        yield b
        await b.close()


async def start_session(page, src: str, tgt: str) -> None:
    """Pick the languages from what the page says the network serves, and start."""
    # The page re-reads /api/v1/languages every 2 s while nothing is served (the node may still be starting).
    await page.wait_for_selector(f'#src option[value="{src}"]', state="attached", timeout=20000)
    await page.select_option("#src", src)
    await page.wait_for_selector(f'#tgts input[value="{tgt}"]', timeout=10000)
    for box in await page.query_selector_all("#tgts input:checked"):
        if await box.get_attribute("value") != tgt:
            await box.uncheck()
    await page.check(f'#tgts input[value="{tgt}"]')
    await page.wait_for_function("!document.querySelector('#start').disabled", timeout=10000)
    await page.click("#start")
    await page.wait_for_function("document.querySelector('#session-id').textContent.trim().length > 8",
                                 timeout=15000)


async def test_dashboard_shows_a_node_appear_and_jobs_count_up(scheduler, browser) -> None:
    base = scheduler()
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    await page.goto(base + "/")
    await page.wait_for_function("document.querySelector('#conn-status').textContent.includes('live')",
                                 timeout=15000)
    assert (await page.inner_text("#node-count")).strip() == "0"
    node = await ScriptedNode.connect(ws(base), node_id="dash-node", slots=2)
    beat = asyncio.create_task(node.keep_alive())
    await page.wait_for_selector('tr[data-node-id="dash-node"]', timeout=15000)
    await page.wait_for_function("document.querySelector('#node-count').textContent.trim() === '1'", timeout=15000)
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
        for i in range(3):
            await one_utterance(client)
            await node.result(await node.expect("job_assign"), f"n{i}")
        await client.results(3)
        await page.wait_for_function("document.querySelector('#jobs-completed').textContent.trim() === '3'",
                                     timeout=15000)
        await client.close()
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    # operator action: drain the node from its row
    await page.click('tr[data-node-id="dash-node"] button:has-text("Drain")')
    await page.wait_for_function(
        "document.querySelector('tr[data-node-id=\"dash-node\"] .state').textContent.includes('draining')",
        timeout=15000)
    beat.cancel()
    await node.close()


async def test_client_page_streams_fake_microphone_and_shows_translation(scheduler, spawn, browser) -> None:
    base = scheduler()
    spawn("node", "--scheduler", ws(base) + "/ws/node", "--pairs", "zh:en", "--slots", "2", "--sim-speed", "20",
          name="page-node")
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(base + "/client")
    await start_session(page, "zh", "en")
    # let the fake microphone talk until a couple of seconds of audio went out (about 200 ms a chunk)
    await page.wait_for_function("parseInt(document.querySelector('#chunks-sent').textContent) >= 12",
                                 timeout=20000)
    await page.click("#stop")
    row = await page.wait_for_selector(".result", timeout=30000)
    assert await row.get_attribute("data-tgt") == "en"
    text = await page.inner_text(".result .translated")
    assert "[sim zh->en]" in text
    assert (await page.inner_text(".result .speaker")).strip() == "you"
    await page.screenshot(path=str(ARTIFACTS / "client.png"), full_page=True)
    assert errors == []


async def test_client_page_offers_only_the_languages_the_pools_serve(scheduler, spawn, browser) -> None:
    base = scheduler()
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(base + "/client")
    # no node yet: nothing to choose, Start disabled and the page says why
    await page.wait_for_function("document.querySelector('#langs-note').dataset.state === 'blocked'", timeout=10000)
    assert await page.is_disabled("#start")
    assert "no language" in await page.inner_text("#langs-note")
    spawn("node", "--scheduler", ws(base) + "/ws/node", "--pairs", "zh:en,zh:ja,en:zh", "--slots", "2",
          "--sim-speed", "20", name="langs-node")
    await page.wait_for_selector('#src option[value="zh"]', state="attached", timeout=20000)
    assert await page.eval_on_selector_all("#src option", "os => os.map(o => o.value)") == ["auto", "en", "zh"]
    await page.select_option("#src", "zh")
    assert await page.eval_on_selector_all("#tgts input", "xs => xs.map(x => x.value)") == ["en", "ja"]
    await page.select_option("#src", "en")
    assert await page.eval_on_selector_all("#tgts input", "xs => xs.map(x => x.value)") == ["zh"]
    await page.select_option("#src", "auto")  # two-way: A/B from the pairs served both ways
    assert await page.is_visible("#lang-a") and not await page.is_visible("#tgts")
    assert await page.eval_on_selector_all("#lang-a option", "os => os.map(o => o.value)") == ["en", "zh"]
    assert await page.eval_on_selector_all("#preferred-lang option", "os => os.map(o => o.value)") == [
        "", "en", "ja", "zh"]
    assert not await page.is_disabled("#start")
    assert await page.is_disabled("#room-create")  # rooms need a connected session
    assert errors == []


async def wait_members(page, count: int) -> None:
    await page.wait_for_function(f"document.querySelectorAll('#room-members li').length === {count}", timeout=15000)


async def test_two_client_pages_share_a_room_and_see_who_said_what(scheduler, spawn, browser) -> None:
    """Alice speaks Chinese and hears Chinese; Bob speaks English and hears English. Both fake
    microphones play the same recording: each page shows the other's speech, named."""
    base = scheduler()
    spawn("node", "--scheduler", ws(base) + "/ws/node", "--pairs", "zh:en,en:zh", "--slots", "4", "--sim-speed", "20",
          name="room-node")
    errors: list[str] = []
    pages = {}
    for who in ("a", "b"):
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda e, who=who: errors.append(f"{who}: {e}"))
        await page.goto(base + "/client")
        pages[who] = page
    a, b = pages["a"], pages["b"]

    await start_session(a, "zh", "en")
    await a.wait_for_function("!document.querySelector('#room-create').disabled", timeout=15000)
    await a.fill("#display-name", "Alice")
    await a.select_option("#preferred-lang", "zh")
    await a.click("#room-create")
    await a.wait_for_function("document.querySelector('#room-code').dataset.state === 'in'", timeout=15000)
    code = (await a.inner_text("#room-code")).strip()
    assert code.isdigit() and len(code) == 6
    await wait_members(a, 1)

    await start_session(b, "en", "zh")
    await b.wait_for_function("!document.querySelector('#room-join').disabled", timeout=15000)
    await b.fill("#display-name", "Bob")
    await b.select_option("#preferred-lang", "en")
    await b.fill("#room-code-input", code)
    await b.click("#room-join")
    for page in (a, b):
        await wait_members(page, 2)
        assert (await page.inner_text("#room-code")).strip() == code
        names = await page.eval_on_selector_all("#room-members li .name", "xs => xs.map(x => x.textContent)")
        assert names == ["Alice", "Bob"]
    assert await a.inner_text("#room-members li.self .name") == "Alice"
    assert await b.inner_text("#room-members li.self .name") == "Bob"
    assert "en" in await b.inner_text("#room-members li.self .lang")

    # who said what: Alice's speech reaches Bob in English, named; Bob's reaches Alice in Chinese
    heard = """([name, text]) => [...document.querySelectorAll('#results-body tr.result')].some(tr =>
        tr.querySelector('.speaker').textContent === name && tr.querySelector('.translated').textContent.includes(text))"""
    await b.wait_for_function(heard, arg=["Alice", "[sim zh->en]"], timeout=40000)
    await a.wait_for_function(heard, arg=["Bob", "[sim en->zh]"], timeout=40000)
    alice_rows = await b.eval_on_selector_all(
        "#results-body tr.result", "rows => rows.filter(r => r.querySelector('.speaker').textContent === 'Alice')"
        ".map(r => [r.dataset.speaker, r.dataset.tgt])")
    alice_sid = (await a.inner_text("#session-id")).strip()
    assert alice_rows and all(row == [alice_sid, "en"] for row in alice_rows)

    dash = await browser.new_page(viewport={"width": 1280, "height": 1000})
    dash.on("pageerror", lambda e: errors.append(f"dashboard: {e}"))
    await dash.goto(base + "/")
    row = f'tr[data-room-code="{code}"]'
    await dash.wait_for_function(f"(document.querySelector('{row} td.member-count') || {{}}).textContent === '2'",
                                 timeout=15000)
    chips = await dash.eval_on_selector_all(f"{row} td.members .chip", "xs => xs.map(x => x.textContent)")
    assert chips == ["Alice · zh", "Bob · en"]

    for name, page in (("a", a), ("b", b)):
        await page.screenshot(path=str(ARTIFACTS / f"rooms-client-{name}.png"), full_page=True)
    await dash.screenshot(path=str(ARTIFACTS / "rooms-dashboard.png"), full_page=True)

    # Bob leaves: Alice sees one member, so does the dashboard
    await b.click("#room-leave")
    await b.wait_for_function("document.querySelector('#room-code').dataset.state === 'none'", timeout=5000)
    await wait_members(a, 1)
    await dash.wait_for_function(f"(document.querySelector('{row} td.member-count') || {{}}).textContent === '1'",
                                 timeout=15000)
    assert errors == []
