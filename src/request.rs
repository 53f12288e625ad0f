//! Reading a metered request: who calls, which model, whether it streams, its output cap,
//! its prompt estimate, and (for OpenAI-compatible streams) the body rewrite that asks the
//! provider for a final usage chunk.

use crate::estimate::TextTally;
use crate::format::ProviderFormat;
use llm_meter_protocol::Caller;
use serde_json::{Map, Value};
use std::fmt;

/// Largest output cap accepted (per choice). No model writes this many tokens in one call: a
/// larger cap is a client bug or an attempt to size a hold absurdly, answered with 400
/// rather than clamped, so the caller learns its request was not what it meant.
pub const MAX_OUTPUT_TOKENS: u64 = 100_000_000;
const OUTPUT_TOKENS_RANGE: &str = "an integer from 0 to 100000000";
/// Most choices or images (`n`) one call may ask for (OpenAI's own limit for `n`).
pub const MAX_CHOICES: u64 = 128;
const CHOICES_RANGE: &str = "an integer from 1 to 128";
/// Longest model name, in characters (the ledger's key length).
pub const MAX_MODEL_CHARS: usize = 191;
/// serde_json refuses documents nested deeper than this.
const JSON_DEPTH_LIMIT: usize = 128;

/// What the request headers tell beyond the path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestHints<'a> {
    pub path: &'a str,
    /// `X-DashScope-SSE: enable`.
    pub dashscope_sse: bool,
    /// `Accept: text/event-stream`.
    pub accepts_event_stream: bool,
}

/// The facts of a request that admission and settlement need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeteredRequest {
    pub model: String,
    pub stream: bool,
    pub max_output_tokens: Option<u64>,
    pub requested_images: Option<u64>,
    pub estimated_input_tokens: u64,
    /// The client asked for the stream's usage chunk itself; when false and
    /// `usage_injected` is true, the usage chunk the client sees was asked for by us.
    pub client_asked_usage: bool,
    /// The body was rewritten to set `stream_options.include_usage = true`.
    pub usage_injected: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRequest {
    pub request: MeteredRequest,
    /// The body to forward instead of the original, when it was rewritten.
    pub rewritten_body: Option<Vec<u8>>,
}

/// Why a metered request cannot be admitted. Every variant is answered with 400 except
/// `TooLarge` (413).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    TooLarge {
        limit: usize,
    },
    EmptyBody,
    InvalidJson(String),
    NotAnObject,
    MissingModel,
    InvalidField {
        field: &'static str,
        expected: &'static str,
    },
}

impl RequestError {
    pub fn http_status(&self) -> u16 {
        match self {
            RequestError::TooLarge { .. } => 413,
            _ => 400,
        }
    }

    /// Stable machine-readable code for error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::TooLarge { .. } => "request_too_large",
            _ => "invalid_request_body",
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::TooLarge { limit } => write!(
                f,
                "request body exceeds the metering limit of {limit} bytes"
            ),
            RequestError::EmptyBody => {
                write!(f, "request body is empty; a JSON object is required")
            }
            RequestError::InvalidJson(err) => write!(f, "request body is not valid JSON: {err}"),
            RequestError::NotAnObject => write!(f, "request body must be a JSON object"),
            RequestError::MissingModel => {
                write!(f, "request body must name the model in `model` (a string)")
            }
            RequestError::InvalidField { field, expected } => {
                write!(f, "request field `{field}` must be {expected}")
            }
        }
    }
}

/// The caller of a request: the user id header wins over the API key header. The API key may
/// carry a `Bearer ` prefix (any case), which is removed. Blank values count as absent.
pub fn identify_caller(user_id: Option<&str>, api_key: Option<&str>) -> Option<Caller> {
    if let Some(user) = user_id.map(str::trim).filter(|u| !u.is_empty()) {
        return Some(Caller::UserId(user.to_string()));
    }
    let key = api_key?.trim_start();
    let key = match key.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("bearer ") => &key[7..],
        _ => key,
    };
    let key = key.trim();
    (!key.is_empty()).then(|| Caller::ApiKey(key.to_string()))
}

/// Reject early, from `content-length`, a body that cannot fit the limit.
pub fn check_declared_length(
    content_length: Option<&str>,
    limit: usize,
) -> Result<(), RequestError> {
    let Some(declared) = content_length.map(str::trim) else {
        return Ok(());
    };
    let too_large = match declared.parse::<u64>() {
        Ok(length) => length > limit as u64,
        // All digits yet no u64: a length beyond any limit.
        Err(_) => !declared.is_empty() && declared.bytes().all(|b| b.is_ascii_digit()),
    };
    if too_large {
        Err(RequestError::TooLarge { limit })
    } else {
        Ok(())
    }
}

