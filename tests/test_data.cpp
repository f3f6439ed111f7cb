// Tests of the data layer: corpus reading and UTF-8 validation, the train/validation split, the
// sentencepiece tokenizer, token shards and their integrity checks, batch sampling (determinism, resume,
// rank slices), evaluation batches, and prepare() (outputs, reuse, rebuild). All on small data made here.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <torch/types.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "ultramem/data/corpus.h"
#include "ultramem/data/prepare.h"
#include "ultramem/data/sampler.h"
#include "ultramem/data/shard.h"
#include "ultramem/data/spm_trainer.h"
#include "ultramem/data/split.h"
#include "ultramem/data/tokenizer.h"

namespace fs = std::filesystem;
using namespace ultramem::data;

namespace {

constexpr int64_t kTestVocab = 400;

// A fresh directory under the system temp dir, removed with everything in it at scope exit.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "ultramem_data_XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

void write_text(const std::string& path, const std::string& text) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream f(path, std::ios::binary);
  f << text;
  ASSERT_TRUE(f.good()) << path;
}

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Pseudo-random prose (deterministic in `seed`), with some non-ASCII words and several lines.
std::string make_text(uint32_t seed, int words) {
  static const char* vocab[] = {"the",   "congress", "nation", "people", "of",    "and",   "to",    "a",
                                "public", "year",     "states", "war",    "peace", "trade", "law",   "we",
                                "our",    "must",     "will",   "great",  "naïve", "café",  "Größe", "東京",
                                "élan",   "über",     "in",     "for",    "is",    "that",  "new",   "world"};
  const int n = sizeof(vocab) / sizeof(vocab[0]);
  std::string s;
  uint32_t x = seed * 2654435761u + 12345u;
  for (int i = 0; i < words; ++i) {
    x = x * 1664525u + 1013904223u;
    if (i > 0) s += (i % 97 == 0) ? "\n" : " ";
    s += vocab[(x >> 16) % n];
    if ((x >> 8) % 13 == 0) s += ".";
  }
  return s + "\n";
}

// A corpus directory of `docs` documents of ~120 words each.
void make_corpus(const std::string& dir, int docs) {
  for (int i = 0; i < docs; ++i) {
    char name[32];
    std::snprintf(name, sizeof name, "doc_%02d.txt", i);
    write_text(dir + "/" + name, make_text(i, 120));
  }
}

// All sampled text of a small corpus, for tokenizer tests.
std::vector<std::string> sample_docs() {
  std::vector<std::string> d;
  for (int i = 0; i < 12; ++i) d.push_back(make_text(100 + i, 150));
  return d;
}

std::vector<std::string_view> views(const std::vector<std::string>& v) { return {v.begin(), v.end()}; }

template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "<no exception>";
}

void expect_contains(const std::string& haystack, const std::string& needle) {
  EXPECT_NE(haystack.find(needle), std::string::npos) << "\"" << haystack << "\" does not contain \"" << needle << "\"";
}

std::vector<int32_t> iota_tokens(int64_t n, int64_t vocab) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[i] = static_cast<int32_t>(i % vocab);
  return t;
}

void flip_byte(const std::string& path, long offset) {
  std::FILE* f = std::fopen(path.c_str(), "r+b");
  ASSERT_NE(f, nullptr);
  std::fseek(f, offset, SEEK_SET);
  const int c = std::fgetc(f);
  std::fseek(f, offset, SEEK_SET);
  std::fputc(c ^ 0x5a, f);
  std::fclose(f);
}

