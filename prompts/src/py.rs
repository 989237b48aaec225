//! Python semantics the templates depend on: `str()` / `repr()` of values, `json.dumps`, and the
//! `str` / `dict` / `list` methods that jinja2's immutable sandbox lets a template call.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Value, ValueKind};
use minijinja::{Error, ErrorKind, State};

pub(crate) fn err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg.into())
}

/// A Python generator: what jinja2's `map`, `select`, `selectattr`, `reject`, `rejectattr` and `unique`
/// return. It can be iterated once, has no length, is always true, and `json.dumps` rejects it.
#[derive(Debug)]
pub(crate) struct Generator(Mutex<Option<Vec<Value>>>);

impl Generator {
    pub(crate) fn value(items: Vec<Value>) -> Value {
        Value::from_object(Generator(Mutex::new(Some(items))))
    }
}

impl Object for Generator {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Iterable
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let items = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        Enumerator::Iter(Box::new(items.into_iter()))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        None
    }

    fn is_true(self: &Arc<Self>) -> bool {
        true
    }
}

/// A Python tuple: a sequence that prints as `(a, b)`. What `dict.items()`, `|items`, `|dictsort`,
/// `str.partition()` and tuple literals give.
#[derive(Debug)]
pub(crate) struct Tuple(pub Vec<Value>);

impl Tuple {
    pub(crate) fn value(items: Vec<Value>) -> Value {
        Value::from_object(Tuple(items))
    }
}

impl Object for Tuple {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Seq
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let i = key.as_i64()?;
        let i = if i < 0 { i + self.0.len() as i64 } else { i };
        self.0.get(usize::try_from(i).ok()?).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Seq(self.0.len())
    }
}

fn is_tuple(v: &Value) -> bool {
    v.downcast_object_ref::<Tuple>().is_some()
}

/// Whether a value is a `namespace(...)` (minijinja's own type, which `{% set ns.x = ... %}` needs).
pub(crate) fn is_namespace(v: &Value) -> bool {
    v.as_object().is_some_and(|o| o.type_name().ends_with("::Namespace"))
}

/// Whether a value is a Python dict (a mapping that is not a namespace).
pub(crate) fn is_dict(v: &Value) -> bool {
    v.kind() == ValueKind::Map && !is_namespace(v)
}

/// Whether `NAME` is a method of the value's Python type (so `value.NAME` is that method).
pub(crate) fn has_py_method(v: &Value, name: &str) -> bool {
    const DICT: &[&str] = &[
        "clear",
        "copy",
        "fromkeys",
        "get",
        "items",
        "keys",
        "pop",
        "popitem",
        "setdefault",
        "update",
        "values",
    ];
    const LIST: &[&str] = &[
        "append", "clear", "copy", "count", "extend", "index", "insert", "pop", "remove", "reverse", "sort",
    ];
    match v.kind() {
        // PY_METHODS is the str methods, then the dict and list ones; `count` and `index` are both.
        ValueKind::String => {
            crate::rewrite::PY_METHODS.contains(&name)
                && (!DICT.contains(&name) && !LIST.contains(&name) || matches!(name, "count" | "index"))
        }
        ValueKind::Map => is_dict(v) && DICT.contains(&name),
        _ if is_list(v) => LIST.contains(&name),
        _ => false,
    }
}

/// A method looked up without calling it (`schema.items`): callable, true, and with no attributes.
#[derive(Debug)]
pub(crate) struct BoundMethod {
    pub target: Value,
    pub name: String,
}

impl Object for BoundMethod {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn get_value(self: &Arc<Self>, _key: &Value) -> Option<Value> {
        None
    }

    fn call(self: &Arc<Self>, state: &State<'_, '_>, args: &[Value]) -> Result<Value, Error> {
        call_method(state, &self.target, &self.name, args)
    }

    fn is_true(self: &Arc<Self>) -> bool {
        true
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result
    where
        Self: Sized + 'static,
    {
        write!(
            f,
            "<built-in method {} of {} object>",
            self.name,
            type_name(&self.target)
        )
    }
}

/// Whether a value is a Python list: a sequence, or one of minijinja's lazy sequences (a slice, a
/// concatenation, `range`), but not a [`Generator`].
pub(crate) fn is_list(v: &Value) -> bool {
    match v.kind() {
        ValueKind::Seq => true,
        ValueKind::Iterable => v.downcast_object_ref::<Generator>().is_none(),
        _ => false,
    }
}

/// The Python type name of a value, for error messages.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v.kind() {
        ValueKind::Undefined => "Undefined",
        ValueKind::None => "NoneType",
        ValueKind::Bool => "bool",
        ValueKind::Number if v.is_integer() => "int",
        ValueKind::Number => "float",
        ValueKind::String => "str",
        ValueKind::Bytes => "bytes",
        ValueKind::Seq if is_tuple(v) => "tuple",
        ValueKind::Seq => "list",
        ValueKind::Map => "dict",
        ValueKind::Iterable if is_list(v) => "list",
        ValueKind::Iterable => "generator",
        _ => "object",
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    f64::try_from(v.clone()).ok()
}

/// `str(value)` as Python prints it (`None`, `True`, `1.0`, `['a', 1]`, `{'k': 'v'}`).
pub(crate) fn py_str(v: &Value) -> String {
    match v.kind() {
        ValueKind::String => v.as_str().unwrap_or_default().to_string(),
        ValueKind::Undefined => String::new(),
        _ => py_repr(v),
    }
}

