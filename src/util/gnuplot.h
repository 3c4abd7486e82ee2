// Plots through the gnuplot program (gnuplot-nox): scripts are written next to their data so a
// reader can rerun them, and PNGs appear atomically (rendered to a temporary name, then renamed).
#pragma once
#include <string>

namespace pipenag {

// A gnuplot double-quoted string literal.
std::string quote_gp(const std::string& s);

// Runs `program -e "outfile='<png>.tmp.<pid>'" <script>` in `dir` and renames the result to
// `dir/<png>`. "" on success, else one line saying why not (gnuplot missing, its last complaint).
std::string render_gnuplot(const std::string& program, const std::string& dir, const std::string& script,
                           const std::string& png);

}  // namespace pipenag
