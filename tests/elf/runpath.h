// Reads the RPATH / RUNPATH entries of an ELF file with <elf.h> (no external tool) and reports
// the ones the dynamic loader would resolve against the current folder: an empty entry
// ("a::b", a trailing ':') means "the current directory" to ld.so, and a relative one ("lib")
// is resolved against it. Only absolute and $ORIGIN-relative entries are safe.
#pragma once

#include <elf.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace concord::elfcheck {

struct SearchPath {
  const char* tag;    // "RPATH" or "RUNPATH"
  std::string value;  // the whole colon-separated string
};

// True when `entry` of a search path can never mean the current folder.
inline bool safe_entry(const std::string& entry) {
  if (entry.empty()) return false;
  if (entry[0] == '/') return true;
  for (const char* origin : {"$ORIGIN", "${ORIGIN}"}) {
    size_t n = std::strlen(origin);
    if (entry.compare(0, n, origin) == 0 && (entry.size() == n || entry[n] == '/')) return true;
  }
  return false;
}

// First 4 bytes are the ELF magic.
inline bool is_elf(const std::string& file) {
  std::ifstream f(file, std::ios::binary);
  char magic[SELFMAG] = {};
  return f.read(magic, SELFMAG) && std::memcmp(magic, ELFMAG, SELFMAG) == 0;
}

namespace detail {

template <class T>
bool read_at(std::ifstream& f, uint64_t offset, T* out, size_t count = 1) {
  f.clear();
  f.seekg(static_cast<std::streamoff>(offset));
  return static_cast<bool>(f.read(reinterpret_cast<char*>(out), sizeof(T) * count));
}

// Follows the loader's view (program headers: PT_DYNAMIC, PT_LOAD), not the section headers,
// which a stripped file may lack. Throws std::runtime_error on a malformed file.
template <class Ehdr, class Phdr, class Dyn>
std::vector<SearchPath> search_paths(std::ifstream& f, const std::string& file) {
  auto fail = [&](const std::string& why) { throw std::runtime_error(file + ": " + why); };
  Ehdr eh;
  if (!read_at(f, 0, &eh)) fail("truncated ELF header");
  if (eh.e_phnum == 0) return {};  // an object file: nothing the loader reads
  if (eh.e_phentsize != sizeof(Phdr)) fail("unexpected program header size");
  std::vector<Phdr> ph(eh.e_phnum);
  if (!read_at(f, eh.e_phoff, ph.data(), ph.size())) fail("truncated program headers");
  const Phdr* dyn_seg = nullptr;
  for (const auto& p : ph)
    if (p.p_type == PT_DYNAMIC) dyn_seg = &p;
  if (!dyn_seg) return {};  // statically linked
  std::vector<Dyn> dyn(dyn_seg->p_filesz / sizeof(Dyn));
  if (dyn.size() > (1u << 20) || !read_at(f, dyn_seg->p_offset, dyn.data(), dyn.size()))
    fail("truncated dynamic section");
  uint64_t strtab = 0, strsz = 0;
  std::vector<std::pair<const char*, uint64_t>> wanted;
  for (const auto& d : dyn) {
    if (d.d_tag == DT_NULL) break;
    if (d.d_tag == DT_STRTAB) strtab = d.d_un.d_ptr;
    if (d.d_tag == DT_STRSZ) strsz = d.d_un.d_val;
    if (d.d_tag == DT_RPATH) wanted.push_back({"RPATH", d.d_un.d_val});
    if (d.d_tag == DT_RUNPATH) wanted.push_back({"RUNPATH", d.d_un.d_val});
  }
  if (wanted.empty()) return {};
  // DT_STRTAB is an address: find the file offset through the PT_LOAD segment holding it.
  uint64_t strtab_off = 0;
  bool mapped = false;
  for (const auto& p : ph)
    if (p.p_type == PT_LOAD && strtab >= p.p_vaddr && strtab - p.p_vaddr < p.p_filesz) {
      strtab_off = strtab - p.p_vaddr + p.p_offset;
      mapped = true;
    }
  if (!mapped || strsz == 0 || strsz > (uint64_t(1) << 32)) fail("no usable dynamic string table");
  std::vector<SearchPath> out;
  for (const auto& [tag, off] : wanted) {
    if (off >= strsz) fail(std::string(tag) + " string outside the string table");
    std::string s;
    f.clear();
    f.seekg(static_cast<std::streamoff>(strtab_off + off));
    char c;
    while (s.size() < strsz - off && f.get(c) && c != '\0') s.push_back(c);
    out.push_back({tag, s});
  }
  return out;
}

}  // namespace detail

// The RPATH / RUNPATH strings of an ELF file (none for a non-ELF or static file).
inline std::vector<SearchPath> search_paths(const std::string& file) {
  std::ifstream f(file, std::ios::binary);
  unsigned char ident[EI_NIDENT] = {};
  if (!f.read(reinterpret_cast<char*>(ident), EI_NIDENT) ||
      std::memcmp(ident, ELFMAG, SELFMAG) != 0)
    return {};
  const bool little = ident[EI_DATA] == ELFDATA2LSB;
  const bool host_little = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;
  if (little != host_little) throw std::runtime_error(file + ": ELF of the other byte order");
  if (ident[EI_CLASS] == ELFCLASS64)
    return detail::search_paths<Elf64_Ehdr, Elf64_Phdr, Elf64_Dyn>(f, file);
  if (ident[EI_CLASS] == ELFCLASS32)
    return detail::search_paths<Elf32_Ehdr, Elf32_Phdr, Elf32_Dyn>(f, file);
  throw std::runtime_error(file + ": unknown ELF class");
}

// One line per unsafe entry, naming the file, the tag, the whole string and the entry.
inline std::vector<std::string> unsafe_entries(const std::string& file) {
  std::vector<std::string> out;
  for (const auto& sp : search_paths(file)) {
    size_t start = 0, index = 0;
    while (true) {
      size_t end = sp.value.find(':', start);
      std::string entry = sp.value.substr(start, end == std::string::npos ? end : end - start);
      if (!safe_entry(entry))
        out.push_back(file + ": " + sp.tag + " '" + sp.value + "' entry " + std::to_string(index) +
                      (entry.empty() ? " is empty (the loader reads it as the current folder)"
                                     : " '" + entry + "' is relative to the current folder"));
      if (end == std::string::npos) break;
      start = end + 1;
      ++index;
    }
  }
  return out;
}

// Every ELF file under the given files or folders (recursively; symlinks are not followed, so
// libconcord.so -> libconcord.so.0.1.0 is checked once).
inline std::vector<std::string> elf_files(const std::vector<std::string>& roots) {
  namespace fs = std::filesystem;
  std::vector<std::string> out;
  for (const auto& root : roots) {
    if (fs::is_regular_file(fs::symlink_status(root))) {
      if (is_elf(root)) out.push_back(root);
      continue;
    }
    if (!fs::is_directory(root)) continue;
    for (const auto& e : fs::recursive_directory_iterator(root))
      if (e.is_regular_file() && !e.is_symlink() && is_elf(e.path().string()))
        out.push_back(e.path().string());
  }
  return out;
}

}  // namespace concord::elfcheck
