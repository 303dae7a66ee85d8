// Runners for an exported fastenc encoder. Contract (same as the ONNX/TensorRT exports):
// inputs `input_ids` [B, L] (int64, or int32 for TensorRT engines that declare it) and optionally
// `attention_mask` [B, L]; output `text_embeddings` [B, L, P].
#pragma once

#include <ATen/Tensor.h>

#include <memory>
#include <string>

#include "fastenc/tokenizer.hpp"

namespace fastenc {

class Encoder {
 public:
  virtual ~Encoder() = default;
  // Embeddings [B, L, P] as a contiguous float32 CPU tensor. `use_mask` passes the attention mask
  // (PixArt); otherwise padding is encoded like any other token (Flux, SD3), as in the Python API.
  virtual at::Tensor encode(const TokenBatch& tokens, bool use_mask) = 0;
  // Human-readable description for logs: runner, device, file.
  virtual std::string describe() const = 0;
};

// AOTInductor package (.pt2) through torch::inductor::AOTIModelPackageLoader; the device is the one
// the package was compiled for (CPU or CUDA). `num_threads` > 0 sets the intra-op threads.
std::unique_ptr<Encoder> load_aoti_encoder(const std::string& package_path, int num_threads = 0);

// TensorRT engine (.plan/.engine); available only when built with TensorRT (FASTENC_HAVE_TENSORRT).
std::unique_ptr<Encoder> load_tensorrt_encoder(const std::string& engine_path);
bool have_tensorrt();

// Picks the runner from the file name: .pt2 -> AOTInductor, .plan/.engine/.trt -> TensorRT.
std::unique_ptr<Encoder> load_encoder(const std::string& path, int num_threads = 0);

}  // namespace fastenc
