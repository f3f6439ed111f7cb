// Load test of `ultramem serve`: many concurrent seeded completions, then the same requests one at a time.
// The server promises that a request's text does not depend on what else is in the batch, so both runs
// must give the same text for every request.
//
// Usage: node load_test.mjs BASE_URL MODEL_ID [CLIENTS=64] [PER_CLIENT=8]   (BASE_URL like http://127.0.0.1:8080/v1)
//   Phase 1: CLIENTS concurrent loops, each sending its PER_CLIENT requests one after another.
//   Phase 2: the same CLIENTS*PER_CLIENT requests, one at a time.
// Checks: every request gets HTTP 200 in both phases (429/503 count as failures: the server must be
// started with a queue that holds CLIENTS requests), each request is answered exactly once, the
// response ids of phase 1 are all different, and each request's text is the same in both phases.
// Exit status: 0 when every check passes; 1 with the failures on stderr otherwise.

const [baseURL, model, clientsArg = '64', perClientArg = '8'] = process.argv.slice(2);
const CLIENTS = Number(clientsArg);
const PER_CLIENT = Number(perClientArg);
if (!baseURL || !model || !(Number.isInteger(CLIENTS) && CLIENTS > 0) || !(Number.isInteger(PER_CLIENT) && PER_CLIENT > 0)) {
  console.error('usage: node load_test.mjs BASE_URL MODEL_ID [CLIENTS=64] [PER_CLIENT=8]');
  process.exit(2);
}

const PROMPTS = [
  'The people',
  'Congress shall',
  'Our nation is',
  'The state of the Union',
  'We must',
  'In the coming year',
  'The government of the United States',
  'Fellow citizens,',
];
const TIMEOUT_MS = 300_000; // per request; phase 1 queues CLIENTS requests at once
const failures = [];

// The body of request i of client c: seeded sampling, so its text is fixed whatever runs beside it.
function requestBody(c, i) {
  const prompt = PROMPTS[(c * PER_CLIENT + i) % PROMPTS.length];
  return { model, prompt, max_tokens: 8, temperature: 0.9, seed: c * 1000 + i };
}

// POSTs one completion; returns {id, text, tokens} or records why it failed and returns null.
async function complete(phase, c, i) {
  const where = `phase ${phase}, client ${c}, request ${i}`;
  try {
    const res = await fetch(`${baseURL}/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(requestBody(c, i)),
      signal: AbortSignal.timeout(TIMEOUT_MS),
    });
    const raw = await res.text();
    if (res.status !== 200) {
      const retry = res.headers.get('retry-after');
      failures.push(`${where}: HTTP ${res.status}${retry ? ` (Retry-After ${retry})` : ''}: ${raw.slice(0, 200)}`);
      return null;
    }
    const r = JSON.parse(raw);
    const text = r.choices?.[0]?.text;
    if (typeof r.id !== 'string' || typeof text !== 'string') {
      failures.push(`${where}: no id or choices[0].text in ${raw.slice(0, 200)}`);
      return null;
    }
    return { id: r.id, text, tokens: r.usage?.completion_tokens ?? 0 };
  } catch (err) {
    failures.push(`${where}: ${err.name}: ${err.message}${err.cause ? ` (${err.cause.message ?? err.cause})` : ''}`);
    return null;
  }
}

// Stores an answer under its key, counting keys answered twice as failures.
function record(results, phase, c, i, answer) {
  if (!answer) return;
  const key = `${c}/${i}`;
  if (results.has(key)) failures.push(`phase ${phase}: request ${key} answered twice`);
  results.set(key, answer);
}

const tokensOf = (results) => [...results.values()].reduce((sum, a) => sum + a.tokens, 0);
const total = CLIENTS * PER_CLIENT;

// Phase 1: CLIENTS concurrent loops.
const phase1 = new Map();
let t0 = performance.now();
await Promise.all(Array.from({ length: CLIENTS }, async (_, c) => {
  for (let i = 0; i < PER_CLIENT; i++) record(phase1, 1, c, i, await complete(1, c, i));
}));
const secs1 = (performance.now() - t0) / 1000;

// Phase 2: the same requests, one at a time.
const phase2 = new Map();
t0 = performance.now();
for (let c = 0; c < CLIENTS; c++) {
  for (let i = 0; i < PER_CLIENT; i++) record(phase2, 2, c, i, await complete(2, c, i));
}
const secs2 = (performance.now() - t0) / 1000;

// Every key answered in both phases, phase-1 ids unique, same text in both phases.
const ids = new Map();
let mismatches = 0;
for (let c = 0; c < CLIENTS; c++) {
  for (let i = 0; i < PER_CLIENT; i++) {
    const key = `${c}/${i}`;
    const a = phase1.get(key);
    const b = phase2.get(key);
    if (!a || !b) {
      failures.push(`request ${key}: no answer in phase ${!a ? 1 : 2}`);
      continue;
    }
    if (ids.has(a.id)) failures.push(`phase 1: id ${a.id} given to both ${ids.get(a.id)} and ${key}`);
    else ids.set(a.id, key);
    if (a.text !== b.text) {
      mismatches++;
      failures.push(`request ${key}: concurrent text ${JSON.stringify(a.text)} != sequential ${JSON.stringify(b.text)}`);
    }
  }
}

const rate = (tokens, secs) => (secs > 0 ? tokens / secs : 0).toFixed(1);
console.log(`load_test: ${CLIENTS} clients x ${PER_CLIENT} = ${total} requests; ` +
  `phase 1 (concurrent): ${phase1.size}/${total} ok in ${secs1.toFixed(2)} s, ${rate(tokensOf(phase1), secs1)} tokens/s; ` +
  `phase 2 (sequential): ${phase2.size}/${total} ok in ${secs2.toFixed(2)} s, ${rate(tokensOf(phase2), secs2)} tokens/s; ` +
  `${mismatches} text mismatches`);
if (failures.length > 0) {
  for (const f of failures.slice(0, 20)) console.error(`load_test: FAIL: ${f}`);
  if (failures.length > 20) console.error(`load_test: ... and ${failures.length - 20} more failures`);
  process.exit(1);
}
console.log('load_test: all checks passed');