void write_u32_at(const std::string& path, long offset, uint32_t v) {
  std::FILE* f = std::fopen(path.c_str(), "r+b");
  ASSERT_NE(f, nullptr);
  std::fseek(f, offset, SEEK_SET);
  unsigned char b[4] = {static_cast<unsigned char>(v), static_cast<unsigned char>(v >> 8),
                        static_cast<unsigned char>(v >> 16), static_cast<unsigned char>(v >> 24)};
  std::fwrite(b, 1, 4, f);
  std::fclose(f);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Corpus

TEST(DataCorpus, DirectoryIsRecursiveSortedAndSkipsEmptyFiles) {
  TempDir dir;
  write_text(dir / "b.txt", "second");
  write_text(dir / "a.txt", "first");
  write_text(dir / "sub/c.txt", "third\nline two\n");
  write_text(dir / "empty.txt", "");
  write_text(dir / "notes.md", "not a document");
  std::ostringstream log;
  const Corpus c = read_corpus(dir.str(), &log);
  ASSERT_EQ(c.documents.size(), 3u);
  EXPECT_EQ(c.documents[0].name, "a.txt");
  EXPECT_EQ(c.documents[1].name, "b.txt");
  EXPECT_EQ(c.documents[2].name, "sub/c.txt");
  EXPECT_EQ(c.documents[2].text, "third\nline two\n");
  EXPECT_EQ(c.files.size(), 4u);  // the empty file counts for the fingerprint
  EXPECT_EQ(c.total_bytes(), 5u + 6u + 15u);
  expect_contains(log.str(), "empty.txt is empty; skipped");
}

TEST(DataCorpus, SingleFileSplitsAtFormFeedLines) {
  TempDir dir;
  write_text(dir / "all.txt", "one\ntwo\n\f\nthree\n\f\r\n\f\nfour");
  std::ostringstream log;
  const Corpus c = read_corpus(dir / "all.txt", &log);
  ASSERT_EQ(c.documents.size(), 3u);
  EXPECT_EQ(c.documents[0].name, "all.txt#0");
  EXPECT_EQ(c.documents[0].text, "one\ntwo\n");
  EXPECT_EQ(c.documents[1].name, "all.txt#1");
  EXPECT_EQ(c.documents[1].text, "three\n");
  EXPECT_EQ(c.documents[2].name, "all.txt#3");  // segment #2 is empty and skipped
  EXPECT_EQ(c.documents[2].text, "four");
  expect_contains(log.str(), "#2 is empty");
  // A form feed inside a line is text, not a separator.
  write_text(dir / "one.txt", "a\fb\nc\n");
  EXPECT_EQ(read_corpus(dir / "one.txt").documents.size(), 1u);
}

TEST(DataCorpus, InvalidUtf8NamesFileAndOffset) {
  TempDir dir;
  write_text(dir / "good.txt", "fine");
  write_text(dir / "bad.txt", std::string("caf\xc3\xa9 ok \xff rest"));
  const std::string err = error_of([&] { read_corpus(dir.str()); });
  expect_contains(err, "bad.txt");
  expect_contains(err, "invalid UTF-8 at byte offset 9");
  EXPECT_THROW(read_corpus(dir.str()), std::runtime_error);
}

TEST(DataCorpus, Utf8ValidatorRejectsIllFormedSequences) {
  const auto npos = std::string_view::npos;
  EXPECT_EQ(find_invalid_utf8("plain ascii"), npos);
  EXPECT_EQ(find_invalid_utf8("\xc3\xa9\xe6\x9d\xb1\xf0\x9f\x98\x80"), npos);  // é 東 😀
  EXPECT_EQ(find_invalid_utf8("ab\xc0\x80"), 2u);                             // overlong NUL
  EXPECT_EQ(find_invalid_utf8("\xe0\x80\xaf"), 0u);                           // overlong 3-byte
  EXPECT_EQ(find_invalid_utf8("x\xed\xa0\x80"), 1u);                          // surrogate
  EXPECT_EQ(find_invalid_utf8("\xf4\x90\x80\x80"), 0u);                       // > U+10FFFF
  EXPECT_EQ(find_invalid_utf8("ok\xe6\x9d"), 2u);                             // truncated at the end
  EXPECT_EQ(find_invalid_utf8("\x80"), 0u);                                   // lone continuation
}

TEST(DataCorpus, MissingPathAndEmptyCorpusAreErrors) {
  TempDir dir;
  expect_contains(error_of([&] { read_corpus(dir / "nope"); }), "does not exist");
  write_text(dir / "e/empty.txt", "");
  expect_contains(error_of([&] { read_corpus(dir / "e"); }), "no non-empty documents");
}

TEST(DataCorpus, FingerprintTracksContentNamesAndFiles) {
  TempDir dir;
  make_corpus(dir.str(), 3);
  const uint64_t f0 = read_corpus(dir.str()).fingerprint();
  EXPECT_EQ(read_corpus(dir.str()).fingerprint(), f0);
  write_text(dir / "doc_01.txt", make_text(1, 120) + "x");
  const uint64_t f1 = read_corpus(dir.str()).fingerprint();
  EXPECT_NE(f1, f0);
  fs::rename(dir / "doc_01.txt", dir / "doc_99.txt");
  EXPECT_NE(read_corpus(dir.str()).fingerprint(), f1);
  write_text(dir / "blank.txt", "");
  const uint64_t f2 = read_corpus(dir.str()).fingerprint();
  fs::remove(dir / "blank.txt");
  EXPECT_NE(read_corpus(dir.str()).fingerprint(), f2);
}

// ---------------------------------------------------------------------------------------------------
// Split

std::vector<Document> named_docs(int n, const std::string& prefix = "doc") {
  std::vector<Document> d;
  for (int i = 0; i < n; ++i) d.push_back({prefix + std::to_string(i) + ".txt", "text"});
  return d;
}

TEST(DataSplit, DeterministicAndDependsOnSeed) {
  const auto docs = named_docs(400);
  const SplitIndices a = split_documents(docs, 0.05, 7);
  const SplitIndices b = split_documents(docs, 0.05, 7);
  EXPECT_EQ(a.train, b.train);
  EXPECT_EQ(a.val, b.val);
  EXPECT_EQ(a.train.size() + a.val.size(), docs.size());
  EXPECT_TRUE(std::is_sorted(a.val.begin(), a.val.end()));
  const SplitIndices c = split_documents(docs, 0.05, 8);
  EXPECT_NE(a.val, c.val);
  // About val_fraction of the documents (expected 20 of 400).
  EXPECT_GT(a.val.size(), 5u);
  EXPECT_LT(a.val.size(), 40u);
  for (size_t i : a.val) EXPECT_LT(split_key(docs[i].name, 7), 0.05);
  for (size_t i : a.train) EXPECT_GE(split_key(docs[i].name, 7), 0.05);
}

TEST(DataSplit, AddingDocumentsDoesNotMoveOthers) {
  auto docs = named_docs(200);
  std::set<std::string> val_before;
  for (size_t i : split_documents(docs, 0.1, 3).val) val_before.insert(docs[i].name);
  auto more = named_docs(100, "extra");
  docs.insert(docs.end(), more.begin(), more.end());
  std::set<std::string> val_after;
  for (size_t i : split_documents(docs, 0.1, 3).val) val_after.insert(docs[i].name);
  for (const auto& n : val_before) EXPECT_EQ(val_after.count(n), 1u) << n;
  for (const auto& n : val_after)
    if (n.rfind("doc", 0) == 0) EXPECT_EQ(val_before.count(n), 1u) << n;
}

TEST(DataSplit, BothSplitsNonEmptyFromTwoDocuments) {
  for (uint64_t seed = 0; seed < 20; ++seed) {
    const auto docs = named_docs(2);
    const SplitIndices s = split_documents(docs, 0.05, seed);
    EXPECT_EQ(s.train.size(), 1u);
    EXPECT_EQ(s.val.size(), 1u);
    const SplitIndices t = split_documents(named_docs(5), 0.95, seed);
    EXPECT_GE(t.train.size(), 1u);
    EXPECT_GE(t.val.size(), 1u);
  }
  EXPECT_THROW(split_documents(named_docs(1), 0.05, 0), std::runtime_error);
  EXPECT_THROW(split_documents(named_docs(4), 0.0, 0), std::invalid_argument);
  EXPECT_THROW(split_documents(named_docs(4), 1.0, 0), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------------
// Tokenizer (one model trained for the suite)

class DataTokenizer : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = std::make_unique<TempDir>();
    docs_ = sample_docs();
    TokenizerTrainOptions opt;
    opt.vocab_size = kTestVocab;
    tok_ = std::make_unique<Tokenizer>(Tokenizer::train(views(docs_), *dir_ / "tok.model", opt));
  }
  static void TearDownTestSuite() {
    tok_.reset();
    dir_.reset();
  }
  static std::unique_ptr<TempDir> dir_;
  static std::vector<std::string> docs_;
  static std::unique_ptr<Tokenizer> tok_;
};
std::unique_ptr<TempDir> DataTokenizer::dir_;
std::vector<std::string> DataTokenizer::docs_;
std::unique_ptr<Tokenizer> DataTokenizer::tok_;

TEST_F(DataTokenizer, VocabularyAndSpecialIds) {
  EXPECT_EQ(tok_->vocab_size(), kTestVocab);
  EXPECT_EQ(tok_->unk_id(), 0);
  EXPECT_EQ(tok_->bos_id(), 1);
  EXPECT_EQ(tok_->eos_id(), 2);
  EXPECT_EQ(tok_->piece(3), "<0x00>");  // byte fallback pieces follow the special ones
}

TEST_F(DataTokenizer, RoundTripAscii) {
  for (const std::string s : {std::string("the congress and the people of the nation."),
                              std::string("  leading and trailing spaces  "), std::string("tabs\tand\nnew\n\nlines\r\n"),
                              std::string("Unseen WORDS: xyzzy 12345 !@#$%^&*()"), std::string("")}) {
    const auto ids = tok_->encode(s);
    for (int32_t id : ids) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, tok_->vocab_size());
    }
    EXPECT_EQ(tok_->decode(ids), s);
  }
  // Merges learned from the training text make frequent words shorter than their bytes.
  EXPECT_LT(tok_->encode("the congress").size(), std::string("the congress").size());
}

