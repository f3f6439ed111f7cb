#include "ultramem/experiment/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include "ultramem/checkpoint/run_folder.h"
#include "ultramem/io/atomic_file.h"
#include "ultramem/io/gnuplot.h"
#include "ultramem/io/json_file.h"

namespace ultramem::experiment {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

std::string fmt(double v, int prec = 4) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(prec) << v;
  return os.str();
}
std::string signed_fmt(double v, int prec = 4) { return (v >= 0 ? "+" : "") + fmt(v, prec); }
std::string millions(double v) { return fmt(v / 1e6, 2) + "M"; }

std::string shell_output(const std::string& cmd) {
  std::string out;
  if (FILE* p = popen(cmd.c_str(), "r")) {
    char buf[256];
    while (fgets(buf, sizeof buf, p)) out += buf;
    pclose(p);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}



// Validation-loss points (step, loss) of a case, from its metrics.jsonl eval events.
std::vector<std::pair<double, double>> eval_curve(const std::string& dir) {
  std::vector<std::pair<double, double>> pts;
  std::ifstream in(fs::path(dir) / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    try {
      const auto j = json::parse(line);
      if (j.value("event", "") == "eval" && j.contains("val_loss"))
        pts.emplace_back(j["step"].get<double>(), j["val_loss"].get<double>());
    } catch (const json::exception&) {
    }
  }
  return pts;
}

std::string quoted(std::string s) {
  for (auto& c : s)
    if (c == '"') c = '\'';
  return "\"" + s + "\"";
}

// A chart title broken into lines of at most `width` characters at spaces (gnuplot's "\n" in a
// double-quoted string), so that a long suite title stays over the plot next to an outside legend.
std::string wrapped_title(const std::string& text, size_t width = 64) {
  std::string out, line;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(' ', start);
    if (end == std::string::npos) end = text.size();
    const std::string word = text.substr(start, end - start);
    if (!line.empty() && line.size() + 1 + word.size() > width) {
      out += line + "\\n";
      line.clear();
    }
    line += (line.empty() ? "" : " ") + word;
    start = end + 1;
  }
  return out + line;
}

// Charts are best effort: a gnuplot failure is reported in the log, the report is still written.
void run_gnuplot(const std::string& dir, const std::string& name, const std::string& script, std::ostream& log) {
  try {
    io::run_gnuplot(dir, name, script);
  } catch (const std::exception& e) {
    log << e.what() << "\n";
  }
}

// Validation-loss curves, one series per run: the mean over its seeds at each evaluated step, with the
// seeds' range as error bars when there are several.
void plot_curves(const std::vector<CaseResult>& cases, const std::string& dir, const std::string& title,
                 std::ostream& log) {
  std::vector<std::string> order;                                   // runs in case order
  std::map<std::string, std::string> labels;
  std::map<std::string, std::map<double, std::vector<double>>> by;  // run -> step -> losses over seeds
  std::map<std::string, std::set<uint64_t>> seeds;
  for (const auto& c : cases) {
    const auto pts = eval_curve(c.dir);
    if (pts.empty()) continue;
    if (!labels.count(c.run)) order.push_back(c.run);
    labels[c.run] = c.label;
    seeds[c.run].insert(c.seed);
    for (const auto& [step, loss] : pts) by[c.run][step].push_back(loss);
  }
  if (order.empty()) return;
  std::string plots;
  int idx = 0;
  for (const auto& run : order) {
    const std::string dat = "curve_" + run + ".dat";
    std::ostringstream os;
    os << "# step mean min max (over seeds)\n";
    for (const auto& [step, v] : by[run]) {
      double sum = 0, lo = v.front(), hi = v.front();
      for (double x : v) {
        sum += x;
        lo = std::min(lo, x);
        hi = std::max(hi, x);
      }
      os << step << " " << sum / double(v.size()) << " " << lo << " " << hi << "\n";
    }
    io::write_file_atomically((fs::path(dir) / dat).string(), {os.str()});
    const size_t n = seeds[run].size();
    const std::string what = n > 1 ? " (mean of " + std::to_string(n) + " seeds, range)" : " (1 seed)";
    plots += std::string(plots.empty() ? "plot " : ", \\\n     ") + quoted(dat) +
             (n > 1 ? " using 1:2:3:4 with yerrorlines " : " using 1:2 with linespoints ") + io::series_style(idx) +
             " title " + quoted(labels[run] + what);
    ++idx;
  }
  run_gnuplot(dir, "curves",
              io::chart_preamble() + "set output 'curves.png'\nset title " +
                  quoted(wrapped_title(title + ": validation loss")) +
                  "\nset xlabel 'step'\nset ylabel 'validation loss (nats/token)'\n" + plots + "\n",
              log);
}

