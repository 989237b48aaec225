//! The minijinja environment, configured to behave like the jinja2 environment transformers compiles
//! chat templates in: `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
//! extensions=[AssistantTracker, loopcontrols])` plus the `tojson` filter and the `raise_exception`,
//! `strftime_now`, `dict` and `namespace` globals.

use std::cell::Cell;

use minijinja::value::{Rest, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State, UndefinedBehavior};

use crate::date::{self, Date};
use crate::py::{self, bind, err, is_list, py_str, Generator, JsonOptions, Tuple};
use crate::{ops, rewrite};

/// The error `raise_exception(message)` returns; found again in the error's source chain.
#[derive(Debug)]
pub(crate) struct Raised(pub String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

thread_local! {
    /// The date `strftime_now` reports during a render; `None` is the current date.
    pub(crate) static FIXED_DATE: Cell<Option<Date>> = const { Cell::new(None) };
}

/// Filters, tests and globals minijinja has but jinja2 does not: a template using them fails in
/// transformers, so it fails here too.
const NOT_JINJA2_FILTERS: &[&str] = &["split", "lines", "bool", "chain", "zip"];
const NOT_JINJA2_TESTS: &[&str] = &["int", "startingwith", "endingwith", "safe"];
const NOT_JINJA2_GLOBALS: &[&str] = &["debug"];

pub(crate) fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_formatter(format_value);
    env.set_unknown_method_callback(py::call_method);
    for name in NOT_JINJA2_FILTERS {
        env.remove_filter(name);
    }
    for name in NOT_JINJA2_TESTS {
        env.remove_test(name);
    }
    for name in NOT_JINJA2_GLOBALS {
        env.remove_global(name);
    }

    env.add_function(rewrite::ADD, ops::add);
    env.add_function(rewrite::CONCAT, ops::concat);
    env.add_function(rewrite::MOD, ops::modulo);
    env.add_function(rewrite::MUL, ops::mul);
    env.add_function(rewrite::ITER, ops::iter);
    env.add_function(rewrite::POW, ops::pow);
    env.add_function(rewrite::DIV, ops::div);
    env.add_function(rewrite::FLOORDIV, ops::floordiv);
    env.add_function(rewrite::TUPLE, |items: Rest<Value>| Tuple::value(items.0));
    env.add_function(rewrite::ID, |v: Value| v);
    env.add_function(rewrite::METHOD, method);
    env.add_function(rewrite::ATTR, attribute);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_function("namespace", namespace);

    env.add_filter("tojson", tojson);
    env.add_filter("string", |v: &Value| {
        if v.kind() == ValueKind::String {
            v.clone()
        } else {
            Value::from(py_str(v))
        }
    });
    env.add_filter("join", join);
    env.add_filter("trim", trim);
    env.add_filter("length", length);
    env.add_filter("count", length);
    env.add_filter("upper", |v: &Value| py_str(v).to_uppercase());
    env.add_filter("lower", |v: &Value| py_str(v).to_lowercase());
    env.add_filter("capitalize", |v: &Value| py::py_capitalize(&py_str(v)));
    env.add_filter("title", |v: &Value| title(&py_str(v)));
    env.add_filter("replace", replace);
    env.add_filter("indent", indent);
    env.add_filter("items", items);
    env.add_filter("list", list);
    env.add_filter("int", int);
    env.add_filter("float", float);
    env.add_filter("reverse", reverse);
    env.add_filter("dictsort", |v: &Value, kw: minijinja::value::Kwargs| {
        let sorted = minijinja::filters::dictsort(v, kw)?;
        let pairs: Result<Vec<Value>, Error> = sorted
            .try_iter()?
            .map(|p| Ok(Tuple::value(p.try_iter()?.collect())))
            .collect();
        Ok::<_, Error>(Value::from(pairs?))
    });
    env.add_filter("round", round);
    env.add_filter("format", format);
    env.add_filter("min", |v: &Value, a: Rest<Value>| min_max(v, &a, true));
    env.add_filter("max", |v: &Value, a: Rest<Value>| min_max(v, &a, false));
    env.add_filter("sum", sum);
    env.add_filter("attr", attr);
    let escape = |v: &Value| {
        if v.is_safe() {
            v.clone()
        } else {
            Value::from_safe_string(crate::ops::escape(&py_str(v)))
        }
    };
    env.add_filter("escape", escape);
    env.add_filter("e", escape);
    env.add_filter("center", |v: &Value, width: Option<i64>| {
        py::call_method_str(&py_str(v), "center", &[Value::from(width.unwrap_or(80))])
    });
    env.add_filter("striptags", |v: &Value| striptags(&py_str(v)));
    env.add_filter("wordcount", |v: &Value| {
        py_str(v)
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .count()
    });
    env.add_filter("truncate", truncate);
    env.add_filter("wordwrap", wordwrap);
    env.add_filter("last", last);
    env.add_filter("filesizeformat", filesizeformat);
    env.add_filter("forceescape", |v: &Value| {
        Value::from_safe_string(crate::ops::escape(&py_str(v)))
    });
    env.add_filter("map", |s: &State, v: Value, a: Rest<Value>| {
        minijinja::filters::map(s, v, a).map(Generator::value)
    });
    env.add_filter("select", |s: &State, v: Value, t: Option<String>, a: Rest<Value>| {
        minijinja::filters::select(s, v, t.map(Into::into), a).map(Generator::value)
    });
    env.add_filter("reject", |s: &State, v: Value, t: Option<String>, a: Rest<Value>| {
        minijinja::filters::reject(s, v, t.map(Into::into), a).map(Generator::value)
    });
    env.add_filter(
        "selectattr",
        |s: &State, v: Value, at: String, t: Option<String>, a: Rest<Value>| {
            minijinja::filters::selectattr(s, v, at.into(), t.map(Into::into), a).map(Generator::value)
        },
    );
    env.add_filter(
        "rejectattr",
        |s: &State, v: Value, at: String, t: Option<String>, a: Rest<Value>| {
            minijinja::filters::rejectattr(s, v, at.into(), t.map(Into::into), a).map(Generator::value)
        },
    );
    env.add_filter("unique", |s: &State, v: Value, kw: minijinja::value::Kwargs| {
        let rv = minijinja::filters::unique(s, v, kw)?;
        Ok::<_, Error>(Generator::value(rv.try_iter()?.collect()))
    });

    env.add_test("sequence", |v: &Value| {
        matches!(v.kind(), ValueKind::Undefined | ValueKind::String | ValueKind::Map) || is_list(v)
    });
    env.add_test("iterable", |v: &Value| {
        matches!(
            v.kind(),
            ValueKind::Undefined | ValueKind::String | ValueKind::Seq | ValueKind::Map | ValueKind::Iterable
        )
    });
    env.add_test("mapping", py::is_dict);
    env.add_test("number", |v: &Value| {
        matches!(v.kind(), ValueKind::Number | ValueKind::Bool)
    });
    env.add_test("callable", |v: &Value| v.kind() == ValueKind::Plain);
    env.add_test("lower", |v: &Value| {
        let s = py_str(v);
        s.chars().any(|c| c.is_lowercase() || c.is_uppercase()) && !s.chars().any(char::is_uppercase)
    });
    env.add_test("upper", |v: &Value| {
        let s = py_str(v);
        s.chars().any(|c| c.is_lowercase() || c.is_uppercase()) && !s.chars().any(char::is_lowercase)
    });
    env
}

