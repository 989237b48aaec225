//! Source rewrites that give minijinja jinja2's semantics where configuration cannot:
//!
//! * `{% generation %}...{% endgeneration %}` (transformers' `AssistantTracker` tag, which renders its
//!   body in a scope of its own) becomes `{% with %}...{% endwith %}`;
//! * the binary operators whose Python meaning differs from minijinja's (`+ ~ % * ** / //`) become
//!   calls of functions with the Python meaning (`Markup` escaping in `+`, `str()` in `~`, printf in
//!   `%`, floor semantics, ...);
//! * the iterable of every `{% for %}` goes through a function that rejects what Python cannot
//!   iterate (`None`, numbers);
//! * `x.NAME` and `x.NAME(...)` for the names of Python's str / dict / list methods go through
//!   functions, so a dict key never shadows a method (`schema.items`, `props.items()`);
//! * `(a, b)` becomes a tuple (it prints as one); `-x.y` gets jinja2's `-(x.y)` grouping; string
//!   literals with backslashes are decoded as Python decodes them; `varargs` / `kwargs` in a macro are
//!   empty; a constant `'' and 'x'` is not folded to `false`.
//!
//! The rewrite parses the template with minijinja's own parser and edits the source at the parsed
//! spans, so only expressions change; no newline is added, so line numbers stay the same.

use minijinja::machinery::ast::{self, BinOpKind, CallArg, Expr, Stmt};
use minijinja::machinery::{parse, Span, WhitespaceConfig};
use minijinja::syntax::SyntaxConfig;
use minijinja::Error;

pub(crate) const ADD: &str = "__kiln_add";
pub(crate) const CONCAT: &str = "__kiln_concat";
pub(crate) const MOD: &str = "__kiln_mod";
pub(crate) const MUL: &str = "__kiln_mul";
pub(crate) const ITER: &str = "__kiln_iter";
pub(crate) const POW: &str = "__kiln_pow";
pub(crate) const TUPLE: &str = "__kiln_tuple";
pub(crate) const ID: &str = "__kiln_id";
pub(crate) const DIV: &str = "__kiln_div";
pub(crate) const FLOORDIV: &str = "__kiln_floordiv";
pub(crate) const METHOD: &str = "__kiln_method";
pub(crate) const ATTR: &str = "__kiln_attr";

/// The names of Python's `str`, `dict` and `list` methods. In jinja2 `x.NAME` on such a value is the
/// method even where a dict has a key NAME (`schema.items` is `dict.items`, not the `"items"` key), and
/// `x.NAME(...)` always calls the method; so these attribute lookups and calls go through functions.
#[rustfmt::skip]
pub(crate) const PY_METHODS: &[&str] = &[
    // str
    "capitalize", "casefold", "center", "count", "encode", "endswith", "expandtabs", "find", "format",
    "format_map", "index", "isalnum", "isalpha", "isascii", "isdecimal", "isdigit", "isidentifier", "islower",
    "isnumeric", "isprintable", "isspace", "istitle", "isupper", "join", "ljust", "lower", "lstrip", "maketrans",
    "partition", "removeprefix", "removesuffix", "replace", "rfind", "rindex", "rjust", "rpartition", "rsplit",
    "rstrip", "split", "splitlines", "startswith", "strip", "swapcase", "title", "translate", "upper", "zfill",
    // dict
    "clear", "copy", "fromkeys", "get", "items", "keys", "pop", "popitem", "setdefault", "update", "values",
    // list
    "append", "extend", "insert", "remove", "reverse", "sort",
];

/// Rewrites a chat template's source; a syntax error is reported for the template as written
/// (same lines).
pub(crate) fn rewrite(name: &str, source: &str) -> Result<String, Error> {
    let source = rewrite_generation_tags(source);
    let ws = WhitespaceConfig {
        keep_trailing_newline: false,
        lstrip_blocks: true,
        trim_blocks: true,
    };
    // A unit struct unless minijinja's `custom_syntax` feature is on somewhere in the build.
    #[allow(clippy::default_constructed_unit_structs)]
    let syntax = SyntaxConfig::default();
    let ast = parse(&source, name, syntax, ws)?;
    let mut edits = Edits {
        src: &source,
        list: Vec::new(),
        negs: Vec::new(),
        macro_params: Vec::new(),
    };
    edits.stmt(&ast);
    Ok(edits.apply())
}

