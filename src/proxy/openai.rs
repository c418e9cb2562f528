//! The OpenAI-compatible protocol (`/v1/chat/completions`): SSE chunks,
//! the usage chunk, tool-call deltas joined by index, and the non-stream
//! `chat.completion` object.

use std::{borrow::Cow, collections::BTreeMap};

use serde::{de::IgnoredAny, Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::ollama::{object, Obj};
use crate::tokens;

/// `(prompt_tokens, completion_tokens)` of a chunk carrying usage.
pub fn usage(chunk: &Value) -> Option<(u64, u64)> {
    chunk.get("usage").filter(|u| u.is_object()).map(usage_tokens)
}

/// `(prompt_tokens, completion_tokens)` of a usage object.
fn usage_tokens(usage: &Value) -> (u64, u64) {
    let n = |k| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
    (n("prompt_tokens"), n("completion_tokens"))
}

/// The usage-only chunk that `include_usage` adds at the end.
pub fn is_usage_chunk(chunk: &Value) -> bool {
    chunk.get("choices").and_then(Value::as_array).is_some_and(|c| c.is_empty()) && usage(chunk).is_some()
}

/// Identity of the completion, taken from the first chunk, for the chunks
/// the gateway writes itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Meta {
    pub id: String,
    pub created: i64,
    pub model: String,
    pub system_fingerprint: Option<Value>,
}

impl Meta {
    pub fn observe(&mut self, chunk: &Value) {
        if self.id.is_empty() {
            self.learn(
                chunk.get("id").and_then(Value::as_str),
                chunk.get("created").and_then(Value::as_i64),
                chunk.get("model").and_then(Value::as_str),
                chunk.get("system_fingerprint").cloned(),
            );
        }
    }

    /// `observe` for a chunk read as `Plain`.
    pub fn observe_plain(&mut self, chunk: &Plain) {
        if self.id.is_empty() {
            let fingerprint = chunk.system_fingerprint.as_ref().map(|fp| fp.as_deref().map_or(Value::Null, Value::from));
            self.learn(chunk.id.as_deref(), chunk.created, chunk.model.as_deref(), fingerprint);
        }
    }

    /// Until an `id` arrives, each chunk's identity fields replace the last's.
    fn learn(&mut self, id: Option<&str>, created: Option<i64>, model: Option<&str>, fingerprint: Option<Value>) {
        if let Some(id) = id {
            self.id = id.to_string();
        }
        self.created = created.unwrap_or(self.created);
        if let Some(m) = model {
            self.model = m.to_string();
        }
        self.system_fingerprint = fingerprint;
    }

    fn base(&self, object: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("object".into(), json!(object));
        m.insert("created".into(), json!(self.created));
        m.insert("model".into(), json!(self.model));
        if let Some(fp) = &self.system_fingerprint {
            m.insert("system_fingerprint".into(), fp.clone());
        }
        m
    }

    /// `finish_reason: "length"` chunk that ends a stream at the quota.
    pub fn length_chunk(&self) -> Value {
        let mut m = self.base("chat.completion.chunk");
        m.insert("choices".into(), json!([{"index": 0, "delta": {}, "finish_reason": "length"}]));
        Value::Object(m)
    }

    pub fn usage_chunk(&self, prompt: u64, completion: u64) -> Value {
        let mut m = self.base("chat.completion.chunk");
        m.insert("choices".into(), json!([]));
        m.insert("usage".into(), usage_object(prompt, completion));
        Value::Object(m)
    }
}

pub fn usage_object(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// An ordinary `chat.completion.chunk` read without building a
/// `serde_json::Value`: at most one choice (index 0), its delta's strings
/// borrowed, no usage, no tool calls, no error. `parse` declines anything
/// else, and the relay reads that chunk as a `Value`.
#[derive(Debug, Default)]
pub struct Plain<'a> {
    pub role: Option<Cow<'a, str>>,
    pub content: Option<Cow<'a, str>>,
    pub reasoning_content: Option<Cow<'a, str>>,
    pub reasoning: Option<Cow<'a, str>>,
    pub finish_reason: Option<Cow<'a, str>>,
    /// `choices` held one choice (an empty list is a usage chunk's shape).
    pub has_choice: bool,
    /// The completion's identity, for `Meta::observe_plain` (`parse_first` only).
    id: Option<Cow<'a, str>>,
    created: Option<i64>,
    model: Option<Cow<'a, str>>,
    /// Present (`Some`), and a string or null (`None`).
    system_fingerprint: Option<Option<Cow<'a, str>>>,
}

