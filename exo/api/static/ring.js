// The ring half of the page: every POLL_MS, the node's live topology (/v1/topology) and plan (/v1/plan), drawn as the nodes (with
// the model files arriving at each), the ring the plan runs on with each node's layers and what it still fetches, the context it
// planned, what the planner predicts and what the last request measured.
"use strict";

(() => {
  const POLL_MS = 2000;
  const COLORS = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#65a30d", "#db2777"];
  const $ = (id) => document.getElementById(id);
  const view = { status: $("node-status"), updated: $("ring-updated"), error: $("ring-error"), nodes: $("nodes"), plan: $("plan"), links: $("links") };

  // A DOM element: el("div", {className: "x"}, child, "text", ...); text is set as text, never parsed as HTML.
  function el(tag, props, ...children) {
    const e = Object.assign(document.createElement(tag), props || {});
    e.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
    return e;
  }

  // A figure to about `digits` significant digits, without trailing zeros or an exponent: 3.24, 308, 16,384, 0.0234.
  function num(x, digits = 3) {
    if (x === null || x === undefined || !isFinite(x)) return "–";
    const decimals = Math.min(6, Math.max(0, digits - 1 - Math.floor(Math.log10(Math.abs(x) || 1))));
    return Number(x).toLocaleString("en-US", { maximumFractionDigits: decimals });
  }
  const ms = (x) => (x === null || x === undefined ? "–" : x >= 1000 ? `${num(x / 1000)} s` : `${num(x)} ms`);
  const count = (n, noun) => `${n} ${noun}${n === 1 ? "" : "s"}`;
  const gb = (mb) => (mb ? `${num(mb / 1024)} GB` : "unknown");
  // A random (uuid) node id by its first 8 characters, which tell a cluster's nodes apart (the whole id on hover); others as they are.
  const short = (id) => (/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(id) ? id.slice(0, 8) : id);
  const mb = (bytes) => (bytes >= 1e9 ? `${num(bytes / 1e9)} GB` : `${num(bytes / 1e6)} MB`);

  async function getJSON(path) {
    const response = await fetch(path, { signal: AbortSignal.timeout(10000) });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = new Error((body.error && body.error.message) || `HTTP ${response.status}`);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  function stat(label, value, note) {
    return el("div", { className: "stat" }, el("div", { className: "value" }, value), el("div", { className: "label" }, label), note && el("div", { className: "note" }, note));
  }

  function drawNodes(topology, plan, colors) {
    const self = plan && plan.node_id;
    const modelId = plan && plan.model.id;
    const stages = Object.fromEntries(((plan && plan.shards) || []).map((s) => [s.node_id, s]));
    const rtt = Object.fromEntries(topology.edges.filter((e) => e.from === self).map((e) => [e.to, e.rtt_ms]));
    const cards = Object.entries(topology.nodes).map(([id, caps]) => {
      const stage = stages[id];
      const measured = modelId && caps.layer_times && caps.layer_times[modelId];
      const facts = [
        [gb(caps.memory), "memory"],
        [num(caps.flops.fp16), "fp16 TFLOPS"],
        [num(caps.memory_bandwidth), "GB/s"],
        [measured ? `${num(measured.decode_ms)} ms` : "–", measured ? "per layer, measured" : "per layer: not measured"],
        [id === self ? "–" : rtt[id] ? `${num(rtt[id])} ms` : "–", id === self ? "RTT (this node)" : "RTT from this node"],
      ];
      return el("div", { className: "node", style: `--node: ${colors[id]}` },
        el("div", { className: "node-head" }, el("span", { className: "dot" }), el("span", { className: "node-id", title: id }, short(id)),
          id === self && el("span", { className: "badge" }, "this node"),
          el("span", { className: "layers" }, stage ? `layers ${stage.start_layer}–${stage.end_layer}` : "no layers")),
        el("div", { className: "device" }, `${caps.model} · ${caps.chip}`),
        el("div", { className: "facts" }, ...facts.map(([value, label]) => el("span", {}, el("b", {}, value), ` ${label}`))),
        ...(caps.transfers || []).map(transfer));
    });
    view.nodes.replaceChildren(...cards);
  }

  // A model file arriving at a node: a bar, the share and size received, and where from.
  function transfer(t) {
    const share = t.total_bytes ? t.received_bytes / t.total_bytes : 0;
    return el("div", { className: "transfer", title: t.name },
      el("progress", { max: 1, value: share }),
      el("span", {}, `${t.name.split("/").pop()}: ${num(share * 100, 2)}% of ${mb(t.total_bytes)} from ${t.source || "…"}`));
  }

  // What a ring node still fetches for its stage, and how long at the measured link from a node that holds it.
  function fetches(download) {
    if (!download || !download.bytes) return null;
    return ` · fetches ${mb(download.bytes)}${download.seconds === null ? "" : ` (about ${num(download.seconds, 2)} s)`}`;
  }

  function drawPlan(plan, colors, planError) {
    if (!plan) {
      view.plan.replaceChildren(el("p", { className: "error inline" }, `No plan: ${planError}`));
      return;
    }
    const total = plan.model.n_layers;
    const bar = el("div", { className: "layer-bar", title: `${total} layers of ${plan.model.id}` },
      ...plan.shards.map((s) => el("div", { className: "segment", style: `flex: ${s.end_layer - s.start_layer + 1}; background: ${colors[s.node_id]}` },
        `${short(s.node_id)} ${s.start_layer}–${s.end_layer}`)));
    const downloads = Object.fromEntries((plan.downloads || []).map((d) => [d.node_id, d]));
    const order = el("ol", { className: "ring-order" }, ...plan.shards.map((s) =>
      el("li", {}, el("span", { className: "dot", style: `--node: ${colors[s.node_id]}` }), el("b", { title: s.node_id }, short(s.node_id)),
        ` layers ${s.start_layer}–${s.end_layer} (${s.end_layer - s.start_layer + 1} of ${total})`, fetches(downloads[s.node_id]))));
    const p = plan.predicted;
    const load = plan.load || {};
    const assumes = plan.assumes || { prompt_tokens: 128, batch: plan.params.batch };
    const parts = [
      el("p", { className: "plan-head" }, el("b", {}, plan.model.id), ` · strategy ${plan.strategy}, objective ${plan.objective} · `,
        plan.shards.length === 1 ? `one node holds every layer` : `ring ${plan.shards.map((s) => short(s.node_id)).concat(short(plan.shards[0].node_id)).join(" → ")}`),
      bar, order,
      el("div", { className: "stats" },
        stat("predicted time per token", ms(p.tpot_ms), "TPOT, one request alone"),
        stat("predicted tokens/s", num(p.tokens_per_second), "one request alone"),
        stat("predicted throughput", `${num(p.throughput_tps)} tokens/s`, `all requests, batch ${assumes.batch} per stage`),
        stat("predicted time to first token", ms(p.ttft_ms), `TTFT, a ${assumes.prompt_tokens}-token prompt`),
        contextStat(plan)),
      lastRequest(plan.last_request),
      el("p", { className: "muted" }, `Now: ${count(load.active_requests || 0, "request")} running on this node, ${load.waiting_requests || 0} waiting at its `
        + `stage, decode batch ${num(load.mean_batch || 0, 2)} of at most ${load.max_batch || 1}, ${num(load.tokens_per_s || 0)} tokens/s over the last seconds.`),
      ...(plan.warnings || []).map((w) => el("p", { className: "warning" }, w)),
      p.feasible === false && el("p", { className: "warning" }, "The planner says this ring does not fit its devices' memory."),
    ];
    view.plan.replaceChildren(...parts.filter(Boolean));
  }

  // The context the plan reserves KV for, per request (prompt and answer); the model's, when the cluster holds less of it.
  function contextStat(plan) {
    const full = Math.min(plan.model.context_tokens, 8192);
    const note = plan.context_tokens < full ? `of the model's ${full}` : "prompt and answer";
    return stat("planned context", `${plan.context_tokens} tokens`, note);
  }

  // The last request the node received, whatever its outcome: measured from its start to its end at this node, against what its
  // plan predicts for its own prompt and answer (the node computes it: TTFT for its prompt + (tokens − 1) × TPOT).
  function lastRequest(last) {
    if (!last) return el("p", { className: "muted" }, "No request yet: send a message to compare the prediction with a measurement.");
    const n = last.tokens, predictedS = last.predicted_s;
    const outcome = { stop: "finished", length: "cut at the token limit", cancelled: "stopped before its end", failed: `failed: ${last.error}` }[last.outcome] || last.outcome;
    const row = (label, predicted, measured) => el("tr", {}, el("th", {}, label), el("td", {}, predicted), el("td", {}, measured));
    const perToken = (s) => (n ? `${num((s * 1000) / n)} ms` : "–");
    return el("div", { className: "last" },
      el("p", { className: "last-head" }, el("b", {}, "Last request"), ` · ${last.model} on ${last.ring.map(short).join(" → ")} · ${last.prompt_tokens}-token prompt, `
        + `${count(n, "token")} answered · `, el("span", { className: `outcome ${last.outcome}` }, outcome)),
      el("table", {},
        el("thead", {}, el("tr", {}, el("th", {}), el("th", {}, "predicted"), el("th", {}, "measured"))),
        el("tbody", {},
          row("whole request", predictedS === null ? "–" : `${num(predictedS)} s`, `${num(last.elapsed_s)} s`),
          row("time per token", predictedS === null ? "–" : perToken(predictedS), perToken(last.elapsed_s)))),
      el("p", { className: "note" }, `Measured at this node from the request's start to its end (a node's first request also loads its engine). Predicted `
        + `by the plan it ran on for its own ${last.prompt_tokens}-token prompt: time to first token + (tokens − 1) × time per token.`));
  }

  function drawLinks(topology) {
    const edges = topology.edges;
    if (!edges.length) {
      view.links.replaceChildren(el("p", { className: "muted" }, "No links: this node is alone."));
      return;
    }
    view.links.replaceChildren(el("table", { className: "links" },
      el("thead", {}, el("tr", {}, el("th", {}, "from"), el("th", {}, "to"), el("th", {}, "RTT"))),
      el("tbody", {}, ...edges.map((e) => el("tr", {}, el("td", { title: e.from }, short(e.from)), el("td", { title: e.to }, short(e.to)), el("td", {}, e.rtt_ms ? `${num(e.rtt_ms)} ms` : "–"))))));
  }

  async function poll() {
    try {
      const [topology, plan] = await Promise.all([getJSON("v1/topology"), getJSON("v1/plan").catch((e) => e)]);
      const ids = Object.keys(topology.nodes).sort();
      const colors = Object.fromEntries(ids.map((id, i) => [id, COLORS[i % COLORS.length]]));
      const planned = plan instanceof Error ? null : plan;
      drawNodes(topology, planned, colors);
      drawPlan(planned, colors, plan instanceof Error ? plan.message : "");
      drawLinks(topology);
      view.error.hidden = true;
      view.status.className = "status ok";
      view.status.textContent = `${planned ? `node ${short(planned.node_id)} · ` : ""}${count(ids.length, "node")} in the cluster`;
      view.updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      view.error.textContent = `Cannot reach the node at ${location.host}: ${e.message}. What is shown is from the last answer; retrying every ${POLL_MS / 1000} s.`;
      view.error.hidden = false;
      view.status.className = "status down";
      view.status.textContent = "node unreachable";
    }
    setTimeout(poll, POLL_MS);
  }

  poll();
})();
