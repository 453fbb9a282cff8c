//! client-go's request metrics, which kube-proxy exports and the
//! "Kubernetes / Proxy" dashboard plots: `rest_client_requests_total{code,
//! host, method}` and `rest_client_request_duration_seconds{host, verb}`,
//! measured around every request the API client sends (a watch counts
//! until its response headers arrive, as in client-go).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::http::{Request, Response};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tower::{Layer, Service};

/// The two collectors.
#[derive(Debug, Clone)]
pub struct RestClientMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl RestClientMetrics {
    /// Made and registered in `registry`.
    pub fn register(registry: &Registry) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "rest_client_requests_total",
                "Number of HTTP requests, partitioned by status code, method, and host.",
            ),
            &["code", "host", "method"],
        )
        .expect("valid counter vec");
        // client-go's buckets.
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "rest_client_request_duration_seconds",
                "Request latency in seconds. Broken down by verb, and host.",
            )
            .buckets(vec![
                0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0,
            ]),
            &["host", "verb"],
        )
        .expect("valid histogram vec");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
        ] {
            registry
                .register(c)
                .expect("metric names are unique and valid");
        }
        RestClientMetrics { requests, duration }
    }

    fn observe(&self, host: &str, method: &str, code: &str, started: Instant) {
        self.requests.with_label_values(&[code, host, method]).inc();
        self.duration
            .with_label_values(&[host, method])
            .observe(started.elapsed().as_secs_f64());
    }

    /// The layer that feeds them, for `kube::client::ClientBuilder::with_layer`.
    /// `host` is the API server's `host:port`: requests reach this layer
    /// with a path only (kube adds the server further down the stack).
    pub fn layer(&self, host: &str) -> RestClientLayer {
        RestClientLayer {
            metrics: Arc::new(self.clone()),
            host: Arc::from(host),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RestClientLayer {
    metrics: Arc<RestClientMetrics>,
    host: Arc<str>,
}

impl<S> Layer<S> for RestClientLayer {
    type Service = Measured<S>;
    fn layer(&self, inner: S) -> Measured<S> {
        Measured {
            inner,
            metrics: self.metrics.clone(),
            host: self.host.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Measured<S> {
    inner: S,
    metrics: Arc<RestClientMetrics>,
    host: Arc<str>,
}

impl<S, B, R> Service<Request<B>> for Measured<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let host = self.host.clone();
        let method = req.method().as_str().to_string();
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            let result = response.await;
            let code = match &result {
                Ok(r) => r.status().as_u16().to_string(),
                Err(_) => "<error>".to_string(),
            };
            metrics.observe(&host, &method, &code, started);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_are_counted_by_code_host_and_method() {
        let registry = Registry::new();
        let metrics = RestClientMetrics::register(&registry);
        let svc = tower::service_fn(|req: Request<()>| async move {
            let status = if req.uri().path() == "/missing" {
                404
            } else {
                200
            };
            Ok::<_, std::convert::Infallible>(Response::builder().status(status).body(()).unwrap())
        });
        let mut svc = metrics.layer("10.0.0.1:6443").layer(svc);
        for path in ["/api/v1/services", "/api/v1/services", "/missing"] {
            let req = Request::get(path).body(()).unwrap();
            tower::ServiceExt::ready(&mut svc)
                .await
                .unwrap()
                .call(req)
                .await
                .unwrap();
        }
        let text = {
            let mut buf = Vec::new();
            prometheus::Encoder::encode(
                &prometheus::TextEncoder::new(),
                &registry.gather(),
                &mut buf,
            )
            .unwrap();
            String::from_utf8(buf).unwrap()
        };
        for line in [
            "rest_client_requests_total{code=\"200\",host=\"10.0.0.1:6443\",method=\"GET\"} 2",
            "rest_client_requests_total{code=\"404\",host=\"10.0.0.1:6443\",method=\"GET\"} 1",
            "rest_client_request_duration_seconds_count{host=\"10.0.0.1:6443\",verb=\"GET\"} 3",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }
}
