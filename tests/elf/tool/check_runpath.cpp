// check-runpath FILE|FOLDER...: exits 1, listing each offender, when an ELF file under the
// arguments has an empty or relative RPATH/RUNPATH entry; 2 when no ELF file was found (so a
// wrong path cannot pass); 0 otherwise. Used on the build tree (tests/elf) and on the installed
// tree (tests/install/install_test.sh).
#include <iostream>

#include "../runpath.h"

int main(int argc, char** argv) {
  using namespace concord::elfcheck;
  std::vector<std::string> roots(argv + 1, argv + argc);
  std::vector<std::string> files;
  try {
    files = elf_files(roots);
  } catch (const std::exception& e) {
    std::cerr << "check-runpath: " << e.what() << "\n";
    return 2;
  }
  if (files.empty()) {
    std::cerr << "check-runpath: no ELF file found under the given paths\n";
    return 2;
  }
  size_t bad = 0;
  for (const auto& f : files) {
    try {
      for (const auto& line : unsafe_entries(f)) {
        std::cout << line << "\n";
        ++bad;
      }
    } catch (const std::exception& e) {
      std::cout << e.what() << "\n";
      ++bad;
    }
  }
  std::cout << "check-runpath: " << files.size() << " ELF files, " << bad
            << " unsafe search-path entries\n";
  return bad ? 1 : 0;
}
