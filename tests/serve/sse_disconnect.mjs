// Checks that `ultramem serve` frees a streamed request's sequence when the client goes away: starts a
// long streamed completion (ignore_eos, max_tokens 1000: the server must run with a context of more
// than 1000 tokens), reads its first server-sent event, aborts the connection, then waits for the
// Prometheus gauge ultramem_active_sequences to read 0 and the counter
// ultramem_sequences_total{reason="cancelled"} to have grown, and checks the server still answers.
//
// Usage: node sse_disconnect.mjs BASE_URL MODEL_ID      (BASE_URL like http://127.0.0.1:8080/v1)
// Exit status: 0 when every check passes; 1 (with the reason on stderr) at the first failure.

const [baseURL, model] = process.argv.slice(2);
if (!baseURL || !model) {
  console.error('usage: node sse_disconnect.mjs BASE_URL MODEL_ID');
  process.exit(2);
}
const metricsURL = `${baseURL.replace(/\/v1\/?$/, '')}/metrics`;
const GAUGE_TIMEOUT_MS = 10_000;

function check(cond, what) {
  if (!cond) throw new Error(what);
}
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Reads the gauge ultramem_active_sequences from GET /metrics (Prometheus text format).
async function activeSequences() {
  const res = await fetch(metricsURL, { signal: AbortSignal.timeout(5_000) });
  const text = await res.text();
  check(res.status === 200, `GET ${metricsURL}: HTTP ${res.status}`);
  const m = text.match(/^ultramem_active_sequences(?:\{[^}]*\})?\s+(\S+)/m);
  check(m, `GET ${metricsURL} has no ultramem_active_sequences line`);
  return Number(m[1]);
}

// Reads ultramem_sequences_total{reason="cancelled"} (0 when no sequence was cancelled yet).
async function cancelledSequences() {
  const text = await (await fetch(metricsURL, { signal: AbortSignal.timeout(5_000) })).text();
  const m = text.match(/^ultramem_sequences_total\{reason="cancelled"\}\s+(\S+)/m);
  return m ? Number(m[1]) : 0;
}

async function main() {
  const cancelledBefore = await cancelledSequences();
  // Start a streamed completion and read up to the end of its first event ("data: {...}\n\n").
  const controller = new AbortController();
  const res = await fetch(`${baseURL}/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model, prompt: 'The people', max_tokens: 1000, ignore_eos: true, temperature: 0, stream: true }),
    signal: controller.signal,
  });
  if (res.status !== 200) throw new Error(`streamed completion: HTTP ${res.status}: ${(await res.text()).slice(0, 200)}`);
  check((res.headers.get('content-type') ?? '').startsWith('text/event-stream'),
    `streamed completion: content-type is ${res.headers.get('content-type')}, want text/event-stream`);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  while (!buffer.includes('\n\n')) {
    const { done, value } = await reader.read();
    check(!done, `the stream ended before its first event: ${JSON.stringify(buffer)}`);
    buffer += decoder.decode(value, { stream: true });
  }
  const event = buffer.slice(0, buffer.indexOf('\n\n'));
  check(event.startsWith('data: {'), `first event is not "data: {json}": ${JSON.stringify(event)}`);
  const chunk = JSON.parse(event.slice('data: '.length));
  check(chunk.object === 'text_completion', `first event's object is ${JSON.stringify(chunk.object)}`);
  const before = await activeSequences();
  check(before >= 1, `ultramem_active_sequences is ${before} while the 1000-token stream runs`);
  console.log(`ok   read the first event; ultramem_active_sequences = ${before} before the abort`);

  // Drop the connection, then wait for the server to notice and free the sequence.
  controller.abort();
  const deadline = Date.now() + GAUGE_TIMEOUT_MS;
  let active = await activeSequences();
  while (active !== 0) {
    check(Date.now() < deadline,
      `ultramem_active_sequences is still ${active} ${GAUGE_TIMEOUT_MS / 1000} s after the client disconnected`);
    await sleep(100);
    active = await activeSequences();
  }
  console.log(`ok   ultramem_active_sequences = 0 after the abort (${GAUGE_TIMEOUT_MS - (deadline - Date.now())} ms)`);
  const cancelled = await cancelledSequences();
  check(cancelled === cancelledBefore + 1,
    `ultramem_sequences_total{reason="cancelled"} went from ${cancelledBefore} to ${cancelled}, want one more`);
  console.log('ok   the sequence was cancelled, not run to its end');

  // The server still serves a plain request.
  const after = await fetch(`${baseURL}/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model, prompt: 'The people', max_tokens: 8, temperature: 0 }),
    signal: AbortSignal.timeout(60_000),
  });
  const raw = await after.text();
  check(after.status === 200, `completion after the disconnect: HTTP ${after.status}: ${raw.slice(0, 200)}`);
  const text = JSON.parse(raw).choices?.[0]?.text;
  check(typeof text === 'string', `completion after the disconnect has no choices[0].text: ${raw.slice(0, 200)}`);
  console.log(`ok   completion after the disconnect: ${JSON.stringify(text)}`);
  console.log('sse_disconnect: all checks passed');
}

main().catch((err) => {
  // A network error's reason (e.g. ECONNREFUSED) is in its chain of causes.
  let reason = err.message;
  for (let e = err.cause; e; e = e.cause) reason += ` (${e.message ?? e})`;
  console.error(`sse_disconnect: FAIL: ${reason}`);
  process.exit(1);
});
