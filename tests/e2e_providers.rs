//! Every provider format, streamed and not, through the real Envoy with the built filter and
//! the real sidecar: the client receives the upstream's bytes unchanged, and the ledger
//! bills exactly the usage the provider reported, at the price in force.

use llm_meter_e2e::admin::num;
use llm_meter_e2e::fixtures;
use llm_meter_e2e::stack::Stack;
use serde_json::{json, Value};

/// Request shapes per provider format.
#[derive(Clone, Copy, Debug)]
enum Api {
    Chat,
    Completions,
    DashScopeCompat,
    Responses,
    Embeddings,
    Anthropic,
    Gemini,
    DashScopeNative,
}

struct Scenario {
    fixture: &'static str,
    api: Api,
    stream: bool,
    input: i64,
    output: i64,
}

const fn s(fixture: &'static str, api: Api, stream: bool, input: i64, output: i64) -> Scenario {
    Scenario {
        fixture,
        api,
        stream,
        input,
        output,
    }
}

const MODEL: &str = "m-e2e";
const GEMINI_MODEL: &str = "gemini-e2e";

/// The repo's own hand-written fixtures: always run.
const OWN: &[Scenario] = &[
    s("openai_chat_crlf_nospace_usage.sse", Api::Chat, true, 21, 8),
    s("moonshot_stream_choice_usage.sse", Api::Chat, true, 120, 6),
    s(
        "anthropic_stream_tool_use_cache_read.sse",
        Api::Anthropic,
        true,
        2060,
        57,
    ),
    s(
        "anthropic_message_tool_use.json",
        Api::Anthropic,
        false,
        1610,
        88,
    ),
    s("gemini_stream_cumulative.sse", Api::Gemini, true, 40, 58),
    s(
        "dashscope_native_stream_cumulative_crlf.sse",
        Api::DashScopeNative,
        true,
        180,
        10,
    ),
    s(
        "openai_embeddings_usage.json",
        Api::Embeddings,
        false,
        17,
        0,
    ),
    s(
        "openai_responses_stream_incomplete.sse",
        Api::Responses,
        true,
        11,
        16,
    ),
];

/// Third-party recordings in ../shared/fixtures, with the usage SOURCES.md states.
const RECORDED: &[Scenario] = &[
    s("openai_chat_stream_usage.sse", Api::Chat, true, 12, 100),
    s("openai_chat.json", Api::Chat, false, 8, 377),
    s(
        "openai_completions_stream_usage.sse",
        Api::Completions,
        true,
        31,
        25,
    ),
    s("openai_responses_stream.sse", Api::Responses, true, 278, 9),
    s(
        "openai_responses_stream_tool_usage.sse",
        Api::Responses,
        true,
        13,
        59,
    ),
    s("openai_responses.json", Api::Responses, false, 1349, 10),
    s("openai_embeddings.json", Api::Embeddings, false, 5, 0),
    s(
        "anthropic_messages_stream.sse",
        Api::Anthropic,
        true,
        43,
        282,
    ),
    s(
        "anthropic_messages_cache.json",
        Api::Anthropic,
        false,
        3 + 418 + 1111,
        33,
    ),
    // Server-side compaction: billed as the sum over usage.iterations.
    s(
        "anthropic_messages_stream_cache_read_compaction.sse",
        Api::Anthropic,
        true,
        55377,
        91,
    ),
    s("gemini_stream.sse", Api::Gemini, true, 18, 80 + 35),
    s(
        "gemini_generate_content.json",
        Api::Gemini,
        false,
        8,
        6 + 99,
    ),
    s(
        "dashscope_native_stream_text.sse",
        Api::DashScopeNative,
        true,
        16,
        6,
    ),
    s(
        "dashscope_native_stream_reasoning.sse",
        Api::DashScopeNative,
        true,
        723,
        254,
    ),
    s(
        "dashscope_native_text.json",
        Api::DashScopeNative,
        false,
        16,
        14,
    ),
    s(
        "dashscope_compat_stream_tools.sse",
        Api::DashScopeCompat,
        true,
        295,
        22,
    ),
    s(
        "dashscope_compat_chat.json",
        Api::DashScopeCompat,
        false,
        18,
        1064,
    ),
    s(
        "deepseek_chat_stream_reasoning.sse",
        Api::Chat,
        true,
        6,
        212,
    ),
    s("deepseek_chat.json", Api::Chat, false, 563, 116),
    s("zhipu_glm_stream.sse", Api::Chat, true, 13, 564),
    s("mistral_stream.sse", Api::Chat, true, 10, 232),
    s(
        "openrouter_stream_usage_comments.sse",
        Api::Chat,
        true,
        254,
        5,
    ),
    s("groq_stream_x_groq_usage.sse", Api::Chat, true, 210, 15),
];

