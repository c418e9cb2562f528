//! Token counting with tiktoken (cl100k_base), the one rule both the gateway
//! and the test upstream use, so their counts agree.
//!
//! Prompt: every message costs its role, content, thinking, tool name and tool
//! calls plus 4 tokens of framing; the whole prompt 3 more; tool definitions
//! and the `system`/`suffix` fields of `/api/generate` are counted as text.
//! Completion: each streamed chunk is counted on its own (content, thinking,
//! tool-call names and arguments), which is how the relay meters as it goes.

use rustc_hash::FxHashMap;
use serde_json::Value;
use tiktoken_rs::Rank;

/// Texts at least this long are tokenised on the blocking pool instead of a
/// runtime worker (measured: ~0.1–0.4 ms per 4 KiB on this class of machine).
pub const BLOCKING_THRESHOLD: usize = 32 * 1024;

/// How many ordinary tokens cl100k_base has (ranks 0..100256; the special
/// ones come after).
const ORDINARY_TOKENS: Rank = 100_256;

/// The vocabulary's byte strings and their ranks, which is all that
/// counting needs. tiktoken's `CoreBPE` also keeps a decoder map, a sorted
/// copy of every token and 256 regex clones: 21 MiB resident, where this
/// map is about 7 MiB. It is read out of a `CoreBPE` built for the purpose
/// (tiktoken-rs does not expose its vocabulary otherwise), which is then
/// dropped and its heap pages handed back.
fn ranks() -> &'static FxHashMap<Vec<u8>, Rank> {
    static RANKS: std::sync::OnceLock<FxHashMap<Vec<u8>, Rank>> = std::sync::OnceLock::new();
    RANKS.get_or_init(|| {
        let bpe = tiktoken_rs::cl100k_base().expect("tiktoken-rs's embedded cl100k_base vocabulary loads");
        let mut ranks = FxHashMap::with_capacity_and_hasher(ORDINARY_TOKENS as usize, Default::default());
        for rank in 0..ORDINARY_TOKENS {
            let bytes = bpe.decode_bytes(&[rank]).expect("cl100k_base's ordinary ranks have no gaps");
            ranks.insert(bytes, rank);
        }
        drop(bpe);
        crate::release_freed_memory();
        ranks
    })
}

/// Tokens of one piece of the pre-tokenizer's split: tiktoken's own byte
/// pair merge, on the ranks alone.
fn encode_len(piece: &str) -> u64 {
    let (bytes, ranks) = (piece.as_bytes(), ranks());
    if bytes.len() <= 1 {
        return bytes.len() as u64;
    }
    if ranks.contains_key(bytes) {
        return 1;
    }
    tiktoken_rs::byte_pair_split(bytes, ranks).len() as u64
}

/// What cl100k_base's pre-tokenizer pattern
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
/// sees in a character. The Unicode classes come from `regex-syntax`, the
/// tables tiktoken's own regex is compiled from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Letter,
    Number,
    /// `\r` or `\n`
    LineBreak,
    Space,
    Other,
}

struct Classes {
    letter: Vec<(char, char)>,
    number: Vec<(char, char)>,
    space: Vec<(char, char)>,
    ascii: [Kind; 128],
}

fn classes() -> &'static Classes {
    static C: std::sync::OnceLock<Classes> = std::sync::OnceLock::new();
    C.get_or_init(|| {
        let ranges = |pattern: &str| {
            let hir = regex_syntax::Parser::new().parse(pattern).expect("a Unicode class");
            match hir.kind() {
                regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(c)) => {
                    c.ranges().iter().map(|r| (r.start(), r.end())).collect()
                }
                other => unreachable!("{pattern} parsed to {other:?}"),
            }
        };
        let mut c = Classes { letter: ranges(r"\p{L}"), number: ranges(r"\p{N}"), space: ranges(r"\s"), ascii: [Kind::Other; 128] };
        for b in 0..128u8 {
            c.ascii[b as usize] = c.slow_kind(b as char);
        }
        c
    })
}

impl Classes {
    fn slow_kind(&self, ch: char) -> Kind {
        use std::cmp::Ordering;
        let has = |ranges: &[(char, char)]| {
            let place = |&(lo, hi): &(char, char)| match (hi < ch, lo > ch) {
                (true, _) => Ordering::Less,
                (_, true) => Ordering::Greater,
                _ => Ordering::Equal,
            };
            ranges.binary_search_by(place).is_ok()
        };
        if has(&self.letter) {
            Kind::Letter
        } else if has(&self.number) {
            Kind::Number
        } else if ch == '\r' || ch == '\n' {
            Kind::LineBreak
        } else if has(&self.space) {
            Kind::Space
        } else {
            Kind::Other
        }
    }

