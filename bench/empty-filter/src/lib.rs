//! Baseline filters for `make bench`, built with the same SDK and toolchain as the metering
//! filter, so the bench can separate the cost of running any wasm filter from the cost of
//! one HTTP callout per request and from the cost of metering itself.
//!
//! Plugin configuration (a plain string):
//! - empty: the empty filter (every callback returns `Continue`).
//! - `callout:<cluster>`: on request headers, one `GET /callout` to `<cluster>`; the request
//!   continues when the answer arrives (what an authorize callout costs, without metering).

#[cfg(target_arch = "wasm32")]
mod filter {
    use std::time::Duration;

    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
            Box::new(BenchRoot { callout_cluster: None })
        });
    }}

    struct BenchRoot {
        callout_cluster: Option<String>,
    }

    impl Context for BenchRoot {}

    impl RootContext for BenchRoot {
        fn on_configure(&mut self, _size: usize) -> bool {
            let config = self
                .get_plugin_configuration()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .unwrap_or_default();
            self.callout_cluster = config
                .trim()
                .strip_prefix("callout:")
                .map(|cluster| cluster.trim().to_string());
            true
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(BenchHttp {
                callout_cluster: self.callout_cluster.clone(),
            }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct BenchHttp {
        callout_cluster: Option<String>,
    }

    impl Context for BenchHttp {
        fn on_http_call_response(
            &mut self,
            _token: u32,
            _headers: usize,
            _body: usize,
            _trailers: usize,
        ) {
            self.resume_http_request();
        }
    }

    impl HttpContext for BenchHttp {
        fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
            let Some(cluster) = self.callout_cluster.as_deref() else {
                return Action::Continue;
            };
            let headers = vec![
                (":method", "GET"),
                (":path", "/callout"),
                (":authority", "bench-callout"),
            ];
            match self.dispatch_http_call(cluster, headers, None, vec![], Duration::from_secs(2)) {
                Ok(_) => Action::Pause,
                // A failed dispatch lets the request through: this is a baseline, not a gate.
                Err(_) => Action::Continue,
            }
        }
    }
}