/// Parse a metered request body.
pub fn parse_request(
    format: ProviderFormat,
    hints: &RequestHints,
    body: &[u8],
    inject_include_usage: bool,
) -> Result<ParsedRequest, RequestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RequestError::EmptyBody);
    }
    let value: Value = serde_json::from_slice(body).map_err(json_error)?;
    let Value::Object(object) = value else {
        return Err(RequestError::NotAnObject);
    };
    let mut request = match format {
        ProviderFormat::Gemini => read_gemini(&object, hints.path)?,
        ProviderFormat::DashScopeNative => read_dashscope(&object, hints)?,
        _ => read_body_model_format(format, &object)?,
    };
    let mut rewritten_body = None;
    if format == ProviderFormat::OpenAiChat && request.stream {
        request.client_asked_usage = stream_usage_requested(&object)?;
        if inject_include_usage && !request.client_asked_usage {
            rewritten_body = Some(with_include_usage(body, object)?);
            request.usage_injected = true;
        }
    }
    Ok(ParsedRequest {
        request,
        rewritten_body,
    })
}

fn json_error(err: serde_json::Error) -> RequestError {
    let message = err.to_string();
    if message.starts_with("recursion limit exceeded") {
        return RequestError::InvalidJson(format!(
            "it nests deeper than {JSON_DEPTH_LIMIT} levels ({message})"
        ));
    }
    RequestError::InvalidJson(message)
}

/// OpenAI-compatible, Responses, embeddings, images and Anthropic: everything is in the body.
fn read_body_model_format(
    format: ProviderFormat,
    body: &Map<String, Value>,
) -> Result<MeteredRequest, RequestError> {
    let model = body_model(body)?;
    let mut tally = PromptTally::default();
    let mut max_output_tokens = None;
    let mut requested_images = None;
    let stream = bool_field(body, "stream")?.unwrap_or(false);
    match format {
        ProviderFormat::OpenAiChat => {
            tally.add_value(body.get("messages"));
            tally.add_value(body.get("prompt"));
            tally.add_json(body.get("tools"));
            tally.add_json(body.get("functions"));
            let cap = match output_cap(body, "max_completion_tokens")? {
                Some(cap) => Some(cap),
                None => output_cap(body, "max_tokens")?,
            };
            // The cap is per choice: `n` choices may each reach it.
            let choices = choice_count(body, "n")?.unwrap_or(1);
            max_output_tokens = cap.map(|c| c.saturating_mul(choices));
        }
        ProviderFormat::OpenAiResponses => {
            tally.add_value(body.get("instructions"));
            tally.add_value(body.get("input"));
            tally.add_json(body.get("tools"));
            max_output_tokens = output_cap(body, "max_output_tokens")?;
        }
        ProviderFormat::OpenAiEmbeddings => tally.add_embedding_input(body.get("input")),
        ProviderFormat::OpenAiImages => {
            tally.add_value(body.get("prompt"));
            requested_images = Some(choice_count(body, "n")?.unwrap_or(1));
        }
        ProviderFormat::Anthropic => {
            tally.add_value(body.get("system"));
            tally.add_value(body.get("messages"));
            tally.add_json(body.get("tools"));
            max_output_tokens = output_cap(body, "max_tokens")?;
        }
        ProviderFormat::Gemini | ProviderFormat::DashScopeNative => {}
    }
    Ok(MeteredRequest {
        model,
        stream,
        max_output_tokens,
        requested_images,
        estimated_input_tokens: tally.tokens(),
        client_asked_usage: false,
        usage_injected: false,
    })
}

/// Gemini names the model and the streaming mode in the path:
/// `.../models/{model}:generateContent` or `...:streamGenerateContent`.
fn read_gemini(body: &Map<String, Value>, path: &str) -> Result<MeteredRequest, RequestError> {
    let path = path.split('?').next().unwrap_or(path);
    let last_segment = path.rsplit('/').next().unwrap_or_default();
    let (model, method) = last_segment.split_once(':').unwrap_or((last_segment, ""));
    if model.is_empty() {
        return Err(RequestError::MissingModel);
    }
    check_model_name(model)?;
    let mut tally = PromptTally::default();
    tally.add_value(body.get("contents"));
    tally.add_value(
        body.get("systemInstruction")
            .or_else(|| body.get("system_instruction")),
    );
    tally.add_json(body.get("tools"));
    let generation =
        object_field(body, "generationConfig")?.or(object_field(body, "generation_config")?);
    let max_output_tokens = match generation {
        Some(config) => match output_cap(config, "maxOutputTokens")? {
            Some(cap) => Some(cap),
            None => output_cap(config, "max_output_tokens")?,
        },
        None => None,
    };
    Ok(MeteredRequest {
        model: model.to_string(),
        stream: method == "streamGenerateContent",
        max_output_tokens,
        requested_images: None,
        estimated_input_tokens: tally.tokens(),
        client_asked_usage: false,
        usage_injected: false,
    })
}

