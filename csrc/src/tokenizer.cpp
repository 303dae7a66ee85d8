#include "fastenc/tokenizer.hpp"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <utility>

#include "fastenc/error.hpp"

namespace fastenc {
namespace {

struct Target {
  const char* name;
  int length;
  bool masked;
};

// fastenc/targets.py's rows (name, max_sequence_length, whether the pipeline passes the mask to T5),
// without wan, whose pipeline also cleans the prompts and zeroes the embeddings past each prompt.
constexpr std::array<Target, 10> kTargets{{
    {"flux-dev", 512, false},
    {"flux-schnell", 256, false},
    {"sd3", 256, false},
    {"sd3.5", 256, false},
    {"pixart-alpha", 120, true},
    {"pixart-sigma", 300, true},
    {"chroma", 512, true},
    {"ltx-video", 128, false},
    {"cogvideox", 226, false},
    {"mochi", 256, true},
}};

const Target& find_target(const std::string& target) {
  for (const auto& t : kTargets) {
    if (target == t.name) return t;
  }
  if (target == "wan") {
    throw Error("target 'wan': its pipeline cleans the prompts (ftfy, HTML entities, whitespace) and zeroes the "
                "embeddings past each prompt, which fastenc-embed does not do; use the Python API "
                "(encode(prompts, target=\"wan\")) or `fastenc triton-repo --target wan`");
  }
  throw Error("unknown target '" + target + "'; choose one of " + known_targets());
}

}  // namespace

int max_length_for(const std::string& target) { return find_target(target).length; }

bool target_uses_mask(const std::string& target) { return find_target(target).masked; }

std::string known_targets() {
  std::string out;
  for (const auto& t : kTargets) {
    if (!out.empty()) out += ", ";
    out += t.name;
  }
  return out;
}

Tokenizer::Tokenizer(const std::string& spiece_model_path)
    : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()), path_(spiece_model_path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_regular_file(spiece_model_path, ec)) {
    throw Error(spiece_model_path + ": tokenizer file not found (expected T5's spiece.model)");
  }
  const auto status = sp_->Load(spiece_model_path);
  if (!status.ok()) {
    throw Error(spiece_model_path + ": not a SentencePiece model (" + status.ToString() + ")");
  }
  // T5: <pad>=0, </s>=1, <unk>=2, no <s>. A model that declares no pad piece still pads with 0.
  pad_id_ = sp_->pad_id() >= 0 ? sp_->pad_id() : 0;
  if (sp_->eos_id() < 0) {
    throw Error(spiece_model_path + ": the SentencePiece model has no </s> piece; is it a T5 tokenizer?");
  }
  eos_id_ = sp_->eos_id();
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

int64_t Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }

std::vector<int64_t> Tokenizer::tokenize(const std::string& prompt) const {
  std::vector<int> ids;
  const auto status = sp_->Encode(prompt, &ids);
  if (!status.ok()) {
    throw Error("cannot tokenise prompt '" + prompt + "': " + status.ToString());
  }
  if (ids.empty()) {
    throw Error("empty prompt (every prompt needs at least one token)");
  }
  return {ids.begin(), ids.end()};
}

TokenBatch Tokenizer::encode(const std::vector<std::string>& prompts, int64_t max_length) const {
  if (prompts.empty()) throw Error("no prompts given");
  if (max_length < 1) throw Error("max length must be >= 1, got " + std::to_string(max_length));
  TokenBatch out;
  out.batch = static_cast<int64_t>(prompts.size());
  out.length = max_length;
  out.input_ids.assign(out.batch * max_length, pad_id_);
  out.attention_mask.assign(out.batch * max_length, 0);
  for (int64_t b = 0; b < out.batch; ++b) {
    std::vector<int64_t> ids;
    try {
      ids = tokenize(prompts[b]);
    } catch (const Error& e) {
      throw Error("prompt " + std::to_string(b + 1) + " of " + std::to_string(out.batch) + ": " + e.what());
    }
    if (static_cast<int64_t>(ids.size()) > max_length - 1) {  // keep room for </s>
      ids.resize(max_length - 1);
      out.truncated.push_back(b);
    }
    ids.push_back(eos_id_);
    std::copy(ids.begin(), ids.end(), out.input_ids.begin() + b * max_length);
    std::fill_n(out.attention_mask.begin() + b * max_length, ids.size(), 1);
  }
  return out;
}

}  // namespace fastenc
