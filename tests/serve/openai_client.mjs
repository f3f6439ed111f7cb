// Checks `ultramem serve` with the official OpenAI SDK: models, completions (plain, streamed, n, stop),
// chat completions (plain, streamed) and 400 errors. Prints one line per passed check.
//
// Usage: node openai_client.mjs BASE_URL MODEL_ID      (BASE_URL like http://127.0.0.1:8080/v1)
// Exit status: 0 when every check passes; 1 (with the reason on stderr) at the first failure.
import OpenAI from 'openai';

const [baseURL, model] = process.argv.slice(2);
if (!baseURL || !model) {
  console.error('usage: node openai_client.mjs BASE_URL MODEL_ID');
  process.exit(2);
}

const client = new OpenAI({ baseURL, apiKey: 'none', maxRetries: 0, timeout: 60_000 });
const FINISH = ['stop', 'length'];

// Throws (ending the run with exit 1) when cond is false.
function check(cond, what) {
  if (!cond) throw new Error(what);
}
function pass(what) {
  console.log(`ok   ${what}`);
}
const show = (v) => JSON.stringify(v);

// Checks one non-streamed completion with a single choice and returns that choice.
function checkCompletion(r, maxTokens) {
  check(r.object === 'text_completion', `object is ${show(r.object)}, want "text_completion"`);
  check(r.choices?.length === 1, `want 1 choice, got ${show(r.choices)}`);
  const c = r.choices[0];
  check(typeof c.text === 'string', `choice text is not a string: ${show(c)}`);
  check(FINISH.includes(c.finish_reason), `finish_reason ${show(c.finish_reason)} is not stop/length`);
  const u = r.usage;
  check(u && u.prompt_tokens > 0, `usage.prompt_tokens must be > 0: ${show(u)}`);
  check(Number.isInteger(u.completion_tokens) && u.completion_tokens >= 1 && u.completion_tokens <= maxTokens,
    `usage.completion_tokens must be in 1..${maxTokens}: ${show(u)}`);
  check(u.total_tokens === u.prompt_tokens + u.completion_tokens, `usage.total_tokens is not the sum: ${show(u)}`);
  return c;
}

// Runs request() and checks it fails with an HTTP 400 carrying an OpenAI-style error object.
async function expect400(what, request) {
  let result;
  try {
    result = await request();
  } catch (err) {
    check(err instanceof OpenAI.APIError, `${what}: want an OpenAI.APIError, got ${err}`);
    check(err.status === 400, `${what}: want status 400, got ${err.status} (${err.message})`);
    // err.error is the body's "error" object: {message, type, param, code}.
    check(typeof err.error?.message === 'string' && err.error.message.length > 0,
      `${what}: the error body has no error.message: ${show(err.error)}`);
    check(err.error.type === 'invalid_request_error', `${what}: error.type is ${show(err.error.type)}`);
    pass(`${what} -> 400 (${err.error.message})`);
    return;
  }
  throw new Error(`${what}: want HTTP 400, but the request succeeded: ${show(result).slice(0, 200)}`);
}