TEST_F(DataTokenizer, RoundTripNonAscii) {
  for (const std::string s : {std::string("naïve café Größe 東京 élan über"),              // seen in training
                              std::string("Ærøskøbing, Łódź, Ελληνικά, русский, 日本語, 한국어"),  // unseen: byte fallback
                              std::string("emoji 😀 and symbols ∑ ∞ ☃ €")}) {
    EXPECT_EQ(tok_->decode(tok_->encode(s)), s) << s;
  }
  for (const auto& d : docs_) EXPECT_EQ(tok_->decode(tok_->encode(d)), d);
}

TEST_F(DataTokenizer, LongTextsEncodeLikeTheirPieces) {
  // Encoding cuts long lines before spaces; the ids equal those of the whole-text encoding of each cut.
  std::string line;
  while (line.size() < 20000) line += "the great nation of über café and peace ";
  const auto ids = tok_->encode(line);
  EXPECT_EQ(tok_->decode(ids), line);
  std::string nospace(9000, 'q');
  nospace += "東京";
  EXPECT_EQ(tok_->decode(tok_->encode(nospace)), nospace);
  // Encoding is per line: the ids of "a\nb" are the ids of "a\n" followed by those of "b".
  auto a = tok_->encode("the war\n");
  const auto b = tok_->encode("and peace");
  a.insert(a.end(), b.begin(), b.end());
  EXPECT_EQ(tok_->encode("the war\nand peace"), a);
}