/// DashScope native: `{model, input: {messages | prompt}, parameters: {max_tokens, n}}`;
/// streaming is chosen by headers. Application calls (`/api/v1/apps/{id}/completion`) may
/// omit the model: they are metered as model `app:{id}`.
fn read_dashscope(
    body: &Map<String, Value>,
    hints: &RequestHints,
) -> Result<MeteredRequest, RequestError> {
    let model = match body_model(body) {
        Ok(model) => model,
        Err(RequestError::MissingModel) => {
            let model = dashscope_app_model(hints.path).ok_or(RequestError::MissingModel)?;
            check_model_name(&model)?;
            model
        }
        Err(other) => return Err(other),
    };
    let mut tally = PromptTally::default();
    if let Some(input) = object_field(body, "input")? {
        tally.add_value(input.get("messages"));
        tally.add_value(input.get("prompt"));
        tally.add_value(input.get("history"));
        tally.add_embedding_input(input.get("texts"));
    }
    let (max_output_tokens, n) = match object_field(body, "parameters")? {
        Some(parameters) => {
            tally.add_json(parameters.get("tools"));
            (
                output_cap(parameters, "max_tokens")?,
                choice_count(parameters, "n")?,
            )
        }
        None => (None, None),
    };
    let path = hints.path.split('?').next().unwrap_or(hints.path);
    let is_image = path.contains("image-synthesis") || path.contains("image-generation");
    Ok(MeteredRequest {
        model,
        stream: hints.dashscope_sse || hints.accepts_event_stream,
        max_output_tokens,
        requested_images: if is_image { n } else { None },
        estimated_input_tokens: tally.tokens(),
        client_asked_usage: false,
        usage_injected: false,
    })
}

fn dashscope_app_model(path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap_or(path);
    let rest = path.split("/apps/").nth(1)?;
    let app_id = rest.split('/').next().filter(|id| !id.is_empty())?;
    Some(format!("app:{app_id}"))
}

fn body_model(body: &Map<String, Value>) -> Result<String, RequestError> {
    match body.get("model") {
        Some(Value::String(model)) if !model.trim().is_empty() => {
            let model = model.trim();
            check_model_name(model)?;
            Ok(model.to_string())
        }
        _ => Err(RequestError::MissingModel),
    }
}

/// The ledger keys calls by model name: it must be short and printable.
fn check_model_name(model: &str) -> Result<(), RequestError> {
    let printable = !model.chars().any(|c| c.is_control() || c.is_whitespace());
    if printable && model.chars().count() <= MAX_MODEL_CHARS {
        Ok(())
    } else {
        Err(RequestError::InvalidField {
            field: "model",
            expected: "a name of at most 191 characters without spaces or control characters",
        })
    }
}

/// An output token cap: `0..=MAX_OUTPUT_TOKENS`, or absent.
fn output_cap(body: &Map<String, Value>, field: &'static str) -> Result<Option<u64>, RequestError> {
    bounded_uint(body, field, 0, MAX_OUTPUT_TOKENS, OUTPUT_TOKENS_RANGE)
}

/// A number of choices or images: `1..=MAX_CHOICES`, or absent.
fn choice_count(
    body: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<u64>, RequestError> {
    bounded_uint(body, field, 1, MAX_CHOICES, CHOICES_RANGE)
}

fn bounded_uint(
    body: &Map<String, Value>,
    field: &'static str,
    min: u64,
    max: u64,
    expected: &'static str,
) -> Result<Option<u64>, RequestError> {
    match uint_field(body, field, expected)? {
        Some(value) if value < min || value > max => {
            Err(RequestError::InvalidField { field, expected })
        }
        other => Ok(other),
    }
}

fn bool_field(
    body: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<bool>, RequestError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(RequestError::InvalidField {
            field,
            expected: "a boolean",
        }),
    }
}

/// A non-negative integer (`1024` or `1024.0`), or absent/null.
fn uint_field(
    body: &Map<String, Value>,
    field: &'static str,
    expected: &'static str,
) -> Result<Option<u64>, RequestError> {
    let invalid = RequestError::InvalidField { field, expected };
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(v), _) => Ok(Some(v)),
            (None, Some(f)) if f >= 0.0 && f.fract() == 0.0 && f <= u64::MAX as f64 => {
                Ok(Some(f as u64))
            }
            _ => Err(invalid),
        },
        Some(_) => Err(invalid),
    }
}

fn object_field<'a>(
    body: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a Map<String, Value>>, RequestError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(object)) => Ok(Some(object)),
        Some(_) => Err(RequestError::InvalidField {
            field,
            expected: "an object",
        }),
    }
}

/// `stream_options.include_usage` as the client sent it.
fn stream_usage_requested(body: &Map<String, Value>) -> Result<bool, RequestError> {
    match object_field(body, "stream_options")? {
        Some(options) => Ok(bool_field(options, "include_usage")?.unwrap_or(false)),
        None => Ok(false),
    }
}

/// The body with `stream_options.include_usage = true`. Without `stream_options` the member
/// is inserted textually so the rest of the body is forwarded byte for byte; otherwise the
/// object is re-serialised with the option set.
fn with_include_usage(
    original: &[u8],
    mut body: Map<String, Value>,
) -> Result<Vec<u8>, RequestError> {
    let has_options = matches!(body.get("stream_options"), Some(Value::Object(_)));
    if !has_options {
        if let Some(open) = original.iter().position(|b| *b == b'{') {
            let member: &[u8] = br#""stream_options":{"include_usage":true}"#;
            let mut out = Vec::with_capacity(original.len() + member.len() + 1);
            out.extend_from_slice(&original[..=open]);
            out.extend_from_slice(member);
            if !body.is_empty() {
                out.push(b',');
            }
            out.extend_from_slice(&original[open + 1..]);
            return Ok(out);
        }
    }
    let mut options = match body.remove("stream_options") {
        Some(Value::Object(options)) => options,
        _ => Map::new(),
    };
    options.insert("include_usage".into(), Value::Bool(true));
    body.insert("stream_options".into(), Value::Object(options));
    serde_json::to_vec(&body).map_err(|e| RequestError::InvalidJson(e.to_string()))
}