async function main() {
  // Models: the served model is listed.
  const models = await client.models.list();
  const ids = models.data.map((m) => m.id);
  check(ids.includes(model), `GET /models lists ${show(ids)}, not ${show(model)}`);
  pass(`models.list contains ${model}`);

  // Greedy completion, twice: same text both times.
  const body = { model, prompt: 'The people', max_tokens: 8, temperature: 0, seed: 1 };
  const first = checkCompletion(await client.completions.create(body), 8);
  const T = first.text;
  pass(`completion ${show(T)} (finish_reason ${first.finish_reason})`);
  const again = checkCompletion(await client.completions.create(body), 8);
  check(again.text === T, `greedy completion is not deterministic: ${show(T)} then ${show(again.text)}`);
  pass('greedy completion repeats');

  // Streamed greedy completion: the chunks add up to the same text and finish_reason.
  let streamed = '';
  let streamedFinish = null;
  for await (const chunk of await client.completions.create({ ...body, stream: true })) {
    for (const c of chunk.choices) {
      check(c.index === 0, `stream chunk for choice ${c.index}, want only 0`);
      streamed += c.text ?? '';
      if (c.finish_reason) streamedFinish = c.finish_reason;
    }
  }
  check(streamed === T, `streamed text ${show(streamed)} != non-streamed ${show(T)}`);
  check(streamedFinish === first.finish_reason,
    `streamed finish_reason ${show(streamedFinish)} != non-streamed ${show(first.finish_reason)}`);
  pass('streamed completion equals the non-streamed one');

  // n = 3 sampled choices, indexed 0, 1, 2.
  const multi = await client.completions.create({ model, prompt: 'The people', n: 3, temperature: 1, seed: 5, max_tokens: 6 });
  const indexes = (multi.choices ?? []).map((c) => c.index).sort((a, b) => a - b);
  check(show(indexes) === '[0,1,2]', `n=3: want choice indexes [0,1,2], got ${show(indexes)}`);
  check(multi.choices.every((c) => typeof c.text === 'string'), `n=3: a choice has no text: ${show(multi.choices)}`);
  pass('n=3 gives choices 0, 1, 2');

  // Stop string: a piece of T cuts the greedy text just before its first occurrence.
  if (T.length >= 4) {
    const stop = T.slice(2, 4);
    const want = T.slice(0, T.indexOf(stop));
    const r = await client.completions.create({ ...body, stop: [stop] });
    const c = r.choices?.[0];
    check(c?.text === want, `stop ${show(stop)}: text ${show(c?.text)}, want ${show(want)}`);
    check(c.finish_reason === 'stop', `stop ${show(stop)}: finish_reason ${show(c.finish_reason)}, want "stop"`);
    pass(`stop ${show(stop)} cuts the text to ${show(want)}`);
  } else {
    pass(`stop check skipped: greedy text ${show(T)} is shorter than 4 characters`);
  }

  // Chat completion, plain then streamed: same content.
  const chatBody = {
    model,
    messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'The people' }],
    max_tokens: 8,
    temperature: 0,
  };
  const chat = await client.chat.completions.create(chatBody);
  check(chat.object === 'chat.completion', `chat object is ${show(chat.object)}, want "chat.completion"`);
  const msg = chat.choices?.[0]?.message;
  check(msg?.role === 'assistant', `chat message role is ${show(msg?.role)}, want "assistant"`);
  check(typeof msg.content === 'string', `chat message content is not a string: ${show(msg)}`);
  check(FINISH.includes(chat.choices[0].finish_reason), `chat finish_reason ${show(chat.choices[0].finish_reason)}`);
  pass(`chat completion ${show(msg.content)}`);
  let chatStreamed = '';
  for await (const chunk of await client.chat.completions.create({ ...chatBody, stream: true })) {
    for (const c of chunk.choices) chatStreamed += c.delta?.content ?? '';
  }
  check(chatStreamed === msg.content, `streamed chat content ${show(chatStreamed)} != non-streamed ${show(msg.content)}`);
  pass('streamed chat completion equals the non-streamed one');

  // Invalid requests: each must be refused with 400 and an error message.
  await expect400('max_tokens -1', () => client.completions.create({ model, prompt: 'The people', max_tokens: -1 }));
  // The SDK sends the body as given, so a wrong type reaches the server (no cast needed in plain JS).
  await expect400('temperature "hot"', () => client.completions.create({ model, prompt: 'The people', temperature: 'hot' }));
  await expect400('missing prompt', () => client.completions.create({ model, max_tokens: 8 }));
  await expect400('prompt longer than the context',
    () => client.completions.create({ model, prompt: 'The people '.repeat(5000), max_tokens: 8 }));
  await expect400('chat with no messages', () => client.chat.completions.create({ model, messages: [], max_tokens: 8 }));

  console.log('openai_client: all checks passed');
}

main().catch((err) => {
  // A network error's reason (e.g. ECONNREFUSED) is in its chain of causes.
  let reason = err.message;
  for (let e = err.cause; e; e = e.cause) reason += ` (${e.message ?? e})`;
  console.error(`openai_client: FAIL: ${reason}`);
  process.exit(1);
});