/// An edit at a source offset. At one offset they apply in this order: calls closing there, calls
/// opening there, then the replacement of the text starting there.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// `)` closing a call; among several at one offset the innermost (shortest) node closes first.
    Close(usize),
    /// `name(` opening a call that closes at the given offset; among several at one offset the one
    /// closing last (the outermost) opens first.
    Open(std::cmp::Reverse<usize>),
    /// Replaces this many bytes (an operator by `,`, a string literal by its re-encoding, ...).
    Operator(usize),
}

struct Edits<'s> {
    src: &'s str,
    list: Vec<(usize, Kind, String)>,
    /// Unary minus operators already given parentheses (their offsets).
    negs: Vec<usize>,
    /// The parameter names of the macros being walked (innermost last).
    macro_params: Vec<Vec<String>>,
}

impl Edits<'_> {
    fn wrap(&mut self, span: Span, func: &str) {
        self.wrap_range(span.start_offset as usize, span.end_offset as usize, func);
    }

    fn wrap_range(&mut self, start: usize, end: usize, func: &str) {
        let len = end - start;
        self.list
            .push((start, Kind::Open(std::cmp::Reverse(end)), format!("{func}(")));
        self.list.push((end, Kind::Close(len), ")".to_string()));
    }

    fn apply(mut self) -> String {
        self.list.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut out = String::with_capacity(self.src.len() + self.list.len() * 8);
        let mut cursor = 0;
        for (pos, kind, text) in &self.list {
            out.push_str(&self.src[cursor..*pos]);
            out.push_str(text);
            cursor = *pos + if let Kind::Operator(n) = kind { *n } else { 0 };
        }
        out.push_str(&self.src[cursor..]);
        out
    }

    /// The source range of a whole expression. A node's own span can start at its last part (a
    /// filter's span starts at the filter name), so this takes the union with its children's ranges
    /// and widens it over the parentheses around a child.
    fn extent(&self, expr: &Expr) -> (usize, usize) {
        let (mut start, mut end) = raw_extent(expr);
        let b = self.src.as_bytes();
        let (mut depth, mut min_depth) = (0i32, 0i32);
        let mut i = start;
        while i < end {
            match b[i] {
                q @ (b'"' | b'\'') => {
                    i += 1;
                    while i < end && b[i] != q {
                        i += if b[i] == b'\\' { 2 } else { 1 };
                    }
                }
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => {
                    depth -= 1;
                    min_depth = min_depth.min(depth);
                }
                _ => {}
            }
            i += 1;
        }
        for _ in 0..-min_depth {
            while start > 0 && b[start - 1].is_ascii_whitespace() {
                start -= 1;
            }
            if start > 0 && b[start - 1] == b'(' {
                start -= 1;
            }
        }
        for _ in 0..(depth - min_depth) {
            while end < b.len() && b[end].is_ascii_whitespace() {
                end += 1;
            }
            if end < b.len() && b[end] == b')' {
                end += 1;
            }
        }
        (start, end)
    }

    /// minijinja parses `-x.y` (also `-x[0]`, `-f()`, `-x[1:]`) as `(-x).y`; jinja2 as `-(x.y)`.
    /// Given the outermost postfix node of such a chain, adds the parentheses jinja2 implies.
    fn neg_postfix(&mut self, outer: &Expr) {
        let mut base = outer;
        loop {
            base = match base {
                Expr::GetAttr(g) => &g.expr,
                Expr::GetItem(g) => &g.expr,
                Expr::Call(c) => &c.expr,
                Expr::Slice(s) => &s.expr,
                _ => break,
            };
        }
        let Expr::UnaryOp(u) = base else { return };
        if !matches!(u.op, ast::UnaryOpKind::Neg) {
            return;
        }
        let minus = u.span().start_offset as usize;
        if self.src.as_bytes().get(minus) != Some(&b'-') || self.negs.contains(&minus) {
            return;
        }
        // `(-x).y` written with parentheses is what it says.
        let after = raw_extent(&u.expr).1;
        if self.src[after..].trim_start().starts_with(')') {
            return;
        }
        self.negs.push(minus);
        let end = raw_extent(outer).1;
        self.list
            .push((minus + 1, Kind::Open(std::cmp::Reverse(end)), "(".to_string()));
        self.list.push((end, Kind::Close(end - minus), ")".to_string()));
    }

    /// A string literal with a backslash is decoded as Python's `unicode-escape` codec decodes it
    /// (what jinja2 does: `\/` stays `\/`, `\U0001F600`, `\a`, `\v`, `\N{...}` and line continuations
    /// work), and written back as a literal minijinja reads as that string.
    fn string_literal(&mut self, span: Span) {
        let (start, end) = (span.start_offset as usize, span.end_offset as usize);
        let Some(text) = self.src.get(start..end) else { return };
        let Some(quote) = text.chars().next().filter(|q| *q == '"' || *q == '\'') else {
            return;
        };
        if !text.contains('\\') || text.len() < 2 {
            return;
        }
        // Only a single literal (not `'a' 'b'`): its closing quote must be the last character.
        let b = text.as_bytes();
        let mut i = 1;
        while i < b.len() && b[i] != quote as u8 {
            i += if b[i] == b'\\' { 2 } else { 1 };
        }
        if i != b.len() - 1 {
            return;
        }
        let Some(decoded) = python_unescape(&text[1..text.len() - 1]) else {
            return;
        };
        let mut lit = String::with_capacity(decoded.len() + 2);
        lit.push('"');
        for c in decoded.chars() {
            match c {
                '\\' => lit.push_str("\\\\"),
                '"' => lit.push_str("\\\""),
                '\n' => lit.push_str("\\n"),
                '\r' => lit.push_str("\\r"),
                '\t' => lit.push_str("\\t"),
                c if (c as u32) < 0x20 || c == '\u{7f}' => lit.push_str(&format!("\\u{:04x}", c as u32)),
                c => lit.push(c),
            }
        }
        lit.push('"');
        self.list.push((start, Kind::Operator(end - start), lit));
    }

    /// The source range of the object a method is looked up on, widened over parentheses around it;
    /// `None` (no rewrite) when it is a unary minus chain, which `neg_postfix` restructures.
    fn method_operand(&self, object: &Expr) -> Option<(usize, usize)> {
        let mut base = object;
        loop {
            base = match base {
                Expr::GetAttr(g) => &g.expr,
                Expr::GetItem(g) => &g.expr,
                Expr::Call(c) => &c.expr,
                Expr::Slice(s) => &s.expr,
                _ => break,
            };
        }
        if matches!(base, Expr::UnaryOp(u) if matches!(u.op, ast::UnaryOpKind::Neg)) {
            return None;
        }
        let (mut start, mut end) = self.extent(object);
        let b = self.src.as_bytes();
        loop {
            let next = (end..b.len()).find(|&i| !b[i].is_ascii_whitespace());
            let prev = (0..start).rev().find(|&i| !b[i].is_ascii_whitespace());
            match (next, prev) {
                (Some(n), Some(p)) if b[n] == b')' && b[p] == b'(' => {
                    start = p;
                    end = n + 1;
                }
                _ => break,
            }
        }
        Some((start, end))
    }

    fn stmts(&mut self, stmts: &[Stmt]) {
        for s in stmts {
            self.stmt(s);
        }
    }

    fn stmt(&mut self, stmt: &Stmt) {
        match stmt {
            Stmt::Template(t) => self.stmts(&t.children),
            Stmt::EmitExpr(e) => self.expr(&e.expr),
            Stmt::EmitRaw(_) => {}
            Stmt::ForLoop(f) => {
                self.expr(&f.iter);
                let (start, end) = self.extent(&f.iter);
                self.wrap_range(start, end, ITER);
                if let Some(e) = &f.filter_expr {
                    self.expr(e);
                }
                self.stmts(&f.body);
                self.stmts(&f.else_body);
            }
            Stmt::IfCond(c) => {
                self.expr(&c.expr);
                self.stmts(&c.true_body);
                self.stmts(&c.false_body);
            }
            Stmt::WithBlock(w) => {
                for (_, value) in &w.assignments {
                    self.expr(value);
                }
                self.stmts(&w.body);
            }
            Stmt::Set(s) => self.expr(&s.expr),
            Stmt::SetBlock(s) => {
                if let Some(f) = &s.filter {
                    self.expr(f);
                }
                self.stmts(&s.body);
            }
            Stmt::AutoEscape(a) => {
                self.expr(&a.enabled);
                self.stmts(&a.body);
            }
            Stmt::FilterBlock(f) => {
                self.expr(&f.filter);
                self.stmts(&f.body);
            }
            Stmt::Block(b) => self.stmts(&b.body),
            Stmt::Import(i) => {
                self.expr(&i.expr);
                self.expr(&i.name);
            }
            Stmt::FromImport(i) => {
                self.expr(&i.expr);
                for (name, alias) in &i.names {
                    self.expr(name);
                    if let Some(alias) = alias {
                        self.expr(alias);
                    }
                }
            }
            Stmt::Extends(e) => self.expr(&e.name),
            Stmt::Include(i) => self.expr(&i.name),
            Stmt::Macro(m) => self.macro_decl(m),
            Stmt::CallBlock(c) => {
                self.call(&c.call);
                self.macro_decl(&c.macro_decl);
            }
            Stmt::Continue(_) | Stmt::Break(_) => {}
            Stmt::Do(d) => self.call(&d.call),
        }
    }

    fn macro_decl(&mut self, m: &ast::Macro) {
        for e in &m.defaults {
            self.expr(e);
        }
        let params = m.args.iter().filter_map(|a| {
            if let Expr::Var(v) = a {
                Some(v.id.to_string())
            } else {
                None
            }
        });
        self.macro_params.push(params.collect());
        self.stmts(&m.body);
        self.macro_params.pop();
    }

    fn call(&mut self, c: &ast::Call) {
        self.expr(&c.expr);
        self.args(&c.args);
    }

    fn args(&mut self, args: &[CallArg]) {
        for a in args {
            match a {
                CallArg::Pos(e) | CallArg::Kwarg(_, e) | CallArg::PosSplat(e) | CallArg::KwargSplat(e) => self.expr(e),
            }
        }
    }

    fn expr(&mut self, expr: &Expr) {
        match expr {
            Expr::Var(v) => {
                // Inside a macro jinja2 binds `varargs` (extra positional arguments, a tuple) and
                // `kwargs` (extra keyword arguments, a dict); minijinja has neither. Called with no
                // extra arguments (minijinja rejects extras) they are empty.
                let empty = match v.id {
                    "varargs" => Some(format!("{TUPLE}()")),
                    "kwargs" => Some("{}".to_string()),
                    _ => None,
                };
                let shadowed = self.macro_params.last().is_none_or(|p| p.iter().any(|n| n == v.id));
                if let (Some(empty), false) = (empty, shadowed) {
                    let span = v.span();
                    let len = (span.end_offset - span.start_offset) as usize;
                    self.list.push((span.start_offset as usize, Kind::Operator(len), empty));
                }
            }
            Expr::Const(c) => self.string_literal(c.span()),
            Expr::Slice(s) => {
                self.neg_postfix(expr);
                self.expr(&s.expr);
                for e in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                    self.expr(e);
                }
            }
            Expr::UnaryOp(u) => self.expr(&u.expr),
            Expr::BinOp(b) => {
                self.expr(&b.left);
                self.expr(&b.right);
                // minijinja folds `'' and 'x'` to `false` at compile time; Python gives `''`. Making the
                // left operand a call keeps it from folding (at run time minijinja gets it right).
                if matches!(b.op, BinOpKind::ScAnd) && b.left.as_const().is_some() && b.right.as_const().is_some() {
                    let (start, end) = self.extent(&b.left);
                    self.wrap_range(start, end, ID);
                }
                let (func, op) = match b.op {
                    BinOpKind::Add => (ADD, "+"),
                    BinOpKind::Concat => (CONCAT, "~"),
                    BinOpKind::Rem => (MOD, "%"),
                    BinOpKind::Mul => (MUL, "*"),
                    BinOpKind::Pow => (POW, "**"),
                    BinOpKind::Div => (DIV, "/"),
                    BinOpKind::FloorDiv => (FLOORDIV, "//"),
                    _ => return,
                };
                // After the left operand come only closing parentheses, then the operator.
                let gap_start = raw_extent(&b.left).1;
                let Some(at) = self.src.get(gap_start..).and_then(|gap| gap.find(op)) else {
                    return;
                };
                self.wrap(b.span(), func);
                self.list
                    .push((gap_start + at, Kind::Operator(op.len()), ",".to_string()));
            }
            Expr::Compare(c) => {
                self.expr(&c.expr);
                for op in &c.ops {
                    self.expr(&op.expr);
                }
            }
            Expr::IfExpr(i) => {
                self.expr(&i.test_expr);
                self.expr(&i.true_expr);
                if let Some(e) = &i.false_expr {
                    self.expr(e);
                }
            }
            Expr::Filter(f) => {
                if let Some(e) = &f.expr {
                    self.expr(e);
                }
                self.args(&f.args);
            }
            Expr::Test(t) => {
                self.expr(&t.expr);
                self.args(&t.args);
            }
            Expr::GetAttr(g) => {
                self.neg_postfix(expr);
                if PY_METHODS.contains(&g.name) {
                    // `x.items` -> `__kiln_attr(x, 'items')`
                    if let Some((start, end)) = self.method_operand(&g.expr) {
                        let name_end = g.span().end_offset as usize;
                        self.list
                            .push((start, Kind::Open(std::cmp::Reverse(end)), format!("{ATTR}(")));
                        self.list
                            .push((end, Kind::Operator(name_end - end), format!(", '{}')", g.name)));
                    }
                }
                self.expr(&g.expr);
            }
            Expr::GetItem(g) => {
                self.neg_postfix(expr);
                self.expr(&g.expr);
                self.expr(&g.subscript_expr);
            }
            Expr::Call(c) => {
                self.neg_postfix(expr);
                match &c.expr {
                    Expr::GetAttr(g) if PY_METHODS.contains(&g.name) => {
                        // `x.split(a)` -> `__kiln_method(x, 'split', a)`
                        let name_end = g.span().end_offset as usize;
                        let paren = self.src[name_end..].find('(').map(|i| name_end + i);
                        if let (Some((start, end)), Some(paren)) = (self.method_operand(&g.expr), paren) {
                            let call_end = raw_extent(expr).1;
                            let sep = if c.args.is_empty() { "" } else { ", " };
                            self.list
                                .push((start, Kind::Open(std::cmp::Reverse(call_end - 1)), format!("{METHOD}(")));
                            self.list
                                .push((end, Kind::Operator(paren + 1 - end), format!(", '{}'{sep}", g.name)));
                        }
                        self.expr(&g.expr);
                        self.args(&c.args);
                    }
                    _ => self.call(c),
                }
            }
            Expr::List(l) => {
                // A parenthesised list literal is a tuple: `(a, b)` becomes `__kiln_tuple(a, b)`.
                let start = l.span().start_offset as usize;
                if self.src.as_bytes().get(start) == Some(&b'(') {
                    let close = l.span().end_offset as usize - 1;
                    self.list
                        .push((start, Kind::Open(std::cmp::Reverse(close)), TUPLE.to_string()));
                }
                for e in &l.items {
                    self.expr(e);
                }
            }
            Expr::Map(m) => {
                for e in m.keys.iter().chain(&m.values) {
                    self.expr(e);
                }
            }
        }
    }
}