TEST_F(DataTokenizer, EncodingMatchesSentencepiece) {
  // The reference: sentencepiece's own encoder (spm_encode, next to spm_train), one line per input line.
  const std::string train_exe = find_spm_train();
  const std::string spm_encode = train_exe.substr(0, train_exe.rfind('/') + 1) + "spm_encode";
  ASSERT_EQ(::access(spm_encode.c_str(), X_OK), 0) << spm_encode;
  std::vector<std::string> lines;
  for (const auto& d : docs_) {
    std::istringstream ss(d);
    for (std::string l; std::getline(ss, l);) lines.push_back(l);
  }
  std::string longline;
  while (longline.size() < 12000) longline += "the great nation of über café and peace, ";
  for (const std::string s : {std::string("  two leading spaces and   three inside"), std::string("tabs\there"),
                              std::string("Ærøskøbing Łódź 日本語 😀 € ∞"), std::string("<s> </s> <unk> <0x41> ▁x"),
                              std::string("digits 1234567890 and punctuation!?.,;:"), longline, std::string("bad \xff utf8 \xe6\x9d"), std::string("")})
    lines.push_back(s);
  std::string in;
  for (const auto& l : lines) in += l + "\n";
  write_text(*dir_ / "lines.txt", in);
  const std::string cmd = spm_encode + " --model=" + *dir_ / "tok.model" + " --output_format=id --input=" +
                          *dir_ / "lines.txt" + " --output=" + *dir_ / "ids.txt" + " 2>/dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  std::istringstream ids(read_bytes(*dir_ / "ids.txt"));
  size_t i = 0;
  for (std::string row; std::getline(ids, row); ++i) {
    ASSERT_LT(i, lines.size());
    std::istringstream rs(row);
    std::vector<int32_t> expected;
    for (int v; rs >> v;) expected.push_back(v);
    EXPECT_EQ(tok_->encode(lines[i]), expected) << "line " << i << ": " << lines[i].substr(0, 80);
  }
  EXPECT_EQ(i, lines.size());
}

TEST_F(DataTokenizer, DecodesSpecialAndBytePieces) {
  const std::string s = "the nation";
  std::vector<int32_t> ids = {tok_->bos_id()};
  for (int32_t id : tok_->encode(s)) ids.push_back(id);
  ids.push_back(tok_->eos_id());
  EXPECT_EQ(tok_->decode(ids), s);  // BOS/EOS decode to nothing
  ASSERT_EQ(tok_->piece(3 + 0xe6), "<0xE6>");
  EXPECT_EQ(tok_->decode({3 + 0xe6, 3 + 0x9d, 3 + 0xb1}), "\xe6\x9d\xb1");  // bytes of U+6771 join up
  EXPECT_EQ(tok_->decode({3 + 0xe6, 3 + 'a'}), "\xef\xbf\xbd" "a");          // a lone lead byte -> U+FFFD
  EXPECT_EQ(tok_->decode({tok_->unk_id()}), " \xe2\x81\x87 ");             // sentencepiece's <unk> surface
  // Ill-formed input is encoded as U+FFFD, as sentencepiece normalises it.
  EXPECT_EQ(tok_->decode(tok_->encode("a\xff" "b")), "a\xef\xbf\xbd" "b");
}

TEST_F(DataTokenizer, TrainingIsDeterministic) {
  TokenizerTrainOptions opt;
  opt.vocab_size = kTestVocab;
  Tokenizer::train(views(docs_), *dir_ / "again.model", opt);
  EXPECT_EQ(read_bytes(*dir_ / "again.model"), read_bytes(*dir_ / "tok.model"));
  const Tokenizer loaded = Tokenizer::load(*dir_ / "again.model");
  const std::string s = "the public trade law of our world";
  EXPECT_EQ(loaded.encode(s), tok_->encode(s));
}

TEST_F(DataTokenizer, LoadErrorsAndBadIds) {
  expect_contains(error_of([&] { Tokenizer::load(*dir_ / "missing.model"); }), "file not found");
  write_text(*dir_ / "garbage.model", "this is not a protobuf \x01\x02\x03");
  const std::string err = error_of([&] { Tokenizer::load(*dir_ / "garbage.model"); });
  expect_contains(err, "garbage.model");
  expect_contains(err, "not a valid sentencepiece model");
  EXPECT_THROW(tok_->decode({5, static_cast<int32_t>(kTestVocab)}), std::invalid_argument);
  EXPECT_THROW(tok_->decode({-1}), std::invalid_argument);
  TokenizerTrainOptions bad;
  bad.vocab_size = 100;
  EXPECT_THROW(Tokenizer::train(views(docs_), *dir_ / "x.model", bad), std::invalid_argument);
  EXPECT_THROW(Tokenizer::train({}, *dir_ / "x.model"), std::invalid_argument);
  // More pieces than the text supports: the trainer's own message comes through.
  TokenizerTrainOptions too_big;
  too_big.vocab_size = 20000;
  const std::string train_err = error_of([&] { Tokenizer::train(views(docs_), *dir_ / "y.model", too_big); });
  expect_contains(train_err, "sentencepiece training failed");
  expect_contains(train_err, "Vocabulary size too high");
  EXPECT_FALSE(fs::exists(*dir_ / "y.model"));
}

// ---------------------------------------------------------------------------------------------------
// Shards

