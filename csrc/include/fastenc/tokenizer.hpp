// T5 SentencePiece tokenisation padded/truncated exactly like fastenc's Python tokenizer:
// ids + </s>, padded with the pad id to max_length; a prompt longer than max_length keeps its
// first max_length - 1 tokens and </s>. Mask: 1 for tokens including </s>, 0 for padding.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace fastenc {

struct TokenBatch {
  int64_t batch = 0;                    // B
  int64_t length = 0;                   // L
  std::vector<int64_t> input_ids;       // [B, L] row-major
  std::vector<int64_t> attention_mask;  // [B, L] row-major
  std::vector<int64_t> truncated;       // indices of prompts that lost their tail
};

// Sequence length each diffusion pipeline feeds T5 (flux-dev 512, flux-schnell 256, sd3 256, pixart-alpha 120).
int max_length_for(const std::string& target);
// Whether the target's pipeline passes the attention mask to T5 (PixArt does; Flux and SD3 do not).
bool target_uses_mask(const std::string& target);
// "flux-dev, flux-schnell, sd3, pixart-alpha"
std::string known_targets();

class Tokenizer {
 public:
  // Loads a SentencePiece model (T5's spiece.model). Throws fastenc::Error naming the file.
  explicit Tokenizer(const std::string& spiece_model_path);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // Ids of one prompt without </s> or padding. Throws for an empty (or whitespace-only) prompt.
  std::vector<int64_t> tokenize(const std::string& prompt) const;
  // Padded/truncated batch [B, max_length]. Throws for an empty prompt list or max_length < 1.
  TokenBatch encode(const std::vector<std::string>& prompts, int64_t max_length) const;

  int64_t pad_id() const { return pad_id_; }
  int64_t eos_id() const { return eos_id_; }
  int64_t vocab_size() const;

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::string path_;
  int64_t pad_id_ = 0;
  int64_t eos_id_ = 1;
};

}  // namespace fastenc
