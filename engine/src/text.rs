//! Streaming text out of a generation: [`Utf8Stream`] turns each token's bytes into
//! text that is always valid UTF-8, and [`StopMatcher`] finds stop strings in that text
//! as it arrives, holding back just enough of it that a stop string split across tokens
//! is never shown in part.

/// Incremental UTF-8 decoding of token bytes. A token may end in the middle of a
/// character (byte-level BPE splits emoji and CJK characters across tokens), so the bytes
/// of an incomplete character are held until the next push completes them. Bytes that
/// can never be valid become U+FFFD, exactly as [`String::from_utf8_lossy`] would
/// replace them: the deltas of a whole stream concatenate to `from_utf8_lossy` of all
/// its bytes, however they were split.
#[derive(Clone, Debug, Default)]
pub struct Utf8Stream {
    /// The start of a character still missing bytes (a UTF-8 character is at most 4 bytes).
    partial: [u8; 4],
    len: usize,
}

impl Utf8Stream {
    /// Appends to `out` the text of `bytes` that is complete, holding back an unfinished
    /// character at the end.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut String) {
        // Complete the held character a byte at a time; it lacks at most 3.
        while self.len > 0 {
            let Some((&byte, rest)) = bytes.split_first() else {
                return;
            };
            self.partial[self.len] = byte;
            match std::str::from_utf8(&self.partial[..=self.len]) {
                Ok(c) => {
                    out.push_str(c);
                    self.len = 0;
                    bytes = rest;
                }
                Err(e) if e.error_len().is_none() => {
                    self.len += 1;
                    bytes = rest;
                }
                Err(_) => {
                    // `byte` cannot continue the held bytes, which were thus a maximal
                    // ill-formed sequence (one U+FFFD in from_utf8_lossy); `byte` itself
                    // is decoded afresh below.
                    out.push(char::REPLACEMENT_CHARACTER);
                    self.len = 0;
                }
            }
        }

        let mut chunks = bytes.utf8_chunks().peekable();
        while let Some(chunk) = chunks.next() {
            out.push_str(chunk.valid());
            let bad = chunk.invalid();
            if bad.is_empty() {
                continue;
            }
            // Only an error at the very end can be a character that the next push
            // completes; one that more bytes already follow is final.
            let unfinished =
                chunks.peek().is_none() && std::str::from_utf8(bad).is_err_and(|e| e.error_len().is_none());
            if unfinished {
                self.partial[..bad.len()].copy_from_slice(bad);
                self.len = bad.len();
            } else {
                out.push(char::REPLACEMENT_CHARACTER);
            }
        }
    }

    /// Ends the stream: a character still unfinished becomes U+FFFD.
    pub fn finish(&mut self, out: &mut String) {
        if self.len > 0 {
            out.push(char::REPLACEMENT_CHARACTER);
            self.len = 0;
        }
    }
}

/// Finds stop strings in text that arrives in pieces. Text that might be the beginning of
/// a stop string is held back until the next piece shows whether it is; the rest is
/// handed on at once.
///
/// Generation stops at the first stop string to *end*, scanning the text in order, and
/// the text emitted is everything before that occurrence. That is what a piece-by-piece
/// check finds, so the result does not depend on how the text was split into pieces:
/// with stops `world` and `or`, `hello world` stops at `hello w`, whether it came in one
/// piece or one character at a time. Of stop strings ending at the same place, the
/// longest (the one starting first) counts.
#[derive(Clone, Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Length in bytes of the longest stop string (0: nothing to find).
    longest: usize,
    /// Text not yet emitted: the longest tail of what came that a stop string starts with.
    held: String,
    /// Which stop string was found, as an index into the list given to `new`.
    matched: Option<usize>,
}

impl StopMatcher {
    /// A matcher for these stop strings. Empty strings are ignored: they would end every
    /// generation before its first character.
    pub fn new(stops: &[String]) -> Self {
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        StopMatcher {
            stops: stops.to_vec(),
            longest,
            // The held text never outgrows the longest stop plus one piece, so this is
            // usually its only allocation.
            held: String::with_capacity(2 * longest + 32),
            matched: None,
        }
    }