double stat_sd(const std::vector<double>& v, double mean) {
  if (v.size() < 2) return 0;
  double s = 0;
  for (double x : v) s += (x - mean) * (x - mean);
  return std::sqrt(s / double(v.size() - 1));
}

const RunSummary* find_tagged(const std::vector<RunSummary>& runs, const std::string& tag) {
  for (const auto& r : runs)
    if (r.tags.value(tag, false)) return &r;
  return nullptr;
}

std::string seeds_cell(const RunSummary& r) {
  std::string s;
  for (double v : r.val) s += (s.empty() ? "" : ", ") + fmt(v);
  return s;
}

std::string spread_cell(const RunSummary& r) {
  return r.val.size() > 1 ? fmt(r.min) + " - " + fmt(r.max) + " (sd " + fmt(r.sd) + ")" : "one seed";
}

void compare_section(const std::vector<RunSummary>& runs, std::ostream& md) {
  md << "| run | params total | activated | MFLOP/token | val loss (mean) | seed range | per seed | train time |\n"
        "|---|---:|---:|---:|---:|---|---|---:|\n";
  for (const auto& r : runs)
    md << "| " << r.label << " | " << millions(r.info.value("params_total", 0.0)) << " | "
       << millions(r.info.value("params_activated", 0.0)) << " | " << fmt(r.info.value("flops_per_token", 0.0) / 1e6, 2)
       << " | " << fmt(r.mean) << " | " << spread_cell(r) << " | " << seeds_cell(r) << " | " << fmt(r.seconds, 0)
       << " s |\n";
  const RunSummary* focus = find_tagged(runs, "focus");
  if (!focus) focus = &runs.back();
  md << "\nDifferences against **" << focus->label
     << "** (a difference whose seed ranges overlap is reported as no difference):\n\n";
  for (const auto& r : runs) {
    if (&r == focus) continue;
    const double d = focus->mean - r.mean;
    md << "- " << focus->label << " - " << r.label << ": " << signed_fmt(d) << " nats; ";
    if (focus->val.size() < 2 || r.val.size() < 2)
      md << (d < 0 ? "lower" : "higher") << " (one seed: spread unknown)\n";
    else if (seed_ranges_overlap(*focus, r))
      md << "no difference (seed ranges overlap)\n";
    else
      md << (d < 0 ? "lower" : "higher") << " beyond the seed spread\n";
  }
}

// Mean and range over seeds of a list that may hold nulls (no token checked): "0.912 (0.90 - 0.93)".
std::string seed_stat_cell(const nlohmann::json& list) {
  std::vector<double> v;
  for (const auto& x : list)
    if (x.is_number()) v.push_back(x.get<double>());
  if (v.empty()) return "-";
  double s = 0;
  for (double x : v) s += x;
  const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
  return fmt(s / double(v.size()), 3) + (v.size() > 1 ? " (" + fmt(*lo, 3) + " - " + fmt(*hi, 3) + ")" : "");
}

// The compare table, then per run and memory layer the recall of the exact top-m and the share of its
// score mass kept, mean over seeds with their range.
void retrieval_section(const std::vector<RunSummary>& runs, std::ostream& md) {
  compare_section(runs, md);
  std::set<std::string> layers;
  for (const auto& r : runs)
    for (auto it = r.retrieval.begin(); it != r.retrieval.end(); ++it) layers.insert(it.key());
  md << "\nRetrieval quality of each trained model with its own filter, on validation tokens (recall: share of "
        "the exact top-m over the whole grid that the filter kept; mass: kept score sum / exact top-m score sum; "
        "mean over seeds, range in brackets):\n\n| run | rescored pairs |";
  for (const auto& l : layers) md << " " << l << " recall | " << l << " mass |";
  md << "\n|---|---:|";
  for (size_t i = 0; i < layers.size(); ++i) md << "---:|---:|";
  md << "\n";
  for (const auto& r : runs) {
    md << "| " << r.label << " | " << (r.tags.contains("pairs") ? r.tags["pairs"].dump() : "-") << " |";
    for (const auto& l : layers) {
      const auto& lj = r.retrieval.contains(l) ? r.retrieval[l] : nlohmann::json::object();
      md << " " << seed_stat_cell(lj.value("recall", nlohmann::json::array())) << " | "
         << seed_stat_cell(lj.value("score_mass", nlohmann::json::array())) << " |";
    }
    md << "\n";
  }
}

