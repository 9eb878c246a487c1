// mesp-runner: trains a LoRA adapter by running the MeSP step that `mesp export --format executorch` wrote, in
// ExecuTorch's native runtime, with no Python and no libtorch in the process.
//
//   mesp-runner step.pte base.ptd --data tokens.bin --steps N --out adapter_model.safetensors
//
// step.pte holds three kinds of method (mesp/export_executorch.py): `forward(input_ids, labels, *state) ->
// (loss, *state')`, one step (state: the LoRA tensors in lora_names order, then the optimizer's);
// `initial_state() -> *state`; and constants (`lora_names`, `adapter_config`, `batch_size`, `seq_len`,
// `optimizer`). base.ptd holds the frozen weights; the runtime memory-maps both files (file-backed pages,
// shared, not private memory). forward's inputs and outputs are outside its memory plan: the runner holds the
// state once and hands the same buffers in and out, each step updating them in place.
//
// tokens.bin: the 8 bytes "MESPTOK2", then rows and seq_len as little-endian int64, then rows * seq_len
// little-endian int64 token ids, then as many labels (-100 = no loss). Step s trains on rows s*B .. s*B+B-1
// (wrapping round), B the program's batch size; seq_len must equal the program's.
//
// Output: one line per step (loss, step time), then the memory figures: the private footprint (RssAnon +
// VmSwap + RssShmem) and RssFile peaks sampled every millisecond by a thread, VmHWM (the kernel's RSS peak),
// and the terms the private footprint is made of. They are printed before the adapter is written (PEFT's
// adapter_model.safetensors, F32, beside adapter_config.json, each atomically; --out's directory is made).
// Bad input gives one line on stderr naming the file and exit status 1.

#include <executorch/extension/data_loader/mmap_data_loader.h>
#include <executorch/extension/flat_tensor/flat_tensor_data_map.h>
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using executorch::extension::FlatTensorDataMap;
using executorch::extension::from_blob;
using executorch::extension::MmapDataLoader;
using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::Program;

// ExecuTorch's log goes through this platform hook (a weak symbol in the runtime; this definition wins): its
// info lines are dropped and its last error kept, so a failure is reported as one line that includes it.
static std::string last_runtime_error;

extern "C" void et_pal_emit_log_message(et_timestamp_t, et_pal_log_level_t level, const char*, const char*, size_t,
                                        const char* message, size_t length) {
  if (level == kError || level == kFatal) {
    last_runtime_error.assign(message, length);
    while (!last_runtime_error.empty() && (last_runtime_error.back() == '\n' || last_runtime_error.back() == ' '))
      last_runtime_error.pop_back();
  }
}

namespace {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string error_text(Error e) {
  std::string text = "ExecuTorch error " + std::to_string(static_cast<int>(e));
  if (!last_runtime_error.empty()) text += ": " + last_runtime_error;
  return text;
}

// /proc/self/status fields in kB (0 where absent)
struct Status {
  long rss_anon = 0, rss_file = 0, rss_shmem = 0, vm_swap = 0, vm_hwm = 0;
};

Status read_status() {
  Status s;
  std::ifstream f("/proc/self/status");
  std::string key;
  long value;
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream in(line);
    if (!(in >> key >> value)) continue;
    if (key == "RssAnon:") s.rss_anon = value;
    else if (key == "RssFile:") s.rss_file = value;
    else if (key == "RssShmem:") s.rss_shmem = value;
    else if (key == "VmSwap:") s.vm_swap = value;
    else if (key == "VmHWM:") s.vm_hwm = value;
  }
  return s;
}

// Peaks of the private footprint and of RssFile, sampled by a thread while it lives.
class Sampler {
 public:
  Sampler() : thread_([this] { run(); }) {}
  ~Sampler() { stop(); }
  void stop() {
    if (thread_.joinable()) {
      done_ = true;
      thread_.join();
    }
  }
  void sample() {
    Status s = read_status();
    long priv = s.rss_anon + s.vm_swap + s.rss_shmem;
    if (priv > private_peak_) private_peak_ = priv;
    if (s.rss_anon > anon_peak_) anon_peak_ = s.rss_anon;
    if (s.rss_file > file_peak_) file_peak_ = s.rss_file;
  }
  long private_peak() const { return private_peak_; }
  long anon_peak() const { return anon_peak_; }
  long file_peak() const { return file_peak_; }

