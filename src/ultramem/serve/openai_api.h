// The OpenAI-compatible request and response bodies of `ultramem serve`, without HTTP: parsing and
// validating a JSON body into a request, the chat template, stop strings over streamed text, and the
// response and error bodies. Pure functions of their inputs (the server, tests and fuzz harnesses call
// them alike).
#pragma once
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace ultramem::serve {

// A request the server refuses: HTTP status, message and the offending field (empty: none), rendered as
// an OpenAI error body by error_body().
struct ApiError : std::runtime_error {
  ApiError(int status_, const std::string& message, std::string param_ = "", std::string type_ = "invalid_request_error")
      : std::runtime_error(message), status(status_), param(std::move(param_)), type(std::move(type_)) {}
  int status;
  std::string param;
  std::string type;
};

// {"error": {"message", "type", "param" (null when none), "code": null}}
nlohmann::json error_body(const ApiError& e);

struct ChatMessage {
  std::string role;     // "system", "user" or "assistant"
  std::string content;
};

// A completion or chat completion request, validated.
struct CompletionRequest {
  bool chat = false;
  std::string model;                 // as sent ("" when absent)
  std::string prompt;                // completions: the prompt; chat: the rendered template
  std::vector<ChatMessage> messages; // chat only
  int64_t max_tokens = 16;           // completions default 16; chat default: what the context leaves
  bool max_tokens_given = false;
  double temperature = 1.0;
  double top_p = 1.0;
  int64_t top_k = 0;                 // non-standard; 0: all tokens
  std::optional<uint64_t> seed;      // absent: a random seed per request
  std::vector<std::string> stop;     // up to 4 non-empty strings
  int64_t n = 1;                     // choices, 1..16 (choice i samples with seed + i)
  bool stream = false;
  bool include_usage = false;        // stream_options.include_usage
  bool ignore_eos = false;           // non-standard: keep sampling past eos (benchmarks)
};

// Parses a /v1/completions (chat = false) or /v1/chat/completions body. ApiError 400 naming the field
// for malformed JSON, a missing or ill-typed field, or a value out of range. Unknown fields are
// ignored, as OpenAI's own server does for most of them.
CompletionRequest parse_completion_request(const std::string& body, bool chat);

// The chat template (the models are base language models): each message on its own paragraph as
// "System: ...", "User: ..." or "Assistant: ...", then "Assistant:" for the reply. The reply stops at
// chat_stop_strings() (a new turn).
std::string render_chat(const std::vector<ChatMessage>& messages);
const std::vector<std::string>& chat_stop_strings();

// Text produced token by token, cut at the first stop string. push() takes the whole text decoded so
// far (a prefix of the next push, except that a byte-fallback piece may complete a character later) and
// returns the text safe to send now: nothing past a stop string, nothing that could still become the
// start of one, no incomplete UTF-8 character. stopped() tells whether a stop string was met; finish()
// returns what is left when the sequence ends otherwise.
class StopText {
 public:
  explicit StopText(std::vector<std::string> stops) : stops_(std::move(stops)) {}
  std::string push(const std::string& decoded);
  std::string finish();
  bool stopped() const { return stopped_; }
  const std::string& text() const { return sent_; }  // everything returned so far

 private:
  std::vector<std::string> stops_;
  std::string decoded_;
  std::string sent_;
  bool stopped_ = false;
};

// Length of the longest prefix of s that ends on a complete UTF-8 character.
size_t complete_utf8_prefix(const std::string& s);

struct Usage {
  int64_t prompt_tokens = 0, completion_tokens = 0;
};
nlohmann::json usage_json(const Usage& u);

struct Choice {
  int64_t index = 0;
  std::string text;
  std::string finish_reason;  // "stop" or "length"
};

// Whole (non-streamed) response bodies.
nlohmann::json completion_body(const std::string& id, int64_t created, const std::string& model,
                               const std::vector<Choice>& choices, const Usage& usage, bool chat);
// One streamed chunk: text (chat: delta content; `role` adds the assistant role to the delta), and
// finish_reason when the choice ends ("" : null).
nlohmann::json chunk_body(const std::string& id, int64_t created, const std::string& model, int64_t index,
                          const std::string& text, const std::string& finish_reason, bool chat, bool role = false);
// The usage chunk of stream_options.include_usage (choices empty).
nlohmann::json usage_chunk_body(const std::string& id, int64_t created, const std::string& model, const Usage& usage,
                                bool chat);

// OpenAI's finish_reason for a scheduler end reason: eos / stop -> "stop"; max_tokens / context_full ->
// "length".
std::string finish_reason(const std::string& end_reason);

}  // namespace ultramem::serve
