"""The chat page in a real browser (Debian's chromium, driven by Playwright; setup.sh installs it, nothing is downloaded): a node
serving the real SmolLM2 answers a question typed into the page, and the ring panel shows that node, its plan and the request."""

import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.node_process import exo_node
from tests.support.patience import HANG_S

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
]
NODE_ID = "browser-node"
# Asked of the default engine (ggml without a GPU): SmolLM2 at 4 bits answers this one "Paris" in llama.cpp's arithmetic as in
# float32 (to "What is the capital of France?" llama.cpp and ggml answer "L'Étoile...", README "Ask a model")
QUESTION = "Which city is the capital of France?"
WAIT_MS = int(HANG_S * 1000)  # what the page shows comes when it comes (on tinygrad the first answer compiles kernels: about
# 20 s on a busy 2-core machine); only a hang waits this long


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian's chromium is not installed at /usr/bin/chromium (./setup.sh installs it)")
def test_the_page_chats_with_smollm2_and_shows_the_ring(tmp_path):
  from playwright.sync_api import expect, sync_playwright

  peers = tmp_path / "peers.json"  # no peers, but a discovery module: the node measures its layer times, as one in a cluster
  peers.write_text(json.dumps({"peers": {}}))
  args = ["--node-id", NODE_ID, "--run-model", "smollm2-135m", "--disable-tui", "--max-generate-tokens", "32"]
  args += ["--discovery-module", "manual", "--discovery-config-path", str(peers)]
  with exo_node(args, tmp_path / "node.log") as (_, url), sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    try:
      page = browser.new_page(viewport={"width": 1400, "height": 900})
      elsewhere, errors = [], []
      origin = urlsplit(url).netloc

      def only_the_node(route):  # offline: the page may load nothing but what the node serves
        if urlsplit(route.request.url).netloc == origin:
          route.continue_()
        else:
          elsewhere.append(route.request.url)
          route.abort()

      page.route("**/*", only_the_node)
      page.on("pageerror", lambda e: errors.append(str(e)))
      page.on("console", lambda m: m.type == "error" and errors.append(m.text))
      page.goto(url)

      expect(page.locator("#nodes")).to_contain_text(NODE_ID, timeout=WAIT_MS)
      page.select_option("#model", "smollm2-135m")
      expect(page.locator("#model")).to_have_value("smollm2-135m")
      page.fill("#prompt", QUESTION)
      page.click("#send")
      expect(page.locator(".msg.user .text")).to_have_text(QUESTION)
      reply = page.locator(".msg.assistant").last
      expect(reply.locator(".text")).to_contain_text("Paris", timeout=WAIT_MS)
      expect(reply).to_have_attribute("data-state", "done", timeout=WAIT_MS)
      expect(page.locator("#error")).to_be_hidden()

      expect(page.locator("#plan")).to_contain_text("Last request", timeout=WAIT_MS)  # the ring panel polls every 2 s
      expect(page.locator("#plan")).to_contain_text(f"{NODE_ID} layers 0–29")
      expect(page.locator("#plan .stat", has_text="planned context")).to_contain_text("8192 tokens")  # SmolLM2's whole context
      node = page.locator(".node", has_text=NODE_ID)
      expect(node).to_contain_text("this node")
      expect(node).to_contain_text("per layer, measured")
      screenshot = tmp_path / "chat-page.png"
      page.screenshot(path=str(screenshot))
      print(f"screenshot of the chat page: {screenshot}")
      assert elsewhere == [] and errors == []
    finally:
      browser.close()


