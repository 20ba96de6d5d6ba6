//! The OpenAI API's shapes: reading `/v1/chat/completions` and `/v1/completions` request bodies
//! into a [`GenerationRequest`], and writing the `chat.completion`, `chat.completion.chunk`,
//! `text_completion`, model list and error objects that OpenAI clients expect.
//!
//! Sampling defaults are `sun generate`'s (temperature 0, top_p 1, seed 0, 256 new tokens), so
//! a request and the command line with the same settings give the same answer.

use crate::chat::Message;
use crate::sampling::SamplingParams;
use crate::serve::http::HttpError;
use crate::serve::worker::{Finish, Outcome};
use serde_json::{json, Map, Value};

/// The most stop sequences a request may give (as OpenAI allows).
const MAX_STOPS: usize = 4;

/// New tokens when a request does not say (`sun generate`'s default), capped by the limit.
const DEFAULT_MAX_TOKENS: usize = 256;

/// What to continue: a conversation (rendered by the chat template) or plain text.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Prompt {
    /// Chat messages.
    Chat(Vec<Message>),
    /// Text continued as is, after the tokenizer's BOS.
    Text(String),
}

/// A generation request from either endpoint.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct GenerationRequest {
    /// The prompt.
    pub(crate) prompt: Prompt,
    /// Most new tokens.
    pub(crate) max_tokens: usize,
    /// Sampling settings.
    pub(crate) params: SamplingParams,
    /// Stop sequences.
    pub(crate) stops: Vec<String>,
    /// Answer as server-sent events.
    pub(crate) stream: bool,
    /// Add a last chunk with the token counts (`stream_options.include_usage`).
    pub(crate) include_usage: bool,
}

/// A 400 naming the field at fault.
fn bad(message: impl Into<String>) -> HttpError {
    HttpError::new(400, message)
}

/// The JSON object of a request body.
fn parse_object(body: &[u8]) -> Result<Map<String, Value>, HttpError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(bad("the body must be a JSON object")),
    }
}

/// Typed access to optional fields; `null` counts as absent, as in OpenAI's API.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn number(&self, name: &str) -> Result<Option<f64>, HttpError> {
        self.get(name)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| bad(format!("`{name}` must be a number, got {v}")))
            })
            .transpose()
    }

    fn count(&self, name: &str) -> Result<Option<u64>, HttpError> {
        self.get(name)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| bad(format!("`{name}` must be a non-negative integer, got {v}")))
            })
            .transpose()
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>, HttpError> {
        self.get(name)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| bad(format!("`{name}` must be true or false, got {v}")))
            })
            .transpose()
    }

    fn string(&self, name: &str) -> Result<Option<&str>, HttpError> {
        self.get(name)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| bad(format!("`{name}` must be a string, got {v}")))
            })
            .transpose()
    }

    /// Fails when `name` is given with a value other than `neutral`: a feature not offered.
    fn only(&self, name: &str, neutral: &Value, why: &str) -> Result<(), HttpError> {
        match self.get(name) {
            Some(v) if v != neutral => Err(bad(format!("`{name}` is not supported: {why}"))),
            _ => Ok(()),
        }
    }
}

/// Limits a request must stay within.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GenerationLimits {
    /// The largest `max_tokens` accepted.
    pub(crate) max_tokens: usize,
}

