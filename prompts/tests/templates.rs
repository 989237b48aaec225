//! Every (template, conversation) case in tests/fixtures/templates.json must render byte for byte as
//! transformers rendered it (the fixture is made by scripts/fixtures/templates.py), and every case
//! transformers failed on must fail here too, with the same message where the template called
//! `raise_exception(message)`. The same holds for the fixture's probes: small templates that each
//! exercise a few jinja2 / Python behaviours the real templates may not reach.

use std::path::PathBuf;

use kiln_prompts::{ChatInput, ChatTemplate, Date, TemplateError};
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Deserialize)]
struct Fixture {
    reference: String,
    date: [u32; 3],
    conversations: Map<String, Value>,
    templates: Vec<TemplateCases>,
    probes: Probes,
}

/// Small templates probing single features, all rendered with one context.
#[derive(Deserialize)]
struct Probes {
    messages: Vec<Value>,
    tools: Option<Vec<Value>>,
    extra: Option<Map<String, Value>>,
    bos_token: String,
    eos_token: String,
    add_generation_prompt: bool,
    cases: Vec<Probe>,
}

#[derive(Deserialize)]
struct Probe {
    template: String,
    output: Option<String>,
    error: Option<ReferenceError>,
}

#[derive(Deserialize)]
struct Conversation {
    messages: Vec<Value>,
    tools: Option<Vec<Value>>,
    extra: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
struct TemplateCases {
    name: String,
    bos_token: String,
    eos_token: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    conversation: String,
    add_generation_prompt: bool,
    output: Option<String>,
    error: Option<ReferenceError>,
}

#[derive(Deserialize)]
struct ReferenceError {
    message: String,
    raised: bool,
}

/// (template, conversation, add_generation_prompt, why): cases known not to match. Empty: all match.
const KNOWN_DIVERGENCES: &[(&str, &str, bool, &str)] = &[];

/// (probe template, why): probes known not to match. Empty: all match.
const KNOWN_PROBE_DIVERGENCES: &[(&str, &str)] = &[];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Where two strings first differ, with some context on both sides.
fn first_difference(expected: &str, got: &str) -> String {
    let at = expected.bytes().zip(got.bytes()).take_while(|(a, b)| a == b).count();
    let lo = at.saturating_sub(60);
    let ctx = |s: &str| {
        let lo = (0..=lo.min(s.len()))
            .rev()
            .find(|i| s.is_char_boundary(*i))
            .unwrap_or(0);
        let hi = (at + 60).min(s.len());
        let hi = (hi..=s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(s.len());
        format!("{:?}", &s[lo..hi])
    };
    format!(
        "byte {at} (lengths {} vs {}):\n      expected {}\n      got      {}",
        expected.len(),
        got.len(),
        ctx(expected),
        ctx(got)
    )
}

fn load() -> (Fixture, Date) {
    let fixture: Fixture =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("templates.json")).unwrap()).unwrap();
    let [year, month, day] = fixture.date;
    (
        fixture,
        Date {
            year: year as i32,
            month,
            day,
        },
    )
}

/// What is wrong with a render, compared with the reference's output or error; `None` if it matches.
fn compare(
    output: &Option<String>,
    error: &Option<ReferenceError>,
    got: &Result<String, TemplateError>,
) -> Option<String> {
    match (output, error, got) {
        (Some(expected), _, Ok(got)) if expected == got => None,
        (Some(expected), _, Ok(got)) => Some(format!("output differs at {}", first_difference(expected, got))),
        (Some(_), _, Err(e)) => Some(format!("error here, none in the reference: {e}")),
        (None, Some(reference), Ok(_)) => Some(format!("rendered here, the reference failed: {}", reference.message)),
        (None, Some(reference), Err(e)) => {
            let message_ok = !reference.raised || matches!(e, TemplateError::Raised(m) if *m == reference.message);
            (!message_ok).then(|| format!("error {e:?}, expected raise_exception({:?})", reference.message))
        }
        (None, None, _) => Some("fixture case has neither output nor error".into()),
    }
}

#[test]
fn probes_render_as_transformers_does() {
    let (fixture, date) = load();
    let p = &fixture.probes;
    let input = ChatInput {
        messages: &p.messages,
        tools: p.tools.as_deref(),
        add_generation_prompt: p.add_generation_prompt,
        bos_token: &p.bos_token,
        eos_token: &p.eos_token,
        extra: p.extra.as_ref(),
    };
    let (mut matched, mut known) = (0usize, 0usize);
    let mut failures = Vec::new();
    for case in &p.cases {
        let got = ChatTemplate::new(&case.template).and_then(|t| t.with_date(date).render(&input));
        match compare(&case.output, &case.error, &got) {
            None => matched += 1,
            Some(_) if KNOWN_PROBE_DIVERGENCES.iter().any(|(t, _)| *t == case.template) => known += 1,
            Some(problem) => failures.push(format!("{:?}: {problem}", case.template)),
        }
    }
    for f in &failures {
        eprintln!("MISMATCH {f}");
    }
    println!("{matched}/{} probes match ({known} known divergences)", p.cases.len());
    assert!(
        failures.is_empty(),
        "{} of {} probes do not match transformers",
        failures.len(),
        p.cases.len()
    );
}

#[test]
fn templates_render_as_transformers_does() {
    let (fixture, date) = load();
    let conversations: Map<String, Value> = fixture.conversations;

    let (mut total, mut matched, mut known) = (0usize, 0usize, 0usize);
    let mut failures = Vec::new();
    for t in &fixture.templates {
        let source = std::fs::read_to_string(fixtures().join("templates").join(&t.name)).unwrap();
        let template = ChatTemplate::new(&source).map(|c| c.with_date(date));
        for case in &t.cases {
            total += 1;
            let conv: Conversation = serde_json::from_value(conversations[&case.conversation].clone()).unwrap();
            let input = ChatInput {
                messages: &conv.messages,
                tools: conv.tools.as_deref(),
                add_generation_prompt: case.add_generation_prompt,
                bos_token: &t.bos_token,
                eos_token: &t.eos_token,
                extra: conv.extra.as_ref(),
            };
            let got = match &template {
                Ok(template) => template.render(&input),
                Err(e) => Err(TemplateError::Input(format!("compile: {e}"))),
            };
            let label = format!(
                "{} / {} / add_generation_prompt={}",
                t.name, case.conversation, case.add_generation_prompt
            );
            let problem = compare(&case.output, &case.error, &got);
            match problem {
                None => matched += 1,
                Some(problem) => {
                    let is_known = KNOWN_DIVERGENCES.iter().any(|(n, c, g, _)| {
                        *n == t.name && *c == case.conversation && *g == case.add_generation_prompt
                    });
                    if is_known {
                        known += 1;
                    } else {
                        failures.push(format!("{label}: {problem}"));
                    }
                }
            }
        }
    }
    for f in &failures {
        eprintln!("MISMATCH {f}");
    }
    println!(
        "{matched}/{total} renders match ({known} known divergences; reference: {})",
        fixture.reference
    );
    assert!(
        failures.is_empty(),
        "{} of {total} renders do not match transformers",
        failures.len()
    );
}
