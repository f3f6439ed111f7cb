#include "ultramem/serve/openai_api.h"

#include <cmath>
#include <limits>

namespace ultramem::serve {

using nlohmann::json;

json error_body(const ApiError& e) {
  return {{"error",
           {{"message", e.what()},
            {"type", e.type},
            {"param", e.param.empty() ? json(nullptr) : json(e.param)},
            {"code", nullptr}}}};
}

namespace {

ApiError bad(const std::string& param, const std::string& message) { return ApiError(400, message, param); }

// A present, non-null field; absent and null read as "not given".
const json* field(const json& body, const char* name) {
  const auto it = body.find(name);
  return it == body.end() || it->is_null() ? nullptr : &*it;
}

double number(const json& body, const char* name, double def, double lo, double hi, const char* range) {
  const json* v = field(body, name);
  if (!v) return def;
  if (!v->is_number()) throw bad(name, std::string("'") + name + "' must be a number, got " + v->type_name());
  const double x = v->get<double>();
  if (!std::isfinite(x) || x < lo || x > hi) throw bad(name, std::string("'") + name + "' must be " + range + ", got " + v->dump());
  return x;
}

int64_t integer(const json& body, const char* name, int64_t def, int64_t lo, int64_t hi) {
  const json* v = field(body, name);
  if (!v) return def;
  if (!v->is_number()) throw bad(name, std::string("'") + name + "' must be an integer, got " + v->type_name());
  if (v->is_number_unsigned()) {
    const uint64_t u = v->get<uint64_t>();
    if (u <= uint64_t(hi) && int64_t(u) >= lo) return int64_t(u);
  } else if (v->is_number_integer()) {
    const int64_t x = v->get<int64_t>();
    if (x >= lo && x <= hi) return x;
  } else {  // 8.0 reads as 8: JavaScript clients send whole numbers as floats at times
    const double d = v->get<double>();
    if (std::isfinite(d) && d == std::floor(d) && d >= double(lo) && d <= double(hi) && d < 9.2e18) return int64_t(d);
  }
  throw bad(name, std::string("'") + name + "' must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                      "], got " + v->dump());
}

bool boolean(const json& body, const char* name, bool def) {
  const json* v = field(body, name);
  if (!v) return def;
  if (!v->is_boolean()) throw bad(name, std::string("'") + name + "' must be a boolean, got " + v->type_name());
  return v->get<bool>();
}

std::string string_field(const json& body, const char* name, bool required) {
  const json* v = field(body, name);
  if (!v) {
    if (required) throw bad(name, std::string("'") + name + "' is required");
    return "";
  }
  if (!v->is_string()) throw bad(name, std::string("'") + name + "' must be a string, got " + v->type_name());
  return v->get<std::string>();
}

}  // namespace

CompletionRequest parse_completion_request(const std::string& body_text, bool chat) {
  json body;
  try {
    body = json::parse(body_text);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e400
    throw ApiError(400, std::string("the request body is not valid JSON: ") + e.what());
  }
  if (!body.is_object()) throw ApiError(400, std::string("the request body must be a JSON object, got ") + body.type_name());
  CompletionRequest r;
  r.chat = chat;
  r.model = string_field(body, "model", false);
  if (chat) {
    const json* m = field(body, "messages");
    if (!m) throw bad("messages", "'messages' is required");
    if (!m->is_array() || m->empty()) throw bad("messages", "'messages' must be a non-empty array of {role, content}");
    for (size_t i = 0; i < m->size(); ++i) {
      const json& msg = (*m)[i];
      const std::string where = "messages[" + std::to_string(i) + "]";
      if (!msg.is_object()) throw bad(where, where + " must be an object {role, content}");
      ChatMessage cm;
      const json* role = field(msg, "role");
      if (!role || !role->is_string()) throw bad(where + ".role", where + ".role must be a string");
      cm.role = role->get<std::string>();
      if (cm.role == "developer") cm.role = "system";
      if (cm.role != "system" && cm.role != "user" && cm.role != "assistant")
        throw bad(where + ".role", where + ".role must be system, user or assistant, got '" + cm.role + "'");
      const json* content = field(msg, "content");
      if (content && content->is_string()) {
        cm.content = content->get<std::string>();
      } else if (content && content->is_array()) {  // [{type: "text", text}] parts
        for (const json& part : *content) {
          const json* type = part.is_object() ? field(part, "type") : nullptr;
          const json* text = part.is_object() ? field(part, "text") : nullptr;
          if (!type || !type->is_string() || *type != "text" || !text || !text->is_string())
            throw bad(where + ".content", where + ".content parts must be {type: 'text', text}: only text is served");
          cm.content += text->get<std::string>();
        }
      } else {
        throw bad(where + ".content", where + ".content must be a string");
      }
      r.messages.push_back(std::move(cm));
    }
    r.prompt = render_chat(r.messages);
  } else {
    const json* p = field(body, "prompt");
    if (!p) throw bad("prompt", "'prompt' is required");
    if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) {
      r.prompt = (*p)[0].get<std::string>();
    } else if (p->is_string()) {
      r.prompt = p->get<std::string>();
    } else {
      throw bad("prompt", "'prompt' must be a string (or an array of one string)");
    }
  }
  constexpr int64_t kMaxTokens = int64_t(1) << 31;
  const char* max_name = chat && field(body, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  r.max_tokens_given = field(body, max_name) != nullptr;
  r.max_tokens = integer(body, max_name, 16, 0, kMaxTokens);
  r.temperature = number(body, "temperature", 1.0, 0.0, 2.0, "in [0, 2]");
  r.top_p = number(body, "top_p", 1.0, 0.0, 1.0, "in (0, 1]");
  if (r.top_p <= 0) throw bad("top_p", "'top_p' must be in (0, 1], got 0");
  r.top_k = integer(body, "top_k", 0, 0, kMaxTokens);
  if (field(body, "seed")) r.seed = static_cast<uint64_t>(integer(body, "seed", 0, 0, std::numeric_limits<int64_t>::max()));
  r.n = integer(body, "n", 1, 1, 16);
  r.stream = boolean(body, "stream", false);
  r.ignore_eos = boolean(body, "ignore_eos", false);
  if (const json* so = field(body, "stream_options")) {
    if (!so->is_object()) throw bad("stream_options", "'stream_options' must be an object");
    r.include_usage = boolean(*so, "include_usage", false);
  }
  if (const json* st = field(body, "stop")) {
    if (st->is_string()) {
      r.stop.push_back(st->get<std::string>());
    } else if (st->is_array()) {
      if (st->size() > 4) throw bad("stop", "'stop' holds at most 4 strings, got " + std::to_string(st->size()));
      for (const json& s : *st) {
        if (!s.is_string()) throw bad("stop", "'stop' must be a string or an array of strings");
        r.stop.push_back(s.get<std::string>());
      }
    } else {
      throw bad("stop", "'stop' must be a string or an array of strings");
    }
    for (const auto& s : r.stop)
      if (s.empty()) throw bad("stop", "'stop' strings must not be empty");
  }
  if (chat)
    for (const auto& s : chat_stop_strings()) r.stop.push_back(s);
  return r;
}

std::string render_chat(const std::vector<ChatMessage>& messages) {
  std::string out;
  for (const auto& m : messages) {
    const char* who = m.role == "system" ? "System" : m.role == "user" ? "User" : "Assistant";
    out += who;
    out += ": ";
    out += m.content;
    out += "\n\n";
  }
  out += "Assistant:";
  return out;
}

const std::vector<std::string>& chat_stop_strings() {
  static const std::vector<std::string> s = {"\nUser:", "\nSystem:", "\nAssistant:"};
  return s;
}

size_t complete_utf8_prefix(const std::string& s) {
  // Walk back over at most 3 continuation bytes to the last lead byte; keep it only when its character
  // is complete.
  size_t n = s.size();
  size_t i = n;
  int back = 0;
  while (i > 0 && back < 4) {
    const auto c = static_cast<unsigned char>(s[i - 1]);
    if ((c & 0xC0) != 0x80) {  // a lead byte (or ASCII)
      const size_t need = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
      return n - (i - 1) >= need ? n : i - 1;
    }
    --i;
    ++back;
  }
  return n;  // not UTF-8 (stray continuation bytes): send as is
}

std::string StopText::push(const std::string& decoded) {
  if (stopped_) return "";
  decoded_ = decoded;
  // The first stop string in the text decoded so far ends it.
  size_t cut = std::string::npos;
  for (const auto& s : stops_) {
    const size_t at = decoded_.find(s);
    if (at != std::string::npos && at < cut) cut = at;
  }
  size_t safe;
  if (cut != std::string::npos) {
    stopped_ = true;
    safe = cut;
  } else {
    // Hold back a tail that could still grow into a stop string.
    safe = decoded_.size();
    for (const auto& s : stops_)
      for (size_t k = std::min(s.size() - 1, decoded_.size()); k > 0; --k)
        if (decoded_.compare(decoded_.size() - k, k, s, 0, k) == 0) {
          safe = std::min(safe, decoded_.size() - k);
          break;
        }
    safe = std::min(safe, complete_utf8_prefix(decoded_));
  }
  if (safe <= sent_.size() || decoded_.compare(0, sent_.size(), sent_) != 0) return "";
  std::string out = decoded_.substr(sent_.size(), safe - sent_.size());
  sent_ += out;
  return out;
}

std::string StopText::finish() {
  if (stopped_ || decoded_.size() <= sent_.size() || decoded_.compare(0, sent_.size(), sent_) != 0) return "";
  std::string out = decoded_.substr(sent_.size());
  sent_ += out;
  return out;
}

json usage_json(const Usage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens}};
}