TEST(DataShard, RoundTripUint16AndUint32) {
  TempDir dir;
  const auto small = iota_tokens(1000, 300);
  write_shard(dir / "a.bin", small, 300);
  const auto a = TokenShard::open(dir / "a.bin");
  EXPECT_EQ(a->size(), 1000);
  EXPECT_EQ(a->vocab_size(), 300);
  EXPECT_EQ(a->dtype(), TokenDtype::U16);
  EXPECT_EQ(a->tokens(), small);
  EXPECT_EQ(fs::file_size(dir / "a.bin"), 32u + 2u * 1000u);
  EXPECT_EQ(read_bytes(dir / "a.bin").substr(0, 8), "UMTOKENS");

  auto big = iota_tokens(500, 70000);
  big[17] = 69999;
  write_shard(dir / "b.bin", big, 70000);
  const auto b = TokenShard::open(dir / "b.bin");
  EXPECT_EQ(b->dtype(), TokenDtype::U32);
  EXPECT_EQ(b->tokens(), big);
  EXPECT_EQ(b->at(17), 69999);
  EXPECT_EQ(fs::file_size(dir / "b.bin"), 32u + 4u * 500u);
  EXPECT_EQ(shard_dtype_for(65536), TokenDtype::U16);
  EXPECT_EQ(shard_dtype_for(65537), TokenDtype::U32);

  write_shard(dir / "empty.bin", {}, 10);
  EXPECT_EQ(TokenShard::open(dir / "empty.bin")->size(), 0);
  EXPECT_THROW(a->at(1000), std::out_of_range);
  EXPECT_FALSE(fs::exists(dir / "a.bin.tmp." + std::to_string(::getpid())));  // the temp file was renamed
}

TEST(DataShard, WriterRejectsOutOfRangeTokens) {
  TempDir dir;
  EXPECT_THROW(write_shard(dir / "x.bin", {1, 2, 300}, 300), std::invalid_argument);
  EXPECT_THROW(write_shard(dir / "x.bin", {1, -1}, 300), std::invalid_argument);
  EXPECT_FALSE(fs::exists(dir / "x.bin"));
}

TEST(DataShard, TruncatedFileIsDetected) {
  TempDir dir;
  write_shard(dir / "t.bin", iota_tokens(100, 300), 300);
  fs::resize_file(dir / "t.bin", 32 + 2 * 100 - 2);
  const std::string err = error_of([&] { TokenShard::open(dir / "t.bin"); });
  expect_contains(err, "t.bin");
  expect_contains(err, "truncated");
  fs::resize_file(dir / "t.bin", 20);
  expect_contains(error_of([&] { TokenShard::open(dir / "t.bin"); }), "too short");
}

TEST(DataShard, CorruptedByteFailsTheChecksum) {
  TempDir dir;
  write_shard(dir / "c.bin", iota_tokens(100, 300), 300);
  flip_byte(dir / "c.bin", 32 + 51);
  const std::string err = error_of([&] { TokenShard::open(dir / "c.bin"); });
  expect_contains(err, "c.bin");
  expect_contains(err, "checksum mismatch");
  // Only an explicit flag skips the payload checks.
  ShardReadOptions skip;
  skip.verify_payload = false;
  EXPECT_EQ(TokenShard::open(dir / "c.bin", skip)->size(), 100);
}

TEST(DataShard, WrongMagicVersionAndDtypeAreErrors) {
  TempDir dir;
  write_shard(dir / "m.bin", iota_tokens(10, 300), 300);
  flip_byte(dir / "m.bin", 2);
  expect_contains(error_of([&] { TokenShard::open(dir / "m.bin"); }), "bad magic");
  write_shard(dir / "v.bin", iota_tokens(10, 300), 300);
  write_u32_at(dir / "v.bin", 8, 2);
  expect_contains(error_of([&] { TokenShard::open(dir / "v.bin"); }), "unsupported version 2");
  write_shard(dir / "d.bin", iota_tokens(10, 300), 300);
  write_u32_at(dir / "d.bin", 12, 7);
  expect_contains(error_of([&] { TokenShard::open(dir / "d.bin"); }), "unsupported dtype");
  write_text(dir / "text.bin", "plain text, not a shard at all, but long enough");
  expect_contains(error_of([&] { TokenShard::open(dir / "text.bin"); }), "bad magic");
  expect_contains(error_of([&] { TokenShard::open(dir / "missing.bin"); }), "file not found");
}

TEST(DataShard, TokenOutOfRangeAndVocabMismatchAreErrors) {
  TempDir dir;
  write_shard(dir / "r.bin", iota_tokens(1000, 300), 300);  // ids up to 299
  write_u32_at(dir / "r.bin", 24, 250);  // the header now claims vocab 250; the CRC (payload only) still holds
  const std::string err = error_of([&] { TokenShard::open(dir / "r.bin"); });
  expect_contains(err, "r.bin");
  expect_contains(err, "token id 250 at position 250 is >= vocab_size 250");
  write_shard(dir / "ok.bin", iota_tokens(10, 300), 300);
  ShardReadOptions expect;
  expect.expected_vocab_size = 8192;
  expect_contains(error_of([&] { TokenShard::open(dir / "ok.bin", expect); }), "does not match the expected 8192");
  expect.expected_vocab_size = 300;
  EXPECT_EQ(TokenShard::open(dir / "ok.bin", expect)->size(), 10);
}

