#include <concord/args.h>
#include <concord/registry.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <sstream>

namespace concord {

const char* arg_type_name(ArgType t) {
  switch (t) {
    case ArgType::Int:
      return "int";
    case ArgType::Float:
      return "float";
    case ArgType::Bool:
      return "bool";
    case ArgType::String:
      return "string";
    case ArgType::Path:
      return "path";
    case ArgType::Enum:
      return "enum";
    case ArgType::List:
      return "list";
  }
  return "?";
}

std::string Value::str() const {
  switch (type) {
    case ArgType::Int:
      return std::to_string(i);
    case ArgType::Float: {
      std::ostringstream o;
      o << f;
      return o.str();
    }
    case ArgType::Bool:
      return b ? "true" : "false";
    case ArgType::List: {
      std::string out = "[";
      for (size_t k = 0; k < items.size(); ++k) out += (k ? ", " : "") + items[k].str();
      return out + "]";
    }
    default:
      return s;
  }
}

Value make_value(int64_t v) {
  Value x;
  x.type = ArgType::Int;
  x.i = v;
  x.f = double(v);
  return x;
}
Value make_value(double v) {
  Value x;
  x.type = ArgType::Float;
  x.f = v;
  return x;
}
Value make_value(bool v) {
  Value x;
  x.type = ArgType::Bool;
  x.b = v;
  return x;
}
Value make_value(const std::string& v) {
  Value x;
  x.type = ArgType::String;
  x.s = v;
  return x;
}
Value make_value(const char* v) {
  return make_value(std::string(v));
}
Value make_value(const std::vector<std::string>& v) {
  Value x;
  x.type = ArgType::List;
  for (const auto& s : v) x.items.push_back(make_value(s));
  return x;
}

ArgSpec ArgSpec::integer(std::string name, int64_t def, std::string doc) {
  ArgSpec a;
  a.name = std::move(name);
  a.type = ArgType::Int;
  a.doc = std::move(doc);
  a.default_value = make_value(def);
  return a;
}
ArgSpec ArgSpec::real(std::string name, double def, std::string doc) {
  ArgSpec a;
  a.name = std::move(name);
  a.type = ArgType::Float;
  a.doc = std::move(doc);
  a.default_value = make_value(def);
  return a;
}
ArgSpec ArgSpec::boolean(std::string name, bool def, std::string doc) {
  ArgSpec a;
  a.name = std::move(name);
  a.type = ArgType::Bool;
  a.doc = std::move(doc);
  a.default_value = make_value(def);
  return a;
}
ArgSpec ArgSpec::string(std::string name, std::string def, std::string doc) {
  ArgSpec a;
  a.name = std::move(name);
  a.type = ArgType::String;
  a.doc = std::move(doc);
  a.default_value = make_value(def);
  return a;
}
ArgSpec ArgSpec::path(std::string name, std::string doc) {
  ArgSpec a;
  a.name = std::move(name);
  a.type = ArgType::Path;
  a.doc = std::move(doc);
  a.must_exist = true;
  return a;
}
ArgSpec ArgSpec::choice(std::string name, std::vector<std::string> choices, std::string def,
                        std::string doc) {
  ArgSpec a;
  a.name = std::move(name);
  a.type = ArgType::Enum;
  a.choices = std::move(choices);
  a.doc = std::move(doc);
  Value v = make_value(def);
  v.type = ArgType::Enum;
  a.default_value = v;
  return a;
}
ArgSpec ArgSpec::list(std::string name, ArgType element, std::vector<std::string> def,
                      std::string doc) {
  ArgSpec a;
  a.name = std::move(name);
  a.type = ArgType::List;
  a.element = element;
  a.doc = std::move(doc);
  Value v;
  v.type = ArgType::List;
  for (const auto& s : def) {
    Value item;
    item.type = element;
    item.s = s;
    if (element == ArgType::Int) item.i = std::stoll(s), item.f = double(item.i);
    if (element == ArgType::Float) item.f = std::stod(s);
    v.items.push_back(item);
  }
  a.default_value = v;
  return a;
}
ArgSpec& ArgSpec::range(double lo, double hi) {
  min = lo;
  max = hi;
  return *this;
}
ArgSpec& ArgSpec::at_least(double lo) {
  min = lo;
  return *this;
}
ArgSpec& ArgSpec::required() {
  default_value.reset();
  optional = false;
  return *this;
}
ArgSpec& ArgSpec::not_required() {
  default_value.reset();
  optional = true;
  return *this;
}
ArgSpec& ArgSpec::output() {
  must_exist = false;
  return *this;
}
ArgSpec& ArgSpec::with_default(std::string def) {
  Value v = make_value(def);
  v.type = type;
  default_value = v;
  return *this;
}

std::string ArgSpec::default_str() const {
  if (default_value) {
    if (type == ArgType::String || type == ArgType::Path) return "\"" + default_value->s + "\"";
    return default_value->str();
  }
  return optional ? "(none)" : "required";
}

static std::string fmt_num(double v) {
  std::ostringstream o;
  o << v;
  return o.str();
}

std::string ArgSpec::type_str() const {
  auto bounds = [&]() -> std::string {
    if (!min && !max) return "";
    return " in [" + (min ? fmt_num(*min) : "-inf") + ", " + (max ? fmt_num(*max) : "inf") + "]";
  };
  auto enum_str = [&]() {
    std::string s = "{";
    for (size_t k = 0; k < choices.size(); ++k) s += (k ? "|" : "") + choices[k];
    return s + "}";
  };
  switch (type) {
    case ArgType::Int:
      return "int" + bounds();
    case ArgType::Float:
      return "float" + bounds();
    case ArgType::Enum:
      return "enum " + enum_str();
    case ArgType::List:
      return std::string("list<") + arg_type_name(element) +
             (element == ArgType::Enum ? " " + enum_str() : "") + ">" + bounds();
    default:
      return arg_type_name(type);
  }
}

const Value& Args::value(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end())
    throw Error("plugin '" + plugin_ + "' read argument '" + name +
                "' which has no value (not declared, or optional and absent)");
  return it->second;
}
int64_t Args::integer(const std::string& name) const {
  return value(name).i;
}
double Args::real(const std::string& name) const {
  const Value& v = value(name);
  return v.type == ArgType::Int ? double(v.i) : v.f;
}
bool Args::flag(const std::string& name) const {
  return value(name).b;
}
const std::string& Args::str(const std::string& name) const {
  return value(name).s;
}
std::vector<std::string> Args::strings(const std::string& name) const {
  std::vector<std::string> out;
  for (const auto& v : value(name).items)
    out.push_back(v.type == ArgType::Int || v.type == ArgType::Float ? v.str() : v.s);
  return out;
}
std::vector<double> Args::reals(const std::string& name) const {
  std::vector<double> out;
  for (const auto& v : value(name).items) out.push_back(v.type == ArgType::Int ? double(v.i) : v.f);
  return out;
}