/// `repr(value)` as Python prints it.
pub(crate) fn py_repr(v: &Value) -> String {
    let mut out = String::new();
    write_repr(v, &mut out);
    out
}

fn write_repr(v: &Value, out: &mut String) {
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number if v.is_integer() => {
            let _ = write!(out, "{v}");
        }
        ValueKind::Number => out.push_str(&py_float_repr(as_f64(v).unwrap_or(f64::NAN))),
        ValueKind::String => str_repr(v.as_str().unwrap_or_default(), out),
        _ if is_list(v) => {
            let tuple = is_tuple(v);
            out.push(if tuple { '(' } else { '[' });
            let mut n = 0;
            if let Ok(iter) = v.try_iter() {
                for (i, item) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_repr(&item, out);
                    n += 1;
                }
            }
            if tuple && n == 1 {
                out.push(',');
            }
            out.push(if tuple { ')' } else { ']' });
        }
        ValueKind::Map if is_namespace(v) => {
            out.push_str("<Namespace {");
            if let Some(pairs) = v.as_object().and_then(|o| o.try_iter_pairs()) {
                for (i, (k, item)) in pairs.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_repr(&k, out);
                    out.push_str(": ");
                    write_repr(&item, out);
                }
            }
            out.push_str("}>");
        }
        ValueKind::Map => {
            out.push('{');
            if let Some(pairs) = v.as_object().and_then(|o| o.try_iter_pairs()) {
                for (i, (k, item)) in pairs.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_repr(&k, out);
                    out.push_str(": ");
                    write_repr(&item, out);
                }
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{v}");
        }
    }
}

/// Python's `str.isprintable()` for one character, close enough for repr (no Unicode tables here).
fn is_printable(c: char) -> bool {
    let u = c as u32;
    !(u < 0x20
        || (0x7f..=0xa0).contains(&u)
        || u == 0xad
        || (0x600..=0x605).contains(&u)
        || u == 0x61c
        || u == 0x6dd
        || u == 0x70f
        || u == 0x1680
        || u == 0x180e
        || (0x2000..=0x200f).contains(&u)
        || (0x2028..=0x202f).contains(&u)
        || (0x205f..=0x2064).contains(&u)
        || (0x2066..=0x206f).contains(&u)
        || u == 0x3000
        || (0xd800..=0xf8ff).contains(&u)
        || u == 0xfeff
        || (0xfff9..=0xfffb).contains(&u)
        || u == 0xe0001
        || (0xe0020..=0xe007f).contains(&u)
        || u >= 0xf0000)
}

fn str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if is_printable(c) => out.push(c),
            c if (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (c as u32) < 0x10000 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push(quote);
}

/// `repr(float)`: the shortest round-tripping digits, in exponent form below 1e-4 and from 1e16.
pub(crate) fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{f:e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (neg, mant) = match mant.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if !(-4..16).contains(&exp) {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    } else if exp < 0 {
        out.push_str("0.");
        for _ in 0..(-exp - 1) {
            out.push('0');
        }
        out.push_str(&digits);
    } else {
        let e = exp as usize;
        if digits.len() > e + 1 {
            out.push_str(&digits[..=e]);
            out.push('.');
            out.push_str(&digits[e + 1..]);
        } else {
            out.push_str(&digits);
            for _ in 0..(e + 1 - digits.len()) {
                out.push('0');
            }
            out.push_str(".0");
        }
    }
    out
}

/// The options of Python's `json.dumps` that transformers' `tojson` filter exposes.
pub(crate) struct JsonOptions {
    pub ensure_ascii: bool,
    pub indent: Option<String>,
    pub item_sep: String,
    pub key_sep: String,
    pub sort_keys: bool,
}

/// `json.dumps(value, ...)`.
pub(crate) fn json_dumps(v: &Value, opts: &JsonOptions) -> Result<String, Error> {
    let mut out = String::new();
    json_write(v, opts, 0, &mut out)?;
    Ok(out)
}

fn json_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        py_float_repr(f)
    }
}

fn json_newline(opts: &JsonOptions, level: usize, out: &mut String) {
    if let Some(indent) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(indent);
        }
    }
}

fn json_write(v: &Value, opts: &JsonOptions, level: usize, out: &mut String) -> Result<(), Error> {
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number if v.is_integer() => {
            let _ = write!(out, "{v}");
        }
        ValueKind::Number => out.push_str(&json_float(as_f64(v).unwrap_or(f64::NAN))),
        ValueKind::String => json_str(v.as_str().unwrap_or_default(), opts.ensure_ascii, out),
        _ if is_list(v) => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            json_newline(opts, level + 1, out);
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                    json_newline(opts, level + 1, out);
                }
                json_write(item, opts, level + 1, out)?;
            }
            json_newline(opts, level, out);
            out.push(']');
        }
        ValueKind::Map if !is_namespace(v) => {
            let mut pairs: Vec<(String, Value)> = Vec::new();
            if let Some(iter) = v.as_object().and_then(|o| o.try_iter_pairs()) {
                for (k, item) in iter {
                    let key = match k.kind() {
                        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
                        ValueKind::None => "null".into(),
                        ValueKind::Bool => if k.is_true() { "true" } else { "false" }.into(),
                        ValueKind::Number if k.is_integer() => k.to_string(),
                        ValueKind::Number => json_float(as_f64(&k).unwrap_or(f64::NAN)),
                        _ => {
                            return Err(err(format!(
                                "keys must be str, int, float, bool or None, not {}",
                                type_name(&k)
                            )))
                        }
                    };
                    pairs.push((key, item));
                }
            }
            if pairs.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
            }
            out.push('{');
            json_newline(opts, level + 1, out);
            for (i, (k, item)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                    json_newline(opts, level + 1, out);
                }
                json_str(k, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                json_write(item, opts, level + 1, out)?;
            }
            json_newline(opts, level, out);
            out.push('}');
        }
        _ => {
            let name = if is_namespace(v) {
                "TemplateNamespace"
            } else {
                type_name(v)
            };
            return Err(err(format!("Object of type {name} is not JSON serializable")));
        }
    }
    Ok(())
}