json completion_body(const std::string& id, int64_t created, const std::string& model, const std::vector<Choice>& choices,
                     const Usage& usage, bool chat) {
  json cs = json::array();
  for (const auto& c : choices) {
    if (chat)
      cs.push_back({{"index", c.index},
                    {"message", {{"role", "assistant"}, {"content", c.text}}},
                    {"finish_reason", c.finish_reason},
                    {"logprobs", nullptr}});
    else
      cs.push_back({{"index", c.index}, {"text", c.text}, {"finish_reason", c.finish_reason}, {"logprobs", nullptr}});
  }
  return {{"id", id},
          {"object", chat ? "chat.completion" : "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", cs},
          {"usage", usage_json(usage)}};
}

json chunk_body(const std::string& id, int64_t created, const std::string& model, int64_t index, const std::string& text,
                const std::string& finish_reason, bool chat, bool role) {
  json choice = {{"index", index}, {"finish_reason", finish_reason.empty() ? json(nullptr) : json(finish_reason)},
                 {"logprobs", nullptr}};
  if (chat) {
    json delta = json::object();
    if (role) delta["role"] = "assistant";
    if (!text.empty() || role) delta["content"] = text;
    choice["delta"] = delta;
  } else {
    choice["text"] = text;
  }
  return {{"id", id},
          {"object", chat ? "chat.completion.chunk" : "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", json::array({choice})}};
}

json usage_chunk_body(const std::string& id, int64_t created, const std::string& model, const Usage& usage, bool chat) {
  return {{"id", id},
          {"object", chat ? "chat.completion.chunk" : "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", json::array()},
          {"usage", usage_json(usage)}};
}

std::string finish_reason(const std::string& end_reason) {
  return end_reason == "eos" || end_reason == "stop" ? "stop" : "length";
}

}  // namespace ultramem::serve
