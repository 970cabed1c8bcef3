//! The completions API's bodies: a request as clients send it, checked into what the scheduler
//! runs, and the responses and errors as OpenAI shapes them.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A string or a list of strings (`stop`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    /// As a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The `prompt` field: a string, token ids (as vLLM and SGLang accept them), or a list of
/// either.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    /// One text.
    Text(String),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Several texts.
    Texts(Vec<String>),
    /// Several prompts as token ids.
    TokenLists(Vec<Vec<u32>>),
}

/// One prompt of a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Text, tokenized by the server (BOS first, once).
    Text(String),
    /// Token ids, used as they are (no BOS added).
    Tokens(Vec<u32>),
}

impl PromptField {
    /// The prompts, one per choice group.
    pub fn into_prompts(self) -> Vec<Prompt> {
        match self {
            PromptField::Text(t) => vec![Prompt::Text(t)],
            PromptField::Tokens(t) if t.is_empty() => Vec::new(),
            PromptField::Tokens(t) => vec![Prompt::Tokens(t)],
            PromptField::Texts(v) => v.into_iter().map(Prompt::Text).collect(),
            PromptField::TokenLists(v) => v.into_iter().map(Prompt::Tokens).collect(),
        }
    }
}

/// A seed as JSON carries it: unsigned, or signed (taken as its two's-complement bits).
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(untagged)]
pub enum Seed {
    /// 0 ..= 2^64 − 1.
    Unsigned(u64),
    /// −2^63 ..= −1.
    Signed(i64),
}

impl Seed {
    /// The 64 bits.
    pub fn bits(self) -> u64 {
        match self {
            Seed::Unsigned(u) => u,
            Seed::Signed(i) => i as u64,
        }
    }
}

/// `POST /v1/completions`. Fields OpenAI defines that this server cannot honour are accepted
/// only at their neutral values; anything else is refused, never ignored.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    /// The model's name (see `GET /v1/models`).
    pub model: String,
    /// The prompt(s).
    pub prompt: PromptField,
    /// Most tokens to generate per choice (default 16, as OpenAI).
    pub max_tokens: Option<u64>,
    /// Sampling temperature (default 1; 0 is greedy).
    pub temperature: Option<f64>,
    /// Nucleus mass (default 1: off).
    pub top_p: Option<f64>,
    /// Keep the k most likely tokens (vLLM's extension; 0 or -1: off).
    pub top_k: Option<i64>,
    /// Choices per prompt (default 1).
    pub n: Option<u64>,
    /// Stop strings (at most 4, as OpenAI).
    pub stop: Option<OneOrMany>,
    /// Sampling seed: the same request with the same seed gives the same choices. Any 64-bit
    /// integer, signed or not (a negative seed is its two's-complement bits: vLLM accepts only
    /// signed 64-bit seeds, so that is how a client sends seeds of 2^63 and above).
    pub seed: Option<Seed>,
    /// Return the sampled tokens' log-probabilities (only 0 alternatives are supported).
    pub logprobs: Option<u64>,
    /// Put the prompt before each choice's text.
    pub echo: Option<bool>,
    /// Name the tokens in `logprobs` as `token_id:N` instead of their text (vLLM's extension):
    /// what a client that counts tokens itself needs.
    pub return_tokens_as_token_ids: Option<bool>,
    /// Server-sent events instead of one body.
    pub stream: Option<bool>,
    /// Accepted and ignored (OpenAI's end-user tag).
    pub user: Option<String>,
    /// Only 0 is supported.
    pub presence_penalty: Option<f64>,
    /// Only 0 is supported.
    pub frequency_penalty: Option<f64>,
    /// Only 1 (or `n`) is supported.
    pub best_of: Option<u64>,
    /// Accepted and ignored (`include_usage` is always on in the last chunk).
    pub stream_options: Option<Value>,
}

/// An API error: status and OpenAI's error body.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// The message.
    pub message: String,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// The offending parameter, if one.
    pub param: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param),
        }
    }

    /// Any status, no parameter.
    pub fn status(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
        }
    }

    /// OpenAI's body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param,
                         "code": self.status}})
    }
}

/// A request checked against the server's limits.
#[derive(Clone, Debug, PartialEq)]
pub struct Checked {
    /// Prompts.
    pub prompts: Vec<Prompt>,
    /// Tokens per choice.
    pub max_tokens: usize,
    /// Temperature.
    pub temperature: f32,
    /// Nucleus mass.
    pub top_p: f32,
    /// Top-k (0 off).
    pub top_k: usize,
    /// Choices per prompt.
    pub n: usize,
    /// Stop strings.
    pub stops: Vec<String>,
    /// Seed, if given.
    pub seed: Option<u64>,
    /// Whether to return log-probabilities.
    pub logprobs: bool,
    /// Whether to echo the prompt.
    pub echo: bool,
    /// Whether `logprobs` names tokens by id.
    pub token_ids: bool,
    /// Whether to stream.
    pub stream: bool,
}

/// Most choices one request may ask for.
pub const MAX_CHOICES: usize = 256;

