// fastenc-embed: prompts -> T5 tokens (sentencepiece) -> exported fastenc encoder -> .npy / .safetensors.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "fastenc/encoder.hpp"
#include "fastenc/error.hpp"
#include "fastenc/io.hpp"
#include "fastenc/tokenizer.hpp"

namespace {

constexpr const char* kUsage = R"(usage: fastenc-embed --model MODEL --tokenizer SPIECE -o OUTPUT [options] PROMPT...

Tokenise PROMPTs like fastenc's Python tokenizer and encode them with an exported fastenc encoder.

required:
  --model PATH         AOTInductor package (.pt2) or TensorRT engine (.plan/.engine, if built with TensorRT)
  --tokenizer PATH     T5 SentencePiece model (spiece.model)
  -o, --output PATH    .safetensors (text_embeddings f32 [B,L,P], input_ids i64, attention_mask i64)
                       or .npy (text_embeddings only)
options:
  --target NAME        flux-dev (512), flux-schnell (256), sd3 / sd3.5 (256), pixart-alpha (120),
                       pixart-sigma (300), chroma (512), ltx-video (128), cogvideox (226), mochi (256);
                       default flux-dev
  --max-length N       pad/truncate to N tokens instead of the target's length
  --mask MODE          auto (the target's rule: PixArt, Chroma and Mochi pass the mask), on, off; default auto
  --prompts-file PATH  read prompts from a file, one per line (added after the PROMPT arguments)
  --batch-size N       encode at most N prompts per call (default: all at once)
  --threads N          CPU threads for the AOTInductor runner (default: libtorch's choice)
  -q, --quiet          no summary line on stderr
  -h, --help           this help
)";

struct UsageError : fastenc::Error {
  using fastenc::Error::Error;
};

struct Args {
  std::string model, tokenizer, output, target = "flux-dev", mask = "auto", prompts_file;
  std::optional<int64_t> max_length;
  int64_t batch_size = 0;
  int threads = 0;
  bool quiet = false;
  std::vector<std::string> prompts;
};

int64_t parse_int(const std::string& flag, const std::string& value, int64_t min) {
  try {
    size_t used = 0;
    const long long v = std::stoll(value, &used);
    if (used == value.size() && v >= min) return v;
  } catch (const std::exception&) {
  }
  throw UsageError(flag + " needs an integer >= " + std::to_string(min) + ", got '" + value + "'");
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

Args parse_args(int argc, char** argv) {
  Args a;
  bool options_done = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (options_done || arg.empty() || arg[0] != '-' || arg == "-") {
      a.prompts.push_back(arg);
      continue;
    }
    if (arg == "--") {
      options_done = true;
      continue;
    }
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (arg == "-q" || arg == "--quiet") {
      a.quiet = true;
      continue;
    }
    if (i + 1 >= argc) throw UsageError(arg + " needs a value");
    const std::string value = argv[++i];
    if (arg == "--model") a.model = value;
    else if (arg == "--tokenizer") a.tokenizer = value;
    else if (arg == "-o" || arg == "--output") a.output = value;
    else if (arg == "--target") a.target = value;
    else if (arg == "--max-length") a.max_length = parse_int(arg, value, 1);
    else if (arg == "--mask") a.mask = value;
    else if (arg == "--prompts-file") a.prompts_file = value;
    else if (arg == "--batch-size") a.batch_size = parse_int(arg, value, 1);
    else if (arg == "--threads") a.threads = static_cast<int>(parse_int(arg, value, 1));
    else throw UsageError("unknown option " + arg + " (see --help)");
  }
  if (a.model.empty()) throw UsageError("--model is required (an AOTInductor .pt2 package)");
  if (a.tokenizer.empty()) throw UsageError("--tokenizer is required (T5's spiece.model)");
  if (a.output.empty()) throw UsageError("-o/--output is required (.safetensors or .npy)");
  if (!ends_with(a.output, ".safetensors") && !ends_with(a.output, ".npy")) {
    throw UsageError("--output must end in .safetensors or .npy, got '" + a.output + "'");
  }
  if (a.mask != "auto" && a.mask != "on" && a.mask != "off") {
    throw UsageError("--mask must be auto, on or off, got '" + a.mask + "'");
  }
  fastenc::max_length_for(a.target);  // validates --target
  if (!a.prompts_file.empty()) {
    std::ifstream in(a.prompts_file);
    if (!in) throw fastenc::Error(a.prompts_file + ": prompts file not found or unreadable");
    std::string line;
    while (std::getline(in, line)) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      a.prompts.push_back(line);
    }
  }
  if (a.prompts.empty()) throw UsageError("no prompts given (pass PROMPT arguments or --prompts-file)");
  return a;
}

int run(const Args& a) {
  const int64_t length = a.max_length ? *a.max_length : fastenc::max_length_for(a.target);
  const bool use_mask = a.mask == "on" || (a.mask == "auto" && fastenc::target_uses_mask(a.target));
  const fastenc::Tokenizer tokenizer(a.tokenizer);
  const auto tokens = tokenizer.encode(a.prompts, length);  // validates prompts before the model loads
  auto encoder = fastenc::load_encoder(a.model, a.threads);

  const int64_t B = tokens.batch, L = tokens.length;
  const int64_t step = a.batch_size > 0 ? a.batch_size : B;
  std::vector<at::Tensor> chunks;
  for (int64_t start = 0; start < B; start += step) {
    const int64_t n = std::min(step, B - start);
    fastenc::TokenBatch part;
    part.batch = n;
    part.length = L;
    part.input_ids.assign(tokens.input_ids.begin() + start * L, tokens.input_ids.begin() + (start + n) * L);
    part.attention_mask.assign(tokens.attention_mask.begin() + start * L,
                               tokens.attention_mask.begin() + (start + n) * L);
    chunks.push_back(encoder->encode(part, use_mask));  // [n, L, P]
  }
  const at::Tensor embeds = chunks.size() == 1 ? chunks[0] : at::cat(chunks, 0).contiguous();  // [B, L, P]

  if (ends_with(a.output, ".npy")) {
    fastenc::write_npy(a.output, embeds);
  } else {
    auto opts = at::TensorOptions().dtype(at::kLong);
    auto ids = at::from_blob(const_cast<int64_t*>(tokens.input_ids.data()), {B, L}, opts).clone();
    auto mask = at::from_blob(const_cast<int64_t*>(tokens.attention_mask.data()), {B, L}, opts).clone();
    fastenc::write_safetensors(a.output, {{"text_embeddings", embeds}, {"input_ids", ids}, {"attention_mask", mask}},
                               {{"target", a.target}, {"max_length", std::to_string(L)},
                                {"mask", use_mask ? "on" : "off"}});
  }
  if (!a.quiet) {
    std::cerr << "fastenc-embed: wrote " << a.output << ": text_embeddings [" << B << ", " << L << ", "
              << embeds.size(2) << "] from " << encoder->describe();
    if (!tokens.truncated.empty()) std::cerr << "; " << tokens.truncated.size() << " prompt(s) truncated";
    std::cerr << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const UsageError& e) {
    std::cerr << "fastenc-embed: error: " << e.what() << "\n";
    return 2;
  } catch (const fastenc::Error& e) {
    std::cerr << "fastenc-embed: error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::string msg = e.what();
    std::cerr << "fastenc-embed: error: " << msg.substr(0, msg.find('\n')) << "\n";
    return 1;
  }
}