/// Reads the settings both endpoints share.
fn parse_common(
    fields: &Fields,
    prompt: Prompt,
    limits: &GenerationLimits,
) -> Result<GenerationRequest, HttpError> {
    fields.string("model")?;
    fields.only("n", &json!(1), "one choice per request")?;
    fields.only("best_of", &json!(1), "one choice per request")?;
    fields.only(
        "logprobs",
        &json!(false),
        "log probabilities are not returned",
    )?;
    fields.only("echo", &json!(false), "the prompt is not echoed")?;
    fields.only("suffix", &json!(""), "no insertion")?;
    for penalty in ["frequency_penalty", "presence_penalty"] {
        let value = fields.number(penalty)?;
        if value.is_some_and(|v| v != 0.0) {
            return Err(bad(format!("`{penalty}` is not supported: leave it 0")));
        }
    }
    for name in ["tools", "functions", "logit_bias"] {
        if fields
            .get(name)
            .is_some_and(|v| v != &json!([]) && v != &json!({}))
        {
            return Err(bad(format!("`{name}` is not supported")));
        }
    }

    let max_tokens = match fields.count("max_completion_tokens")? {
        Some(n) => Some(n),
        None => fields.count("max_tokens")?,
    }
    .unwrap_or(DEFAULT_MAX_TOKENS.min(limits.max_tokens) as u64);
    if max_tokens == 0 || max_tokens > limits.max_tokens as u64 {
        return Err(bad(format!(
            "`max_tokens` must lie in 1..={}, got {max_tokens}",
            limits.max_tokens
        )));
    }
    let temperature = fields.number("temperature")?.unwrap_or(0.0);
    if !(0.0..=100.0).contains(&temperature) {
        return Err(bad(format!(
            "`temperature` must lie in [0, 100] (0 is greedy), got {temperature}"
        )));
    }
    let top_p = fields.number("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(format!("`top_p` must lie in (0, 1], got {top_p}")));
    }
    let top_k = fields.count("top_k")?.unwrap_or(0);
    let seed = fields.count("seed")?.unwrap_or(0);
    let stream = fields.boolean("stream")?.unwrap_or(false);
    let include_usage = match fields.get("stream_options") {
        None => false,
        Some(Value::Object(options)) => Fields(options).boolean("include_usage")?.unwrap_or(false),
        Some(v) => return Err(bad(format!("`stream_options` must be an object, got {v}"))),
    };
    Ok(GenerationRequest {
        prompt,
        max_tokens: max_tokens as usize,
        params: SamplingParams {
            temperature: temperature as f32,
            top_k: usize::try_from(top_k).unwrap_or(usize::MAX),
            top_p: top_p as f32,
            seed,
        },
        stops: parse_stops(fields.get("stop"))?,
        stream,
        include_usage,
    })
}

/// `stop`: a string or a list of up to four non-empty strings.
fn parse_stops(stop: Option<&Value>) -> Result<Vec<String>, HttpError> {
    let stops: Vec<String> = match stop {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("`stop` entries must be strings, got {v}")))
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(bad(format!(
                "`stop` must be a string or a list of strings, got {v}"
            )))
        }
    };
    if stops.len() > MAX_STOPS {
        return Err(bad(format!(
            "`stop` holds {} sequences; at most {MAX_STOPS}",
            stops.len()
        )));
    }
    if stops.iter().any(String::is_empty) {
        return Err(bad("`stop` sequences must not be empty"));
    }
    Ok(stops)
}

/// Reads a `/v1/chat/completions` body.
pub(crate) fn parse_chat_request(
    body: &[u8],
    limits: &GenerationLimits,
) -> Result<GenerationRequest, HttpError> {
    let object = parse_object(body)?;
    let fields = Fields(&object);
    let messages = match fields.get("messages") {
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, m)| parse_message(i, m))
            .collect::<Result<Vec<_>, _>>()?,
        Some(Value::Array(_)) => return Err(bad("`messages` is empty")),
        Some(v) => return Err(bad(format!("`messages` must be a list, got {v}"))),
        None => return Err(bad("`messages` is required")),
    };
    parse_common(&fields, Prompt::Chat(messages), limits)
}

/// One chat message: `role` system/developer/user/assistant and `content` a string or a list
/// of text parts.
fn parse_message(index: usize, value: &Value) -> Result<Message, HttpError> {
    let at = |what: String| bad(format!("`messages[{index}]`: {what}"));
    let Value::Object(map) = value else {
        return Err(at(format!("must be an object, got {value}")));
    };
    let fields = Fields(map);
    let role = match fields.string("role").map_err(|e| at(e.message))? {
        Some("developer") | Some("system") => "system",
        Some(role @ ("user" | "assistant")) => role,
        Some(other) => {
            return Err(at(format!(
                "role {other:?} is not system, developer, user or assistant"
            )))
        }
        None => return Err(at("`role` is required".into())),
    };
    let content = match fields.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|part| match part.get("type").and_then(Value::as_str) {
                Some("text") => part
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| at("a text part needs a string `text`".into())),
                _ => Err(at(format!(
                    "only text content parts are supported, got {part}"
                ))),
            })
            .collect::<Result<String, _>>()?,
        None if role == "assistant" => String::new(),
        Some(v) => return Err(at(format!("`content` must be a string, got {v}"))),
        None => return Err(at("`content` is required".into())),
    };
    Ok(Message::new(role, &content))
}

/// Reads a `/v1/completions` body: `prompt` is a string (or a list of exactly one).
pub(crate) fn parse_completion_request(
    body: &[u8],
    limits: &GenerationLimits,
) -> Result<GenerationRequest, HttpError> {
    let object = parse_object(body)?;
    let fields = Fields(&object);
    let prompt = match fields.get("prompt") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(text)] => text.clone(),
            _ => {
                return Err(bad(
                    "`prompt` as a list must hold exactly one string (one prompt per request)",
                ))
            }
        },
        Some(v) => return Err(bad(format!("`prompt` must be a string, got {v}"))),
        None => return Err(bad("`prompt` is required")),
    };
    parse_common(&fields, Prompt::Text(prompt), limits)
}

