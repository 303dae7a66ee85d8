// TensorRT runner (TensorRT 10 API): deserialises an engine built from fastenc's ONNX export and
// runs it on the current CUDA device. Compiled only when CMake finds TensorRT and CUDA.
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

#include "fastenc/encoder.hpp"
#include "fastenc/error.hpp"

namespace fastenc {
namespace {

class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "fastenc-embed: tensorrt: " << msg << "\n";
  }
};

Logger& logger() {
  static Logger instance;
  return instance;
}

void check_cuda(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) throw Error(what + ": " + cudaGetErrorString(err));
}

at::ScalarType to_torch(nvinfer1::DataType t, const std::string& name) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return at::kFloat;
    case nvinfer1::DataType::kHALF: return at::kHalf;
    case nvinfer1::DataType::kBF16: return at::kBFloat16;
    case nvinfer1::DataType::kINT32: return at::kInt;
    case nvinfer1::DataType::kINT64: return at::kLong;
    default: throw Error("engine tensor '" + name + "' has an unsupported data type");
  }
}

class TensorRTEncoder final : public Encoder {
 public:
  explicit TensorRTEncoder(const std::string& path) : path_(path) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec)) throw Error(path + ": engine file not found");
    std::ifstream in(path, std::ios::binary);
    std::vector<char> blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    runtime_.reset(nvinfer1::createInferRuntime(logger()));
    engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine_) throw Error(path + ": cannot deserialise the TensorRT engine (other TensorRT version or GPU?)");
    context_.reset(engine_->createExecutionContext());
    if (!context_) throw Error(path + ": cannot create a TensorRT execution context");
    bool has_ids = false, has_out = false;
    for (int i = 0; i < engine_->getNbIOTensors(); ++i) {
      const std::string name = engine_->getIOTensorName(i);
      has_ids |= name == "input_ids";
      has_mask_ |= name == "attention_mask";
      has_out |= name == "text_embeddings";
    }
    if (!has_ids || !has_out) {
      throw Error(path + ": the engine must have input 'input_ids' and output 'text_embeddings'");
    }
    check_cuda(cudaStreamCreate(&stream_), "cudaStreamCreate");
  }

  ~TensorRTEncoder() override {
    if (stream_) cudaStreamDestroy(stream_);
  }

  at::Tensor encode(const TokenBatch& tokens, bool use_mask) override {
    const auto B = tokens.batch, L = tokens.length;
    const at::Device cuda(at::kCUDA, 0);
    auto cpu = at::TensorOptions().dtype(at::kLong);
    auto ids = at::from_blob(const_cast<int64_t*>(tokens.input_ids.data()), {B, L}, cpu)
                   .to(cuda, to_torch(engine_->getTensorDataType("input_ids"), "input_ids")).contiguous();
    at::Tensor mask;
    if (has_mask_) {
      mask = use_mask ? at::from_blob(const_cast<int64_t*>(tokens.attention_mask.data()), {B, L}, cpu).clone()
                      : at::ones({B, L}, cpu);
      mask = mask.to(cuda, to_torch(engine_->getTensorDataType("attention_mask"), "attention_mask")).contiguous();
    } else if (use_mask) {
      throw Error(path_ + ": this target needs the attention mask but the engine has no attention_mask input");
    }
    const nvinfer1::Dims2 shape(B, L);
    if (!context_->setInputShape("input_ids", shape) || (has_mask_ && !context_->setInputShape("attention_mask", shape))) {
      throw Error(path_ + ": input shape [" + std::to_string(B) + ", " + std::to_string(L) +
                  "] is outside the engine's optimisation profile");
    }
    const auto out_dims = context_->getTensorShape("text_embeddings");
    if (out_dims.nbDims != 3) throw Error(path_ + ": text_embeddings is not 3-D");
    auto out = at::empty({out_dims.d[0], out_dims.d[1], out_dims.d[2]},
                         at::TensorOptions().device(cuda).dtype(
                             to_torch(engine_->getTensorDataType("text_embeddings"), "text_embeddings")));
    context_->setTensorAddress("input_ids", ids.data_ptr());
    if (has_mask_) context_->setTensorAddress("attention_mask", mask.data_ptr());
    context_->setTensorAddress("text_embeddings", out.data_ptr());
    if (!context_->enqueueV3(stream_)) throw Error(path_ + ": TensorRT inference failed");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return out.to(at::kCPU, at::kFloat).contiguous();  // [B, L, P]
  }

  std::string describe() const override { return "TensorRT engine " + path_ + " on cuda:0"; }

 private:
  struct Destroy {
    template <typename T>
    void operator()(T* p) const { delete p; }
  };
  std::string path_;
  std::unique_ptr<nvinfer1::IRuntime, Destroy> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine, Destroy> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext, Destroy> context_;
  cudaStream_t stream_ = nullptr;
  bool has_mask_ = false;
};

}  // namespace

bool have_tensorrt() { return true; }

std::unique_ptr<Encoder> load_tensorrt_encoder(const std::string& engine_path) {
  return std::make_unique<TensorRTEncoder>(engine_path);
}

}  // namespace fastenc