/// Python's `unicode-escape` decoding of a string literal's body; `None` where Python would fail.
fn python_unescape(s: &str) -> Option<String> {
    let s = s.replace("\r\n", "\n").replace('\r', "\n");
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    let hex = |chars: &mut std::iter::Peekable<std::str::Chars>, n: usize| -> Option<char> {
        let digits: String = (0..n).map_while(|_| chars.next()).collect();
        if digits.len() != n {
            return None;
        }
        char::from_u32(u32::from_str_radix(&digits, 16).ok()?)
    };
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let d = chars.next()?;
        match d {
            '\n' => {}
            '\\' | '\'' | '"' => out.push(d),
            'a' => out.push('\u{7}'),
            'b' => out.push('\u{8}'),
            'f' => out.push('\u{c}'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'v' => out.push('\u{b}'),
            'x' => out.push(hex(&mut chars, 2)?),
            'u' => out.push(hex(&mut chars, 4)?),
            'U' => out.push(hex(&mut chars, 8)?),
            '0'..='7' => {
                let mut v = d.to_digit(8)?;
                for _ in 0..2 {
                    match chars.peek().and_then(|c| c.to_digit(8)) {
                        Some(x) => {
                            v = v * 8 + x;
                            chars.next();
                        }
                        None => break,
                    }
                }
                out.push(char::from_u32(v)?);
            }
            // `\N{NAME}` needs the Unicode name table: leave the literal to minijinja.
            'N' => return None,
            other => {
                out.push('\\');
                out.push(other);
            }
        }
    }
    Some(out)
}