/// `{{ value }}` prints Python's `str(value)`.
fn format_value(out: &mut Output, state: &State, value: &Value) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined => Ok(()),
        ValueKind::String => out.write_str(value.as_str().unwrap_or_default()).map_err(Error::from),
        ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::Seq | ValueKind::Map => {
            out.write_str(&py_str(value)).map_err(Error::from)
        }
        _ if is_list(value) => out.write_str(&py_str(value)).map_err(Error::from),
        _ => minijinja::escape_formatter(out, state, value),
    }
}

fn raise_exception(message: Value) -> Result<Value, Error> {
    let message = py_str(&message);
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
}

/// transformers' `TemplateNamespace`: a namespace whose attribute names may not start with `_`.
fn namespace(defaults: Option<Value>) -> Result<Value, Error> {
    if let Some(names) = defaults.as_ref().and_then(|d| d.try_iter().ok()) {
        for name in names {
            if name.as_str().is_some_and(|n| n.starts_with('_')) {
                return Err(err(format!(
                    "Chat templates cannot store underscore-prefixed attributes on a namespace, but got {}. \
                     Please rename the attribute.",
                    py::py_repr(&name)
                )));
            }
        }
    }
    minijinja::functions::namespace(defaults)
}

fn strftime_now(format: String) -> String {
    let date = FIXED_DATE
        .with(Cell::get)
        .map(Date::midnight)
        .unwrap_or_else(date::now_utc);
    date::strftime(&format, &date)
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`:
/// `json.dumps` with those arguments.
fn tojson(value: &Value, args: Rest<Value>) -> Result<Value, Error> {
    let p = bind("tojson", &args, &["ensure_ascii", "indent", "separators", "sort_keys"])?;
    let is_set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_none());
    let indent = match &p[1] {
        Some(v) if v.is_none() => None,
        None => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
        Some(v) if v.is_integer() || v.kind() == ValueKind::Bool => {
            let n = v.as_i64().unwrap_or(v.is_true() as i64).max(0) as usize;
            Some(" ".repeat(n))
        }
        Some(v) => {
            return Err(err(format!(
                "indent must be None, int or str, not {}",
                py::type_name(v)
            )))
        }
    };
    let (item_sep, key_sep) = if is_set(&p[2]) {
        let seps: Vec<Value> = p[2].clone().unwrap_or_default().try_iter()?.collect();
        match seps.as_slice() {
            [a, b] if a.as_str().is_some() && b.as_str().is_some() => (
                a.as_str().unwrap_or_default().to_string(),
                b.as_str().unwrap_or_default().to_string(),
            ),
            _ => {
                return Err(err(
                    "separators must be a (item_separator, key_separator) pair of strings",
                ))
            }
        }
    } else if indent.is_some() {
        (",".to_string(), ": ".to_string())
    } else {
        (", ".to_string(), ": ".to_string())
    };
    let opts = JsonOptions {
        ensure_ascii: p[0].as_ref().is_some_and(Value::is_true),
        indent,
        item_sep,
        key_sep,
        sort_keys: p[3].as_ref().is_some_and(Value::is_true),
    };
    py::json_dumps(value, &opts).map(Value::from)
}

/// Iterates a value as Python's `iter()` does (a mapping yields its keys, a string its characters,
/// undefined nothing).
fn py_iter(v: &Value) -> Result<Vec<Value>, Error> {
    match v.kind() {
        ValueKind::Undefined => Ok(Vec::new()),
        ValueKind::String | ValueKind::Seq | ValueKind::Map | ValueKind::Iterable => Ok(v.try_iter()?.collect()),
        _ => Err(err(format!("'{}' object is not iterable", py::type_name(v)))),
    }
}

/// jinja2's attribute getter: a dotted path, integer parts index sequences.
fn attr_path(v: &Value, path: &Value) -> Result<Value, Error> {
    let Some(path) = path.as_str() else {
        return v.get_item(path);
    };
    let mut cur = v.clone();
    for part in path.split('.') {
        cur = match part.parse::<i64>() {
            Ok(i) => cur.get_item(&Value::from(i))?,
            Err(_) => cur.get_item(&Value::from(part))?,
        };
    }
    Ok(cur)
}

/// `join(value, d='', attribute=None)`: `str(d).join(map(str, value))`.
fn join(value: &Value, args: Rest<Value>) -> Result<String, Error> {
    let p = bind("join", &args, &["d", "attribute"])?;
    let sep = p[0].as_ref().map(py_str).unwrap_or_default();
    let mut out = String::new();
    for (i, item) in py_iter(value)?.into_iter().enumerate() {
        if i > 0 {
            out.push_str(&sep);
        }
        let item = match &p[1] {
            Some(attr) if !attr.is_none() => attr_path(&item, attr)?,
            _ => item,
        };
        out.push_str(&py_str(&item));
    }
    Ok(out)
}

/// `trim(value, chars=None)`: `str(value).strip(chars)`.
fn trim(value: &Value, chars: Option<Value>) -> Result<String, Error> {
    let s = py_str(value);
    let chars = chars.filter(|c| !c.is_none());
    let chars = chars.as_ref().map(py_str);
    Ok(py::py_strip(&s, chars.as_deref(), true, true).to_string())
}

/// `length(value)`: Python's `len()`; undefined has length 0.
fn length(value: &Value) -> Result<usize, Error> {
    match value.kind() {
        ValueKind::Undefined => Ok(0),
        ValueKind::String => Ok(value.as_str().unwrap_or_default().chars().count()),
        ValueKind::Map if py::is_dict(value) => value.len().ok_or_else(|| err("object has no len()")),
        _ if is_list(value) => Ok(value
            .len()
            .unwrap_or_else(|| value.try_iter().map_or(0, Iterator::count))),
        _ => Err(err(format!("object of type '{}' has no len()", py::type_name(value)))),
    }
}

/// jinja2's `title`: every run that follows `-`, whitespace or an opening bracket is capitalised.
fn title(s: &str) -> String {
    let is_sep = |c: char| matches!(c, '-' | '(' | '{' | '[' | '<') || py::is_py_space(c);
    let mut out = String::with_capacity(s.len());
    let mut first = true;
    let mut prev_sep = None;
    for c in s.chars() {
        let sep = is_sep(c);
        if prev_sep != Some(sep) {
            first = true;
        }
        prev_sep = Some(sep);
        if first {
            out.extend(c.to_uppercase());
            first = false;
        } else {
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// `replace(s, old, new, count=None)` on `str(s)`.
fn replace(value: &Value, old: Value, new: Value, count: Option<Value>) -> Result<String, Error> {
    let count = match count {
        Some(c) if !c.is_none() => c.as_i64().ok_or_else(|| err("count must be an integer"))?,
        _ => -1,
    };
    Ok(py::py_replace(&py_str(value), &py_str(&old), &py_str(&new), count))
}

/// `indent(s, width=4, first=False, blank=False)`.
fn indent(value: &Value, args: Rest<Value>) -> Result<String, Error> {
    let p = bind("indent", &args, &["width", "first", "blank"])?;
    let indention = match &p[0] {
        Some(w) if w.kind() == ValueKind::String => w.as_str().unwrap_or_default().to_string(),
        Some(w) => " ".repeat(
            w.as_i64()
                .ok_or_else(|| err("indent width must be an integer or string"))?
                .max(0) as usize,
        ),
        None => "    ".to_string(),
    };
    let first = p[1].as_ref().is_some_and(Value::is_true);
    let blank = p[2].as_ref().is_some_and(Value::is_true);
    let s = py_str(value) + "\n";
    let lines = py::py_splitlines(&s, false);
    let mut rv = if blank {
        lines.join(&format!("\n{indention}"))
    } else {
        let mut iter = lines.into_iter();
        let mut rv = iter.next().unwrap_or_default();
        let rest: Vec<String> = iter
            .map(|line| {
                if line.is_empty() {
                    line
                } else {
                    format!("{indention}{line}")
                }
            })
            .collect();
        if !rest.is_empty() {
            rv.push('\n');
            rv.push_str(&rest.join("\n"));
        }
        rv
    };
    if first {
        rv = indention + &rv;
    }
    Ok(rv)
}

/// `items(value)`: the (key, value) pairs of a mapping, as a generator.
fn items(value: &Value) -> Result<Value, Error> {
    match value.kind() {
        ValueKind::Undefined => Ok(Generator::value(Vec::new())),
        ValueKind::Map => {
            let pairs = value.as_object().and_then(|o| o.try_iter_pairs()).into_iter().flatten();
            Ok(Generator::value(pairs.map(|(k, v)| Tuple::value(vec![k, v])).collect()))
        }
        _ => Err(err("Can only get item pairs from a mapping.")),
    }
}

/// `list(value)`.
fn list(value: &Value) -> Result<Value, Error> {
    Ok(Value::from(py_iter(value)?))
}

fn parse_py_int(s: &str, base: u32) -> Option<i128> {
    let t = py::py_strip(s, None, true, true).replace('_', "");
    let (neg, digits) = match t.strip_prefix('-') {
        Some(d) => (true, d.to_string()),
        None => (false, t.strip_prefix('+').unwrap_or(&t).to_string()),
    };
    if digits.is_empty() || s.contains("__") {
        return None;
    }
    let lower = digits.to_ascii_lowercase();
    let prefixed = |p: &str, b: u32| {
        lower
            .strip_prefix(p)
            .filter(|_| base == b || base == 0)
            .map(|d| (d.to_string(), b))
    };
    let (digits, base) = prefixed("0x", 16)
        .or_else(|| prefixed("0o", 8))
        .or_else(|| prefixed("0b", 2))
        .unwrap_or((digits, if base == 0 { 10 } else { base }));
    let n = i128::from_str_radix(&digits, base).ok()?;
    Some(if neg { -n } else { n })
}

fn parse_py_float(s: &str) -> Option<f64> {
    let t = py::py_strip(s, None, true, true).replace('_', "").to_lowercase();
    match t.trim_start_matches(['+', '-']) {
        "inf" | "infinity" | "nan" => {}
        other if other.chars().any(|c| c.is_ascii_alphabetic() && c != 'e') => return None,
        _ => {}
    }
    t.parse::<f64>().ok()
}

/// `int(value, default=0, base=10)`.
fn int(value: &Value, args: Rest<Value>) -> Result<Value, Error> {
    let p = bind("int", &args, &["default", "base"])?;
    let default = p[0].clone().unwrap_or(Value::from(0));
    let base = p[1].as_ref().and_then(Value::as_i64).unwrap_or(10) as u32;
    Ok(match value.kind() {
        ValueKind::Bool => Value::from(value.is_true() as i64),
        ValueKind::Number if value.is_integer() => value.clone(),
        ValueKind::Number => match f64::try_from(value.clone()) {
            Ok(f) if f.is_finite() => Value::from(f.trunc() as i128),
            _ => default,
        },
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            match parse_py_int(s, base) {
                Some(n) => Value::from(n),
                None => match parse_py_float(s) {
                    Some(f) if f.is_finite() => Value::from(f.trunc() as i128),
                    _ => default,
                },
            }
        }
        _ => default,
    })
}

/// `float(value, default=0.0)`.
fn float(value: &Value, default: Option<Value>) -> Value {
    let default = default.unwrap_or(Value::from(0.0));
    match value.kind() {
        ValueKind::Bool => Value::from(value.is_true() as i64 as f64),
        ValueKind::Number => f64::try_from(value.clone()).map(Value::from).unwrap_or(default),
        ValueKind::String => parse_py_float(value.as_str().unwrap_or_default())
            .map(Value::from)
            .unwrap_or(default),
        _ => default,
    }
}

/// `reverse(value)`: a reversed string, or a reverse iterator.
fn reverse(value: &Value) -> Result<Value, Error> {
    match value.kind() {
        ValueKind::String => Ok(Value::from(
            value.as_str().unwrap_or_default().chars().rev().collect::<String>(),
        )),
        ValueKind::Iterable => {
            let mut items = py_iter(value)?;
            items.reverse();
            Ok(Value::from(items))
        }
        _ => {
            let mut items = py_iter(value).map_err(|_| err("argument must be iterable"))?;
            items.reverse();
            Ok(Generator::value(items))
        }
    }
}

/// `x.NAME(args)`: the Python method where `x` has one, else minijinja's method call.
fn method(state: &State, args: Rest<Value>) -> Result<Value, Error> {
    let (target, rest) = args
        .0
        .split_first()
        .ok_or_else(|| err("method call without an object"))?;
    let (name, rest) = rest.split_first().ok_or_else(|| err("method call without a name"))?;
    let name = name.as_str().unwrap_or_default();
    if target.is_undefined() {
        return Err(Error::new(
            ErrorKind::UndefinedError,
            format!("undefined value has no method {name}"),
        ));
    }
    if py::has_py_method(target, name) {
        py::call_method(state, target, name, rest)
    } else {
        target.call_method(state, name, rest)
    }
}

/// `x.NAME` for a NAME that is a Python method name: the method where `x` has one, else the attribute.
fn attribute(target: &Value, name: &str) -> Result<Value, Error> {
    if target.is_undefined() {
        return Err(Error::new(
            ErrorKind::UndefinedError,
            format!("undefined value has no attribute {name}"),
        ));
    }
    if py::has_py_method(target, name) {
        return Ok(Value::from_object(py::BoundMethod {
            target: target.clone(),
            name: name.to_string(),
        }));
    }
    match target.kind() {
        ValueKind::None => Ok(Value::UNDEFINED),
        _ => target.get_attr(name),
    }
}

/// The items of a value with jinja2's attribute getter applied (`attribute=None`: the items).
fn items_by(value: &Value, attribute: &Option<Value>) -> Result<Vec<(Value, Value)>, Error> {
    py_iter(value)?
        .into_iter()
        .map(|item| {
            let key = match attribute {
                Some(a) if !a.is_none() => attr_path(&item, a)?,
                _ => item.clone(),
            };
            Ok((item, key))
        })
        .collect()
}

/// `min(value, case_sensitive=False, attribute=None)` / `max`: the first smallest (largest) item;
/// strings compare lowercased unless `case_sensitive`.
fn min_max(value: &Value, args: &[Value], min: bool) -> Result<Value, Error> {
    let p = bind(if min { "min" } else { "max" }, args, &["case_sensitive", "attribute"])?;
    let case_sensitive = p[0].as_ref().is_some_and(Value::is_true);
    let fold = |v: Value| match v.as_str() {
        Some(s) if !case_sensitive => Value::from(s.to_lowercase()),
        _ => v,
    };
    let mut best: Option<(Value, Value)> = None;
    for (item, key) in items_by(value, &p[1])? {
        let key = fold(key);
        let better = match &best {
            None => true,
            Some((_, b)) if min => key < *b,
            Some((_, b)) => key > *b,
        };
        if better {
            best = Some((item, key));
        }
    }
    Ok(best.map_or(Value::UNDEFINED, |(item, _)| item))
}

/// `sum(iterable, attribute=None, start=0)`.
fn sum(value: &Value, args: Rest<Value>) -> Result<Value, Error> {
    let p = bind("sum", &args, &["attribute", "start"])?;
    let mut total = p[1].clone().unwrap_or(Value::from(0));
    for (_, key) in items_by(value, &p[0])? {
        total = crate::ops::add(total, key)?;
    }
    Ok(total)
}

/// `attr(obj, name)`: an attribute only, never an item (so a dict key is not found).
fn attr(value: &Value, name: &Value) -> Result<Value, Error> {
    let name = py_str(name);
    match value.kind() {
        ValueKind::Map | ValueKind::Seq | ValueKind::String | ValueKind::Undefined | ValueKind::None => {
            Ok(Value::UNDEFINED)
        }
        _ => value.get_attr(&name),
    }
}

/// `round(value, precision=0, method='common')`: Python's `round` (half to even), or floor / ceil.
fn round(value: &Value, args: Rest<Value>) -> Result<Value, Error> {
    let p = bind("round", &args, &["precision", "method"])?;
    let precision = p[0].as_ref().and_then(Value::as_i64).unwrap_or(0);
    let method = p[1].as_ref().map(py_str).unwrap_or_else(|| "common".into());
    let x = match value.kind() {
        ValueKind::Number | ValueKind::Bool if value.is_integer() || value.kind() == ValueKind::Bool => {
            if method == "common" {
                return Ok(value.clone());
            }
            value.as_i64().unwrap_or(value.is_true() as i64) as f64
        }
        ValueKind::Number => f64::try_from(value.clone())?,
        _ => {
            return Err(err(format!(
                "type {} doesn't define __round__ method",
                py::type_name(value)
            )))
        }
    };
    let scale = 10f64.powi(precision as i32);
    let rv = match method.as_str() {
        "common" if precision >= 0 => format!("{x:.prec$}", prec = precision as usize)
            .parse::<f64>()
            .unwrap_or(x),
        "common" => (x * scale).round_ties_even() / scale,
        "floor" => (x * scale).floor() / scale,
        "ceil" => (x * scale).ceil() / scale,
        _ => return Err(err("method must be 'common', 'ceil' or 'floor'")),
    };
    Ok(Value::from(rv))
}

/// markupsafe's `Markup.striptags()`: comments and tags removed, whitespace collapsed, entities unescaped.
fn striptags(s: &str) -> String {
    let mut text = String::with_capacity(s.len());
    let mut rest = s;
    loop {
        let next = match (rest.find("<!--"), rest.find('<')) {
            (Some(c), Some(t)) if c <= t => Some((c, "-->")),
            (_, Some(t)) => Some((t, ">")),
            _ => None,
        };
        let Some((start, close)) = next else { break };
        match rest[start + 1..].find(close) {
            Some(end) => {
                text.push_str(&rest[..start]);
                rest = &rest[start + 1 + end + close.len()..];
            }
            None => break,
        }
    }
    text.push_str(rest);
    let collapsed = py::py_split(&text, None, -1).unwrap_or_default().join(" ");
    collapsed
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#34;", "\"")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// `truncate(s, length=255, killwords=False, end='...', leeway=5)`.
fn truncate(value: &Value, args: Rest<Value>) -> Result<String, Error> {
    let p = bind("truncate", &args, &["length", "killwords", "end", "leeway"])?;
    let s = py_str(value);
    let length = p[0].as_ref().and_then(Value::as_i64).unwrap_or(255).max(0) as usize;
    let killwords = p[1].as_ref().is_some_and(Value::is_true);
    let end = p[2].as_ref().map(py_str).unwrap_or_else(|| "...".into());
    let leeway = p[3].as_ref().and_then(Value::as_i64).unwrap_or(5).max(0) as usize;
    let end_len = end.chars().count();
    if length < end_len {
        return Err(err(format!("expected length >= {end_len}, got {length}")));
    }
    if s.chars().count() <= length + leeway {
        return Ok(s);
    }
    let head: String = s.chars().take(length - end_len).collect();
    if killwords {
        return Ok(head + &end);
    }
    let head = match head.rfind(' ') {
        Some(i) => head[..i].to_string(),
        None => head,
    };
    Ok(head + &end)
}

/// `format(value, *args, **kwargs)`: `str(value) % (kwargs or args)`.
fn format(value: &Value, args: Rest<Value>) -> Result<Value, Error> {
    let (positional, kwargs) = py::split_kwargs(&args);
    let values = match kwargs {
        Some(_) if !positional.is_empty() => {
            return Err(err("can't handle positional and keyword arguments at the same time"));
        }
        Some(kw) => {
            let mut pairs = Vec::new();
            for key in kw.args() {
                pairs.push((key.to_string(), kw.get::<Value>(key)?));
            }
            Value::from_iter(pairs)
        }
        None => Tuple::value(positional.to_vec()),
    };
    ops::modulo(Value::from(py_str(value)), values)
}

/// `last(seq)`: `next(iter(reversed(seq)))`; a generator cannot be reversed.
fn last(value: &Value) -> Result<Value, Error> {
    if value.kind() == ValueKind::Iterable && !is_list(value) {
        return Err(err("'generator' object is not reversible"));
    }
    if let Some(s) = value.as_str() {
        return Ok(s.chars().next_back().map_or(Value::UNDEFINED, Value::from));
    }
    Ok(py_iter(value)?.pop().unwrap_or(Value::UNDEFINED))
}

/// `wordwrap(s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True)`: each line
/// wrapped by `textwrap.wrap`.
fn wordwrap(value: &Value, args: Rest<Value>) -> Result<String, Error> {
    let p = bind(
        "wordwrap",
        &args,
        &["width", "break_long_words", "wrapstring", "break_on_hyphens"],
    )?;
    let width = p[0].as_ref().and_then(Value::as_i64).unwrap_or(79);
    if width <= 0 {
        return Err(err(format!("invalid width {width} (must be > 0)")));
    }
    let break_long = p[1].as_ref().is_none_or(Value::is_true);
    let wrapstring = p[2]
        .as_ref()
        .filter(|w| !w.is_none())
        .map_or_else(|| "\n".to_string(), py_str);
    let hyphens = p[3].as_ref().is_none_or(Value::is_true);
    let lines: Vec<String> = py::py_splitlines(&py_str(value), false)
        .iter()
        .map(|line| py::textwrap(line, width as usize, break_long, hyphens).join(&wrapstring))
        .collect();
    Ok(lines.join(&wrapstring))
}

/// `filesizeformat(value, binary=False)`.
fn filesizeformat(value: &Value, binary: Option<bool>) -> Result<String, Error> {
    let bytes = float(value, None);
    let bytes = f64::try_from(bytes)?;
    let binary = binary.unwrap_or(false);
    let base: f64 = if binary { 1024.0 } else { 1000.0 };
    let prefixes: [&str; 8] = if binary {
        ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"]
    } else {
        ["kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"]
    };
    if bytes == 1.0 {
        return Ok("1 Byte".into());
    }
    if bytes < base {
        return Ok(format!("{} Bytes", bytes.trunc() as i64));
    }
    let mut unit = base;
    for prefix in prefixes {
        unit *= base;
        if bytes < unit {
            return Ok(format!("{:.1} {prefix}", base * bytes / unit));
        }
    }
    Ok(format!("{:.1} {}", base * bytes / unit, prefixes[7]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn title_matches_jinja2() {
        assert_eq!(title("hello wORLD-foo (bar) it's"), "Hello World-Foo (Bar) It's");
    }

    #[test]
    fn python_str() {
        assert_eq!(py_str(&Value::from(())), "None");
        assert_eq!(py_str(&Value::from(false)), "False");
    }
}