void ablation_section(const std::vector<RunSummary>& runs, std::ostream& md) {
  md << "| step | params total | MFLOP/token | val loss | delta vs previous | paper delta | cumulative | seed range |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|\n";
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& r = runs[i];
    const std::string paper = r.tags.contains("paper_delta") ? signed_fmt(r.tags["paper_delta"].get<double>(), 3) : "-";
    md << "| " << r.label << " | " << millions(r.info.value("params_total", 0.0)) << " | "
       << fmt(r.info.value("flops_per_token", 0.0) / 1e6, 2) << " | " << fmt(r.mean) << " | "
       << (i ? signed_fmt(r.mean - runs[i - 1].mean) : "-")
       << " | " << paper << " | " << (i ? signed_fmt(r.mean - runs[0].mean) : "-") << " | " << spread_cell(r)
       << " |\n";
  }
}

void capacity_section(const std::vector<RunSummary>& runs, const std::string& dir, bool plot, std::ostream& md,
                      std::ostream& log) {
  const RunSummary* base = find_tagged(runs, "baseline");
  if (!base) base = &runs.front();
  auto per_mflop = [](const RunSummary& r) {
    return r.facts_recalled / std::max(1e-9, r.info.value("flops_per_token", 0.0) / 1e6);
  };
  md << "| run | memory rows | params total | activated MFLOP/token | recall | facts recalled | facts per MFLOP | "
        "vs " << base->label << " | val loss (LM, all tokens) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
  std::ostringstream dat;
  int i = 0;
  for (const auto& r : runs) {
    const double base_rate = per_mflop(*base);
    // A baseline that recalled nothing gives no ratio (n/a), not a division by ~0.
    const std::string ratio_cell = base_rate > 0 ? fmt(per_mflop(r) / base_rate, 2) + "x" : std::string("n/a");
    md << "| " << r.label << " | " << (r.tags.contains("N") ? std::to_string(r.tags["N"].get<int64_t>()) : "-") << " | "
       << millions(r.info.value("params_total", 0.0)) << " | " << fmt(r.info.value("flops_per_token", 0.0) / 1e6, 3)
       << " | " << fmt(r.recall, 3) << " | " << fmt(r.facts_recalled, 0) << " | " << fmt(per_mflop(r), 0) << " | "
       << ratio_cell << " | " << fmt(r.mean) << " |\n";
    dat << i++ << " " << r.recall << " " << quoted(r.label) << "\n";
  }
  if (plot) {
    io::write_file_atomically((fs::path(dir) / "capacity.dat").string(), {dat.str()});
    run_gnuplot(dir, "capacity",
                io::chart_preamble() +
                    "set output 'capacity.png'\nset title 'fact recall at equal activated compute'\nset ylabel "
                    "'recall'\nset yrange [0:1]\nset style fill solid 0.6\nset boxwidth 0.6\nset xtics rotate by -30\n"
                    "plot 'capacity.dat' using 1:2:xtic(3) with boxes linestyle 1 notitle\n",
                log);
  }
}

