//! Python's meaning of the operators the source rewrite (see `rewrite.rs`) turns into calls:
//! `a + b`, `a ~ b`, `a % b`, `a * b`, and the iterable of a `{% for %}`.

use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind};

use crate::py::{self, err, is_list, py_repr, py_str, type_name};

/// A number as Python sees it: booleans are integers.
enum Num {
    Int(i128),
    Float(f64),
}

fn num(v: &Value) -> Option<Num> {
    match v.kind() {
        ValueKind::Bool => Some(Num::Int(v.is_true() as i128)),
        ValueKind::Number if v.is_integer() => i128::try_from(v.clone()).ok().map(Num::Int),
        ValueKind::Number => f64::try_from(v.clone()).ok().map(Num::Float),
        _ => None,
    }
}

fn float(n: &Num) -> f64 {
    match *n {
        Num::Int(i) => i as f64,
        Num::Float(f) => f,
    }
}

fn int_value(i: i128) -> Value {
    match i64::try_from(i) {
        Ok(i) => Value::from(i),
        Err(_) => Value::from(i),
    }
}

fn undefined_check(a: &Value, b: &Value) -> Result<(), Error> {
    if a.is_undefined() || b.is_undefined() {
        return Err(Error::new(
            ErrorKind::UndefinedError,
            "an undefined value was used in an operation",
        ));
    }
    Ok(())
}

fn unsupported(op: &str, a: &Value, b: &Value) -> Error {
    err(format!(
        "unsupported operand type(s) for {op}: '{}' and '{}'",
        type_name(a),
        type_name(b)
    ))
}

/// markupsafe's `escape`.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&#39;"),
            '"' => out.push_str("&#34;"),
            c => out.push(c),
        }
    }
    out
}

/// `a + b`. A `Markup` (a `|safe` string) escapes the plain string it is added to.
pub(crate) fn add(a: Value, b: Value) -> Result<Value, Error> {
    undefined_check(&a, &b)?;
    if let (Some(x), Some(y)) = (num(&a), num(&b)) {
        return Ok(match (x, y) {
            (Num::Int(x), Num::Int(y)) => int_value(x.checked_add(y).ok_or_else(|| err("integer overflow"))?),
            (x, y) => Value::from(float(&x) + float(&y)),
        });
    }
    if let (Some(x), Some(y)) = (a.as_str(), b.as_str()) {
        return Ok(match (a.is_safe(), b.is_safe()) {
            (false, false) => Value::from([x, y].concat()),
            (true, true) => Value::from_safe_string([x, y].concat()),
            (true, false) => Value::from_safe_string(format!("{x}{}", escape(y))),
            (false, true) => Value::from_safe_string(format!("{}{y}", escape(x))),
        });
    }
    if is_list(&a) && is_list(&b) {
        let mut items: Vec<Value> = a.try_iter()?.collect();
        items.extend(b.try_iter()?);
        return Ok(Value::from(items));
    }
    if a.kind() == ValueKind::String {
        return Err(err(format!(
            "can only concatenate str (not \"{}\") to str",
            type_name(&b)
        )));
    }
    if is_list(&a) {
        return Err(err(format!(
            "can only concatenate list (not \"{}\") to list",
            type_name(&b)
        )));
    }
    Err(unsupported("+", &a, &b))
}

/// `a ~ b`: `str(a) + str(b)`.
pub(crate) fn concat(a: Value, b: Value) -> Value {
    Value::from(py_str(&a) + &py_str(&b))
}

/// `a * b`.
pub(crate) fn mul(a: Value, b: Value) -> Result<Value, Error> {
    undefined_check(&a, &b)?;
    if let (Some(x), Some(y)) = (num(&a), num(&b)) {
        return Ok(match (x, y) {
            (Num::Int(x), Num::Int(y)) => int_value(x.checked_mul(y).ok_or_else(|| err("integer overflow"))?),
            (x, y) => Value::from(float(&x) * float(&y)),
        });
    }
    let (seq, n) = match (num(&a), num(&b)) {
        (None, Some(Num::Int(n))) => (&a, n),
        (Some(Num::Int(n)), None) => (&b, n),
        _ => return Err(unsupported("*", &a, &b)),
    };
    let n = n.max(0) as usize;
    if let Some(s) = seq.as_str() {
        let out = s.repeat(n);
        return Ok(if seq.is_safe() {
            Value::from_safe_string(out)
        } else {
            Value::from(out)
        });
    }
    if is_list(seq) {
        let items: Vec<Value> = seq.try_iter()?.collect();
        let mut out = Vec::with_capacity(items.len() * n);
        for _ in 0..n {
            out.extend(items.iter().cloned());
        }
        return Ok(Value::from(out));
    }
    Err(unsupported("*", &a, &b))
}

