// Runs the CUDA kernels' element math on the host: the very headers the kernels include (csrc/cuda/rounding.cuh,
// fake_quant_math.cuh, multi_branch_fake_quant.cuh), compiled as plain C++ by tests/test_cuda_host_math.py, which
// compares the results with tests/reference.py. Float32 records in, float32 records out (raw little-endian files):
//
//   host_math fq IN OUT      IN: n x [x, g, s, beta, qmin, qmax]   OUT: n x [y, dx, dstep term, doffset term]
//   host_math mb B IN OUT    IN: [steps(B), probs(B), qmin(B), qmax(B)] then n x [x, g]
//                            OUT: n x [y, dx, dstep terms(B), dprob terms(B)]
//
// The terms are one element's contribution to the per-thread float sums (each a single fmaf from zero), before
// grad_scale and the probability factor.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/fake_quant_math.cuh"
#include "cuda/multi_branch_fake_quant.cuh"

namespace {

std::vector<float> read_floats(const char* path) {
  std::vector<float> data;
  FILE* f = std::fopen(path, "rb");
  if (f == nullptr) return data;
  float v;
  while (std::fread(&v, sizeof v, 1, f) == 1) data.push_back(v);
  std::fclose(f);
  return data;
}

bool write_floats(const char* path, const std::vector<float>& data) {
  FILE* f = std::fopen(path, "wb");
  if (f == nullptr) return false;
  const bool ok = std::fwrite(data.data(), sizeof(float), data.size(), f) == data.size();
  return std::fclose(f) == 0 && ok;
}

std::vector<float> fake_quant(const std::vector<float>& in) {
  std::vector<float> out;
  for (size_t i = 0; i + 6 <= in.size(); i += 6) {
    const float x = in[i], g = in[i + 1], s = in[i + 2], beta = in[i + 3], lo = in[i + 4], hi = in[i + 5];
    lowbit::cuda::Acc acc_step = 0, acc_offset = 0;
    const float dx = lowbit::cuda::fake_quant_grad(x, g, s, beta, lo, hi, acc_step, acc_offset);
    out.insert(out.end(), {lowbit::cuda::fake_quant_value(x, s, beta, lo, hi), dx, acc_step, acc_offset});
  }
  return out;
}

template <int B>
std::vector<float> multi_branch(const std::vector<float>& in) {
  namespace mb = lowbit::cuda::multi_branch;
  const auto branches = mb::load_branches<B>(in.data(), in.data() + B);
  mb::Ranges ranges{};
  for (int i = 0; i < B; ++i) {
    ranges.lo[i] = in[2 * B + i];
    ranges.hi[i] = in[3 * B + i];
  }
  std::vector<float> out;
  for (size_t i = 4 * B; i + 2 <= in.size(); i += 2) {
    mb::Sums<B> sums{};
    const float y = mb::mix_forward<B>(in[i], branches, ranges);
    const float dx = mb::mix_backward<B>(in[i], in[i + 1], branches, ranges, sums);
    out.push_back(y);
    out.push_back(dx);
    out.insert(out.end(), sums.step, sums.step + B);
    out.insert(out.end(), sums.prob, sums.prob + B);
  }
  return out;
}

std::vector<float> multi_branch_of(int b, const std::vector<float>& in) {
  switch (b) {
    case 1: return multi_branch<1>(in);
    case 2: return multi_branch<2>(in);
    case 3: return multi_branch<3>(in);
    case 4: return multi_branch<4>(in);
    case 5: return multi_branch<5>(in);
    case 6: return multi_branch<6>(in);
    case 7: return multi_branch<7>(in);
    default: std::fprintf(stderr, "host_math: B must be 1..7, got %d\n", b); std::exit(2);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "fq") == 0) return write_floats(argv[3], fake_quant(read_floats(argv[2]))) ? 0 : 1;
  if (argc == 5 && std::strcmp(argv[1], "mb") == 0) {
    return write_floats(argv[4], multi_branch_of(std::atoi(argv[2]), read_floats(argv[3]))) ? 0 : 1;
  }
  std::fprintf(stderr, "usage: host_math fq IN OUT | host_math mb B IN OUT\n");
  return 2;
}
