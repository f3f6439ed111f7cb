// Running the sentencepiece trainer (the `spm_train` program of the Debian package `sentencepiece`) in a
// child process. See spm_model.h for why it does not run in-process.
#pragma once
#include <ostream>
#include <string>
#include <vector>

namespace ultramem::data {

// Path of the spm_train executable: $ULTRAMEM_SPM_TRAIN if set, else the first `spm_train` on $PATH.
// std::runtime_error (saying how to install it) when there is none.
std::string find_spm_train();

// Writes `sentences` (one per line; they must not contain '\n') to a temporary directory, runs
//   spm_train --input=sentences.txt --model_prefix=model <flags>
// there (relative paths, so the model's recorded trainer spec does not depend on the directory), and
// returns the bytes of model.model. `flags` are "--name=value" strings. The trainer's output goes to a log
// file whose last lines are quoted in the std::runtime_error thrown when it fails.
std::string run_spm_train(const std::vector<std::string>& sentences, const std::vector<std::string>& flags);

}  // namespace ultramem::data
