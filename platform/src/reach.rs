//! "Is the service there at all?" before talking to it.
//!
//! The clients are built to ride out outages: librdkafka retries a missing
//! broker forever, the Postgres pool waits for a connection, the Redis client
//! reconnects. That is right for a running service and wrong for a command
//! someone just typed against a service that is not started: it hangs, then
//! prints a chain of timeouts. So every command first opens a plain TCP
//! connection to each service it needs (a few seconds at most) and, if none
//! of a service's addresses answers, stops with one line that names the
//! service, the address and how to fix it ([`Unreachable`]).

use std::fmt;
use std::time::Duration;

use tokio::net::TcpStream;

/// How long one address may take to accept a TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The services a command may depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Postgres,
    Redis,
    Kafka,
}

impl Service {
    fn label(self) -> &'static str {
        match self {
            Service::Postgres => "Postgres",
            Service::Redis => "Redis",
            Service::Kafka => "the Kafka broker",
        }
    }

    /// The environment variable that points at the service.
    pub fn env_var(self) -> &'static str {
        match self {
            Service::Postgres => "DATABASE_URL",
            Service::Redis => "REDIS_URL",
            Service::Kafka => "KAFKA_BROKERS",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Service::Postgres => 5432,
            Service::Redis => 6379,
            Service::Kafka => 9092,
        }
    }
}

/// No address of a service accepted a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Unreachable {
    pub service: Service,
    /// The address(es) tried, as the user gave them (without credentials).
    pub address: String,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot reach {} at {} (start it with make up, or set {})",
            self.service.label(),
            self.address,
            self.service.env_var()
        )
    }
}

/// `host:port` of a connection URL (`postgres://user:pw@host:port/db`,
/// `redis://host:port`); the service's default port when none is given.
/// `None` when the URL names no TCP host (e.g. a Unix socket), which is then
/// not checked.
pub fn url_address(service: Service, url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    // Several hosts (`h1:5432,h2:5432`) are checked as the first one.
    let host_port = host_port.split(',').next().unwrap_or_default();
    if host_port.is_empty() {
        return None;
    }
    Some(with_port(host_port, service.default_port()))
}

fn with_port(host_port: &str, default_port: u16) -> String {
    let has_port = match host_port.rfind(']') {
        // [::1]:5432 or [::1]
        Some(bracket) => host_port[bracket..].contains(':'),
        None => host_port.contains(':'),
    };
    if has_port {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    }
}

/// Succeeds when at least one of `addresses` accepts a TCP connection within
/// [`CONNECT_TIMEOUT`]; all are tried at once.
pub async fn check(service: Service, addresses: &[String]) -> Result<(), Unreachable> {
    if addresses.is_empty() {
        return Ok(());
    }
    let attempts = addresses.iter().map(|address| {
        Box::pin(async move {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address.as_str())).await
            {
                Ok(Ok(_)) => Ok(()),
                _ => Err(()),
            }
        })
    });
    // The first success wins; only when every address failed is it an error.
    match futures::future::select_ok(attempts).await {
        Ok(_) => Ok(()),
        Err(()) => Err(Unreachable {
            service,
            address: addresses.join(","),
        }),
    }
}

/// Checks the Postgres server of `url`.
pub async fn postgres(url: &str) -> Result<(), Unreachable> {
    let addresses: Vec<String> = url_address(Service::Postgres, url).into_iter().collect();
    check(Service::Postgres, &addresses).await
}

/// Checks the Redis server of `url`.
pub async fn redis(url: &str) -> Result<(), Unreachable> {
    let addresses: Vec<String> = url_address(Service::Redis, url).into_iter().collect();
    check(Service::Redis, &addresses).await
}

/// Checks the bootstrap servers (`host:port,host:port`, optionally with a
/// `PLAINTEXT://`-style scheme): one that answers is enough.
pub async fn kafka(brokers: &str) -> Result<(), Unreachable> {
    let addresses: Vec<String> = brokers
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .map(|b| with_port(b.split_once("://").map_or(b, |(_, rest)| rest), 9092))
        .collect();
    check(Service::Kafka, &addresses).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_come_from_urls_without_credentials() {
        assert_eq!(
            url_address(
                Service::Postgres,
                "postgres://u:secret@db.local:6543/coupons?x=1"
            ),
            Some("db.local:6543".into())
        );
        assert_eq!(
            url_address(Service::Postgres, "postgres://postgres@127.0.0.1/coupons"),
            Some("127.0.0.1:5432".into())
        );
        assert_eq!(
            url_address(Service::Redis, "redis://127.0.0.1:6380"),
            Some("127.0.0.1:6380".into())
        );
        assert_eq!(
            url_address(Service::Redis, "redis://[::1]"),
            Some("[::1]:6379".into())
        );
        assert_eq!(url_address(Service::Postgres, "postgres:///coupons"), None);
    }

    #[test]
    fn the_message_is_one_line_with_a_hint() {
        let error = Unreachable {
            service: Service::Kafka,
            address: "127.0.0.1:9092".into(),
        };
        assert_eq!(
            error.to_string(),
            "cannot reach the Kafka broker at 127.0.0.1:9092 (start it with make up, or set KAFKA_BROKERS)"
        );
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable_and_an_open_one_is_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap().to_string();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        assert!(kafka(&open).await.is_ok());
        assert!(kafka(&format!("{closed},{open}")).await.is_ok());
        let error = kafka(&closed).await.unwrap_err();
        assert_eq!(error.address, closed);
        assert!(redis(&format!("redis://{closed}")).await.is_err());
    }
}