/// The union of an expression's span and its children's.
fn raw_extent(expr: &Expr) -> (usize, usize) {
    let span = expr.span();
    let (mut start, mut end) = (span.start_offset as usize, span.end_offset as usize);
    let mut take = |e: &Expr| {
        let (s, t) = raw_extent(e);
        start = start.min(s);
        end = end.max(t);
    };
    match expr {
        Expr::Var(_) | Expr::Const(_) | Expr::List(_) | Expr::Map(_) => {}
        Expr::Slice(s) => take(&s.expr),
        Expr::UnaryOp(u) => take(&u.expr),
        Expr::BinOp(b) => {
            take(&b.left);
            take(&b.right);
        }
        Expr::Compare(c) => {
            take(&c.expr);
            if let Some(last) = c.ops.last() {
                take(&last.expr);
            }
        }
        Expr::IfExpr(i) => {
            take(&i.test_expr);
            take(&i.true_expr);
            if let Some(e) = &i.false_expr {
                take(e);
            }
        }
        Expr::Filter(f) => {
            if let Some(e) = &f.expr {
                take(e);
            }
        }
        Expr::Test(t) => take(&t.expr),
        Expr::GetAttr(g) => take(&g.expr),
        Expr::GetItem(g) => take(&g.expr),
        Expr::Call(c) => take(&c.expr),
    }
    (start, end)
}