// ---------------------------------------------------------------------------------------------------
// Batch sampling

// A shard whose token i is i (vocab large enough), so a token value is its position.
std::shared_ptr<const TokenShard> position_shard(const TempDir& dir, int64_t n) {
  write_shard(dir / "pos.bin", iota_tokens(n, n), n);
  return TokenShard::open(dir / "pos.bin");
}

TEST(DataSampler, BatchesArePureFunctionsOfSeedAndPosition) {
  TempDir dir;
  const auto shard = position_shard(dir, 5000);
  BatchSampler a(shard, 4, 16, 42), b(shard, 4, 16, 42), c(shard, 4, 16, 43);
  for (int64_t k = 0; k < 5; ++k) {
    const Batch x = a.next(), y = b.next(), z = c.next();
    EXPECT_EQ(x.inputs.sizes(), (std::vector<int64_t>{4, 16}));
    EXPECT_EQ(x.targets.sizes(), (std::vector<int64_t>{4, 16}));
    EXPECT_EQ(x.inputs.scalar_type(), torch::kLong);
    EXPECT_TRUE(torch::equal(x.inputs, y.inputs));
    EXPECT_TRUE(torch::equal(x.targets, y.targets));
    EXPECT_FALSE(torch::equal(x.inputs, z.inputs));
    EXPECT_TRUE(torch::equal(x.inputs, a.batch_at(k).inputs));
  }
  EXPECT_EQ(a.position(), 5);
  // Consecutive batches differ.
  EXPECT_FALSE(torch::equal(a.batch_at(0).inputs, a.batch_at(1).inputs));
}

TEST(DataSampler, TargetsAreInputsShiftedByOne) {
  TempDir dir;
  const auto shard = position_shard(dir, 3000);
  BatchSampler s(shard, 8, 32, 1);
  for (int64_t k = 0; k < 3; ++k) {
    const Batch b = s.next();
    EXPECT_TRUE(torch::equal(b.inputs.slice(1, 1), b.targets.slice(1, 0, 31)));
    for (int64_t i = 0; i < 8; ++i) {
      const int64_t start = s.window_start(k, i);
      EXPECT_EQ(b.inputs[i][0].item<int64_t>(), start);  // token value == position
      EXPECT_EQ(b.targets[i][31].item<int64_t>(), start + 32);
    }
  }
}

TEST(DataSampler, SetPositionResumesExactly) {
  TempDir dir;
  const auto shard = position_shard(dir, 4000);
  BatchSampler run(shard, 3, 20, 9);
  std::vector<Batch> seen;
  for (int i = 0; i < 6; ++i) seen.push_back(run.next());
  BatchSampler resumed(shard, 3, 20, 9);
  resumed.set_position(4);
  EXPECT_EQ(resumed.position(), 4);
  EXPECT_TRUE(torch::equal(resumed.next().inputs, seen[4].inputs));
  EXPECT_TRUE(torch::equal(resumed.next().targets, seen[5].targets));
  EXPECT_EQ(resumed.position(), 6);
  resumed.set_position(0);
  EXPECT_TRUE(torch::equal(resumed.next().inputs, seen[0].inputs));
  EXPECT_THROW(resumed.set_position(-1), std::invalid_argument);
}

TEST(DataSampler, RanksDrawFromDisjointSlices) {
  TempDir dir;
  const int64_t n = 6000, world = 3, T = 24;
  const auto shard = position_shard(dir, n);
  std::vector<std::set<int64_t>> touched(world);
  for (int64_t r = 0; r < world; ++r) {
    BatchSampler s(shard, 8, T, 5, r, world);
    EXPECT_EQ(s.slice_begin(), n * r / world);
    EXPECT_EQ(s.slice_end(), n * (r + 1) / world);
    for (int k = 0; k < 20; ++k) {
      const Batch b = s.next();
      const auto in = b.inputs.contiguous();
      const auto tg = b.targets.contiguous();
      for (int64_t j = 0; j < in.numel(); ++j) {
        const int64_t pos_in = in.data_ptr<int64_t>()[j], pos_tg = tg.data_ptr<int64_t>()[j];
        EXPECT_GE(pos_in, s.slice_begin());
        EXPECT_LT(pos_tg, s.slice_end());
        touched[r].insert(pos_in);
        touched[r].insert(pos_tg);
      }
    }
  }
  for (int64_t r = 0; r < world; ++r)
    for (int64_t q = r + 1; q < world; ++q)
      for (int64_t p : touched[r]) EXPECT_EQ(touched[q].count(p), 0u) << "rank " << r << " and " << q << " share " << p;
  // Same seed and k on different ranks give different batches.
  BatchSampler r0(shard, 8, T, 5, 0, world), r1(shard, 8, T, 5, 1, world);
  EXPECT_FALSE(torch::equal(r0.next().inputs, r1.next().inputs));
}

