#include "ultramem/io/gnuplot.h"

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>

#include "ultramem/io/atomic_file.h"

namespace ultramem::io {
namespace {

// Okabe-Ito's colour-blind-safe palette plus black and two greys: ten colours no two of which are
// close; each style also gets its own point type. Styles 11-20 repeat the colours dashed and 21-30
// dash-dotted (gnuplot dt 2 and 3), with other point types, so up to 30 series stay apart.
constexpr const char* kColours[] = {"#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00",
                                    "#56B4E9", "#000000", "#F0E442", "#7F7F7F", "#8C564B"};
constexpr int kPointTypes[] = {7,  5,  9,  11, 13, 4,  6,  8,  10, 12, 1,  2,  3,  14, 15,
                               65, 66, 67, 68, 69, 16, 17, 18, 19, 20, 70, 71, 72, 73, 74};
constexpr int kColourCount = 10;
constexpr int kStyles = 30;

std::string quoted(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

}  // namespace

bool gnuplot_available() { return std::system("command -v gnuplot >/dev/null 2>&1") == 0; }

void run_gnuplot(const std::string& dir, const std::string& name, const std::string& script) {
  const std::string gp = (std::filesystem::path(dir) / (name + ".gp")).string();
  write_file_atomically(gp, {script});
  if (!gnuplot_available())
    throw std::runtime_error("gnuplot not found (Debian: apt-get install gnuplot-nox; scripts/setup.sh installs it); "
                             "the script is " + gp);
  const std::string cmd = "cd " + quoted(dir) + " && gnuplot " + quoted(name + ".gp") + " 2>&1";
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) throw std::runtime_error("cannot start gnuplot for " + gp);
  char buf[256];
  while (fgets(buf, sizeof buf, p)) out += buf;
  const int status = pclose(p);
  if (status != 0) throw std::runtime_error("gnuplot failed on " + gp + ": " + out);
}

std::string chart_preamble(int width, int height) {
  std::string s = "set terminal pngcairo size " + std::to_string(width) + "," + std::to_string(height) +
                  " font 'sans,10'\nset grid\nset key outside right top vertical Left reverse box opaque\n";
  for (int i = 0; i < kStyles; ++i)
    s += "set style line " + std::to_string(i + 1) + " lc rgb '" + kColours[i % kColourCount] + "' lw 2 dt " +
         std::to_string(1 + i / kColourCount) + " pt " + std::to_string(kPointTypes[i]) + " ps 1.2\n";
  return s;
}

std::string series_style(int i) { return "linestyle " + std::to_string(i % kStyles + 1); }

}  // namespace ultramem::io