/// `{% generation %}` / `{% endgeneration %}` become `{% with %}` / `{% endwith %}` (whitespace control
/// kept); the text of comments, raw blocks and string literals is left alone.
pub(crate) fn rewrite_generation_tags(src: &str) -> String {
    if !src.contains("generation") {
        return src.to_string();
    }
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut copied = 0;
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] != b'{' {
            i += 1;
            continue;
        }
        match b[i + 1] {
            b'#' => i = src[i + 2..].find("#}").map_or(b.len(), |j| i + 2 + j + 2),
            b'{' => i = skip_tag(src, i + 2, "}}"),
            b'%' => {
                let mut j = i + 2;
                if j < b.len() && matches!(b[j], b'-' | b'+') {
                    j += 1;
                }
                while j < b.len() && b[j].is_ascii_whitespace() {
                    j += 1;
                }
                let start = j;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                let word = &src[start..j];
                if word == "raw" {
                    i = skip_raw(src, j);
                    continue;
                }
                if word == "generation" || word == "endgeneration" {
                    let mut k = j;
                    while k < b.len() && b[k].is_ascii_whitespace() {
                        k += 1;
                    }
                    if k < b.len() && matches!(b[k], b'-' | b'+') {
                        k += 1;
                    }
                    if src[k..].starts_with("%}") {
                        out.push_str(&src[copied..start]);
                        out.push_str(if word == "generation" { "with" } else { "endwith" });
                        copied = j;
                    }
                }
                i = skip_tag(src, j, "%}");
            }
            _ => i += 1,
        }
    }
    out.push_str(&src[copied..]);
    out
}