TEST(DataSampler, ErrorsForShortShardsAndBadArguments) {
  TempDir dir;
  const auto shard = position_shard(dir, 100);
  expect_contains(error_of([&] { BatchSampler(shard, 2, 100, 0); }), "too short");
  EXPECT_NO_THROW(BatchSampler(shard, 2, 99, 0));  // exactly seq_len + 1 tokens: one possible window
  BatchSampler one(shard, 2, 99, 0);
  EXPECT_EQ(one.next().inputs[1][0].item<int64_t>(), 0);
  expect_contains(error_of([&] { BatchSampler(shard, 2, 40, 0, 2, 3); }), "rank 2 of 3");
  EXPECT_THROW(BatchSampler(shard, 0, 8, 0), std::invalid_argument);
  EXPECT_THROW(BatchSampler(shard, 2, 0, 0), std::invalid_argument);
  EXPECT_THROW(BatchSampler(shard, 2, 8, 0, 3, 3), std::invalid_argument);
  EXPECT_THROW(BatchSampler(nullptr, 2, 8, 0), std::invalid_argument);
}

TEST(DataSampler, EvalBatchesAreFixedWindowsInOrder) {
  TempDir dir;
  const auto shard = position_shard(dir, 1000);
  const auto a = eval_batches(*shard, 4, 30, 0);
  ASSERT_EQ(a.size(), 8u);  // (1000 - 1) / 30 = 33 windows -> 8 full batches of 4
  for (size_t k = 0; k < a.size(); ++k) {
    for (int64_t i = 0; i < 4; ++i) {
      const int64_t start = (static_cast<int64_t>(k) * 4 + i) * 30;
      EXPECT_EQ(a[k].inputs[i][0].item<int64_t>(), start);
      EXPECT_EQ(a[k].targets[i][29].item<int64_t>(), start + 30);
    }
    EXPECT_TRUE(torch::equal(a[k].inputs.slice(1, 1), a[k].targets.slice(1, 0, 29)));
  }
  const auto b = eval_batches(*shard, 4, 30, 0);
  for (size_t k = 0; k < a.size(); ++k) EXPECT_TRUE(torch::equal(a[k].inputs, b[k].inputs));
  EXPECT_EQ(eval_batches(*shard, 4, 30, 3).size(), 3u);
  expect_contains(error_of([&] { eval_batches(*shard, 64, 30, 0); }), "too few");
  EXPECT_THROW(eval_batches(*shard, 4, 0, 0), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------------
// prepare / load_prepared

TEST(DataPrepare, WritesConsistentOutputsReusesAndRebuilds) {
  TempDir dir;
  make_corpus(dir / "corpus", 10);
  PrepareOptions opt;
  opt.input = dir / "corpus";
  opt.out_dir = dir / "prepared";
  opt.vocab_size = kTestVocab;
  opt.val_fraction = 0.2;
  opt.seed = 1;

  std::ostringstream log1;
  const PreparedData p = prepare(opt, log1);
  EXPECT_FALSE(p.reused);
  for (const auto& f : {p.tokenizer_path, p.train_path, p.val_path, p.manifest_path}) EXPECT_TRUE(fs::exists(f)) << f;
  expect_contains(log1.str(), "training tokenizer");
  expect_contains(log1.str(), "encoding train split");
  EXPECT_EQ(p.vocab_size, kTestVocab);
  EXPECT_EQ(p.train.documents + p.val.documents, 10);
  EXPECT_GE(p.val.documents, 1);
  EXPECT_GE(p.train.documents, 1);

  // The shards hold each document's tokens then EOS, in corpus order within the split.
  const Corpus corpus = read_corpus(opt.input);
  const SplitIndices split = split_documents(corpus.documents, opt.val_fraction, opt.seed);
  const Tokenizer tok = Tokenizer::load(p.tokenizer_path);
  auto check_split = [&](const std::string& path, const std::vector<size_t>& idx, const SplitStats& stats) {
    const auto shard = TokenShard::open(path);
    EXPECT_EQ(shard->size(), stats.tokens);
    std::vector<int32_t> expected;
    int64_t bytes = 0;
    for (size_t i : idx) {
      const auto ids = tok.encode(corpus.documents[i].text);
      expected.insert(expected.end(), ids.begin(), ids.end());
      expected.push_back(tok.eos_id());
      bytes += static_cast<int64_t>(corpus.documents[i].text.size());
    }
    EXPECT_EQ(shard->tokens(), expected);
    EXPECT_EQ(stats.bytes, bytes);
    EXPECT_EQ(stats.documents, static_cast<int64_t>(idx.size()));
  };
  check_split(p.train_path, split.train, p.train);
  check_split(p.val_path, split.val, p.val);

  // Rerun: everything reused, nothing rewritten.
  const auto mtime = [&](const std::string& f) { return fs::last_write_time(f); };
  const auto t_train = mtime(p.train_path), t_manifest = mtime(p.manifest_path), t_tok = mtime(p.tokenizer_path);
  std::ostringstream log2;
  const PreparedData again = prepare(opt, log2);
  EXPECT_TRUE(again.reused);
  expect_contains(log2.str(), "reusing prepared data");
  EXPECT_EQ(log2.str().find("training tokenizer"), std::string::npos);
  EXPECT_EQ(mtime(p.train_path), t_train);
  EXPECT_EQ(mtime(p.manifest_path), t_manifest);
  EXPECT_EQ(mtime(p.tokenizer_path), t_tok);
  EXPECT_EQ(again.train.tokens, p.train.tokens);

  // An input change triggers a rebuild.
  write_text(opt.input + "/doc_03.txt", make_text(3, 120) + "an added sentence.\n");
  std::ostringstream log3;
  const PreparedData changed = prepare(opt, log3);
  EXPECT_FALSE(changed.reused);
  expect_contains(log3.str(), "the input files changed");
  EXPECT_NE(changed.input_fingerprint, p.input_fingerprint);

  // So does an option change, and a damaged output.
  opt.seed = 2;
  std::ostringstream log4;
  EXPECT_FALSE(prepare(opt, log4).reused);
  expect_contains(log4.str(), "seed differs");
  flip_byte(p.val_path, 40);
  std::ostringstream log5;
  EXPECT_FALSE(prepare(opt, log5).reused);
  expect_contains(log5.str(), "existing data is invalid");
  std::ostringstream log6;
  EXPECT_TRUE(prepare(opt, log6).reused);
}

TEST(DataPrepare, LoadPreparedValidates) {
  TempDir dir;
  expect_contains(error_of([&] { load_prepared(dir / "nothing"); }), "run `ultramem prepare` first");
  make_corpus(dir / "corpus", 6);
  PrepareOptions opt;
  opt.input = dir / "corpus";
  opt.out_dir = dir / "prep";
  opt.vocab_size = kTestVocab;
  opt.val_fraction = 0.3;
  std::ostringstream log;
  const PreparedData p = prepare(opt, log);
  const PreparedData l = load_prepared(opt.out_dir);
  EXPECT_EQ(l.train.tokens, p.train.tokens);
  EXPECT_EQ(l.val.bytes, p.val.bytes);
  EXPECT_EQ(l.eos_id, 2);
  EXPECT_EQ(l.input_files, 6u);
  EXPECT_DOUBLE_EQ(l.val_fraction, 0.3);

  const std::string model = read_bytes(p.tokenizer_path);
  write_text(p.tokenizer_path, model + "x");
  expect_contains(error_of([&] { load_prepared(opt.out_dir); }), "does not match the manifest's hash");
  write_text(p.tokenizer_path, model);
  EXPECT_NO_THROW(load_prepared(opt.out_dir));
  fs::resize_file(p.train_path, fs::file_size(p.train_path) - 2);
  expect_contains(error_of([&] { load_prepared(opt.out_dir); }), "train.bin");
  write_text(p.manifest_path, "{ not json");
  expect_contains(error_of([&] { load_prepared(opt.out_dir); }), "not valid JSON");
}

// A rebuild that fails part way (here the tokenizer cannot reach the asked vocabulary) leaves the old
// preparation usable and nothing of its own behind: the new data is built beside the old and moved in only
// when complete (prepare used to delete the old manifest before building).
TEST(DataPrepare, AFailedRebuildLeavesTheOldDataUsable) {
  TempDir dir;
  make_corpus(dir / "corpus", 6);
  PrepareOptions opt;
  opt.input = dir / "corpus";
  opt.out_dir = dir / "prep";
  opt.vocab_size = kTestVocab;
  opt.val_fraction = 0.3;
  std::ostringstream log;
  const PreparedData before = prepare(opt, log);
  const std::string train_bytes = read_bytes(before.train_path);

  PrepareOptions bigger = opt;
  bigger.vocab_size = 1 << 20;  // far more pieces than the corpus has
  EXPECT_ANY_THROW(prepare(bigger, log));
  const PreparedData after = load_prepared(opt.out_dir);
  EXPECT_EQ(after.vocab_size, before.vocab_size);
  EXPECT_EQ(after.train.tokens, before.train.tokens);
  EXPECT_EQ(read_bytes(after.train_path), train_bytes);
  for (const auto& e : fs::directory_iterator(dir.str()))
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path() << " left behind";
  // A staging folder of a process that no longer exists (killed mid-prepare) is removed by the next run.
  const fs::path stale = dir / "prep.tmp.999999999";
  fs::create_directories(stale);
  write_text((stale / "train.bin").string(), "partial");
  EXPECT_TRUE(prepare(opt, log).reused);
  opt.force = true;
  EXPECT_FALSE(prepare(opt, log).reused);
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_EQ(load_prepared(opt.out_dir).train.tokens, before.train.tokens);
}

TEST(DataPrepare, OptionErrorsAndDefaults) {
  PrepareOptions o;
  EXPECT_EQ(resolved_input(o), "data/corpus/sotu");
  EXPECT_EQ(resolved_out_dir(o), "data/prepared/sotu-v8192");
  o.input = "/some/where/books.txt";
  o.vocab_size = 4096;
  EXPECT_EQ(resolved_out_dir(o), "data/prepared/books-v4096");
  o.input = "corpora/web/";
  EXPECT_EQ(resolved_out_dir(o), "data/prepared/web-v4096");
  std::ostringstream log;
  PrepareOptions bad;
  bad.vocab_size = 10;
  EXPECT_THROW(prepare(bad, log), std::invalid_argument);
  bad = PrepareOptions();
  bad.val_fraction = 1.5;
  EXPECT_THROW(prepare(bad, log), std::invalid_argument);
  TempDir dir;
  bad = PrepareOptions();
  bad.input = dir / "missing";
  bad.out_dir = dir / "out";
  expect_contains(error_of([&] { prepare(bad, log); }), "does not exist");
}