impl CompletionRequest {
    /// Parses a body; malformed JSON, wrong types and unknown fields are 400s that say which.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        serde_json::from_slice(body).map_err(|e| ApiError::invalid("body", e.to_string()))
    }

    /// Checks every parameter's range; `model` must be `served`.
    pub fn check(self, served: &str) -> Result<Checked, ApiError> {
        if self.model != served {
            return Err(ApiError::status(
                404,
                "not_found_error",
                format!(
                    "the model {:?} does not exist; this server serves {served:?}",
                    self.model
                ),
            ));
        }
        let prompts = self.prompt.into_prompts();
        if prompts.is_empty()
            || prompts
                .iter()
                .any(|p| matches!(p, Prompt::Tokens(t) if t.is_empty()))
        {
            return Err(ApiError::invalid("prompt", "the prompt list is empty"));
        }
        let max_tokens = self.max_tokens.unwrap_or(16);
        if max_tokens == 0 {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=100.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                "temperature must be in 0..=100",
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid("top_p", "top_p must be in (0, 1]"));
        }
        let top_k = match self.top_k.unwrap_or(0) {
            -1 | 0 => 0,
            k if k > 0 => k as usize,
            _ => {
                return Err(ApiError::invalid(
                    "top_k",
                    "top_k must be -1, 0 or positive",
                ))
            }
        };
        let n = self.n.unwrap_or(1);
        let choices = usize::try_from(n).map_or(usize::MAX, |n| n.saturating_mul(prompts.len()));
        if n == 0 || choices > MAX_CHOICES {
            return Err(ApiError::invalid(
                "n",
                format!("n must be at least 1, and n × prompts at most {MAX_CHOICES}"),
            ));
        }
        let stops = self.stop.map(OneOrMany::into_vec).unwrap_or_default();
        if stops.len() > 4 || stops.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop",
                "at most 4 stop strings, none empty",
            ));
        }
        let logprobs = match self.logprobs {
            None => false,
            Some(0) => true,
            Some(_) => {
                return Err(ApiError::invalid(
                    "logprobs",
                    "only logprobs = 0 (the sampled tokens' log-probabilities) is supported",
                ))
            }
        };
        for (param, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(
                    param,
                    format!("{param} is not supported"),
                ));
            }
        }
        if self.best_of.is_some_and(|b| b != 1 && b != n) {
            return Err(ApiError::invalid("best_of", "best_of is not supported"));
        }
        Ok(Checked {
            prompts,
            max_tokens: usize::try_from(max_tokens).unwrap_or(usize::MAX),
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            n: n as usize,
            stops,
            seed: self.seed.map(Seed::bits),
            logprobs,
            echo: self.echo.unwrap_or(false),
            token_ids: self.return_tokens_as_token_ids.unwrap_or(false),
            stream: self.stream.unwrap_or(false),
        })
    }
}

/// Token usage of a response.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens (each prompt once per choice, BOS included).
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Both.
    pub total_tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &str) -> Result<Checked, ApiError> {
        CompletionRequest::parse(body.as_bytes())?.check("m")
    }

    #[test]
    fn malformed_requests_are_400s_that_name_the_problem() {
        #[rustfmt::skip]
        let cases = [
            ("{", 400, "EOF"),
            ("[]", 400, "expected struct"),
            (r#"{"model":"m"}"#, 400, "prompt"),
            (r#"{"model":"m","prompt":3}"#, 400, "did not match"),
            (r#"{"model":"m","prompt":"1","bogus":1}"#, 400, "unknown field"),
            (r#"{"model":"x","prompt":"1"}"#, 404, "does not exist"),
            (r#"{"model":"m","prompt":[]}"#, 400, "empty"),
            (r#"{"model":"m","prompt":"1","n":0}"#, 400, "n must"),
            (r#"{"model":"m","prompt":["1","2"],"n":9223372036854775808}"#, 400, "n must"),
            (r#"{"model":"m","prompt":"1","max_tokens":0}"#, 400, "max_tokens"),
            (r#"{"model":"m","prompt":"1","max_tokens":-5}"#, 400, "invalid value"),
            (r#"{"model":"m","prompt":"1","temperature":-1}"#, 400, "temperature"),
            (r#"{"model":"m","prompt":"1","top_p":0}"#, 400, "top_p"),
            (r#"{"model":"m","prompt":"1","stop":["a","b","c","d","e"]}"#, 400, "stop"),
            (r#"{"model":"m","prompt":"1","logprobs":5}"#, 400, "logprobs"),
            (r#"{"model":"m","prompt":"1","presence_penalty":1}"#, 400, "not supported"),
        ];
        for (body, status, needle) in cases {
            let e = check(body).unwrap_err();
            assert_eq!(e.status, status, "{body}: {e:?}");
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
        let ok = check(r#"{"model":"m","prompt":["1","2"],"n":2,"stop":"\n","seed":3}"#).unwrap();
        assert_eq!(
            (ok.prompts.len(), ok.n, ok.stops.len(), ok.seed),
            (2, 2, 1, Some(3))
        );
        assert_eq!(ok.max_tokens, 16);
        // Seeds are 64 bits, given unsigned or as their signed two's complement.
        for (seed, bits) in [
            ("18446744073709551615", u64::MAX),
            ("-1", u64::MAX),
            ("7", 7),
        ] {
            let body = format!(r#"{{"model":"m","prompt":"1","seed":{seed}}}"#);
            assert_eq!(check(&body).unwrap().seed, Some(bits));
        }
    }
}
