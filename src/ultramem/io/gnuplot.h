// The one gnuplot driver: charts of the experiment reports and the benchmarks are gnuplot scripts
// (data inline) written next to their PNGs and run here, all in one house style.
#pragma once
#include <string>

namespace ultramem::io {

// True when a `gnuplot` executable is on PATH.
bool gnuplot_available();

// Writes `script` to <dir>/<name>.gp and runs gnuplot on it in `dir`. Throws std::runtime_error naming
// the script when gnuplot is missing (with the Debian package that brings it) or exits nonzero
// (with its messages).
void run_gnuplot(const std::string& dir, const std::string& name, const std::string& script);

// The house style's preamble: PNG terminal of the given size, grid, the legend outside the data
// (right of the plot), and series styles 1..N (`linestyle K`) of distinct colours, each with its own
// point marker, so that series can be told apart in print and by colour-blind readers.
std::string chart_preamble(int width = 960, int height = 560);

// `linestyle K` of the preamble for series index i (0-based, cycles after the last style).
std::string series_style(int i);

}  // namespace ultramem::io