def limit_and_stop(page, expect) -> str:
  """Max tokens cuts a reply; Stop ends the next one, on the page and on the node. Returns the stopped reply's text."""
  reply = page.locator(".msg.assistant").last
  page.fill("#setting-max_tokens", "3")
  page.fill("#prompt", "Say three words.")
  page.press("#prompt", "Enter")
  expect(reply).to_have_attribute("data-state", "done", timeout=WAIT_MS)
  expect(reply.locator(".meta")).to_contain_text("3 tokens")
  expect(reply.locator(".meta")).to_contain_text("cut at the token limit")

  page.fill("#setting-max_tokens", "")
  page.fill("#prompt", "Count to a thousand.")
  page.click("#send")
  expect(page.locator("#stop")).to_be_enabled()
  expect(page.locator("#plan")).to_contain_text("Now: 1 request running on this node", timeout=WAIT_MS)  # streaming, and the ring panel sees it
  expect(reply.locator(".text")).not_to_have_text("…", timeout=WAIT_MS)
  page.click("#stop")
  expect(reply).to_have_attribute("data-state", "stopped")
  expect(page.locator("#send")).to_be_enabled()
  expect(page.locator("#plan")).to_contain_text("Now: 0 requests running on this node", timeout=WAIT_MS)  # the node stopped generating too
  expect(page.locator("#plan .last-head")).to_contain_text("stopped before its end", timeout=WAIT_MS)  # the last request, as it ended
  stopped = reply.locator(".text").inner_text()
  return stopped


def kept_across_reload(page, expect, stopped: str) -> None:
  """The conversation comes back after a reload, an answer that was streaming as far as it came, marked interrupted; another
  tab has a conversation of its own; New chat empties it."""
  messages, reply = page.locator(".msg"), page.locator(".msg.assistant").last
  page.reload()
  expect(messages).to_have_count(4)
  expect(reply.locator(".text")).to_have_text(stopped)
  expect(reply).to_have_attribute("data-state", "stopped")

  page.fill("#prompt", "Count to a thousand, slowly.")
  page.click("#send")
  expect(reply.locator(".text")).not_to_have_text("…", timeout=WAIT_MS)
  page.reload()  # mid-answer
  expect(messages).to_have_count(6)
  expect(page.locator(".msg.user").last.locator(".text")).to_have_text("Count to a thousand, slowly.")
  expect(reply).to_have_attribute("data-state", "interrupted")
  expect(reply.locator(".meta")).to_contain_text("interrupted")
  assert reply.locator(".text").inner_text().strip() not in ("", "…")  # the partial answer

  other = page.context.new_page()
  other.goto(page.url)
  expect(other.locator("#empty")).to_be_visible()  # a tab of its own: an empty conversation
  other.fill("#prompt", "Hello?")
  other.fill("#setting-max_tokens", "2")
  other.click("#send")
  expect(other.locator(".msg.assistant").last).to_have_attribute("data-state", "done", timeout=WAIT_MS)
  other.reload()
  expect(other.locator(".msg")).to_have_count(2)
  page.reload()
  expect(messages).to_have_count(6)  # each tab keeps its own
  other.close()

  page.click("#new-chat")
  expect(messages).to_have_count(0)
  expect(page.locator("#empty")).to_be_visible()