void scaling_section(const std::vector<RunSummary>& runs, const std::string& dir, bool plot, std::ostream& md,
                     std::ostream& log) {
  std::vector<double> x, y;
  size_t min_seeds = 0, max_seeds = 0;
  md << "| run | N (value rows per layer) | params total | MFLOP/token | val loss | seed range |\n"
        "|---|---:|---:|---:|---:|---|\n";
  for (const auto& r : runs) {
    const double N = r.tags.value("N", 0.0);
    md << "| " << r.label << " | " << int64_t(N) << " | " << millions(r.info.value("params_total", 0.0)) << " | "
       << fmt(r.info.value("flops_per_token", 0.0) / 1e6, 2) << " | " << fmt(r.mean) << " | " << spread_cell(r) << " |\n";
    if (N > 0) {
      min_seeds = x.empty() ? r.val.size() : std::min(min_seeds, r.val.size());
      max_seeds = std::max(max_seeds, r.val.size());
      x.push_back(N);
      y.push_back(r.mean);
    }
  }
  if (x.size() < 2) return;
  const auto f = fit_log(x, y);
  md << "\nFit over the runs with a memory: val loss = " << fmt(f.a) << " " << (f.b < 0 ? "- " : "+ ")
     << fmt(std::abs(f.b)) << " * ln N (R^2 = " << fmt(f.r2, 3) << "): " << signed_fmt(f.b * std::log(2.0))
     << " nats per doubling of N, " << signed_fmt(f.b * std::log(64.0)) << " over 64x.\n";
  if (plot) {
    const std::string seeds_label = max_seeds <= 1 ? std::string("runs (1 seed)")
                                    : min_seeds == max_seeds ? "runs (mean of " + std::to_string(max_seeds) + " seeds)"
                                                             : "runs (mean over their seeds)";
    std::ostringstream dat;
    for (size_t i = 0; i < x.size(); ++i) dat << x[i] << " " << y[i] << "\n";
    io::write_file_atomically((fs::path(dir) / "scaling.dat").string(), {dat.str()});
    run_gnuplot(dir, "scaling",
                io::chart_preamble() + "set output 'scaling.png'\nset title 'validation loss vs memory size'\n"
                                     "set logscale x 2\nset xlabel 'value rows N per memory layer'\n"
                                     "set ylabel 'validation loss'\nf(x) = " +
                    fmt(f.a, 6) + " + (" + fmt(f.b, 6) + ") * log(x)\nplot 'scaling.dat' using 1:2 with points "
                                                         "linestyle 1 title " + quoted(seeds_label) + ", f(x) with lines linestyle 2 title 'fit a + b ln N'\n",
                log);
  }
}

}  // namespace

std::string git_revision() {
  auto rev = shell_output("git rev-parse --short HEAD 2>/dev/null");
  if (rev.empty()) return "unknown";
  if (!shell_output("git status --porcelain --untracked-files=no 2>/dev/null").empty()) rev += " (with uncommitted changes)";
  return rev;
}

bool seed_ranges_overlap(const RunSummary& a, const RunSummary& b) { return a.min <= b.max && b.min <= a.max; }

LogFit fit_log(const std::vector<double>& x, const std::vector<double>& y) {
  LogFit f;
  const size_t n = std::min(x.size(), y.size());
  if (n < 2) return f;
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (size_t i = 0; i < n; ++i) {
    const double lx = std::log(x[i]);
    sx += lx, sy += y[i], sxx += lx * lx, sxy += lx * y[i];
  }
  const double den = double(n) * sxx - sx * sx;
  if (den == 0) return f;
  f.b = (double(n) * sxy - sx * sy) / den;
  f.a = (sy - f.b * sx) / double(n);
  double ss_res = 0, ss_tot = 0;
  const double my = sy / double(n);
  for (size_t i = 0; i < n; ++i) {
    const double p = f.a + f.b * std::log(x[i]);
    ss_res += (y[i] - p) * (y[i] - p);
    ss_tot += (y[i] - my) * (y[i] - my);
  }
  f.r2 = ss_tot > 0 ? 1.0 - ss_res / ss_tot : 1.0;
  return f;
}

std::vector<RunSummary> summarize(const ExperimentSuite& suite, const std::vector<CaseResult>& cases) {
  std::vector<RunSummary> out;
  for (const auto& run : suite.runs) {
    RunSummary r;
    r.run = run.name;
    r.label = run.label;
    r.tags = run.tags;
    double recall = 0, facts = 0;
    int n_recall = 0;
    for (const auto& c : cases) {
      if (c.run != run.name) continue;
      r.info = c.info;
      r.val.push_back(c.final.value("val_loss", NAN));
      r.seconds += c.final.value("train_seconds", 0.0);
      if (c.final.contains("retrieval"))
        for (auto it = c.final["retrieval"].begin(); it != c.final["retrieval"].end(); ++it)
          for (const char* f : {"recall", "score_mass"})
            r.retrieval[it.key()][f].push_back(it.value().value(f, nlohmann::json(nullptr)));
      if (c.final.contains("recall")) {
        recall += c.final["recall"].get<double>();
        facts += c.final["facts_recalled"].get<double>();
        ++n_recall;
      }
    }
    if (r.val.empty()) continue;
    double s = 0;
    for (double v : r.val) s += v;
    r.mean = s / double(r.val.size());
    r.min = *std::min_element(r.val.begin(), r.val.end());
    r.max = *std::max_element(r.val.begin(), r.val.end());
    r.sd = stat_sd(r.val, r.mean);
    if (n_recall) {
      r.recall = recall / n_recall;
      r.facts_recalled = facts / n_recall;
    }
    out.push_back(std::move(r));
  }
  return out;
}