fn json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Binds positional and keyword arguments to parameter names the way Python does.
pub(crate) fn bind(what: &str, args: &[Value], names: &[&str]) -> Result<Vec<Option<Value>>, Error> {
    let (positional, kwargs) = split_kwargs(args);
    if positional.len() > names.len() {
        return Err(err(format!(
            "{what}() takes at most {} arguments ({} given)",
            names.len(),
            positional.len()
        )));
    }
    let mut out: Vec<Option<Value>> = positional.iter().cloned().map(Some).collect();
    out.resize(names.len(), None);
    if let Some(kwargs) = kwargs {
        for key in kwargs.args() {
            let Some(i) = names.iter().position(|n| *n == key) else {
                return Err(err(format!("{what}() got an unexpected keyword argument '{key}'")));
            };
            if out[i].is_some() {
                return Err(err(format!("{what}() got multiple values for argument '{key}'")));
            }
            out[i] = Some(kwargs.get::<Value>(key)?);
        }
    }
    Ok(out)
}

/// Splits a call's arguments into positional ones and the trailing keyword arguments, if any.
pub(crate) fn split_kwargs(args: &[Value]) -> (&[Value], Option<Kwargs>) {
    match args.last() {
        Some(last) if last.is_kwargs() => (&args[..args.len() - 1], Kwargs::try_from(last.clone()).ok()),
        _ => (args, None),
    }
}

/// Python's `str.isspace()` for one character.
pub(crate) fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn opt_str<'a>(what: &str, v: &'a Option<Value>) -> Result<Option<&'a str>, Error> {
    match v {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| err(format!("{what} arg must be None or str, not {}", type_name(v)))),
    }
}

fn opt_int(what: &str, v: &Option<Value>, default: i64) -> Result<i64, Error> {
    match v {
        None => Ok(default),
        Some(v) if v.is_integer() || v.kind() == ValueKind::Bool => Ok(v.as_i64().unwrap_or(v.is_true() as i64)),
        Some(v) => Err(err(format!(
            "{what}: '{}' object cannot be interpreted as an integer",
            type_name(v)
        ))),
    }
}

fn req_str<'a>(what: &str, v: &'a Option<Value>) -> Result<&'a str, Error> {
    match v {
        Some(v) => v
            .as_str()
            .ok_or_else(|| err(format!("{what}() argument must be str, not {}", type_name(v)))),
        None => Err(err(format!("{what}() missing required argument"))),
    }
}

/// `s.strip(chars)` / `lstrip` / `rstrip`.
pub(crate) fn py_strip<'a>(s: &'a str, chars: Option<&str>, left: bool, right: bool) -> &'a str {
    let pred = |c: char| match chars {
        Some(chars) => chars.contains(c),
        None => is_py_space(c),
    };
    let mut s = s;
    if left {
        s = s.trim_start_matches(pred);
    }
    if right {
        s = s.trim_end_matches(pred);
    }
    s
}

/// `s.split(sep, maxsplit)`.
pub(crate) fn py_split(s: &str, sep: Option<&str>, maxsplit: i64) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    match sep {
        Some("") => return Err(err("empty separator")),
        Some(sep) => {
            let mut rest = s;
            while maxsplit < 0 || (out.len() as i64) < maxsplit {
                match rest.find(sep) {
                    Some(i) => {
                        out.push(rest[..i].to_string());
                        rest = &rest[i + sep.len()..];
                    }
                    None => break,
                }
            }
            out.push(rest.to_string());
        }
        None => {
            let mut rest = s.trim_start_matches(is_py_space);
            while !rest.is_empty() {
                if maxsplit >= 0 && out.len() as i64 >= maxsplit {
                    out.push(rest.to_string());
                    break;
                }
                let end = rest.find(is_py_space).unwrap_or(rest.len());
                out.push(rest[..end].to_string());
                rest = rest[end..].trim_start_matches(is_py_space);
            }
        }
    }
    Ok(out)
}