 private:
  void run() {
    while (!done_) {
      sample();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    sample();
  }
  std::atomic<bool> done_{false};
  std::atomic<long> private_peak_{0}, anon_peak_{0}, file_peak_{0};
  std::thread thread_;
};

struct Tokens {
  int64_t rows = 0, seq_len = 0;
  std::vector<int64_t> ids, labels;
};

Tokens read_tokens(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Failure(path + ": cannot open");
  char magic[8];
  Tokens t;
  if (!f.read(magic, 8) || std::memcmp(magic, "MESPTOK2", 8) != 0)
    throw Failure(path + ": not a mesp tokens file (expected the header MESPTOK2; mesp export --data writes one)");
  if (!f.read(reinterpret_cast<char*>(&t.rows), 8) || !f.read(reinterpret_cast<char*>(&t.seq_len), 8))
    throw Failure(path + ": truncated header");
  if (t.rows < 1 || t.seq_len < 2 || t.rows > (int64_t{1} << 32) || t.seq_len > (int64_t{1} << 24))
    throw Failure(path + ": bad shape " + std::to_string(t.rows) + " x " + std::to_string(t.seq_len));
  const size_t n = static_cast<size_t>(t.rows * t.seq_len);
  t.ids.resize(n);
  t.labels.resize(n);
  if (!f.read(reinterpret_cast<char*>(t.ids.data()), static_cast<std::streamsize>(n * 8)) ||
      !f.read(reinterpret_cast<char*>(t.labels.data()), static_cast<std::streamsize>(n * 8)))
    throw Failure(path + ": truncated: expected " + std::to_string(t.rows) + " x " + std::to_string(t.seq_len) +
                  " int64 token ids, then as many labels");
  return t;
}

// A state tensor (LoRA or optimizer) the runner owns between steps.
struct HostTensor {
  std::string name;
  std::vector<executorch::aten::SizesType> sizes;
  std::vector<float> data;
};

std::vector<EValue> run(Module& m, const std::string& method, const std::vector<EValue>& inputs,
                        const std::string& pte) {
  auto result = m.execute(method, inputs);
  if (!result.ok()) throw Failure(pte + ": method " + method + " failed: " + error_text(result.error()));
  return std::move(result.get());
}

std::string constant_string(Module& m, const std::string& method, const std::string& pte) {
  auto out = run(m, method, {}, pte);
  if (out.size() != 1 || !out[0].isString()) throw Failure(pte + ": " + method + " is not a string constant");
  return std::string(out[0].toString());
}

int64_t constant_int(Module& m, const std::string& method, const std::string& pte) {
  auto out = run(m, method, {}, pte);
  if (out.size() != 1 || !out[0].isInt()) throw Failure(pte + ": " + method + " is not an int constant");
  return out[0].toInt();
}

void copy_out(const EValue& v, HostTensor& t, const std::string& pte) {
  if (!v.isTensor()) throw Failure(pte + ": " + t.name + ": the program returned a non-tensor");
  const auto& x = v.toTensor();
  if (x.scalar_type() != executorch::aten::ScalarType::Float)
    throw Failure(pte + ": " + t.name + ": only fp32 state tensors are supported");
  if (t.sizes.empty()) t.sizes.assign(x.sizes().begin(), x.sizes().end());
  t.data.assign(x.const_data_ptr<float>(), x.const_data_ptr<float>() + x.numel());
}

std::vector<std::string> split_lines(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// the bytes land whole or not at all: a scratch file beside `path`, flushed to disk, then renamed over it
void write_atomically(const std::string& path, const std::string& bytes) {
  std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw Failure(path + ": cannot write (" + std::strerror(errno) + ")");
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  int err = done == bytes.size() ? 0 : errno;
  if (!err && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && !err) err = errno;
  if (!err && std::rename(tmp.c_str(), path.c_str()) != 0) err = errno;
  if (err) {
    std::remove(tmp.c_str());
    throw Failure(path + ": cannot write (" + std::strerror(err ? err : EIO) + ")");
  }
}

// safetensors: an 8-byte little-endian header length, the JSON header (padded with spaces to 8 bytes), then
// the tensors' raw bytes in header order.
void write_safetensors(const std::string& path, const std::vector<HostTensor>& state, size_t count) {
  const std::vector<HostTensor>::const_iterator first = state.begin(), last = first + static_cast<std::ptrdiff_t>(count);
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  size_t offset = 0;
  for (auto it = first; it != last; ++it) {
    const HostTensor& t = *it;
    size_t bytes = t.data.size() * sizeof(float);
    header += ",\"" + t.name + "\":{\"dtype\":\"F32\",\"shape\":[";
    for (size_t i = 0; i < t.sizes.size(); ++i) header += (i ? "," : "") + std::to_string(t.sizes[i]);
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + bytes) + "]}";
    offset += bytes;
  }
  header += "}";
  while (header.size() % 8) header += ' ';
  std::string out(8, '\0');
  uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);  // x86-64 and ARM are little-endian
  out += header;
  for (auto it = first; it != last; ++it)
    out.append(reinterpret_cast<const char*>(it->data.data()), it->data.size() * sizeof(float));
  write_atomically(path, out);
}