namespace {

std::string trimmed(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t") - b + 1);
}

bool parse_bool(const std::string& text, bool& out) {
  std::string l = text;
  std::transform(l.begin(), l.end(), l.begin(), [](unsigned char c) { return std::tolower(c); });
  if (l == "true" || l == "yes" || l == "on" || l == "y" || l == "1") return out = true, true;
  if (l == "false" || l == "no" || l == "off" || l == "n" || l == "0") return out = false, true;
  return false;
}

}  // namespace

Value parse_scalar(const ArgSpec& spec, ArgType type, const std::string& text,
                   const std::string& what) {
  Value out;
  out.type = type;
  const std::string& s = text;
  try {
    size_t used = 0;
    switch (type) {
      case ArgType::Int: {
        double d = std::stod(s, &used);
        if (used != s.size() || d != std::floor(d)) throw std::invalid_argument(s);
        // Beyond int64 is out of range (reported below), not a conversion to garbage.
        out.i = std::abs(d) < 9.2233720368547758e18 ? int64_t(d) : 0;
        out.f = d;
        break;
      }
      case ArgType::Float:
        out.f = std::stod(s, &used);
        if (used != s.size()) throw std::invalid_argument(s);
        break;
      case ArgType::Bool:
        if (!parse_bool(s, out.b)) throw std::invalid_argument(s);
        break;
      case ArgType::List:
        throw std::invalid_argument(s);  // nested lists are not declarable
      default:
        out.s = s;
    }
  } catch (const std::exception&) {
    throw Error("'" + what + "' expects " + spec.type_str() + ", got '" + s + "'");
  }
  if (type == ArgType::Int || type == ArgType::Float) {
    const double v = out.f;  // an Int's value as parsed, before the int64 conversion
    const bool fits =
        std::isfinite(v) && (type == ArgType::Float || std::abs(v) < 9.2233720368547758e18);
    if (!fits || (spec.min && v < *spec.min) || (spec.max && v > *spec.max))
      throw Error("'" + what + "' = " + s + " is out of range: expected " + spec.type_str());
  }
  if (type == ArgType::Enum &&
      std::find(spec.choices.begin(), spec.choices.end(), s) == spec.choices.end()) {
    const std::string hint = closest_name(s, spec.choices);
    throw Error("'" + what + "' = '" + s + "' is not one of " + spec.type_str() +
                (hint.empty() ? "" : " (did you mean '" + hint + "'?)"));
  }
  if (type == ArgType::Path && spec.must_exist && !std::filesystem::exists(s))
    throw Error("'" + what + "': path '" + s +
                "' does not exist (relative paths are resolved from the current folder)");
  return out;
}