def reports_what_fails(page, expect, node, tmp_path) -> None:
  """The API's error for a model the cluster cannot hold, then a node that went down; the conversation stays."""
  messages, reply, error = page.locator(".msg"), page.locator(".msg.assistant").last, page.locator("#error")
  page.select_option("#model", "llama-3.1-405b")
  page.fill("#setting-max_tokens", "")
  page.fill("#prompt", "Hello?")
  page.click("#send")
  expect(error).to_contain_text("does not fit", timeout=WAIT_MS)
  expect(reply).to_have_attribute("data-state", "failed")

  node.terminate()
  node.wait(30)
  expect(page.locator("#node-status")).to_have_text("node unreachable", timeout=WAIT_MS)
  expect(page.locator("#ring-error")).to_contain_text("Cannot reach the node")
  page.select_option("#model", "llama-3.2-1b")
  page.fill("#prompt", "Are you there?")
  page.click("#send")
  expect(error).to_contain_text("Cannot reach the node", timeout=WAIT_MS)
  expect(messages).to_have_count(4)  # the conversation stays on the page
  screenshot = tmp_path / "chat-page-errors.png"
  page.screenshot(path=str(screenshot))
  print(f"screenshot of the chat page's errors: {screenshot}")


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian's chromium is not installed at /usr/bin/chromium (./setup.sh installs it)")
def test_the_page_limits_stops_keeps_and_reports_what_fails(tmp_path):
  """On a node paced to a slow declared device (dummy engine): max tokens, Stop, the conversation kept across a reload, New
  chat, the API's error for a model the cluster cannot hold, and a node that went down."""
  from playwright.sync_api import expect, sync_playwright

  args = ["--node-id", "paced-node", "--run-model", "llama-3.2-1b", "--discovery-module", "none", "--disable-tui", "--max-generate-tokens", "400"]
  args += ["--inference-engine", "dummy", "--emulate", "--memory-mb", "16384", "--tflops", "1", "--memory-bandwidth", "4"]
  with exo_node(args, tmp_path / "node.log") as (node, url), sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    try:
      page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()  # a context: kept_across_reload opens a second tab
      page.goto(url)
      stopped = limit_and_stop(page, expect)
      kept_across_reload(page, expect, stopped)
      reports_what_fails(page, expect, node, tmp_path)
    finally:
      browser.close()


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian's chromium is not installed at /usr/bin/chromium (./setup.sh installs it)")
def test_with_a_key_the_page_says_so_until_opened_at_the_key_url_which_sets_its_cookie(tmp_path):
  from playwright.sync_api import expect, sync_playwright

  key = "browser-test-key-0123456789"
  args = ["--node-id", "keyed-node", "--discovery-module", "none", "--inference-engine", "dummy", "--disable-tui", "--api-key", key]
  with exo_node(args, tmp_path / "node.log") as (_, url), sync_playwright() as playwright:
    page_url = url.removesuffix(f"?token={key}")
    assert page_url != url  # the node printed the URL carrying its key
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    try:
      context = browser.new_context(viewport={"width": 1400, "height": 900})
      page = context.new_page()
      page.goto(page_url)  # the page's files are served without the key, its API calls are not
      expect(page.locator("#error")).to_contain_text("needs its key", timeout=WAIT_MS)
      page.goto(url)
      assert page.url == page_url  # sent on without the key in its address
      [cookie] = context.cookies()
      assert (cookie["value"], cookie["httpOnly"], cookie["sameSite"]) == (key, True, "Strict")
      expect(page.locator("#model")).to_have_value("llama-3.2-1b", timeout=WAIT_MS)
      page.fill("#prompt", "Hello?")
      page.click("#send")
      reply = page.locator(".msg.assistant").last
      expect(reply).to_have_attribute("data-state", "done", timeout=WAIT_MS)
      expect(page.locator("#error")).to_be_hidden()
      assert page.evaluate("document.cookie") == ""  # HttpOnly: no script on the page reads the key
    finally:
      browser.close()


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian's chromium is not installed at /usr/bin/chromium (./setup.sh installs it)")
def test_the_page_shows_a_model_file_arriving_with_a_progress_bar(tmp_path, monkeypatch):
  """A request names a model the node does not have: while it downloads (the stand-in hub's link paced to 40 Mbit/s: about 20 s
  for SmolLM2's 98 MB), the node's card shows the file arriving, with a progress bar."""
  from playwright.sync_api import expect, sync_playwright

  from exo.inference.model_files import locate_model
  from exo.tools.local_hub import LocalHub

  repo, filename = "test/SmolLM2-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf"
  hub = LocalHub({repo: {filename: locate_model("smollm2-135m").read_bytes()}}, rate_mbps=40).start()
  monkeypatch.setenv("HF_ENDPOINT", hub.url)
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  args = ["--node-id", NODE_ID, "--run-model", "smollm2-135m", "--disable-tui", "--allow-downloads", "any", "--models-dir", str(tmp_path / "models")]
  try:
    with exo_node(args, tmp_path / "node.log") as (_, url), sync_playwright() as playwright:
      browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
      try:
        page = browser.new_page()
        page.goto(url)
        expect(page.locator("#nodes")).to_contain_text(NODE_ID, timeout=WAIT_MS)
        request = {"model": repo, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        page.evaluate(
          "(body) => { fetch('v1/chat/completions', {method: 'POST', headers: {'Content-Type': 'application/json'}, body}); }", json.dumps(request)
        )
        transfer = page.locator(".node", has_text=NODE_ID).locator(".transfer")
        expect(transfer).to_contain_text(f"{filename}: ", timeout=WAIT_MS)
        expect(transfer).to_contain_text("of 98.4 MB from hub")
        expect(transfer.locator("progress")).to_be_visible()
        assert 0 <= float(transfer.locator("progress").evaluate("bar => bar.value")) < 1
      finally:
        browser.close()
  finally:
    hub.stop()


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian's chromium is not installed at /usr/bin/chromium (./setup.sh installs it)")
def test_on_a_two_node_smollm2_ring_the_page_shows_the_prediction_for_the_requests_own_prompt(tmp_path):
  """Two ggml nodes of 160 MB each (SmolLM2 needs both) that measure their layer times at start: the page's "Last request"
  shows the time measured next to what the plan predicts for that request's own prompt and answer, as the node computed it
  (TTFT for its prompt + (tokens - 1) x TPOT). How close the two are is a benchmark's to say, not a test's (this machine's load
  moves the measured time): benchmarks/last_request.py."""
  from playwright.sync_api import expect, sync_playwright

  from exo.tools.local_cluster import Cluster, Device, collect_topology

  cluster = Cluster(tmp_path / "ring")
  try:
    for node_id in ("a", "b"):
      cluster.declare(node_id, Device(160, 1, 10), engine=["--inference-engine", "ggml", "--run-model", "smollm2-135m"], api=node_id == "a")
    for node_id in ("a", "b"):  # one after the other, as on two machines: each measures its layers without the other's load
      cluster.start(node_id, "--max-generate-tokens", "24")
      cluster.wait_for(
        lambda n=node_id: "layer_times" in ((collect_topology(cluster.nodes[n].address) or {}).get("nodes", {}).get(n, {})),
        f"{node_id}'s layer times",
      )
    cluster.wait_for_mesh()
    url = f"http://127.0.0.1:{cluster.api_ports['a']}/"
    with sync_playwright() as playwright:
      browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
      try:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(url)
        expect(page.locator("#model")).to_have_value("smollm2-135m", timeout=WAIT_MS)
        for question in (QUESTION, "Name a primary colour."):  # the first loads the layers; the second is warm
          page.fill("#prompt", question)
          page.click("#send")
          expect(page.locator(".msg.assistant").last).to_have_attribute("data-state", "done", timeout=WAIT_MS)
        plan = page.evaluate("async () => (await (await fetch('v1/plan')).json())")
        record = plan["last_request"]
        assert sorted(record["ring"]) == ["a", "b"] and record["outcome"] in ("stop", "length") and record["tokens"] >= 1
        n, ttft_ms, tpot_ms = record["tokens"], record["predicted_ttft_ms"], record["predicted_tpot_ms"]
        assert record["predicted_s"] == pytest.approx((ttft_ms + (n - 1) * tpot_ms) / 1000)
        assert record["prompt_tokens"] < plan["assumes"]["prompt_tokens"] and ttft_ms < plan["predicted"]["ttft_ms"]  # its own, shorter prompt
        print(f"warm request: predicted {record['predicted_s']:.3f} s, measured {record['elapsed_s']:.3f} s")
        last = page.locator("#plan .last")  # the ring panel polls every 2 s
        expect(last).to_contain_text(f"{' → '.join(record['ring'])} · {record['prompt_tokens']}-token prompt", timeout=WAIT_MS)
        predicted, measured = (float(cell.removesuffix(" s")) for cell in last.locator("tbody tr").first.locator("td").all_inner_texts())
        assert predicted == pytest.approx(record["predicted_s"], rel=0.01) and measured == pytest.approx(record["elapsed_s"], rel=0.01)
      finally:
        browser.close()
  finally:
    cluster.close()