/// `s.rsplit(sep, maxsplit)`.
fn py_rsplit(s: &str, sep: Option<&str>, maxsplit: i64) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    match sep {
        Some("") => return Err(err("empty separator")),
        Some(sep) => {
            let mut rest = s;
            while maxsplit < 0 || (out.len() as i64) < maxsplit {
                match rest.rfind(sep) {
                    Some(i) => {
                        out.push(rest[i + sep.len()..].to_string());
                        rest = &rest[..i];
                    }
                    None => break,
                }
            }
            out.push(rest.to_string());
        }
        None => {
            let mut rest = s.trim_end_matches(is_py_space);
            while !rest.is_empty() {
                if maxsplit >= 0 && out.len() as i64 >= maxsplit {
                    out.push(rest.to_string());
                    break;
                }
                let start = rest
                    .rfind(is_py_space)
                    .map(|i| i + rest[i..].chars().next().map_or(1, char::len_utf8));
                let start = start.unwrap_or(0);
                out.push(rest[start..].to_string());
                rest = rest[..start].trim_end_matches(is_py_space);
            }
        }
    }
    out.reverse();
    Ok(out)
}

fn is_line_break(c: char) -> bool {
    matches!(
        c,
        '\n' | '\r' | '\u{b}' | '\u{c}' | '\u{1c}' | '\u{1d}' | '\u{1e}' | '\u{85}' | '\u{2028}' | '\u{2029}'
    )
}

/// `s.splitlines(keepends)`.
pub(crate) fn py_splitlines(s: &str, keepends: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if is_line_break(c) {
            let mut end = i + c.len_utf8();
            if c == '\r' {
                if let Some(&(_, '\n')) = chars.peek() {
                    chars.next();
                    end += 1;
                }
            }
            out.push(s[start..if keepends { end } else { i }].to_string());
            start = end;
        }
    }
    if start < s.len() {
        out.push(s[start..].to_string());
    }
    out
}

fn is_cased(c: char) -> bool {
    c.is_lowercase() || c.is_uppercase()
}

/// `s.title()`.
fn py_title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev_cased = false;
    for c in s.chars() {
        if prev_cased {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        prev_cased = is_cased(c);
    }
    out
}

/// `s.capitalize()`.
pub(crate) fn py_capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first
            .to_uppercase()
            .chain(chars.as_str().to_lowercase().chars())
            .collect(),
        None => String::new(),
    }
}

fn strs(items: Vec<String>) -> Value {
    Value::from(items.into_iter().map(Value::from).collect::<Vec<_>>())
}

fn prefix_match(s: &str, what: &Value, name: &str, f: fn(&str, &str) -> bool) -> Result<bool, Error> {
    if let Some(p) = what.as_str() {
        return Ok(f(s, p));
    }
    if what.kind() == ValueKind::Seq {
        for p in what.try_iter()? {
            let p = p
                .as_str()
                .ok_or_else(|| err(format!("tuple for {name} must only contain str, not {}", type_name(&p))))?;
            if f(s, p) {
                return Ok(true);
            }
        }
        return Ok(false);
    }
    Err(err(format!(
        "{name} first arg must be str or a tuple of str, not {}",
        type_name(what)
    )))
}

/// Character-index slice bounds as Python normalises them.
fn char_range(s: &str, start: &Option<Value>, end: &Option<Value>) -> Result<(usize, usize), Error> {
    let n = s.chars().count() as i64;
    let norm = |v: &Option<Value>, default: i64| -> Result<i64, Error> {
        let i = match v {
            Some(v) if !v.is_none() => opt_int("slice", &Some(v.clone()), default)?,
            _ => default,
        };
        Ok(if i < 0 { (i + n).max(0) } else { i.min(n) })
    };
    let a = norm(start, 0)?;
    let b = norm(end, n)?;
    let byte = |ci: i64| s.char_indices().nth(ci as usize).map_or(s.len(), |(b, _)| b);
    Ok((byte(a), byte(b.max(a))))
}

fn char_index(s: &str, byte: usize) -> i64 {
    s[..byte].chars().count() as i64
}