/// Prompt text of a request, estimated with the shared heuristic, plus token ids sent as such.
#[derive(Default)]
struct PromptTally {
    text: TextTally,
    token_ids: u64,
}

impl PromptTally {
    fn tokens(&self) -> u64 {
        self.text.tokens().saturating_add(self.token_ids)
    }

    /// Text of a prompt value: strings, arrays of parts, messages with `content` / `parts`,
    /// tool calls and tool results. Binary payloads (images, audio, files) are not text.
    fn add_value(&mut self, value: Option<&Value>) {
        match value {
            Some(Value::String(text)) => self.text.add(text),
            Some(Value::Array(items)) => items.iter().for_each(|item| self.add_value(Some(item))),
            Some(Value::Object(object)) => self.add_object(object),
            _ => {}
        }
    }

    fn add_object(&mut self, object: &Map<String, Value>) {
        for key in ["text", "arguments", "thinking", "refusal"] {
            if let Some(Value::String(text)) = object.get(key) {
                self.text.add(text);
            }
        }
        for key in ["content", "parts", "tool_calls", "function", "output"] {
            self.add_value(object.get(key));
        }
        // Structured tool traffic is counted as its JSON text.
        for key in ["input", "functionCall", "functionResponse", "function_call"] {
            if let Some(value @ Value::Object(_)) = object.get(key) {
                self.add_json(Some(value));
            }
        }
    }

    fn add_json(&mut self, value: Option<&Value>) {
        match value {
            None | Some(Value::Null) => {}
            Some(value) => self.text.add(&value.to_string()),
        }
    }

