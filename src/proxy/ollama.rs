//! Ollama's native protocol (`/api/chat`, `/api/generate`): NDJSON chunks,
//! the final `done: true` statistics, and the single non-stream object.

use std::borrow::Cow;

use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use serde::{de::IgnoredAny, Deserialize};
use serde_json::{json, value::RawValue, Value};

use crate::tokens;

/// `(prompt_eval_count, eval_count)` of a final chunk.
pub fn usage(chunk: &Value) -> Option<(u64, u64)> {
    if !is_final(chunk) {
        return None;
    }
    let n = |k| chunk.get(k).and_then(Value::as_u64);
    Some((n("prompt_eval_count").unwrap_or(0), n("eval_count").unwrap_or(0)))
}

pub fn is_final(chunk: &Value) -> bool {
    chunk.get("done").and_then(Value::as_bool) == Some(true)
}

/// The final chunk the gateway writes when the key's quota ends the
/// completion: what Ollama sends when `num_predict` runs out.
pub fn length_chunk(generate: bool, model: &str, prompt: u64, completion: u64, elapsed_ns: u64) -> Value {
    let mut v = json!({
        "model": model,
        "created_at": Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true),
    });
    let obj = v.as_object_mut().expect("object literal");
    if generate {
        obj.insert("response".into(), json!(""));
    } else {
        obj.insert("message".into(), json!({"role": "assistant", "content": ""}));
    }
    obj.insert("done".into(), json!(true));
    obj.insert("done_reason".into(), json!("length"));
    obj.insert("total_duration".into(), json!(elapsed_ns));
    obj.insert("prompt_eval_count".into(), json!(prompt));
    obj.insert("eval_count".into(), json!(completion));
    v
}

/// An ordinary chunk read without building a `serde_json::Value`: its
/// strings borrowed, everything else skipped. `parse` declines (and the
/// relay reads the chunk as a `Value`) whenever the chunk is anything else:
/// an error, tool calls, images, a field of an unexpected type.
#[derive(Debug, Default, Deserialize)]
pub struct Plain<'a> {
    #[serde(borrow)]
    response: Option<Cow<'a, str>>,
    #[serde(borrow)]
    thinking: Option<Cow<'a, str>>,
    #[serde(borrow)]
    message: Option<Obj<PlainMessage<'a>>>,
    done: Option<bool>,
    prompt_eval_count: Option<u64>,
    eval_count: Option<u64>,
    error: Option<IgnoredAny>,
    #[serde(skip)]
    content: Option<Cow<'a, str>>,
    #[serde(skip)]
    message_thinking: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
struct PlainMessage<'a> {
    #[serde(borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow)]
    thinking: Option<Cow<'a, str>>,
    tool_calls: Option<IgnoredAny>,
    images: Option<IgnoredAny>,
}

/// `text` read as `T` if it is a JSON object.
pub(super) fn object<'a, T: Deserialize<'a>>(text: &'a str) -> Option<T> {
    serde_json::from_str::<Obj<T>>(text).ok().map(|o| o.0)
}

/// A `T` that only a JSON object gives: serde would also read an array
/// into a struct, field by position. Nested in a struct, it reads the
/// object in the same pass as its parent.
#[derive(Debug)]
pub(super) struct Obj<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Only<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Only<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Obj)
            }
        }
        d.deserialize_map(Only(std::marker::PhantomData))
    }
}

impl<'a> Plain<'a> {
    pub fn parse(text: &'a str) -> Option<Plain<'a>> {
        let mut p: Plain<'a> = object(text)?;
        if p.error.is_some() {
            return None;
        }
        if let Some(Obj(m)) = p.message.take() {
            if m.tool_calls.is_some() || m.images.is_some() {
                return None;
            }
            p.content = m.content;
            p.message_thinking = m.thinking;
        }
        Some(p)
    }

    /// What `tokens::count_ollama_chunk` counts.
    pub fn tokens(&self) -> u64 {
        [&self.response, &self.thinking, &self.content, &self.message_thinking]
            .into_iter()
            .flatten()
            .map(|t| tokens::count_text(t))
            .sum()
    }

    pub fn is_final(&self) -> bool {
        self.done == Some(true)
    }

    /// What `usage` reads from a final chunk.
    pub fn usage(&self) -> Option<(u64, u64)> {
        self.is_final().then(|| (self.prompt_eval_count.unwrap_or(0), self.eval_count.unwrap_or(0)))
    }
}

/// Builds the non-stream answer from chunks: the final chunk's fields with
/// the whole message (or response) put back together.
#[derive(Debug, Default)]
pub struct Assembler {
    generate: bool,
    content: String,
    thinking: String,
    tool_calls: Vec<Value>,
    images: Option<Value>,
}

impl Assembler {
    pub fn new(generate: bool) -> Self {
        Assembler { generate, ..Default::default() }
    }

    pub fn push(&mut self, chunk: &Value) {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
        if self.generate {
            self.content += &text(chunk.get("response"));
            self.thinking += &text(chunk.get("thinking"));
        } else if let Some(m) = chunk.get("message") {
            self.content += &text(m.get("content"));
            self.thinking += &text(m.get("thinking"));
            if let Some(Value::Array(calls)) = m.get("tool_calls") {
                self.tool_calls.extend(calls.iter().cloned());
            }
            if let Some(images) = m.get("images").filter(|i| !i.is_null()) {
                self.images = Some(images.clone());
            }
        }
    }

    /// `push` for a chunk read as `Plain`.
    pub fn push_plain(&mut self, chunk: &Plain) {
        let (content, thinking) =
            if self.generate { (&chunk.response, &chunk.thinking) } else { (&chunk.content, &chunk.message_thinking) };
        self.content.push_str(content.as_deref().unwrap_or(""));
        self.thinking.push_str(thinking.as_deref().unwrap_or(""));
    }