fn str_method(s: &str, method: &str, args: &[Value]) -> Result<Value, Error> {
    let a = |names: &[&str]| bind(method, args, names);
    Ok(match method {
        "strip" | "lstrip" | "rstrip" => {
            let p = a(&["chars"])?;
            let chars = opt_str(method, &p[0])?;
            Value::from(py_strip(s, chars, method != "rstrip", method != "lstrip"))
        }
        "split" | "rsplit" => {
            let p = a(&["sep", "maxsplit"])?;
            let sep = opt_str(method, &p[0])?;
            let maxsplit = opt_int(method, &p[1], -1)?;
            strs(if method == "split" {
                py_split(s, sep, maxsplit)?
            } else {
                py_rsplit(s, sep, maxsplit)?
            })
        }
        "splitlines" => {
            let p = a(&["keepends"])?;
            strs(py_splitlines(s, p[0].as_ref().is_some_and(Value::is_true)))
        }
        "startswith" | "endswith" => {
            let p = a(&["prefix", "start", "end"])?;
            let what = p[0]
                .clone()
                .ok_or_else(|| err(format!("{method}() takes at least 1 argument")))?;
            let (b0, b1) = char_range(s, &p[1], &p[2])?;
            let sub = &s[b0..b1];
            let f: fn(&str, &str) -> bool = if method == "startswith" {
                |s, p| s.starts_with(p)
            } else {
                |s, p| s.ends_with(p)
            };
            Value::from(prefix_match(sub, &what, method, f)?)
        }
        "upper" => {
            a(&[])?;
            Value::from(s.to_uppercase())
        }
        "lower" | "casefold" => {
            a(&[])?;
            Value::from(s.to_lowercase())
        }
        "title" => {
            a(&[])?;
            Value::from(py_title(s))
        }
        "capitalize" => {
            a(&[])?;
            Value::from(py_capitalize(s))
        }
        "swapcase" => {
            a(&[])?;
            let mut out = String::new();
            for c in s.chars() {
                if c.is_uppercase() {
                    out.extend(c.to_lowercase());
                } else if c.is_lowercase() {
                    out.extend(c.to_uppercase());
                } else {
                    out.push(c);
                }
            }
            Value::from(out)
        }
        "replace" => {
            let p = a(&["old", "new", "count"])?;
            let old = req_str(method, &p[0])?;
            let new = req_str(method, &p[1])?;
            let count = opt_int(method, &p[2], -1)?;
            Value::from(py_replace(s, old, new, count))
        }
        "find" | "rfind" | "index" | "rindex" | "count" => {
            let p = a(&["sub", "start", "end"])?;
            let sub = req_str(method, &p[0])?;
            let (b0, b1) = char_range(s, &p[1], &p[2])?;
            let hay = &s[b0..b1];
            if method == "count" {
                let n = if sub.is_empty() {
                    hay.chars().count() + 1
                } else {
                    hay.matches(sub).count()
                };
                return Ok(Value::from(n));
            }
            let found = if method.starts_with('r') {
                hay.rfind(sub)
            } else {
                hay.find(sub)
            };
            match found {
                Some(i) => Value::from(char_index(s, b0 + i)),
                None if method.ends_with("index") => return Err(err("substring not found")),
                None => Value::from(-1),
            }
        }
        "join" => {
            let p = a(&["iterable"])?;
            let items = p[0].clone().ok_or_else(|| err("join() takes exactly one argument"))?;
            let mut out = String::new();
            for (i, item) in items.try_iter()?.enumerate() {
                let item = item.as_str().map(str::to_string).ok_or_else(|| {
                    err(format!(
                        "sequence item {i}: expected str instance, {} found",
                        type_name(&item)
                    ))
                })?;
                if i > 0 {
                    out.push_str(s);
                }
                out.push_str(&item);
            }
            Value::from(out)
        }
        "format" => Value::from(py_format(s, args)?),
        "partition" | "rpartition" => {
            let p = a(&["sep"])?;
            let sep = req_str(method, &p[0])?;
            if sep.is_empty() {
                return Err(err("empty separator"));
            }
            let found = if method == "partition" {
                s.find(sep)
            } else {
                s.rfind(sep)
            };
            let parts = match found {
                Some(i) => [&s[..i], sep, &s[i + sep.len()..]],
                None if method == "partition" => [s, "", ""],
                None => ["", "", s],
            };
            Tuple::value(parts.iter().map(|x| Value::from(*x)).collect())
        }
        "removeprefix" | "removesuffix" => {
            let p = a(&["fix"])?;
            let fix = req_str(method, &p[0])?;
            let r = if method == "removeprefix" {
                s.strip_prefix(fix)
            } else {
                s.strip_suffix(fix)
            };
            Value::from(r.unwrap_or(s))
        }
        "isdigit" | "isnumeric" | "isdecimal" => {
            a(&[])?;
            Value::from(!s.is_empty() && s.chars().all(|c| c.is_numeric()))
        }
        "isalpha" => {
            a(&[])?;
            Value::from(!s.is_empty() && s.chars().all(char::is_alphabetic))
        }
        "isalnum" => {
            a(&[])?;
            Value::from(!s.is_empty() && s.chars().all(char::is_alphanumeric))
        }
        "isspace" => {
            a(&[])?;
            Value::from(!s.is_empty() && s.chars().all(is_py_space))
        }
        "isascii" => {
            a(&[])?;
            Value::from(s.is_ascii())
        }
        "islower" | "isupper" => {
            a(&[])?;
            let cased = s.chars().any(is_cased);
            let ok = if method == "islower" {
                !s.chars().any(char::is_uppercase)
            } else {
                !s.chars().any(char::is_lowercase)
            };
            Value::from(cased && ok)
        }
        "zfill" | "center" | "ljust" | "rjust" => {
            let p = a(&["width", "fillchar"])?;
            let width = opt_int(method, &p[0], 0)?.max(0) as usize;
            let fill = opt_str(method, &p[1])?.and_then(|f| f.chars().next()).unwrap_or(' ');
            let n = s.chars().count();
            if n >= width {
                return Ok(Value::from(s));
            }
            let pad = width - n;
            let rep = |k: usize, c: char| std::iter::repeat_n(c, k).collect::<String>();
            Value::from(match method {
                "ljust" => format!("{s}{}", rep(pad, fill)),
                "rjust" => format!("{}{s}", rep(pad, fill)),
                "center" => {
                    let left = pad / 2 + (pad & width & 1);
                    format!("{}{s}{}", rep(left, fill), rep(pad - left, fill))
                }
                _ => match s.strip_prefix(['+', '-']) {
                    Some(rest) => format!("{}{}{rest}", &s[..1], rep(pad, '0')),
                    None => format!("{}{s}", rep(pad, '0')),
                },
            })
        }
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    })
}