    /// Takes the next piece of text and appends to `out` what is now safe to emit. True
    /// when a stop string was found: `out` then ends just before it, and the generation
    /// should end; later calls emit nothing and keep returning true.
    pub fn push(&mut self, delta: &str, out: &mut String) -> bool {
        if self.matched.is_some() {
            return true;
        }
        if self.longest == 0 {
            out.push_str(delta);
            return false;
        }
        self.held.push_str(delta);

        // Every occurrence lies inside `held`: text emitted earlier was no stop's start.
        // For one stop, `find` gives its earliest start and so its earliest end.
        let mut first: Option<(usize, usize, usize)> = None; // (end, start, stop index)
        for (i, stop) in self.stops.iter().enumerate() {
            if stop.is_empty() {
                continue;
            }
            if let Some(start) = self.held.find(stop.as_str()) {
                let end = start + stop.len();
                if first.is_none_or(|(e, s, _)| end < e || (end == e && start < s)) {
                    first = Some((end, start, i));
                }
            }
        }
        if let Some((_, start, i)) = first {
            out.push_str(&self.held[..start]);
            self.held.clear();
            self.matched = Some(i);
            return true;
        }

        let keep = self.unsure_from();
        out.push_str(&self.held[..keep]);
        self.held.drain(..keep);
        false
    }

    /// Ends the text (the generation stopped for another reason): appends what is held.
    pub fn finish(&mut self, out: &mut String) {
        out.push_str(&self.held);
        self.held.clear();
    }

    /// The index, in the list given to `new`, of the stop string found, if one was.
    pub fn matched(&self) -> Option<usize> {
        self.matched
    }

    /// The text held back, not yet emitted.
    pub fn held(&self) -> &str {
        &self.held
    }

    /// Forgets the text so far, to match a new generation with the same stop strings.
    pub fn reset(&mut self) {
        self.held.clear();
        self.matched = None;
    }

