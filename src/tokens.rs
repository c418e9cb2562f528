//! Token counting with tiktoken (cl100k_base), the one rule both the gateway
//! and the test upstream use, so their counts agree.
//!
//! Prompt: every message costs its role, content, thinking, tool name and tool
//! calls plus 4 tokens of framing; the whole prompt 3 more; tool definitions
//! and the `system`/`suffix` fields of `/api/generate` are counted as text.
//! Completion: each streamed chunk is counted on its own (content, thinking,
//! tool-call names and arguments), which is how the relay meters as it goes.

use serde_json::Value;
use tiktoken_rs::{cl100k_base_singleton, CoreBPE};

/// Texts at least this long are tokenised on the blocking pool instead of a
/// runtime worker (measured: ~1 ms per 4 KiB on this class of machine).
pub const BLOCKING_THRESHOLD: usize = 32 * 1024;

fn bpe() -> &'static CoreBPE {
    cl100k_base_singleton()
}

/// Texts are tokenised in pieces: BPE merging is quadratic in the length
/// of one "word", and a hostile prompt can be a single 16 MiB word. Pieces
/// end just before whitespace once they pass `PIECE` bytes (exact for
/// ordinary text, where tokens never span whitespace that way), and a run
/// without whitespace is cut every `RUN` bytes (counted in parts: such runs
/// are not language). Cost is linear in the text.
const PIECE: usize = 8 * 1024;
const RUN: usize = 128;

fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut start = 0;
    let mut run_start = 0;
    let mut cuts = Vec::new();
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if i - start >= PIECE {
                cuts.push((start, i));
                start = i;
            }
            run_start = i + c.len_utf8();
        } else if i - run_start >= RUN {
            cuts.push((start, i));
            start = i;
            run_start = i;
        }
    }
    cuts.push((start, text.len()));
    cuts.into_iter().filter(|(a, b)| b > a).map(move |(a, b)| &text[a..b])
}

/// Stream chunks are mostly single words that repeat ("the", " and",
/// punctuation): a small per-thread memo spares the regex and BPE work.
const MEMO_MAX_LEN: usize = 24;
const MEMO_ENTRIES: usize = 4096;

thread_local! {
    static MEMO: std::cell::RefCell<std::collections::HashMap<Box<str>, u64>> = Default::default();
}

pub fn count_text(text: &str) -> u64 {
    if text.len() <= MEMO_MAX_LEN {
        if let Some(n) = MEMO.with(|m| m.borrow().get(text).copied()) {
            return n;
        }
        let n = bpe().encode_ordinary(text).len() as u64;
        MEMO.with(|m| {
            let mut m = m.borrow_mut();
            if m.len() >= MEMO_ENTRIES {
                m.clear();
            }
            m.insert(text.into(), n);
        });
        return n;
    }
    if text.len() <= RUN {
        return bpe().encode_ordinary(text).len() as u64;
    }
    pieces(text).map(|p| bpe().encode_ordinary(p).len() as u64).sum()
}

fn count_value_text(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::String(s)) => count_text(s),
        Some(Value::Null) | None => 0,
        // Structured content (arrays of parts, JSON arguments) is counted in
        // its serialised form.
        Some(other) => count_text(&other.to_string()),
    }
}

/// Tokens of the tool calls of one message or delta, in either protocol:
/// Ollama's arguments are an object (counted serialised), OpenAI's a string.
pub fn count_tool_calls(calls: Option<&Value>) -> u64 {
    let Some(Value::Array(calls)) = calls else {
        return 0;
    };
    calls
        .iter()
        .map(|call| {
            let f = call.get("function");
            count_value_text(f.and_then(|f| f.get("name")))
                + count_value_text(f.and_then(|f| f.get("arguments")))
        })
        .sum()
}

/// Prompt tokens of a chat request (`/api/chat` or `/v1/chat/completions`).
pub fn count_chat_prompt(body: &Value) -> u64 {
    let mut total = 3;
    if let Some(Value::Array(messages)) = body.get("messages") {
        for m in messages {
            total += 4
                + count_value_text(m.get("role"))
                + count_value_text(m.get("content"))
                + count_value_text(m.get("thinking"))
                + count_value_text(m.get("name"))
                + count_value_text(m.get("tool_name"))
                + count_tool_calls(m.get("tool_calls"));
        }
    }
    total + count_tools(body)
}

/// Prompt tokens of an `/api/generate` request.
pub fn count_generate_prompt(body: &Value) -> u64 {
    count_value_text(body.get("prompt"))
        + count_value_text(body.get("system"))
        + count_value_text(body.get("suffix"))
}

fn count_tools(body: &Value) -> u64 {
    match body.get("tools") {
        Some(Value::Array(tools)) if !tools.is_empty() => count_text(&Value::Array(tools.clone()).to_string()),
        _ => 0,
    }
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

    #[test]
    fn counts_plain_text() {
        assert_eq!(count_text(""), 0);
        assert_eq!(count_text("hello world"), 2);
    }

    #[test]
    fn long_texts_count_like_short_ones_and_hostile_ones_are_bounded() {
        let sentence = "The quick brown fox jumps over the lazy dog. ";
        let long = sentence.repeat(2000); // ~90 KB, cut at whitespace
        assert!(pieces(&long).count() > 10);
        assert_eq!(count_text(&long), bpe().encode_ordinary(&long).len() as u64, "cut at whitespace, exact");
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