    /// Embedding input: text, texts, or token ids (one token each).
    fn add_embedding_input(&mut self, value: Option<&Value>) {
        match value {
            Some(Value::String(text)) => self.text.add(text),
            Some(Value::Number(_)) => self.token_ids = self.token_ids.saturating_add(1),
            Some(Value::Array(items)) => items
                .iter()
                .for_each(|item| self.add_embedding_input(Some(item))),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::estimate_tokens;
    use serde_json::json;

    fn hints(path: &str) -> RequestHints<'_> {
        RequestHints {
            path,
            ..RequestHints::default()
        }
    }

    fn parse(format: ProviderFormat, path: &str, body: Value) -> ParsedRequest {
        parse_request(format, &hints(path), body.to_string().as_bytes(), true).unwrap()
    }

    fn parse_err(format: ProviderFormat, body: &[u8]) -> RequestError {
        parse_request(format, &hints("/v1/chat/completions"), body, true).unwrap_err()
    }

    #[test]
    fn caller_prefers_user_id_and_strips_bearer() {
        assert_eq!(
            identify_caller(Some(" alice "), Some("Bearer sk-1")),
            Some(Caller::UserId("alice".into()))
        );
        assert_eq!(
            identify_caller(None, Some("Bearer sk-1")),
            Some(Caller::ApiKey("sk-1".into()))
        );
        assert_eq!(
            identify_caller(Some(""), Some("bearer   sk-2")),
            Some(Caller::ApiKey("sk-2".into()))
        );
        assert_eq!(
            identify_caller(None, Some("sk-3")),
            Some(Caller::ApiKey("sk-3".into()))
        );
        assert_eq!(identify_caller(Some("  "), Some("Bearer ")), None);
        assert_eq!(identify_caller(None, None), None);
        // Multi-byte text right at the prefix boundary must not panic.
        assert_eq!(
            identify_caller(None, Some("Bearé")),
            Some(Caller::ApiKey("Bearé".into()))
        );
    }

    #[test]
    fn declared_length_over_the_limit_is_413() {
        assert!(check_declared_length(Some("10"), 10).is_ok());
        assert!(check_declared_length(None, 10).is_ok());
        assert!(check_declared_length(Some("junk"), 10).is_ok());
        let err = check_declared_length(Some("11"), 10).unwrap_err();
        assert_eq!(err.http_status(), 413);
        assert!(err.to_string().contains("10 bytes"));
    }

    #[test]
    fn openai_chat_fields_and_prompt_estimate() {
        let parsed = parse(
            ProviderFormat::OpenAiChat,
            "/v1/chat/completions",
            json!({
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [
                        {"type": "text", "text": "What is in this image?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAAAAAAAAAAAAAAAAAAAAAAAAAA"}}
                    ]}
                ],
                "max_tokens": 100,
                "n": 2
            }),
        );
        let request = parsed.request;
        assert_eq!(request.model, "gpt-4o-mini");
        assert!(!request.stream);
        assert_eq!(request.max_output_tokens, Some(200));
        let expected = {
            let mut tally = TextTally::default();
            tally.add("Be brief.");
            tally.add("What is in this image?");
            tally.tokens()
        };
        assert_eq!(request.estimated_input_tokens, expected);
        assert!(parsed.rewritten_body.is_none());
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens() {
        let parsed = parse(
            ProviderFormat::OpenAiChat,
            "/v1/chat/completions",
            json!({"model": "o3", "messages": [], "max_tokens": 10, "max_completion_tokens": 50}),
        );
        assert_eq!(parsed.request.max_output_tokens, Some(50));
    }

    #[test]
    fn streaming_chat_gets_include_usage_injected_byte_preserving() {
        let body = br#"  {"model":"qwen-plus","stream":true,"messages":[{"role":"user","content":"hi"}],"temperature":0.70}"#;
        let parsed = parse_request(
            ProviderFormat::OpenAiChat,
            &hints("/x/chat/completions"),
            body,
            true,
        )
        .unwrap();
        assert!(parsed.request.stream && parsed.request.usage_injected);
        assert!(!parsed.request.client_asked_usage);
        let rewritten = String::from_utf8(parsed.rewritten_body.unwrap()).unwrap();
        assert!(rewritten.ends_with(r#""temperature":0.70}"#), "{rewritten}");
        let value: Value = serde_json::from_str(&rewritten).unwrap();
        assert_eq!(value["stream_options"]["include_usage"], true);
        assert_eq!(value["model"], "qwen-plus");
    }

    #[test]
    fn existing_stream_options_are_kept_and_completed() {
        let body = json!({"model": "m", "stream": true, "messages": [],
            "stream_options": {"include_usage": false, "continuous_usage_stats": true}});
        let parsed = parse(ProviderFormat::OpenAiChat, "/v1/chat/completions", body);
        let value: Value = serde_json::from_slice(&parsed.rewritten_body.unwrap()).unwrap();
        assert_eq!(value["stream_options"]["include_usage"], true);
        assert_eq!(value["stream_options"]["continuous_usage_stats"], true);
        assert_eq!(value["model"], "m");
    }

    #[test]
    fn client_that_asked_for_usage_is_not_rewritten() {
        let body = json!({"model": "m", "stream": true, "messages": [],
            "stream_options": {"include_usage": true}});
        let parsed = parse(ProviderFormat::OpenAiChat, "/v1/chat/completions", body);
        assert!(parsed.request.client_asked_usage);
        assert!(!parsed.request.usage_injected);
        assert!(parsed.rewritten_body.is_none());
    }

    #[test]
    fn injection_can_be_turned_off() {
        let body = json!({"model": "m", "stream": true, "messages": []}).to_string();
        let parsed = parse_request(
            ProviderFormat::OpenAiChat,
            &hints("/v1/chat/completions"),
            body.as_bytes(),
            false,
        )
        .unwrap();
        assert!(parsed.rewritten_body.is_none());
        assert!(!parsed.request.usage_injected);
    }

    #[test]
    fn responses_api_fields() {
        let parsed = parse(
            ProviderFormat::OpenAiResponses,
            "/v1/responses",
            json!({"model": "gpt-4.1", "instructions": "Answer in French.", "stream": true,
                   "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hello there"}]},
                             {"type": "function_call_output", "call_id": "c", "output": "42"}],
                   "max_output_tokens": 300}),
        );
        let request = parsed.request;
        assert_eq!(request.max_output_tokens, Some(300));
        assert!(request.stream);
        assert!(
            parsed.rewritten_body.is_none(),
            "only chat completions are rewritten"
        );
        let mut tally = TextTally::default();
        for text in ["Answer in French.", "Hello there", "42"] {
            tally.add(text);
        }
        assert_eq!(request.estimated_input_tokens, tally.tokens());
    }

    #[test]
    fn anthropic_fields_include_system_blocks_and_tool_use() {
        let parsed = parse(
            ProviderFormat::Anthropic,
            "/v1/messages",
            json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": true,
            "system": [{"type": "text", "text": "You are terse."}],
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "w", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "Sunny"}]}
            ]}),
        );
        let request = parsed.request;
        assert_eq!(request.model, "claude-sonnet-4-5");
        assert_eq!(request.max_output_tokens, Some(1024));
        assert!(request.stream);
        assert!(parsed.rewritten_body.is_none());
        let mut tally = TextTally::default();
        for text in ["You are terse.", "Weather?", r#"{"city":"Paris"}"#, "Sunny"] {
            tally.add(text);
        }
        assert_eq!(request.estimated_input_tokens, tally.tokens());
    }

    #[test]
    fn gemini_reads_model_and_stream_from_the_path() {
        let body = json!({"contents": [{"role": "user", "parts": [{"text": "Tell me a joke"}]}],
                          "systemInstruction": {"parts": [{"text": "Be funny"}]},
                          "generationConfig": {"maxOutputTokens": 64}});
        let streamed = parse(
            ProviderFormat::Gemini,
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            body.clone(),
        )
        .request;
        assert_eq!(streamed.model, "gemini-2.5-flash");
        assert!(streamed.stream);
        assert_eq!(streamed.max_output_tokens, Some(64));
        let mut tally = TextTally::default();
        tally.add("Tell me a joke");
        tally.add("Be funny");
        assert_eq!(streamed.estimated_input_tokens, tally.tokens());
        let unary = parse(
            ProviderFormat::Gemini,
            "/v1/projects/p/locations/us/publishers/google/models/gemini-2.0-pro:generateContent",
            body,
        )
        .request;
        assert_eq!(unary.model, "gemini-2.0-pro");
        assert!(!unary.stream);
    }

    #[test]
    fn gemini_without_a_model_in_the_path_is_rejected() {
        let err = parse_request(
            ProviderFormat::Gemini,
            &hints("/v1beta/models/:generateContent"),
            br#"{"contents":[]}"#,
            true,
        )
        .unwrap_err();
        assert_eq!(err, RequestError::MissingModel);
    }

    #[test]
    fn dashscope_native_streams_by_header() {
        let body = json!({"model": "qwen-max", "input": {"messages": [{"role": "user", "content": "你好"}]},
                          "parameters": {"max_tokens": 500, "result_format": "message"}});
        let path = "/api/v1/services/aigc/text-generation/generation";
        let plain = parse(ProviderFormat::DashScopeNative, path, body.clone()).request;
        assert!(!plain.stream);
        assert_eq!(plain.max_output_tokens, Some(500));
        assert_eq!(plain.estimated_input_tokens, estimate_tokens("你好"));
        for hints in [
            RequestHints {
                path,
                dashscope_sse: true,
                accepts_event_stream: false,
            },
            RequestHints {
                path,
                dashscope_sse: false,
                accepts_event_stream: true,
            },
        ] {
            let request = parse_request(
                ProviderFormat::DashScopeNative,
                &hints,
                body.to_string().as_bytes(),
                true,
            )
            .unwrap();
            assert!(request.request.stream);
            assert!(request.rewritten_body.is_none());
        }
    }

    #[test]
    fn dashscope_app_calls_without_model_use_the_app_id() {
        let parsed = parse(
            ProviderFormat::DashScopeNative,
            "/api/v1/apps/abc123/completion",
            json!({"input": {"prompt": "hello"}, "parameters": {}}),
        );
        assert_eq!(parsed.request.model, "app:abc123");
        assert_eq!(
            parsed.request.estimated_input_tokens,
            estimate_tokens("hello")
        );
    }

    #[test]
    fn image_generation_asks_for_n_images() {
        let images = parse(
            ProviderFormat::OpenAiImages,
            "/v1/images/generations",
            json!({"model": "dall-e-3", "prompt": "a red fox", "n": 3}),
        )
        .request;
        assert_eq!(images.requested_images, Some(3));
        assert_eq!(images.estimated_input_tokens, estimate_tokens("a red fox"));
        let default_n = parse(
            ProviderFormat::OpenAiImages,
            "/v1/images/generations",
            json!({"model": "gpt-image-1", "prompt": "x"}),
        )
        .request;
        assert_eq!(default_n.requested_images, Some(1));
        let wanx = parse(
            ProviderFormat::DashScopeNative,
            "/api/v1/services/aigc/text2image/image-synthesis",
            json!({"model": "wanx-v1", "input": {"prompt": "cat"}, "parameters": {"n": 2}}),
        )
        .request;
        assert_eq!(wanx.requested_images, Some(2));
    }

    #[test]
    fn embeddings_count_text_and_token_ids() {
        let request = parse(
            ProviderFormat::OpenAiEmbeddings,
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": ["abcd", [1, 2, 3]]}),
        )
        .request;
        assert_eq!(request.estimated_input_tokens, estimate_tokens("abcd") + 3);
        assert_eq!(request.max_output_tokens, None);
    }

    #[test]
    fn bad_bodies_are_clear_errors() {
        assert_eq!(
            parse_err(ProviderFormat::OpenAiChat, b""),
            RequestError::EmptyBody
        );
        assert_eq!(
            parse_err(ProviderFormat::OpenAiChat, b" \n"),
            RequestError::EmptyBody
        );
        assert!(matches!(
            parse_err(ProviderFormat::OpenAiChat, b"{\"model\":"),
            RequestError::InvalidJson(_)
        ));
        assert_eq!(
            parse_err(ProviderFormat::OpenAiChat, b"[1]"),
            RequestError::NotAnObject
        );
        assert_eq!(
            parse_err(ProviderFormat::OpenAiChat, br#"{"messages":[]}"#),
            RequestError::MissingModel
        );
        assert_eq!(
            parse_err(ProviderFormat::OpenAiChat, br#"{"model":7}"#),
            RequestError::MissingModel
        );
        let cases: [(&[u8], &str); 5] = [
            (br#"{"model":"m","stream":"yes"}"#, "stream"),
            (br#"{"model":"m","max_tokens":-5}"#, "max_tokens"),
            (br#"{"model":"m","max_tokens":1.5}"#, "max_tokens"),
            (br#"{"model":"m","max_tokens":"10"}"#, "max_tokens"),
            (
                br#"{"model":"m","stream":true,"stream_options":"x"}"#,
                "stream_options",
            ),
        ];
        for (body, field) in cases {
            match parse_err(ProviderFormat::OpenAiChat, body) {
                RequestError::InvalidField { field: got, .. } => assert_eq!(got, field),
                other => panic!("{other:?} for {}", String::from_utf8_lossy(body)),
            }
        }
        let err = parse_err(ProviderFormat::OpenAiChat, br#"{"model":"m","stream":1}"#);
        assert_eq!(err.http_status(), 400);
        assert!(err.to_string().contains("`stream`"), "{err}");
    }

    fn invalid_field(format: ProviderFormat, path: &str, body: &[u8]) -> (&'static str, String) {
        match parse_request(format, &hints(path), body, true) {
            Err(err @ RequestError::InvalidField { field, .. }) => {
                assert_eq!(err.http_status(), 400);
                (field, err.to_string())
            }
            other => panic!("{other:?} for {}", String::from_utf8_lossy(body)),
        }
    }

    #[test]
    fn hostile_output_caps_are_clear_400s() {
        let chat = "/v1/chat/completions";
        let bad_caps = [
            "-1",
            "-0.5",
            "1.5",
            "\"10\"",
            "true",
            "[10]",
            "{}",
            "100000001",
            "1e9",
            "1e300",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
        ];
        for cap in bad_caps {
            for field in ["max_tokens", "max_completion_tokens"] {
                let body = format!(r#"{{"model":"m","messages":[],"{field}":{cap}}}"#);
                let (got, message) =
                    invalid_field(ProviderFormat::OpenAiChat, chat, body.as_bytes());
                assert_eq!(got, field, "{body}");
                assert!(message.contains("0 to 100000000"), "{message}");
            }
        }
        let largest = format!(r#"{{"model":"m","max_tokens":{MAX_OUTPUT_TOKENS}}}"#);
        let parsed = parse_request(
            ProviderFormat::Anthropic,
            &hints("/v1/messages"),
            largest.as_bytes(),
            true,
        )
        .unwrap();
        assert_eq!(parsed.request.max_output_tokens, Some(MAX_OUTPUT_TOKENS));
        assert_eq!(
            OUTPUT_TOKENS_RANGE,
            format!("an integer from 0 to {MAX_OUTPUT_TOKENS}")
        );
        let gemini = br#"{"contents":[],"generationConfig":{"maxOutputTokens":-3}}"#;
        let (field, _) = invalid_field(
            ProviderFormat::Gemini,
            "/v1beta/models/gemini-2.5-flash:generateContent",
            gemini,
        );
        assert_eq!(field, "maxOutputTokens");
        let dashscope = br#"{"model":"qwen-max","parameters":{"max_tokens":1e12}}"#;
        let (field, _) = invalid_field(
            ProviderFormat::DashScopeNative,
            "/api/v1/services/aigc/text-generation/generation",
            dashscope,
        );
        assert_eq!(field, "max_tokens");
    }

    #[test]
    fn hostile_choice_and_image_counts_are_clear_400s() {
        for n in ["0", "129", "1000000", "-1", "2.5", "\"3\"", "1e20"] {
            let images = format!(r#"{{"model":"dall-e-3","prompt":"x","n":{n}}}"#);
            let (field, message) = invalid_field(
                ProviderFormat::OpenAiImages,
                "/v1/images/generations",
                images.as_bytes(),
            );
            assert_eq!(field, "n");
            assert!(message.contains("1 to 128"), "{message}");
            let chat = format!(r#"{{"model":"m","max_tokens":10,"n":{n}}}"#);
            let (field, _) = invalid_field(
                ProviderFormat::OpenAiChat,
                "/v1/chat/completions",
                chat.as_bytes(),
            );
            assert_eq!(field, "n");
            let wanx = format!(
                r#"{{"model":"wanx-v1","input":{{"prompt":"c"}},"parameters":{{"n":{n}}}}}"#
            );
            let (field, _) = invalid_field(
                ProviderFormat::DashScopeNative,
                "/api/v1/services/aigc/text2image/image-synthesis",
                wanx.as_bytes(),
            );
            assert_eq!(field, "n");
        }
        assert_eq!(CHOICES_RANGE, format!("an integer from 1 to {MAX_CHOICES}"));
        // The largest cap times the most choices still fits the ledger's per-call limit.
        let body = format!(r#"{{"model":"m","max_tokens":{MAX_OUTPUT_TOKENS},"n":{MAX_CHOICES}}}"#);
        let parsed = parse_request(
            ProviderFormat::OpenAiChat,
            &hints("/v1/chat/completions"),
            body.as_bytes(),
            true,
        )
        .unwrap();
        assert_eq!(
            parsed.request.max_output_tokens,
            Some(MAX_OUTPUT_TOKENS * MAX_CHOICES)
        );
    }

    #[test]
    fn missing_or_odd_models_are_clear_400s() {
        let missing: [&[u8]; 7] = [
            br#"{"messages":[]}"#,
            br#"{"model":null}"#,
            br#"{"model":""}"#,
            br#"{"model":"   "}"#,
            br#"{"model":["gpt-4o"]}"#,
            br#"{"model":{"name":"gpt-4o"}}"#,
            br#"{"model":false}"#,
        ];
        for body in missing {
            let err = parse_err(ProviderFormat::OpenAiChat, body);
            assert_eq!(err, RequestError::MissingModel);
            assert_eq!(err.http_status(), 400);
        }
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_CHARS + 1));
        let odd = [
            long,
            r#"{"model":"gpt 4o"}"#.to_string(),
            r#"{"model":"gpt\u0000"}"#.to_string(),
            r#"{"model":"a\nb"}"#.to_string(),
        ];
        for body in odd {
            let (field, message) =
                invalid_field(ProviderFormat::Anthropic, "/v1/messages", body.as_bytes());
            assert_eq!(field, "model");
            assert!(message.contains("191"), "{message}");
        }
        let longest = format!(r#"{{"model":"{}"}}"#, "模".repeat(MAX_MODEL_CHARS));
        let parsed = parse(
            ProviderFormat::Anthropic,
            "/v1/messages",
            serde_json::from_str(&longest).unwrap(),
        );
        assert_eq!(parsed.request.model.chars().count(), MAX_MODEL_CHARS);
        let path = format!("/v1beta/models/{}:generateContent", "g".repeat(300));
        let (field, _) = invalid_field(ProviderFormat::Gemini, &path, b"{}");
        assert_eq!(field, "model");
    }

    #[test]
    fn bodies_that_are_not_objects_are_clear_400s() {
        let not_objects: [&[u8]; 6] = [
            b"[]",
            b"null",
            b"42",
            b"\"text\"",
            b"true",
            b"[{\"model\":\"m\"}]",
        ];
        for body in not_objects {
            let err = parse_err(ProviderFormat::OpenAiChat, body);
            assert_eq!(
                err,
                RequestError::NotAnObject,
                "{}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(err.http_status(), 400);
        }
        let not_json: [&[u8]; 7] = [
            b"\xEF\xBB\xBF{\"model\":\"m\"}",
            b"{\"model\":\"m\"} trailing",
            b"{\"model\":\"\xFF\xFE\"}",
            b"\0",
            b"{\"model\":\"m\",}",
            b"{\"model\":\"m\",\"max_tokens\":1e400}",
            b"{\"model\":\"m\",\"messages\":[{\"content\":\"\\ud800\"}]",
        ];
        for body in not_json {
            let err = parse_err(ProviderFormat::OpenAiChat, body);
            assert!(matches!(err, RequestError::InvalidJson(_)), "{err:?}");
            assert_eq!(err.http_status(), 400);
            assert!(err
                .to_string()
                .starts_with("request body is not valid JSON"));
        }
    }

    #[test]
    fn deeply_nested_json_is_a_clear_400_not_a_stack_overflow() {
        for depth in [129, 10_000, 1_000_000] {
            let body = format!(
                r#"{{"model":"m","messages":{}{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            );
            let err = parse_err(ProviderFormat::OpenAiChat, body.as_bytes());
            assert_eq!(err.http_status(), 400);
            assert!(
                err.to_string().contains("nests deeper than 128 levels"),
                "{err}"
            );
            let objects = "{\"a\":".repeat(depth) + &"}".repeat(depth);
            let err = parse_err(ProviderFormat::Anthropic, objects.as_bytes());
            assert!(err.to_string().contains("nests deeper"), "{err}");
        }
        // Just inside the limit: parsed, and the prompt walk copes with the depth.
        let body = format!(
            r#"{{"model":"m","messages":{}"deep"{}}}"#,
            "[".repeat(120),
            "]".repeat(120)
        );
        let parsed = parse_request(
            ProviderFormat::OpenAiChat,
            &hints("/v1/chat/completions"),
            body.as_bytes(),
            true,
        )
        .unwrap();
        assert_eq!(
            parsed.request.estimated_input_tokens,
            estimate_tokens("deep")
        );
    }

    #[test]
    fn huge_bodies_are_parsed_or_refused_by_size() {
        let text = "x".repeat(4 * 1024 * 1024);
        let body =
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": text}]});
        let parsed = parse(ProviderFormat::OpenAiChat, "/v1/chat/completions", body);
        assert_eq!(
            parsed.request.estimated_input_tokens,
            estimate_tokens(&text)
        );
        assert!(parsed.rewritten_body.is_some());
        let many = json!({"model": "m", "input": vec![json!([1, 2]); 100_000]});
        let embedded = parse(ProviderFormat::OpenAiEmbeddings, "/v1/embeddings", many);
        assert_eq!(embedded.request.estimated_input_tokens, 200_000);
        for length in ["1048577", "99999999999999999999", "18446744073709551616"] {
            let err = check_declared_length(Some(length), 1024 * 1024).unwrap_err();
            assert_eq!(err.http_status(), 413, "{length}");
        }
        for unreadable in ["-1", "", "1e6", "0x10"] {
            // Not a length Envoy would forward; the body size check still applies.
            assert!(check_declared_length(Some(unreadable), 10).is_ok());
        }
    }

    #[test]
    fn integral_floats_are_accepted_as_caps() {
        let parsed = parse(
            ProviderFormat::Anthropic,
            "/v1/messages",
            json!({"model": "m", "messages": [], "max_tokens": 256.0}),
        );
        assert_eq!(parsed.request.max_output_tokens, Some(256));
    }
}