    /// The answer: the final chunk (the upstream's, or the gateway's own) as
    /// it came, each member's text untouched, with the message (or response)
    /// put back together, in Ollama's order (model, created_at,
    /// message/response, thinking, then the rest). The chunk is read as its
    /// members' text, not as a `Value`: no map is built, so none is hashed.
    pub fn finish(self, final_chunk: &str) -> Bytes {
        let members = object::<Members>(final_chunk).map(|m| m.0).unwrap_or_default();
        let mut out = Vec::with_capacity(final_chunk.len() + self.content.len() + self.thinking.len() + 64);
        out.push(b'{');
        let ours: &[&str] = match (self.generate, self.thinking.is_empty()) {
            (false, _) => &["message"],
            (true, true) => &["response"],
            (true, false) => &["response", "thinking"],
        };
        for key in FRONT {
            if ours.contains(&key) {
                member(&mut out, key);
                self.write_own(&mut out, key);
            } else {
                for (k, v) in members.iter().filter(|(k, _)| k == key) {
                    member(&mut out, k);
                    out.extend_from_slice(v.get().as_bytes());
                }
            }
        }
        for (k, v) in members.iter().filter(|(k, _)| !FRONT.contains(&k.as_ref())) {
            member(&mut out, k);
            out.extend_from_slice(v.get().as_bytes());
        }
        out.push(b'}');
        Bytes::from(out)
    }

    /// The value of one of the members the answer puts back together.
    fn write_own(&self, out: &mut Vec<u8>, key: &str) {
        match key {
            "response" => write_json(out, &self.content),
            "thinking" => write_json(out, &self.thinking),
            _ => {
                out.extend_from_slice(br#"{"role":"assistant","content":"#);
                write_json(out, &self.content);
                if !self.thinking.is_empty() {
                    out.extend_from_slice(br#","thinking":"#);
                    write_json(out, &self.thinking);
                }
                if !self.tool_calls.is_empty() {
                    out.extend_from_slice(br#","tool_calls":"#);
                    write_json(out, &self.tool_calls);
                }
                if let Some(images) = &self.images {
                    out.extend_from_slice(br#","images":"#);
                    write_json(out, images);
                }
                out.push(b'}');
            }
        }
    }
}

/// The members a non-stream answer starts with, in this order.
const FRONT: [&str; 5] = ["model", "created_at", "message", "response", "thinking"];

/// `"key":` after the previous member's comma, if there was one.
fn member(out: &mut Vec<u8>, key: &str) {
    if out.len() > 1 {
        out.push(b',');
    }
    write_json(out, key);
    out.push(b':');
}

fn write_json(out: &mut Vec<u8>, v: &(impl serde::Serialize + ?Sized)) {
    serde_json::to_writer(out, v).expect("strings and values serialise into a Vec");
}

/// A JSON object's members in their order, each value as its text. Keys
/// that appear twice stay twice, as they came (the stream relays them so).
#[derive(Default)]
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::with_capacity(16);
                while let Some((Key(k), v)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    members.push((k, v));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// A member's key: borrowed from the text unless it holds escapes.
#[derive(Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_chat_with_tool_calls_and_final_statistics() {
        let mut a = Assembler::new(false);
        a.push(&json!({"model": "m", "message": {"role": "assistant", "content": "Hel"}, "done": false}));
        a.push(&json!({"model": "m", "message": {"role": "assistant", "content": "lo",
            "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}, "done": false}));
        let out = a.finish(r#"{"model": "m", "created_at": "t", "message": {"role": "assistant", "content": ""},
            "done": true, "done_reason": "stop", "eval_count": 2}"#);
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["message"]["content"], "Hello");
        assert_eq!(out["message"]["tool_calls"][0]["function"]["arguments"]["a"], 1);
        assert_eq!(out["done_reason"], "stop");
        assert_eq!(out["eval_count"], 2);
        let keys: Vec<&String> = out.as_object().unwrap().keys().collect();
        assert_eq!(keys[..3], ["model", "created_at", "message"]);
    }

    #[test]
    fn a_generate_answer_keeps_the_final_chunks_text_as_it_came() {
        let mut a = Assembler::new(true);
        a.push(&json!({"model": "m", "response": "say \"hi\"\n", "done": false}));
        a.push(&json!({"model": "m", "response": "é", "thinking": "hm", "done": false}));
        let last = r#"{"done_reason":"stop","model":"m","response":"","created_at":"t","done":true,"context":[1, 2,3],"total_duration":1.50e3,"x\u0041":{"b":1,"a":2}}"#;
        let out = String::from_utf8(a.finish(last).to_vec()).unwrap();
        assert_eq!(
            out,
            r#"{"model":"m","created_at":"t","response":"say \"hi\"\né","thinking":"hm","done_reason":"stop","done":true,"context":[1, 2,3],"total_duration":1.50e3,"xA":{"b":1,"a":2}}"#
        );
    }

    #[test]
    fn an_answer_without_a_usable_final_chunk_is_still_an_object() {
        let mut a = Assembler::new(false);
        a.push(&json!({"message": {"role": "assistant", "content": "x"}}));
        assert_eq!(&a.finish("[1]")[..], br#"{"message":{"role":"assistant","content":"x"}}"#);
    }

    #[test]
    fn length_chunk_is_a_final_chunk() {
        let c = length_chunk(true, "m", 5, 7, 1);
        assert!(is_final(&c));
        assert_eq!(usage(&c), Some((5, 7)));
        assert_eq!(c["response"], "");
        assert_eq!(c["done_reason"], "length");
    }
}