/// Which endpoint an answer is for; it decides the objects' shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

/// The fields every answer object of one request shares.
#[derive(Clone, Debug)]
pub(crate) struct Answer {
    /// The endpoint.
    pub(crate) endpoint: Endpoint,
    /// `chatcmpl-N` or `cmpl-N`.
    pub(crate) id: String,
    /// Unix seconds when the request arrived.
    pub(crate) created: u64,
    /// The served model's name.
    pub(crate) model: String,
    /// Tokens in the rendered prompt.
    pub(crate) prompt_tokens: usize,
}

impl Answer {
    /// The shared fields of a request numbered `number`.
    pub(crate) fn new(
        endpoint: Endpoint,
        number: u64,
        created: u64,
        model: &str,
        prompt_tokens: usize,
    ) -> Self {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        Answer {
            endpoint,
            id: format!("{prefix}-{number}"),
            created,
            model: model.to_string(),
            prompt_tokens,
        }
    }

    fn usage(&self, completion_tokens: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        })
    }

    /// The server's own measurements, under llama.cpp's server's names (an extra field that
    /// OpenAI clients ignore): prefill until the first new token, then decoding speed.
    fn timings(&self, outcome: &Outcome) -> Value {
        let predicted_s = outcome.decode.as_secs_f64();
        let per_second = (outcome.completion_tokens > 1 && predicted_s > 0.0)
            .then(|| (outcome.completion_tokens - 1) as f64 / predicted_s);
        json!({
            "prompt_n": self.prompt_tokens,
            "prompt_ms": outcome.prefill.as_secs_f64() * 1e3,
            "predicted_n": outcome.completion_tokens,
            "predicted_ms": predicted_s * 1e3,
            "predicted_per_second": per_second,
        })
    }

    fn object(&self, kind: &str, choice: Value) -> Map<String, Value> {
        let mut object = Map::new();
        object.insert("id".into(), json!(self.id));
        object.insert("object".into(), json!(kind));
        object.insert("created".into(), json!(self.created));
        object.insert("model".into(), json!(self.model));
        object.insert("system_fingerprint".into(), Value::Null);
        object.insert("choices".into(), json!([choice]));
        object
    }

    /// The whole answer, not streamed.
    pub(crate) fn complete(&self, text: &str, outcome: &Outcome) -> Value {
        let finish = outcome.finish;
        let mut object = match self.endpoint {
            Endpoint::Chat => self.object(
                "chat.completion",
                json!({
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": finish.as_str(),
                }),
            ),
            Endpoint::Completion => self.object(
                "text_completion",
                json!({
                    "index": 0,
                    "text": text,
                    "logprobs": null,
                    "finish_reason": finish.as_str(),
                }),
            ),
        };
        object.insert("usage".into(), self.usage(outcome.completion_tokens));
        object.insert("timings".into(), self.timings(outcome));
        Value::Object(object)
    }

    /// The last chunk with choices: the finish reason, and the timings.
    pub(crate) fn last_chunk(&self, first: bool, outcome: &Outcome, include_usage: bool) -> Value {
        let mut chunk = self.chunk(first, "", Some(outcome.finish), include_usage);
        chunk["timings"] = self.timings(outcome);
        chunk
    }

    /// A streamed chunk: `text` (and for chat, the role on the first chunk) with `finish` on
    /// the last one. With `include_usage`, chunks carry `"usage": null` as OpenAI's do.
    pub(crate) fn chunk(
        &self,
        first: bool,
        text: &str,
        finish: Option<Finish>,
        include_usage: bool,
    ) -> Value {
        let finish = finish.map(Finish::as_str);
        let mut object = match self.endpoint {
            Endpoint::Chat => {
                let delta = match (first, finish) {
                    (true, _) => json!({"role": "assistant", "content": text}),
                    (false, Some(_)) => json!({}),
                    (false, None) => json!({"content": text}),
                };
                self.object(
                    "chat.completion.chunk",
                    json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}),
                )
            }
            Endpoint::Completion => self.object(
                "text_completion",
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
            ),
        };
        if include_usage {
            object.insert("usage".into(), Value::Null);
        }
        Value::Object(object)
    }

    /// The last chunk under `include_usage`: no choices, the token counts.
    pub(crate) fn usage_chunk(&self, outcome: &Outcome) -> Value {
        let kind = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        let mut object = self.object(kind, Value::Null);
        object.insert("choices".into(), json!([]));
        object.insert("usage".into(), self.usage(outcome.completion_tokens));
        Value::Object(object)
    }
}

