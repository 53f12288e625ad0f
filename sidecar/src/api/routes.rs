//! A router that remembers its routes.
//!
//! axum cannot list the routes of a built `Router`, so every route is added through
//! [`RouteTable`], which records `(method, path)` next to the handler. The OpenAPI test
//! compares that record with the served document, so the two cannot drift apart.

use std::collections::BTreeMap;

use axum::handler::Handler;
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;

/// HTTP methods the API uses, with their OpenAPI spelling.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    pub fn as_openapi(self) -> &'static str {
        match self {
            Method::Get => "get",
            Method::Post => "post",
            Method::Put => "put",
            Method::Patch => "patch",
            Method::Delete => "delete",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Method::Get => MethodFilter::GET,
            Method::Post => MethodFilter::POST,
            Method::Put => MethodFilter::PUT,
            Method::Patch => MethodFilter::PATCH,
            Method::Delete => MethodFilter::DELETE,
        }
    }
}

/// Routes added so far, grouped by path (axum wants one `MethodRouter` per path).
pub struct RouteTable<S> {
    paths: BTreeMap<&'static str, MethodRouter<S>>,
    recorded: Vec<(Method, &'static str)>,
}

impl<S: Clone + Send + Sync + 'static> Default for RouteTable<S> {
    fn default() -> Self {
        RouteTable {
            paths: BTreeMap::new(),
            recorded: Vec::new(),
        }
    }
}

impl<S: Clone + Send + Sync + 'static> RouteTable<S> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        let router = match self.paths.remove(path) {
            Some(existing) => existing.on(method.filter(), handler),
            None => on(method.filter(), handler),
        };
        self.paths.insert(path, router);
        self.recorded.push((method, path));
        self
    }

    /// The router and the list of its routes.
    pub fn build(self) -> (Router<S>, Vec<(Method, &'static str)>) {
        let mut router = Router::new();
        for (path, method_router) in self.paths {
            router = router.route(path, method_router);
        }
        (router, self.recorded)
    }
}