pub(crate) fn py_replace(s: &str, old: &str, new: &str, count: i64) -> String {
    if count < 0 {
        if old.is_empty() {
            // Python inserts `new` between every character and at both ends.
            let mut out = String::from(new);
            for c in s.chars() {
                out.push(c);
                out.push_str(new);
            }
            return out;
        }
        return s.replace(old, new);
    }
    if old.is_empty() {
        let mut out = String::new();
        let mut n = 0;
        for c in s.chars() {
            if n < count {
                out.push_str(new);
                n += 1;
            }
            out.push(c);
        }
        if n < count {
            out.push_str(new);
        }
        return out;
    }
    s.replacen(old, new, count as usize)
}

/// `str.format(*args, **kwargs)` for the common field forms: `{}`, `{0}`, `{name}`, `{0.attr}`, `{0[key]}`,
/// `!r` / `!s`, and a format spec of fill, alignment, sign, width and precision with types `s d f e %`.
fn py_format(s: &str, args: &[Value]) -> Result<String, Error> {
    let (positional, kwargs) = split_kwargs(args);
    let mut out = String::new();
    let mut auto = 0usize;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' if matches!(chars.peek(), Some((_, '{'))) => {
                chars.next();
                out.push('{');
            }
            '}' if matches!(chars.peek(), Some((_, '}'))) => {
                chars.next();
                out.push('}');
            }
            '}' => return Err(err("Single '}' encountered in format string")),
            '{' => {
                let rest = &s[i + 1..];
                let end = rest.find('}').ok_or_else(|| err("expected '}' before end of string"))?;
                let field = &rest[..end];
                for _ in 0..field.chars().count() + 1 {
                    chars.next();
                }
                let (field, spec) = match field.split_once(':') {
                    Some((f, sp)) => (f, sp),
                    None => (field, ""),
                };
                let (field, conv) = match field.split_once('!') {
                    Some((f, cv)) => (f, Some(cv)),
                    None => (field, None),
                };
                let name_end = field.find(['.', '[']).unwrap_or(field.len());
                let (name, mut path) = field.split_at(name_end);
                let mut value = if name.is_empty() {
                    auto += 1;
                    positional
                        .get(auto - 1)
                        .cloned()
                        .ok_or_else(|| err("Replacement index out of range"))?
                } else if let Ok(idx) = name.parse::<usize>() {
                    positional
                        .get(idx)
                        .cloned()
                        .ok_or_else(|| err("Replacement index out of range"))?
                } else {
                    kwargs
                        .as_ref()
                        .and_then(|k| k.get::<Value>(name).ok())
                        .ok_or_else(|| err(format!("KeyError: '{name}'")))?
                };
                while !path.is_empty() {
                    if let Some(rest) = path.strip_prefix('.') {
                        let e = rest.find(['.', '[']).unwrap_or(rest.len());
                        value = value.get_attr(&rest[..e])?;
                        path = &rest[e..];
                    } else if let Some(rest) = path.strip_prefix('[') {
                        let e = rest.find(']').ok_or_else(|| err("Missing ']' in format string"))?;
                        let key = &rest[..e];
                        value = match key.parse::<i64>() {
                            Ok(n) => value.get_item(&Value::from(n))?,
                            Err(_) => value.get_item(&Value::from(key))?,
                        };
                        path = &rest[e + 1..];
                    } else {
                        return Err(err("Only '.' or '[' may follow ']' in format field specifier"));
                    }
                }
                if value.is_undefined() {
                    return Err(err("format field is undefined"));
                }
                let value = match conv {
                    Some("r") | Some("a") => Value::from(py_repr(&value)),
                    Some("s") => Value::from(py_str(&value)),
                    Some(c) => return Err(err(format!("Unknown conversion specifier {c}"))),
                    None => value,
                };
                out.push_str(&format_spec(&value, spec)?);
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

fn format_spec(v: &Value, spec: &str) -> Result<String, Error> {
    if spec.is_empty() {
        return Ok(py_str(v));
    }
    let chars: Vec<char> = spec.chars().collect();
    let mut i = 0;
    let (mut fill, mut align) = (' ', None);
    if chars.len() >= 2 && matches!(chars[1], '<' | '>' | '^' | '=') {
        fill = chars[0];
        align = Some(chars[1]);
        i = 2;
    } else if matches!(chars.first(), Some('<' | '>' | '^' | '=')) {
        align = Some(chars[0]);
        i = 1;
    }
    let mut sign = '-';
    if i < chars.len() && matches!(chars[i], '+' | '-' | ' ') {
        sign = chars[i];
        i += 1;
    }
    if i < chars.len() && chars[i] == '0' {
        if align.is_none() {
            fill = '0';
            align = Some('=');
        }
        i += 1;
    }
    let mut width = 0usize;
    while i < chars.len() && chars[i].is_ascii_digit() {
        width = width * 10 + chars[i].to_digit(10).unwrap_or(0) as usize;
        i += 1;
    }
    let mut precision = None;
    if i < chars.len() && chars[i] == '.' {
        i += 1;
        let mut p = 0usize;
        while i < chars.len() && chars[i].is_ascii_digit() {
            p = p * 10 + chars[i].to_digit(10).unwrap_or(0) as usize;
            i += 1;
        }
        precision = Some(p);
    }
    let ty = chars.get(i).copied();
    let is_num = v.kind() == ValueKind::Number || v.kind() == ValueKind::Bool;
    let body = match (ty, is_num) {
        (Some('f' | 'F' | '%' | 'e' | 'E'), true) => {
            let f = as_f64(v).unwrap_or(0.0);
            let p = precision.unwrap_or(6);
            match ty {
                Some('%') => format!("{:.p$}%", f * 100.0),
                Some('e') => py_exp(f, p, false),
                Some('E') => py_exp(f, p, true),
                _ => format!("{f:.p$}"),
            }
        }
        (Some('d'), true) if v.is_integer() => v.to_string(),
        (None | Some('s'), _) => {
            let s = py_str(v);
            match precision {
                Some(p) if !is_num => s.chars().take(p).collect(),
                _ => s,
            }
        }
        _ => {
            return Err(err(format!(
                "Unknown format code '{}' for object of type '{}'",
                spec,
                type_name(v)
            )))
        }
    };
    let body = if is_num && sign != '-' && !body.starts_with('-') {
        format!("{sign}{body}")
    } else {
        body
    };
    let n = body.chars().count();
    if n >= width {
        return Ok(body);
    }
    let pad = width - n;
    let rep = |k: usize| std::iter::repeat_n(fill, k).collect::<String>();
    let align = align.unwrap_or(if is_num { '>' } else { '<' });
    Ok(match align {
        '<' => format!("{body}{}", rep(pad)),
        '^' => format!("{}{body}{}", rep(pad / 2), rep(pad - pad / 2)),
        '=' if body.starts_with(['+', '-', ' ']) => format!("{}{}{}", &body[..1], rep(pad), &body[1..]),
        _ => format!("{}{body}", rep(pad)),
    })
}

fn py_exp(f: f64, p: usize, upper: bool) -> String {
    let s = format!("{f:.p$e}");
    let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
    let e: i32 = e.parse().unwrap_or(0);
    let out = format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    if upper {
        out.to_uppercase()
    } else {
        out
    }
}

fn map_method(v: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    let a = |names: &[&str]| bind(method, args, names);
    let obj = v.as_object().ok_or_else(|| Error::from(ErrorKind::UnknownMethod))?;
    Ok(match method {
        "get" => {
            let p = a(&["key", "default"])?;
            let key = p[0]
                .clone()
                .ok_or_else(|| err("get expected at least 1 argument, got 0"))?;
            match obj.get_value(&key) {
                Some(found) if !found.is_undefined() => found,
                _ => p[1].clone().unwrap_or(Value::from(())),
            }
        }
        "items" => {
            a(&[])?;
            let pairs: Vec<Value> = obj
                .try_iter_pairs()
                .into_iter()
                .flatten()
                .map(|(k, v)| Tuple::value(vec![k, v]))
                .collect();
            Value::from(pairs)
        }
        "keys" => {
            a(&[])?;
            Value::from(obj.try_iter().into_iter().flatten().collect::<Vec<_>>())
        }
        "values" => {
            a(&[])?;
            Value::from(
                obj.try_iter_pairs()
                    .into_iter()
                    .flatten()
                    .map(|(_, v)| v)
                    .collect::<Vec<_>>(),
            )
        }
        "copy" => {
            a(&[])?;
            v.clone()
        }
        "pop" | "popitem" | "setdefault" | "update" | "clear" | "__setitem__" | "__delitem__" => {
            return Err(err(format!(
                "access to attribute '{method}' of 'dict' object is unsafe."
            )))
        }
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    })
}

fn list_method(v: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    let a = |names: &[&str]| bind(method, args, names);
    Ok(match method {
        "count" => {
            let p = a(&["value"])?;
            let what = p[0].clone().unwrap_or_default();
            Value::from(v.try_iter()?.filter(|x| *x == what).count())
        }
        "index" => {
            let p = a(&["value"])?;
            let what = p[0].clone().unwrap_or_default();
            match v.try_iter()?.position(|x| x == what) {
                Some(i) => Value::from(i),
                None => return Err(err(format!("{} is not in list", py_repr(&what)))),
            }
        }
        "copy" => {
            a(&[])?;
            v.clone()
        }
        "append" | "extend" | "insert" | "pop" | "remove" | "clear" | "sort" | "reverse" => {
            return Err(err(format!(
                "access to attribute '{method}' of 'list' object is unsafe."
            )))
        }
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    })
}

/// A Python `str` method called on `s`.
pub(crate) fn call_method_str(s: &str, method: &str, args: &[Value]) -> Result<Value, Error> {
    str_method(s, method, args)
}

/// The unknown-method callback: Python's `str`, `dict` and `list` methods.
pub(crate) fn call_method(_state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    match value.kind() {
        ValueKind::String => str_method(value.as_str().unwrap_or_default(), method, args),
        ValueKind::Map if is_dict(value) => map_method(value, method, args),
        _ if is_list(value) => list_method(value, method, args),
        _ => Err(Error::from(ErrorKind::UnknownMethod)),
    }
}

/// Python's `\w` for one character.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// textwrap's `letter`: `[^\d\W]`.
fn is_letter(c: char) -> bool {
    is_word(c) && !c.is_numeric()
}

/// textwrap's `word_punct`: `[\w!"'&.,?]`.
fn is_word_punct(c: char) -> bool {
    is_word(c) || "!\"'&.,?".contains(c)
}

fn is_wrap_space(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\u{b}' | '\u{c}' | '\r' | ' ')
}

/// `TextWrapper._split`: whitespace runs and words, words split after hyphens (`wordsep_re`) or not
/// (`wordsep_simple_re`).
fn wrap_chunks_of(text: &str, break_on_hyphens: bool) -> Vec<String> {
    let t: Vec<char> = text.chars().collect();
    let n = t.len();
    let dashes_then_word = |k: usize| {
        let mut j = k;
        while j < n && t[j] == '-' {
            j += 1;
        }
        j - k >= 2 && j < n && is_word(t[j])
    };
    let mut chunks = Vec::new();
    let mut i = 0;
    while i < n {
        let start = i;
        if is_wrap_space(t[i]) {
            while i < n && is_wrap_space(t[i]) {
                i += 1;
            }
        } else if !break_on_hyphens {
            while i < n && !is_wrap_space(t[i]) {
                i += 1;
            }
        } else if t[i] == '-' && i > 0 && is_word_punct(t[i - 1]) && dashes_then_word(i) {
            while i < n && t[i] == '-' {
                i += 1;
            }
        } else {
            // `nws+?` followed by a breaking hyphen, the end of the word, or an em-dash.
            let mut k = i + 1;
            loop {
                if k < n && t[k] == '-' {
                    let before = (k >= 2 && is_letter(t[k - 1]) && is_letter(t[k - 2]))
                        || (k >= 3 && is_letter(t[k - 1]) && t[k - 2] == '-' && is_letter(t[k - 3]));
                    let after = k + 1 < n
                        && is_letter(t[k + 1])
                        && ((k + 2 < n && is_letter(t[k + 2]))
                            || (k + 3 < n && t[k + 2] == '-' && is_letter(t[k + 3])));
                    if before && after {
                        k += 1;
                        break;
                    }
                }
                if k >= n || is_wrap_space(t[k]) {
                    break;
                }
                if is_word_punct(t[k - 1]) && dashes_then_word(k) {
                    break;
                }
                k += 1;
            }
            i = k;
        }
        chunks.push(t[start..i].iter().collect());
    }
    chunks
}

/// `textwrap.wrap(text, width, expand_tabs=False, replace_whitespace=False, break_long_words,
/// break_on_hyphens)`.
pub(crate) fn textwrap(text: &str, width: usize, break_long_words: bool, break_on_hyphens: bool) -> Vec<String> {
    let len = |s: &str| s.chars().count();
    let blank = |s: &str| s.chars().all(is_py_space);
    let mut chunks = wrap_chunks_of(text, break_on_hyphens);
    chunks.reverse();
    let mut lines: Vec<String> = Vec::new();
    while !chunks.is_empty() {
        let mut cur: Vec<String> = Vec::new();
        let mut cur_len = 0;
        if chunks.last().is_some_and(|c| blank(c)) && !lines.is_empty() {
            chunks.pop();
        }
        while let Some(last) = chunks.last() {
            let l = len(last);
            if cur_len + l <= width {
                cur_len += l;
                cur.push(chunks.pop().unwrap_or_default());
            } else {
                break;
            }
        }
        if chunks.last().is_some_and(|c| len(c) > width) {
            let space_left = if width < 1 { 1 } else { width - cur_len };
            if break_long_words {
                let chunk: Vec<char> = chunks.last().map(|c| c.chars().collect()).unwrap_or_default();
                let mut end = space_left;
                if break_on_hyphens && chunk.len() > space_left {
                    if let Some(h) = chunk[..space_left].iter().rposition(|c| *c == '-') {
                        if h > 0 && chunk[..h].iter().any(|c| *c != '-') {
                            end = h + 1;
                        }
                    }
                }
                cur.push(chunk[..end].iter().collect());
                if let Some(last) = chunks.last_mut() {
                    *last = chunk[end..].iter().collect();
                }
            } else if cur.is_empty() {
                cur.push(chunks.pop().unwrap_or_default());
            }
        }
        if cur.last().is_some_and(|c| blank(c)) {
            cur.pop();
        }
        if !cur.is_empty() {
            lines.push(cur.concat());
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        for (f, s) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (123456789.125, "123456789.125"),
            (-2.5, "-2.5"),
            (1e15, "1000000000000000.0"),
        ] {
            assert_eq!(py_float_repr(f), s);
        }
    }

    #[test]
    fn split_matches_python() {
        assert_eq!(py_split("  a  b c ", None, -1).unwrap(), ["a", "b", "c"]);
        assert_eq!(py_split("  a  b c ", None, 1).unwrap(), ["a", "b c "]);
        assert_eq!(py_split("a,b,,c", Some(","), -1).unwrap(), ["a", "b", "", "c"]);
        assert_eq!(py_rsplit("a,b,c", Some(","), 1).unwrap(), ["a,b", "c"]);
        assert_eq!(py_rsplit(" a b  c ", None, 1).unwrap(), [" a b", "c"]);
        assert_eq!(py_splitlines("a\r\nb\n\nc", false), ["a", "b", "", "c"]);
    }

    #[test]
    fn repr_matches_python() {
        let v = Value::from_serialize(serde_json::json!({"a": [1, 2.5, null, true, "it's"], "b": "x\ny"}));
        assert_eq!(py_repr(&v), r#"{'a': [1, 2.5, None, True, "it's"], 'b': 'x\ny'}"#);
    }
}
