// Charts of `ultramem bench decode`: for each scope (layer, model, pooled lookup) one PNG of latency
// vs batch (a panel per N) and one of latency vs N (a panel per batch), a line per kind and value
// format with min/max error bars. Written as one gnuplot script with inline data blocks and run.
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "ultramem/io/gnuplot.h"
#include "ultramem/perf/decode_bench.h"

namespace ultramem::perf {
namespace {

std::string series_name(const DecodeRecord& r) { return r.dtype == "fp32" ? r.kind : r.kind + " " + r.dtype; }
// The prefetch comparison (kind ultramem_prefetch) is read from its ratio line; charted it would draw
// over the ultramem series it equals to a few percent.
bool charted(const DecodeRecord& r) { return r.kind != "ultramem_prefetch"; }

std::string block_name(size_t i) { return "$d" + std::to_string(i); }

std::string log2_label(int64_t N) {
  const int l = int(std::lround(std::log2(double(N))));
  return (int64_t(1) << l) == N ? "2^" + std::to_string(l) : std::to_string(N);
}

void make_dir(const std::string& dir) {
  std::string path;
  std::stringstream ss(dir);
  std::string part;
  if (!dir.empty() && dir[0] == '/') path = "/";
  while (std::getline(ss, part, '/')) {
    if (part.empty()) continue;
    path += part + "/";
    if (mkdir(path.c_str(), 0755) != 0 && errno != EEXIST)
      throw std::runtime_error("bench decode --plot: cannot create directory " + path);
  }
}

// One multiplot PNG: a panel per value of `panel_of`, x = `x_of`, one line per series.
struct Figure {
  std::string file, title, xlabel, xformat;  // xformat: gnuplot tic format of the (log2) x axis
  std::function<int64_t(const DecodeRecord&)> panel_of, x_of;
  std::function<std::string(int64_t)> panel_label;
};

}  // namespace

std::vector<std::string> plot_decode_records(const std::vector<DecodeRecord>& records, const std::string& dir) {
  make_dir(dir);
  std::ostringstream gp, data;
  std::vector<std::string> pngs;
  size_t blocks = 0;
  gp << io::chart_preamble(1600, 1000) << "set termoption noenhanced\nset key font ',8'\n"
     << "set logscale x 2\nset logscale y 10\n"
     << "set offsets graph 0.03, graph 0.03, 0, 0\n"
     << "set ylabel 'latency per step (us, median; bars: min..max)'\n";
  std::set<std::string> scopes, names;
  for (const auto& r : records) {
    if (!charted(r)) continue;
    scopes.insert(r.scope);
    names.insert(series_name(r));
  }
  // One style per series name across every panel and figure, so a kind keeps its colour and marker.
  std::map<std::string, int> style;
  for (const auto& name : names) style.emplace(name, int(style.size()));
  for (const auto& scope : scopes) {
    const std::vector<Figure> figures = {
        {scope + "_latency_vs_batch.png", scope + ": latency vs batch", "batch (tokens per step)", "%g",
         [](const DecodeRecord& r) { return r.N; }, [](const DecodeRecord& r) { return r.batch; },
         [](int64_t N) { return "N = " + log2_label(N); }},
        {scope + "_latency_vs_N.png", scope + ": latency vs value rows N", "N (value rows)", "2^%L",
         [](const DecodeRecord& r) { return r.batch; }, [](const DecodeRecord& r) { return r.N; },
         [](int64_t B) { return "batch " + std::to_string(B); }}};
    for (const auto& f : figures) {
      std::map<int64_t, std::map<std::string, std::vector<const DecodeRecord*>>> panels;
      for (const auto& r : records)
        if (r.scope == scope && charted(r)) panels[f.panel_of(r)][series_name(r)].push_back(&r);
      if (panels.empty()) continue;
      const int n = int(panels.size()), cols = n <= 1 ? 1 : n <= 4 ? 2 : 3, rows = (n + cols - 1) / cols;
      gp << "set output '" << f.file << "'\n"
         << "set multiplot layout " << rows << "," << cols << " title '" << f.title << "'\n"
         << "set xlabel '" << f.xlabel << "'\n"
         << "set xtics 4\nset format x '" << f.xformat << "'\n";
      for (auto& [panel, series] : panels) {
        gp << "set title '" << f.panel_label(panel) << "'\nplot ";
        bool first = true;
        for (auto& [name, pts] : series) {
          std::sort(pts.begin(), pts.end(),
                    [&](const DecodeRecord* a, const DecodeRecord* b) { return f.x_of(*a) < f.x_of(*b); });
          const std::string b = block_name(blocks++);
          data << b << " << EOD\n";
          for (const auto* p : pts)
            data << f.x_of(*p) << " " << p->median_s * 1e6 << " " << p->min_s * 1e6 << " " << p->max_s * 1e6 << "\n";
          data << "EOD\n";
          gp << (first ? "" : ", ") << b << " using 1:2:3:4 with yerrorlines " << io::series_style(style.at(name))
             << " title '" << name << "'";
          first = false;
        }
        gp << "\n";
      }
      gp << "unset multiplot\n";
      pngs.push_back(dir + "/" + f.file);
    }
  }
  io::run_gnuplot(dir, "decode",
                  "# gnuplot script written by `ultramem bench decode --plot`; run: cd " + dir +
                      " && gnuplot decode.gp\n" + data.str() + gp.str());
  return pngs;
}

}  // namespace ultramem::perf