// the directory `path` goes in, made (with its parents) where missing
std::string make_parent_dir(const std::string& path) {
  std::filesystem::path parent = std::filesystem::path(path).parent_path();
  if (parent.empty()) return ".";
  std::error_code ec;
  std::filesystem::create_directories(parent, ec);
  if (ec || !std::filesystem::is_directory(parent))
    throw Failure(path + ": cannot make its directory " + parent.string() + (ec ? " (" + ec.message() + ")" : ""));
  return parent.string();
}

bool readable(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return static_cast<bool>(f);
}

int train(int argc, char** argv) {
  std::string pte, ptd, data, out;
  long steps = -1;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const char* flag) -> std::string {
      if (i + 1 >= argc) throw Failure(std::string(flag) + ": expected a value");
      return argv[++i];
    };
    if (a == "--data") data = value("--data");
    else if (a == "--out") out = value("--out");
    else if (a == "--steps") {
      std::string s = value("--steps");
      char* end = nullptr;
      steps = std::strtol(s.c_str(), &end, 10);
      if (*end || steps < 1) throw Failure("--steps: expected a whole number >= 1, got " + s);
    } else if (a.rfind("--", 0) == 0) throw Failure(a + ": unknown option");
    else positional.push_back(a);
  }
  if (positional.size() != 2 || data.empty() || steps < 0 || out.empty())
    throw Failure("usage: mesp-runner step.pte base.ptd --data tokens.bin --steps N --out adapter.safetensors");
  pte = positional[0];
  ptd = positional[1];
  for (const auto& p : {pte, ptd})
    if (!readable(p)) throw Failure(p + ": cannot open");
  Tokens tokens = read_tokens(data);
  const std::string out_dir = make_parent_dir(out);  // before the steps, so a bad --out fails at once

  {  // the weights file checked on its own first, so a bad one is named as itself
    auto loader = MmapDataLoader::from(ptd.c_str(), MmapDataLoader::MlockConfig::NoMlock);
    if (!loader.ok()) throw Failure(ptd + ": cannot map (" + error_text(loader.error()) + ")");
    auto map = FlatTensorDataMap::load(&loader.get());
    if (!map.ok()) throw Failure(ptd + ": not a valid ExecuTorch data file (" + error_text(map.error()) + ")");
  }
  last_runtime_error.clear();

  const Status before_load = read_status();  // the runtime's own floor (and the tokens)
  Sampler sampler;
  Module module(pte, ptd, Module::LoadMode::Mmap);
  Error e = module.load(Program::Verification::InternalConsistency);
  if (e != Error::Ok) throw Failure(pte + ": not a valid ExecuTorch program (" + error_text(e) + ")");
  auto load_method = [&](const char* method) {  // both methods' constants are in base.ptd
    Error err = module.load_method(method);
    if (err != Error::Ok)
      throw Failure(ptd + ": the step's " + method + " does not load from it (" + error_text(err) +
                    "; truncated or not this program's base.ptd?)");
  };
  const int64_t B = constant_int(module, "batch_size", pte), T = constant_int(module, "seq_len", pte);
  if (T != tokens.seq_len)
    throw Failure(data + ": sequences of " + std::to_string(tokens.seq_len) + " tokens; the program was " +
                  "exported for --seq-len " + std::to_string(T));
  const std::vector<std::string> names = split_lines(constant_string(module, "lora_names", pte));
  const std::string adapter_config = constant_string(module, "adapter_config", pte);
  const std::string optimizer = constant_string(module, "optimizer", pte);
  std::vector<HostTensor> state;
  {  // initial_state's outputs live in its own arena: copied out, then the method is dropped with them, all
     // before forward's arena exists, so that arena and the state's first copy never add to forward's peak
    load_method("initial_state");
    auto init = run(module, "initial_state", {}, pte);
    if (init.size() < names.size()) throw Failure(pte + ": initial_state does not match lora_names");
    state.resize(init.size());
    for (size_t i = 0; i < init.size(); ++i) {
      state[i].name = i < names.size() ? names[i] : "optimizer state " + std::to_string(i - names.size());
      copy_out(init[i], state[i], pte);
    }
    module.unload_method("initial_state");
  }
  load_method("forward");
  auto meta = module.method_meta("forward");
  if (!meta.ok()) throw Failure(pte + ": forward has no metadata (" + error_text(meta.error()) + ")");
  int64_t arena_bytes = 0;
  for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) arena_bytes += meta->memory_planned_buffer_size(i).get();

  if (meta->num_inputs() != state.size() + 2 || meta->num_outputs() != state.size() + 1)
    throw Failure(pte + ": forward takes " + std::to_string(meta->num_inputs()) + " inputs and returns " +
                  std::to_string(meta->num_outputs()) + "; expected input_ids, labels and " +
                  std::to_string(state.size()) + " state tensors, and the loss and the state");
  int64_t state_bytes = 0;
  for (const auto& t : state) state_bytes += static_cast<int64_t>(t.data.size() * sizeof(float));
  const Status after_load = read_status();

  std::vector<int64_t> ids(static_cast<size_t>(B * T)), labels(ids.size());
  float loss = 0;
  // the state's own buffers are forward's inputs and its outputs: each step updates them in place
  std::vector<executorch::extension::TensorPtr> held;
  held.push_back(from_blob(ids.data(), {static_cast<int>(B), static_cast<int>(T)}, executorch::aten::ScalarType::Long));
  held.push_back(from_blob(labels.data(), {static_cast<int>(B), static_cast<int>(T)},
                           executorch::aten::ScalarType::Long));
  for (auto& t : state) held.push_back(from_blob(t.data.data(), t.sizes));
  std::vector<EValue> inputs, outputs;
  for (auto& h : held) inputs.emplace_back(*h);
  auto loss_tensor = from_blob(&loss, {}, executorch::aten::ScalarType::Float);
  outputs.emplace_back(*loss_tensor);
  for (size_t i = 2; i < held.size(); ++i) outputs.emplace_back(*held[i]);
  e = module.set_outputs("forward", outputs);
  if (e != Error::Ok) throw Failure(pte + ": forward's outputs cannot be the runner's buffers (" + error_text(e) +
                                    "; a program from an older mesp export?)");
  double total_ms = 0;
  for (long s = 0; s < steps; ++s) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = (s * B + b) % tokens.rows;
      std::memcpy(ids.data() + b * T, tokens.ids.data() + row * T, static_cast<size_t>(T) * 8);
      std::memcpy(labels.data() + b * T, tokens.labels.data() + row * T, static_cast<size_t>(T) * 8);
    }
    auto t0 = std::chrono::steady_clock::now();
    run(module, "forward", inputs, pte);
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    total_ms += ms;
    std::printf("step %ld loss %.9g time %.1f ms\n", s + 1, loss, ms);
    std::fflush(stdout);
  }
  sampler.stop();
  const Status end = read_status();
  auto mib = [](double kib) { return kib / 1024.0; };
  auto priv = [](const Status& st) { return static_cast<double>(st.rss_anon + st.vm_swap + st.rss_shmem); };
  // the figures first: a failed write must not lose them
  std::printf("mean step time %.1f ms over %ld steps (%s)\n", total_ms / steps, steps, optimizer.c_str());
  std::printf("private footprint peak %.1f MiB (RssAnon + VmSwap + RssShmem; RssAnon peak %.1f MiB), RssFile peak "
              "%.1f MiB, RSS peak (VmHWM) %.1f MiB; sampled every 1 ms\n",
              mib(sampler.private_peak()), mib(sampler.anon_peak()), mib(sampler.file_peak()), mib(end.vm_hwm));
  std::printf("private terms: runtime and tokens %.1f MiB (before loading); after loading %.1f MiB, of which "
              "forward's planned arena %.1f MiB and the state %.1f MiB; the steps' own allocations %.1f MiB "
              "(peak less after loading)\n",
              mib(priv(before_load)), mib(priv(after_load)), arena_bytes / 1048576.0, state_bytes / 1048576.0,
              mib(sampler.private_peak() - priv(after_load)));
  std::fflush(stdout);
  write_safetensors(out, state, names.size());  // the adapter: the state's first lora_names tensors
  write_atomically(out_dir + "/adapter_config.json", adapter_config);
  std::printf("wrote %s\n", out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return train(argc, argv);
  } catch (const Failure& f) {
    std::fprintf(stderr, "mesp-runner: %s\n", f.what());
    return 1;
  } catch (const std::exception& f) {
    std::fprintf(stderr, "mesp-runner: %s\n", f.what());
    return 1;
  }
}