/// `a % b`: Python's modulo (the sign of the divisor), or printf-style string formatting.
pub(crate) fn modulo(a: Value, b: Value) -> Result<Value, Error> {
    undefined_check(&a, &b)?;
    if let (Some(x), Some(y)) = (num(&a), num(&b)) {
        return match (x, y) {
            (Num::Int(_), Num::Int(0)) => Err(err("integer modulo by zero")),
            (Num::Int(x), Num::Int(y)) => Ok(int_value(
                x.rem_euclid(y) + if y < 0 && x.rem_euclid(y) != 0 { y } else { 0 },
            )),
            (x, y) => {
                let (x, y) = (float(&x), float(&y));
                if y == 0.0 {
                    return Err(err("float modulo"));
                }
                let mut r = x % y;
                if r != 0.0 && ((r < 0.0) != (y < 0.0)) {
                    r += y;
                }
                Ok(Value::from(r))
            }
        };
    }
    if let Some(fmt) = a.as_str() {
        let out = printf(fmt, &b)?;
        return Ok(if a.is_safe() {
            Value::from_safe_string(out)
        } else {
            Value::from(out)
        });
    }
    Err(unsupported("%", &a, &b))
}

/// `fmt % args` (printf-style): `%[(key)][flags][width][.precision]type`.
fn printf(fmt: &str, args: &Value) -> Result<String, Error> {
    let positional: Vec<Value> = if args.kind() == ValueKind::Seq {
        args.try_iter()?.collect()
    } else {
        vec![args.clone()]
    };
    let mut next = 0usize;
    let mut used_key = false;
    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut value = None;
        if chars.peek() == Some(&'(') {
            chars.next();
            let key: String = chars.by_ref().take_while(|c| *c != ')').collect();
            value = Some(args.get_item(&Value::from(key.as_str()))?);
            used_key = true;
        }
        let mut flags = String::new();
        while let Some(&f) = chars.peek() {
            if "-+ #0".contains(f) {
                flags.push(f);
                chars.next();
            } else {
                break;
            }
        }
        let mut width = String::new();
        while let Some(&d) = chars.peek().filter(|d| d.is_ascii_digit()) {
            width.push(d);
            chars.next();
        }
        let mut precision = None;
        if chars.peek() == Some(&'.') {
            chars.next();
            let mut p = String::new();
            while let Some(&d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                p.push(d);
                chars.next();
            }
            precision = Some(p.parse::<usize>().unwrap_or(0));
        }
        let ty = chars.next().ok_or_else(|| err("incomplete format"))?;
        if ty == '%' {
            out.push('%');
            continue;
        }
        let value = match value {
            Some(v) => v,
            None => {
                let v = positional
                    .get(next)
                    .cloned()
                    .ok_or_else(|| err("not enough arguments for format string"))?;
                next += 1;
                v
            }
        };
        let body = match ty {
            's' => {
                let s = py_str(&value);
                precision.map_or(s.clone(), |p| s.chars().take(p).collect())
            }
            'r' | 'a' => py_repr(&value),
            'd' | 'i' | 'u' => match num(&value) {
                Some(Num::Int(i)) => i.to_string(),
                Some(Num::Float(f)) => (f.trunc() as i128).to_string(),
                None => {
                    return Err(err(format!(
                        "%{ty} format: a real number is required, not {}",
                        type_name(&value)
                    )))
                }
            },
            'x' | 'X' | 'o' => match num(&value) {
                Some(Num::Int(i)) => {
                    let s = match ty {
                        'x' => format!("{:x}", i.unsigned_abs()),
                        'X' => format!("{:X}", i.unsigned_abs()),
                        _ => format!("{:o}", i.unsigned_abs()),
                    };
                    if i < 0 {
                        format!("-{s}")
                    } else {
                        s
                    }
                }
                _ => {
                    return Err(err(format!(
                        "%{ty} format: an integer is required, not {}",
                        type_name(&value)
                    )))
                }
            },
            'f' | 'F' | 'e' | 'E' | 'g' | 'G' => {
                let f = num(&value)
                    .map(|n| float(&n))
                    .ok_or_else(|| err(format!("must be real number, not {}", type_name(&value))))?;
                let p = precision.unwrap_or(6);
                match ty {
                    'f' | 'F' => format!("{f:.p$}"),
                    'e' | 'E' => {
                        let s = format!("{f:.p$e}");
                        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
                        let e: i32 = e.parse().unwrap_or(0);
                        let s = format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
                        if ty == 'E' {
                            s.to_uppercase()
                        } else {
                            s
                        }
                    }
                    _ => py::py_float_repr(f),
                }
            }
            'c' => match (num(&value), value.as_str()) {
                (Some(Num::Int(i)), _) => char::from_u32(i as u32).map(String::from).unwrap_or_default(),
                (_, Some(s)) if s.chars().count() == 1 => s.to_string(),
                _ => return Err(err("%c requires int or char")),
            },
            other => return Err(err(format!("unsupported format character '{other}'"))),
        };
        let numeric = matches!(
            ty,
            'd' | 'i' | 'u' | 'x' | 'X' | 'o' | 'f' | 'F' | 'e' | 'E' | 'g' | 'G'
        );
        let body = if numeric && !body.starts_with('-') {
            if flags.contains('+') {
                format!("+{body}")
            } else if flags.contains(' ') {
                format!(" {body}")
            } else {
                body
            }
        } else {
            body
        };
        let width: usize = width.parse().unwrap_or(0);
        let n = body.chars().count();
        if n >= width {
            out.push_str(&body);
        } else if flags.contains('-') {
            out.push_str(&body);
            out.push_str(&" ".repeat(width - n));
        } else if flags.contains('0') && numeric {
            let (sign, digits) = match body.strip_prefix(['-', '+', ' ']) {
                Some(rest) => (&body[..1], rest),
                None => ("", body.as_str()),
            };
            out.push_str(sign);
            out.push_str(&"0".repeat(width - n));
            out.push_str(digits);
        } else {
            out.push_str(&" ".repeat(width - n));
            out.push_str(&body);
        }
    }
    if !used_key && args.kind() == ValueKind::Seq && next < positional.len() {
        return Err(err("not all arguments converted during string formatting"));
    }
    Ok(out)
}