Value parse_value(const ArgSpec& spec, const std::string& text, const std::string& what_) {
  const std::string what = what_.empty() ? spec.name : what_;
  if (spec.type != ArgType::List) return parse_scalar(spec, spec.type, text, what);
  Value list;
  list.type = ArgType::List;
  std::string body = trimmed(text);
  if (body.size() >= 2 && body.front() == '[' && body.back() == ']')
    body = trimmed(body.substr(1, body.size() - 2));
  if (body.empty()) return list;
  size_t start = 0;
  for (int k = 0;; ++k) {
    const size_t comma = body.find(',', start);
    const std::string item =
        trimmed(body.substr(start, comma == std::string::npos ? comma : comma - start));
    list.items.push_back(
        parse_scalar(spec, spec.element, item, what + "[" + std::to_string(k) + "]"));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return list;
}

Args make_args(const std::string& plugin, const std::vector<ArgSpec>& specs,
               const std::map<std::string, Value>& given) {
  std::map<std::string, Value> out;
  std::string problems;
  for (const auto& [k, v] : given) {
    const ArgSpec* spec = nullptr;
    for (const auto& s : specs)
      if (s.name == k) spec = &s;
    if (!spec) {
      problems += "\n  unknown argument '" + k + "'";
      continue;
    }
    Value x = v;
    if (spec->type == ArgType::Float && x.type == ArgType::Int) x.f = double(x.i);
    if (spec->type == ArgType::Int && x.type == ArgType::Float) {
      if (x.f != std::floor(x.f)) problems += "\n  '" + k + "' must be an integer";
      x.i = int64_t(x.f);
    }
    x.type = spec->type;
    if (spec->type == ArgType::List) {
      // Items given as text (make_value of strings) become numbers when the list is numeric.
      for (auto& item : x.items) {
        try {
          if (spec->element == ArgType::Int && item.type != ArgType::Int) {
            item.i = item.type == ArgType::Float ? int64_t(item.f) : std::stoll(item.s);
            item.f = double(item.i);
          } else if (spec->element == ArgType::Float && item.type != ArgType::Float) {
            item.f = item.type == ArgType::Int ? double(item.i) : std::stod(item.s);
          }
        } catch (const std::exception&) {
          problems += "\n  '" + k + "' item '" + item.s + "' is not a number";
        }
        item.type = spec->element;
      }
    }
    if (spec->type == ArgType::Path && spec->must_exist && !std::filesystem::exists(x.s))
      problems += "\n  '" + k + "': path '" + x.s + "' does not exist";
    double num = spec->type == ArgType::Int ? double(x.i) : x.f;
    if ((spec->type == ArgType::Int || spec->type == ArgType::Float) &&
        ((spec->min && num < *spec->min) || (spec->max && num > *spec->max)))
      problems += "\n  '" + k + "' = " + x.str() + " is outside " + spec->type_str();
    if (spec->type == ArgType::Enum) {
      bool ok = false;
      for (const auto& c : spec->choices) ok = ok || c == x.s;
      if (!ok) problems += "\n  '" + k + "' = " + x.s + " is not one of " + spec->type_str();
    }
    out[k] = x;
  }
  for (const auto& s : specs) {
    if (out.count(s.name)) continue;
    if (s.default_value)
      out[s.name] = *s.default_value;
    else if (!s.optional)
      problems += "\n  missing required argument '" + s.name + "'";
  }
  if (!problems.empty()) throw Error("plugin '" + plugin + "':" + problems);
  return Args(plugin, std::move(out));
}

}  // namespace concord
