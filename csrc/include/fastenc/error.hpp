// One exception type for every failure the user can act on (bad file, bad prompt, bad shape).
#pragma once

#include <stdexcept>
#include <string>

namespace fastenc {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace fastenc
