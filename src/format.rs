//! Provider wire formats. A route either names its format in the plugin configuration or
//! the format is detected from the request path.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ProviderFormat {
    /// OpenAI Chat Completions and legacy Completions, and every OpenAI-compatible
    /// endpoint (DashScope compatible mode, DeepSeek, Zhipu, Groq, OpenRouter, Mistral, ...).
    OpenAiChat,
    /// OpenAI Responses API (`/v1/responses`).
    OpenAiResponses,
    /// OpenAI embeddings (`/v1/embeddings`).
    OpenAiEmbeddings,
    /// OpenAI image generation (`/v1/images/generations`).
    OpenAiImages,
    /// Anthropic Messages (`/v1/messages`).
    Anthropic,
    /// Google Gemini / Vertex (`:generateContent`, `:streamGenerateContent`).
    Gemini,
    /// DashScope native (`/api/v1/services/aigc/...`, `/api/v1/apps/{id}/completion`).
    DashScopeNative,
}

impl ProviderFormat {
    /// Detect the format from the request path (query string ignored). `None` when the path
    /// is not one we know how to meter.
    pub fn detect(path: &str) -> Option<ProviderFormat> {
        let path = path.split('?').next().unwrap_or(path);
        if path.contains("/services/aigc/")
            || (path.contains("/api/v1/apps/") && path.ends_with("/completion"))
        {
            Some(ProviderFormat::DashScopeNative)
        } else if path.ends_with(":generateContent") || path.ends_with(":streamGenerateContent") {
            Some(ProviderFormat::Gemini)
        } else if path.ends_with("/messages")
            || (path.contains("/publishers/anthropic/")
                && (path.ends_with(":rawPredict") || path.ends_with(":streamRawPredict")))
        {
            // Claude on Vertex AI speaks the Messages format behind `:rawPredict`.
            Some(ProviderFormat::Anthropic)
        } else if path.ends_with("/responses") {
            Some(ProviderFormat::OpenAiResponses)
        } else if path.ends_with("/embeddings") {
            Some(ProviderFormat::OpenAiEmbeddings)
        } else if path.ends_with("/images/generations") || path.ends_with("/images/edits") {
            Some(ProviderFormat::OpenAiImages)
        } else if path.ends_with("/chat/completions") || path.ends_with("/completions") {
            Some(ProviderFormat::OpenAiChat)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats_from_paths() {
        use ProviderFormat::*;
        let cases = [
            ("/v1/chat/completions", Some(OpenAiChat)),
            ("/compatible-mode/v1/chat/completions?x=1", Some(OpenAiChat)),
            ("/v1/completions", Some(OpenAiChat)),
            ("/v1/responses", Some(OpenAiResponses)),
            ("/v1/embeddings", Some(OpenAiEmbeddings)),
            ("/v1/images/generations", Some(OpenAiImages)),
            ("/v1/images/edits", Some(OpenAiImages)),
            (
                "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5:streamRawPredict",
                Some(Anthropic),
            ),
            ("/v1/projects/p/locations/global/publishers/google/models/x:rawPredict", None),
            ("/v1/messages", Some(Anthropic)),
            ("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", Some(Gemini)),
            ("/api/v1/services/aigc/text-generation/generation", Some(DashScopeNative)),
            ("/api/v1/apps/abc/completion", Some(DashScopeNative)),
            ("/healthz", None),
        ];
        for (path, want) in cases {
            assert_eq!(ProviderFormat::detect(path), want, "{path}");
        }
    }
}