#[derive(Deserialize)]
struct PlainChunk<'a> {
    #[serde(borrow)]
    choices: Option<Vec<Obj<PlainChoice<'a>>>>,
    usage: Option<IgnoredAny>,
    error: Option<IgnoredAny>,
}

/// `PlainChunk` with the completion's identity: read only until it is
/// known (matching four more names costs every later chunk about 500
/// instructions).
#[derive(Deserialize)]
struct FirstChunk<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    created: Option<i64>,
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    /// Any other kind of fingerprint than a string or null fails the parse,
    /// and the chunk is read as a `Value`.
    #[serde(borrow, default, deserialize_with = "present")]
    system_fingerprint: Option<Option<Cow<'a, str>>>,
    #[serde(borrow)]
    choices: Option<Vec<Obj<PlainChoice<'a>>>>,
    usage: Option<IgnoredAny>,
    error: Option<IgnoredAny>,
}

/// A field that is there, even as null (`Some(None)`): serde's `Option`
/// alone reads null as absent.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct PlainChoice<'a> {
    index: Option<u64>,
    #[serde(borrow)]
    delta: Option<Obj<PlainDelta<'a>>>,
    #[serde(borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct PlainDelta<'a> {
    #[serde(borrow)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(borrow)]
    reasoning: Option<Cow<'a, str>>,
    tool_calls: Option<IgnoredAny>,
}

