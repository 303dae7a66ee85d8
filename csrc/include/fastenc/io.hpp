// Writers for files Python reads: NumPy .npy (numpy.load) and safetensors (safetensors.torch.load_file).
// Both write to a temporary name beside the target and rename it into place.
#pragma once

#include <ATen/Tensor.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace fastenc {

// One contiguous CPU tensor (float32, int64 or int32) as .npy (format 1.0, little-endian, C order).
void write_npy(const std::string& path, const at::Tensor& tensor);

// Named contiguous CPU tensors (float32, int64 or int32) + string metadata as one .safetensors file.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace fastenc