/// `GET /v1/models`: the one model served.
pub(crate) fn model_list(model: &str, created: u64) -> Value {
    json!({
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "sun"}],
    })
}

/// OpenAI's error object for `status` and `message`.
pub(crate) fn error_body(status: u16, message: &str) -> Value {
    let kind = match status {
        400..=499 => "invalid_request_error",
        503 => "server_busy",
        _ => "server_error",
    };
    json!({"error": {"message": message, "type": kind, "param": null, "code": status}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LIMITS: GenerationLimits = GenerationLimits { max_tokens: 100 };

    fn chat(body: &str) -> Result<GenerationRequest, HttpError> {
        parse_chat_request(body.as_bytes(), &LIMITS)
    }

    #[test]
    fn chat_requests_with_defaults_and_settings() {
        let r = chat(r#"{"model":"x","messages":[{"role":"user","content":"Hi"}]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Chat(vec![Message::new("user", "Hi")]));
        assert_eq!(r.max_tokens, 100);
        assert_eq!(r.params, SamplingParams::greedy());
        assert!(!r.stream && r.stops.is_empty());
        let r = chat(
            r#"{"messages":[{"role":"developer","content":[{"type":"text","text":"S"}]},
                {"role":"user","content":"Q"}],"max_tokens":5,"temperature":0.5,"top_p":0.9,
                "seed":7,"stop":["END"],"stream":true,"stream_options":{"include_usage":true},
                "n":1,"frequency_penalty":0}"#,
        )
        .unwrap();
        assert_eq!(
            r.prompt,
            Prompt::Chat(vec![Message::new("system", "S"), Message::new("user", "Q")])
        );
        assert_eq!(
            (
                r.max_tokens,
                r.params.temperature,
                r.params.top_p,
                r.params.seed
            ),
            (5, 0.5, 0.9, 7)
        );
        assert_eq!(r.stops, vec!["END".to_string()]);
        assert!(r.stream && r.include_usage);
    }

    #[test]
    fn bad_chat_requests_are_400() {
        for body in [
            "",
            "[]",
            "{",
            r#"{"messages":[]}"#,
            r#"{"messages":"hi"}"#,
            r#"{"messages":[{"role":"user"}]}"#,
            r#"{"messages":[{"role":"tool","content":"x"}]}"#,
            r#"{"messages":[{"role":"user","content":5}]}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":101}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":1.5}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"temperature":-1}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"top_p":0}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"seed":-3}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"stop":[1]}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"n":2}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"model":3}"#,
        ] {
            let err = chat(body).expect_err(body);
            assert_eq!(err.status, 400, "{body}");
        }
    }

    #[test]
    fn completion_requests() {
        let r =
            parse_completion_request(br#"{"prompt":["Once"],"max_tokens":3}"#, &LIMITS).unwrap();
        assert_eq!((r.prompt, r.max_tokens), (Prompt::Text("Once".into()), 3));
        for body in [r#"{}"#, r#"{"prompt":["a","b"]}"#, r#"{"prompt":7}"#] {
            assert!(parse_completion_request(body.as_bytes(), &LIMITS).is_err());
        }
    }

    #[test]
    fn answer_shapes() {
        let a = Answer::new(Endpoint::Chat, 3, 10, "m", 4);
        let outcome = Outcome {
            completion_tokens: 2,
            finish: Finish::Length,
            prefill: Duration::from_millis(30),
            decode: Duration::from_millis(250),
        };
        let full = a.complete("hi", &outcome);
        assert_eq!(full["id"], "chatcmpl-3");
        assert_eq!(full["choices"][0]["message"]["content"], "hi");
        assert_eq!(full["choices"][0]["finish_reason"], "length");
        assert_eq!(full["usage"]["total_tokens"], 6);
        assert_eq!(full["timings"]["predicted_per_second"], 4.0);
        assert_eq!(full["timings"]["prompt_ms"], 30.0);
        let first = a.chunk(true, "", None, false);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert!(first.get("usage").is_none());
        let last = a.last_chunk(false, &outcome, true);
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(last["usage"], Value::Null);
        assert_eq!(last["timings"]["predicted_n"], 2);
        assert_eq!(a.usage_chunk(&outcome)["choices"], json!([]));
        assert_eq!(a.usage_chunk(&outcome)["usage"]["completion_tokens"], 2);
        let c = Answer::new(Endpoint::Completion, 1, 10, "m", 4).chunk(false, "x", None, false);
        assert_eq!(c["choices"][0]["text"], "x");
        assert_eq!(c["object"], "text_completion");
    }
}
