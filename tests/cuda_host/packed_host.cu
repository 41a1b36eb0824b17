// Runs the packed_linear CUDA kernels' word math on the host: csrc/cuda/packed_linear.cu itself, included with
// LOWBIT_PACKED_LINEAR_HOST_EMULATION (no torch parts), built by nvcc in tests/test_cuda_host_math.py, which compares
// the results with NumPy. Raw little-endian records in and out:
//
//   packed_host dot IN OUT    IN: n x [a, p] (uint32 words)
//                             OUT: per record, for width 2, 4, 8, signed then unsigned activations, every group g
//                             of the width: dot4(a, unpack_group<width>(p, g), 0) as int32
//   packed_host code IN OUT   IN: n x [x, step, qmin, qmax] (float32)   OUT: n x activation_code (uint32)
//   packed_host epi IN OUT    IN: n x [acc (int32 bits), x_step, w_scale, bias] (4 bytes each)
//                             OUT: n x [epilogue without bias, with bias] (float32)
#define LOWBIT_PACKED_LINEAR_HOST_EMULATION
#include "cuda/packed_linear.cu"

#include <cstdio>
#include <cstring>
#include <vector>

namespace {

using lowbit::cuda::activation_code;
using lowbit::cuda::dot4;
using lowbit::cuda::epilogue_value;
using lowbit::cuda::unpack_group;

std::vector<uint32_t> read_words(const char* path) {
  std::vector<uint32_t> data;
  FILE* f = std::fopen(path, "rb");
  if (f == nullptr) return data;
  uint32_t v;
  while (std::fread(&v, sizeof v, 1, f) == 1) data.push_back(v);
  std::fclose(f);
  return data;
}

bool write_words(const char* path, const std::vector<uint32_t>& data) {
  FILE* f = std::fopen(path, "wb");
  if (f == nullptr) return false;
  const bool ok = std::fwrite(data.data(), sizeof(uint32_t), data.size(), f) == data.size();
  return std::fclose(f) == 0 && ok;
}

float as_float(uint32_t w) {
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

uint32_t as_word(float f) {
  uint32_t w;
  std::memcpy(&w, &f, sizeof w);
  return w;
}

template <int kWidth>
void dots(uint32_t a, uint32_t p, std::vector<uint32_t>& out) {
  for (int g = 0; g < 8 / kWidth; ++g) out.push_back(static_cast<uint32_t>(dot4<true>(a, unpack_group<kWidth>(p, g), 0)));
  for (int g = 0; g < 8 / kWidth; ++g) out.push_back(static_cast<uint32_t>(dot4<false>(a, unpack_group<kWidth>(p, g), 0)));
}

std::vector<uint32_t> run(const char* mode, const std::vector<uint32_t>& in) {
  std::vector<uint32_t> out;
  if (std::strcmp(mode, "dot") == 0) {
    for (size_t i = 0; i + 2 <= in.size(); i += 2) {
      dots<2>(in[i], in[i + 1], out);
      dots<4>(in[i], in[i + 1], out);
      dots<8>(in[i], in[i + 1], out);
    }
  } else if (std::strcmp(mode, "code") == 0) {
    for (size_t i = 0; i + 4 <= in.size(); i += 4) {
      out.push_back(activation_code(as_float(in[i]), as_float(in[i + 1]), as_float(in[i + 2]), as_float(in[i + 3])));
    }
  } else if (std::strcmp(mode, "epi") == 0) {
    for (size_t i = 0; i + 4 <= in.size(); i += 4) {
      const int32_t acc = static_cast<int32_t>(in[i]);
      const float bias = as_float(in[i + 3]);
      out.push_back(as_word(epilogue_value(acc, as_float(in[i + 1]), as_float(in[i + 2]), nullptr, 0, false)));
      out.push_back(as_word(epilogue_value(acc, as_float(in[i + 1]), as_float(in[i + 2]), &bias, 0, false)));
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: packed_host dot|code|epi IN OUT\n");
    return 2;
  }
  return write_words(argv[3], run(argv[1], read_words(argv[2]))) ? 0 : 1;
}