    /// Where the longest tail of `held` that some stop string starts with begins
    /// (`held.len()` if none). No stop occurs whole in `held` here, so such a tail is
    /// shorter than the longest stop: only the last `longest - 1` bytes need a look.
    fn unsure_from(&self) -> usize {
        let held = &self.held;
        let earliest = held.len().saturating_sub(self.longest - 1);
        (earliest..held.len())
            .filter(|&at| held.is_char_boundary(at))
            .find(|&at| self.stops.iter().any(|stop| stop.starts_with(&held[at..])))
            .unwrap_or(held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SplitMix64;

    fn decode_in_pieces(bytes: &[u8], cuts: &[usize]) -> String {
        let mut stream = Utf8Stream::default();
        let mut text = String::new();
        let mut at = 0;
        for &cut in cuts.iter().chain([&bytes.len()]) {
            stream.push(&bytes[at..cut], &mut text);
            at = cut;
        }
        stream.finish(&mut text);
        text
    }

    #[test]
    fn a_split_character_waits_for_its_last_byte() {
        let emoji = "😀".as_bytes();
        let mut stream = Utf8Stream::default();
        let mut text = String::new();
        for b in &emoji[..3] {
            stream.push(std::slice::from_ref(b), &mut text);
            assert_eq!(text, "");
        }
        stream.push(&emoji[3..], &mut text);
        assert_eq!(text, "😀");
    }

    #[test]
    fn invalid_and_unfinished_bytes_become_replacement_characters() {
        assert_eq!(decode_in_pieces(b"a\xffb", &[1, 2]), "a\u{fffd}b");
        // A held start that the next push cannot continue: one U+FFFD for it, then the
        // new byte on its own.
        assert_eq!(decode_in_pieces(b"\xe4\xb8x", &[1, 2]), "\u{fffd}x");
        assert_eq!(decode_in_pieces(b"\xe0\x80", &[1]), "\u{fffd}\u{fffd}");
        // A character still unfinished at the end.
        assert_eq!(decode_in_pieces("ok😀".as_bytes(), &[3, 4]).as_str(), "ok😀");
        assert_eq!(decode_in_pieces(&"ok😀".as_bytes()[..4], &[3]), "ok\u{fffd}");
    }

    #[test]
    fn any_split_decodes_like_from_utf8_lossy() {
        let pieces: [&[u8]; 12] = [
            b"a",
            b" the ",
            "中文".as_bytes(),
            "日本語のテキスト".as_bytes(),
            "😀".as_bytes(),
            "👨‍👩‍👧‍👦".as_bytes(),
            "🏳️‍🌈".as_bytes(),
            "é".as_bytes(),
            b"\xff",
            b"\x80\xbf",
            b"\xf0\x9f\x98",
            b"\xed\xa0\x80",
        ];
        let mut rng = SplitMix64(2024);
        for case in 0..3000 {
            let mut bytes = Vec::new();
            for _ in 0..rng.next_u64() % 12 {
                if rng.next_u64().is_multiple_of(4) {
                    bytes.push(rng.next_u64() as u8);
                } else {
                    bytes.extend_from_slice(pieces[(rng.next_u64() % pieces.len() as u64) as usize]);
                }
            }
            let mut cuts: Vec<usize> = (0..rng.next_u64() % 8)
                .map(|_| (rng.next_u64() % (bytes.len() as u64 + 1)) as usize)
                .collect();
            cuts.sort_unstable();
            assert_eq!(
                decode_in_pieces(&bytes, &cuts),
                String::from_utf8_lossy(&bytes),
                "case {case}: {bytes:x?} cut at {cuts:?}"
            );
        }
    }

    /// Feeds `pieces` to a matcher on `stops`, checking after each that what was emitted
    /// plus what is held is exactly the text so far; returns the text emitted (with what
    /// `finish` gives, when no stop was found) and the stop found.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<usize>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let (mut emitted, mut so_far) = (String::new(), String::new());
        for piece in pieces {
            so_far.push_str(piece);
            if m.push(piece, &mut emitted) {
                assert!(so_far.starts_with(&emitted));
                assert!(so_far[emitted.len()..].starts_with(&stops[m.matched().unwrap()]));
                return (emitted, m.matched());
            }
            assert_eq!(format!("{emitted}{}", m.held()), so_far);
        }
        m.finish(&mut emitted);
        assert_eq!(emitted, so_far, "nothing is lost without a stop");
        (emitted, None)
    }

    fn chars(text: &str) -> Vec<&str> {
        text.char_indices().map(|(i, c)| &text[i..i + c.len_utf8()]).collect()
    }

    #[test]
    fn a_stop_split_across_pieces_is_found_and_never_shown() {
        let stops = ["</s>"];
        assert_eq!(run(&stops, &["Hi there</", "s> more"]), ("Hi there".into(), Some(0)));
        assert_eq!(run(&stops, &["Hi <", "/s", ">"]), ("Hi ".into(), Some(0)));
        assert_eq!(run(&stops, &chars("Hi there</s> more")), ("Hi there".into(), Some(0)));
        // Held text is only what could still grow into the stop.
        let mut m = StopMatcher::new(&["</s>".to_string()]);
        let mut out = String::new();
        assert!(!m.push("Hi </", &mut out));
        assert_eq!((out.as_str(), m.held()), ("Hi ", "</"));
    }

    #[test]
    fn a_partial_match_that_fails_is_emitted() {
        assert_eq!(run(&["</s>"], &["a </", "b> c"]), ("a </b> c".into(), None));
        assert_eq!(run(&["</s>"], &chars("a </b> </ </s")), ("a </b> </ </s".into(), None));
        // A failed match whose tail starts the stop afresh.
        assert_eq!(run(&["abc"], &["a", "ab", "c"]), ("a".into(), Some(0)));
        assert_eq!(run(&["aab"], &chars("aaab")), ("a".into(), Some(0)));
    }

    #[test]
    fn stops_that_prefix_each_other() {
        let stops = ["User", "User:"];
        assert_eq!(run(&stops, &["Bye.\nUs", "er: hi"]), ("Bye.\n".into(), Some(0)));
        let stops = ["\n\n\n", "\n"];
        assert_eq!(run(&stops, &chars("a\n\n\nb")), ("a".into(), Some(1)));
        // Ending at the same place, the longer stop (starting first) counts.
        assert_eq!(run(&[":", "x:"], &["ax:b"]), ("a".into(), Some(1)));
        assert_eq!(run(&[":", "x:"], &chars("ax:b")), ("a".into(), Some(1)));
    }

    #[test]
    fn the_first_stop_to_end_wins() {
        let stops = ["STOP", "END"];
        assert_eq!(run(&stops, &["a END b STOP"]), ("a ".into(), Some(1)));
        assert_eq!(run(&stops, &["a STOP b END"]), ("a ".into(), Some(0)));
        // Overlapping stops: `or` ends before `world`, in one piece as char by char.
        let stops = ["world", "or"];
        assert_eq!(run(&stops, &["hello world"]), ("hello w".into(), Some(1)));
        assert_eq!(run(&stops, &chars("hello world")), ("hello w".into(), Some(1)));
    }

    #[test]
    fn stops_in_cjk_and_emoji() {
        let stops = ["。", "🛑", "结束"];
        assert_eq!(run(&stops, &chars("你好。再见")), ("你好".into(), Some(0)));
        assert_eq!(run(&stops, &["go 🛑 no"]), ("go ".into(), Some(1)));
        assert_eq!(run(&stops, &["完全结", "束了"]), ("完全".into(), Some(2)));
        // A stop sharing only its first bytes with a character is no match, and no char
        // is split: `结` and `络` share their first two bytes.
        assert_eq!(run(&stops, &chars("网络结构")), ("网络结构".into(), None));
    }

    #[test]
    fn no_stops_pass_everything_through() {
        let mut m = StopMatcher::new(&[]);
        let mut out = String::new();
        assert!(!m.push("any </s> text", &mut out));
        assert_eq!((out.as_str(), m.held()), ("any </s> text", ""));
        assert_eq!(
            run(&[""], &["empty stops are ignored"]),
            ("empty stops are ignored".into(), None)
        );
    }

    #[test]
    fn after_a_stop_nothing_more_is_emitted() {
        let mut m = StopMatcher::new(&["#".to_string()]);
        let mut out = String::new();
        assert!(m.push("a#b", &mut out));
        assert!(m.push("more", &mut out));
        m.finish(&mut out);
        assert_eq!(out, "a");
        m.reset();
        assert!(!m.push("c", &mut out));
        assert_eq!(out, "ac");
    }

    #[test]
    fn how_the_text_is_split_does_not_change_the_result() {
        let alphabet = ["a", "b", "c", "é", "中", "😀"];
        let mut rng = SplitMix64(77);
        let mut pick = |n: u64| (rng.next_u64() % n) as usize;
        for case in 0..2000 {
            let text: String = (0..pick(16)).map(|_| alphabet[pick(6)]).collect();
            let stops: Vec<String> = (0..pick(4))
                .map(|_| (0..1 + pick(3)).map(|_| alphabet[pick(6)]).collect())
                .collect();
            let stops: Vec<&str> = stops.iter().map(String::as_str).collect();
            let whole = run(&stops, &[&text]);
            assert_eq!(run(&stops, &chars(&text)), whole, "case {case}: {text:?} {stops:?}");
            let mut cuts: Vec<usize> = (0..pick(5)).map(|_| pick(text.len() as u64 + 1)).collect();
            cuts.retain(|&c| text.is_char_boundary(c));
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut at = 0;
            for &cut in cuts.iter().chain([&text.len()]) {
                pieces.push(&text[at..cut]);
                at = cut;
            }
            assert_eq!(run(&stops, &pieces), whole, "case {case}: {pieces:?} {stops:?}");
        }
    }
}
