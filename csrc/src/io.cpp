#include "fastenc/io.hpp"

#include <ATen/ATen.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "fastenc/error.hpp"

namespace fastenc {
namespace {

struct DType {
  const char* numpy;        // .npy descr
  const char* safetensors;  // safetensors dtype
};

DType dtype_names(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return {"<f4", "F32"};
    case at::kLong: return {"<i8", "I64"};
    case at::kInt: return {"<i4", "I32"};
    default: throw Error(std::string("cannot write a tensor of dtype ") + c10::toString(t.scalar_type()));
  }
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out;
}

// Writes `write(stream)` to `path` via a temporary file beside it.
template <typename F>
void atomic_write(const std::string& path, F&& write) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  std::string tmp_name(".");
  tmp_name.append(target.filename().string()).append(".tmp");
  const fs::path tmp = target.parent_path() / tmp_name;
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error(path + ": cannot open for writing (does the folder exist?)");
    write(out);
    out.flush();
    if (!out) {
      std::error_code ec;
      fs::remove(tmp, ec);
      throw Error(path + ": write failed (disk full?)");
    }
  }
  std::error_code ec;
  fs::rename(tmp, target, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw Error(path + ": cannot move the written file into place");
  }
}

void check_writable(const at::Tensor& t, const std::string& name) {
  if (!t.device().is_cpu() || !t.is_contiguous()) throw Error("tensor " + name + " must be a contiguous CPU tensor");
}

}  // namespace

void write_npy(const std::string& path, const at::Tensor& tensor) {
  check_writable(tensor, path);
  const auto names = dtype_names(tensor);
  std::ostringstream shape;
  shape << "(";
  for (int64_t i = 0; i < tensor.dim(); ++i) shape << tensor.size(i) << (tensor.dim() == 1 || i + 1 < tensor.dim() ? "," : "");
  shape << ")";
  std::string header = std::string("{'descr': '") + names.numpy + "', 'fortran_order': False, 'shape': " + shape.str() + ", }";
  const size_t prefix = 10;  // magic (6) + version (2) + header length (2)
  header.append((64 - (prefix + header.size() + 1) % 64) % 64, ' ');
  header += '\n';  // prefix + header is a multiple of 64 bytes
  atomic_write(path, [&](std::ofstream& out) {
    out.write("\x93NUMPY\x01\x00", 8);
    const uint16_t len = static_cast<uint16_t>(header.size());
    const char len_le[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
    out.write(len_le, 2);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(static_cast<const char*>(tensor.const_data_ptr()), static_cast<std::streamsize>(tensor.nbytes()));
  });
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::ostringstream header;
  header << "{";
  bool first = true;
  if (!metadata.empty()) {
    header << "\"__metadata__\":{";
    for (auto it = metadata.begin(); it != metadata.end(); ++it) {
      if (it != metadata.begin()) header << ",";
      header << "\"" << json_escape(it->first) << "\":\"" << json_escape(it->second) << "\"";
    }
    header << "}";
    first = false;
  }
  size_t offset = 0;
  for (const auto& [name, t] : tensors) {
    check_writable(t, name);
    header << (first ? "" : ",") << "\"" << json_escape(name) << "\":{\"dtype\":\"" << dtype_names(t).safetensors
           << "\",\"shape\":[";
    for (int64_t i = 0; i < t.dim(); ++i) header << (i ? "," : "") << t.size(i);
    header << "],\"data_offsets\":[" << offset << "," << offset + t.nbytes() << "]}";
    offset += t.nbytes();
    first = false;
  }
  header << "}";
  std::string text = header.str();
  text.append((8 - text.size() % 8) % 8, ' ');  // 8-byte aligned tensor data
  atomic_write(path, [&](std::ofstream& out) {
    const uint64_t n = text.size();
    char len_le[8];
    for (int i = 0; i < 8; ++i) len_le[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    out.write(len_le, 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const auto& [name, t] : tensors) {
      out.write(static_cast<const char*>(t.const_data_ptr()), static_cast<std::streamsize>(t.nbytes()));
    }
  });
}

}  // namespace fastenc