fn request(api: Api, stream: bool) -> (String, Value, Vec<(&'static str, &'static str)>) {
    let messages = json!([{"role": "user", "content": "Say something metered."}]);
    match api {
        Api::Chat | Api::DashScopeCompat => {
            let path = if matches!(api, Api::Chat) {
                "/v1/chat/completions"
            } else {
                "/compatible-mode/v1/chat/completions"
            };
            let mut body = json!({"model": MODEL, "stream": stream, "messages": messages});
            if stream {
                // The client asks for usage itself, so the stream must reach it unchanged.
                body["stream_options"] = json!({"include_usage": true});
            }
            (path.into(), body, vec![])
        }
        Api::Completions => (
            "/v1/completions".into(),
            json!({"model": MODEL, "stream": stream, "prompt": "Say something",
                   "stream_options": {"include_usage": true}}),
            vec![],
        ),
        Api::Responses => (
            "/v1/responses".into(),
            json!({"model": MODEL, "stream": stream, "input": "Say something metered."}),
            vec![],
        ),
        Api::Embeddings => (
            "/v1/embeddings".into(),
            json!({"model": MODEL, "input": "embed me"}),
            vec![],
        ),
        Api::Anthropic => (
            "/v1/messages".into(),
            json!({"model": MODEL, "max_tokens": 1024, "stream": stream, "messages": messages}),
            vec![],
        ),
        Api::Gemini => {
            let method = if stream {
                "streamGenerateContent?alt=sse"
            } else {
                "generateContent"
            };
            (
                format!("/v1beta/models/{GEMINI_MODEL}:{method}"),
                json!({"contents": [{"role": "user", "parts": [{"text": "Say something metered."}]}]}),
                vec![],
            )
        }
        Api::DashScopeNative => {
            let headers = if stream {
                vec![("x-dashscope-sse", "enable")]
            } else {
                vec![]
            };
            (
                "/api/v1/services/aigc/text-generation/generation".into(),
                json!({"model": MODEL, "input": {"messages": messages},
                       "parameters": {"incremental_output": stream}}),
                headers,
            )
        }
    }
}

/// Cost in micro-yuan at 0.002 / 0.006 yuan per 1k input / output tokens: exactly 2 and 6
/// micro-yuan per token, so the expected figure needs no rounding.
fn expected_cost(input: i64, output: i64) -> String {
    let micros = 2 * input + 6 * output;
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

async fn run_matrix(stack: &Stack, scenarios: &[Scenario], label: &str) {
    for (i, scenario) in scenarios.iter().enumerate() {
        let user = format!("{label}-{i}");
        stack
            .admin
            .grant(&user, "text_token", 1_000_000, &format!("grant-{user}"))
            .await;
        let (path, body, mut headers) = request(scenario.api, scenario.stream);
        headers.push(("x-script-fixture", scenario.fixture));
        // Odd chunk sizes cut lines, `data:` prefixes and UTF-8 characters apart.
        headers.push(("x-script-chunk-bytes", if i % 2 == 0 { "7" } else { "61" }));
        let reply = stack.call(&path, Some(&user), &body, &headers).await;
        assert_eq!(reply.status, 200, "{}: {}", scenario.fixture, reply.text());
        let fixture = fixtures::locate(scenario.fixture).expect("fixture exists");
        let original = std::fs::read(fixture).expect("read fixture");
        assert!(
            reply.body == original,
            "{}: the client must receive the upstream's bytes unchanged",
            scenario.fixture
        );

        let records = stack.wait_for_usage(&user, 1).await;
        let record = &records[0];
        let context = format!("{}: {record}", scenario.fixture);
        assert_eq!(num(record, "input_tokens"), scenario.input, "{context}");
        assert_eq!(num(record, "output_tokens"), scenario.output, "{context}");
        assert_eq!(record["status"], "settled", "{context}");
        assert_eq!(record["estimated"], false, "{context}");
        assert_eq!(record["unpriced"], false, "{context}");
        assert_eq!(
            record["cost"],
            expected_cost(scenario.input, scenario.output),
            "{context}"
        );

        let quota = stack.admin.quota_released(&user, "text_token").await;
        assert_eq!(
            num(&quota, "used"),
            scenario.input + scenario.output,
            "{context} {quota}"
        );
        assert_eq!(num(&quota, "held"), 0, "{context} {quota}");
    }
}

async fn priced_stack(label: &str) -> Stack {
    let stack = Stack::start(label).await;
    stack.seed_priced_model(MODEL, "0.002", "0.006").await;
    stack
        .seed_priced_model(GEMINI_MODEL, "0.002", "0.006")
        .await;
    stack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_fixtures_are_billed_exactly_through_envoy() {
    let stack = priced_stack("own").await;
    run_matrix(&stack, OWN, "own").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_provider_responses_are_billed_exactly_through_envoy() {
    if fixtures::shared_dir().is_none() {
        return;
    }
    let stack = priced_stack("recorded").await;
    run_matrix(&stack, RECORDED, "rec").await;
}
