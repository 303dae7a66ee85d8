// Built when CMake did not find TensorRT: the TensorRT runner reports how to get it.
#include "fastenc/encoder.hpp"
#include "fastenc/error.hpp"

namespace fastenc {

bool have_tensorrt() { return false; }

std::unique_ptr<Encoder> load_tensorrt_encoder(const std::string& engine_path) {
  throw Error(engine_path + ": this fastenc-embed was built without TensorRT; reconfigure csrc/ with "
              "-DTENSORRT_ROOT=/path/to/TensorRT (needs NvInfer.h, libnvinfer and a CUDA build of libtorch)");
}

}  // namespace fastenc
