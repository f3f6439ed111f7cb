// serve::parse_completion_request on one body, as a completion and as a chat completion. Refusals:
// serve::ApiError with status 400 only (openai_api.h): anything else would reach the client as a 500. A
// request it accepts holds what the header promises (n in 1..16, at most 4 non-empty stop strings, ...).
#include <stdexcept>

#include "fuzz_common.h"
#include "ultramem/serve/openai_api.h"

using namespace ultramem;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string body(reinterpret_cast<const char*>(data), size);
  for (const bool chat : {false, true}) {
    try {
      const serve::CompletionRequest r = serve::parse_completion_request(body, chat);
      if (r.chat != chat) fuzz::finding("openai_api", "chat flag not kept");
      if (r.n < 1 || r.n > 16) fuzz::finding("openai_api", "n outside 1..16 accepted");
      if (r.stop.size() > 4) fuzz::finding("openai_api", "more than 4 stop strings accepted");
      for (const auto& s : r.stop)
        if (s.empty()) fuzz::finding("openai_api", "an empty stop string accepted");
      if (r.max_tokens_given && r.max_tokens < 0) fuzz::finding("openai_api", "negative max_tokens accepted");
      if (chat && r.prompt != serve::render_chat(r.messages)) fuzz::finding("openai_api", "chat prompt is not the template");
      if (!chat && !r.messages.empty()) fuzz::finding("openai_api", "messages in a completion request");
    } catch (const serve::ApiError& e) {
      if (e.status != 400) fuzz::finding("openai_api", "a refusal with status " + std::to_string(e.status));
      (void)serve::error_body(e).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);  // as the server sends it
    } catch (const std::exception& e) {
      fuzz::finding("openai_api", std::string("undocumented exception: ") + e.what());
    }
  }
  return 0;
}