/// `a / b`: true division, always a float.
pub(crate) fn div(a: Value, b: Value) -> Result<Value, Error> {
    undefined_check(&a, &b)?;
    match (num(&a), num(&b)) {
        (Some(x), Some(y)) => {
            if float(&y) == 0.0 {
                return Err(err("division by zero"));
            }
            Ok(Value::from(float(&x) / float(&y)))
        }
        _ => Err(unsupported("/", &a, &b)),
    }
}

/// `a // b`: floor division.
pub(crate) fn floordiv(a: Value, b: Value) -> Result<Value, Error> {
    undefined_check(&a, &b)?;
    match (num(&a), num(&b)) {
        (Some(Num::Int(_)), Some(Num::Int(0))) => Err(err("integer division or modulo by zero")),
        (Some(Num::Int(x)), Some(Num::Int(y))) => {
            let q = x / y;
            Ok(int_value(if (x % y != 0) && ((x < 0) != (y < 0)) { q - 1 } else { q }))
        }
        (Some(x), Some(y)) => {
            let (x, y) = (float(&x), float(&y));
            if y == 0.0 {
                return Err(err("float floor division by zero"));
            }
            Ok(Value::from((x / y).floor()))
        }
        _ => Err(unsupported("//", &a, &b)),
    }
}

/// `a ** b`.
pub(crate) fn pow(a: Value, b: Value) -> Result<Value, Error> {
    undefined_check(&a, &b)?;
    match (num(&a), num(&b)) {
        (Some(Num::Int(x)), Some(Num::Int(y))) if y >= 0 => {
            let y = u32::try_from(y).map_err(|_| err("exponent too large"))?;
            Ok(int_value(x.checked_pow(y).ok_or_else(|| err("integer overflow"))?))
        }
        (Some(Num::Int(0)), Some(Num::Int(_))) => Err(err("0.0 cannot be raised to a negative power")),
        (Some(x), Some(y)) => Ok(Value::from(float(&x).powf(float(&y)))),
        _ => Err(unsupported("** or pow()", &a, &b)),
    }
}

/// The iterable of a `{% for %}`: Python cannot iterate `None`, numbers or booleans.
pub(crate) fn iter(v: Value) -> Result<Value, Error> {
    match v.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Number => {
            Err(err(format!("'{}' object is not iterable", type_name(&v))))
        }
        _ => Ok(v),
    }
}
