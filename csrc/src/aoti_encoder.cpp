// AOTInductor runner: loads a .pt2 package written by torch._inductor.aoti_compile_and_package.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <climits>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <fstream>
#include <sstream>

#include "fastenc/encoder.hpp"
#include "fastenc/error.hpp"

namespace fastenc {
namespace {

// First line of a libtorch error (its messages carry multi-line context and backtraces).
std::string first_line(const std::string& text) {
  const auto nl = text.find('\n');
  return nl == std::string::npos ? text : text.substr(0, nl);
}

size_t count_substr(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t pos = text.find(needle); pos != std::string::npos; pos = text.find(needle, pos + needle.size())) ++n;
  return n;
}

// The integer value of "key" in a flat JSON object such as {"max_seq": 512, ...}.
std::optional<int64_t> json_int(const std::string& json, const std::string& key) {
  const auto pos = json.find("\"" + key + "\"");
  if (pos == std::string::npos) return std::nullopt;
  const auto colon = json.find(':', pos);
  if (colon == std::string::npos) return std::nullopt;
  try {
    return std::stoll(json.substr(colon + 1));
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

bool is_zip(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  in.read(magic, 4);
  return in.gcount() == 4 && magic[0] == 'P' && magic[1] == 'K';
}

class AotiEncoder final : public Encoder {
 public:
  AotiEncoder(const std::string& path, int num_threads) : path_(path) {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (!fs::is_regular_file(path, ec)) throw Error(path + ": model file not found (expected an AOTInductor .pt2 package)");
    if (!is_zip(path)) throw Error(path + ": not an AOTInductor .pt2 package (not a zip archive)");
    if (num_threads > 0) at::set_num_threads(num_threads);
    try {
      loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
    } catch (const c10::Error& e) {
      throw Error(path + ": cannot load the AOTInductor package: " + first_line(e.what_without_backtrace()));
    } catch (const std::exception& e) {
      throw Error(path + ": cannot load the AOTInductor package: " + first_line(e.what()));
    }
    auto meta = loader_->get_metadata();
    const auto dev = meta.count("AOTI_DEVICE_KEY") ? meta["AOTI_DEVICE_KEY"] : std::string("cpu");
    device_ = dev == "cuda" ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
    // Number of inputs: the leaves of the package's input spec (a flat tuple of tensors).
    const auto spec = loader_->get_call_spec();
    num_inputs_ = spec.empty() ? 2 : count_substr(spec[0], "\"type\": null");
    if (num_inputs_ < 1 || num_inputs_ > 2) {
      throw Error(path + ": the package takes " + std::to_string(num_inputs_) +
                  " inputs; a fastenc encoder takes input_ids [B, L] and optionally attention_mask [B, L]");
    }
    if (meta.count("fastenc.profile")) {
      const auto& profile = meta["fastenc.profile"];
      min_batch_ = json_int(profile, "min_batch").value_or(min_batch_);
      max_batch_ = json_int(profile, "max_batch").value_or(max_batch_);
      min_seq_ = json_int(profile, "min_seq").value_or(min_seq_);
      max_seq_ = json_int(profile, "max_seq").value_or(max_seq_);
    }
  }

  at::Tensor encode(const TokenBatch& tokens, bool use_mask) override {
    const auto B = tokens.batch, L = tokens.length;
    if (B < min_batch_ || B > max_batch_ || L < min_seq_ || L > max_seq_) {
      throw Error(path_ + ": input shape [batch=" + std::to_string(B) + ", seq=" + std::to_string(L) +
                  "] is outside the package's profile (batch " + std::to_string(min_batch_) + ".." +
                  std::to_string(max_batch_) + ", seq " + std::to_string(min_seq_) + ".." + std::to_string(max_seq_) +
                  "); use --batch-size / --max-length within it, or export again with a larger --max-batch/--max-seq");
    }
    auto opts = at::TensorOptions().dtype(at::kLong);
    auto ids = at::from_blob(const_cast<int64_t*>(tokens.input_ids.data()), {B, L}, opts).to(device_, ids_dtype_);
    std::vector<at::Tensor> inputs{ids};
    if (num_inputs_ == 2) {
      // A package with a mask input encodes padding like any token when the mask is all ones.
      auto mask = use_mask ? at::from_blob(const_cast<int64_t*>(tokens.attention_mask.data()), {B, L}, opts).clone()
                           : at::ones({B, L}, opts);
      inputs.push_back(mask.to(device_, ids_dtype_));
    } else if (use_mask) {
      throw Error(path_ + ": this target needs the attention mask but the package takes only input_ids; "
                  "export it with an attention_mask input");
    }
    std::vector<at::Tensor> outputs;
    try {
      outputs = loader_->run(inputs);
    } catch (const c10::Error& e) {
      throw Error(path_ + ": inference failed for input_ids [" + std::to_string(B) + ", " + std::to_string(L) +
                  "] (outside the package's dynamic shape range?): " + first_line(e.what_without_backtrace()));
    }
    if (outputs.size() != 1 || outputs[0].dim() != 3 || outputs[0].size(0) != B || outputs[0].size(1) != L) {
      std::ostringstream got;
      got << outputs.size() << " output(s)";
      if (!outputs.empty()) got << ", the first of shape " << outputs[0].sizes();
      throw Error(path_ + ": expected one output text_embeddings [" + std::to_string(B) + ", " + std::to_string(L) +
                  ", P], got " + got.str());
    }
    return outputs[0].to(at::kCPU, at::kFloat).contiguous();  // [B, L, P]
  }

  std::string describe() const override {
    return "AOTInductor package " + path_ + " on " + device_.str() + " (" + std::to_string(num_inputs_) + " inputs)";
  }

 private:
  std::string path_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
  at::Device device_{at::kCPU};
  size_t num_inputs_ = 2;
  at::ScalarType ids_dtype_ = at::kInt;  // the export contract: int32 input_ids and attention_mask
  // Shape range from the package's "fastenc.profile" metadata (unbounded when absent).
  int64_t min_batch_ = 1, max_batch_ = INT64_MAX, min_seq_ = 1, max_seq_ = INT64_MAX;
};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

std::unique_ptr<Encoder> load_aoti_encoder(const std::string& package_path, int num_threads) {
  return std::make_unique<AotiEncoder>(package_path, num_threads);
}

std::unique_ptr<Encoder> load_encoder(const std::string& path, int num_threads) {
  if (ends_with(path, ".plan") || ends_with(path, ".engine") || ends_with(path, ".trt")) {
    return load_tensorrt_encoder(path);
  }
  return load_aoti_encoder(path, num_threads);
}

}  // namespace fastenc