/// The index just past `close`, skipping string literals inside the tag.
fn skip_tag(src: &str, mut i: usize, close: &str) -> usize {
    let b = src.as_bytes();
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            _ if src[i..].starts_with(close) => return i + close.len(),
            _ => i += 1,
        }
    }
    b.len()
}

/// The index just past the `{% endraw %}` closing a raw block whose `raw` word ends at `i`.
fn skip_raw(src: &str, i: usize) -> usize {
    let mut i = skip_tag(src, i, "%}");
    while let Some(j) = src[i..].find("{%") {
        let tag = src[i + j + 2..].trim_start_matches(['-', '+']).trim_start();
        if tag.starts_with("endraw") {
            return skip_tag(src, i + j + 2, "%}");
        }
        i += j + 2;
    }
    src.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_with_blocks() {
        let src = "{% for m in messages %}{%- generation -%}[{{ m.content }}]{%- endgeneration %}{% endfor %}";
        assert_eq!(
            rewrite_generation_tags(src),
            "{% for m in messages %}{%- with -%}[{{ m.content }}]{%- endwith %}{% endfor %}"
        );
        let raw = "{% raw %}{% generation %}{% endraw %}{{ 'generation' }}";
        assert_eq!(rewrite_generation_tags(raw), raw);
    }

    #[test]
    fn operators_become_calls() {
        let src = "{{ a + b + (c ~ d) }}{% for x in xs|f if x % 2 %}{{ 'x' * 3 - 1 }}{% endfor %}";
        assert_eq!(
            rewrite("t", src).unwrap(),
            "{{ __kiln_add(__kiln_add(a , b) , (__kiln_concat(c , d))) }}\
             {% for x in __kiln_iter(xs|f) if __kiln_mod(x , 2) %}{{ __kiln_mul('x' , 3) - 1 }}{% endfor %}"
        );
        let parens = "{% for x in (a + b)|f %}{% endfor %}{% for x in ((a)) %}{% endfor %}{{ (a|f) + b|g }}";
        assert_eq!(
            rewrite("t", parens).unwrap(),
            "{% for x in __kiln_iter((__kiln_add(a , b))|f) %}{% endfor %}{% for x in ((__kiln_iter(a))) %}{% endfor %}\
             {{ __kiln_add((a|f) , b|g) }}"
        );
        let nesting = "{% for k, v in d.items() %}{% endfor %}{% for x in (1, 2) %}{% endfor %}{% for x in d.values %}{% endfor %}";
        assert_eq!(
            rewrite("t", nesting).unwrap(),
            "{% for k, v in __kiln_iter(__kiln_method(d, 'items')) %}{% endfor %}\
             {% for x in __kiln_iter(__kiln_tuple(1, 2)) %}{% endfor %}{% for x in __kiln_iter(__kiln_attr(d, 'values')) %}{% endfor %}"
        );
        let misc = "{{ (1, 2) }}{{ () }}{{ x ** -1 }}{{ -a.b[0] }}{{ (-a).b }}{% for (a, b) in c %}{% endfor %}";
        assert_eq!(
            rewrite("t", misc).unwrap(),
            "{{ __kiln_tuple(1, 2) }}{{ __kiln_tuple() }}{{ __kiln_pow(x , -1) }}{{ -(a.b[0]) }}{{ (-a).b }}\
             {% for (a, b) in __kiln_iter(c) %}{% endfor %}"
        );
        let methods = "{{ x.strip().split(',', 1) }}{{ (a ~ b).upper() }}{{ s.items }}{{ loop.index }}{{ -a.b() }}{{ f(x).get('k') }}";
        assert_eq!(
            rewrite("t", methods).unwrap(),
            "{{ __kiln_method(__kiln_method(x, 'strip'), 'split', ',', 1) }}{{ __kiln_method((__kiln_concat(a , b)), 'upper') }}\
             {{ __kiln_attr(s, 'items') }}{{ __kiln_attr(loop, 'index') }}{{ -(a.b()) }}{{ __kiln_method(f(x), 'get', 'k') }}"
        );
        let strings = r#"{{ 'a\/b' }}{{ "\U0001F600\a" }}{{ 'plain' }}{{ 'x' 'y' }}"#;
        assert_eq!(
            rewrite("t", strings).unwrap(),
            "{{ \"a\\\\/b\" }}{{ \"😀\\u0007\" }}{{ 'plain' }}{{ 'x' 'y' }}"
        );
        let nested = "{{ a ~ b+c }}";
        assert_eq!(
            rewrite("t", nested).unwrap(),
            "{{ __kiln_add(__kiln_concat(a , b),c) }}"
        );
    }
}