impl<'a> Plain<'a> {
    /// An ordinary chunk; the completion's identity is not read.
    pub fn parse(text: &'a str) -> Option<Plain<'a>> {
        let c: PlainChunk<'a> = object(text)?;
        Plain::default().with_choices(c.choices, c.usage.is_some() || c.error.is_some())
    }

    /// A chunk before the completion's identity is known: also reads
    /// `id`, `created`, `model` and `system_fingerprint`.
    pub fn parse_first(text: &'a str) -> Option<Plain<'a>> {
        let c: FirstChunk<'a> = object(text)?;
        let p = Plain { id: c.id, created: c.created, model: c.model, system_fingerprint: c.system_fingerprint, ..Plain::default() };
        p.with_choices(c.choices, c.usage.is_some() || c.error.is_some())
    }

    fn with_choices(mut self, choices: Option<Vec<Obj<PlainChoice<'a>>>>, usage_or_error: bool) -> Option<Plain<'a>> {
        if usage_or_error {
            return None;
        }
        let mut choices = choices?;
        if choices.len() > 1 {
            return None;
        }
        let Some(Obj(c)) = choices.pop() else {
            return Some(self);
        };
        if c.index.unwrap_or(0) != 0 {
            return None;
        }
        self.has_choice = true;
        self.finish_reason = c.finish_reason;
        if let Some(Obj(d)) = c.delta {
            if d.tool_calls.is_some() {
                return None;
            }
            (self.role, self.content, self.reasoning_content, self.reasoning) = (d.role, d.content, d.reasoning_content, d.reasoning);
        }
        Some(self)
    }

    /// What `tokens::count_openai_chunk` counts.
    pub fn tokens(&self) -> u64 {
        [&self.content, &self.reasoning, &self.reasoning_content].into_iter().flatten().map(|t| tokens::count_text(t)).sum()
    }
}

/// The usage-only chunk that `include_usage` adds at the end (`choices`
/// empty, `usage` an object), read without a `Value` around its usage.
#[derive(Debug)]
pub struct UsageOnly {
    /// `(prompt_tokens, completion_tokens)`, as `usage` reads them.
    pub tokens: (u64, u64),
    pub usage: Value,
}

#[derive(Deserialize)]
struct UsageChunk {
    choices: Vec<IgnoredAny>,
    usage: Value,
    error: Option<IgnoredAny>,
}

impl UsageOnly {
    pub fn parse(text: &str) -> Option<UsageOnly> {
        let c: UsageChunk = object(text)?;
        if !c.choices.is_empty() || c.error.is_some() || !c.usage.is_object() {
            return None;
        }
        Some(UsageOnly { tokens: usage_tokens(&c.usage), usage: c.usage })
    }
}

#[derive(Debug, Default)]
struct Choice {
    role: Option<String>,
    content: Option<String>,
    reasoning: Option<String>,
    /// tool-call index → (id, type, name, arguments)
    tool_calls: BTreeMap<u64, (Value, String, String, String)>,
    finish_reason: Value,
}

/// Builds the non-stream `chat.completion` from stream chunks.
#[derive(Debug, Default)]
pub struct Assembler {
    pub meta: Meta,
    choices: BTreeMap<u64, Choice>,
    usage: Option<Value>,
}

impl Assembler {
    pub fn push(&mut self, chunk: &Value) {
        self.meta.observe(chunk);
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(u.clone());
        }
        let Some(choices) = chunk.get("choices").and_then(Value::as_array) else { return };
        for c in choices {
            let idx = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            let choice = self.choices.entry(idx).or_default();
            if let Some(fr) = c.get("finish_reason").filter(|f| !f.is_null()) {
                choice.finish_reason = fr.clone();
            }
            let Some(delta) = c.get("delta") else { continue };
            if let Some(r) = delta.get("role").and_then(Value::as_str) {
                choice.role = Some(r.to_string());
            }
            if let Some(t) = delta.get("content").and_then(Value::as_str) {
                choice.content.get_or_insert_with(String::new).push_str(t);
            }
            for k in ["reasoning_content", "reasoning"] {
                if let Some(t) = delta.get(k).and_then(Value::as_str) {
                    choice.reasoning.get_or_insert_with(String::new).push_str(t);
                }
            }
            for call in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
                let ti = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                let entry = choice.tool_calls.entry(ti).or_insert_with(|| (Value::Null, "function".into(), String::new(), String::new()));
                if let Some(id) = call.get("id").filter(|v| !v.is_null()) {
                    entry.0 = id.clone();
                }
                if let Some(t) = call.get("type").and_then(Value::as_str) {
                    entry.1 = t.to_string();
                }
                if let Some(f) = call.get("function") {
                    if let Some(n) = f.get("name").and_then(Value::as_str) {
                        entry.2.push_str(n);
                    }
                    if let Some(a) = f.get("arguments").and_then(Value::as_str) {
                        entry.3.push_str(a);
                    }
                }
            }
        }
    }

    /// `push` for a chunk read as `UsageOnly`.
    pub fn push_usage(&mut self, usage: Value) {
        self.usage = Some(usage);
    }

    /// `push` for a chunk read as `Plain` (after the first, which sets `meta`).
    pub fn push_plain(&mut self, chunk: &Plain) {
        if !chunk.has_choice {
            return;
        }
        let choice = self.choices.entry(0).or_default();
        if let Some(fr) = &chunk.finish_reason {
            choice.finish_reason = Value::String(fr.to_string());
        }
        if let Some(r) = &chunk.role {
            choice.role = Some(r.to_string());
        }
        if let Some(t) = &chunk.content {
            choice.content.get_or_insert_with(String::new).push_str(t);
        }
        for t in [&chunk.reasoning_content, &chunk.reasoning].into_iter().flatten() {
            choice.reasoning.get_or_insert_with(String::new).push_str(t);
        }
    }

    /// The `chat.completion`; `ended_at_quota` sets `finish_reason: "length"`
    /// and `fallback_usage` fills `usage` when the upstream sent none.
    pub fn finish(mut self, ended_at_quota: bool, fallback_usage: (u64, u64)) -> Completion {
        if self.choices.is_empty() {
            self.choices.insert(0, Choice::default());
        }
        let choices = self
            .choices
            .into_iter()
            .map(|(index, c)| CompletionChoice {
                index,
                message: Message {
                    role: c.role.unwrap_or_else(|| "assistant".into()),
                    content: c.content,
                    reasoning_content: c.reasoning,
                    tool_calls: c
                        .tool_calls
                        .into_values()
                        .map(|(id, kind, name, arguments)| ToolCall { id, kind, function: Function { name, arguments } })
                        .collect(),
                },
                logprobs: None,
                finish_reason: if ended_at_quota { Value::from("length") } else { c.finish_reason },
            })
            .collect();
        let usage = match (ended_at_quota, self.usage) {
            (false, Some(u)) => u,
            _ => usage_object(fallback_usage.0, fallback_usage.1),
        };
        let Meta { id, created, model, system_fingerprint } = self.meta;
        Completion { id, object: "chat.completion", created, model, system_fingerprint, choices, usage }
    }
}

/// The non-stream answer, `chat.completion`, in OpenAI's field order;
/// serialised straight from these types, without a `Value` tree.
#[derive(Debug, PartialEq, Serialize)]
pub struct Completion {
    id: String,
    object: &'static str,
    created: i64,
    model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<Value>,
    choices: Vec<CompletionChoice>,
    /// The upstream's own usage object (any extra fields kept), or the
    /// gateway's count.
    usage: Value,
}

#[derive(Debug, PartialEq, Serialize)]
struct CompletionChoice {
    index: u64,
    message: Message,
    logprobs: Option<Value>,
    finish_reason: Value,
}

#[derive(Debug, PartialEq, Serialize)]
struct Message {
    role: String,
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCall>,
}

#[derive(Debug, PartialEq, Serialize)]
struct ToolCall {
    id: Value,
    #[serde(rename = "type")]
    kind: String,
    function: Function,
}

#[derive(Debug, PartialEq, Serialize)]
struct Function {
    name: String,
    arguments: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_tool_call_fragments_by_index() {
        let mut a = Assembler::default();
        a.push(&json!({"id": "c1", "created": 5, "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant",
            "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
            "finish_reason": null}]}));
        a.push(&json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}}]}));
        a.push(&json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\"Tokyo\"}"}}]}}]}));
        a.push(&json!({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}));
        a.push(&json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}));
        let out = serde_json::to_value(a.finish(false, (0, 0))).unwrap();
        assert_eq!(out["object"], "chat.completion");
        assert_eq!(out["id"], "c1");
        let call = &out["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["id"], "call_1");
        assert_eq!(call["function"]["arguments"], "{\"city\":\"Tokyo\"}");
        assert_eq!(out["choices"][0]["message"]["content"], Value::Null);
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(out["usage"]["total_tokens"], 7);
    }

    /// The answer's bytes, field order included: what clients that compare
    /// or hash responses see (reasoning, tool calls, a fingerprint, and the
    /// upstream's usage object with a field the gateway does not know).
    #[test]
    fn completion_serialises_in_openai_field_order() {
        let mut a = Assembler::default();
        a.push(&json!({"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m", "system_fingerprint": "fp",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi", "reasoning_content": "hm"}, "finish_reason": null}]}));
        a.push(&json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "f", "arguments": "{}"}}]}}]}));
        a.push(&json!({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}));
        a.push(&json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 0}}}));
        assert_eq!(
            serde_json::to_string(&a.finish(false, (0, 0))).unwrap(),
            concat!(
                r#"{"id":"c1","object":"chat.completion","created":5,"model":"m","system_fingerprint":"fp","#,
                r#""choices":[{"index":0,"message":{"role":"assistant","content":"Hi","reasoning_content":"hm","#,
                r#""tool_calls":[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{}"}}]},"#,
                r#""logprobs":null,"finish_reason":"tool_calls"}],"#,
                r#""usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":0}}}"#
            )
        );
        let mut plain = Assembler::default();
        plain.push(&json!({"id": "c2", "created": 6, "model": "m", "choices": [{"index": 0, "delta": {"content": "x"}}]}));
        assert_eq!(
            serde_json::to_string(&plain.finish(true, (2, 1))).unwrap(),
            concat!(
                r#"{"id":"c2","object":"chat.completion","created":6,"model":"m","#,
                r#""choices":[{"index":0,"message":{"role":"assistant","content":"x"},"logprobs":null,"finish_reason":"length"}],"#,
                r#""usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}"#
            )
        );
    }

    #[test]
    fn quota_end_reports_length_and_gateway_usage() {
        let mut a = Assembler::default();
        a.push(&json!({"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": null}]}));
        let out = serde_json::to_value(a.finish(true, (2, 1))).unwrap();
        assert_eq!(out["choices"][0]["finish_reason"], "length");
        assert_eq!(out["choices"][0]["message"]["content"], "Hi");
        assert_eq!(out["usage"]["completion_tokens"], 1);
        assert!(is_usage_chunk(&Meta::default().usage_chunk(1, 2)));
    }
}
