//! OpenAI embeddings and image generation.
//!
//! Embeddings: `usage.prompt_tokens` is the input; there is no output.
//! Images: every `data[]` entry is one image; gpt-image models add a token `usage`
//! (`input_tokens`, `output_tokens`, `input_tokens_details.cached_tokens`). Streamed image
//! generation ends each image with an `image_generation.completed` (or
//! `image_edit.completed`) event carrying that image's usage; partial images are skipped.

use llm_meter_protocol::Usage;
use serde::Deserialize;
use serde_json::Value;

use super::openai_chat::ChatUsage;
use super::wire::{describe_error, from_json, Count, ElementCount, Text};
use super::Observed;

#[derive(Deserialize, Default)]
#[serde(default)]
struct EmbeddingsBody {
    usage: Option<ChatUsage>,
    error: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ImagesDocument<'a> {
    #[serde(rename = "type", borrow)]
    kind: Text<'a>,
    data: Option<ElementCount>,
    usage: Option<ImageUsage>,
    error: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ImageUsage {
    input_tokens: Count,
    output_tokens: Count,
    input_tokens_details: Option<ImageInputDetails>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ImageInputDetails {
    cached_tokens: Count,
}

impl ImageUsage {
    fn to_usage(&self, images: u64) -> Usage {
        Usage {
            input_tokens: self.input_tokens.or_zero(),
            cached_input_tokens: self
                .input_tokens_details
                .as_ref()
                .map_or(0, |d| d.cached_tokens.or_zero()),
            output_tokens: self.output_tokens.or_zero(),
            images,
            ..Usage::default()
        }
    }
}

pub(super) fn on_embeddings_body(observed: &mut Observed, body: &[u8]) -> bool {
    let Ok(document) = from_json::<EmbeddingsBody>(body) else {
        return false;
    };
    if let Some(usage) = &document.usage {
        let usage = usage.to_usage();
        observed.usage = Some(Usage {
            input_tokens: usage.input_tokens,
            cached_input_tokens: usage.cached_input_tokens,
            ..Usage::default()
        });
    }
    if let Some(message) = document.error.as_ref().and_then(describe_error) {
        observed.record_error(message);
    }
    true
}

pub(super) fn on_images_body(observed: &mut Observed, body: &[u8]) -> bool {
    let Ok(document) = from_json::<ImagesDocument>(body) else {
        return false;
    };
    let images = document.data.map_or(0, |d| d.0);
    observed.images = images;
    if let Some(usage) = &document.usage {
        observed.usage = Some(usage.to_usage(images));
    }
    if let Some(message) = document.error.as_ref().and_then(describe_error) {
        observed.record_error(message);
    }
    true
}

/// Streamed image generation: one `*.completed` event per image, its usage added up.
pub(super) fn on_images_event(observed: &mut Observed, event_type: &str, data: &[u8]) -> bool {
    if event_type.ends_with(".partial_image") {
        return true;
    }
    let Ok(document) = from_json::<ImagesDocument>(data) else {
        if event_type == "error" {
            observed.record_error(String::from_utf8_lossy(data).into_owned());
            return true;
        }
        return false;
    };
    let kind = document.kind.as_str().unwrap_or(event_type);
    if kind.ends_with(".completed") {
        observed.images = observed.images.saturating_add(1);
        observed.terminal = true;
        let this_image = document
            .usage
            .as_ref()
            .map_or(Usage::default(), |u| u.to_usage(1));
        let total = observed.usage.unwrap_or_default();
        observed.usage = Some(Usage {
            input_tokens: total.input_tokens.saturating_add(this_image.input_tokens),
            cached_input_tokens: total
                .cached_input_tokens
                .saturating_add(this_image.cached_input_tokens),
            output_tokens: total.output_tokens.saturating_add(this_image.output_tokens),
            images: observed.images,
            ..Usage::default()
        });
    } else if document.data.is_some() {
        on_images_body(observed, data);
    }
    if kind == "error" || event_type == "error" {
        let message = document.error.as_ref().and_then(describe_error);
        observed.record_error(message.unwrap_or_else(|| String::from_utf8_lossy(data).into()));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_input_only() {
        let mut observed = Observed::default();
        let body = r#"{"data":[{"embedding":"AAAA","index":0}],"usage":{"prompt_tokens":5,"total_tokens":5}}"#;
        assert!(on_embeddings_body(&mut observed, body.as_bytes()));
        assert_eq!(
            observed.usage,
            Some(Usage {
                input_tokens: 5,
                ..Usage::default()
            })
        );
    }

    #[test]
    fn images_are_counted_and_token_usage_read() {
        let mut observed = Observed::default();
        let body = r#"{"created":1,"data":[{"b64_json":"AAAA"},{"b64_json":"BBBB"}],"usage":{"input_tokens":50,"input_tokens_details":{"text_tokens":50,"image_tokens":0},"output_tokens":4160,"total_tokens":4210}}"#;
        assert!(on_images_body(&mut observed, body.as_bytes()));
        assert_eq!(observed.images, 2);
        let usage = observed.usage.unwrap();
        assert_eq!(
            (usage.input_tokens, usage.output_tokens, usage.images),
            (50, 4160, 2)
        );
    }

    #[test]
    fn images_without_usage_still_count() {
        let mut observed = Observed::default();
        assert!(on_images_body(
            &mut observed,
            br#"{"created":1,"data":[{"url":"https://x"}]}"#
        ));
        assert_eq!(observed.images, 1);
        assert_eq!(observed.usage, None);
    }

    #[test]
    fn streamed_images_add_up_per_completed_event() {
        let mut observed = Observed::default();
        let partial = r#"{"type":"image_generation.partial_image","b64_json":"AAAA","partial_image_index":0}"#;
        let done = r#"{"type":"image_generation.completed","b64_json":"AAAA","usage":{"input_tokens":10,"output_tokens":100}}"#;
        assert!(on_images_event(
            &mut observed,
            "image_generation.partial_image",
            partial.as_bytes()
        ));
        assert!(on_images_event(
            &mut observed,
            "image_generation.completed",
            done.as_bytes()
        ));
        assert_eq!(observed.images, 1);
        assert_eq!(observed.usage.unwrap().total_tokens(), 110);
        assert!(observed.terminal);
    }
}
