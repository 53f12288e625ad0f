//! LLM metering filter for Envoy (proxy-wasm).