    fn kind(&self, ch: char) -> Kind {
        if ch.is_ascii() {
            self.ascii[ch as usize]
        } else {
            self.slow_kind(ch)
        }
    }
}

/// Calls `f` with each piece cl100k_base's pattern cuts `text` into, in
/// one pass and without a regex engine (tiktoken's `fancy_regex` costs
/// about 1 ms per 4 KiB; this is several times faster). The alternatives
/// are tried in the pattern's order, with its greedy backtracking worked
/// out by hand; the tests compare the result with tiktoken's.
fn for_each_piece(text: &str, mut f: impl FnMut(&str)) {
    let c = classes();
    let kind_at = |i: usize| text[i..].chars().next().map(|ch| (ch, c.kind(ch)));
    // End of the run of characters of `kind` starting at byte `i`.
    let run = |mut i: usize, pred: &dyn Fn(Kind) -> bool, max: usize| {
        let mut n = 0;
        while n < max {
            match kind_at(i) {
                Some((ch, k)) if pred(k) => {
                    i += ch.len_utf8();
                    n += 1;
                }
                _ => break,
            }
        }
        i
    };
    let is_space = |k: Kind| matches!(k, Kind::Space | Kind::LineBreak);
    let mut i = 0;
    while let Some((c0, k0)) = kind_at(i) {
        let after0 = i + c0.len_utf8();
        let next = kind_at(after0);
        let end = 'piece: {
            // (?i:'s|'t|'re|'ve|'m|'ll|'d)
            if c0 == '\'' {
                if let Some((c1, _)) = next {
                    let after1 = after0 + c1.len_utf8();
                    match c1 {
                        's' | 'S' | 'ſ' | 't' | 'T' | 'm' | 'M' | 'd' | 'D' => break 'piece after1,
                        'r' | 'R' | 'v' | 'V' | 'l' | 'L' => {
                            let want: &[char] = if matches!(c1, 'l' | 'L') { &['l', 'L'] } else { &['e', 'E'] };
                            if let Some((c2, _)) = kind_at(after1).filter(|(c2, _)| want.contains(c2)) {
                                break 'piece after1 + c2.len_utf8();
                            }
                        }
                        _ => {}
                    }
                }
            }
            // [^\r\n\p{L}\p{N}]?\p{L}+
            if matches!(k0, Kind::Space | Kind::Other) && matches!(next, Some((_, Kind::Letter))) {
                break 'piece run(after0, &|k| k == Kind::Letter, usize::MAX);
            }
            if k0 == Kind::Letter {
                break 'piece run(i, &|k| k == Kind::Letter, usize::MAX);
            }
            // \p{N}{1,3}
            if k0 == Kind::Number {
                break 'piece run(i, &|k| k == Kind::Number, 3);
            }
            //  ?[^\s\p{L}\p{N}]+[\r\n]*
            let punct_from = if c0 == ' ' && matches!(next, Some((_, Kind::Other))) {
                Some(after0)
            } else if k0 == Kind::Other {
                Some(i)
            } else {
                None
            };
            if let Some(from) = punct_from {
                let e = run(from, &|k| k == Kind::Other, usize::MAX);
                break 'piece run(e, &|k| k == Kind::LineBreak, usize::MAX);
            }
            // Whitespace: \s*[\r\n]+ ends at the run's last line break;
            // without one, \s+(?!\S) leaves the run's last character to
            // what follows it, unless the run is one character (\s+) or
            // ends the text.
            let j = run(i, &is_space, usize::MAX);
            let ws = &text[i..j];
            if let Some(k) = ws.rfind(['\r', '\n']) {
                break 'piece i + k + 1;
            }
            match ws.chars().next_back() {
                Some(last) if j < text.len() && last.len_utf8() < ws.len() => j - last.len_utf8(),
                _ => j,
            }
        };
        f(&text[i..end]);
        i = end;
    }
}

/// A piece longer than this is counted in parts of this many bytes: BPE
/// merging is quadratic in a piece's length, and a hostile prompt can be
/// one 16 MiB "word". Pieces of language are far shorter, so ordinary text
/// is counted exactly; cost is linear in the text.
const RUN: usize = 128;

/// Pieces repeat ("the", " and", punctuation): a per-thread memo of piece
/// → tokens spares tiktoken's regex and BPE for all but new pieces.
const MEMO_ENTRIES: usize = 16 * 1024;

thread_local! {
    static MEMO: std::cell::RefCell<rustc_hash::FxHashMap<Box<str>, u32>> = Default::default();
}

