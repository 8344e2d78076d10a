// Declared plugin arguments (name, type, default, range/choices, doc) and their validated values.
#pragma once

#include <concord/error.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace concord {

enum class ArgType { Int, Float, Bool, String, Path, Enum, List };
const char* arg_type_name(ArgType t);

struct Value {
  ArgType type = ArgType::String;
  int64_t i = 0;
  double f = 0;
  bool b = false;
  std::string s;             // String, Path, Enum
  std::vector<Value> items;  // List
  std::string str() const;   // human/YAML rendering: 3, 0.5, true, "x", [a, b]
};

struct ArgSpec {
  std::string name;
  ArgType type = ArgType::String;
  ArgType element = ArgType::String;  // element type of a List
  std::string doc;
  std::optional<Value> default_value;  // none: required (unless `optional`)
  bool optional = false;               // may be absent with no default (check Args::has)
  std::optional<double> min, max;      // Int/Float (and List of Int/Float elements)
  std::vector<std::string> choices;    // Enum (and List of Enum)
  bool must_exist = false;             // Path: checked by the validator

  // Builders, so a plugin's argument table reads like documentation.
  static ArgSpec integer(std::string name, int64_t def, std::string doc);
  static ArgSpec real(std::string name, double def, std::string doc);
  static ArgSpec boolean(std::string name, bool def, std::string doc);
  static ArgSpec string(std::string name, std::string def, std::string doc);
  static ArgSpec path(std::string name, std::string doc);  // required, must exist
  static ArgSpec choice(std::string name, std::vector<std::string> choices, std::string def,
                        std::string doc);
  static ArgSpec list(std::string name, ArgType element, std::vector<std::string> def,
                      std::string doc);
  ArgSpec& range(double lo, double hi);
  ArgSpec& at_least(double lo);
  ArgSpec& required();                              // drop the default
  ArgSpec& not_required();                          // optional with no default
  ArgSpec& output();                                // Path that need not exist (an output)
  ArgSpec& with_default(std::string path_default);  // a Path/String default
  std::string default_str() const;                  // "required", "(none)" or the default rendered
  std::string type_str() const;  // "int in [1, 100]", "enum {a|b}", "list<string>"
};

// Validated argument values of one plugin instance. Getters throw Error naming the argument
// when the plugin asks for something it did not declare (a plugin bug, not a user error).
class Args {
 public:
  Args() = default;
  Args(std::string plugin, std::map<std::string, Value> values, SourceLoc where = {})
      : plugin_(std::move(plugin)), values_(std::move(values)), where_(std::move(where)) {}

  bool has(const std::string& name) const { return values_.count(name) != 0; }
  int64_t integer(const std::string& name) const;
  double real(const std::string& name) const;  // Int values convert
  bool flag(const std::string& name) const;
  const std::string& str(const std::string& name) const;  // String, Path, Enum
  std::vector<std::string> strings(const std::string& name) const;
  std::vector<double> reals(const std::string& name) const;
  const Value& value(const std::string& name) const;
  const std::map<std::string, Value>& values() const { return values_; }
  const std::string& plugin() const { return plugin_; }
  const SourceLoc& where() const { return where_; }

 private:
  std::string plugin_;
  std::map<std::string, Value> values_;
  SourceLoc where_;
};

// Applies defaults and checks `given` (already typed) against `specs`; used by tests and by
// code that builds plugins without a pipeline file. Throws Error listing every problem.
Args make_args(const std::string& plugin, const std::vector<ArgSpec>& specs,
               const std::map<std::string, Value>& given = {});
// Text -> a typed, checked Value of `spec`: the one conversion pipeline files (every YAML scalar)
// and command lines (`--arg key=value`) share. int: an integral number ("3", "3.0", "1e3");
// float; bool: true/false, yes/no, on/off, y/n, 1/0 (any case); string; path (must exist when
// spec.must_exist); enum: one of spec.choices; list: comma-separated items of spec.element,
// optionally in [brackets] ("" and "[]" are empty). Ranges and choices are checked (for list
// items too). `what` names the value in errors (default: spec.name). Throws Error:
//   'what' expects int in [1, 10], got 'x'
//   'what' = 20 is out of range: expected int in [1, 10]
//   'what' = 'sampels' is not one of enum {samples|uniform} (did you mean 'samples'?)
//   'what': path 'p' does not exist (relative paths are resolved from the current folder)
Value parse_value(const ArgSpec& spec, const std::string& text, const std::string& what = "");
// One scalar of `type` (spec.type, or spec.element for one list item), checked against `spec`.
Value parse_scalar(const ArgSpec& spec, ArgType type, const std::string& text,
                   const std::string& what);

Value make_value(int64_t v);
Value make_value(double v);
Value make_value(bool v);
Value make_value(const std::string& v);
Value make_value(const char* v);
Value make_value(const std::vector<std::string>& v);

}  // namespace concord
