//! Serving: connections, their limits and graceful shutdown, and the request
//! metrics every route is observed by (the operational routes themselves are
//! in `routes/health.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::Router;
use tokio::sync::Semaphore;

use super::auth;
use super::router;
use super::GatewayState;

/// Serves until `shutdown` resolves, then finishes in-flight requests.
///
/// Each connection must send a request's headers within
/// `header_read_timeout` (which also ends idle keep-alive connections);
/// beyond `max_connections` open connections, new ones are closed at once.
/// The peer's address goes on every request ([`ClientAddr`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<GatewayState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::Service as _;

    tokio::spawn(GatewayState::refresh_blacklist(Arc::downgrade(&state)));
    let connections = Arc::new(Semaphore::new(state.config.max_connections.max(1)));
    let drain = state.config.request_deadline() + Duration::from_secs(1);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(state.config.header_read_timeout);
    let app = router(state);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: let some close.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics::counter!("coupon_http_connections_refused_total").increment(1);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
            request.extensions_mut().insert(auth::Peer(peer));
            app.clone().call(request)
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    // In-flight requests end by their deadline; idle connections at once.
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {drain:?}; closing them");
    }
    Ok(())
}

/// The `method` label: one of a fixed set, so no request can add a series.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The `status` label: the status if it is one the gateway sends, else its
/// class (`4xx`, `5xx`).
fn status_label(status: StatusCode) -> &'static str {
    const SENT: [&str; 17] = [
        "200", "202", "400", "401", "403", "404", "405", "408", "409", "413", "414", "415", "422",
        "429", "500", "503", "504",
    ];
    let code = status.as_str();
    SENT.into_iter()
        .find(|sent| *sent == code)
        .unwrap_or(match status.as_u16() / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        })
}

pub(super) async fn observe(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    // Matched paths come from the route table: a closed set.
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    let status = status_label(response.status());
    metrics::counter!("coupon_http_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("coupon_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// `GET /metrics` alone, for a process that runs consumers without the
/// gateway (`couponctl consume ... --metrics-addr`); not part of the API.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new().route(
        "/metrics",
        axum::routing::get(move || async move {
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                metrics.render(),
            )
        }),
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The address a listener is bound to, for logs and tests.
pub fn local_addr(listener: &tokio::net::TcpListener) -> std::io::Result<SocketAddr> {
    listener.local_addr()
}