fn count_piece(piece: &str) -> u64 {
    if piece.len() > RUN {
        let mut n = 0;
        let mut start = 0;
        while start < piece.len() {
            let mut end = (start + RUN).min(piece.len());
            while !piece.is_char_boundary(end) {
                end -= 1;
            }
            n += encode_len(&piece[start..end]);
            start = end;
        }
        return n;
    }
    MEMO.with(|m| {
        if let Some(&n) = m.borrow().get(piece) {
            return u64::from(n);
        }
        let n = encode_len(piece) as u32;
        let mut m = m.borrow_mut();
        if m.len() >= MEMO_ENTRIES {
            m.clear();
        }
        m.insert(piece.into(), n);
        u64::from(n)
    })
}

pub fn count_text(text: &str) -> u64 {
    let mut n = 0;
    for_each_piece(text, |p| n += count_piece(p));
    n
}

fn count_value_text(v: Option<&Value>) -> u64 {
    value_text(v, &count_text)
}

/// `text`'s measure of a field: its tokens (`count_text`), or a bound on
/// them (see `prompt_bound`).
fn value_text(v: Option<&Value>, text: &impl Fn(&str) -> u64) -> u64 {
    match v {
        Some(Value::String(s)) => text(s),
        Some(Value::Null) | None => 0,
        // Structured content (arrays of parts, JSON arguments) is counted in
        // its serialised form.
        Some(other) => text(&other.to_string()),
    }
}

/// Tokens of the tool calls of one message or delta, in either protocol:
/// Ollama's arguments are an object (counted serialised), OpenAI's a string.
pub fn count_tool_calls(calls: Option<&Value>) -> u64 {
    tool_calls(calls, &count_text)
}

fn tool_calls(calls: Option<&Value>, text: &impl Fn(&str) -> u64) -> u64 {
    let Some(Value::Array(calls)) = calls else {
        return 0;
    };
    calls
        .iter()
        .map(|call| {
            let f = call.get("function");
            value_text(f.and_then(|f| f.get("name")), text) + value_text(f.and_then(|f| f.get("arguments")), text)
        })
        .sum()
}

/// Prompt tokens of a chat request (`/api/chat` or `/v1/chat/completions`).
pub fn count_chat_prompt(body: &Value) -> u64 {
    chat_prompt(body, &count_text)
}

/// Prompt tokens of an `/api/generate` request.
pub fn count_generate_prompt(body: &Value) -> u64 {
    generate_prompt(body, &count_text)
}

/// A bound on what `count_chat_prompt` (or, for `generate`,
/// `count_generate_prompt`) gives, found without tokenising: the same sum
/// with every text's bytes in place of its tokens (a token stands for one
/// byte of text at least).
pub fn prompt_bound(generate: bool, body: &Value) -> u64 {
    let bytes = |t: &str| t.len() as u64;
    if generate {
        generate_prompt(body, &bytes)
    } else {
        chat_prompt(body, &bytes)
    }
}

fn chat_prompt(body: &Value, text: &impl Fn(&str) -> u64) -> u64 {
    let mut total = 3;
    if let Some(Value::Array(messages)) = body.get("messages") {
        for m in messages {
            total += 4
                + value_text(m.get("role"), text)
                + value_text(m.get("content"), text)
                + value_text(m.get("thinking"), text)
                + value_text(m.get("name"), text)
                + value_text(m.get("tool_name"), text)
                + tool_calls(m.get("tool_calls"), text);
        }
    }
    total
        + match body.get("tools") {
            Some(Value::Array(tools)) if !tools.is_empty() => text(&serde_json::to_string(tools).expect("JSON values serialise")),
            _ => 0,
        }
}

fn generate_prompt(body: &Value, text: &impl Fn(&str) -> u64) -> u64 {
    value_text(body.get("prompt"), text) + value_text(body.get("system"), text) + value_text(body.get("suffix"), text)
}

/// Completion tokens of one Ollama chunk (`message` for chat, `response` for generate).
pub fn count_ollama_chunk(chunk: &Value) -> u64 {
    let mut n = count_value_text(chunk.get("response")) + count_value_text(chunk.get("thinking"));
    if let Some(m) = chunk.get("message") {
        n += count_value_text(m.get("content"))
            + count_value_text(m.get("thinking"))
            + count_tool_calls(m.get("tool_calls"));
    }
    n
}