std::string write_report(const ExperimentSuite& suite, const std::vector<CaseResult>& cases, const std::string& dir,
                         bool plot, double wall_seconds, std::ostream& log, const std::string& revision) {
  const std::string rev = revision.empty() ? git_revision() : revision;
  fs::create_directories(dir);
  const auto runs = summarize(suite, cases);
  if (runs.empty()) throw std::runtime_error("no finished runs to report in " + dir);
  if (plot && !io::gnuplot_available()) {
    log << "gnuplot not found: no charts (install gnuplot-nox, scripts/setup.sh does)\n";
    plot = false;
  }
  const auto& tr = suite.runs.front().train;
  std::set<uint64_t> seeds;
  for (const auto& c : cases) seeds.insert(c.seed);
  std::string seed_list;
  for (auto s : seeds) seed_list += (seed_list.empty() ? "" : ", ") + std::to_string(s);
  double train_seconds = 0;
  for (const auto& r : runs) train_seconds += r.seconds;
  const std::time_t now = std::time(nullptr);
  char date[32];
  std::strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", std::gmtime(&now));

  std::ostringstream md;
  md << "## " << suite.title << (suite.quick ? " (quick)" : "") << "\n\n";
  md << "- Command: `ultramem experiment " << suite.name << (suite.quick ? " --quick" : "") << "` (suite file `"
     << suite.source_path << "`), revision " << rev << " (when this invocation started), " << date << ".\n";
  md << "- Task: " << (suite.task == "lm" ? "language modelling on `" + suite.data_dir + "`" : "synthetic fact recall "
                                                                                                  "(data/facts.h) " +
                                                                                                      suite.facts.dump())
     << "; " << tr.value("steps", 0) << " steps x " << tr.value("batch_size", 0) << " x " << tr.value("seq_len", 0)
     << " tokens, lr " << tr.value("lr", 0.0) << "; seeds " << seed_list << ".\n";
  md << "- Training time " << fmt(train_seconds / 60, 1) << " min summed over runs";
  if (wall_seconds > 0) md << "; this invocation " << fmt(wall_seconds / 60, 1) << " min wall";
  md << ".\n\n";
  if (suite.analysis == "compare") compare_section(runs, md);
  if (suite.analysis == "retrieval") retrieval_section(runs, md);
  if (suite.analysis == "ablation") ablation_section(runs, md);
  if (suite.analysis == "capacity") capacity_section(runs, dir, plot, md, log);
  if (suite.analysis == "scaling") scaling_section(runs, dir, plot, md, log);
  if (plot) {
    plot_curves(cases, dir, suite.title, log);
    md << "\nCharts: `curves.png` (validation loss, mean over seeds with their range)";
    if (suite.analysis == "capacity") md << ", `capacity.png`";
    if (suite.analysis == "scaling") md << ", `scaling.png`";
    md << ".\n";
  }

  json j = {{"suite", suite.name}, {"title", suite.title}, {"quick", suite.quick}, {"analysis", suite.analysis},
            {"revision", rev}, {"date", date}, {"wall_seconds", wall_seconds}};
  for (const auto& c : cases)
    j["cases"].push_back({{"run", c.run}, {"label", c.label}, {"seed", c.seed}, {"dir", c.dir}, {"tags", c.tags},
                          {"info", c.info}, {"final", c.final}, {"model", c.model}});
  for (const auto& r : runs)
    j["runs"].push_back({{"run", r.run}, {"label", r.label}, {"mean", r.mean}, {"min", r.min}, {"max", r.max},
                         {"sd", r.sd}, {"val", r.val}, {"recall", r.recall}, {"facts_recalled", r.facts_recalled},
                         {"retrieval", r.retrieval},
                         {"info", r.info}, {"tags", r.tags}});
  io::write_file_atomically((fs::path(dir) / "results.md").string(), {md.str()});
  io::write_json_file((fs::path(dir) / "results.json").string(), j);
  return md.str();
}

}  // namespace ultramem::experiment