/// Completion tokens of one OpenAI `chat.completion.chunk`.
pub fn count_openai_chunk(chunk: &Value) -> u64 {
    let Some(Value::Array(choices)) = chunk.get("choices") else {
        return 0;
    };
    choices
        .iter()
        .filter_map(|c| c.get("delta"))
        .map(|d| {
            count_value_text(d.get("content"))
                + count_value_text(d.get("reasoning"))
                + count_value_text(d.get("reasoning_content"))
                + count_tool_calls(d.get("tool_calls"))
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(super) fn bpe() -> &'static tiktoken_rs::CoreBPE {
        tiktoken_rs::cl100k_base_singleton()
    }

    #[test]
    fn counts_plain_text() {
        assert_eq!(count_text(""), 0);
        assert_eq!(count_text("hello world"), 2);
    }

    #[test]
    fn long_texts_count_like_short_ones_and_hostile_ones_are_bounded() {
        let sentence = "The quick brown fox jumps over the lazy dog. ";
        let long = sentence.repeat(2000); // ~90 KB
        assert_eq!(count_text(&long), bpe().encode_ordinary(&long).len() as u64, "exact");
        // one 512 KiB "word": counted in pieces, linear time
        let hostile = "a".repeat(512 * 1024);
        let n = count_text(&hostile);
        assert!(n > 0 && n < hostile.len() as u64);
        // multi-byte characters are never split
        let wide = "ü".repeat(50_000);
        assert!(count_text(&wide) > 0);
    }

    #[test]
    fn chat_prompt_includes_framing_and_tools() {
        let bare = json!({"messages": [{"role": "user", "content": "hello world"}]});
        // 3 + 4 + "user"(1) + "hello world"(2)
        assert_eq!(count_chat_prompt(&bare), 10);
        let with_tools = json!({"messages": [{"role": "user", "content": "hello world"}],
            "tools": [{"type": "function", "function": {"name": "get_weather"}}]});
        assert!(count_chat_prompt(&with_tools) > 10);
    }

    #[test]
    fn chunk_counts_cover_both_tool_call_shapes() {
        let ollama = json!({"message": {"role": "assistant", "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]}});
        let openai = json!({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"name": "get_weather", "arguments": "{\"city\":\"Tokyo\"}"}}]}}]});
        assert_eq!(count_ollama_chunk(&ollama), count_openai_chunk(&openai));
        assert!(count_ollama_chunk(&ollama) > 0);
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::tests::bpe;
    use super::*;

    proptest! {
        /// The gateway's split (regex crate plus the look-ahead fix) and the
        /// per-piece memo count exactly what tiktoken counts on the whole
        /// text: letters, digits, contractions (also `ſ`, which `(?i)` folds
        /// to `s`), punctuation, and every kind of whitespace run.
        #[test]
        fn counts_agree_with_tiktoken(s in "[a-zA-Z0-9 \t\r\n'.,!?_\\-ſüé漢字\u{a0}\u{2003}\u{85}]{0,120}") {
            prop_assert_eq!(count_text(&s), bpe().encode_ordinary(&s).len() as u64);
        }

        /// Long words, up to the length where counting cuts a piece: the
        /// gateway's byte pair merge runs on its own rank table, and
        /// tiktoken switches to another merge for pieces of 100 bytes on.
        #[test]
        fn long_words_agree_with_tiktoken(s in "[a-zA-Z]{60,128}|[a-zA-Zéü]{50,64}") {
            prop_assert!(s.len() <= RUN);
            prop_assert_eq!(count_text(&s), bpe().encode_ordinary(&s).len() as u64);
        }
    }

    proptest! {
        /// `prompt_bound` never falls below the count (the gateway decides
        /// with it whether a request may go to the upstream before its
        /// prompt is counted): any text, content as parts, tool calls and
        /// tool definitions, in both request shapes.
        #[test]
        fn the_prompt_bound_is_never_below_the_count(
            texts in proptest::collection::vec("\\PC{0,60}|<\\|endoftext\\|>|[ \n]{0,30}", 1..6),
            parts in any::<bool>(),
            tools in any::<bool>(),
        ) {
            let t = |i: usize| texts[i % texts.len()].clone();
            let content = if parts { serde_json::json!([{"type": "text", "text": t(1)}]) } else { Value::String(t(1)) };
            let mut body = serde_json::json!({
                "messages": [
                    {"role": t(0), "content": content, "thinking": t(2)},
                    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": t(3), "arguments": t(4)}}]},
                ],
                "prompt": t(0), "system": t(2), "suffix": t(4),
            });
            if tools {
                body["tools"] = serde_json::json!([{"type": "function", "function": {"name": t(3), "description": t(1)}}]);
            }
            prop_assert!(count_chat_prompt(&body) <= prompt_bound(false, &body));
            prop_assert!(count_generate_prompt(&body) <= prompt_bound(true, &body));
        }
    }

    #[test]
    fn prose_code_and_markup_count_exactly() {
        let samples = [
            include_str!("../README.md"),
            include_str!("proxy/relay.rs"),
            include_str!("../templates/base.html"),
            "Ünïcödé  façade — 2026-11-28T00:00:00Z, 12345678 items; it's   done\r\n\r\n\tok  \u{a0}x",
        ];
        for text in samples {
            assert_eq!(count_text(text), bpe().encode_ordinary(text).len() as u64);
        }
    }
}
